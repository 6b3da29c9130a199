"""Checkpoint uploads beside training: what they cost the training, and how fast they go.

1. **Training throughput with uploads vs without** (goal >= 0.97x): a CPU-bound stand-in
   trainer (each step hashes 8 MiB with sha256: pure CPU) saves a checkpoint every
   `--interval` steps the way openpi's fork does (`tmp_N/`, then renamed to `N/`; see
   provision/data/fake_trainer.py). Timed alone, and with the real guard (provision/watch/
   guard.py: nice 19, autogroup 19, SCHED_IDLE, ionice idle) uploading each checkpoint to a
   local rclone remote; rounds interleaved (alone, guarded, guarded, alone, ...) so the drift
   of this shared machine falls on both. Baseline: the same trainer without a guard. Each
   guarded round also says how many checkpoints the guard had verified when the trainer
   ended, the CPU it had used, and how long after the end the last one was verified.
2. **Upload throughput vs `rclone copy`**: the uploader's pass (its niced `rclone sync` of the
   checkpoints waiting, the box's side hashed meanwhile, the remote's listing, the manifest
   entries) over `--count` checkpoints of `--size-mb` MiB, vs one plain `rclone copy` of the
   same directories (baseline; files of `--shard-mb` MiB), and vs that copy under the
   uploader's own priority (`nice -n 19 ionice -c 3`). Each measure `--upload-rounds` times,
   interleaved; to a local rclone remote (`local`: the remote must read a file back to hash
   it) and to a bucket on the GCS emulator (`gs`: the hash comes with each object, as on GCS).

The machine may be shared: each round prints the load average before and after it, and each
ratio is the median of the rounds' own ratios (a round's measures ran back to back, so a load
that changes between rounds falls on both sides of its ratio), beside the ratio of medians.

    python bench/checkpoints.py [--rounds 5] [--steps 300] [--size-mb 64] [--remotes local,gs]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import gcs_emulator  # noqa: E402

from provision.agent.priority import nice_prefix  # noqa: E402
from provision.checkpoints.remote import Remote, rclone_path  # noqa: E402
from provision.checkpoints.spec import parse_checkpoints  # noqa: E402
from provision.checkpoints.upload import Uploader, read_status  # noqa: E402
from provision.watch import guard  # noqa: E402

TRAINER = """
import hashlib, os, sys, time
steps, interval, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
block = os.urandom(8 << 20)
start = time.perf_counter()
for step in range(1, steps + 1):
    hashlib.sha256(block).digest()
    if step % interval == 0:
        tmp = f"ck/tmp_{step}"
        os.makedirs(tmp)
        with open(f"{tmp}/model.safetensors", "wb") as fh:
            fh.write(os.urandom(size))
        open(f"{tmp}/metadata.pt", "w").write(str(step))
        os.rename(tmp, f"ck/{step}")
print(steps / (time.perf_counter() - start), steps / time.process_time())
"""


def _spec(root: Path, conf: Path, bwlimit: str | None = None) -> dict:
    raw = {"dir": "ck", "complete": "metadata.pt", "remote": f"store:{root}", "poll": 1,
           "rclone_config": str(conf), "keep": 2}  # fmt: skip
    if bwlimit:
        raw["bwlimit"] = bwlimit
    return raw


@dataclass
class Run:
    """One training run: its rate, and (guarded) what the guard did meanwhile and after."""

    steps_per_s: float
    steps_per_cpu_s: float  # steps per second of the trainer's own CPU time
    verified: int = 0  # checkpoints verified on the remote when the trainer ended
    guard_cpu_s: float = 0.0  # CPU the guard and its finished rclone calls used by then
    drain_s: float | None = None  # seconds after the trainer's end until all were verified


def _cpu_s(pid: int) -> float:
    """utime + stime of `pid` and of its children it waited for, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def train_once(work: Path, args: argparse.Namespace, guarded: bool) -> Run:
    """One training run in a fresh directory, with or without a guard (see `Run`)."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "ck").mkdir(parents=True)
    conf = work / "rclone.conf"
    conf.write_text("[store]\ntype = local\n")
    step_dir = work / "step"
    step_dir.mkdir()
    pid = 0
    if guarded:
        where = args.remote_root / "bench-ckpt-remote" if args.remote_root else work / "remote"
        shutil.rmtree(where, ignore_errors=True)
        spec = parse_checkpoints(_spec(where, conf, args.bwlimit)).to_dict()
        config = {"launch_id": "bench", "cwd": str(work), "checkpoints": spec, "log": ""}
        pid = guard.start(step_dir, config, dict(os.environ))
    size = args.size_mb << 20
    try:
        done = subprocess.run(
            [sys.executable, "-c", TRAINER, str(args.steps), str(args.interval), str(size)],
            cwd=work, capture_output=True, text=True, check=True,
        )  # fmt: skip
        run = Run(*(float(x) for x in done.stdout.split()))
        if guarded:
            ended = time.monotonic()
            run.verified = len(read_status(step_dir).get("verified") or [])
            run.guard_cpu_s = _cpu_s(pid)
            want = args.steps // args.interval
            while time.monotonic() - ended < args.drain_s:
                if len(read_status(step_dir).get("verified") or []) >= want:
                    run.drain_s = time.monotonic() - ended
                    break
                time.sleep(0.2)
    finally:
        if guarded:
            guard.stop(step_dir)  # its own session: it would outlive this process
        if args.remote_root:
            shutil.rmtree(args.remote_root / "bench-ckpt-remote", ignore_errors=True)
    return run


def load() -> str:
    """The 1-minute load average, as a round prints it before and after itself."""
    return f"{os.getloadavg()[0]:.1f}"


def upload_compare(
    base: Path, args: argparse.Namespace, kind: str
) -> tuple[list[float], list[float], list[float]]:
    """MiB/s of (the uploader, rclone copy, rclone copy niced), one of each per round."""
    work = base / f"upload-{kind}"
    shutil.rmtree(work, ignore_errors=True)
    for i in range(args.count):
        ckpt = work / "ck" / str((i + 1) * 10)
        ckpt.mkdir(parents=True)
        # Sharded as big checkpoints are (the emulator also refuses rclone's chunked uploads,
        # which files over rclone's GCS chunk size get).
        left, shard = args.size_mb, 0
        while left > 0:
            part = min(left, args.shard_mb)
            (ckpt / f"model-{shard:05d}.safetensors").write_bytes(os.urandom(part << 20))
            left, shard = left - part, shard + 1
        (ckpt / "metadata.pt").write_text(str(i))
    conf = work / "rclone.conf"
    conf.write_text("[store]\ntype = local\n")
    env = dict(os.environ)
    emulator = None
    if kind == "gs":
        emulator = gcs_emulator.EmulatorProcess(threaded=True)
        gcs_emulator.client(emulator.endpoint).create_bucket("bench")
        env["STORAGE_EMULATOR_HOST"] = emulator.endpoint
    total = args.count * args.size_mb
    rates: dict[str, list[float]] = {"ours": [], "plain": [], "niced": []}
    try:
        for r in range(args.upload_rounds):
            where = f"gs://bench/r{r}" if kind == "gs" else f"store:{work / f'r{r}'}"
            before = load()
            for measure in ("plain", "ours", "niced") if r % 2 == 0 else ("niced", "ours", "plain"):
                dest = rclone_path(f"{where}-{measure}", env)
                start = time.perf_counter()
                if measure == "ours":
                    raw = {"dir": "ck", "complete": "metadata.pt", "remote": f"{where}-ours",
                           "rclone_config": str(conf)}  # fmt: skip
                    spec = parse_checkpoints(raw)
                    step = work / f"step{r}"
                    step.mkdir()
                    uploader = Uploader(spec, work, step, Remote(spec, env), lambda _: None)
                    report = uploader.sync()
                    assert report.error is None and len(report.uploaded) == args.count, report
                else:
                    prefix = nice_prefix() if measure == "niced" else []
                    subprocess.run(
                        [*prefix, "rclone", "copy", str(work / "ck"), dest, "--config",
                         str(conf), "--transfers", "4"],
                        check=True, env=env,
                    )  # fmt: skip
                rates[measure].append(total / (time.perf_counter() - start))
            o, p, n = (rates[m][-1] for m in ("ours", "plain", "niced"))
            print(f"  {kind} round {r + 1}: load {before} -> {load()}; uploader {o:.1f}, "
                  f"rclone copy {p:.1f}, niced {n:.1f} MiB/s; uploader/copy {o / p:.2f}x, "
                  f"uploader/niced {o / n:.2f}x", flush=True)  # fmt: skip
    finally:
        if emulator is not None:
            emulator.stop()
    return rates["ours"], rates["plain"], rates["niced"]


def paired(these: list[float], baseline: list[float]) -> str:
    """`median of the per-round ratios (their range)`, the figure each ratio line leads with."""
    ratios = [a / b for a, b in zip(these, baseline, strict=True)]
    return f"{statistics.median(ratios):.3f}x (rounds {min(ratios):.3f}-{max(ratios):.3f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="training rounds (alone+guarded)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--interval", type=int, default=20)
    parser.add_argument("--size-mb", type=int, default=64)
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--bwlimit", default=None, help="rclone --bwlimit for the guard")
    parser.add_argument("--upload-rounds", type=int, default=3)
    parser.add_argument("--shard-mb", type=int, default=16, help="file size within a checkpoint")
    parser.add_argument("--remotes", default="local,gs", help="local, gs or both")
    parser.add_argument("--skip-training", action="store_true", help="upload figures only")
    parser.add_argument("--remote-root", type=Path, default=None,
                        help="where the training rounds' local remote lives (default: beside "
                        "the trainer, on its disk; /dev/shm: a remote that, like a bucket, "
                        "writes nothing to the box's disk)")  # fmt: skip
    parser.add_argument("--drain-s", type=float, default=120,
                        help="how long a guarded round waits for the last uploads")  # fmt: skip
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally blocks still run
    base = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    print(f"cores: {os.cpu_count()}; load average at start {load()}", flush=True)
    try:
        alone: list[float] = []
        guarded: list[float] = []
        cpu_alone: list[float] = []
        cpu_guarded: list[float] = []
        for i in range(0 if args.skip_training else args.rounds):
            order = (False, True) if i % 2 == 0 else (True, False)
            before = load()
            runs = {
                with_guard: train_once(base / "train", args, with_guard) for with_guard in order
            }
            alone.append(runs[False].steps_per_s)
            guarded.append(runs[True].steps_per_s)
            cpu_alone.append(runs[False].steps_per_cpu_s)
            cpu_guarded.append(runs[True].steps_per_cpu_s)
            g = runs[True]
            drain = f"{g.drain_s:.1f}s" if g.drain_s is not None else f"> {args.drain_s:.0f}s"
            print(f"  training round {i + 1}: load {before} -> {load()}; alone "
                  f"{alone[-1]:.2f}, with uploads {guarded[-1]:.2f} steps/s "
                  f"({guarded[-1] / alone[-1]:.3f}x); by the trainer's end {g.verified} of "
                  f"{args.steps // args.interval} checkpoints verified, guard CPU "
                  f"{g.guard_cpu_s:.1f}s; all verified {drain} later", flush=True)  # fmt: skip
        if alone:
            a, g = statistics.median(alone), statistics.median(guarded)
            print(f"training alone:        {a:7.2f} steps/s (median of {len(alone)})")
            print(f"training with uploads: {g:7.2f} steps/s (median of {len(guarded)})")
            print(f"with/without, paired: {paired(guarded, alone)}; ratio of medians "
                  f"{g / a:.3f}x (goal >= 0.97x)")  # fmt: skip
            print(f"steps per CPU-second of the trainer, with/without, paired: "
                  f"{paired(cpu_guarded, cpu_alone)} (the scheduler's share aside: what the "
                  "uploads cost each step through caches, memory and the kernel)")  # fmt: skip
        for kind in args.remotes.split(","):
            ours, plain, niced = upload_compare(base, args, kind)
            o, p, n = (statistics.median(x) for x in (ours, plain, niced))
            print(f"upload to {kind} ({args.count} x {args.size_mb} MiB, "
                  f"{args.upload_rounds} rounds, medians): uploader {o:.1f} MiB/s, "
                  f"rclone copy {p:.1f} MiB/s, rclone copy niced {n:.1f} MiB/s")  # fmt: skip
            print(f"  uploader / rclone copy, paired: {paired(ours, plain)}; "
                  f"/ rclone copy at the same priority: {paired(ours, niced)}")  # fmt: skip
        print(f"load average at the end {load()}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
