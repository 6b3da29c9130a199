"""The checkpoints in a job's checkpoint directory on the box, and which of them are whole.

A subdirectory is a checkpoint when its whole name matches the step regex; it is complete when
the `complete` marker file exists inside it (without a marker: as soon as it has its final name,
which is how openpi's fork publishes one, by renaming `tmp_<step>`). Standard library only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from provision.checkpoints.spec import CheckpointSpec


@dataclass(frozen=True)
class LocalCheckpoint:
    """One checkpoint directory on the box."""

    name: str
    step: int
    path: Path
    complete: bool


def scan(directory: Path, spec: CheckpointSpec) -> list[LocalCheckpoint]:
    """The checkpoints under `directory`, oldest step first (none when it does not exist)."""
    found = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        step = spec.step_of(entry.name)
        if step is None:
            continue
        path = Path(entry.path)
        complete = (path / spec.complete).is_file() if spec.complete else True
        found.append(LocalCheckpoint(entry.name, step, path, complete))
    return sorted(found, key=lambda c: (c.step, c.name))


def complete(directory: Path, spec: CheckpointSpec) -> list[LocalCheckpoint]:
    """The complete checkpoints under `directory`, oldest first."""
    return [c for c in scan(directory, spec) if c.complete]


def files(path: Path) -> dict[str, int]:
    """Every regular file under `path` as {relative path: size}."""
    out: dict[str, int] = {}
    for root, _dirs, names in os.walk(path):
        for name in names:
            full = Path(root) / name
            try:
                if full.is_file() and not full.is_symlink():
                    out[full.relative_to(path).as_posix()] = full.stat().st_size
            except OSError:
                continue
    return out
