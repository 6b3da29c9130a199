"""Is a step done? The engine's built-in checks plus the kind's own, in one place.

A step is done when:
- no rerun was requested for it, and
- its recorded fingerprint (hash of its resolved params) matches, when it has one, and
- the upstream steps have not produced new results since it ran (generations match), and
- its checks hold: `creates` exists, `done_when` exits 0, the kind's `check()` passes; or, for a
  step without any check (a plain `shell` step), it last succeeded.

A step whose checks hold but which has no record of an attempt here (fresh state) is "already
satisfied": that is how a second `up` against a box set up by hand, or after the state was lost,
does nothing. A step whose last attempt failed, errored or was interrupted (the runner or the
box died under it) runs again whatever its checks say: a half-written `creates` file, or a
marker a failing command left behind, must not pass for a finished step.
"""

from __future__ import annotations

import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from provision.model import PlannedStep, StepRecord, StepStatus
from provision.steps.base import Check, Kind, StepContext
from provision.steps.registry import get_kind

#: A `done_when` command taking longer than this is treated as not done.
DONE_WHEN_TIMEOUT_S = 60


@dataclass(frozen=True)
class Decision:
    """Whether a step must run, and the reason `plan` prints."""

    done: bool
    reason: str


def has_own_checks(step: PlannedStep, kind: Kind | None) -> bool:
    """Whether the step can tell it is done by looking at the box (not only at its record)."""
    overrides = kind is not None and type(kind).check is not Kind.check
    return bool(step.creates or step.done_when or overrides)


def box_checks(step: PlannedStep, ctx: StepContext, kind: Kind | None) -> Check:
    """Run `creates`, `done_when` and the kind's check (None: only the first two); the first
    that fails decides."""
    held: list[str] = []
    creates = step.creates
    if creates:
        if not Path(os.path.expanduser(creates)).exists():
            return Check(False, f"creates missing: {creates}")
        held.append("creates exists")
    done_when = step.done_when
    if done_when:
        rc = run_done_when(done_when, ctx)
        if rc != 0:
            return Check(False, f"done_when failed (rc={rc})")
        held.append("done_when passed")
    if kind is not None and type(kind).check is not Kind.check:
        try:
            result = kind.check(ctx)
        except Exception as exc:  # a check that crashes means "not done", with the reason
            return Check(False, f"check error: {type(exc).__name__}: {exc}")
        if not result.done:
            return result
        held.append(result.reason)
    return Check(True, " and ".join(held))


def run_done_when(command: str, ctx: StepContext) -> int:
    """Exit code of a `done_when` command (quiet, bounded in time)."""
    cwd: Path | None = ctx.path(ctx.params.get("cwd") or "~")
    if cwd is not None and not cwd.is_dir():
        cwd = None
    proc = subprocess.Popen(
        ["bash", "-c", command],
        cwd=cwd,
        env=ctx.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # wait(timeout) polls with sleeps growing to 50 ms, which a no-op `up` pays per done_when;
    # a timer that kills lets the blocking wait() return the moment the command exits.
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(DONE_WHEN_TIMEOUT_S, kill)
    timer.start()
    try:
        rc = proc.wait()
    finally:
        timer.cancel()
    return 124 if timed_out.is_set() else rc


def decide(
    step: PlannedStep,
    rec: StepRecord | None,
    upstream_gens: dict[str, int],
    ctx: StepContext,
    rerun_needs: list[str] | None = None,
) -> Decision:
    """Decide whether `step` is done on this box.

    `upstream_gens` are its needs' current generations; `rerun_needs` are needs that ran (or,
    for a plan, will run) in this session — then the step runs again too.
    """
    if rec is not None and rec.forced:
        return Decision(False, "rerun requested")
    if rerun_needs:
        if rec is not None and rec.status is StepStatus.DONE:
            return Decision(False, f"upstream ran again: {', '.join(sorted(rerun_needs))}")
        if rec is not None and rec.status in (StepStatus.FAILED, StepStatus.ERROR):
            return Decision(False, f"last attempt {rec.status}")
        return Decision(False, "never ran")
    ran = rec is not None and bool(rec.fingerprint)
    if rec is not None and ran and rec.fingerprint != step.fingerprint:
        return Decision(False, "params changed")
    unsuccessful = rec.unsuccessful() if rec is not None else None
    if unsuccessful:
        return Decision(False, f"last attempt {unsuccessful}")
    succeeded = rec is not None and ran and rec.status is StepStatus.DONE
    if rec is not None and succeeded:
        # A need missing from the record was added to the plan after the step ran (a new
        # edge, or an implicit `tool-*` step of a newer bootstrap): it did not run "since";
        # one that runs in this session is in `rerun_needs` above.
        recorded = rec.upstream
        changed = [n for n, g in upstream_gens.items() if n in recorded and recorded[n] != g]
        if changed:
            return Decision(False, f"upstream ran again: {', '.join(sorted(changed))}")
    kind = get_kind(step.kind)
    if has_own_checks(step, kind):
        result = box_checks(step, ctx, kind)
        if not result.done:
            return Decision(False, result.reason)
        if succeeded:
            return Decision(True, f"fingerprint matches and {result.reason}")
        return Decision(True, f"already satisfied: {result.reason}")
    if succeeded:
        return Decision(True, "fingerprint matches (succeeded before)")
    return Decision(False, "never ran")
