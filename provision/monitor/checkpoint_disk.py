"""Checkpoint disk: the checkpoints a job has written, and whether the disk holds the next ones.

Which subdirectories of a job's checkpoint directory are checkpoints, and which of those are
complete, is the `checkpoints:` spec's business (provision/checkpoints/spec.py and local.py: the
step regex matches the whole name, so the fork's `tmp_<step>` being written is not one, and a
`complete` marker may be required). This module adds what they weigh and when they were written
(the newest mtime inside a checkpoint: when its last file landed).

`forecast(dir, ...)` measures them (size: the largest of the last three complete ones, so a
slightly growing optimizer state is not under-counted; interval: the median gap between the
completion times of the last six), and compares the disk's free space with what the next
`ahead` checkpoints need. With a `keep` policy (all but the newest `keep` complete ones are
deleted once a new one is complete) at most keep + 1 exist at a time, so the need is bounded by
the checkpoints still missing to that, and at least the next one (a checkpoint being written
is counted whole: its bytes so far are not subtracted); without one every checkpoint
adds its size, and the forecast says when the disk is full at the current rate. Before the first
checkpoint is complete the declared `size_gb` stands in for the measured size.

Standard library only: it runs in the agent (`bootstrap monitor`) and in `preflight`.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from provision.checkpoints import local
from provision.checkpoints.spec import CheckpointSpec
from provision.monitor import host
from provision.monitor.alerts import CRITICAL, WARNING, Alert

GB = 1e9
#: How many of the newest complete checkpoints give the size, and the interval.
SIZE_WINDOW = 3
INTERVAL_WINDOW = 6


@dataclass(frozen=True)
class Measured:
    """One complete checkpoint: its step, bytes on disk, and when its last file was written."""

    name: str
    step: int
    bytes: int
    mtime: float


def measure(
    directory: str,
    step: str | None = None,
    complete: str | None = None,
    newest: int = INTERVAL_WINDOW,
) -> tuple[int, list[Measured]]:
    """How many complete checkpoints `directory` holds, and the newest `newest` of them (by
    step, oldest first) with their sizes: only those are walked, so a run that keeps hundreds
    of many-file orbax checkpoints costs a `monitor --watch` no more than one that keeps a few.
    `step` and `complete` as in the `checkpoints:` spec; (0, []) when it does not exist."""
    spec = CheckpointSpec(dir=directory, step=step or CheckpointSpec.step, complete=complete)
    listed = local.complete(Path(os.path.expanduser(directory)), spec)
    found = []
    for checkpoint in listed[-newest:]:
        try:
            size, written = _tree(str(checkpoint.path))
        except OSError:
            continue  # deleted while we look (a keep policy pruning it)
        found.append(Measured(checkpoint.name, checkpoint.step, size, written))
    return len(listed), found


@dataclass(frozen=True)
class Forecast:
    """What the checkpoint directory holds and whether its disk holds the next checkpoints."""

    dir: str
    complete: int
    size_gb: float | None
    size_measured: bool
    interval_s: float | None
    free_gb: float
    keep: int | None
    ahead: int
    need_gb: float | None
    fits: int | None
    full_in_s: float | None
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (the snapshot's `checkpoints`)."""
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def describe(self) -> str:
        """One line: what is there, what comes, whether it fits."""
        if self.size_gb is None:
            return f"{self.dir}: no complete checkpoint yet, {self.free_gb:.1f} GB free"
        size = f"{self.size_gb:.1f} GB each" + ("" if self.size_measured else " (declared)")
        rate = f", one every {_minutes(self.interval_s)}" if self.interval_s else ""
        kept = f", keep {self.keep}" if self.keep is not None else ""
        text = (
            f"{self.dir}: {self.complete} complete checkpoint(s) ({size}{rate}{kept}), "
            f"{self.free_gb:.1f} GB free"
        )
        if self.keep is None and self.fits is not None:
            text += f": room for {self.fits} more"
            if self.full_in_s is not None:
                text += f", full in ~{_minutes(self.full_in_s)}"
        return text


def forecast(
    directory: str,
    *,
    keep: int | None = None,
    ahead: int = 3,
    size_gb: float | None = None,
    step: str | None = None,
    complete: str | None = None,
) -> Forecast:
    """Measure `directory` and forecast its disk for the next `ahead` checkpoints (see the
    module doc). `size_gb` is the declared size, used until one checkpoint is complete."""
    count, measured_ones = measure(directory, step, complete)
    done = sorted(measured_ones, key=lambda c: c.mtime)
    measured = max((c.bytes for c in done[-SIZE_WINDOW:]), default=0)
    size = measured if measured else (size_gb * GB if size_gb else None)
    times = [c.mtime for c in done[-INTERVAL_WINDOW:]]
    gaps = [times[i + 1] - times[i] for i in range(len(times) - 1)]  # 3.9: no pairwise
    interval = statistics.median([g for g in gaps if g > 0] or [0.0]) or None
    free = host.disk(directory)["free_gb"] * GB
    need = fits = full_in = None
    if size:
        coming = ahead if keep is None else min(ahead, max(1, keep + 1 - count))
        need = coming * size
        fits = max(0, math.floor(free / size))
        if keep is None and interval and done:
            full_in = max(0.0, (fits + 1) * interval - (time.time() - done[-1].mtime))
    return Forecast(
        dir=directory,
        complete=count,
        size_gb=size / GB if size else None,
        size_measured=bool(measured),
        interval_s=interval,
        free_gb=free / GB,
        keep=keep,
        ahead=ahead,
        need_gb=need / GB if need is not None else None,
        fits=fits,
        full_in_s=full_in,
        ok=need is None or free >= need,
    )


def disk_alerts(found: dict[str, Any]) -> list[Alert]:
    """The `checkpoint_disk` alert for a forecast dict (`Forecast.to_dict()`): critical when
    not even the next checkpoint fits, a warning when the next `ahead` do not."""
    if found.get("ok", True) or found.get("need_gb") is None:
        return []
    fits, ahead, keep = found["fits"], found["ahead"], found.get("keep")
    severity = CRITICAL if not fits else WARNING
    if keep is None:
        coming = f"the next {ahead} checkpoint(s) need {found['need_gb']:.1f} GB"
        advice = "set `keep` on the job's checkpoints, free space, or rent more disk"
    else:
        coming = f"with keep {keep} the next checkpoint(s) need {found['need_gb']:.1f} GB"
        advice = "lower `keep`, free space, or rent more disk"
    when = f" (full in ~{_minutes(found['full_in_s'])})" if found.get("full_in_s") else ""
    message = (
        f"{found['dir']}: {found['free_gb']:.1f} GB free holds {fits} more checkpoint(s) of "
        f"{found['size_gb']:.1f} GB{when}; {coming}: {advice}"
    )
    return [
        Alert(
            "checkpoint_disk",
            severity,
            str(found["dir"]),
            message,
            round(found["free_gb"], 1),
            round(found["need_gb"], 1),
        )
    ]


def _tree(path: str) -> tuple[int, float]:
    """Bytes allocated under `path` (files not followed through symlinks) and its newest mtime."""
    total, newest = 0, os.lstat(path).st_mtime
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue  # removed while we look (a keep policy pruning it)
            total += st.st_blocks * 512 if st.st_blocks else st.st_size
            newest = max(newest, st.st_mtime)
    return total, newest


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
