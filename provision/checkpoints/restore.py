"""What the remote holds, and bringing its newest verified checkpoint onto a fresh box.

`survey` classifies every checkpoint on the remote:

- `verified`: a manifest entry, and every file it names is on the remote with its size (and
  hash, where both sides have one);
- `broken`: a manifest entry naming a file that is missing or differs (someone deleted or
  rewrote it): never restored;
- `partial`: files without a manifest entry (an upload killed halfway): never restored.

`restore_newest` downloads the newest verified one into a staging directory beside the
checkpoint directory (outside it, so neither the trainer nor the uploader can take it for a
checkpoint), checks it against the remote (`rclone check`) and the entry's sizes, and only then
renames it into place; the entry's carried files go back under cwd where the box has none yet
(a config the playbook rendered stays as rendered). A download that fails (disk full, a file
gone meanwhile) leaves nothing behind; one killed halfway leaves a staging directory that the
next restore removes first. Standard library only.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.checkpoints import local
from provision.checkpoints.remote import CARRY_DIR, Remote, RemoteError, RemoteFile
from provision.checkpoints.spec import CheckpointSpec
from provision.errors import StepFailed


@dataclass(frozen=True)
class RemoteCheckpoint:
    """One checkpoint on the remote and whether it can be restored."""

    name: str
    step: int
    state: str  # verified | broken | partial
    detail: str = ""
    bytes: int = 0
    entry: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "step": self.step,
            "state": self.state,
            "detail": self.detail,
            "bytes": self.bytes,
            "box": self.entry.get("box"),
            "verified": self.entry.get("verified"),
        }


class RestoreError(Exception):
    """The newest verified checkpoint could not be brought onto the box."""


def survey(remote: Remote, spec: CheckpointSpec) -> list[RemoteCheckpoint]:
    """Every checkpoint on the remote with its state, oldest step first.

    Directories are listed before the manifest is read, and the manifest is read again for
    those without an entry, so an upload that finishes meanwhile is not taken for a partial one.
    """
    names = remote.names()
    entries = remote.entries()
    if any(n not in entries for n in names if spec.step_of(n) is not None):
        entries = {**entries, **remote.entries()}
    out = []
    for name in sorted(set(names) | set(entries)):
        step = spec.step_of(name)
        if step is None:
            continue
        entry = entries.get(name)
        listing = remote.listing(name)
        size = sum(f.size for f in listing.values())
        if entry is None:
            out.append(RemoteCheckpoint(name, step, "partial", "no manifest entry", size))
            continue
        problem = _mismatch(entry, listing)
        state = "broken" if problem else "verified"
        out.append(RemoteCheckpoint(name, step, state, problem, size, entry))
    return sorted(out, key=lambda c: (c.step, c.name))


def restore_newest(
    spec: CheckpointSpec, cwd: Path, remote: Remote, log: Callable[[str], None]
) -> RemoteCheckpoint | None:
    """Download the newest verified checkpoint into the checkpoint directory (one whose copy
    does not match its manifest entry is passed over for the next newest).

    Returns it, or None when the remote holds no verified one. Raises RestoreError (the
    remote failed, the disk filled up) with nothing half-written left behind.
    """
    directory = cwd / spec.dir
    for stale in directory.parent.glob(f".{directory.name}.restoring-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        found = survey(remote, spec)
    except RemoteError as exc:
        raise RestoreError(f"cannot list {remote.url}: {exc}") from None
    for skipped in (c for c in found if c.state != "verified"):
        log(f"not restoring {skipped.name} from {remote.url}: {skipped.state} ({skipped.detail})")
    verified = [c for c in found if c.state == "verified"]
    for newest in reversed(verified):
        if _download(newest, directory, remote, log):
            _restore_carry(newest, cwd, remote, log)
            return newest
    return None


def _download(
    ckpt: RemoteCheckpoint, directory: Path, remote: Remote, log: Callable[[str], None]
) -> bool:
    """Bring `ckpt` into `directory` through a staging directory; False (nothing left) when
    the copy does not match its manifest entry: a file changed on the remote since the upload
    with its size kept, which a `slow_hash` remote's listing does not show. Raises
    RestoreError when the remote or the disk fails."""
    staging = directory.parent / f".{directory.name}.restoring-{ckpt.name}"
    log(f"restoring checkpoint {ckpt.name} ({ckpt.bytes} bytes) from {remote.url}")
    try:
        staging.mkdir(parents=True)
        _room_for(ckpt, staging)
        remote.download_dir(ckpt.name, staging)
        # Against the manifest: the sizes and hashes the upload verified, hashed here once.
        problem = _mismatch(ckpt.entry, remote.local_listing(staging))
        if problem:
            log(f"not restoring {ckpt.name} from {remote.url}: broken ({problem} as downloaded)")
            return False
        directory.mkdir(parents=True, exist_ok=True)
        staging.rename(directory / ckpt.name)
    except (RemoteError, OSError) as exc:
        raise RestoreError(f"downloading checkpoint {ckpt.name} failed: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def _room_for(ckpt: RemoteCheckpoint, staging: Path) -> None:
    """Refuse at once a download the disk cannot hold (rather than fill it for an hour)."""
    free = shutil.disk_usage(staging).free
    if free < ckpt.bytes:
        raise RestoreError(
            f"checkpoint {ckpt.name} needs {ckpt.bytes} bytes and {staging.parent} has {free} "
            "free: no space left on device"
        )


def _restore_carry(
    ckpt: RemoteCheckpoint, cwd: Path, remote: Remote, log: Callable[[str], None]
) -> None:
    for rel, info in sorted((ckpt.entry.get("carry") or {}).items()):
        dest = cwd / rel
        if dest.exists():
            log(f"keeping the box's {rel} (not the one carried with {ckpt.name})")
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.restoring")
        try:
            remote.download_file(f"{CARRY_DIR}/{ckpt.name}/{rel}", tmp)
            if tmp.stat().st_size != int(info.get("size", -1)):
                raise RestoreError(f"{rel} carried with {ckpt.name} has the wrong size")
            tmp.rename(dest)
        except (RemoteError, OSError) as exc:
            raise RestoreError(f"restoring {rel} of {ckpt.name} failed: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        log(f"restored {rel} carried with {ckpt.name}")


def _mismatch(entry: dict[str, Any], listing: dict[str, RemoteFile]) -> str:
    """'' when `listing` holds every file of the entry with its size and hashes."""
    problems = []
    for rel, info in sorted((entry.get("files") or {}).items()):
        recorded = RemoteFile(int(info.get("size", -1)), dict(info.get("hashes") or {}))
        there = listing.get(rel)
        if there is None:
            problems.append(f"{rel} missing")
        elif not recorded.matches(there):
            problems.append(f"{rel} differs")
    if not entry.get("files"):
        problems.append("the entry names no file")
    return ", ".join(problems)


def before_launch(
    spec: CheckpointSpec, cwd: Path, env: dict[str, str], log: Callable[[str], None]
) -> RemoteCheckpoint | None:
    """`restore: true` before a launch: on a box without a complete checkpoint, bring the
    newest verified one; None when the box has one or the remote none (a first run).

    Raises StepFailed when the remote cannot be read or the download fails: starting from step
    0 instead would quietly throw the run's progress away.
    """
    if not spec.restore or spec.remote is None:
        return None
    have = local.complete(cwd / spec.dir, spec)
    if have:
        log(f"not restoring: the box has checkpoint {have[-1].name} already")
        return None
    try:
        restored = restore_newest(spec, cwd, Remote(spec, env), log)
    except RestoreError as exc:
        raise StepFailed(
            str(exc),
            "fix the remote or free disk space and rerun the step; `restore: false` starts "
            "the run from step 0 instead",
        ) from None
    if restored is None:
        log(f"nothing to restore: {spec.remote} holds no verified checkpoint")
    return restored
