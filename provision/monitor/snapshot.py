"""One monitor reading of a training job, taken on the box: `bootstrap monitor TARGET`.

`monitor_snapshot()` parses the training log, asks nvidia-smi and the host, evaluates the alert
rules and matches the log's tail against the failure catalog, all in one process, so the
controller needs one SSH round trip per reading (the agent prints the dict as JSON). The result
is JSON-serialisable with `allow_nan=False`:

    {"time", "log": {"path", "exists", "size", "age_s"},
     "training": TrainingStatus.to_dict(), "gpus": GpuReport.to_dict(), "host": host_snapshot(),
     "alerts": [Alert.to_dict()], "known_issues": [Match.to_dict()]}
"""

from __future__ import annotations

import os
import time
from typing import Any

from provision.errors import ConfigError
from provision.monitor import alerts, catalog, gpu, host, logparse

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
    snap["alerts"] = [a.to_dict() for a in alerts.evaluate(snap, limits)]
    snap["known_issues"] = _known_issues(path)
    return snap


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
    tail = catalog.tail_text(path, ISSUE_TAIL_BYTES)
    try:
        return [m.to_dict() for m in catalog.default_catalog().match(tail)]
    except ConfigError:
        return []
