"""Saving a step's outputs to the cache, beside what depends on it.

The runner starts `agent cache-save` detached (its own session, its output to
`steps/<id>/_cache_save.log`) once a cached step ran and verified and the steps cached `with`
it are done too; it never waits for it, so the step's dependents start at once. The saver:

1. does nothing when the key already has an entry (another box filled it);
2. measures the outputs (and the uv-managed interpreter a venv among them points at: a
   restored venv needs it at the same path) and skips, with a warning, past the size limit;
3. streams them as one archive to a temp object (past `SHARD_BYTES`, as shards and their
   directories, a temp object each, which a restore unpacks at once), searching the stream
   for the run's secret values (a hit: nothing is kept);
4. checks the outputs did not change while they were read (a dependent writing into a venv
   would make the archive a mix), and the temp object's size and md5 against what was sent;
5. moves the object into `objects/` and writes the entry last (see `provision.cache.store`).

What happened is in `steps/<id>/_cache_save.json`, which `status` shows.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from provision.agent.files import write_json_atomic
from provision.agent.priority import nice_prefix, yield_to_the_job
from provision.agent.units import human_bytes
from provision.cache.archive import ArchiveError, Codec, Packed, codec_for, pack, shards
from provision.cache.key import expand, walk
from provision.cache.restore import objects_of, short
from provision.cache.store import Store, StoreError

SAVE_FILE = "_cache_save.json"
SAVE_LOG = "_cache_save.log"
#: The size limit when the playbook sets none: a venv of torch + jax is about 8 GB.
DEFAULT_MAX_BYTES = 30 * 10**9
UV_PYTHON_DIR = "~/.local/share/uv/python"
#: Outputs of more than this many bytes per shard (up to MAX_SHARDS) are saved as that many
#: archives, which a restore unpacks at once: `bench/cache_shards.py` measured 4 shards of a
#: 762 MB tree unpacking in 0.69x the time of one archive (2 cores), at the same size.
SHARD_BYTES = 128 * 10**6
MAX_SHARDS = 4
#: Seconds between writing an entry and reading it back (see `Saver._commit`).
SETTLE_S = 2.0


def uv_interpreters(outputs: list[str], env: dict[str, str]) -> list[str]:
    """The uv-managed Python installs the venvs among `outputs` run on (their `home`)."""
    base = os.path.realpath(expand(env.get("UV_PYTHON_INSTALL_DIR") or UV_PYTHON_DIR))
    found: list[str] = []
    for out in outputs:
        try:
            text = Path(out, "pyvenv.cfg").read_text(encoding="utf-8")
        except OSError:
            continue
        for line in text.splitlines():
            name, _, value = line.partition("=")
            if name.strip() != "home":
                continue
            home = os.path.realpath(value.strip())
            if home.startswith(base + os.sep):
                install = os.path.join(base, home[len(base) + 1 :].split(os.sep)[0])
                if install not in found and install not in outputs:
                    found.append(install)
    return found


def signature(paths: list[str]) -> list[tuple[str, int, int, int]]:
    """Every entry under `paths` with its mode, and for files and links their size and mtime.

    A directory's own size and mtime are left out: they change when an entry appears in it,
    which the listing shows anyway, unless it is a skipped one (the `__pycache__` a dependent
    importing from a venv being saved creates is not a change of the outputs)."""
    return [
        (
            f"{p}/{rel}",
            st.st_mode,
            *((0, 0) if stat.S_ISDIR(st.st_mode) else (st.st_size, st.st_mtime_ns)),
        )
        for p in paths
        for rel, st in walk(p)
    ]


def _size_of(paths: list[str]) -> int:
    return sum(st.st_size for p in paths for _, st in walk(p))


class Saver:
    """Saves one step's outputs under its key (see the module doc)."""

    def __init__(
        self,
        step_dir: Path,
        step: dict[str, Any],
        key: str,
        env: dict[str, str],
        replace: bool = False,
    ) -> None:
        self.step_dir = step_dir
        #: The entry there (if any) was unusable, or the step was rerun: write over it.
        self.replace = replace
        self.step = step
        self.key = key
        self.env = env
        cache = step["cache"]
        self.store = Store(cache["remote"], env, cache.get("rclone_config"))
        self.max_bytes = int(cache.get("max_bytes") or DEFAULT_MAX_BYTES)
        self.upload_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def report(self, state: str, reason: str, **extra: Any) -> None:
        """Write what the saver is doing for `status` (and print it to the saver's log)."""
        print(f"cache save {short(self.key)}: {state}: {reason}", flush=True)
        data = {"state": state, "key": self.key, "reason": reason, "at": time.time(), **extra}
        write_json_atomic(self.step_dir / SAVE_FILE, data)

    def run(self, secrets: list[str]) -> str:
        """Save; returns the final state (`saved`, `present`, `skipped`, `failed`)."""
        try:
            return self._run(secrets)
        except (ArchiveError, StoreError, OSError) as exc:
            self.report("failed", f"not saved: {exc}")
            return "failed"

    def _run(self, secrets: list[str]) -> str:
        if not self.replace and self.store.entry(self.key) is not None:
            self.report("present", "already in the cache")
            return "present"
        outputs = [expand(p) for p in self.step.get("outputs") or []]
        missing = [p for p in outputs if not os.path.lexists(p)]
        if missing:
            self.report("skipped", f"not saved: {missing[0]} is missing")
            return "skipped"
        markers = self.markers()
        paths = outputs + uv_interpreters(outputs, self.env)
        size = _size_of(paths) + _size_of([f for files in markers.values() for f in files])
        if size > self.max_bytes:
            self.report(
                "skipped",
                f"not saved: the outputs are {human_bytes(size)}, above the cache's limit of "
                f"{human_bytes(self.max_bytes)} (cache: max_size_gb)",
            )
            return "skipped"
        codec = codec_for(None, self.env)
        if codec is None:
            self.report("skipped", "not saved: neither zstd nor gzip is on the box")
            return "skipped"
        self.report("saving", f"uploading {human_bytes(size)} ({codec.name})")
        return self._upload(paths, markers, size, codec, secrets)

    def markers(self) -> dict[str, list[str]]:
        """The files the unit's kinds keep in their step directories (`uv_sync`'s
        synced.json, `pip_install`'s installed.json: what their checks read), which travel
        with the outputs they describe; the runner's own files (`_*`) do not."""
        steps_dir = self.step_dir.parent
        found: dict[str, list[str]] = {}
        for sid in [self.step["id"], *(self.step["cache"].get("with") or [])]:
            try:
                names = sorted(os.listdir(steps_dir / sid))
            except OSError:
                continue
            files = [
                str(steps_dir / sid / n)
                for n in names
                if not n.startswith(("_", ".")) and (steps_dir / sid / n).is_file()
            ]
            if files:
                found[sid] = files
        return found

    def _upload(
        self,
        paths: list[str],
        markers: dict[str, list[str]],
        size: int,
        codec: Codec,
        secrets: list[str],
    ) -> str:
        started = time.monotonic()
        members = paths + [f for files in markers.values() for f in files]
        before = signature(members)
        parts = _parts(members, size)
        sent: list[str] = []
        try:
            archives: list[dict[str, Any]] = []
            budget = self.max_bytes
            for index, (names, recurse) in enumerate(parts):
                tmp = f"tmp/{self.key}.{self.upload_id}.{index}.partial"
                sent.append(tmp)
                packed = self._send(tmp, names, recurse, codec, budget, secrets)
                budget -= packed.raw_bytes
                archives.append(_archive_fields(packed))
            if signature(members) != before:
                raise ArchiveError("the outputs changed while they were saved")
            names_of = _object_names(self.key, self.upload_id, len(parts), codec)
            for index, (archive_, obj) in enumerate(zip(archives, names_of, strict=True)):
                self._check_sent(sent[index], archive_)
                self.store.move(sent[index], obj)
                sent[index] = obj  # removed, like a temp object, if a later step fails
                archive_["object"] = obj
        except BaseException:
            for rel in sent:
                self.store.delete(rel)
            raise
        entry = {
            "key": self.key,
            "codec": codec.name,
            **_layout(archives),
            "raw_bytes": sum(a["raw_bytes"] for a in archives),
            "packed_bytes": sum(a["packed_bytes"] for a in archives),
            "paths": paths,
            "markers": markers,
            "step": self.step["id"],
            "upload": self.upload_id,
            "host": socket.gethostname(),
            "created": time.time(),
        }
        return self._commit(entry, size, time.monotonic() - started)

    def _send(
        self,
        tmp: str,
        names: list[str],
        recurse: bool,
        codec: Codec,
        budget: int,
        secrets: list[str],
    ) -> Packed:
        """Pack `names` into the temp object `tmp`; the upload ends before this returns."""
        proc = self.store.upload(tmp)
        stdin = proc.stdin
        assert stdin is not None

        def send(chunk: bytes) -> None:
            stdin.write(chunk)

        try:
            try:
                packed = pack(
                    names, send, codec, max_bytes=budget, secrets=secrets, recurse=recurse
                )
            finally:
                stdin.close()
            self.store.finish_upload(proc)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return packed

    def _check_sent(self, tmp: str, archive_: dict[str, Any]) -> None:
        seen = self.store.stat(tmp)
        md5 = (seen or {}).get("hashes", {}).get("md5")
        size_ok = seen is not None and seen["size"] == archive_["packed_bytes"]
        if not size_ok or md5 not in (None, archive_["md5"]):
            raise ArchiveError(f"the uploaded archive is not what was sent ({seen})")

    def _commit(self, entry: dict[str, Any], size: int, seconds: float) -> str:
        """Write the entry unless another box did meanwhile; the loser removes its object.

        Replacing, the entry is written over, and the object the old one named removed."""
        old = self.store.entry(self.key)
        if old is None or self.replace:
            self.store.write_entry(entry)
            # A box that found no entry when this one did writes its own within a call or
            # two: read back after that, so the one overwritten knows it and removes its object.
            time.sleep(SETTLE_S)
        kept = self.store.entry(self.key)
        if kept is None or kept.get("upload") != self.upload_id:
            for obj in objects_of(entry):
                self.store.delete(obj)
            self.report("present", "another box filled this key at the same time")
            return "present"
        if old is not None and objects_of(old) != objects_of(entry):
            for obj in objects_of(old):
                self.store.delete(obj)
        self.report(
            "saved",
            f"saved {human_bytes(size)} as {human_bytes(int(entry['packed_bytes']))} in {seconds:.1f}s",
            packed_bytes=entry["packed_bytes"],
            raw_bytes=entry["raw_bytes"],
            seconds=round(seconds, 3),
        )
        return "saved"


def _parts(members: list[str], size: int) -> list[tuple[list[str], bool]]:
    """What to pack, archive by archive: (paths, recurse). One archive of the members unless
    they are large enough for shards (see `SHARD_BYTES`): then the shards' files and links,
    and their directories last."""
    count = max(1, min(MAX_SHARDS, size // SHARD_BYTES))
    if count > 1:
        runs, dirs = shards(members, count)
        if len(runs) > 1:
            return [*((run, False) for run in runs), (dirs, False)]
    return [(members, True)]


def _object_names(key: str, upload_id: str, count: int, codec: Codec) -> list[str]:
    if count == 1:
        return [f"objects/{key}/{upload_id}.tar.{codec.suffix}"]
    names = [f"objects/{key}/{upload_id}.{i}.tar.{codec.suffix}" for i in range(count - 1)]
    return [*names, f"objects/{key}/{upload_id}.dirs.tar.{codec.suffix}"]


def _archive_fields(packed: Packed) -> dict[str, Any]:
    return {
        "sha256": packed.sha256,
        "md5": packed.md5,
        "raw_bytes": packed.raw_bytes,
        "packed_bytes": packed.packed_bytes,
    }


def _layout(archives: list[dict[str, Any]]) -> dict[str, Any]:
    """The entry's archive fields: one archive as the entry's own `object`, `sha256`, `md5`
    (what every agent reads); shards as `shards` (unpacked at once) and `dirs` (after them)."""
    if len(archives) == 1:
        return {k: archives[0][k] for k in ("object", "sha256", "md5")}
    # `object: null`: an agent from before shards reads it as an object it cannot fetch
    # ("cached copy unusable: ran"), where a missing field would crash it.
    return {"object": None, "sha256": None, "shards": archives[:-1], "dirs": archives[-1]}


def spawn(
    run_dir: Path,
    run_name: str,
    step: dict[str, Any],
    key: str,
    replace: bool,
    env: dict[str, str],
    secrets: list[str],
    argv_prefix: list[str],
) -> None:
    """Start `agent cache-save` for the step, detached: nothing waits for it but a reaper
    thread (a runner that ends first leaves it to finish on its own)."""
    step_dir = run_dir / "steps" / step["id"]
    step_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        step_dir / SAVE_FILE,
        {"state": "queued", "key": key, "reason": "about to save", "at": time.time()},
    )
    with open(step_dir / SAVE_LOG, "ab") as log:
        # Niced (CPU and disk) like the checkpoint uploader, and yielding once started (see
        # `main`): the steps after this one, a training, may be starting.
        proc = subprocess.Popen(
            [*nice_prefix(), *argv_prefix, "cache-save", "--run", run_name, step["id"]],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=os.path.expanduser("~"),
            env=env,
        )
    assert proc.stdin is not None
    try:
        with proc.stdin:
            payload = {"step": step, "key": key, "replace": replace, "secrets": secrets}
            proc.stdin.write(json.dumps(payload).encode())
    except OSError:
        pass  # it died at once: its log says why, and the step is simply not cached
    threading.Thread(target=proc.wait, daemon=True).start()


def main(run_dir: Path, step_id: str, payload: dict[str, Any]) -> int:
    """`agent cache-save`: the payload is {step, key, replace, secrets} from the runner.

    Started in a session of its own, so that the runner ending leaves it running: at the
    lowest priority of that session too, else packing a venv (zstd, tar, rclone) would get as
    much CPU as every step still on the way to step 0 (`provision.agent.priority`)."""
    yield_to_the_job()
    step = payload.get("step")
    if not isinstance(step, dict) or step.get("id") != step_id or not step.get("cache"):
        return 3
    replace = bool(payload.get("replace"))
    saver = Saver(run_dir / "steps" / step_id, step, str(payload["key"]), dict(os.environ), replace)
    saver.run([str(s) for s in payload.get("secrets") or []])
    return 0
