"""The engine's guarantees (issue 8), each over a real sshd box on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from boxes import Box
from conftest import TRANSPORTS
from project import Project, away, count, wait_for

#: The tests that run over both transports (`transport` ids openssh/paramiko): those whose
#: guarantee rides on the link (the followed stream, the agent shipped on stdin, a killed
#: controller, status/logs, unreachable and changed-key errors). The rest exercise the runner,
#: which does not know how it was reached, and run over OpenSSH only.
both_transports = pytest.mark.parametrize("transport", TRANSPORTS, indirect=True)

TWO_TRACKS = """
name: tracks
max_parallel: {parallel}
steps:
  - id: a
    kind: shell
    run: echo a >> ~/count-a; sleep 1
  - id: b
    kind: shell
    run: echo b >> ~/count-b; sleep 1
  - id: join
    kind: shell
    needs: [a, b]
    run: echo join >> ~/count-join
"""


def _overlap(s1: dict, s2: dict) -> bool:
    return s1["started"] < s2["ended"] and s2["started"] < s1["ended"]


@both_transports
def test_parallel_tracks_and_completion_noticed_at_once(project: Project, box: Box) -> None:
    project.playbook(TWO_TRACKS.format(parallel=4))
    result = project.up("box1")
    assert result.returncode == 0, result.stdout + result.stderr
    steps = project.steps("box1")
    assert _overlap(steps["a"], steps["b"])
    # The runner waits on its children: the join starts right after the last need ended.
    gap = steps["join"]["started"] - max(steps["a"]["ended"], steps["b"]["ended"])
    assert 0 <= gap < 1.0
    assert [count(box, n) for n in ("a", "b", "join")] == [1, 1, 1]


def test_max_parallel_bounds_concurrency(project: Project) -> None:
    project.playbook(TWO_TRACKS.format(parallel=1))
    assert project.up("box1").returncode == 0
    steps = project.steps("box1")
    assert not _overlap(steps["a"], steps["b"])


@both_transports
def test_second_up_is_a_noop_and_plan_says_why(project: Project, box: Box) -> None:
    project.playbook(
        """
        name: idem
        steps:
          - id: make
            kind: shell
            run: echo x >> ~/count-make; touch ~/made
            creates: ~/made
          - id: check
            kind: shell
            needs: [make]
            run: echo x >> ~/count-check
            done_when: test -f ~/made
          - id: plain
            kind: shell
            run: echo x >> ~/count-plain
        """
    )
    assert project.up("box1").returncode == 0
    second = project.up("box1")
    assert second.returncode == 0
    assert [count(box, n) for n in ("make", "check", "plain")] == [1, 1, 1]
    plan = project.cli("plan", "box1", "-p", "playbooks/test.yaml", "--json")
    assert plan.returncode == 0, plan.stderr
    reasons = {s["id"]: s for s in json.loads(plan.stdout)["steps"]}
    assert not any(s["run"] for s in reasons.values())
    assert "creates exists" in reasons["make"]["reason"]
    assert "done_when passed" in reasons["check"]["reason"]
    assert "fingerprint matches" in reasons["plain"]["reason"]


def test_changed_params_rerun_the_step_and_its_dependents_only(project: Project, box: Box) -> None:
    text = """
        name: change
        steps:
          - id: root
            kind: shell
            run: echo {v} >> ~/count-root
          - id: child
            kind: shell
            needs: [root]
            run: echo x >> ~/count-child
          - id: other
            kind: shell
            run: echo x >> ~/count-other
        """
    project.playbook(text.format(v="one"))
    assert project.up("box1").returncode == 0
    project.playbook(text.format(v="two"))
    plan = json.loads(project.cli("plan", "box1", "-p", "playbooks/test.yaml", "--json").stdout)
    runs = {s["id"]: (s["run"], s["reason"]) for s in plan["steps"]}
    assert runs["root"] == (True, "params changed")
    assert runs["child"][0] and "upstream" in runs["child"][1]
    assert runs["other"][0] is False
    assert project.up("box1").returncode == 0
    assert [count(box, n) for n in ("root", "child", "other")] == [2, 2, 1]


def test_deleted_output_reruns_exactly_its_dependents(project: Project, box: Box) -> None:
    project.playbook(
        """
        name: outputs
        steps:
          - id: fetch
            kind: shell
            run: echo x >> ~/count-fetch; echo data > ~/data.txt
            creates: ~/data.txt
          - id: stats
            kind: shell
            needs: [fetch]
            run: echo x >> ~/count-stats; wc -c ~/data.txt > ~/stats.txt
            creates: ~/stats.txt
          - id: unrelated
            kind: shell
            run: echo x >> ~/count-unrelated; touch ~/unrelated
            creates: ~/unrelated
        """
    )
    assert project.up("box1").returncode == 0
    (box.home / "data.txt").unlink()
    assert project.up("box1").returncode == 0
    assert [count(box, n) for n in ("fetch", "stats", "unrelated")] == [2, 2, 1]


def test_failure_blocks_dependents_and_other_tracks_finish(project: Project, box: Box) -> None:
    project.playbook(
        """
        name: failing
        steps:
          - id: bad
            kind: shell
            run: echo "about to fail"; echo "CUDA out of memory" >&2; exit 3
          - id: after-bad
            kind: shell
            needs: [bad]
            run: echo x >> ~/count-after
          - id: good
            kind: shell
            run: sleep 1; echo x >> ~/count-good
        """
    )
    result = project.up("box1")
    assert result.returncode == 1
    steps = project.steps("box1")
    assert steps["bad"]["status"] == "failed" and steps["bad"]["rc"] == 1
    assert steps["after-bad"]["status"] == "blocked"
    assert steps["good"]["status"] == "done"
    assert count(box, "after") == 0 and count(box, "good") == 1
    assert "about to fail" in result.stdout and "bootstrap rerun box1 bad" in result.stdout
    assert "exited 3" in steps["bad"]["reason"]


def test_retries_and_timeout_kill_the_process_group(project: Project, box: Box) -> None:
    project.playbook(
        """
        name: timeouts
        steps:
          - id: flaky
            kind: shell
            retries: 2
            run: |
              echo x >> ~/count-flaky
              test "$(wc -l < ~/count-flaky)" -ge 2
          - id: stubborn
            kind: shell
            timeout: 2
            run: |
              trap '' TERM
              (trap '' TERM; sleep 300) &
              echo $! > ~/grandchild.pid
              sleep 300
        """
    )
    start = time.time()
    result = project.up("box1")
    assert result.returncode == 1
    steps = project.steps("box1")
    assert steps["flaky"]["status"] == "done" and steps["flaky"]["attempts"] == 2
    assert steps["stubborn"]["status"] == "failed"
    assert "timed out after 2s" in steps["stubborn"]["reason"]
    assert time.time() - start < 60
    grandchild = int((box.home / "grandchild.pid").read_text())
    assert not os.path.exists(f"/proc/{grandchild}") or _zombie(grandchild)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


SLOW = away(3, "slow", marker=True)


@both_transports
def test_killing_the_controller_does_not_stop_the_run(project: Project, box: Box) -> None:
    project.playbook(SLOW)
    project.write_inventory()
    proc = subprocess.Popen(
        [sys.executable, "-m", "provision.cli", "up", "box1", "-p", "playbooks/test.yaml"],
        cwd=project.root,
        env=project.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: count(box, "long") == 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: count(box, "last") == 1)
    wait_for(lambda: project.status("box1")["runner"] == "idle")
    assert all(s["status"] == "done" for s in project.status("box1")["steps"])
    assert project.up("box1").returncode == 0
    assert [count(box, n) for n in ("first", "long", "last")] == [1, 1, 1]


RESUMABLE = SLOW.replace("sleep 3;", 'test "$(wc -l < ~/count-long)" -ge 2 || sleep 60;')


def test_runner_killed_mid_step_resumes_without_redoing_finished_steps(
    project: Project, box: Box
) -> None:
    # The first attempt of `long` hangs; the runner dies under it; the next `up` must kill
    # what is left of it and run it again (quickly, the second time).
    project.playbook(RESUMABLE)
    assert project.up("box1", extra=["--detach"]).returncode == 0
    wait_for(lambda: count(box, "long") == 1)
    runner = [p for p, cmd in box.processes() if " run --run slow" in cmd]
    assert runner, box.processes()
    os.kill(runner[0], signal.SIGKILL)
    wait_for(lambda: project.status("box1")["runner"] == "dead")
    result = project.up("box1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [count(box, n) for n in ("first", "long", "last")] == [1, 2, 1]
    state = json.loads((box.home / ".bootstrap/runs/slow/state.json").read_text())
    assert state["steps"]["long"]["status"] == "done"


def test_second_up_attaches_to_the_running_runner(project: Project, box: Box) -> None:
    project.playbook(SLOW)
    assert project.up("box1", extra=["--detach"]).returncode == 0
    wait_for(lambda: count(box, "long") == 1)
    attached = project.up("box1")
    assert attached.returncode == 0
    assert [count(box, n) for n in ("first", "long", "last")] == [1, 1, 1]
    runners = [cmd for _, cmd in box.processes() if " run --run slow" in cmd]
    assert runners == []


@both_transports
def test_rerun_resets_step_and_downstream_only(project: Project, box: Box) -> None:
    project.playbook(
        """
        name: rerun
        steps:
          - id: a
            kind: shell
            run: echo x >> ~/count-a
          - id: b
            kind: shell
            needs: [a]
            run: echo x >> ~/count-b
          - id: c
            kind: shell
            needs: [b]
            run: echo x >> ~/count-c
          - id: side
            kind: shell
            run: echo x >> ~/count-side
        """
    )
    assert project.up("box1").returncode == 0
    result = project.cli("rerun", "box1", "b", "-p", "playbooks/test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [count(box, n) for n in ("a", "b", "c", "side")] == [1, 2, 2, 1]
    only = project.cli("rerun", "box1", "b", "--only", "-p", "playbooks/test.yaml")
    assert only.returncode == 0
    assert [count(box, n) for n in ("a", "b", "c", "side")] == [1, 3, 2, 1]
    assert project.up("box1").returncode == 0
    assert [count(box, n) for n in ("a", "b", "c", "side")] == [1, 3, 2, 1]


@both_transports
def test_status_json_shape_logs_and_agent_shipped_once(project: Project, box: Box) -> None:
    project.playbook(TWO_TRACKS.format(parallel=2))
    assert project.up("box1").returncode == 0
    current = box.home / ".bootstrap/current.pyz"
    pyz = current.resolve()
    assert pyz.parent.name == "agents" and pyz.stem == hashlib.sha256(pyz.read_bytes()).hexdigest()
    shipped = pyz.stat().st_mtime_ns
    assert project.up("box1").returncode == 0
    if current.resolve() == pyz:  # (unless the sources were edited in between)
        assert pyz.stat().st_mtime_ns == shipped
    snap = project.status("box1")
    assert {"host", "playbook", "runner", "steps"} <= set(snap)
    assert snap["host"] == "box1" and snap["runner"] == "idle"
    for step in snap["steps"]:
        assert {
            "id", "status", "attempts", "started", "ended", "duration_s", "rc", "progress", "hint", "log_tail",
        } <= set(step)  # fmt: skip
    logs = project.cli("logs", "box1", "a", "-p", "playbooks/test.yaml")
    assert logs.returncode == 0 and "=== a: attempt 1" in logs.stdout


def test_status_without_playbook_shows_latest_run(project: Project) -> None:
    project.playbook(TWO_TRACKS.format(parallel=2))
    assert project.up("box1").returncode == 0
    result = project.cli("status", "box1", "--json")
    assert result.returncode == 0
    assert json.loads(result.stdout)["run"] == "tracks"


def test_plan_changes_nothing_on_a_fresh_box(project: Project, box: Box) -> None:
    project.playbook(TWO_TRACKS.format(parallel=2))
    result = project.cli("plan", "box1", "-p", "playbooks/test.yaml", "--json")
    assert result.returncode == 0, result.stderr
    assert all(s["run"] for s in json.loads(result.stdout)["steps"])
    assert not (box.home / ".bootstrap").exists()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: x\nsteps:\n  - id: a\n    kind: shell\n    run: [\n", "invalid YAML"),
        ("name: x\nsteps:\n  - id: a\n    kind: shel\n    run: x\n", "did you mean 'shell'"),
        ("name: x\nsteps:\n  - id: a\n    kind: shell\n    runn: x\n", "unknown key 'runn'"),
        (
            "name: x\nsteps:\n  - {id: a, kind: shell, run: x}\n  - {id: a, kind: shell, run: y}\n",
            "duplicate step id",
        ),
        (
            "name: x\nsteps:\n  - {id: a, kind: shell, run: x, needs: [zz]}\n",
            "needs unknown step 'zz'",
        ),
        (
            "name: x\nsteps:\n  - {id: a, kind: shell, run: x, needs: [b]}\n  - {id: b, kind: shell, run: x, needs: [a]}\n",
            "cycle in needs: a -> b -> a",
        ),
        (
            "name: x\nsteps:\n  - {id: a, kind: shell, run: x, poll: 60}\n",
            "'poll' must be between 1 and 30",
        ),
        (
            "name: x\nsteps:\n  - {id: a, kind: shell, run: x, timeout: soon}\n",
            "'timeout' must be a positive",
        ),
        ("name: x\nsteps:\n  - {id: a, kind: shell, run: 5}\n", "'run' must be str"),
        ("name: x\nsteps:\n  - {id: a, kind: shell, run: '{{ nope }}'}\n", "'nope' is undefined"),
        ("name: x\nsteps:\n  - {id: a, kind: shell, run: x, secrets: [NOPE]}\n", "secret 'NOPE'"),
    ],
)
def test_bad_playbooks_are_one_line_exit_2_and_touch_nothing(
    project: Project, box: Box, text: str, fragment: str
) -> None:
    from project import one_line_error

    path = project.playbook(text)
    line = one_line_error(project.up("box1"))
    assert fragment in line, line
    assert str(path.relative_to(project.root)) in line
    assert not (box.home / ".bootstrap").exists()


@both_transports
def test_unreachable_and_unknown_targets(project: Project, box: Box) -> None:
    from project import one_line_error

    project.playbook(TWO_TRACKS.format(parallel=1))
    assert "unknown target 'nosuchbox'" in one_line_error(project.up("nosuchbox"))
    box.stop()
    start = time.time()
    line = one_line_error(project.up("box1"))
    assert "unreachable" in line and time.time() - start < 15
    box.start()


@both_transports
def test_changed_host_key_is_refused_with_the_forget_command(project: Project, box: Box) -> None:
    from project import one_line_error

    project.playbook(TWO_TRACKS.format(parallel=2))
    assert project.up("box1").returncode == 0
    box.new_host_key()
    line = one_line_error(project.up("box1"))
    assert f"bootstrap forget {box.host}:{box.port}" in line
    forget = project.cli("forget", f"{box.host}:{box.port}")
    assert forget.returncode == 0 and "forgot" in forget.stdout
    assert project.up("box1").returncode == 0
    box.new_host_key()
    assert project.up("box1", extra=["--accept-new-host-key"]).returncode == 0


def test_graph_formats(project: Project) -> None:
    project.playbook(
        """
        name: g
        steps:
          - {id: a, kind: shell, run: x, estimate: 10}
          - {id: b, kind: shell, run: x, estimate: 100, needs: [a]}
          - {id: c, kind: shell, run: x, estimate: 5, needs: [a]}
        """
    )
    tree = project.cli("graph", "-p", "playbooks/test.yaml")
    assert tree.returncode == 0 and "critical path (110s): a -> b" in tree.stdout
    mermaid = project.cli("graph", "-p", "playbooks/test.yaml", "--format", "mermaid")
    assert "a ==> b" in mermaid.stdout and "a --> c" in mermaid.stdout
    dot = project.cli("graph", "-p", "playbooks/test.yaml", "--format", "dot")
    assert dot.stdout.startswith('digraph "g"')


def test_vars_keep_their_types_and_never_tagged_steps_wait_to_be_asked(
    project: Project, box: Box
) -> None:
    project.playbook(
        """
        name: typed
        vars: {version: "3.10", seconds: 30, dir: "~/typed"}
        steps:
          - id: write
            kind: shell
            timeout: "{{ seconds }}"
            env: {VERSION: "{{ version }}"}
            run: mkdir -p {{ dir }}; echo "$VERSION" > {{ dir }}/version
          - id: on-demand
            kind: shell
            tags: [never, sync]
            needs: [write]
            run: echo x >> ~/count-sync
        """
    )
    assert project.up("box1").returncode == 0
    assert (box.home / "typed/version").read_text().strip() == "3.10"
    steps = project.steps("box1")
    assert steps["on-demand"]["status"] == "skipped" and count(box, "sync") == 0
    assert project.up("box1", extra=["--tags", "sync"]).returncode == 0
    assert count(box, "sync") == 1
    project.playbook(
        'name: typed\nvars: {t: "soon"}\nsteps:\n  - {id: a, kind: shell, run: x, timeout: "{{ t }}"}\n'
    )
    from project import one_line_error

    assert "'timeout' must be a positive number" in one_line_error(project.up("box1"))
