"""One monitor reading of a training job, taken on the box: `bootstrap monitor TARGET`.

`monitor_snapshot()` parses the training log, asks nvidia-smi and the host, evaluates the alert
rules and matches the log's tail against the failure catalog, all in one process, so the
controller needs one SSH round trip per reading (the agent prints the dict as JSON). The result
is JSON-serialisable with `allow_nan=False`:

    {"time", "log": {"path", "exists", "size", "age_s"},
     "training": TrainingStatus.to_dict(), "gpus": GpuReport.to_dict(), "host": host_snapshot(),
     "alerts": [Alert.to_dict()], "known_issues": [Match.to_dict()],
     "checkpoints": Forecast.to_dict() or None}

`checkpoints` (`{"dir", "keep", "size_gb", "step", "complete"}`, only `dir` required) names the
job's checkpoint directory: the snapshot then says whether its disk holds the next
`checkpoints_ahead` checkpoints (provision/monitor/checkpoint_disk.py).
"""

from __future__ import annotations

import os
import time
from typing import Any

from provision.agent import catalog
from provision.agent.files import tail_text
from provision.errors import ConfigError
from provision.monitor import alerts, checkpoint_disk, gpu, host, logparse

#: How much of the log's end is matched against the failure catalog.
ISSUE_TAIL_BYTES = 64 * 1024


def monitor_snapshot(
    log_path: str,
    batch_size: int | None = None,
    thresholds: dict[str, Any] | None = None,
    *,
    nvidia_smi: str = "nvidia-smi",
    disk_paths: list[str] | None = None,
    max_bytes: int = 4 * 1024 * 1024,
    cpu_interval: float = 0.2,
    checkpoints: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Read the job's state. `batch_size` is the global batch (for samples/s); `thresholds`
    overrides alerts.DEFAULT_THRESHOLDS (ValueError on an unknown key); `disk_paths` default to
    the log's directory."""
    limits = alerts.merge_thresholds(thresholds)
    path = os.path.expanduser(log_path)
    now = time.time()
    snap: dict[str, Any] = {
        "time": round(now, 3),
        "log": _log_info(path, now),
        "training": logparse.parse_log_file(path, batch_size, max_bytes=max_bytes).to_dict(),
        "gpus": gpu.query_gpus(nvidia_smi).to_dict(),
        "host": host.host_snapshot(disk_paths or [os.path.dirname(path) or "."], cpu_interval),
    }
    found = alerts.evaluate(snap, limits)
    snap["checkpoints"] = _checkpoint_forecast(checkpoints, limits)
    if snap["checkpoints"] is not None:
        found += checkpoint_disk.disk_alerts(snap["checkpoints"])
    snap["alerts"] = [
        a.to_dict() for a in sorted(found, key=lambda a: a.severity != alerts.CRITICAL)
    ]
    snap["known_issues"] = _known_issues(path)
    return snap


def _checkpoint_forecast(
    spec: dict[str, Any] | None, limits: dict[str, float | None]
) -> dict[str, Any] | None:
    """The checkpoint directory's forecast, or None when the job names none."""
    if not spec or not spec.get("dir"):
        return None
    ahead = int(limits["checkpoints_ahead"] or 0)
    if ahead < 1:
        return None  # the rule is switched off
    found = checkpoint_disk.forecast(
        str(spec["dir"]),
        keep=spec.get("keep"),
        ahead=ahead,
        size_gb=spec.get("size_gb"),
        step=spec.get("step"),
        complete=spec.get("complete"),
    )
    return found.to_dict()


def _log_info(path: str, now: float) -> dict[str, Any]:
    try:
        st = os.stat(path)
    except OSError:
        return {"path": path, "exists": False, "size": 0, "age_s": None}
    return {
        "path": path,
        "exists": True,
        "size": st.st_size,
        "age_s": round(max(0.0, now - st.st_mtime), 1),
    }


def _known_issues(path: str) -> list[dict[str, Any]]:
    tail = tail_text(path, ISSUE_TAIL_BYTES)
    try:
        return [m.to_dict() for m in catalog.default_catalog().match(tail)]
    except ConfigError:
        return []
