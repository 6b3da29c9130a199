"""A step's outputs as one compressed tar stream, and back.

GNU tar (every box has it) writes the stream: it keeps symlinks, modes, owners and hard links
and is several times faster than Python's `tarfile` on a venv's 100k small files. The stream
runs through this process on its way to the compressor, which lets it be measured, bounded
(`max_bytes`: the save stops as soon as the outputs pass it) and searched for the run's secret
values (a hit stops the save: a secret never reaches the bucket). The compressor is the `zstd`
binary at the level `bench/cache_archive.py` chose (multithreaded: a box's cores are idle while
a step is saved or restored); a box without zstd writes gzip, which every box can read back.

A large tree is written as several archives (`shards`): the sorted listing cut into runs of
about equal bytes, and its directories in one more archive, so a restore can unpack them all
at once (`bench/cache_shards.py`: 4 shards unpack in 0.69x the time of one on 2 cores, at the
same compressed size); tar is one process writing one file after another.

The compressed stream is hashed (sha256 and md5: rclone and GCS know md5) on its way to the
sink, so a restore can tell a corrupt or truncated archive before anything is put in place.
Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO

from provision.cache.key import SKIP_DIRS, walk

#: zstd's level and flags: see bench/cache_archive.py for the figures behind the choice.
ZSTD_LEVEL = 3
CHUNK = 1 << 20


class ArchiveError(Exception):
    """The archive could not be written or read; the message says why, in one line."""


class SecretInOutputs(ArchiveError):
    """One of the run's secret values is in the outputs: they are not saved."""


class TooLarge(ArchiveError):
    """The outputs are larger than the cache's size limit."""


@dataclass(frozen=True)
class Codec:
    """A compressor the box has: its name in manifests and the commands that run it."""

    name: str
    suffix: str
    compress: tuple[str, ...]
    decompress: tuple[str, ...]


def codec_for(name: str | None = None, env: dict[str, str] | None = None) -> Codec | None:
    """The codec called `name` (None: the best this box has), or None when the box lacks it."""
    path = (env or os.environ).get("PATH", os.defpath)
    zstd = shutil.which("zstd", path=path)
    gzip = shutil.which("gzip", path=path)
    codecs = []
    if zstd:
        codecs.append(
            Codec(
                "zstd", "zst", (zstd, f"-{ZSTD_LEVEL}", "-T0", "-q", "-c"), (zstd, "-d", "-q", "-c")
            )
        )
    if gzip:
        codecs.append(Codec("gzip", "gz", (gzip, "-1", "-c"), (gzip, "-d", "-c")))
    for codec in codecs:
        if name is None or codec.name == name:
            return codec
    return None


@dataclass(frozen=True)
class Packed:
    """What `pack` wrote (or `unpack` read): the tar's size, the compressed size and the
    compressed hashes (`unpack` computes no md5: "")."""

    raw_bytes: int
    packed_bytes: int
    sha256: str
    md5: str


class _Digest:
    """sha256 (what a restore checks) and, for a save, md5 (what buckets report)."""

    def __init__(self, md5: bool = True) -> None:
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5() if md5 else None
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        if self.md5 is not None:
            self.md5.update(chunk)
        self.size += len(chunk)

    def md5_hex(self) -> str:
        return self.md5.hexdigest() if self.md5 is not None else ""


def _tar_paths(paths: Iterable[str]) -> list[str]:
    """Absolute paths as members relative to `/` (tar then names them without the slash)."""
    return [os.path.abspath(p).lstrip("/") or "." for p in paths]


def shards(paths: list[str], count: int) -> tuple[list[list[str]], list[str]]:
    """The files and links under `paths` (absolute, SKIP_DIRS left out) as at most `count`
    lists, runs of the sorted listing with about equal bytes (an inode's hard links all in the
    run of its first name, so each archive can make its links), and the directories."""
    entries = [
        (os.path.join(root, rel) if rel else root, st) for root in paths for rel, st in walk(root)
    ]
    dirs = [path for path, st in entries if stat.S_ISDIR(st.st_mode)]
    files = [(path, st) for path, st in entries if not stat.S_ISDIR(st.st_mode)]
    total = sum(st.st_size for _, st in files) or 1
    runs: list[list[str]] = [[] for _ in range(max(1, count))]
    first: dict[tuple[int, int], int] = {}
    done = 0
    for path, st in files:
        index = first.setdefault(
            (st.st_dev, st.st_ino), min(len(runs) - 1, done * len(runs) // total)
        )
        runs[index].append(path)
        done += st.st_size
    return [run for run in runs if run], dirs


def pack(
    paths: list[str],
    sink: Callable[[bytes], object],
    codec: Codec,
    *,
    max_bytes: int | None = None,
    secrets: Iterable[str] = (),
    recurse: bool = True,
) -> Packed:
    """Write `paths` (absolute) as one compressed tar into `sink`, chunk by chunk; with
    `recurse=False`, exactly those entries (a directory without what it holds: `shards`).

    Raises TooLarge past `max_bytes` of tar, SecretInOutputs when a secret value is in the
    stream, ArchiveError when tar or the compressor fails (a file that changed as tar read it
    is a failure: the archive would not be what the step made).
    """
    with tempfile.TemporaryFile() as names:
        if recurse:
            selection = [*(f"--exclude={d}" for d in SKIP_DIRS), *_tar_paths(paths)]
        else:
            # NUL-separated: a name may hold a newline. A file, not tar's stdin, which would
            # deadlock against its stdout once the list outgrows a pipe's buffer.
            names.write(b"".join(p.encode() + b"\0" for p in _tar_paths(paths)))
            names.flush()
            names.seek(0)
            selection = ["--no-recursion", "--null", "-T", "-"]
        return _pack(selection, names, sink, codec, max_bytes, secrets)


def _pack(
    selection: list[str],
    names: IO[bytes],
    sink: Callable[[bytes], object],
    codec: Codec,
    max_bytes: int | None,
    secrets: Iterable[str],
) -> Packed:
    tar = subprocess.Popen(
        ["tar", "-c", "-f", "-", "--numeric-owner", "-C", "/", *selection],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=names,
    )
    comp = subprocess.Popen(
        list(codec.compress),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    feeder = _Feeder(tar.stdout, comp.stdin, max_bytes, [s.encode() for s in secrets if s])
    thread = threading.Thread(target=feeder.run, daemon=True)
    thread.start()
    digest = _Digest()
    assert comp.stdout is not None
    try:
        for chunk in iter(lambda: comp.stdout.read(CHUNK), b""):  # type: ignore[union-attr]
            digest.update(chunk)
            sink(chunk)
    except BaseException:
        feeder.stop = True
        _end(tar)
        _end(comp)
        raise
    finally:
        thread.join()
        comp.stdout.close()
    tar_err = (tar.stderr.read() if tar.stderr else b"").decode("utf-8", "replace").strip()
    tar_rc, comp_rc = tar.wait(), comp.wait()
    if feeder.error is not None:
        raise feeder.error
    if tar_rc != 0:
        raise ArchiveError(f"tar failed (rc={tar_rc}): {_last_line(tar_err)}")
    if comp_rc != 0:
        raise ArchiveError(f"{codec.name} failed (rc={comp_rc})")
    return Packed(feeder.size, digest.size, digest.sha256.hexdigest(), digest.md5_hex())


class _Feeder:
    """Copies tar's stdout to the compressor, counting and searching what passes."""

    def __init__(
        self, src: IO[bytes] | None, dst: IO[bytes] | None, limit: int | None, needles: list[bytes]
    ) -> None:
        assert src is not None and dst is not None
        self.src, self.dst, self.limit, self.needles = src, dst, limit, needles
        self.keep = max((len(n) for n in needles), default=1) - 1
        self.size = 0
        self.error: ArchiveError | None = None
        self.stop = False

    def run(self) -> None:
        tail = b""
        try:
            for chunk in iter(lambda: self.src.read(CHUNK), b""):
                if self.stop:
                    return
                self.size += len(chunk)
                if self.limit is not None and self.size > self.limit:
                    self.error = TooLarge(f"the outputs pass the cache's limit of {self.limit} B")
                    return
                window = tail + chunk
                if any(n in window for n in self.needles):
                    self.error = SecretInOutputs("a secret's value is in the outputs")
                    return
                tail = window[-self.keep :] if self.keep else b""
                self.dst.write(chunk)
        except OSError as exc:
            self.error = ArchiveError(f"writing to the compressor: {exc}")
        finally:
            # Closing ends the compressor's input; when the feed stopped early, the main
            # thread then sees a short stream and the error above, never a "good" archive.
            with contextlib.suppress(OSError):
                self.dst.close()
            with contextlib.suppress(OSError):
                self.src.close()


def unpack(
    chunks: Iterable[bytes], dest: str, codec: Codec, expect_sha256: str | None = None
) -> Packed:
    """Extract a compressed tar read from `chunks` into directory `dest`; raises ArchiveError
    when the stream's sha256 is not `expect_sha256`, or the stream does not decompress."""
    os.makedirs(dest, exist_ok=True)
    comp = subprocess.Popen(
        list(codec.decompress),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    tar = subprocess.Popen(
        ["tar", "-x", "-f", "-", "--numeric-owner", "-C", dest],
        stdin=comp.stdout,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert comp.stdin is not None and comp.stdout is not None
    comp.stdout.close()  # tar holds it now
    digest = _Digest(md5=False)  # a restore checks the sha256 alone: md5 is CPU on its path
    try:
        for chunk in chunks:
            digest.update(chunk)
            comp.stdin.write(chunk)
    except BrokenPipeError:
        pass  # the decompressor gave up: its exit code says why
    except BaseException:
        _end(comp)
        _end(tar)
        raise
    finally:
        with contextlib.suppress(OSError):
            comp.stdin.close()
    comp_err = (comp.stderr.read() if comp.stderr else b"").decode("utf-8", "replace")
    tar_err = (tar.stderr.read() if tar.stderr else b"").decode("utf-8", "replace")
    comp_rc, tar_rc = comp.wait(), tar.wait()
    sha = digest.sha256.hexdigest()
    if expect_sha256 is not None and sha != expect_sha256:
        raise ArchiveError(
            f"the archive's sha256 is {sha[:12]}, its manifest says {expect_sha256[:12]} "
            f"({digest.size} B read): corrupt or truncated"
        )
    if comp_rc != 0:
        raise ArchiveError(f"{codec.name} -d failed: {_last_line(comp_err)}")
    if tar_rc != 0:
        raise ArchiveError(f"tar -x failed: {_last_line(tar_err)}")
    return Packed(0, digest.size, sha, "")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def _end(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        proc.kill()
    proc.wait()
