"""`gcs_download`: download every object under a `gs://` prefix, in parallel and resumably.

**Where files land.** As `gsutil cp -r SRC DEST` does, the last component of `src` is kept:
`src: gs://openpi-assets/checkpoints/pi05_base` with `dest: /workspace/models/pi05_base_jax`
gives `/workspace/models/pi05_base_jax/pi05_base/params/...` (the layout RUNBOOK A expects).
With a trailing slash (`gs://openpi-assets/checkpoints/pi05_base/`) the prefix's contents go
straight into `dest` (`.../pi05_base_jax/params/...`). The step owns `dest` as a whole.

- **Run**: lists the objects, then downloads into `DEST.partial/` and renames it to `dest` once
  every object is there. Objects already present (in `DEST.partial/`, or in `dest` from an
  earlier download) with the listed size and crc32c are kept, so an interrupted download resumes
  where it stopped and a corrupted file is fetched again. Objects over `chunked_above_mib` are
  fetched one after the other, each in `workers` parallel ranges
  (`transfer_manager.download_chunks_concurrently`), the rest `workers` at a time
  (`transfer_manager.download_many`). The client checks every object's checksum; per-object
  errors fail the step with the object names. Progress is reported in bytes.
  Both use threads, not processes: the client spends about 1.2 CPU-seconds per GB holding the
  GIL, so one process keeps up with ~800 MB/s, more than the 200-500 MiB/s the RUNBOOK measured
  from GCS; process workers fork a fresh pool for every object (4x slower than threads on
  100 MB objects on the 2-core test machine) and fork a process that is running threads.
- **Done** when the manifest recorded after the last verified download lists files that are
  all present in `dest` with their sizes (stat only, no network).
- **Verify**: every object's file has its size, then the `expect:` checks (paths relative to
  `dest`, see `provision/steps/common/expect.py`).

Public buckets need no credentials (`anonymous: true`, the default); with `anonymous: false` the
box's application-default credentials are used. `endpoint` points the client at another server
(the GCS emulator in tests). For an https endpoint with a private CA, set `REQUESTS_CA_BUNDLE`
in the step's `env`: requests ignores any other verify setting while that variable is set.

Example (RUNBOOK A, ckpt):

```yaml
- id: ckpt
  kind: gcs_download
  src: gs://openpi-assets/checkpoints/pi05_base
  dest: /workspace/models/pi05_base_jax
  workers: 16
  expect:
    - {path: "pi05_base/params/commit_success.txt", exists: true}
    - {path: "pi05_base/params", contains: ["ocdbt.process_0"]}
```
"""

from __future__ import annotations

import base64
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from provision.agent.files import read_json, write_json_atomic
from provision.errors import StepFailed
from provision.steps.base import Check, Kind, Param, ParamError, StepContext
from provision.steps.common import expect, manifest

_SRC = re.compile(r"^gs://([a-z0-9][a-z0-9._-]{1,220}[a-z0-9])(/.*)?$")
#: The object list of the last run, turned into the manifest once verified.
_LISTING = "listing.json"
#: Suffix of a chunked download in flight: renamed to the object's name once it is whole.
_CHUNKS_SUFFIX = ".bootstrap-chunks"
_MIB = 1 << 20
#: Range size of a chunked download: small enough that all workers get several, capped so a
#: retried range costs little.
_MIN_CHUNK = 1 * _MIB
_MAX_CHUNK = 32 * _MIB
#: How many failed objects a failure message names.
_SHOWN = 5


class GcsDownload(Kind):
    """Parallel, resumable download of a GCS prefix into a local directory."""

    name = "gcs_download"
    summary = "download a gs:// prefix in parallel, resumably (done while every file is there)"
    receives = True
    pip = ("google-cloud-storage",)
    params = (
        Param(
            "src", "str", "gs://bucket/prefix (no trailing /: its last part is kept)", required=True
        ),
        Param("dest", "path", "local directory on the box for the objects", required=True),
        Param("workers", "int", "parallel downloads (threads)", default=16),
        Param("endpoint", "str", "API endpoint, e.g. http://127.0.0.1:9023 (the emulator)"),
        Param("anonymous", "bool", "no credentials (public buckets)", default=True),
        Param("chunked_above_mib", "int", "objects over this download in ranges", default=64),
        Param(
            "expect",
            "list",
            "checks under dest afterwards: {path, exists|entries|contains}",
            default=[],
        ),
    )

    def validate(self, params: dict[str, Any]) -> None:
        if not _SRC.match(params["src"]):
            raise ParamError("'src' must look like gs://bucket/prefix", "src")
        if ".." in PurePosixPath(_split(params["src"])[1]).parts:
            raise ParamError("'src' must not contain '..'", "src")
        manifest.validate_local_dir(params["dest"], "dest")
        if params["dest"].rstrip("/") in ("", "~"):
            raise ParamError("'dest' must be a directory of its own, not / or ~", "dest")
        for key in ("workers", "chunked_above_mib"):
            if params[key] < 1:
                raise ParamError(f"'{key}' must be at least 1", key)
        endpoint = params["endpoint"]
        if endpoint is not None and not re.match(r"^https?://[^/\s]+/?$", endpoint):
            raise ParamError("'endpoint' must look like http://HOST:PORT", "endpoint")
        expect.validate_expect(params["expect"])

    def describe(self, params: dict[str, Any]) -> str:
        via = f" via {params['endpoint']}" if params["endpoint"] else ""
        return f"download {params['src']} -> {params['dest']} ({params['workers']} workers{via})"

    def check(self, ctx: StepContext) -> Check:
        return manifest.check(ctx, ctx.params["src"], ctx.path(ctx.params["dest"]))

    def run(self, ctx: StepContext) -> None:
        manifest.forget(ctx)
        dest = ctx.path(ctx.params["dest"])
        partial = dest.with_name(dest.name + ".partial")
        client = _client(ctx.params)
        objects = _list_objects(client, ctx.params["src"])
        _take_over(dest, partial, ctx)
        ctx.progress(message=f"checking local copies of {len(objects)} objects")
        todo = [o for o in objects if not _present(partial / o.rel, o)]
        kept = len(objects) - len(todo)
        if kept:
            ctx.log(f"{kept} of {len(objects)} objects already present with their checksums")
        with _Progress(ctx, partial, objects, todo):
            errors = _download(ctx, client, partial, todo)
        if errors:
            names = [f"{name} ({why})" for name, why in errors[:_SHOWN]]
            more = f", ... ({len(errors) - _SHOWN} more)" if len(errors) > _SHOWN else ""
            raise StepFailed(
                f"{len(errors)} of {len(todo)} objects failed: " + ", ".join(names) + more,
                hint=f"a rerun keeps the {len(todo) - len(errors) + kept} objects already in "
                f"{partial} and fetches only the rest",
            )
        wrong = [o.name for o in objects if not _has_size(partial / o.rel, o.size)]
        if wrong:
            raise StepFailed(f"downloaded files have the wrong size: {', '.join(wrong[:_SHOWN])}")
        os.rename(partial, dest)
        _write_listing(ctx, dest, objects)
        ctx.log(f"{len(objects)} objects in {dest}")

    def verify(self, ctx: StepContext) -> None:
        dest = ctx.path(ctx.params["dest"])
        listing = read_json(ctx.workdir / _LISTING, None)
        if not isinstance(listing, dict) or listing.get("src") != ctx.params["src"]:
            raise StepFailed(f"no listing of {ctx.params['src']} was recorded by the run")
        files: dict[str, int] = listing["files"]
        wrong = [rel for rel, size in files.items() if not _has_size(dest / rel, size)]
        if wrong:
            raise StepFailed(
                f"{len(wrong)} of {len(files)} files missing or of the wrong size in {dest}: "
                + ", ".join(wrong[:_SHOWN])
            )
        failures = expect.failed_expectations(dest, ctx.params["expect"])
        if failures:
            raise StepFailed("expect: " + "; ".join(failures))
        manifest.record(ctx, ctx.params["src"], dest, files, objects=listing["objects"])


@dataclass(frozen=True)
class _Object:
    """One object to fetch: its blob, name, size, crc32c (base64, or None) and local path."""

    blob: Any
    name: str
    size: int
    crc32c: str | None
    rel: str


def _split(src: str) -> tuple[str, str]:
    """gs://bucket/a/b -> ("bucket", "a/b")."""
    bucket, _, prefix = src[len("gs://") :].partition("/")
    return bucket, prefix


def _client(params: dict[str, Any]) -> Any:
    import google.auth
    from google.auth.credentials import AnonymousCredentials, Credentials
    from google.auth.exceptions import DefaultCredentialsError
    from google.auth.transport.requests import AuthorizedSession
    from google.cloud import storage
    from requests.adapters import HTTPAdapter

    credentials: Credentials
    project: str | None = None
    if params["anonymous"]:
        credentials = AnonymousCredentials()
    else:
        try:
            credentials, project = google.auth.default(scopes=storage.Client.SCOPE)
        except DefaultCredentialsError as exc:
            raise StepFailed(
                f"no Google credentials on the box: {exc}",
                hint="use `anonymous: true` for a public bucket, or set up "
                "application-default credentials on the box",
            ) from None
    # requests keeps 10 connections per host: with more workers, urllib3 drops the surplus
    # after every request and the next download pays for a new TLS connection.
    session = AuthorizedSession(credentials)
    adapter = HTTPAdapter(pool_maxsize=max(10, params["workers"]))
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    options = {"api_endpoint": params["endpoint"].rstrip("/")} if params["endpoint"] else None
    return storage.Client(
        project=project or "<none>", credentials=credentials, _http=session, client_options=options
    )


def _list_objects(client: Any, src: str) -> list[_Object]:
    """Every object under the prefix, with the path it gets under dest."""
    from google.api_core import exceptions

    bucket, prefix = _split(src)
    listed = prefix.rstrip("/") + "/" if prefix.strip("/") else ""
    # Keep the prefix's last component unless src ends with "/" (gsutil cp -r semantics).
    strip = (
        listed if src.endswith("/") or not listed else listed[: listed.rstrip("/").rfind("/") + 1]
    )
    try:
        blobs = [b for b in client.list_blobs(bucket, prefix=listed) if not b.name.endswith("/")]
    except exceptions.GoogleAPICallError as exc:
        raise StepFailed(f"cannot list {src}: {exc.message}", hint=_access_hint(src)) from None
    if not blobs:
        raise StepFailed(f"no objects under {src}", hint=f"check the path: `gsutil ls {src}`")
    objects = []
    for blob in blobs:
        rel = blob.name[len(strip) :]
        parts = PurePosixPath(rel).parts
        if not parts or any(p in ("", ".", "..") for p in parts) or "//" in rel:
            raise StepFailed(f"object name {blob.name!r} does not map to a safe local path")
        objects.append(_Object(blob, blob.name, int(blob.size or 0), blob.crc32c, rel))
    return objects


def _access_hint(src: str) -> str:
    return (
        f"is {src} public? For a private bucket set `anonymous: false` and give the box "
        "application-default credentials"
    )


def _take_over(dest: Path, partial: Path, ctx: StepContext) -> None:
    """Make `partial` the working directory, resuming from an earlier `dest` when there is one."""
    if dest.exists() and partial.exists():
        raise StepFailed(
            f"both {dest} and {partial} exist",
            hint=f"remove the one you do not want to keep (the step resumes from {partial})",
        )
    if dest.exists():
        ctx.log(f"re-checking the existing {dest}")
        os.rename(dest, partial)
    partial.mkdir(parents=True, exist_ok=True)
    # A chunked download that was killed may still have a writer: unlink, never reuse.
    for stale in partial.rglob("*" + _CHUNKS_SUFFIX):
        stale.unlink()


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _present(path: Path, obj: _Object) -> bool:
    """The file is complete: its size and (when the listing gives one) crc32c match."""
    if not _has_size(path, obj.size) or not path.is_file():
        return False
    return obj.crc32c is None or _crc32c(path) == obj.crc32c


def _crc32c(path: Path) -> str:
    """Base64 of the big-endian crc32c, the form GCS lists."""
    import google_crc32c

    checksum = google_crc32c.Checksum()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 * _MIB), b""):
            checksum.update(block)
    return base64.b64encode(checksum.digest()).decode("ascii")


def _download(
    ctx: StepContext, client: Any, partial: Path, todo: list[_Object]
) -> list[tuple[str, str]]:
    """Fetch `todo` into `partial`; returns (object name, error) for each object that failed."""
    from google.cloud.storage import transfer_manager

    workers = ctx.params["workers"]
    threshold = ctx.params["chunked_above_mib"] * _MIB
    errors: list[tuple[str, str]] = []
    for obj in todo:
        (partial / obj.rel).parent.mkdir(parents=True, exist_ok=True)
        (partial / obj.rel).unlink(missing_ok=True)
    for obj in (o for o in todo if o.size > threshold):
        target = partial / obj.rel
        chunks = target.with_name(target.name + _CHUNKS_SUFFIX)
        chunk = min(_MAX_CHUNK, max(_MIN_CHUNK, -(-obj.size // workers)))
        try:
            transfer_manager.download_chunks_concurrently(
                obj.blob,
                str(chunks),
                chunk_size=chunk,
                worker_type=transfer_manager.THREAD,
                max_workers=workers,
                crc32c_checksum=obj.crc32c is not None,
            )
        except Exception as exc:  # reported per object, as download_many reports its errors
            chunks.unlink(missing_ok=True)
            errors.append((obj.name, _short(exc)))
            continue
        os.replace(chunks, target)
    small = [o for o in todo if o.size <= threshold]
    results = transfer_manager.download_many(
        [(o.blob, str(partial / o.rel)) for o in small],
        max_workers=workers,
        worker_type=transfer_manager.THREAD,
        raise_exception=False,
    )
    for i, obj in enumerate(small):  # results are in the order of the pairs given
        result = results[i]
        if isinstance(result, Exception):
            errors.append((obj.name, _short(result)))
    return errors


def _short(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first[:200]}"


def _write_listing(ctx: StepContext, dest: Path, objects: list[_Object]) -> None:
    write_json_atomic(
        ctx.workdir / _LISTING,
        {
            "src": ctx.params["src"],
            "dest": str(dest),
            "files": {o.rel: o.size for o in objects},
            "objects": {o.name: [o.size, o.crc32c] for o in objects},
        },
    )


class _Progress:
    """Reports bytes on disk under `partial` once a second while the downloads run.

    A thread polls file sizes rather than hooking the downloads: transfer_manager gives no
    per-object callback, and ranged downloads write in parallel into one sparse file, whose
    allocated blocks (not its size) tell how much has arrived.
    """

    def __init__(
        self, ctx: StepContext, partial: Path, objects: list[_Object], todo: list[_Object]
    ) -> None:
        self.ctx = ctx
        self.partial = partial
        self.todo = todo
        self.total = sum(o.size for o in objects)
        self.kept_bytes = self.total - sum(o.size for o in todo)
        self.files_total = len(objects)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="gcs-progress", daemon=True)
        self.started = time.monotonic()

    def __enter__(self) -> _Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._report()

    def _loop(self) -> None:
        while not self.stop.wait(1.0):
            self._report()

    def _report(self) -> None:
        fetched, files_done = 0, self.files_total - len(self.todo)
        for obj in self.todo:
            target = self.partial / obj.rel
            got = _arrived(target.with_name(target.name + _CHUNKS_SUFFIX)) or _arrived(target)
            fetched += min(got, obj.size)
            files_done += _has_size(target, obj.size)
        elapsed = max(time.monotonic() - self.started, 1e-6)
        self.ctx.progress(
            done=self.kept_bytes + fetched,
            total=self.total,
            unit="B",
            files_done=files_done,
            files_total=self.files_total,
            speed=round(fetched / elapsed),
        )


def _arrived(path: Path) -> int:
    """Bytes actually written to a (possibly sparse) file."""
    try:
        st = path.stat()
    except OSError:
        return 0
    return min(st.st_size, st.st_blocks * 512)


KIND = GcsDownload()
