"""The remote a job's checkpoints go to, driven through the rclone binary.

Layout under the remote path `R` (an rclone `remote:path`, or `gs://bucket/prefix`, which is
rclone's GCS backend on the fly):

- `R/<name>/...`: the checkpoint's files, as on the box;
- `R/.bootstrap/carry/<name>/<path>`: the files that travel with it (`carry:`, relative to cwd);
- `R/.bootstrap/manifest/<name>.json`: written only once every file of the checkpoint and of its
  carry is on the remote with the size (and hash, where the remote has one) of the box's copy.
  A checkpoint without an entry is partial, whatever its files say.

Every rclone call runs niced (`nice -n 19`, `ionice -c 3` where the box has it), with
`--bwlimit` when the spec sets one, so the training's data loader keeps the disk and the CPU.
Credentials stay in the rclone config or in `RCLONE_CONFIG_*` variables of the environment;
nothing here puts one in argv. Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.agent.paths import tools_bin
from provision.agent.priority import nice_prefix
from provision.checkpoints.spec import CheckpointSpec, gs_bucket_path

META_DIR = ".bootstrap"
MANIFEST_DIR = f"{META_DIR}/manifest"
CARRY_DIR = f"{META_DIR}/carry"
#: Seconds a listing, a manifest read or a manifest write may take.
_QUICK_TIMEOUT_S = 300
#: rclone's debug line once a transferred file's hash matched on both sides after the transfer
#: (operations.checkHashes: `DEBUG : <path>: md5 = <hex> OK`).
_HASH_OK_RE = re.compile(r"DEBUG : (?P<path>.+): (?P<kind>[a-z0-9]+) = (?P<sum>[0-9a-fA-F]+) OK$")


class RemoteError(Exception):
    """An rclone call failed; the message is rclone's own last error line."""


@dataclass(frozen=True)
class RemoteFile:
    """A file as the remote lists it."""

    size: int
    hashes: dict[str, str] = field(default_factory=dict)

    def matches(self, other: RemoteFile) -> bool:
        """Same size, and the same value for every hash both sides know."""
        if self.size != other.size:
            return False
        common = set(self.hashes) & set(other.hashes)
        return all(self.hashes[h].lower() == other.hashes[h].lower() for h in common)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "hashes": dict(self.hashes)}


def rclone_path(remote: str, env: dict[str, str]) -> str:
    """The rclone path for a `remote:` value; gs:// becomes an on-the-fly GCS remote.

    On GCS the credentials are the box's application-default ones (`env_auth`), or the service
    account file `GOOGLE_APPLICATION_CREDENTIALS` names; `STORAGE_EMULATOR_HOST` (the variable
    google-cloud-storage honours) points it at an emulator, anonymously.
    """
    gs = gs_bucket_path(remote)
    if gs is None:
        return remote
    bucket, prefix = gs
    emulator = env.get("STORAGE_EMULATOR_HOST")
    if emulator:
        url = emulator if "://" in emulator else f"http://{emulator}"
        options = f"anonymous=true,endpoint='{url}'"
    elif env.get("GOOGLE_APPLICATION_CREDENTIALS"):
        options = f"service_account_file='{env['GOOGLE_APPLICATION_CREDENTIALS']}'"
    else:
        options = "env_auth=true"
    return f":gcs,{options},bucket_policy_only=true:{bucket}/{prefix}".rstrip("/")


def find_rclone(env: dict[str, str]) -> str | None:
    """The rclone binary on this box: on PATH, or where bootstrap installs it."""
    found = shutil.which("rclone", path=env.get("PATH", os.defpath))
    if found:
        return found
    local = tools_bin() / "rclone"  # where `tool-rclone` puts it
    return str(local) if os.access(local, os.X_OK) else None


class Remote:
    """One checkpoint remote (see the module doc)."""

    def __init__(self, spec: CheckpointSpec, env: dict[str, str], rclone: str | None = None):
        assert spec.remote is not None
        self.url = spec.remote
        self.spec = spec
        self.env = dict(env)
        self.root = rclone_path(spec.remote, self.env)
        self.rclone = rclone or find_rclone(self.env)
        self._config = os.path.expanduser(spec.rclone_config) if spec.rclone_config else None
        self._hash_type: str | None = None  # "" once asked: the remote has none
        self._slow_hash = False

    def path(self, rel: str) -> str:
        """The rclone path of `rel` under the remote root."""
        return f"{self.root}/{rel}" if rel else self.root

    # -- transfers ------------------------------------------------------------------------

    def upload_dirs(self, parent: Path, names: list[str]) -> dict[str, dict[str, str]]:
        """Make each remote directory `name` hold exactly `parent/name`'s files, in one `rclone
        sync` (one start-up, one listing for them all): files already there with the same size
        and time are not sent again, stray ones in those directories are removed, nothing else
        on the remote is looked at.

        Returns the hashes rclone checked: {`name/rel`: {hash type: value}} for each file it
        sent whose hash it then found the same on the box and on the remote (its debug line
        `md5 = … OK`; a mismatch fails the sync, "corrupted on transfer"). rclone reads each
        file it sends to hash it anyway: taking its result spares the box a second hashing
        pass over the checkpoint. A file it skipped (already on the remote) is absent, and so
        is every file if a future rclone words the line otherwise: the caller hashes those."""
        args = ["sync", str(parent), self.root, *_only(names), *self._transfer_flags(), "-vv"]
        stderr: list[str] = []
        self._run(args, timeout=None, stderr=stderr)
        checked: dict[str, dict[str, str]] = {}
        for line in "".join(stderr).splitlines():
            found = _HASH_OK_RE.search(line.rstrip())
            if found:
                checked.setdefault(found["path"], {})[found["kind"]] = found["sum"].lower()
        return checked

    def upload_file(self, local: Path, rel: str) -> None:
        """Copy one file to `rel` under the root."""
        self._run(["copyto", str(local), self.path(rel), *self._transfer_flags()], timeout=None)

    def download_dir(self, name: str, dest: Path) -> None:
        """Copy a checkpoint directory from the remote into `dest`."""
        self._run(["copy", self.path(name), str(dest), *self._transfer_flags()], timeout=None)

    def download_file(self, rel: str, dest: Path) -> None:
        """Copy one file from `rel` under the root to `dest`."""
        self._run(["copyto", self.path(rel), str(dest), *self._transfer_flags()], timeout=None)

    # -- listings and the manifest --------------------------------------------------------

    def hash_type(self) -> str | None:
        """The one hash this remote is verified with: its own (md5 first, as GCS, S3 and Drive
        keep it with each object; else sha1, crc32c, or the first it has); None when it has
        none (sizes only). Asked once (`rclone backend features`).

        One type, not every one rclone knows: for a remote that computes hashes by reading the
        data (the local disk, sftp) each type is a full pass over a 22 GB checkpoint, and
        `--hash` alone asks for nine of them.
        """
        self._features()
        return self._hash_type or None

    def slow_hash(self) -> bool:
        """Whether the remote computes its hashes by reading the data (rclone's `SlowHash`:
        the local disk, sftp) rather than keeping them with each object."""
        self._features()
        return bool(self._slow_hash)

    def _features(self) -> None:
        if self._hash_type is not None:
            return
        out = json.loads(self._run(["backend", "features", self.root]) or "{}")
        offered = [str(h).lower() for h in (out.get("Hashes") or [])]
        preferred = [h for h in ("md5", "sha1", "crc32c") if h in offered]
        self._slow_hash = bool((out.get("Features") or {}).get("SlowHash"))
        self._hash_type = (preferred or offered or [""])[0]

    def listing(self, rel: str) -> dict[str, RemoteFile]:
        """Every file under `rel` as {relative path: RemoteFile}, with the remote's hash (see
        `hash_type`) where it keeps one (sizes only on a `slow_hash` remote: hashing there reads
        every checkpoint back); empty when `rel` is absent."""
        return self._lsjson(self.path(rel), hashed=not self.slow_hash())

    def local_listing(self, path: Path) -> dict[str, RemoteFile]:
        """The box's files under `path`, with the same hash as `listing` (computed by rclone,
        so it is the remote's very algorithm), to compare with the remote's."""
        return self._lsjson(str(path))

    def listings(self, names: list[str]) -> dict[str, dict[str, RemoteFile]]:
        """`listing` of several top-level directories in one call: {name: its files}."""
        listed = self._lsjson(self.root, _only(names), hashed=not self.slow_hash())
        return _split(listed, names)

    def local_listings(self, parent: Path, names: list[str]) -> dict[str, dict[str, RemoteFile]]:
        """`local_listing` of several directories of `parent` in one call."""
        return _split(self._lsjson(str(parent), _only(names)), names)

    def _lsjson(
        self, where: str, only: Sequence[str] = (), hashed: bool = True
    ) -> dict[str, RemoteFile]:
        kind = self.hash_type() if hashed else None
        args = ["lsjson", "-R", "--files-only", where, *only]
        args += ["--hash-type", kind] if kind else []
        try:
            out = self._run(args, timeout=None)
        except RemoteError as exc:
            if "directory not found" in str(exc).lower():
                return {}
            raise
        return {
            item["Path"]: RemoteFile(
                # An empty value is a hash the remote lacks for that object: unknown, not wrong.
                int(item["Size"]),
                {k.lower(): v for k, v in (item.get("Hashes") or {}).items() if v},
            )
            for item in json.loads(out or "[]")
        }

    def names(self) -> list[str]:
        """Names of the top-level directories (checkpoints, whole or partial) on the remote."""
        try:
            out = self._run(["lsjson", "--dirs-only", self.root])
        except RemoteError as exc:
            if "directory not found" in str(exc).lower():
                return []
            raise
        return [i["Name"] for i in json.loads(out or "[]") if i["Name"] != META_DIR]

    def entries(self) -> dict[str, dict[str, Any]]:
        """The manifest: {checkpoint name: entry}; an unreadable entry counts as absent."""
        try:
            out = self._run(["cat", self.path(MANIFEST_DIR), "--include", "*.json"])
        except RemoteError as exc:
            if "directory not found" in str(exc).lower():
                return {}
            raise
        found = {}
        for line in out.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # an entry torn by a kill: its checkpoint is verified again
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                found[entry["name"]] = entry
        return found

    def write_entry(self, entry: dict[str, Any]) -> None:
        """Record a verified checkpoint (one JSON line, so `entries` reads all in one call)."""
        text = json.dumps(entry, sort_keys=True) + "\n"
        self._run(["rcat", self.path(f"{MANIFEST_DIR}/{entry['name']}.json")], stdin=text)

    def write_entries(self, entries: list[dict[str, Any]], scratch: Path) -> None:
        """`write_entry` for several checkpoints in one `rclone copy` (each entry one object,
        written whole), staged as files in the empty directory `scratch`."""
        if len(entries) == 1:
            self.write_entry(entries[0])
            return
        shutil.rmtree(scratch, ignore_errors=True)  # left by a pass killed here
        scratch.mkdir(parents=True)
        try:
            for entry in entries:
                text = json.dumps(entry, sort_keys=True) + "\n"
                (scratch / f"{entry['name']}.json").write_text(text, encoding="utf-8")
            self._run(["copy", str(scratch), self.path(MANIFEST_DIR)])
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def probe_write(self) -> None:
        """Write and delete a small object: raises RemoteError when the remote rejects writes."""
        rel = f"{META_DIR}/write-probe-{os.getpid()}"
        self._run(["rcat", self.path(rel)], stdin="bootstrap write probe\n")
        self._run(["deletefile", self.path(rel)])

    # -- plumbing --------------------------------------------------------------------------

    def _transfer_flags(self) -> list[str]:
        flags = ["--transfers", str(self.spec.transfers)]
        if self.spec.bwlimit:
            flags += ["--bwlimit", self.spec.bwlimit]
        return flags

    def _run(
        self,
        args: list[str],
        *,
        stdin: str | None = None,
        timeout: float | None = _QUICK_TIMEOUT_S,
        stderr: list[str] | None = None,
    ) -> str:
        if self.rclone is None:
            raise RemoteError(
                "rclone is not installed on the box (a `rclone_copy` step installs it)"
            )
        argv = [*nice_prefix(), self.rclone, *args, "--retries", "2", "--low-level-retries", "3"]
        if self._config:
            argv += ["--config", self._config]
        feed: dict[str, Any] = (
            {"input": stdin} if stdin is not None else {"stdin": subprocess.DEVNULL}
        )
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, env=self.env, **feed
            )
        except subprocess.TimeoutExpired:
            raise RemoteError(f"rclone {args[0]} took longer than {timeout:.0f}s") from None
        except OSError as exc:
            raise RemoteError(f"rclone could not start: {exc}") from None
        if stderr is not None:
            stderr.append(done.stderr)
        if done.returncode != 0:
            raise RemoteError(
                _last_error(done.stderr) or f"rclone {args[0]} exited {done.returncode}"
            )
        out: str = done.stdout
        return out


def _only(names: list[str]) -> list[str]:
    """rclone filter flags that select the top-level directories `names` (and nothing else)."""
    flags = []
    for name in names:
        quoted = "".join("\\" + c if c in "\\*?[]{}" else c for c in name)
        flags += ["--include", f"/{quoted}/**"]
    return flags


def _split(files: dict[str, RemoteFile], names: list[str]) -> dict[str, dict[str, RemoteFile]]:
    """{`name/rel`: file} as {name: {rel: file}} (every name present, maybe empty)."""
    out: dict[str, dict[str, RemoteFile]] = {name: {} for name in names}
    for path, info in files.items():
        head, _, rel = path.partition("/")
        if head in out and rel:
            out[head][rel] = info
    return out


def _last_error(stderr: str) -> str:
    """rclone's most telling error line (its final `Failed to ...`, else the last ERROR)."""
    lines = [
        ln.strip() for ln in stderr.splitlines() if ln.strip() and "NOTICE: Config file" not in ln
    ]
    for marker in ("Failed to", "ERROR", "error"):
        for line in reversed(lines):
            if marker in line:
                return _strip_stamp(line)
    return _strip_stamp(lines[-1]) if lines else ""


def _strip_stamp(line: str) -> str:
    """`2026/12/02 18:08:04 ERROR : x` → `ERROR : x`."""
    parts = line.split(" ", 2)
    if len(parts) == 3 and parts[0].count("/") == 2 and parts[1].count(":") == 2:
        return parts[2]
    return line
