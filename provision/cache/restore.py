"""Restoring a cached step on the box, in its `agent exec` before it would run.

The plan carries, for a step with `cache:` and a remote, a `cache` object (see
`provision.playbook`): the remote, the size limit, the unit (`with`), and the graph of the
steps its key depends on. `agent exec` computes the key here, before anything runs (the
saver later uses that same key, even if the step changed its own inputs), looks it up, and
when the bucket has an entry, streams the archive into a staging directory beside the
outputs (a sharded entry's archives side by side, its directories last), checks each sha256,
and moves the outputs into place. The caller then verifies the
step exactly as after a run; if that fails, it runs the step.

A miss, an unreachable bucket, a corrupt archive: the step runs, with the reason said.

**Fetched ahead.** The runner may fetch a cached step's entry before the step can start
(`fetch_ahead`, provision/agent/ahead.py: its key is final while its needs are still being
restored or run), into a staging directory of its own beside the outputs,
`.bootstrap-ahead-<step>`, whose marker file (written last, atomically) names the key and the
entry. The step's `restore` then only puts that copy in place, when the marker's key is the one
it computes now; any other copy there is removed and the step restores (or runs) as without.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provision.agent.units import human_bytes
from provision.cache.archive import ArchiveError, Codec, codec_for, unpack
from provision.cache.key import Probe, expand, is_implicit, step_key
from provision.cache.store import Store, StoreError

#: Where a run keeps what the cache knows about its steps: `steps/<id>/_cache.json`.
CACHE_FILE = "_cache.json"
HASHES_FILE = "cache-hashes.json"
#: In a fetched-ahead staging directory: {key, entry}, written once every archive is in.
AHEAD_MARKER = ".bootstrap-ahead.json"
#: A restore's progress message while its archives' bytes arrive (`status` shows the bar; the
#: runner's fetches ahead wait for the link until the bytes are in: provision/agent/ahead.py).
RECEIVING = "receiving from the step cache"
#: Seconds between two progress reports of a restore.
REPORT_S = 0.5

#: A restore's progress: (bytes received, bytes in all, bytes per second).
Report = Callable[[int, int, float], None]


@dataclass(frozen=True)
class Attempt:
    """How a restore went: `restored` (then verify it), else why the step must run."""

    key: str | None
    restored: bool
    reason: str
    seconds: float = 0.0
    packed_bytes: int = 0
    #: The bucket has an entry for the key (restored, or found unusable).
    found: bool = False


def short(key: str) -> str:
    """The key as `plan` and `status` print it."""
    return key[:16]


def compute_key(run_dir: Path, step: dict[str, Any]) -> str:
    """The step's cache key on this box (file digests remembered in the run directory)."""
    probe = Probe(run_dir / HASHES_FILE)
    try:
        return step_key(step["id"], step["cache"]["graph"], probe)
    finally:
        probe.save()


def restore(
    run_dir: Path, step: dict[str, Any], env: dict[str, str], report: Report | None = None
) -> Attempt:
    """Compute the key and put the cached outputs in place when the bucket has them (or when
    the runner fetched them ahead for this key); `report` hears how the bytes arrive."""
    cache = step["cache"]
    try:
        key = compute_key(run_dir, step)
    except OSError as exc:
        drop_ahead(step)
        return Attempt(None, False, f"cache key unknown ({exc.strerror or exc}): ran")
    outputs = [expand(p) for p in step.get("outputs") or []]
    started = time.monotonic()
    ahead = take_ahead(step, key)
    if ahead is not None:
        return _place_ahead(step, key, ahead, outputs, run_dir / "steps", started)
    store = Store(cache["remote"], env, cache.get("rclone_config"))
    try:
        entry = store.entry(key)
    except StoreError as exc:
        return Attempt(key, False, f"cache unreachable ({exc}): ran")
    if entry is None:
        return Attempt(key, False, f"cache miss: key {short(key)}")
    codec = codec_for(str(entry.get("codec")), env)
    if codec is None:
        reason = f"cache entry is {entry.get('codec')}, not on this box: ran"
        return Attempt(key, False, reason)
    try:
        place(store, entry, outputs, run_dir / "steps", report)
    except (ArchiveError, StoreError, OSError) as exc:
        return Attempt(key, False, f"cached copy unusable ({exc}): ran", found=True)
    packed = int(entry.get("packed_bytes", 0))
    return Attempt(
        key,
        True,
        f"restored from cache (key {short(key)}, {human_bytes(packed)} "
        f"in {time.monotonic() - started:.1f}s)",
        time.monotonic() - started,
        packed,
        found=True,
    )


def _place_ahead(
    step: dict[str, Any],
    key: str,
    entry: dict[str, Any],
    outputs: list[str],
    steps_dir: Path,
    started: float,
) -> Attempt:
    staging = ahead_dir(step)
    try:
        put_in_place(staging, entry, outputs, steps_dir)
    except (ArchiveError, OSError) as exc:
        return Attempt(key, False, f"cached copy unusable ({exc}): ran", found=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    packed = int(entry.get("packed_bytes", 0))
    return Attempt(
        key,
        True,
        f"restored from cache (key {short(key)}, {human_bytes(packed)} fetched ahead, "
        f"placed in {time.monotonic() - started:.1f}s)",
        time.monotonic() - started,
        packed,
        found=True,
    )


# ----------------------------------------------------------------------- fetched ahead


def ahead_dir(step: dict[str, Any]) -> str:
    """Where the runner fetches `step`'s entry ahead of it: beside its first output (the
    same filesystem, so putting it in place is a rename)."""
    outputs = [expand(p) for p in step.get("outputs") or []]
    return os.path.join(os.path.dirname(outputs[0]), f".bootstrap-ahead-{step['id']}")


def fetch_ahead(
    run_dir: Path, step: dict[str, Any], env: dict[str, str], stop: threading.Event
) -> str:
    """Fetch the entry of `step`'s key into its `ahead_dir` and mark it complete; what
    happened, in words (a miss, an error: nothing is left there). `stop` set: give up."""
    staging = ahead_dir(step)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        key = compute_key(run_dir, step)
        cache = step["cache"]
        store = Store(cache["remote"], env, cache.get("rclone_config"))
        entry = store.entry(key)
        if entry is None:
            return f"cache miss: key {short(key)}"
        codec = codec_for(str(entry.get("codec")), env)
        if codec is None:
            return f"cache entry is {entry.get('codec')}, not on this box"
        _check_paths(entry, [expand(p) for p in step.get("outputs") or []])
        started = time.monotonic()
        fetch(store, entry, staging, codec, Meter(0, stop=stop))
        with open(os.path.join(staging, AHEAD_MARKER + ".tmp"), "w", encoding="utf-8") as f:
            json.dump({"key": key, "entry": entry}, f)
        os.replace(os.path.join(staging, AHEAD_MARKER + ".tmp"), _marker(staging))
    except (ArchiveError, StoreError, OSError, Stopped) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        return f"not fetched ahead ({exc})"
    packed = int(entry.get("packed_bytes", 0))
    return (
        f"fetched ahead (key {short(key)}, {human_bytes(packed)} "
        f"in {time.monotonic() - started:.1f}s)"
    )


def take_ahead(step: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The entry fetched ahead for `key`, complete, in `ahead_dir`; None (and whatever is
    there removed) when there is none for this key."""
    if not step.get("outputs"):
        return None
    staging = ahead_dir(step)
    try:
        with open(_marker(staging), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        marker = None
    if (
        isinstance(marker, dict)
        and marker.get("key") == key
        and isinstance(marker.get("entry"), dict)
    ):
        return dict(marker["entry"])
    shutil.rmtree(staging, ignore_errors=True)
    return None


def drop_ahead(step: dict[str, Any]) -> None:
    """Remove what was fetched ahead for `step`, if anything (the run ends without it)."""
    if step.get("outputs"):
        shutil.rmtree(ahead_dir(step), ignore_errors=True)


def _marker(staging: str) -> str:
    return os.path.join(staging, AHEAD_MARKER)


class Stopped(Exception):
    """A fetch ahead was told to stop (its runner is ending)."""


def preview(run_dir: Path, step: dict[str, Any], env: dict[str, str], will_run: set[str]) -> str:
    """What `plan` says of a cached step that would run: a hit, a miss, or why it cannot tell."""
    graph = step["cache"]["graph"]
    pending = sorted(s for s in graph if s in will_run and s != step["id"] and not is_implicit(s))
    if pending:
        return f"cache: the key is known once {', '.join(pending)} ran"
    try:
        key = compute_key(run_dir, step)
        entry = Store(step["cache"]["remote"], env, step["cache"].get("rclone_config")).entry(key)
    except (OSError, StoreError) as exc:
        return f"cache unreachable ({exc})"
    if entry is None:
        return f"cache miss: key {short(key)}"
    return (
        f"cache hit: restores key {short(key)} ({human_bytes(int(entry.get('packed_bytes', 0)))})"
    )


def place(
    store: Store,
    entry: dict[str, Any],
    outputs: list[str],
    steps_dir: Path | None = None,
    report: Report | None = None,
) -> None:
    """Fetch the entry's archives into a staging directory beside the first output and
    `put_in_place` what they hold."""
    paths = _check_paths(entry, outputs)
    parent = os.path.dirname(outputs[0]) if outputs else os.path.dirname(paths[0])
    staging = os.path.join(parent, f".bootstrap-restore-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        codec = codec_for(str(entry["codec"]))
        assert codec is not None  # checked by the caller
        fetch(store, entry, staging, codec, Meter(int(entry.get("packed_bytes", 0)), report))
        put_in_place(staging, entry, outputs, steps_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch(
    store: Store, entry: dict[str, Any], staging: str, codec: Codec, meter: Meter | None = None
) -> None:
    """Download and unpack every archive of the entry into `staging`, each checked against its
    sha256 (a sharded entry's directories last), the bytes counted by `meter`."""
    os.makedirs(staging, exist_ok=True)
    together, last = archives_of(entry)
    meter = meter or Meter(0)
    _unpack_at_once(store, together, staging, codec, meter)
    _unpack_at_once(store, last, staging, codec, meter)


class Meter:
    """The bytes of an entry's archives as they arrive (threads: one per archive): told to
    `report` at most every REPORT_S and when all are in; with `stop` set, the next chunk
    raises Stopped (the unpack then ends its decompressor and tar, and closing the download
    ends its rclone)."""

    def __init__(
        self, total: int, report: Report | None = None, stop: threading.Event | None = None
    ) -> None:
        self.total, self.report, self.stop = total, report, stop
        self.done = 0
        self.started = self.reported = time.monotonic()
        self.lock = threading.Lock()

    def chunks(self, source: Generator[bytes, None, None]) -> Iterator[bytes]:
        """`source`'s chunks, counted."""
        try:
            for chunk in source:
                if self.stop is not None and self.stop.is_set():
                    raise Stopped("its runner is ending")
                self._add(len(chunk))
                yield chunk
        finally:
            with contextlib.suppress(StoreError):  # an rclone ended early says so: not the point
                source.close()

    def _add(self, size: int) -> None:
        with self.lock:
            self.done += size
            now = time.monotonic()
            if self.report is None or (now - self.reported < REPORT_S and self.done < self.total):
                return
            self.reported = now
            self.report(self.done, self.total, self.done / max(now - self.started, 1e-3))


def put_in_place(
    staging: str, entry: dict[str, Any], outputs: list[str], steps_dir: Path | None = None
) -> None:
    """Move every path of the entry from `staging` into place.

    Paths the entry adds to the step's outputs (a uv-managed interpreter a venv points at)
    are put in place only where the box has none: that is the same interpreter already. The
    unit's kinds' markers go into this run's step directories (`steps_dir`), wherever the
    saving box kept its own.
    """
    for path in _check_paths(entry, outputs):
        staged = os.path.join(staging, path.lstrip("/"))
        if not os.path.lexists(staged):
            raise ArchiveError(f"the archive lacks {path}")
        if path not in outputs and os.path.lexists(path):
            continue
        _replace(staged, path)
    if steps_dir is not None:
        _place_markers(staging, entry.get("markers") or {}, steps_dir)


def _check_paths(entry: dict[str, Any], outputs: list[str]) -> list[str]:
    """The entry's paths; ArchiveError when they do not hold all the step's outputs."""
    paths = [str(p) for p in entry.get("paths") or []]
    if not paths or not set(outputs) <= set(paths):
        raise ArchiveError("the entry does not hold the step's outputs")
    return paths


def archives_of(entry: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The entry's archives ({object, sha256, ...}): those unpacked at once, then those after
    them (a sharded entry's directories, whose modes and times the shards' files would
    change). An entry of one archive names it itself."""
    if "shards" in entry:
        return list(entry["shards"]), [entry["dirs"]]
    return [{"object": entry["object"], "sha256": entry["sha256"]}], []


def objects_of(entry: dict[str, Any]) -> list[str]:
    """Every object the entry names, in the bucket's paths."""
    together, last = archives_of(entry)
    return [str(a["object"]) for a in together + last]


def _unpack_at_once(
    store: Store, archives: list[dict[str, Any]], staging: str, codec: Codec, meter: Meter
) -> None:
    """Download and unpack `archives` into `staging` side by side (a thread each: the work is
    in rclone, the decompressor and tar); the first failure, once all have ended."""
    errors: list[BaseException] = []

    def one(archive: dict[str, Any]) -> None:
        try:
            chunks = meter.chunks(store.download(str(archive["object"])))
            unpack(chunks, staging, codec, str(archive["sha256"]))
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(a,), daemon=True) for a in archives[1:]]
    for thread in threads:
        thread.start()
    if archives:
        one(archives[0])
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def _place_markers(staging: str, markers: dict[str, list[str]], steps_dir: Path) -> None:
    for sid, files in markers.items():
        os.makedirs(steps_dir / sid, exist_ok=True)
        for saved in files:
            staged = os.path.join(staging, str(saved).lstrip("/"))
            if os.path.isfile(staged):
                os.replace(staged, steps_dir / sid / os.path.basename(saved))


def _replace(staged: str, path: str) -> None:
    """Put `staged` at `path`, the old `path` (if any) renamed away first and then removed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    old = f"{path}.bootstrap-old-{os.getpid()}"
    had = os.path.lexists(path)
    if had:
        os.rename(path, old)
    try:
        try:
            os.rename(staged, path)
        except OSError:
            shutil.move(staged, path)  # another filesystem than the staging directory
    except OSError:
        if had:
            os.rename(old, path)
        raise
    if had:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(old)
