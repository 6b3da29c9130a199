"""The done-marker of the download kinds: every file they fetched, with its size.

Written into the step's workdir only after a download was complete and verified, and removed
before the next attempt starts, so a partial copy is never mistaken for a finished one. The
done-check stats each listed file (no network, no hashing): a deleted or truncated file makes
the step run again. Files the manifest does not list (a stats file written into the same
directory by a later step) do not matter.

Standard library only: the runner imports the kinds that use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from provision.agent.files import read_json, write_json_atomic
from provision.agent.units import human_bytes
from provision.steps.base import Check, ParamError, StepContext

MANIFEST = "manifest.json"
#: How many files a reason lists before summarising the rest.
_SHOWN = 3


def validate_local_dir(value: str, key: str) -> None:
    """A destination on the box must be absolute (or start with `~`): no cwd guessing."""
    if not value.startswith(("/", "~")):
        raise ParamError(f"'{key}' must be an absolute path on the box (or start with ~)", key)


def forget(ctx: StepContext) -> None:
    """Drop the marker before new work starts: until it is rewritten the step is not done."""
    (ctx.workdir / MANIFEST).unlink(missing_ok=True)


def record(ctx: StepContext, src: str, dest: Path, files: dict[str, int], **extra: Any) -> None:
    """Remember a verified download: `files` maps paths relative to `dest` to their sizes."""
    data = {"src": src, "dest": str(dest), "files": files, **extra}
    write_json_atomic(ctx.workdir / MANIFEST, data)


def check(ctx: StepContext, src: str, dest: Path) -> Check:
    """Done when the last verified download came from `src` and its files are all still there."""
    data = read_json(ctx.workdir / MANIFEST, None)
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return Check(False, "no completed download recorded")
    if data.get("src") != src or data.get("dest") != str(dest):
        return Check(False, f"the last download was {data.get('src')} -> {data.get('dest')}")
    files: dict[str, int] = data["files"]
    missing: list[str] = []
    changed: list[str] = []
    for rel, size in files.items():
        try:
            actual = os.stat(dest / rel).st_size
        except OSError:
            missing.append(rel)
            continue
        if actual != size:
            changed.append(f"{rel} ({actual} bytes, downloaded {size})")
    if missing:
        return Check(False, f"{len(missing)} of {len(files)} files missing: {_some(missing)}")
    if changed:
        return Check(False, f"{len(changed)} files changed size: {_some(changed)}")
    total = sum(files.values())
    return Check(True, f"{len(files)} files ({human_bytes(total)}) present as fetched from {src}")


def _some(items: list[str]) -> str:
    more = len(items) - _SHOWN
    return ", ".join(items[:_SHOWN]) + (f", ... ({more} more)" if more > 0 else "")
