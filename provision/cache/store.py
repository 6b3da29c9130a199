"""The cache's bucket: an rclone remote (`name:path`) or `gs://bucket/prefix` (rclone's GCS
backend on the fly, as for checkpoints), driven through the rclone binary.

Layout under the cache root `R`:

- `R/objects/<key>/<upload id>.tar.<codec>`: an archive, whole and checked (a sharded entry:
  `<upload id>.<n>.tar.<codec>` and `<upload id>.dirs.tar.<codec>`, see `provision.cache.save`);
- `R/tmp/<key>.<upload id>.<n>.partial`: an archive being uploaded (never read by a restore);
- `R/entries/<key>.json`: the manifest, written last, once its object is in `objects/` with
  the size and md5 the uploader counted. A key without an entry is a miss, whatever objects
  say: an upload killed half-way leaves a `.partial` and no entry.

Two boxes filling one key at once each upload their own object (the upload id differs), and
each writes the entry only when none is there; the one whose entry is not the one read back
a moment later deletes its object. An object is only ever deleted by its own uploader, and only
once the entry names another: the key always ends with one entry naming a whole object (at
worst, two writes further apart than that moment leave an object no entry names, which
costs space and nothing else).

Credentials stay in the rclone config or the environment (`RCLONE_CONFIG_*`,
`GOOGLE_APPLICATION_CREDENTIALS`); nothing here puts one in argv. Standard library only.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Generator
from typing import Any

from provision.checkpoints.remote import _last_error, find_rclone, rclone_path

#: Seconds a small call (an entry, a listing, a rename) may take: a lookup sits on the
#: critical path of the step it would restore, and a bucket that does not answer must cost
#: little before the step simply runs.
QUICK_TIMEOUT_S = 60
#: rclone's own connect and idle timeouts, for every call.
_TIMEOUTS = ["--contimeout", "10s", "--timeout", "60s"]
CHUNK = 1 << 20


class StoreError(Exception):
    """An rclone call failed; the message is rclone's own last error line."""


def _missing(message: str) -> bool:
    text = message.lower()
    return "not found" in text or "no such file" in text


class Store:
    """One cache root (see the module doc)."""

    def __init__(self, remote: str, env: dict[str, str], rclone_config: str | None = None):
        self.url = remote
        self.env = dict(env)
        self.root = rclone_path(remote, self.env).rstrip("/")
        self.rclone = find_rclone(self.env)
        self.config = os.path.expanduser(rclone_config) if rclone_config else None

    def path(self, rel: str) -> str:
        """The rclone path of `rel` under the root."""
        return f"{self.root}/{rel}"

    @staticmethod
    def entry_rel(key: str) -> str:
        return f"entries/{key}.json"

    # -- entries ---------------------------------------------------------------------------

    def entry(self, key: str) -> dict[str, Any] | None:
        """The manifest of `key`, or None when the key has none (a miss)."""
        try:
            text = self._run(["cat", self.path(self.entry_rel(key))])
        except StoreError as exc:
            if _missing(str(exc)):
                return None
            raise
        try:
            data = json.loads(text)
        except ValueError:
            return None  # not a manifest this bootstrap wrote: a miss, and overwritten later
        return data if isinstance(data, dict) and data.get("key") == key else None

    def write_entry(self, entry: dict[str, Any]) -> None:
        """Write the manifest of `entry['key']` (one small object: atomic on every backend)."""
        text = json.dumps(entry, sort_keys=True, indent=1) + "\n"
        self._run(["rcat", self.path(self.entry_rel(entry["key"]))], stdin=text.encode())

    # -- objects ---------------------------------------------------------------------------

    def stat(self, rel: str) -> dict[str, Any] | None:
        """{size, hashes} of one object, None when it is absent."""
        try:
            out = self._run(["lsjson", "--hash", "--files-only", self.path(rel)])
        except StoreError as exc:
            if _missing(str(exc)):
                return None
            raise
        items = json.loads(out or "[]")
        if not items:
            return None
        item = items[0]
        hashes = {k.lower(): str(v).lower() for k, v in (item.get("Hashes") or {}).items()}
        return {"size": int(item.get("Size", -1)), "hashes": hashes}

    def move(self, src: str, dst: str) -> None:
        self._run(["moveto", self.path(src), self.path(dst)])

    def delete(self, rel: str) -> None:
        """Delete one object; an absent one is fine."""
        try:
            self._run(["deletefile", self.path(rel)])
        except StoreError as exc:
            if not _missing(str(exc)):
                raise

    def upload(self, rel: str) -> subprocess.Popen[bytes]:
        """An `rclone rcat` writing what its stdin gets to `rel` (the caller feeds and waits)."""
        return self._popen(["rcat", self.path(rel)], stdin=subprocess.PIPE)

    def download(self, rel: str) -> Generator[bytes, None, None]:
        """The bytes of object `rel`, streamed; raises StoreError at the end when rclone
        failed (then the chunks were short: the archive's hash check catches it first)."""
        proc = self._popen(["cat", self.path(rel)], stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        try:
            yield from iter(lambda: proc.stdout.read(CHUNK), b"")  # type: ignore[union-attr]
        finally:
            proc.stdout.close()
            err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
            if proc.wait() != 0:
                raise StoreError(_last_error(err) or "rclone cat failed")

    def finish_upload(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait for an `upload`'s rclone; StoreError when it failed."""
        err = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
        if proc.wait() != 0:
            raise StoreError(_last_error(err) or "rclone rcat failed")

    # -- plumbing --------------------------------------------------------------------------

    def _argv(self, args: list[str]) -> list[str]:
        if self.rclone is None:
            raise StoreError("rclone is not installed on the box (tool-rclone installs it)")
        argv = [self.rclone, *args, "--retries", "2", "--low-level-retries", "3", *_TIMEOUTS]
        if self.config:
            argv += ["--config", self.config]
        return argv

    def _popen(self, args: list[str], stdin: int) -> subprocess.Popen[bytes]:
        try:
            return subprocess.Popen(
                self._argv(args),
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
            )
        except OSError as exc:
            raise StoreError(f"rclone could not start: {exc}") from None

    def _run(self, args: list[str], stdin: bytes | None = None) -> str:
        feed: dict[str, Any] = {"input": stdin} if stdin is not None else {}
        if stdin is None:
            feed["stdin"] = subprocess.DEVNULL
        try:
            done = subprocess.run(
                self._argv(args),
                capture_output=True,
                timeout=QUICK_TIMEOUT_S,
                env=self.env,
                **feed,
            )
        except subprocess.TimeoutExpired:
            raise StoreError(f"rclone {args[0]} took longer than {QUICK_TIMEOUT_S}s") from None
        except OSError as exc:
            raise StoreError(f"rclone could not start: {exc}") from None
        if done.returncode != 0:
            err = done.stderr.decode("utf-8", "replace")
            raise StoreError(_last_error(err) or f"rclone {args[0]} exited {done.returncode}")
        return str(done.stdout.decode("utf-8", "replace"))
