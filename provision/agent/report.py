"""What the controller reads from the box: status snapshots, the follow stream, step logs.

A snapshot is the `status --json` object of DESIGN.md (less the controller's host name), built
from `plan.json`, `state.json`, each step's progress file and log tail, in one process.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

from provision.agent.state import RunDir, agent_root, load_state, runner_active
from provision.steps.base import read_json

DEFAULT_TAIL_LINES = 10
#: Seconds between two looks at the state while following a run.
FOLLOW_INTERVAL_S = 0.2


def latest_run() -> str | None:
    """The name of the run whose state changed last on this box."""
    runs = agent_root() / "runs"
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


def log_tail(path: Any, lines: int) -> list[str]:
    """The last `lines` lines of a log (reads at most 64 KiB from its end)."""
    if lines <= 0:
        return []
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    # Progress bars redraw with carriage returns: keep what the terminal would show.
    shown = [ln.rsplit("\r", 1)[-1] for ln in data.splitlines()]
    return [ln for ln in shown if ln.strip()][-lines:]


def snapshot(run: RunDir, tail_lines: int = DEFAULT_TAIL_LINES) -> dict[str, Any]:
    """The run's status as one JSON-serialisable object."""
    plan = read_json(run.plan, {})
    state = load_state(run)
    active = runner_active(run)
    recorded = state.get("runner", {}).get("status")
    runner = "running" if active else ("dead" if recorded == "running" else "idle")
    now = time.time()
    steps = []
    for step in plan.get("steps", []):
        rec = state.get("steps", {}).get(step["id"], {})
        status = rec.get("status") or ("pending" if step.get("selected", True) else "skipped")
        started, ended = rec.get("started"), rec.get("ended")
        duration = rec.get("duration_s")
        if status == "running" and started:
            duration = round(now - float(started), 1)
        progress = None
        if status == "running":
            progress = read_json(run.step_dir(step["id"]) / "_progress.json", None)
        steps.append(
            {
                "id": step["id"],
                "kind": step["kind"],
                "status": status,
                "attempts": rec.get("attempts", 0),
                "started": started,
                "ended": ended,
                "duration_s": duration,
                "rc": rec.get("rc"),
                "progress": progress,
                "reason": rec.get("reason"),
                "hint": rec.get("hint"),
                "warnings": rec.get("warnings") or [],
                "log_tail": log_tail(run.log(step["id"]), tail_lines),
            }
        )
    return {
        "playbook": plan.get("playbook"),
        "run": run.name,
        "box": socket.gethostname(),
        "runner": runner,
        "steps": steps,
    }


def emit(event: str, data: dict[str, Any]) -> None:
    """Write one event line of the follow stream."""
    sys.stdout.write(json.dumps({"event": event, **data}, sort_keys=True) + "\n")
    sys.stdout.flush()


def follow(run: RunDir, tail_lines: int = 3, grace_s: float = 0.0) -> None:
    """Stream snapshots whenever they change until the runner is gone, then a final one.

    `grace_s` gives a just-started runner time to take the lock before "not running" counts.
    """
    last = ""
    started = time.time()
    while True:
        snap = snapshot(run, tail_lines)
        active = snap["runner"] == "running" or time.time() - started < grace_s
        text = json.dumps(snap, sort_keys=True)
        if text != last:
            emit("snapshot", snap)
            last = text
        if not active:
            break
        time.sleep(FOLLOW_INTERVAL_S)
    emit("final", snapshot(run, DEFAULT_TAIL_LINES))


def print_log(run: RunDir, step_id: str, lines: int, keep_following: bool) -> int:
    """Print a step's log tail; with `keep_following`, keep printing what is appended."""
    path = run.log(step_id)
    if not path.exists():
        sys.stderr.write(f"no log for step '{step_id}' in run '{run.name}'\n")
        return 2
    for line in log_tail(path, lines) if lines else []:
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
    if not keep_following:
        return 0
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        while True:
            chunk = fh.read()
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
            elif not runner_active(run):
                return 0
            else:
                time.sleep(0.5)
