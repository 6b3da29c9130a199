"""What the controller reads from the box: status snapshots, the follow stream, step logs.

A snapshot (`provision.model.Snapshot`) is the `status --json` object of DESIGN.md (less the
controller's host name), built from `plan.json`, `state.json`, each step's progress file and
log tail, in one process. The follow stream compares and patches snapshots as the JSON they
travel as (`changes`, `apply_changes`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from provision.agent import files, protocol
from provision.agent.files import read_json
from provision.agent.paths import runs_dir
from provision.agent.state import RunDir, load_state, runner_active
from provision.model import (
    ModelError,
    Plan,
    PlannedStep,
    RunnerStatus,
    RunState,
    Snapshot,
    StepRecord,
    StepSnapshot,
    StepStatus,
)
from provision.watch.record import read_watch

DEFAULT_TAIL_LINES = 10
#: Seconds between two looks at the state while following a run.
FOLLOW_INTERVAL_S = 0.2


def latest_run() -> str | None:
    """The name of the run whose state changed last on this box."""
    runs = runs_dir()
    best: tuple[float, str] | None = None
    try:
        names = os.listdir(runs)
    except FileNotFoundError:
        return None
    for name in names:
        try:
            mtime = (runs / name / "state.json").stat().st_mtime
        except OSError:
            continue
        if best is None or mtime > best[0]:
            best = (mtime, name)
    return best[1] if best else None


def snapshot(run: RunDir, tail_lines: int = DEFAULT_TAIL_LINES) -> Snapshot:
    """The run's status, read from its files in this one process."""
    plan = _plan_or_none(run)
    state = load_state(run)
    active = runner_active(run)
    recorded = state.runner.status
    # Dead: it stopped without ending the run (SIGKILL, a reboot, a crash); `up` recovers it.
    dead = recorded in (RunnerStatus.RUNNING, RunnerStatus.CRASHED)
    snap = Snapshot(
        playbook=plan.playbook if plan else None,
        run=run.name,
        box=os.uname().nodename,  # gethostname's own source; socket costs ~4 ms to import
        runner="running" if active else ("dead" if dead else "idle"),
        steps=[_step(run, state, step, tail_lines) for step in (plan.steps if plan else [])],
        notices=list(state.notices),
    )
    if state.damage:
        snap.notices.append(
            f"state.json is damaged ({state.damage}); the next `up` keeps it aside and "
            "decides the steps without a record by their checks"
        )
    if recorded is RunnerStatus.CRASHED and not active:
        snap.runner_error = (
            f"the runner crashed: {state.runner.error}; its traceback is in {run.runner_log}"
        )
    return snap


def _plan_or_none(run: RunDir) -> Plan | None:
    """The run's plan; None when it has none yet, or one a status cannot read."""
    data = read_json(run.plan, None)
    try:
        return Plan.from_json(data) if data is not None else None
    except ModelError:
        return None


def _step(run: RunDir, state: RunState, step: PlannedStep, tail_lines: int) -> StepSnapshot:
    """One step's part of the snapshot."""
    rec = state.steps.get(step.id) or StepRecord(
        status=StepStatus.PENDING if step.selected else StepStatus.SKIPPED
    )
    duration = rec.duration_s
    if rec.status is StepStatus.RUNNING and rec.started:
        # Whole seconds: a follower gets a running step's record once a second, not at
        # every look.
        duration = float(int(time.time() - rec.started))
    progress = None
    if rec.status is StepStatus.RUNNING:
        found = read_json(run.step_dir(step.id) / "_progress.json", None)
        progress = found if isinstance(found, dict) else None
    expected_s, expected_from = _expected(state, step)
    warnings = list(rec.warnings)
    saved = None
    if step.cache:
        # What the detached saver did last (provision/cache/save.py); one that did not save
        # is a warning of the step, as `status` shows warnings.
        saved = read_json(run.step_dir(step.id) / "_cache_save.json", None)
        if isinstance(saved, dict) and saved.get("state") in ("skipped", "failed"):
            warnings.append(f"cache: {saved.get('reason')}")
    out = StepSnapshot(
        id=step.id,
        kind=step.kind,
        status=rec.status,
        needs=list(step.needs),
        attempts=rec.attempts,
        started=rec.started,
        ended=rec.ended,
        duration_s=duration,
        rc=rec.rc,
        progress=progress,
        reason=rec.reason,
        hint=rec.hint,
        warnings=warnings,
        log_tail=files.tail_lines(run.log(step.id), tail_lines),
        expected_s=expected_s,
        expected_from=expected_from,
        cached=bool(step.cache),
        cache=saved if isinstance(saved, dict) else None,
    )
    if step.kind == "tmux_launch":
        # What the job's guard saw last (provision/watch/watcher.py), for its whole life.
        out.guarded, out.watch = True, read_watch(run.step_dir(step.id))
    return out


def _expected(state: RunState, step: PlannedStep) -> tuple[float | None, str | None]:
    """How long the step is expected to take, for the controller's ETA: the median of its
    durations on this box's earlier runs of the playbook, else the playbook's `estimate:`."""
    measured = state.expected_duration(step.id)
    if measured is not None:
        return measured, "measured"
    if step.estimate:
        return float(step.estimate), "estimate"
    return None, None


def emit(event: str, data: dict[str, Any]) -> None:
    """Write one event line of the follow stream."""
    sys.stdout.write(json.dumps({"event": event, **data}, sort_keys=True) + "\n")
    sys.stdout.flush()


def follow(run: RunDir, tail_lines: int = 3, grace_s: float = 0.0) -> None:
    """Stream the run until the runner is gone: a snapshot, then only what changes (`changes`
    events, see `changes`), then a final full snapshot. A run over before the first look (a
    no-op `up`: every step found done, no runner) is the final snapshot alone.

    A 2,000-step run once streamed 230 MB of full snapshots; now one step's change costs that
    step's record. `grace_s` gives a just-started runner time to take the lock before "not
    running" counts.
    """
    last: dict[str, Any] | None = None
    started = time.time()
    while grace_s > 0 or last is not None or runner_active(run):
        snap = snapshot(run, tail_lines).to_json()
        active = snap["runner"] == "running" or time.time() - started < grace_s
        change = changes(last, snap) if last is not None else None
        if change is None:
            emit("snapshot", snap)
        elif change:
            emit("changes", change)
        last = snap
        if not active:
            break
        time.sleep(FOLLOW_INTERVAL_S)
    emit("final", snapshot(run, DEFAULT_TAIL_LINES).to_json())


def changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any] | None:
    """What differs from `before` to `after`: the changed top-level values and, under `steps`,
    the records of the steps that changed. `{}` when nothing did; None when the steps are not
    the same ones in the same order (a new plan), which only a full snapshot can say."""
    ids = [s["id"] for s in after["steps"]]
    if ids != [s["id"] for s in before["steps"]]:
        return None
    out = {k: v for k, v in after.items() if k != "steps" and before.get(k) != v}
    steps = [new for i, new in enumerate(after["steps"]) if new != before["steps"][i]]
    return {**out, "steps": steps} if out or steps else {}


def apply_changes(snap: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """The snapshot that `change` (a `changes` event) turns `snap` into."""
    changed = {s["id"]: s for s in change.get("steps", [])}
    steps = [changed.get(s["id"], s) for s in snap["steps"]]
    top = {k: v for k, v in change.items() if k not in ("steps", "event")}
    return {**snap, **top, "steps": steps}


def print_log(run: RunDir, step_id: str, lines: int, keep_following: bool) -> int:
    """Answer a step's log tail as `{"text": ...}` lines (see `protocol`); with
    `keep_following`, keep answering what is appended until the runner ends."""
    path = run.log(step_id)
    if not path.exists():
        raise protocol.Refusal(
            f"no log for step '{step_id}' in run '{run.name}'", protocol.NO_LOG, step=step_id
        )
    for line in files.tail_lines(path, lines):
        protocol.emit({"text": line + "\n"})
    if not keep_following:
        return protocol.ANSWERED
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        while True:
            chunk = fh.read()
            if chunk:
                protocol.emit({"text": chunk.decode("utf-8", "replace")})
            elif not runner_active(run):
                return protocol.ANSWERED
            else:
                time.sleep(0.5)
