"""`gcs_download` against the GCS emulator (gcp-storage-emulator), reached through `endpoint`."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gcs_emulator
import pytest

from provision.agent.files import read_json
from provision.errors import StepFailed
from provision.steps.base import ParamError, StepContext, validate_params
from provision.steps.gcs_download import KIND

BIG = 9 * (1 << 20)  # over 8 MiB, and over `chunked_above_mib: 4`: fetched in ranges
PARAMS = "pi05_base/params/"


@pytest.fixture(scope="module")
def emulator() -> Iterator[tuple[Any, str]]:
    with gcs_emulator.in_process() as (server, endpoint):
        yield server, endpoint


@pytest.fixture(scope="module")
def objects() -> dict[str, bytes]:
    return gcs_emulator.pi05_like(BIG)


@pytest.fixture
def bucket(emulator: tuple[Any, str], objects: dict[str, bytes]) -> str:
    """A fresh bucket holding the checkpoint plus neighbours that must not be fetched."""
    name = f"openpi-{uuid.uuid4().hex[:12]}"
    decoys = {"checkpoints/pi05_base_v2/params/x": b"no", "checkpoints/pi0_base/params/y": b"no"}
    gcs_emulator.upload(emulator[1], name, {**objects, **decoys})
    return name


@pytest.fixture(autouse=True)
def no_emulator_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only `endpoint` may route the client to the emulator."""
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)


def context(tmp_path: Path, **raw: Any) -> StepContext:
    raw.setdefault("workers", 4)
    raw.setdefault("chunked_above_mib", 4)
    return StepContext(
        step_id="ckpt",
        params=validate_params(KIND, raw),
        run_dir=tmp_path / "run",
        out=io.StringIO(),
    )


def local_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def expected_files(objects: dict[str, bytes], strip: str = "checkpoints/") -> dict[str, bytes]:
    return {name[len(strip) :]: content for name, content in objects.items()}


def stamps(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.mark.slow
def test_downloads_the_checkpoint_in_the_runbook_layout(
    tmp_path: Path, emulator: tuple[Any, str], bucket: str, objects: dict[str, bytes]
) -> None:
    dest = tmp_path / "models" / "pi05_base_jax"
    ctx = context(
        tmp_path,
        src=f"gs://{bucket}/checkpoints/pi05_base",
        dest=str(dest),
        endpoint=emulator[1],
        expect=[
            {"path": PARAMS + "commit_success.txt", "exists": True},
            {"path": PARAMS.rstrip("/"), "contains": ["ocdbt.process_0"]},
            {"path": PARAMS + "ocdbt.process_0/d", "entries": 15},
        ],
    )
    assert not KIND.check(ctx).done
    KIND.run(ctx)
    KIND.verify(ctx)
    assert local_files(dest) == expected_files(objects)
    assert not dest.with_name("pi05_base_jax.partial").exists()
    check = KIND.check(ctx)
    assert check.done, check.reason
    assert check.reason.startswith("20 files (9.6 MiB) present")
    progress = read_json(ctx.workdir / "_progress.json", {})
    total = sum(len(c) for c in objects.values())
    assert progress["done"] == progress["total"] == total
    assert progress["files_done"] == progress["files_total"] == 20
    # A truncated file undoes "done"; a file written beside the checkpoint does not.
    (dest / "pi05_base" / "norm_stats.json").write_text("{}")
    assert KIND.check(ctx).done
    (dest / PARAMS / "commit_success.txt").write_bytes(b"x")
    assert "commit_success.txt (1 bytes, downloaded" in KIND.check(ctx).reason


@pytest.mark.slow
def test_trailing_slash_puts_the_prefix_contents_into_dest(
    tmp_path: Path, emulator: tuple[Any, str], bucket: str, objects: dict[str, bytes]
) -> None:
    dest = tmp_path / "ckpt"
    ctx = context(tmp_path, src=f"gs://{bucket}/checkpoints/pi05_base/", dest=str(dest))
    ctx.params["endpoint"] = emulator[1]
    KIND.run(ctx)
    KIND.verify(ctx)
    assert local_files(dest) == expected_files(objects, "checkpoints/pi05_base/")


@pytest.mark.slow
def test_rerun_after_a_file_went_missing_fetches_only_that_file(
    tmp_path: Path, emulator: tuple[Any, str], bucket: str, objects: dict[str, bytes]
) -> None:
    dest = tmp_path / "m"
    ctx = context(tmp_path, src=f"gs://{bucket}/checkpoints/pi05_base", dest=str(dest))
    ctx.params["endpoint"] = emulator[1]
    KIND.run(ctx)
    KIND.verify(ctx)
    lost = PARAMS + "ocdbt.process_0/d/" + f"{3:032x}"
    (dest / lost).unlink()
    before = stamps(dest)
    assert not KIND.check(ctx).done
    KIND.run(ctx)
    KIND.verify(ctx)
    assert KIND.check(ctx).done
    assert local_files(dest) == expected_files(objects)
    after = stamps(dest)
    assert {rel for rel in after if after[rel] != before.get(rel)} == {lost}
    assert "19 of 20 objects already present" in ctx.out.getvalue()


@pytest.mark.slow
def test_corrupted_local_file_is_fetched_again(
    tmp_path: Path, emulator: tuple[Any, str], bucket: str, objects: dict[str, bytes]
) -> None:
    """A file in .partial with the right size but the wrong crc32c is not trusted."""
    dest = tmp_path / "m"
    partial = tmp_path / "m.partial"
    for name, content in expected_files(objects).items():
        (partial / name).parent.mkdir(parents=True, exist_ok=True)
        (partial / name).write_bytes(content)
    bad = PARAMS + "ocdbt.process_0/d/big0000000000000000000000000000"
    damaged = bytearray((partial / bad).read_bytes())
    damaged[12345] ^= 0x01
    (partial / bad).write_bytes(bytes(damaged))
    before = stamps(partial)
    ctx = context(tmp_path, src=f"gs://{bucket}/checkpoints/pi05_base", dest=str(dest))
    ctx.params["endpoint"] = emulator[1]
    KIND.run(ctx)
    KIND.verify(ctx)
    assert local_files(dest) == expected_files(objects)
    after = stamps(dest)
    assert {rel for rel in after if after[rel] != before[rel]} == {bad}


@pytest.mark.parametrize("chunked_above_mib", [4, 64], ids=["ranged", "whole"])
@pytest.mark.slow
def test_object_corrupted_on_the_server_fails_naming_it(
    tmp_path: Path,
    emulator: tuple[Any, str],
    bucket: str,
    chunked_above_mib: int,
) -> None:
    bad = "checkpoints/pi05_base/params/ocdbt.process_0/d/big0000000000000000000000000000"
    gcs_emulator.corrupt(emulator[0], bucket, bad)
    ctx = context(
        tmp_path,
        src=f"gs://{bucket}/checkpoints/pi05_base",
        dest=str(tmp_path / "m"),
        chunked_above_mib=chunked_above_mib,
    )
    ctx.params["endpoint"] = emulator[1]
    with pytest.raises(StepFailed) as err:
        KIND.run(ctx)
    assert err.value.reason.startswith(f"1 of 20 objects failed: {bad} (DataCorruption")
    assert "a rerun keeps the 19 objects" in (err.value.hint or "")
    assert not (tmp_path / "m").exists()
    assert not KIND.check(ctx).done


RUN_IN_CHILD = """
import json, sys
from pathlib import Path
from provision.steps.base import StepContext, validate_params
from provision.steps.gcs_download import KIND
ctx = StepContext(step_id="ckpt", params=validate_params(KIND, json.loads(sys.argv[1])),
                  run_dir=Path(sys.argv[2]))
KIND.run(ctx)
"""


@pytest.mark.slow
def test_killed_download_resumes_without_fetching_finished_objects_again(
    tmp_path: Path, objects: dict[str, bytes]
) -> None:
    emulator = gcs_emulator.EmulatorProcess()
    try:
        gcs_emulator.upload(emulator.endpoint, "openpi-assets", objects)
        dest = tmp_path / "models" / "pi05_base_jax"
        partial = dest.with_name("pi05_base_jax.partial")
        raw = {
            "src": "gs://openpi-assets/checkpoints/pi05_base",
            "dest": str(dest),
            "endpoint": emulator.endpoint,
            "workers": 2,
            "chunked_above_mib": 4,
        }
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        child = subprocess.Popen(
            [sys.executable, "-c", RUN_IN_CHILD, json.dumps(raw), str(tmp_path / "run")],
            start_new_session=True,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wanted = expected_files(objects)
        deadline = time.monotonic() + 60
        finished: dict[str, tuple[int, int]] = {}
        while time.monotonic() < deadline and len(finished) < 8:
            finished = {
                rel: stamp
                for rel, stamp in stamps(partial).items()
                if rel in wanted and (partial / rel).stat().st_size == len(wanted[rel])
            } if partial.exists() else {}  # fmt: skip
            time.sleep(0.005)
        emulator.pause()  # freeze the transfer mid-way, then kill the downloader outright
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        emulator.resume()
        finished = {
            rel: stamp
            for rel, stamp in stamps(partial).items()
            if rel in wanted and (partial / rel).stat().st_size == len(wanted[rel])
        }
        assert 8 <= len(finished) < len(wanted), "the download was not interrupted mid-way"
        ctx = context(tmp_path, **raw)
        assert not KIND.check(ctx).done
        KIND.run(ctx)
        KIND.verify(ctx)
        assert KIND.check(ctx).done
        assert local_files(dest) == wanted
        after = stamps(dest)
        assert {rel: after[rel] for rel in finished} == finished
        assert f"{len(finished)} of 20 objects already present" in ctx.out.getvalue()
    finally:
        emulator.stop()


@pytest.mark.slow
def test_sixteen_workers_reuse_their_connections(
    tmp_path: Path, objects: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """Against a keep-alive server, no connection is dropped for want of room in the pool."""
    emulator = gcs_emulator.EmulatorProcess(threaded=True)
    try:
        gcs_emulator.upload(emulator.endpoint, "openpi-assets", objects)
        ctx = context(
            tmp_path,
            src="gs://openpi-assets/checkpoints/pi05_base",
            dest=str(tmp_path / "m"),
            endpoint=emulator.endpoint,
            workers=16,
        )
        with caplog.at_level(logging.WARNING, logger="urllib3"):
            KIND.run(ctx)
        KIND.verify(ctx)
    finally:
        emulator.stop()
    assert local_files(tmp_path / "m") == expected_files(objects)
    assert not [r.getMessage() for r in caplog.records if "pool is full" in r.getMessage()]


@pytest.mark.slow
def test_empty_prefix_fails_clearly(tmp_path: Path, emulator: tuple[Any, str], bucket: str) -> None:
    ctx = context(tmp_path, src=f"gs://{bucket}/checkpoints/pi05", dest=str(tmp_path / "m"))
    ctx.params["endpoint"] = emulator[1]
    with pytest.raises(StepFailed) as err:
        KIND.run(ctx)
    assert err.value.reason == f"no objects under gs://{bucket}/checkpoints/pi05"


def test_refuses_to_choose_between_dest_and_partial(
    tmp_path: Path, emulator: tuple[Any, str], bucket: str
) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m.partial").mkdir()
    ctx = context(tmp_path, src=f"gs://{bucket}/checkpoints/pi05_base", dest=str(tmp_path / "m"))
    ctx.params["endpoint"] = emulator[1]
    with pytest.raises(StepFailed) as err:
        KIND.run(ctx)
    assert "both" in err.value.reason


@pytest.mark.slow
def test_expect_failure_is_reported_and_not_done(
    tmp_path: Path, emulator: tuple[Any, str], bucket: str
) -> None:
    ctx = context(
        tmp_path,
        src=f"gs://{bucket}/checkpoints/pi05_base",
        dest=str(tmp_path / "m"),
        expect=[{"path": "params/commit_success.txt", "exists": True}],
    )
    ctx.params["endpoint"] = emulator[1]
    KIND.run(ctx)
    with pytest.raises(StepFailed) as err:
        KIND.verify(ctx)
    assert err.value.reason == "expect: params/commit_success.txt is missing"
    assert not KIND.check(ctx).done


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"src": "s3://bkt/x", "dest": "/m"}, "src"),
        ({"src": "gs://bkt/../x", "dest": "/m"}, "src"),
        ({"src": "gs://bkt/x", "dest": "models"}, "dest"),
        ({"src": "gs://bkt/x", "dest": "~"}, "dest"),
        ({"src": "gs://bkt/x", "dest": "/m", "workers": 0}, "workers"),
        ({"src": "gs://bkt/x", "dest": "/m", "endpoint": "127.0.0.1:9023"}, "endpoint"),
        ({"src": "gs://bkt/x", "dest": "/m", "anonymous": "yes"}, "anonymous"),
        ({"src": "gs://bkt/x", "dest": "/m", "expect": [{"path": "a", "contains": []}]}, "expect"),
    ],
)
def test_bad_params_name_their_key(raw: dict[str, Any], key: str) -> None:
    with pytest.raises(ParamError) as err:
        validate_params(KIND, raw)
    assert err.value.key == key
