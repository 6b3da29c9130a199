"""Inputs at the edges: very long chains and ids, literal `{{` in vars, inventory names where a
host:port was expected, and a box whose interpreter is not `python3`.

Each case failed on the main of issue 13 (a RecursionError, a run-time failure, a var rendered
twice, "no key stored", a command run with the wrong python) and is checked here end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from boxes import Box
from project import Project, one_line_error


@pytest.mark.slow
def test_graph_draws_a_1000_step_chain(tmp_path: Path, controller_env: dict[str, str]) -> None:
    project = Project(tmp_path / "project", controller_env)
    steps = [f"  - {{id: s{i}, kind: shell, run: 'true', estimate: 1}}" for i in range(1000)]
    for i in range(1, 1000):
        steps[i] = steps[i][:-1] + f", needs: [s{i - 1}]}}"
    project.playbook("name: chain\nsteps:\n" + "\n".join(steps) + "\n")
    for fmt in ("tree", "mermaid", "dot"):
        result = project.cli("graph", "-p", "playbooks/test.yaml", "--format", fmt)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert "s999" in result.stdout and "critical path (1000s): s0 -> s1 -> " in result.stdout
    tree = project.cli("graph", "-p", "playbooks/test.yaml")
    assert tree.stdout.count("[shell]") == 1000


@pytest.mark.slow
def test_a_step_id_longer_than_the_limit_is_refused_at_load(
    tmp_path: Path, controller_env: dict[str, str]
) -> None:
    project = Project(tmp_path / "project", controller_env)
    long_id = "a" * 300  # ~250 passed the old loader and broke the log's file name
    path = project.playbook(
        f"name: t\nsteps:\n  - {{id: ok, kind: shell, run: 'true'}}\n"
        f"  - id: {long_id}\n    kind: shell\n    run: 'true'\n"
    )
    error = one_line_error(project.cli("up", "local", "-p", "playbooks/test.yaml"))
    assert error.startswith(f"error: {path.relative_to(project.root)}:4:"), error
    assert "is 300 characters" in error and "at most 100" in error
    long_name = "n" * 300
    project.playbook(f"name: {long_name}\nsteps:\n  - {{id: ok, kind: shell, run: 'true'}}\n")
    error = one_line_error(project.cli("graph", "-p", "playbooks/test.yaml"))
    assert ":1:" in error and "at most 100" in error, error


VARS_PLAYBOOK = """
name: literal
vars:
  raw: "{% raw %}{{ not a var }}{% endraw %}"
  quoted: "said: {{ raw }}"
  base: ~/literal
  out: "{{ base }}/out"
steps:
  - id: write
    kind: shell
    env: {MSG: "{{ msg }}", RAW: "{{ raw }}", QUOTED: "{{ quoted }}"}
    run: mkdir -p {{ out }} && printf '%s|%s|%s' "$MSG" "$RAW" "$QUOTED" > {{ out }}/vars
"""


@pytest.mark.slow
def test_vars_render_once_and_command_line_values_are_literals(project: Project, box: Box) -> None:
    project.playbook(VARS_PLAYBOOK)
    result = project.up("box1", extra=["-e", "msg={{5}} {% if x %}"])
    assert result.returncode == 0, result.stdout + result.stderr
    written = (box.home / "literal" / "out" / "vars").read_text()
    assert written == "{{5}} {% if x %}|{{ not a var }}|said: {{ not a var }}", written
    # A cycle is bad input, not a silent half-rendered value.
    project.playbook(
        "name: c\nvars: {a: '{{ b }}', b: '{{ a }}x'}\n"
        "steps:\n  - {id: s, kind: shell, run: 'echo {{ a }}'}\n"
    )
    error = one_line_error(project.up("box1"))
    assert "cycle" in error and "a" in error, error


@pytest.mark.slow
def test_forget_takes_an_inventory_name(project: Project, box: Box) -> None:
    project.playbook("name: t\nsteps:\n  - {id: a, kind: shell, run: 'true'}\n")
    assert project.up("box1").returncode == 0
    forget = project.cli("forget", "box1")
    assert forget.returncode == 0, forget.stderr
    assert forget.stdout.strip() == f"forgot box1 ({box.user}@{box.host}:{box.port})"
    # The key is really gone: a new one is trusted on first use again.
    box.new_host_key()
    assert project.up("box1").returncode == 0
    # A group forgets each of its hosts.
    assert "forgot box1" in project.cli("forget", "fleet").stdout


@pytest.mark.slow
def test_status_and_logs_use_box_python(project: Project, box: Box) -> None:
    """`box_python` names the interpreter every agent command runs with, not only `up`'s."""
    wrapper = box.home / "py" / "python"
    wrapper.parent.mkdir()
    calls = box.home / "py" / "calls"
    # Records how it was started (`-S -c`: the prelude every command sends), then runs python3.
    wrapper.write_text(
        f'#!/bin/sh\ncase "$1" in -S) echo prelude ;; *) echo "$2" ;; esac >> {calls}\n'
        'exec python3 "$@"\n'
    )
    wrapper.chmod(0o755)
    project.host_vars = {"box_python": str(wrapper)}
    project.playbook("name: t\nsteps:\n  - {id: a, kind: shell, run: 'echo hello-a'}\n")
    assert project.up("box1").returncode == 0
    before = len(calls.read_text().splitlines())
    status = project.cli("status", "box1", "-p", "playbooks/test.yaml", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["steps"][0]["status"] == "done"
    logs = project.cli("logs", "box1", "a", "-p", "playbooks/test.yaml")
    assert logs.returncode == 0 and "hello-a" in logs.stdout, logs.stderr
    invoked = calls.read_text().splitlines()[before:]
    # Every agent verb goes through the prelude now (one agent protocol), with box_python.
    assert invoked == ["prelude", "prelude"], invoked
