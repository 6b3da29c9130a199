"""Checkpoint download: `gcs_download` vs a single-stream sequential download, same client.

Run: `python bench/gcs.py [--total-mb 200] [--objects 20] [--runs 3] [--workers 16]`.
Serves `objects` random objects (`total-mb` MB in all) from the GCS emulator (a subprocess,
in-memory), then times, after one untimed warm-up of each, in rounds whose order alternates:

- `gcs_download` with its defaults (objects <= 64 MiB: `download_many` on a thread pool);
- `gcs_download` with every object fetched in ranges by processes (`chunked_above_mib: 1`);
- the baseline: `list_blobs`, then `blob.download_to_filename` for each object in turn.

Prints each one's median, min–max and MiB/s, and each one's ratio to the baseline (> 1: faster).
The stock emulator serves one request at a time from an accept queue of 5, so parallel clients
cannot gain there (and over 5 connections wait for SYN retries); `--server threaded` serves
requests in parallel over kept-alive connections, closer to GCS, but client and server share
this machine's cores. `--stream-mb-s` then paces each response, as one stream from GCS is
bandwidth-limited while many streams are not: that shows what parallel streams buy.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import gcs_emulator  # noqa: E402

from provision.steps.base import StepContext, validate_params  # noqa: E402
from provision.steps.gcs_download import KIND  # noqa: E402

BUCKET = "openpi-assets"
PREFIX = "checkpoints/pi05_base"


def gcs_download(endpoint: str, work: Path, **extra: object) -> Callable[[], None]:
    def fetch() -> None:
        dest = work / "kind"
        shutil.rmtree(dest, ignore_errors=True)
        raw = {"src": f"gs://{BUCKET}/{PREFIX}", "dest": str(dest), "endpoint": endpoint, **extra}
        ctx = StepContext("ckpt", validate_params(KIND, raw), work / "run", out=io.StringIO())
        KIND.run(ctx)
        KIND.verify(ctx)

    return fetch


def sequential(endpoint: str, work: Path) -> Callable[[], None]:
    def fetch() -> None:
        dest = work / "sequential"
        shutil.rmtree(dest, ignore_errors=True)
        client = gcs_emulator.client(endpoint)
        for blob in client.list_blobs(BUCKET, prefix=PREFIX + "/"):
            path = dest / blob.name
            path.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(path))

    return fetch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-mb", type=int, default=200)
    parser.add_argument("--objects", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument(
        "--server",
        choices=["single", "threaded"],
        default="single",
        help="the stock emulator (one request at a time), or one thread per request",
    )
    parser.add_argument(
        "--stream-mb-s",
        type=float,
        default=0,
        help="with --server threaded: pace each response to this many MB/s, as one GCS stream",
    )
    args = parser.parse_args()
    size = args.total_mb * 1_000_000 // args.objects
    if args.stream_mb_s and args.server != "threaded":
        parser.error("--stream-mb-s needs --server threaded")
    emulator = gcs_emulator.EmulatorProcess(
        threaded=args.server == "threaded", stream_bytes_per_s=int(args.stream_mb_s * 1e6)
    )
    try:
        objects = {f"{PREFIX}/params/d/{i:032x}": os.urandom(size) for i in range(args.objects)}
        gcs_emulator.upload(emulator.endpoint, BUCKET, objects)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            contenders = {
                f"gcs_download ({args.workers} threads)": gcs_download(
                    emulator.endpoint, work, workers=args.workers
                ),
                f"gcs_download (ranged, {args.workers} threads)": gcs_download(
                    emulator.endpoint, work, workers=args.workers, chunked_above_mib=1
                ),
                "sequential single stream": sequential(emulator.endpoint, work),
            }
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for fetch in contenders.values():
                fetch()
            for round_ in range(args.runs):
                order = list(contenders.items())
                for name, fetch in order if round_ % 2 == 0 else reversed(order):
                    start = time.perf_counter()
                    fetch()
                    times[name].append(time.perf_counter() - start)
    finally:
        emulator.stop()
    total = size * args.objects
    print(
        f"{args.objects} objects, {total / 1e6:.0f} MB, {args.server} emulator"
        + (f" at {args.stream_mb_s:g} MB/s per stream" if args.stream_mb_s else "")
        + ", "
        f"median of {args.runs} (after a warm-up)"
    )
    baseline = statistics.median(times["sequential single stream"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:<34} median {median:6.2f} s  ({min(values):.2f}–{max(values):.2f})  "
            f"{total / median / 2**20:6.1f} MiB/s  ratio {baseline / median:4.2f}x"
        )


if __name__ == "__main__":
    main()
