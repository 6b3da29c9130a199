"""One agent protocol: every verb the controller asks answers JSON lines and an exit code
(provision/agent/protocol.py), reached through the prelude with the `box_python` host var.

The box is this machine (`connection: local`) with its own agent dir, so the real prelude,
zipapp and agent run; no root, no sshd.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from boxes import run_cli
from project import one_line_error

from provision.agent import protocol
from provision.bundle import build_agent


@pytest.fixture
def here(tmp_path: Path, controller_env: dict[str, str]) -> dict[str, str]:
    """A project whose inventory has `here`, this machine, its agent started through a
    `box_python` wrapper that notes each start (in `python-used`)."""
    used = tmp_path / "python-used"
    wrapper = tmp_path / "box-python"
    wrapper.write_text(f'#!/bin/sh\necho "$1" >> {used}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    inventory = {"hosts": {"here": {"connection": "local", "vars": {"box_python": str(wrapper)}}}}
    (tmp_path / "inventory.yaml").write_text(json.dumps(inventory))
    (tmp_path / "book.yaml").write_text(
        "name: book\nsteps:\n  - {id: x, kind: shell, run: 'echo one; echo two'}\n"
    )
    return dict(controller_env, BOOTSTRAP_AGENT_DIR=str(tmp_path / "agent-dir"))


def _agent(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """The agent zipapp on its own, as the prelude starts it."""
    pyz = tmp_path / "agent.pyz"
    pyz.write_bytes(build_agent().data)
    return subprocess.run(
        [sys.executable, "-I", "-S", str(pyz), *argv],
        capture_output=True,
        text=True,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        input="",
    )


@pytest.mark.slow
def test_status_and_logs_refuse_alike_on_a_box_with_no_run(tmp_path: Path) -> None:
    for argv in (["status"], ["logs", "x"], ["status", "--run", "nope"]):
        result = _agent(tmp_path, *argv)
        assert result.returncode == protocol.REFUSED, (argv, result)
        answer = json.loads(result.stdout.strip().splitlines()[-1])
        assert answer["reason"] == protocol.NO_RUN
        assert answer["error"].startswith("no bootstrap run"), answer
        assert result.stderr == ""
    assert "named 'nope'" in json.loads(_agent(tmp_path, "status", "--run", "nope").stdout)["error"]


@pytest.mark.slow
def test_a_crashing_verb_answers_bug_with_its_traceback_on_stderr(tmp_path: Path) -> None:
    """`monitor` given no step (a controller that broke the contract) is a crash, not a hang
    or a bare traceback: rc BUG, a JSON line saying so, the traceback on stderr."""
    result = _agent(tmp_path, "monitor")
    assert result.returncode == protocol.BUG
    assert json.loads(result.stdout.splitlines()[-1]) == {"error": "KeyError: 'step'", "bug": True}
    assert "Traceback (most recent call last)" in result.stderr and "cmd_monitor" in result.stderr


@pytest.mark.slow
def test_cli_status_and_logs_on_a_box_with_no_run(here: dict[str, str], tmp_path: Path) -> None:
    """Both say it in one line, exit 2, through the prelude and the host's box_python."""
    status = run_cli(["status", "here"], env=here, cwd=tmp_path)
    assert one_line_error(status) == (
        "error: here: no bootstrap run on this box (run `bootstrap up` first)"
    )
    logs = run_cli(["logs", "here", "x"], env=here, cwd=tmp_path)
    assert one_line_error(logs) == status.stderr.strip()
    named = run_cli(["status", "here", "--json", "-p", "book.yaml"], env=here, cwd=tmp_path)
    assert "no bootstrap run named 'book' on this box" in one_line_error(named)
    starts = (tmp_path / "python-used").read_text().splitlines()
    assert starts == ["-S"] * 3, starts  # the prelude: `python3 -S -c ...`


@pytest.mark.slow
def test_status_and_logs_of_a_run(here: dict[str, str], tmp_path: Path) -> None:
    up = run_cli(["up", "here", "-p", "book.yaml"], env=here, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    status = run_cli(["status", "here", "--json"], env=here, cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    snap = json.loads(status.stdout)
    assert snap["host"] == "here" and [s["status"] for s in snap["steps"]] == ["done"]
    logs = run_cli(["logs", "here", "x", "-n", "5"], env=here, cwd=tmp_path)
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.splitlines()[-2:] == ["one", "two"]
    missing = run_cli(["logs", "here", "nosuch"], env=here, cwd=tmp_path)
    assert one_line_error(missing) == "error: here: no log for step 'nosuch' in run 'book'"
    starts = (tmp_path / "python-used").read_text().splitlines()
    assert starts and set(starts) == {"-S"}, starts  # `python3 -S -c`, never `python3 agent.pyz`


@pytest.mark.slow
def test_an_agent_crash_is_a_bug_exit_3_with_the_box_traceback_in_the_debug_log(
    here: dict[str, str], tmp_path: Path
) -> None:
    """A box whose runs dir is a file: the agent's `status` crashes there (NotADirectoryError);
    the CLI says it is a bug in one line and keeps the box's traceback."""
    agent_dir = Path(here["BOOTSTRAP_AGENT_DIR"])
    agent_dir.mkdir()
    (agent_dir / "runs").write_text("not a directory")
    result = run_cli(["status", "here"], env=here, cwd=tmp_path)
    assert result.returncode == 3, result
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    log = Path(here["BOOTSTRAP_CONFIG_DIR"]) / "debug.log"
    assert lines[0].startswith("error: here: this is a bug in bootstrap: the agent crashed")
    assert "NotADirectoryError" in lines[0] and f"(traceback in {log})" in lines[0]
    text = log.read_text()
    assert "on the box (here):" in text and "latest_run" in text and "os.listdir" in text
    logs = run_cli(["logs", "here", "train"], env=here, cwd=tmp_path)
    assert logs.returncode == 3 and "Traceback" not in logs.stderr, logs
    assert logs.stderr.startswith("error: here: step 'train': this is a bug in bootstrap: ")
    assert logs.stderr.count("\n") == 1
