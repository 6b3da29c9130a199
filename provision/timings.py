"""How long each step of a playbook took on the boxes this controller followed, kept on the
controller (`<config>/durations/<playbook>.json`): the ETA of a fresh box, whose own state
knows nothing yet, and `graph`'s critical path when the playbook gives no `estimate:`.

Each step keeps its newest HISTORY runs as `[ended, seconds]`, so the same finished run seen
again (a no-op `up`, `status`) is not counted twice.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from provision.home import config_dir
from provision.model import StepSnapshot, StepStatus

#: Runs kept per step (the newest).
HISTORY = 5


def _path(playbook: str) -> Path:
    return config_dir() / "durations" / (re.sub(r"[^A-Za-z0-9_.-]", "_", playbook) + ".json")


def load(playbook: str) -> dict[str, list[list[float]]]:
    """Step id -> its kept `[ended, seconds]` pairs ({} when none, or the file is damaged)."""
    try:
        data = json.loads(_path(playbook).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        str(k): [[float(a), float(b)] for a, b in v]
        for k, v in data.items()
        if isinstance(v, list) and all(_pair(p) for p in v)
    }


def _pair(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)
    )


def expected(playbook: str) -> dict[str, float]:
    """Step id -> the median of its kept durations."""
    return {k: float(statistics.median(d for _, d in v)) for k, v in load(playbook).items() if v}


def record(playbook: str, steps: Iterable[StepSnapshot]) -> None:
    """Keep the durations of the snapshot's steps that ended done (a damaged or unwritable file
    is left as it is: the ETA is a help, never a reason for a command to fail)."""
    kept = load(playbook)
    changed = False
    for step in steps:
        ended, seconds = step.ended, step.duration_s
        if step.status is not StepStatus.DONE or ended is None or seconds is None:
            continue
        runs = kept.setdefault(step.id, [])
        if any(abs(a - float(ended)) < 1e-6 for a, _ in runs):
            continue
        runs.append([float(ended), float(seconds)])
        runs.sort()
        del runs[:-HISTORY]
        changed = True
    if not changed:
        return
    path = _path(playbook)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(kept, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
