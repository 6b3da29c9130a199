"""Dataset statistics: `provision.stats` vs the runbook's method, on a runbook-size RLDS set.

Run: `python bench/stats.py [--runs 5] [--image-bytes 24576] [--dir DIR] [--skip-lerobot]
[--tf-python PATH | --no-tf]`.

Generates (once; reused from `--dir` while the parameters match) an RLDS set the size of the
runbook's libero_object_no_noops: 454 episodes, 66,984 steps, 32 shards, two images per step
(real 256x256x3 PNGs of about `--image-bytes` each, which tfds decodes). Then times, after one
untimed warm-up of each, in rounds whose order alternates:

- ours: `stats_command` (CRC-checked shards, only `action` and `observation/state` decoded,
  images skipped by length, exact statistics);
- the seed's method (seed 003 §9.2) itself, with TensorFlow: its script, unchanged, in a worker
  process (bench/stats_seed_tf.py) run by a separate interpreter that has tensorflow and
  tensorflow_datasets: `--tf-python PATH`, else bench/.venv-tf/bin/python when it exists (see
  bench/stats_seed_tf.py; never installed in the project's environment). The worker imports
  TensorFlow once before the rounds: its import time is shown apart, not in the medians;
- a numpy baseline of the seed's method without TensorFlow: the same reader and CRC checks as
  ours, every feature of every episode decoded (as tfds does, images left encoded), episodes
  split into per-step dicts, one row per step appended to Python lists, `np.stack`, then the
  seed's `stats()`.

Prints the medians (min-max) and the ratios, and checks that our statistics equal the seed's on
the same data: same counts and dims, min/max/q01/q99 bit for bit, mean/std within float32
rounding (the seed sums in float32, we in float64). Without a TensorFlow interpreter, ours is
also set against the seed's own measured 45-60 s (its machine, not this one). CRC-32C runs
through google-crc32c's C code when importable; the numpy fallback is timed too (in a subprocess
that cannot import it; ours and the baseline only).

LeRobot: a ~1M-row dataset written as v2.1 (one parquet per episode) and v3.0 (packed files),
timed with `stats_command` (openpi schema), reported in rows/s. The page cache is warm in every
timed run (the data fits in memory): these are CPU figures, not disk figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

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
#: Where the bench's own TensorFlow venv lives (ignored by git; see bench/stats_seed_tf.py).
TF_PYTHON = ROOT / "bench" / ".venv-tf" / "bin" / "python"
#: Our mean/std may differ from the float64 ones of the seed's own rows by this much relative to
#: the dimension's range (max |min|, |max|): summation order only.
FLOAT64_ALLOWED = 1e-9
#: Statistics that must equal the seed's bit for bit.
EXACT = ("min", "max", "q01", "q99")


class SeedTF:
    """The seed's TensorFlow method in a worker process run by another interpreter."""

    def __init__(self, python: Path, version_dir: Path, log: Path) -> None:
        self._log = log
        with open(log, "w") as stderr:
            self._proc = subprocess.Popen(
                [str(python), str(ROOT / "bench" / "stats_seed_tf.py"), str(version_dir)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.hello = self._reply()
        self.out: dict[str, Any] = {}

    def run(self) -> None:
        """One run of the seed's method; its output document is kept in `out`."""
        assert self._proc.stdin is not None
        self._proc.stdin.write("run\n")
        self._proc.stdin.flush()
        self.out = self._reply()["out"]

    def check(self) -> dict[str, Any]:
        """float64 mean and std of the rows the last run gathered."""
        assert self._proc.stdin is not None
        self._proc.stdin.write("check\n")
        self._proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        """End the worker (its stdin closes, it leaves its loop)."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        self._proc.wait(timeout=60)

    def _reply(self) -> dict[str, Any]:
        stdout: IO[str] | None = self._proc.stdout
        line = stdout.readline() if stdout else ""
        if not line:
            tail = self._log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"TensorFlow worker died; its stderr ({self._log}):\n{tail}")
        return json.loads(line)


def seed_method(version_dir: Path) -> dict[str, Any]:
    """Seed 003 §9.2's loop with our reader standing in for tfds (see the module docstring)."""
    actions, proprios = seed_rows(version_dir)
    return {
        "action": _seed_stats(actions),
        "proprio": _seed_stats(proprios),
        "num_samples": len(actions),
    }


def seed_rows(version_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The seed's rows of actions and proprios, gathered step by step as its loop does."""
    reader = RldsReader(version_dir)
    all_actions, all_proprios = [], []
    for shard in reader.shards:
        for record in read_records(shard):
            for step in _steps(parse_example(record), reader.fields):
                all_actions.append(step["action"].astype("float32"))
                all_proprios.append(step["observation"]["state"].astype("float32").flatten())
    return np.stack(all_actions), np.stack(all_proprios)


def exact_moments(actions: np.ndarray, proprios: np.ndarray) -> dict[str, dict[str, list]]:
    """float64 mean and std of the rows: what the seed's float32 reductions approximate
    (as bench/stats_seed_tf.py computes them for the TensorFlow run)."""
    return {
        key: {"mean": wide.mean(0).tolist(), "std": wide.std(0).tolist()}
        for key, wide in (
            ("action", actions.astype(np.float64)),
            ("proprio", proprios.astype(np.float64)),
        )
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


def compare(
    ours: Mapping[str, Any], theirs: Mapping[str, Any], exact: Mapping[str, Any]
) -> tuple[bool, str]:
    """Whether our AE document equals the seed's on the same rows.

    Counts and dims equal, min/max/q01/q99 bit for bit. The seed's mean/std are float32
    reductions over all rows, off by their rounding; ours must equal `exact` (the float64 mean
    and std of the seed's own rows) within FLOAT64_ALLOWED of the range. How far the seed's
    float32 values are from those is reported, in float32 epsilons of the range.
    """
    ok = ours["num_samples"] == theirs["num_samples"]
    parts = [f"num_samples {ours['num_samples']} vs {theirs['num_samples']}"]
    for key in ("action", "proprio"):
        a, b = ours[key], theirs[key]
        dims = {len(a[n]) for n in a} | {len(b[n]) for n in b}
        if len(dims) != 1:
            return False, f"{key}: dims differ ({sorted(dims)})"
        exact_hits = sum(a[n][i] == b[n][i] for n in EXACT for i in range(len(a["min"])))
        total = len(EXACT) * len(a["min"])
        scale = np.maximum(np.abs(b["min"]), np.abs(b["max"]))
        ours_off = max(_worst(a[n], exact[key][n], scale) for n in ("mean", "std"))
        seed_off = max(_worst(b[n], exact[key][n], scale) for n in ("mean", "std"))
        ok = ok and exact_hits == total and ours_off <= FLOAT64_ALLOWED
        eps = float(np.finfo(np.float32).eps)
        parts.append(
            f"{key} {len(a['min'])} dims: min/max/q01/q99 {exact_hits}/{total} bit-equal; "
            f"mean/std vs float64 of the seed's rows: ours {ours_off:.1e}, "
            f"seed's float32 {seed_off:.1e} ({seed_off / eps:.0f} float32 eps) of range"
        )
    return ok, "\n    ".join(parts)


def _worst(values: list[float], exact: list[float], scale: np.ndarray) -> float:
    return float(np.max(np.abs(np.subtract(values, exact)) / scale))


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


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
        episodes=args.episodes,
        steps=args.steps,
        shards=args.shards,
        image_bytes=args.image_bytes,
        png=True,
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
        f"2 x {sample.image_shape} PNG (~{sample.image_bytes} bytes) per step, "
        f"{size / 2**30:.2f} GiB"
    )
    print(
        f"  CRC-32C: {crc32c.IMPLEMENTATION}; load average {_load()} (others' work shares the CPUs)"
    )
    seed_tf = None if args.tf_python is None else SeedTF(args.tf_python, version_dir, args.tf_log)
    try:
        _time_rlds(args, sample, version_dir, size, seed_tf)
    finally:
        if seed_tf:
            seed_tf.close()


def _time_rlds(
    args: argparse.Namespace,
    sample: samples.RldsSample,
    version_dir: Path,
    size: int,
    seed_tf: SeedTF | None,
) -> None:
    ours_label, base_label = "ours (stats_command)", "seed's method, numpy baseline"
    tf_label = "seed's method, TensorFlow (tfds)"
    methods: dict[str, Callable[[], object]] = {
        ours_label: lambda: stats_command(str(version_dir)),
        base_label: lambda: seed_method(version_dir),
    }
    if seed_tf:
        hello = seed_tf.hello
        print(
            f"  TensorFlow {hello['tf']}, tensorflow_datasets {hello['tfds']}, numpy "
            f"{hello['numpy']} ({args.tf_python}); import {hello['import_seconds']:.1f} s, "
            "not timed below"
        )
        methods[tf_label] = seed_tf.run
    times = rounds(methods, args.runs)
    print(f"  load average after the rounds: {_load()}")
    for name, values in times.items():
        show(name, values, size / 2**20, "MiB/s")
    ours = statistics.median(times[ours_label])
    base = statistics.median(times[base_label])
    if seed_tf:
        seed = statistics.median(times[tf_label])
        print(f"  ratio: ours is {seed / ours:.1f}x faster than the seed's method with TensorFlow")
    print(f"  ratio: ours is {base / ours:.1f}x faster than the numpy baseline")
    if not seed_tf:
        low, high = SEED_TF_SECONDS
        print(
            f"  vs the seed's measured TF loop ({low:.0f}-{high:.0f} s, its machine): "
            f"{low / ours:.0f}-{high / ours:.0f}x"
        )
    ours_doc = stats_command(str(version_dir))["document"][sample.name]
    rows = seed_rows(version_dir)
    checks = {"numpy baseline": (seed_method(version_dir), exact_moments(*rows))}
    if seed_tf:
        checks["seed's method with TensorFlow"] = (seed_tf.out[sample.name], seed_tf.check())
    failed = []
    for name, (doc, exact) in checks.items():
        ok, detail = compare(ours_doc, doc, exact)
        print(f"  check, ours vs {name}: {'OK' if ok else 'MISMATCH'}:\n    {detail}")
        failed += [] if ok else [name]
    if failed:
        raise SystemExit(f"statistics differ from: {', '.join(failed)}")


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
    parser.add_argument(
        "--tf-python",
        type=Path,
        default=TF_PYTHON if TF_PYTHON.exists() else None,
        help=f"interpreter with tensorflow + tensorflow_datasets (default: {TF_PYTHON} if any)",
    )
    parser.add_argument("--no-tf", action="store_true", help="leave the TensorFlow method out")
    args = parser.parse_args()
    if args.no_tf:
        args.tf_python = None
    args.tf_log = args.dir / "seed_tf.stderr"
    args.dir.mkdir(parents=True, exist_ok=True)
    bench_rlds(args)
    if crc32c.IMPLEMENTATION != "numpy":
        print("numpy CRC-32C (google-crc32c hidden):", flush=True)
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--no-google-crc32c",
                "--skip-lerobot",
                "--no-tf",
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
