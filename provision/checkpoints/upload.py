"""Upload each complete checkpoint, verify it, record it in the remote's manifest, then prune.

One `sync()` pass, oldest step first, for every complete checkpoint the manifest lacks, in
batches: the checkpoints waiting go together while they add up to at most `BATCH_BYTES` (small
ones: each rclone start-up and listing costs as much as sending one), a bigger one alone (it is
recorded as soon as it is verified, not after the others):

1. `rclone sync` the batch's directories, in one call (files already on the remote with the
   same size and time are skipped, so a pass killed halfway resumes without sending a finished
   file twice), then the `carry:` files to `.bootstrap/carry/<name>/`;
2. verify: the remote's listing must hold every file of the box's copy with its size and its
   hash (the remote's own one type, `Remote.hash_type`, read from the object's metadata on
   GCS, S3 or Drive). The box's side is the hash rclone's sync computed of each file it sent
   and found the same on the remote after the transfer (it reads the file for that anyway; a
   second hashing pass cost the box as much CPU as the transfer); a file the sync skipped
   (sent by a pass killed before recording) is hashed by rclone with the same algorithm. A
   remote that would have to read every file back to hash it (the local disk, sftp:
   `Remote.slow_hash`) is listed by size: its hash is the one the sync compared;
3. write the manifest entries of the verified ones (the remote's sizes and hashes): from here on
   each is restorable; one that does not verify is not recorded, and fails the pass;
4. `keep`: delete the oldest complete checkpoints beyond `keep`, but only those the manifest
   holds (with a remote), never the newest, never an incomplete one; each is renamed out of
   the checkpoint directory before it is deleted, so a kill halfway leaves no checkpoint with
   files missing.

What the pass saw goes to `checkpoints.json` in the step's directory, which `status`, the
watcher and `bootstrap checkpoints` read. Standard library only.
"""

from __future__ import annotations

import glob
import os
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
#: The most bytes of checkpoints one rclone call sends before they are recorded.
BATCH_BYTES = 1 << 30


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
            waiting = [c for c in found if self.remote is not None and not self._on_remote(c)]
            for batch in _batches(waiting):
                report.uploaded += self._upload(batch)
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

    def _upload(self, batch: list[local.LocalCheckpoint]) -> list[str]:
        """Send, verify and record `batch` (see the module doc); the names recorded."""
        assert self.remote is not None
        started = time.time()
        names = [c.name for c in batch]
        self.log(f"uploading checkpoint {', '.join(names)} to {self.remote.url}")
        write_json_atomic(self.status_path, {**read_status(self.workdir), "uploading": names})
        # The remote's features (its hash type) are asked beside the transfer, not before it.
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            features = pool.submit(self.remote.hash_type)
            checked = self.remote.upload_dirs(self.directory, names)
            features.result()
        finally:
            pool.shutdown(wait=False)
        carried = {c.name: self._carry(c) for c in batch}
        theirs = self.remote.listings(names)
        hashed = self._box_hashes(batch, checked)
        entries, problem = [], None
        for ckpt in batch:
            try:
                entries.append(self._entry(ckpt, hashed[ckpt.name], theirs[ckpt.name],
                                           carried[ckpt.name]))  # fmt: skip
            except RemoteError as exc:
                problem = exc
                break
        if entries:
            self.remote.write_entries(entries, self.workdir / ".manifest-entries")
            if self._entries is not None:
                self._entries.update({e["name"]: e for e in entries})
            size = sum(int(e["bytes"]) for e in entries)
            done = ", ".join(e["name"] for e in entries)
            seconds = time.time() - started
            self.log(f"checkpoint {done} uploaded and verified ({size} bytes in {seconds:.1f}s)")
        if problem is not None:
            raise problem
        return [e["name"] for e in entries]

    def _box_hashes(
        self, batch: list[local.LocalCheckpoint], checked: dict[str, dict[str, str]]
    ) -> dict[str, dict[str, RemoteFile]]:
        """The box's files of each checkpoint of `batch` with their sizes and the remote's hash
        type: the hash rclone's sync checked on both sides after sending the file (`checked`),
        else (a file it skipped, sent by a pass killed before recording it) hashed here by
        rclone with the remote's algorithm, for the checkpoints that have such a file."""
        assert self.remote is not None
        kind = self.remote.hash_type()
        out: dict[str, dict[str, RemoteFile]] = {}
        unknown = []
        for ckpt in batch:
            files = {}
            for rel, size in local.files(ckpt.path).items():
                value = checked.get(f"{ckpt.name}/{rel}", {}).get(kind) if kind else None
                if kind and not value:
                    unknown.append(ckpt.name)
                    break
                files[rel] = RemoteFile(size, {kind: value} if kind and value else {})
            out[ckpt.name] = files
        if unknown:
            out.update(self.remote.local_listings(self.directory, unknown))
        return out

    def _carry(self, ckpt: local.LocalCheckpoint) -> dict[str, RemoteFile]:
        """Send the files that travel with `ckpt`; the remote's copies, checked by size."""
        assert self.remote is not None
        carried = {}
        for rel in self.spec.carry:
            source = self.cwd / rel
            if source.is_file():
                self.remote.upload_file(source, f"{CARRY_DIR}/{ckpt.name}/{rel}")
                carried[rel] = RemoteFile(source.stat().st_size)
        if not carried:
            return {}
        there = self.remote.listing(f"{CARRY_DIR}/{ckpt.name}")
        _same_files(f"the carry of {ckpt.name}", carried, there)
        return {k: there[k] for k in carried}

    def _entry(
        self,
        ckpt: local.LocalCheckpoint,
        mine: dict[str, RemoteFile],
        theirs: dict[str, RemoteFile],
        carry: dict[str, RemoteFile],
    ) -> dict[str, Any]:
        """The manifest entry of `ckpt` once the remote's files match the box's (`mine`).

        It records the hashes both sides agree on; on a `slow_hash` remote the listing has
        sizes only, and the remote's hash is the one rclone's sync compared with the box's
        after each transfer (it fails a file "corrupted on transfer" otherwise), so the entry
        records the box's: a restore checks its download against them."""
        _same_files(ckpt.name, mine, theirs)
        files = {
            k: RemoteFile(theirs[k].size, {**mine[k].hashes, **theirs[k].hashes}) for k in mine
        }
        return {
            "name": ckpt.name,
            "step": ckpt.step,
            "files": {k: v.to_dict() for k, v in sorted(files.items())},
            "carry": {k: v.to_dict() for k, v in sorted(carry.items())},
            "bytes": sum(f.size for f in files.values()),
            "verified": time.time(),
            "box": socket.gethostname(),
            "launch": self.launch,
        }

    def _prune(self, found: list[local.LocalCheckpoint], safe: set[str]) -> list[str]:
        """Delete the checkpoints beyond `keep` that are `safe` (see the module doc).

        Each leaves the checkpoint directory by one rename before it is deleted: a pass killed
        halfway through deleting would otherwise leave a checkpoint with its marker and some of
        its files, which the next pass would take for another run's and sync over the verified
        copy on the remote. What such a pass left renamed is deleted by the next one."""
        for left in self.directory.parent.glob(f"{glob.escape(self._pruning(''))}*"):
            shutil.rmtree(left, ignore_errors=True)
        if self.spec.keep is None or len(found) <= self.spec.keep:
            return []
        deleted = []
        for ckpt in found[: -self.spec.keep]:
            if ckpt.name not in safe:
                continue  # not on the remote yet: the box's copy is the only one
            doomed = self.directory.parent / self._pruning(ckpt.name)
            try:
                os.rename(ckpt.path, doomed)
            except OSError as exc:
                self.log(f"could not delete local checkpoint {ckpt.name}: {exc}")
                continue
            shutil.rmtree(doomed, ignore_errors=True)
            deleted.append(ckpt.name)
            self.log(f"deleted local checkpoint {ckpt.name} (keep: {self.spec.keep})")
        return deleted

    def _pruning(self, name: str) -> str:
        """The name, beside the checkpoint directory, of checkpoint `name` being deleted."""
        return f".{self.directory.name}.pruning-{name}"

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


def _batches(waiting: list[local.LocalCheckpoint]) -> list[list[local.LocalCheckpoint]]:
    """`waiting` in order, cut into runs of at most BATCH_BYTES (a bigger checkpoint alone)."""
    batches: list[list[local.LocalCheckpoint]] = []
    size = 0
    for ckpt in waiting:
        bytes_ = sum(local.files(ckpt.path).values())
        if not batches or size + bytes_ > BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(ckpt)
        size += bytes_
    return batches


def _same_files(what: str, mine: dict[str, RemoteFile], theirs: dict[str, RemoteFile]) -> None:
    """Raise unless every file of `mine` is in `theirs` with its size and hash."""
    missing = sorted(set(mine) - set(theirs))
    wrong = sorted(k for k in mine if k in theirs and not mine[k].matches(theirs[k]))
    if missing or wrong:
        detail = ", ".join([*(f"{k} missing" for k in missing), *(f"{k} differs" for k in wrong)])
        raise RemoteError(f"{what} on the remote does not match the box: {detail}")
