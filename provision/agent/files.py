"""Files on the box: written whole or not at all, read back forgivingly, tails of logs.

The one home of these helpers for the agent, the step kinds, the monitor and the statistics:
standard library only and Python 3.9, like the rest of the agent core (it ships in the zipapp).

Every atomic write goes through `atomic_writer`: a temp file `.NAME.PID.tmp` beside the target,
flushed, fsynced and renamed over it, so a reader never sees half a file and a crash leaves the
old file whole. The temp name carries the writer's PID so `state.remove_stale_temps` can tell
the leftovers of killed writers from live ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

#: The name of `atomic_writer`'s temp file, `.NAME.PID.tmp`: group 1 is the writer's PID.
TEMP_NAME = re.compile(r"^\..+\.(\d+)\.tmp$")
#: How much of a log's end `tail_lines` reads by default.
TAIL_LINES_BYTES = 64 * 1024


@contextlib.contextmanager
def atomic_writer(
    path: Path,
    *,
    binary: bool = False,
    mode: int | None = None,
    parents: bool = False,
    sync_dir: bool = False,
) -> Iterator[IO[Any]]:
    """A file to write that replaces `path` whole when the block ends without an error.

    `mode`: the temp file is created with exactly these permission bits (not the umask's), so a
    private file is never readable by others, not even for a moment. `parents`: create missing
    parent directories. `sync_dir`: fsync the directory too, so the rename survives a power cut.
    On any error the temp file is removed (it may hold the disk space the next attempt needs)
    and `path` is left as it was.
    """
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(fd, mode)  # os.open applied the umask; the exact mode before any byte
        fh: IO[Any] = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")
        with fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if sync_dir:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json_atomic(
    path: Path,
    data: Any,
    *,
    indent: int | None = 1,
    sort_keys: bool = True,
    newline: bool = False,
    mode: int | None = None,
    parents: bool = False,
) -> None:
    """Write `data` as JSON through `atomic_writer` (`newline`: end the file with one)."""
    with atomic_writer(path, mode=mode, parents=parents) as fh:
        json.dump(data, fh, indent=indent, sort_keys=sort_keys)
        if newline:
            fh.write("\n")


def read_json(path: Path, default: Any) -> Any:
    """Read JSON, or `default` when the file is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return default


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """sha256 of a file's bytes (read in 1 MiB blocks), or None when it cannot be read."""
    import hashlib  # only where a file is hashed: OpenSSL's _hashlib costs a process ~5 ms

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def tail_text(path: str | os.PathLike[str], max_bytes: int) -> str:
    """The last `max_bytes` of a file as text, cut at a line start ('' when it is missing).

    Logs can be gigabytes: only their end is read, and the partial line it begins with (when
    the file is longer) is dropped so no pattern matches half a line.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            raw = fh.read()
    except OSError:
        return ""
    if size > max_bytes:
        cut = raw.find(b"\n")
        raw = raw[cut + 1 :] if cut >= 0 else raw
    return raw.decode("utf-8", "replace")


def tail_lines(
    path: str | os.PathLike[str], count: int, max_bytes: int = TAIL_LINES_BYTES
) -> list[str]:
    """The last `count` non-blank lines of a log as a terminal shows them ([] when missing).

    Progress bars redraw a line with carriage returns: each line is its last drawing, not one
    line per redraw (which would fill the tail with stale percentages).
    """
    if count <= 0:
        return []
    shown = [last_drawn(line) for line in tail_text(path, max_bytes).split("\n")]
    return [line for line in shown if line.strip()][-count:]


def last_drawn(line: str) -> str:
    """The last non-blank part of a line redrawn with `\\r` ('' when all are blank)."""
    drawn = [part for part in line.split("\r") if part.strip()]
    return drawn[-1] if drawn else ""
