"""The typed run model: what it reads from files of the previous (dict-based) version, what it
writes back, and what it refuses.

tests/data/run_v1/ holds a plan, states and status snapshots written by that version (see its
README for how they were made).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from provision.model import (
    ModelError,
    Outcome,
    Plan,
    PlannedStep,
    RunnerStatus,
    RunState,
    Snapshot,
    StepRecord,
    StepStatus,
)

DATA = Path(__file__).resolve().parent / "data" / "run_v1"


def _load(name: str) -> Any:
    return json.loads((DATA / name).read_text(encoding="utf-8"))


def _without_empty(rec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if v is not None and v != [] and v != {}}


# ------------------------------------------------------------------- state of the old version


@pytest.mark.parametrize("name", ["state-finished.json", "state-killed.json", "state-reset.json"])
def test_an_old_state_loads_whole_and_writes_back_what_it_said(name: str) -> None:
    old = _load(name)
    state, problems = RunState.from_json(old, "compat")
    assert problems == []
    new = state.to_json()
    assert set(new["steps"]) == set(old["steps"])
    for step_id, rec in old["steps"].items():
        assert new["steps"][step_id] == _without_empty(rec), step_id
    assert new["runner"] == _without_empty(old["runner"])
    assert {k: v for k, v in new.items() if k not in ("steps", "runner")} == {
        k: v for k, v in old.items() if k not in ("steps", "runner")
    }
    # And what it wrote reads back the same.
    again, problems = RunState.from_json(json.loads(json.dumps(new)), "compat")
    assert problems == [] and again == state


def test_old_records_read_as_the_runner_wrote_them() -> None:
    state, _ = RunState.from_json(_load("state-finished.json"), "compat")
    flaky = state.steps["flaky"]
    assert (flaky.status, flaky.outcome, flaky.attempts, flaky.rc) == (
        StepStatus.FAILED,
        Outcome.FAILED,
        2,
        1,
    )
    assert flaky.hint and "out of memory" in flaky.hint and flaky.unsuccessful() == "failed"
    assert state.steps["train"].status is StepStatus.BLOCKED and state.steps["train"].status.bad
    assert state.steps["by-hand"].unsuccessful() is None
    assert state.steps["sync"].status is StepStatus.SKIPPED
    assert state.runner.status is RunnerStatus.IDLE and state.runner.pid is None
    assert state.expected_duration("fetch") == pytest.approx(0.295)

    killed, _ = RunState.from_json(_load("state-killed.json"), "compat")
    long = killed.steps["long"]
    assert long.status is StepStatus.RUNNING and long.unsuccessful() == "interrupted"
    assert long.pid == long.pgid and long.pid is not None
    assert killed.runner.status is RunnerStatus.RUNNING

    reset, _ = RunState.from_json(_load("state-reset.json"), "compat")
    assert reset.steps["fetch"].forced == "all" and reset.steps["by-hand"].forced == "only"
    assert reset.steps["fetch"].to_json()["forced"] is True
    assert reset.steps["by-hand"].to_json()["forced"] == "only"


def test_a_record_without_outcome_is_judged_by_status_and_reason() -> None:
    """Records written before `outcome` existed."""
    assert StepRecord(status=StepStatus.ERROR).unsuccessful() == "error"
    assert StepRecord(status=StepStatus.RUNNING).unsuccessful() == "interrupted"
    interrupted = StepRecord(status=StepStatus.PENDING, reason="interrupted: the runner stopped")
    assert interrupted.unsuccessful() == "interrupted"
    assert StepRecord(status=StepStatus.DONE).unsuccessful() is None


def test_fields_of_a_newer_version_survive_a_round_trip() -> None:
    rec = StepRecord.from_json({"status": "done", "gen": 2, "cache": {"key": "abc"}})
    assert rec.extra == {"cache": {"key": "abc"}}
    assert rec.to_json() == {"status": "done", "attempts": 0, "gen": 2, "cache": {"key": "abc"}}
    state, _ = RunState.from_json({"steps": {}, "future": 1}, "r")
    assert state.to_json()["future"] == 1


@pytest.mark.parametrize(
    ("rec", "problem"),
    [
        ([], "a list, not an object"),
        ({"attempts": 1}, "'status' is null"),
        ({"status": "finished"}, "unknown status 'finished'"),
        ({"status": "done", "rc": "0"}, "'rc' is str"),
        ({"status": "done", "gen": True}, "'gen' is bool"),
        ({"status": "done", "started": "noon"}, "'started' is str"),
        ({"status": "done", "upstream": {"a": 1.5}}, "'upstream' holds a non-integer generation"),
        ({"status": "done", "outcome": "meh"}, "unknown outcome 'meh'"),
        ({"status": "done", "warnings": "x"}, "'warnings' is str"),
    ],
)
def test_a_bad_record_is_refused_naming_the_field(rec: Any, problem: str) -> None:
    with pytest.raises(ModelError) as exc:
        StepRecord.from_json(rec)
    assert problem in str(exc.value)


def test_a_damaged_state_keeps_what_makes_sense() -> None:
    data = {
        "runner": {"status": 3},
        "steps": {"ok": {"status": "done", "gen": 1}, "bad": {"status": "done", "rc": "x"}},
        "durations": {"ok": ["fast"]},
        "notices": [1],
    }
    state, problems = RunState.from_json(data, "r")
    assert list(state.steps) == ["ok"] and state.steps["ok"].gen == 1
    assert state.runner.status is RunnerStatus.IDLE and state.durations == {}
    assert state.notices == []
    assert len(problems) == 4
    assert "step 'bad': 'rc' is str" in problems
    assert any(p.startswith("'runner'") for p in problems)
    assert any(p.startswith("'durations' is not step ids") for p in problems)
    assert RunState.from_json([], "r")[1] == ["the top level is a list, not an object"]


def test_damage_is_never_written() -> None:
    state = RunState(run="r", damage="empty")
    assert "damage" not in state.to_json()


def test_durations_keep_the_newest_five() -> None:
    state = RunState(run="r")
    for seconds in (1, 2, 3, 100, 4, 5):
        state.remember_duration("s", seconds)
    assert state.durations["s"] == [2, 3, 100, 4, 5]
    assert state.expected_duration("s") == 4.0 and state.expected_duration("t") is None


@pytest.mark.parametrize(
    ("seconds", "median"), [((7,), 7.0), ((9, 1), 5.0), ((3, 1, 2), 2.0), ((4, 1, 3, 2), 2.5)]
)
def test_the_expected_duration_is_the_median_of_the_kept_ones(
    seconds: tuple[float, ...], median: float
) -> None:
    state = RunState(run="r")
    for s in seconds:
        state.remember_duration("s", s)
    assert state.expected_duration("s") == median


# ------------------------------------------------------------------------ the record's changes


def test_an_attempt_from_start_to_success() -> None:
    rec = StepRecord(hint="old hint", warnings=["old"])
    rec.begin_attempt(1, "never ran", now=100.0)
    assert (rec.status, rec.outcome, rec.hint, rec.warnings) == (
        StepStatus.RUNNING,
        Outcome.RUNNING,
        None,
        [],
    )
    rec.pid = rec.pgid = 42
    rec.end_attempt(0, now=102.5, warnings=["w"], fingerprint="f1")
    assert (rec.rc, rec.duration_s, rec.pid, rec.pgid) == (0, 2.5, None, 42)
    rec.succeed("ran in 2.5s", {"a": 3})
    assert (rec.status, rec.outcome, rec.gen, rec.upstream) == (
        StepStatus.DONE,
        Outcome.OK,
        1,
        {"a": 3},
    )


def test_an_only_rerun_keeps_the_generation() -> None:
    rec = StepRecord(status=StepStatus.DONE, gen=3)
    rec.force(only=True)
    assert rec.status is StepStatus.PENDING and rec.forced == "only"
    rec.succeed(None, {})
    assert rec.gen == 3 and rec.forced is None
    rec.force(only=False)
    rec.succeed(None, {})
    assert rec.gen == 4


def test_failure_error_block_and_found_done() -> None:
    rec = StepRecord()
    rec.fail(StepStatus.ERROR, "crashed", None)
    assert rec.outcome is Outcome.ERROR and rec.unsuccessful() == "error"
    rec.fail(StepStatus.FAILED, "exited 1", "a hint")
    assert rec.outcome is Outcome.FAILED and rec.hint == "a hint"
    rec.block(["a", "b"])
    assert rec.status is StepStatus.BLOCKED and rec.reason == "blocked by a, b" and not rec.hint
    done = StepRecord()
    done.found_done("already satisfied: creates exists", "fp", {"a": 1}, now=5.0)
    assert (done.gen, done.ended, done.upstream, done.fingerprint) == (1, 5.0, {"a": 1}, "fp")
    done.found_done("fingerprint matches", "fp", {"a": 2}, now=9.0)
    assert (done.gen, done.ended, done.upstream) == (1, 5.0, {"a": 1}), "already done: kept"


def test_interrupt_and_could_not_start() -> None:
    rec = StepRecord(status=StepStatus.RUNNING, pid=7, pgid=7)
    rec.interrupt("interrupted: runner stopping")
    assert (rec.status, rec.outcome, rec.pid, rec.pgid) == (
        StepStatus.PENDING,
        Outcome.INTERRUPTED,
        None,
        7,
    )
    rec.could_not_start("could not start: no python", now=3.0)
    assert rec.status is StepStatus.ERROR and rec.unsuccessful() == "error"


# --------------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("name", ["plan-compat.json", "plan-waypoint.json"])
def test_an_old_plan_round_trips_exactly(name: str) -> None:
    old = _load(name)
    plan = Plan.from_json(old)
    assert plan.to_json() == old
    assert json.dumps(plan.to_json(), sort_keys=True) == json.dumps(old, sort_keys=True)


def test_the_plan_reads_typed() -> None:
    plan = Plan.from_json(_load("plan-waypoint.json"))
    venv = plan.step("agent-venv")
    assert venv.kind == "agent_venv" and venv.line == 0 and venv.retries == 1
    assert isinstance(venv.timeout, int), "600 stays 600, not 600.0"
    assert all(s.selected for s in plan.selected)
    compat = Plan.from_json(_load("plan-compat.json"))
    assert compat.step("sync").selected is False and compat.step("slow").timeout == 1
    with pytest.raises(KeyError):
        plan.step("nope")


@pytest.mark.parametrize(
    ("step", "problem"),
    [
        ({"kind": "shell"}, "no 'id'"),
        ({"id": "a", "needs": "b"}, "step 'a': 'needs' is str"),
        ({"id": "a", "needs": [1]}, "step 'a': 'needs' holds a non-string"),
        ({"id": "a", "retries": 1.5}, "step 'a': 'retries' is float"),
        ({"id": "a", "selected": "yes"}, "step 'a': 'selected' is str"),
    ],
)
def test_a_bad_plan_step_is_refused(step: dict[str, Any], problem: str) -> None:
    with pytest.raises(ModelError) as exc:
        Plan.from_json({"name": "r", "steps": [step]})
    assert problem in str(exc.value)


def test_planned_step_defaults_match_an_implicit_step() -> None:
    step = PlannedStep(id="x", kind="shell")
    out = step.to_json()
    assert out["needs"] == [] and out["retries"] == 0 and out["selected"] is True
    assert PlannedStep.from_json(out) == step


# ------------------------------------------------------------------------------ the snapshot


@pytest.mark.parametrize("name", ["status-finished.json", "status-dead.json"])
def test_an_old_snapshot_round_trips_byte_for_byte(name: str) -> None:
    text = (DATA / name).read_text(encoding="utf-8")
    old = json.loads(text)
    snap = Snapshot.from_json(old)
    assert json.dumps(snap.to_json(), indent=1) == json.dumps(old, indent=1)


def test_a_guarded_step_reports_its_watch_even_before_the_first_look() -> None:
    base = {"id": "train", "kind": "tmux_launch", "status": "running"}
    snap = Snapshot.from_json({"run": "r", "box": "b", "runner": "running", "steps": [
        {"expected_s": None, "expected_from": None, "watch": None, **base}
    ]})  # fmt: skip
    step = snap.steps[0]
    assert step.guarded and step.watch is None
    assert list(step.to_json())[:4] == ["expected_s", "expected_from", "watch", "id"]
    plain = Snapshot.from_json({"run": "r", "box": "b", "runner": "idle", "steps": [base]})
    assert "watch" not in plain.steps[0].to_json()
    assert snap.step("train") is step and snap.step("x") is None


def test_status_values_are_the_documented_ones() -> None:
    """DESIGN.md, "Step statuses"."""
    assert [s.value for s in StepStatus] == [
        "pending", "running", "done", "failed", "error", "blocked", "skipped"
    ]  # fmt: skip
    assert {s for s in StepStatus if s.bad} == {
        StepStatus.FAILED,
        StepStatus.ERROR,
        StepStatus.BLOCKED,
    }
    assert f"{StepStatus.DONE}" == "done" and json.dumps([StepStatus.DONE]) == '["done"]'


def test_a_changes_event_patches_the_snapshot_as_the_json_is_patched() -> None:
    """`up` keeps a Snapshot and applies each `changes` event to it (only the records the event
    carries are read); the result is what report.apply_changes makes of the JSON."""
    from provision.agent.report import apply_changes

    old = _load("status-finished.json")
    record = dict(old["steps"][0], status="running", attempts=2, log_tail=["again"])
    change = {"event": "changes", "runner": "running", "steps": [record]}
    patched = Snapshot.from_json(old).patched(change)
    assert patched.to_json() == Snapshot.from_json(apply_changes(old, change)).to_json()
    assert patched.runner == "running" and patched.steps[0].attempts == 2
    assert patched.steps[1:] == Snapshot.from_json(old).steps[1:]
    assert Snapshot.from_json(old).patched({"event": "changes"}) == Snapshot.from_json(old)
