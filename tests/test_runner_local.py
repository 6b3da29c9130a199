"""The runner (provision/agent/runner.py) against a temporary run directory: real `agent exec`
children running real shell steps on this machine, no ssh, no root.

`BOOTSTRAP_AGENT_DIR` points at the test's directory and the agent zipapp the runner starts its
steps with is built once for the session, as `up` ships it. These are the fast tier's tests of
the runner (`-m "not box"`, under a second each), but the timeout's, which waits out its grace.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from provision.agent.runner import KILL_GRACE_S, Runner
from provision.agent.state import RunDir, load_state, save_state
from provision.bundle import build_agent
from provision.inventory import Host, Inventory
from provision.model import Outcome, Plan, PlannedStep, RunnerStatus, StepStatus
from provision.playbook import fingerprint, load_playbook, resolve

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "run_v1"


@pytest.fixture(scope="session")
def agent_pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent zipapp, built once (its cache in a directory of this session)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BOOTSTRAP_CONFIG_DIR", str(tmp_path_factory.mktemp("config")))
        path = tmp_path_factory.mktemp("pyz") / "agent.pyz"
        path.write_bytes(build_agent().data)
    return path


@pytest.fixture
def agent_dir(tmp_path: Path, agent_pyz: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An agent root of its own for the test, holding the zipapp; HOME there too (the runner
    starts steps in `~`, and a user such as nobody has none)."""
    root = tmp_path / "agent"
    root.mkdir()
    shutil.copyfile(agent_pyz, root / "agent.pyz")
    monkeypatch.setenv("BOOTSTRAP_AGENT_DIR", str(root))
    monkeypatch.setenv("HOME", str(tmp_path))
    return root


def _shell(step_id: str, run: str, **fields: Any) -> PlannedStep:
    step = PlannedStep(id=step_id, kind="shell", params={"run": run, "cwd": None}, **fields)
    step.fingerprint = fingerprint(step)
    return step


def _run(steps: list[PlannedStep], max_parallel: int = 8) -> tuple[bool, Runner]:
    run = RunDir("t")
    run.make()
    plan = Plan(name="t", steps=steps, max_parallel=max_parallel)
    (run.plan).write_text(json.dumps(plan.to_json()))
    runner = Runner(run, plan=plan, secrets={})
    return runner.execute(), runner


def _log(step_id: str) -> str:
    return RunDir("t").log(step_id).read_text(encoding="utf-8")


def _group_gone(pgid: int) -> bool:
    """No live process is left in the group (a zombie whose parent died is not: whoever
    inherited it reaps it when it will)."""
    for name in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except (OSError, ValueError):
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            return False
    return True


def test_parallel_tracks_run_together_and_a_join_waits_for_both(agent_dir: Path) -> None:
    ok, runner = _run(
        [
            _shell("a", "sleep 0.6"),
            _shell("b", "sleep 0.6"),
            _shell("join", "echo joined", needs=["a", "b"]),
        ]
    )
    assert ok
    recs = runner.state.steps
    a, b, join = recs["a"], recs["b"], recs["join"]
    assert all(r.status is StepStatus.DONE and r.outcome is Outcome.OK for r in (a, b, join))
    assert a.started and b.started and a.ended and b.ended and join.started
    assert a.started < b.ended and b.started < a.ended, "a and b overlapped"
    assert join.started >= max(a.ended, b.ended)
    assert join.upstream == {"a": 1, "b": 1} and join.gen == 1
    assert "joined" in _log("join")
    on_disk = load_state(RunDir("t"))
    assert on_disk.steps == runner.state.steps and on_disk.runner.status is RunnerStatus.IDLE


def test_max_parallel_one_runs_steps_one_after_another(agent_dir: Path) -> None:
    ok, runner = _run([_shell("a", "sleep 0.3"), _shell("b", "sleep 0.3")], max_parallel=1)
    a, b = runner.state.steps["a"], runner.state.steps["b"]
    assert ok and a.ended and b.started and a.ended <= b.started


def test_a_failure_blocks_its_dependents_and_the_other_track_finishes(agent_dir: Path) -> None:
    ok, runner = _run(
        [
            _shell("bad", "echo 'about to fail'; exit 3"),
            _shell("after-bad", "echo never", needs=["bad"]),
            _shell("after-after", "echo never", needs=["after-bad"]),
            _shell("other", "sleep 0.3; echo fine"),
        ]
    )
    assert not ok
    recs = runner.state.steps
    assert recs["bad"].status is StepStatus.FAILED and recs["bad"].outcome is Outcome.FAILED
    assert recs["bad"].rc == 1 and recs["bad"].attempts == 1
    assert recs["bad"].reason == "the command exited 3 (its output is in the log)"
    assert "about to fail" in _log("bad")
    assert recs["after-bad"].status is StepStatus.BLOCKED
    assert recs["after-bad"].reason == "blocked by bad"
    assert recs["after-after"].reason == "blocked by after-bad"
    assert not RunDir("t").log("after-bad").exists(), "a blocked step never starts"
    assert recs["other"].status is StepStatus.DONE


def test_a_retry_that_succeeds_and_one_that_does_not(agent_dir: Path, tmp_path: Path) -> None:
    counter = tmp_path / "count"
    flaky = f"n=$(cat {counter} 2>/dev/null || echo 0); echo $((n+1)) > {counter}; [ $n -ge 1 ]"
    ok, runner = _run(
        [
            _shell("flaky", flaky, retries=2),
            _shell("hopeless", "exit 5", retries=1),
        ]
    )
    assert not ok
    flaky_rec, hopeless = runner.state.steps["flaky"], runner.state.steps["hopeless"]
    assert flaky_rec.status is StepStatus.DONE and flaky_rec.attempts == 2
    assert counter.read_text().strip() == "2"
    log = _log("flaky")
    assert "=== flaky: attempt 1 (never ran) ===" in log
    assert "=== flaky: attempt 2 (retry after: the command exited 1" in log
    assert hopeless.status is StepStatus.FAILED and hopeless.attempts == 2
    assert runner.state.durations.keys() == {"flaky"}


@pytest.mark.slow
def test_a_timeout_kills_the_whole_process_group(agent_dir: Path, tmp_path: Path) -> None:
    child_pid = tmp_path / "child.pid"
    # The step leaves a grandchild of its own: the group, not the step's shell, must die.
    command = f"sleep 60 & echo $! > {child_pid}; wait"
    started = time.monotonic()
    # 3 s: time enough for `agent exec` to start its shell on a loaded machine.
    ok, runner = _run([_shell("slow", command, timeout=3)])
    elapsed = time.monotonic() - started
    rec = runner.state.steps["slow"]
    assert not ok and rec.status is StepStatus.FAILED and rec.reason == "timed out after 3s"
    assert elapsed < 3 + KILL_GRACE_S, f"the timeout took {elapsed:.1f}s"
    assert rec.pgid is not None
    # SIGKILL is delivered at once, the exit is the kernel's a moment later.
    _wait_for(lambda: _group_gone(rec.pgid), timeout=2.0)
    assert int(child_pid.read_text()) > 0


def test_a_second_runner_finds_everything_done_and_runs_nothing(agent_dir: Path) -> None:
    steps = [_shell("a", "echo once >> ~/count"), _shell("b", "true", needs=["a"])]
    assert _run(steps)[0]
    ok, again = _run(steps)
    assert ok and (Path(os.environ["HOME"]) / "count").read_text() == "once\n"
    assert again.state.steps["a"].reason == "fingerprint matches (succeeded before)"
    assert again.executed == set()


def test_checks_of_independent_steps_are_decided_side_by_side(agent_dir: Path) -> None:
    # a's check waits for b's to have started and b's for a's: decided one after another, the
    # first would give up after 5 s (not done); side by side, both hold at once.
    def meet(mine: str, other: str) -> str:
        wait = f"until [ -e ~/{other}.seen ]; do sleep 0.01; done"
        return f"touch ~/{mine}.seen && timeout 5 sh -c '{wait}'"

    steps = [
        _shell("a", "true", done_when=meet("a", "b")),
        _shell("b", "true", done_when=meet("b", "a")),
        _shell("join", "true", needs=["a", "b"], done_when="test -e ~/a.seen -a -e ~/b.seen"),
        _shell("missing", "true", done_when="false"),
        _shell("after", "true", needs=["missing"], done_when="true"),
    ]
    run = RunDir("t")
    run.make()
    plan = Plan(name="t", steps=steps)
    run.plan.write_text(json.dumps(plan.to_json()))
    decisions = Runner(run, plan=plan, secrets={}).evaluate()
    assert [step_id for step_id, _ in decisions] == ["a", "b", "missing", "join", "after"]
    done = {step_id: d.done for step_id, d in decisions}
    assert done == {"a": True, "b": True, "join": True, "missing": False, "after": False}
    # A step is decided after its needs: it knows one of them will run.
    assert dict(decisions)["after"].reason == "never ran"


def test_an_only_rerun_request_keeps_the_dependents_done(agent_dir: Path) -> None:
    steps = [_shell("a", "echo a >> ~/runs"), _shell("b", "echo b >> ~/runs", needs=["a"])]
    assert _run(steps)[0]
    run = RunDir("t")
    (run.requests / "r1").write_text(json.dumps({"reset": "a", "only": True}))
    ok, runner = _run(steps)
    assert ok and (Path(os.environ["HOME"]) / "runs").read_text() == "a\nb\na\n"
    assert runner.state.steps["a"].gen == 1 and runner.state.steps["a"].forced is None
    (run.requests / "r2").write_text(json.dumps({"reset": "a"}))
    assert _run(steps)[0]
    assert (Path(os.environ["HOME"]) / "runs").read_text() == "a\nb\na\na\nb\n"


def test_a_crash_in_the_runner_is_recorded_as_crashed(
    agent_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Runner) -> bool:
        raise KeyError("bug")

    monkeypatch.setattr(Runner, "schedule", broken)
    with pytest.raises(KeyError):
        _run([_shell("a", "true")])
    runner = load_state(RunDir("t")).runner
    assert runner.status is RunnerStatus.CRASHED and runner.error == "KeyError: 'bug'"
    assert runner.pid is None and runner.ended


def _wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def test_a_runner_killed_mid_step_is_recovered_by_the_next(agent_dir: Path, tmp_path: Path) -> None:
    """SIGKILL the runner while a step runs: its step's group lives on. The next runner kills
    it, runs that step again (whatever its checks say) and leaves the finished step alone."""
    go = tmp_path / "go"
    steps = [
        _shell("first", "echo first"),
        _shell("long", f"test -f {go} || sleep 60", needs=["first"]),
    ]
    run = RunDir("t")
    run.make()
    plan = Plan(name="t", steps=steps)
    run.plan.write_text(json.dumps(plan.to_json()))
    code = "from provision.agent.runner import Runner; from provision.agent.state import RunDir\n"
    code += "Runner(RunDir('t')).execute()"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        _wait_for(lambda: (load_state(run).steps.get("long") or _NONE).pgid is not None)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = load_state(run)
    pgid = left.steps["long"].pgid
    assert pgid is not None and not _group_gone(pgid), "the killed runner's step lives on"
    assert left.runner.status is RunnerStatus.RUNNING
    first_started = left.steps["first"].started
    go.write_text("")
    ok, runner = _run(steps)
    assert ok and _group_gone(pgid)
    long = runner.state.steps["long"]
    assert long.status is StepStatus.DONE and "attempt 1 (last attempt interrupted)" in _log("long")
    assert runner.state.steps["first"].started == first_started, "first did not run again"


class _NoRecord:
    pgid = None


_NONE = _NoRecord()


def test_a_state_killed_under_the_previous_version_is_recovered(agent_dir: Path) -> None:
    """tests/data/run_v1/state-killed.json: written by the dict-based runner SIGKILLed while
    `long` ran. The plan is resolved again from the same playbook (same fingerprints)."""
    book = DATA / "killed.yaml"
    plan = resolve(load_playbook(book), Inventory(), Host(name="local", connection="local"))
    plan.name = "t"
    old = json.loads((DATA / "state-killed.json").read_text())
    assert {s.id: s.fingerprint for s in plan.steps}["first"] == old["steps"]["first"][
        "fingerprint"
    ]
    long = plan.step("long")
    long.params["run"] = "echo quick"  # the same step, quick this time (params change it)
    run = RunDir("t")
    run.make()
    run.state.write_text(json.dumps(old))
    runner = Runner(run, plan=plan, secrets={})
    assert runner.execute()
    assert runner.state.steps["first"].started == old["steps"]["first"]["started"]
    assert runner.state.steps["long"].status is StepStatus.DONE
    assert "=== long: attempt 1 (last attempt interrupted) ===" in _log("long")
    save_state(run, runner.state)
    assert load_state(run).damage is None


def _link_steps(tmp_path: Path, *, estimates: bool = True) -> list[PlannedStep]:
    """y and then z are the critical path (10 s estimated), x has 9 s of slack; y says its
    bytes are in after 0.5 s and ends 1.5 s later (the runner looks every 0.5 s). Shell steps stand in for downloads: the test
    makes the shell kind a receiving one in the runner."""
    progress = RunDir("t").step_dir("y") / "_progress.json"
    said = tmp_path / "y.received"
    y = (
        f"sleep 0.5; printf '%s' '{{\"received\": true}}' > {progress}; "
        f"date +%s.%N > {said}; sleep 1.5"
    )
    return [
        _shell("y", y, estimate=5),
        _shell("z", "true", needs=["y"], estimate=5),
        _shell("x", "true", estimate=1 if estimates else None),
        _shell("end", "true", needs=["z", "x"], estimate=0.1),
    ]


def test_a_download_with_slack_waits_while_the_critical_one_receives(
    agent_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from provision.steps.shell import Shell

    monkeypatch.setattr(Shell, "receives", True)
    ok, runner = _run(_link_steps(tmp_path))
    recs = runner.state.steps
    assert ok and recs["x"].started and recs["y"].started and recs["y"].ended
    received = float((tmp_path / "y.received").read_text())
    assert received <= recs["x"].started < recs["y"].ended, "x started once y's bytes were in"
    assert "x: waits for the link while y receives (slack 9s)" in capsys.readouterr().err


def test_a_download_waits_at_most_its_slack(
    agent_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from provision.steps.shell import Shell

    monkeypatch.setattr(Shell, "receives", True)
    steps = [
        _shell("y", "sleep 2", estimate=1.4),  # never says its bytes are in
        _shell("x", "true", estimate=1),
        _shell("end", "true", needs=["y", "x"], estimate=0.1),
    ]
    ok, runner = _run(steps)
    x, y = runner.state.steps["x"], runner.state.steps["y"]
    assert ok and x.started and y.started and y.ended
    assert y.started + 0.35 < x.started < y.ended - 0.5, "x waited its 0.4 s of slack, no more"


def test_without_a_duration_for_every_step_nothing_waits_for_the_link(
    agent_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from provision.steps.shell import Shell

    monkeypatch.setattr(Shell, "receives", True)
    ok, runner = _run(_link_steps(tmp_path, estimates=False))
    x, y = runner.state.steps["x"], runner.state.steps["y"]
    assert ok and x.started and y.started
    assert x.started < float((tmp_path / "y.received").read_text()), "x started beside y"
