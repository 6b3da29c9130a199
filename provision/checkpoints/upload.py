"""Upload each complete checkpoint, verify it, record it in the remote's manifest, then prune.

One `sync()` pass, oldest step first, for every complete checkpoint the manifest lacks:

1. `rclone sync` the directory (files already on the remote with the same size and time are
   skipped, so a pass killed halfway resumes without sending a finished file twice), then the
   `carry:` files to `.bootstrap/carry/<name>/`;
2. verify: the remote's listing must hold every file of the box's copy with its size and its
   hash (the remote's own one type, `Remote.hash_type`: read from the object's metadata on
   GCS, S3 or Drive, computed where the remote has to read the data), the box's side hashed
   once by rclone with the same algorithm;
3. write the manifest entry (the remote's sizes and hashes): from here on it is restorable;
4. `keep`: delete the oldest complete checkpoints beyond `keep`, but only those the manifest
   holds (with a remote), never the newest, never an incomplete one.

What the pass saw goes to `checkpoints.json` in the step's directory, which `status`, the
watcher and `bootstrap checkpoints` read. Standard library only.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.agent.files import read_json, write_json_atomic
from provision.checkpoints import local
from provision.checkpoints.remote import CARRY_DIR, Remote, RemoteError, RemoteFile
from provision.checkpoints.spec import CheckpointSpec

STATUS_FILE = "checkpoints.json"


@dataclass
class SyncReport:
    """What one pass did."""

    uploaded: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    error: str | None = None


class Uploader:
    """Keeps a job's checkpoints on its remote (see the module doc)."""

    def __init__(
        self,
        spec: CheckpointSpec,
        cwd: Path,
        workdir: Path,
        remote: Remote | None,
        log: Callable[[str], None],
        launch: str | None = None,
    ) -> None:
        self.spec = spec
        self.cwd = cwd
        self.directory = cwd / spec.dir
        self.workdir = workdir
        self.remote = remote
        self.log = log
        self.launch = launch
        self._entries: dict[str, dict[str, Any]] | None = None

    @property
    def status_path(self) -> Path:
        return self.workdir / STATUS_FILE

    def sync(self) -> SyncReport:
        """One pass: upload and verify what is new, then prune; never raises for the remote."""
        report = SyncReport()
        found = local.complete(self.directory, self.spec)
        try:
            for ckpt in found:
                if self.remote is not None and not self._on_remote(ckpt):
                    self._upload(ckpt)
                    report.uploaded.append(ckpt.name)
        except (RemoteError, OSError) as exc:
            report.error = str(exc)
            self.log(f"checkpoint upload failed: {exc}")
        safe = {c.name for c in found if self.remote is None or self._on_remote(c)}
        report.deleted = self._prune(found, safe)
        if self.remote is not None:
            left = local.complete(self.directory, self.spec)
            report.pending = [c.name for c in left if not self._on_remote(c)]
        self._record(report)
        return report

    def _on_remote(self, ckpt: local.LocalCheckpoint) -> bool:
        """Whether the manifest records this very checkpoint (same files, same sizes).

        An entry of the same name with other files (another run that reached the same step)
        does not count: the box's checkpoint is uploaded over it.
        """
        if self._entries is None:
            if self.remote is None:
                return False
            try:
                self._entries = self.remote.entries()
            except RemoteError:
                return False
        entry = self._entries.get(ckpt.name)
        if entry is None:
            return False
        recorded = {k: int(v.get("size", -1)) for k, v in (entry.get("files") or {}).items()}
        return recorded == local.files(ckpt.path)

    def _upload(self, ckpt: local.LocalCheckpoint) -> None:
        assert self.remote is not None
        started = time.time()
        self.log(f"uploading checkpoint {ckpt.name} to {self.remote.url}")
        write_json_atomic(self.status_path, {**read_status(self.workdir), "uploading": ckpt.name})
        # The box's side is hashed while it uploads (a complete checkpoint no longer changes):
        # the pass then costs the transfer plus the remote's hashes, not a third read after it.
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            mine = pool.submit(self.remote.local_listing, ckpt.path)
            self.remote.upload_dir(ckpt.path, ckpt.name)
            carried = {}
            for rel in self.spec.carry:
                source = self.cwd / rel
                if source.is_file():
                    self.remote.upload_file(source, f"{CARRY_DIR}/{ckpt.name}/{rel}")
                    carried[rel] = source.stat().st_size
            files = self._verify(ckpt, carried, mine.result())
        finally:
            pool.shutdown(wait=False)
        size = sum(f.size for f in files["files"].values())
        entry = {
            "name": ckpt.name,
            "step": ckpt.step,
            "files": {k: v.to_dict() for k, v in sorted(files["files"].items())},
            "carry": {k: v.to_dict() for k, v in sorted(files["carry"].items())},
            "bytes": size,
            "verified": time.time(),
            "box": socket.gethostname(),
            "launch": self.launch,
        }
        self.remote.write_entry(entry)
        if self._entries is not None:
            self._entries[ckpt.name] = entry
        seconds = time.time() - started
        self.log(f"checkpoint {ckpt.name} uploaded and verified ({size} bytes in {seconds:.1f}s)")

    def _verify(
        self,
        ckpt: local.LocalCheckpoint,
        carried: dict[str, int],
        mine: dict[str, RemoteFile],
    ) -> dict[str, dict[str, RemoteFile]]:
        """The remote's files of `ckpt` and its carry, once they match the box's (`mine`)."""
        assert self.remote is not None
        theirs = self.remote.listing(ckpt.name)
        _same_files(ckpt.name, mine, theirs)
        theirs = {k: theirs[k] for k in mine}
        carry = self.remote.listing(f"{CARRY_DIR}/{ckpt.name}") if carried else {}
        carry = {k: v for k, v in carry.items() if k in carried}
        _same_files(
            f"the carry of {ckpt.name}", {k: RemoteFile(v) for k, v in carried.items()}, carry
        )
        return {"files": theirs, "carry": carry}

    def _prune(self, found: list[local.LocalCheckpoint], safe: set[str]) -> list[str]:
        if self.spec.keep is None or len(found) <= self.spec.keep:
            return []
        deleted = []
        for ckpt in found[: -self.spec.keep]:
            if ckpt.name not in safe:
                continue  # not on the remote yet: the box's copy is the only one
            shutil.rmtree(ckpt.path, ignore_errors=True)
            deleted.append(ckpt.name)
            self.log(f"deleted local checkpoint {ckpt.name} (keep: {self.spec.keep})")
        return deleted

    def _record(self, report: SyncReport) -> None:
        old = read_json(self.status_path, {})
        old = old if isinstance(old, dict) else {}
        now = time.time()
        failing = old.get("failing")
        if report.error:
            since = failing.get("since", now) if isinstance(failing, dict) else now
            attempts = (failing.get("attempts", 0) if isinstance(failing, dict) else 0) + 1
            failing = {"since": since, "error": report.error, "attempts": attempts}
        else:
            failing = None
        status: dict[str, Any] = {
            "remote": self.remote.url if self.remote is not None else None,
            "verified": sorted(self._entries or {}, key=lambda n: self.spec.step_of(n) or 0),
            "pending": report.pending,
            "deleted": sorted(set(old.get("deleted") or []) | set(report.deleted)),
            "failing": failing,
            "checked": now,
            "last_upload": now if report.uploaded else old.get("last_upload"),
            "uploading": None,
        }
        write_json_atomic(self.status_path, status)


def read_status(workdir: Path) -> dict[str, Any]:
    """The uploader's last pass as `checkpoints.json` holds it ({} before the first)."""
    status = read_json(workdir / STATUS_FILE, {})
    return status if isinstance(status, dict) else {}


def _same_files(what: str, mine: dict[str, RemoteFile], theirs: dict[str, RemoteFile]) -> None:
    """Raise unless every file of `mine` is in `theirs` with its size and hash."""
    missing = sorted(set(mine) - set(theirs))
    wrong = sorted(k for k in mine if k in theirs and not mine[k].matches(theirs[k]))
    if missing or wrong:
        detail = ", ".join([*(f"{k} missing" for k in missing), *(f"{k} differs" for k in wrong)])
        raise RemoteError(f"{what} on the remote does not match the box: {detail}")
