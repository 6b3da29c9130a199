"""What the guard sees of its job at each look: progress, findings, and the events to tell.

`Watcher.observe()` takes one monitor reading of the job's log (provision/monitor/snapshot.py:
progress, loss, GPUs, host, the alert rules) plus what the guard knows (the job's exit status,
the uploader's last pass) and returns the `watch.json` document:

    {"updated", "launch", "state": starting|training|finished|crashed,
     "progress": {"step", "total", "loss", "steps_per_s", "last_step_at"},
     "findings": [{"key", "kind", "severity", "message", "since"}],
     "job": {"rc", "diagnosis", "hint"}, "checkpoints": {...uploader status...}}

A finding is a condition that holds now: `stalled` (no new step for `stall_factor` times the
usual interval between steps seen, and at least `stall_min_s`), an alert of the monitor's rules
(`loss_nan`, `gpu_memory`, ... with its subject), `upload_failing` ("checkpoints are not leaving
the box"), `crashed` (exit status, and the catalog's diagnosis of the log's tail), `finished`
(exit status 0, or the last step reached). Each finding keeps the time it began (`since`) across
looks and across guard restarts (it is read back from `watch.json`), and its `key` names that
occurrence: a notifier that sends each key once sends one message per event, not one per look.
`training` (the first step seen) is an event of its own. Standard library only.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

from provision.agent.files import read_json, tail_lines
from provision.monitor import snapshot
from provision.steps.common import joblog
from provision.watch.record import WATCH_FILE
from provision.watch.spec import WatchSpec

#: Gaps between step changes kept for the usual interval.
_GAPS = 20


class Watcher:
    """Follows one launch's log; see the module doc."""

    def __init__(
        self, workdir: Path, log: str, launch: str | None, step_id: str, spec: WatchSpec
    ) -> None:
        self.workdir = workdir
        self.log = log
        self.launch = launch
        self.step_id = step_id
        self.spec = spec
        previous = read_json(workdir / WATCH_FILE, {})
        same = isinstance(previous, dict) and previous.get("launch") == launch
        self._since: dict[str, float] = dict(previous.get("_since") or {}) if same else {}
        self._first_step = previous.get("first_step") if same else None
        # The step rate seen so far, read back too: a guard started again (after kill -9)
        # over a job that has stalled meanwhile sees no new step to learn the rate from.
        pace = (previous.get("_pace") or {}) if same else {}
        self._last_step: int | None = pace.get("last_step")
        self._last_change = float(pace.get("last_change") or time.time())
        self._gaps: list[float] = [float(g) for g in pace.get("gaps") or []]
        self._finished_at: float | None = previous.get("finished_at") if same else None

    def observe(self, rc: int | None, gone: bool, uploads: dict[str, Any]) -> dict[str, Any]:
        """One look (see the module doc); `rc` is the exit status once recorded, `gone` whether
        the job is no longer running, `uploads` the uploader's status (or {})."""
        now = time.time()
        snap = snapshot.monitor_snapshot(self.log, None, self.spec.thresholds or None)
        training = snap["training"]
        step, total = training.get("step"), training.get("total")
        self._track(step, now)
        found: list[dict[str, Any]] = []
        if step is not None and self._first_step is None:
            self._first_step = step
        for alert in snap["alerts"]:
            if alert["id"] == "log_stale" and gone:
                continue
            found.append(_finding(f"alert:{alert['id']}:{alert['subject']}", "alert",
                                  alert["severity"], alert["message"]))  # fmt: skip
        stalled = self._stalled(now)
        if stalled and not gone:
            found.append(_finding("stalled", "stalled", "critical", stalled))
        failing = uploads.get("failing") if isinstance(uploads, dict) else None
        if failing:
            pending = ", ".join(uploads.get("pending") or []) or "none yet"
            message = (f"checkpoints are not leaving the box ({failing.get('attempts')} failed "
                       f"passes; pending: {pending}): {failing.get('error')}")  # fmt: skip
            found.append(_finding("upload_failing", "upload_failing", "critical", message))
        last_step = step is not None and total and step + 1 >= total
        if last_step and self._finished_at is None:
            self._finished_at = now
        job: dict[str, Any] = {"rc": rc}
        state = "training" if step is not None else "starting"
        if (gone and rc == 0) or (last_step and (rc in (None, 0))):
            state = "finished"
            found.append(_finding("finished", "finished", "info", _finished(step, total, rc)))
        elif gone:
            state = "crashed"
            tail = tail_lines(Path(self.log), 40)
            diagnosis = joblog.diagnose("\n".join(tail))
            job["diagnosis"] = diagnosis.line if diagnosis else joblog.last_message(tail)
            job["hint"] = diagnosis.hint if diagnosis else None
            why = f"exited with status {rc}" if rc is not None else "is gone without an exit status"
            message = f"the job {why}" + (f": {job['diagnosis']}" if job["diagnosis"] else "")
            found.append(_finding("crashed", "crashed", "critical", message))
        findings = self._stamp(found, now)
        return {
            "updated": now,
            "launch": self.launch,
            "state": state,
            "progress": {
                "step": step,
                "total": total,
                "loss": training.get("loss"),
                "steps_per_s": training.get("steps_per_s"),
                "last_step_at": self._last_change if self._last_step is not None else None,
            },
            "first_step": self._first_step,
            "finished_at": self._finished_at,
            "findings": findings,
            "job": job,
            "checkpoints": uploads,
            "_since": self._since,
            "_pace": {
                "last_step": self._last_step,
                "last_change": self._last_change,
                "gaps": self._gaps,
            },
        }

    def ended(self, doc: dict[str, Any], gone: bool) -> str | None:
        """'finished' or 'crashed' once the run is over (the job gone, or its last step reached
        `finish_grace_s` ago), else None."""
        if gone:
            return "finished" if doc["state"] == "finished" else "crashed"
        quiet = time.time() - (self._finished_at or time.time())
        if doc["state"] == "finished" and quiet >= self.spec.finish_grace_s:
            return "finished"
        return None

    def _track(self, step: int | None, now: float) -> None:
        if step is None or step == self._last_step:
            return
        if self._last_step is not None:
            self._gaps = [*self._gaps, now - self._last_change][-_GAPS:]
        self._last_step, self._last_change = step, now

    def _stalled(self, now: float) -> str | None:
        if self._last_step is None or not self._gaps:
            return None
        usual = statistics.median(self._gaps)
        quiet = now - self._last_change
        limit = max(self.spec.stall_factor * usual, self.spec.stall_min_s)
        if quiet < limit:
            return None
        return (f"stalled: no new step for {quiet:.0f}s (last step {self._last_step}; steps came "
                f"every {usual:.1f}s)")  # fmt: skip

    def _stamp(self, found: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        """Give each finding the time its condition began; forget conditions that cleared."""
        active = {}
        for item in found:
            since = self._since.get(item["key"], now)
            active[item["key"]] = since
            item["since"] = since
            item["event"] = f"{item['key']}@{since:.0f}"
            if item["kind"] == "upload_failing" and self.spec.repeat_s:
                # Reminded every repeat_s while it lasts: one event per period.
                item["event"] += f"#{math.floor((now - since) / self.spec.repeat_s)}"
        self._since = active
        return found


def _finding(key: str, kind: str, severity: str, message: str) -> dict[str, Any]:
    return {"key": key, "kind": kind, "severity": severity, "message": message}


def _finished(step: int | None, total: int | None, rc: int | None) -> str:
    if rc == 0:
        return f"the job finished with status 0 (last step {step}/{total})"
    return f"the last step was reached ({step}/{total})"
