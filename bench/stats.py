"""Dataset statistics: `provision.stats` vs the runbook's method, on a runbook-size RLDS set.

Run: `python bench/stats.py [--runs 5] [--image-bytes 24576] [--dir DIR] [--skip-lerobot]`.

Generates (once; reused from `--dir` while the parameters match) an RLDS set the size of the
runbook's libero_object_no_noops: 454 episodes, 66,984 steps, 32 shards, two image blobs per
step (`--image-bytes` each, random bytes: about a 128x128x3 PNG by default). Then times, after
one untimed warm-up of each, in rounds whose order alternates:

- ours: `stats_command` (CRC-checked shards, only `action` and `observation/state` decoded,
  images skipped by length, exact statistics);
- the seed's method (seed 003 §9.2) without TensorFlow, which is not installed here: the same
  reader and CRC checks, every feature of every episode decoded (as tfds does), episodes split
  into per-step dicts, one row per step appended to Python lists, `np.stack`, then the seed's
  `stats()`. It does not decode images, which tfds does: the real seed is slower still.

Prints both medians (min-max), the ratio, and ours against the seed's own measured 45-60 s for
66,984 steps with TensorFlow (its machine, not this one). CRC-32C runs through google-crc32c's C
code when importable; the numpy fallback is timed too (in a subprocess that cannot import it).

LeRobot: a ~1M-row dataset written as v2.1 (one parquet per episode) and v3.0 (packed files),
timed with `stats_command` (openpi schema), reported in rows/s. The page cache is warm in every
timed run (the data fits in memory): these are CPU figures, not disk figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
if "--no-google-crc32c" in sys.argv:
    sys.modules["google_crc32c"] = None  # type: ignore[assignment]  # import now fails

import numpy as np  # noqa: E402

from provision.stats import crc32c, samples  # noqa: E402
from provision.stats.command import stats_command  # noqa: E402
from provision.stats.example import parse_example  # noqa: E402
from provision.stats.rlds import RldsReader  # noqa: E402
from provision.stats.tfrecord import read_records  # noqa: E402

#: The seed's measured time for its TensorFlow loop over 66,984 steps (seed 003 §9.2).
SEED_TF_SECONDS = (45.0, 60.0)


def seed_method(version_dir: Path) -> dict[str, Any]:
    """Seed 003 §9.2's loop with our reader standing in for tfds (see the module docstring)."""
    reader = RldsReader(version_dir)
    all_actions, all_proprios = [], []
    for shard in reader.shards:
        for record in read_records(shard):
            for step in _steps(parse_example(record), reader.fields):
                all_actions.append(step["action"].astype("float32"))
                all_proprios.append(step["observation"]["state"].astype("float32").flatten())
    actions = np.stack(all_actions)
    proprios = np.stack(all_proprios)
    return {
        "action": _seed_stats(actions),
        "proprio": _seed_stats(proprios),
        "num_samples": len(actions),
    }


def _steps(example: dict[str, Any], fields: dict[str, Any]) -> list[dict[str, Any]]:
    """An episode's flattened features as one nested dict per step, as tfds yields them."""
    columns = {}
    for key, field in fields.items():
        value = example[f"steps/{key}"]
        if isinstance(value, np.ndarray):
            value = value.reshape(-1, *field.shape)
        columns[key] = value
    steps = []
    for t in range(len(columns["action"])):
        step: dict[str, Any] = {}
        for key, value in columns.items():
            node = step
            *parents, leaf = key.split("/")
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value[t]
        steps.append(step)
    return steps


def _seed_stats(arr: np.ndarray) -> dict[str, list[float]]:
    return {
        "mean": arr.mean(0).tolist(),
        "std": arr.std(0).tolist(),
        "q01": np.percentile(arr, 1, 0).tolist(),
        "q99": np.percentile(arr, 99, 0).tolist(),
        "min": arr.min(0).tolist(),
        "max": arr.max(0).tolist(),
    }


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def rounds(methods: dict[str, Callable[[], object]], runs: int) -> dict[str, list[float]]:
    """One warm-up each, then `runs` rounds in alternating order."""
    for fn in methods.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(runs):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(methods[name]))
    return times


def show(name: str, values: list[float], unit: float | None = None, label: str = "") -> None:
    med = statistics.median(values)
    rate = f", {unit / med:,.0f} {label}" if unit else ""
    print(f"  {name:<34} median {med:8.3f} s  (min {min(values):.3f}, max {max(values):.3f}){rate}")


def ensure(directory: Path, params: dict[str, Any], write: Callable[[Path], None]) -> None:
    """Generate into `directory` unless it already holds a set made with the same params."""
    stamp = directory / "bench-params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    started = time.perf_counter()
    write(directory)
    stamp.write_text(json.dumps(params))
    print(f"  generated {directory} in {time.perf_counter() - started:.1f} s")


def bench_rlds(args: argparse.Namespace) -> None:
    sample = samples.RldsSample(
        episodes=args.episodes, steps=args.steps, shards=args.shards, image_bytes=args.image_bytes
    )
    data = args.dir / "rlds"
    ensure(
        data,
        {**vars(sample), "image_shape": list(sample.image_shape)},
        lambda d: samples.write_rlds_sample(d, sample),
    )
    version_dir = data / sample.name / sample.version
    size = sum(p.stat().st_size for p in version_dir.iterdir())
    print(
        f"RLDS: {sample.episodes} episodes, {sample.steps} steps, {sample.shards} shards, "
        f"2 x {sample.image_bytes} image bytes per step, {size / 2**30:.2f} GiB"
    )
    print(f"  CRC-32C: {crc32c.IMPLEMENTATION}")
    ours_doc = stats_command(str(version_dir))["document"][sample.name]
    seed_doc = seed_method(version_dir)
    for key in ("action", "proprio"):
        assert ours_doc[key]["q99"] == seed_doc[key]["q99"], key
        assert ours_doc[key]["min"] == seed_doc[key]["min"], key
    times = rounds(
        {
            "ours (stats_command)": lambda: stats_command(str(version_dir)),
            "seed's method, no TF (baseline)": lambda: seed_method(version_dir),
        },
        args.runs,
    )
    for name, values in times.items():
        show(name, values, size / 2**20, "MiB/s")
    ours = statistics.median(times["ours (stats_command)"])
    base = statistics.median(times["seed's method, no TF (baseline)"])
    print(f"  ratio: ours is {base / ours:.1f}x faster than the seed's method without TF")
    low, high = SEED_TF_SECONDS
    print(
        f"  vs the seed's measured TF loop ({low:.0f}-{high:.0f} s, its machine): "
        f"{low / ours:.0f}-{high / ours:.0f}x"
    )


def bench_lerobot(args: argparse.Namespace) -> None:
    for version in ("v2.1", "v3.0"):
        sample = samples.LeRobotSample(
            name=f"lerobot_{version}",
            version=version,
            episodes=args.lerobot_episodes,
            frames=args.lerobot_rows,
            dims=8,
            image_bytes=64,
            test_episodes=0,
        )
        root = args.dir / sample.name
        ensure(
            root,
            {**vars(sample), "constant_state": None, "constant_action": None},
            lambda d, s=sample: samples.write_lerobot(d, s),
        )
        files = len(list((root / "data").glob("*/*.parquet")))
        print(f"LeRobot {version}: {sample.frames} rows, {sample.episodes} episodes, {files} files")
        times = rounds({"ours": lambda r=root: stats_command(str(r), schema="openpi")}, args.runs)
        show("ours (stats_command, openpi)", times["ours"], sample.frames, "rows/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--episodes", type=int, default=454)
    parser.add_argument("--steps", type=int, default=66984)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--image-bytes", type=int, default=24576)
    parser.add_argument("--lerobot-rows", type=int, default=1_000_000)
    parser.add_argument("--lerobot-episodes", type=int, default=2000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/bootstrap-bench-stats"))
    parser.add_argument("--skip-lerobot", action="store_true")
    parser.add_argument("--no-google-crc32c", action="store_true", help="time the numpy CRC")
    args = parser.parse_args()
    bench_rlds(args)
    if crc32c.IMPLEMENTATION != "numpy":
        print("numpy CRC-32C (google-crc32c hidden):", flush=True)
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--no-google-crc32c",
                "--skip-lerobot",
                "--runs",
                str(args.runs),
                "--episodes",
                str(args.episodes),
                "--steps",
                str(args.steps),
                "--shards",
                str(args.shards),
                "--image-bytes",
                str(args.image_bytes),
                "--dir",
                str(args.dir),
            ],
            check=True,
        )
    if not args.skip_lerobot:
        bench_lerobot(args)


if __name__ == "__main__":
    main()
