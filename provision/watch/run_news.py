"""What the runner tells when a run ends: the setup failed, or the training was verified.

The guard tells what happens to a job once it runs (provision/watch/guard.py); before that there
is no guard, and a setup that fails (a step failed or errored, so the steps that need it are
blocked and the job never launches) would go unheard with the laptop closed. So the runner, at
the end of each run, tells the `notify:` URLs of the plan's `tmux_launch` steps:

- **setup failed**, once per failed attempt (the event is the step and the time its last attempt
  started: retries within a run are one event, a `rerun` that fails again is a new one): the
  step, its reason, the catalog's diagnosis and fix for its log's tail
  (provision/agent/catalog.py), its last log lines, what it blocks, and `bootstrap rerun HOST
  STEP`. A job that launched and then ended (the launch step failing because its job exited)
  is the guard's news ("training crashed", with the same diagnosis), not told twice;
- **training verified**, once per launch: a `wait_log` step that needs the launch step saw its
  markers for this launch (the values it captured: the first loss, ...). Its event is the
  guard's "training runs" (`training@LAUNCH`): whichever sees it first sends the one message.

Events are kept with the guard's in the launch step's `notified.json` (provision/watch/notify.py);
a URL shared by several launch steps gets each setup event once. The runner has no apprise (it
runs on the box's python3): the message goes through the agent venv's interpreter. Standard
library only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from provision import dag
from provision.agent.files import read_json, tail_lines
from provision.model import Plan, PlannedStep, RunState, StepRecord, StepStatus
from provision.steps.common import joblog
from provision.watch.notify import Notifier

#: Log lines quoted in a setup-failed message.
TAIL_LINES = 5
#: What the launch step's directory holds (tmux_launch, guard) and wait_log's success record.
LAUNCH_FILE = "launch.json"
STATUS_FILE = "job.status"
PID_FILE = "job.pid"
GUARD_FILE = "guard.json"
WAIT_SUCCESS_FILE = "success.json"
FAILED = (StepStatus.FAILED, StepStatus.ERROR)
#: What a step without a record is read as.
_NO_RECORD = StepRecord()


def tell_run_end(
    run_dir: Path,
    plan: Plan,
    state: RunState,
    secrets: dict[str, str],
    python_for: Callable[[PlannedStep], str],
    log: Callable[[str], None],
    redact: Callable[[str], str] = lambda s: s,
) -> None:
    """Send what this run's end is news of (see the module doc); never raises for a delivery."""
    steps = {s.id: s for s in plan.steps}
    records = state.steps
    needs = {sid: list(s.needs) for sid, s in steps.items()}
    host = plan.host or "TARGET"
    told: set[tuple[str, str]] = set()  # (URLs, event): one message per URL set
    for launch_id, step in steps.items():
        urls = _urls(step, secrets)
        if urls is None:
            continue
        workdir = run_dir / "steps" / launch_id
        where = f"{host} · {plan.name}"
        notifier = Notifier(urls, workdir, where, log, python_for(step))
        for sid in sorted(dag.upstream(needs, [launch_id]) | _waits_on(steps, launch_id)):
            rec = records.get(sid) or _NO_RECORD
            if rec.status not in FAILED or not steps[sid].selected:
                continue
            if sid != launch_id and launch_id in needs[sid] and _job_ended(workdir):
                continue  # the job ran and ended: the guard tells it
            if sid == launch_id and _launched_this_attempt(workdir, rec):
                continue
            event = f"setup_failed:{sid}@{float(rec.started or 0):.3f}"
            if (urls, event) in told:
                continue
            told.add((urls, event))
            message, extra = _failure(run_dir, sid, rec, needs, records, host)
            notifier.tell(event, "setup_failed", redact(message), redact(extra))
        verified = _verified(run_dir, steps, records, launch_id, workdir)
        if verified is not None:
            notifier.tell(verified[0], "verified", redact(verified[1]))


def _urls(step: PlannedStep, secrets: dict[str, str]) -> str | None:
    """The apprise URLs of a selected tmux_launch step with `notify:`, when the secret is here."""
    if step.kind != "tmux_launch" or not step.selected:
        return None
    name = step.params.get("notify")
    return secrets.get(name) if name else None


def _waits_on(steps: dict[str, PlannedStep], launch_id: str) -> set[str]:
    """The `wait_log` steps that need the launch step (they verify its job started)."""
    return {sid for sid, s in steps.items() if s.kind == "wait_log" and launch_id in s.needs}


def _launch(workdir: Path) -> dict[str, Any]:
    record = read_json(workdir / LAUNCH_FILE, {})
    return record if isinstance(record, dict) else {}


def _launched_this_attempt(workdir: Path, rec: StepRecord) -> bool:
    """Whether the launch step's last attempt started its job and the job's guard (which then
    tells how it ended)."""
    launch = _launch(workdir)
    guarded = read_json(workdir / GUARD_FILE, {})
    if not launch.get("launch_id") or not isinstance(guarded, dict):
        return False
    fresh = float(launch.get("started") or 0) >= float(rec.started or 0)
    return fresh and guarded.get("launch_id") == launch["launch_id"]


def _job_ended(workdir: Path) -> bool:
    """Whether the current launch's job has ended (an exit status, or its script is gone)."""
    launch = _launch(workdir).get("launch_id")
    if launch is None:
        return False
    try:
        fields = (workdir / STATUS_FILE).read_text(encoding="utf-8").split()
        if fields[1:] == [launch]:
            return True
        pid = (workdir / PID_FILE).read_text(encoding="utf-8").split()
    except (OSError, IndexError):
        return False
    if pid[1:] != [launch] or not pid[0].isdigit():
        return False
    return not os.path.exists(f"/proc/{pid[0]}")


def _failure(
    run_dir: Path,
    sid: str,
    rec: StepRecord,
    needs: dict[str, list[str]],
    records: dict[str, StepRecord],
    host: str,
) -> tuple[str, str]:
    """The message and its details for a failed step."""
    attempts = rec.attempts or 1
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    message = f"step {sid} {rec.status}{tries}: {rec.reason or 'no reason given'}"
    lines: list[str] = []
    tail = tail_lines(run_dir / "logs" / f"{sid}.log", 200)
    found = joblog.diagnose("\n".join(tail))
    if found is not None:
        lines.append(f"diagnosis: {found.diagnosis}")
        lines.append(f"fix: {found.fix}")
    elif rec.hint:
        lines.append(f"hint: {rec.hint}")
    shown = [ln for ln in tail if not ln.startswith("=== ")][-TAIL_LINES:]
    lines += [f"| {ln[:300]}" for ln in shown]
    blocked = sorted(
        s
        for s in dag.downstream(needs, [sid]) - {sid}
        if (records.get(s) or _NO_RECORD).status is StepStatus.BLOCKED
    )
    if blocked:
        lines.append(f"blocked: {', '.join(blocked)}")
    lines.append(f"rerun: bootstrap rerun {host} {sid}")
    return message, "\n".join(lines)


def _verified(
    run_dir: Path,
    steps: dict[str, PlannedStep],
    records: dict[str, StepRecord],
    launch_id: str,
    workdir: Path,
) -> tuple[str, str] | None:
    """(event, message) when a wait_log step verified the current launch's job started."""
    launch = _launch(workdir)
    done = StepStatus.DONE
    if not launch.get("launch_id") or (records.get(launch_id) or _NO_RECORD).status is not done:
        return None
    for sid in sorted(_waits_on(steps, launch_id)):
        rec = records.get(sid) or _NO_RECORD
        seen = read_json(run_dir / "steps" / sid / WAIT_SUCCESS_FILE, None)
        if rec.status is not done or not isinstance(seen, dict):
            continue
        if float(rec.ended or 0) < float(launch.get("started") or 0):
            continue  # it verified an earlier launch
        values = seen.get("values") or {}
        shown = ", ".join(f"{k} {v}" for k, v in values.items())
        message = f"{sid}: all {seen.get('count')} markers seen" + (f"; {shown}" if shown else "")
        return f"training@{launch['launch_id']}", message
    return None
