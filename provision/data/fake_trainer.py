#!/usr/bin/env python3
"""A stand-in trainer that prints what openpi's training scripts print, for boxes without a GPU.

Modes (the lines are RUNBOOK.md A and seed 003 §13, in their order):

- `ae`: `scripts/train_waypoint.py --mode ae` — `WaypointAEDataset: 454 episodes, 8409 valid
  pairs`, `Loaded 811 weight tensors, skipped 1`, `Constructing tf.data.Dataset libero_object`,
  wandb's run banner, `Model: 3617.8M total, 3617.8M trainable`, then `[AE] step=N/10000 loss=…`
  from ~0.85 falling towards 0.25.
- `vlm`: `--mode vlm` — `WaypointVLMDataset: dir=…`, `PaliGemma weights loaded: 603 params, 1
  missing, 0 unexpected`, `Model: 2923.3M total, …`, wandb, `Constructing tf.data.Dataset
  waypoint_filtered_rlds`, then `[VLM] step=N/30000 loss=…` from ~11.6 to 6–7 by step 50.
- `jax`: openpi's `scripts/train.py CONFIG --exp_name NAME` (seed 004) — its log format, then
  `Step N: grad_norm=…, loss=…, param_norm=…` with loss from ~0.135.

wandb prints its online banner (`wandb: 🚀 View run at https://wandb.ai/…`) or, with
`WANDB_MODE=offline` / `--wandb offline`, its offline lines; online without WANDB_API_KEY (or a
netrc entry) it fails as wandb does. `--fail oom|nan` emits a CUDA (or XLA) out-of-memory
traceback and exits 1, or logs NaN losses, at step `--fail-at`. `--resume` logs a resume line and
continues from `--start-step`. `--require-venv` fails like the real script run by a system
interpreter (`ModuleNotFoundError: No module named 'safetensors'`). `--hold` keeps the process
alive after the last step, like a long run. Standard library only.

Checkpoints (`--save-dir DIR --save-interval N`) are written and resumed the way the fork's
scripts/train_waypoint.py does at 2a67705 (lines 75-106; the same at 7de21c7, except that
7de21c7 comments out the `optimizer.pt` save at line 86 and still loads it at line 103, so its
`--resume` fails): after step N-1 the global step becomes N, and every N % interval == 0 writes
`DIR/tmp_N/` (model.safetensors, optimizer.pt, then metadata.pt with the global step), removes
an old `DIR/N`, and renames `tmp_N` to `N`. `--resume` takes the highest all-digit subdirectory
of DIR whatever it holds (`load_latest_checkpoint`), reads model, optimizer and metadata (a
missing one is the fork's FileNotFoundError), and continues at its global step. wandb's run id
goes to `DIR/wandb_run_id.txt` and is reused on resume (`init_wandb`, lines 128-150). torch
pickles are JSON here: there is no torch. `--ckpt-bytes` sizes model.safetensors, written in
`--ckpt-chunks` pieces `--ckpt-sleep` seconds apart, so a test can kill it mid-write.

    python fake_trainer.py --mode ae --config configs/waypoint_ae_libero.yaml --steps 5
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import TextIO

_TOTALS = {"ae": 10000, "vlm": 30000, "jax": 30000}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="stand-in for openpi's training scripts")
    parser.add_argument("config_name", nargs="?", help="openpi config name (JAX train.py)")
    parser.add_argument("--mode", choices=("ae", "vlm", "jax"))
    parser.add_argument("--config", help="YAML config (train_waypoint.py); must exist")
    parser.add_argument("--exp_name", "--exp-name", default="fake_experiment")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="steps to print")
    parser.add_argument("--total", type=int, help="total steps shown as step=N/TOTAL")
    parser.add_argument("--start-step", type=int, help="first step (default: 1000 on --resume)")
    parser.add_argument("--step-sleep", type=float, default=0.1)
    parser.add_argument("--startup-sleep", type=float, default=0.05)
    parser.add_argument("--fail", choices=("oom", "nan"))
    parser.add_argument("--fail-at", type=int, default=0, help="step of the failure")
    parser.add_argument("--wandb", choices=("online", "offline", "disabled"))
    parser.add_argument("--data-dir", default="/workspace/data")
    parser.add_argument("--require-venv", action="store_true")
    parser.add_argument("--hold", action="store_true", help="stay alive after the last step")
    parser.add_argument("--save-dir", help="checkpoint directory (the fork's save_dir)")
    parser.add_argument("--save-interval", type=int, default=1000)
    parser.add_argument("--ckpt-bytes", type=int, default=4096, help="size of model.safetensors")
    parser.add_argument("--ckpt-chunks", type=int, default=1)
    parser.add_argument("--ckpt-sleep", type=float, default=0.0, help="pause between chunks")
    # torch.distributed.launch (torchrun's predecessor) passes the local rank as an argument.
    parser.add_argument("--local-rank", "--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode is None:
        args.mode = "jax" if args.config_name else "ae"
    if args.total is None:
        args.total = _TOTALS[args.mode]
    if args.start_step is None:
        args.start_step = 1000 if args.resume else 0
    if args.wandb is None:
        args.wandb = os.environ.get("WANDB_MODE", "online")
    return args


def _say(text: str, stream: TextIO | None = None) -> None:
    print(text, file=stream or sys.stdout, flush=True)


def _traceback(script: str, frames: list[tuple[int, str, str]], error: str) -> None:
    """Print a Python traceback to stderr: (line, function, source) frames, then the error."""
    _say("Traceback (most recent call last):", sys.stderr)
    for line, func, source in frames:
        _say(f'  File "{script}", line {line}, in {func}', sys.stderr)
        _say(f"    {source}", sys.stderr)
    _say(error, sys.stderr)


def _fail_import(script: str) -> None:
    _traceback(
        script,
        [(12, "<module>", "from safetensors.torch import load_file")],
        "ModuleNotFoundError: No module named 'safetensors'",
    )
    sys.exit(1)


def _fail_oom(script: str, mode: str) -> None:
    if mode == "jax":
        _traceback(
            script,
            [(270, "<module>", "main(_config.cli())"), (226, "main", "train_state, info = ...")],
            "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while "
            "trying to allocate 25769803776 bytes.",
        )
        sys.exit(1)
    _traceback(
        script,
        [(611, "<module>", "main()"), (402, f"train_{mode}", "loss.backward()")],
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a "
        "total capacity of 95.59 GiB of which 1.06 GiB is free. Including non-PyTorch memory, "
        "this process has 94.52 GiB memory in use. Of the allocated memory 91.84 GiB is "
        "allocated by PyTorch, and 1.87 GiB is reserved by PyTorch but unallocated. If reserved "
        "but unallocated memory is large try setting "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See "
        "documentation for Memory Management  "
        "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
    )
    sys.exit(1)


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return "api.wandb.ai" in Path("~/.netrc").expanduser().read_text(encoding="utf-8")
    except OSError:
        return False


def _wandb(mode: str, name: str, script: str) -> None:
    """wandb.init's terminal output (wandb 0.19)."""
    if mode == "disabled":
        return
    run_id = uuid.uuid4().hex[:8]
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    version = "wandb: Tracking run with wandb version 0.19.11"
    if mode == "offline":
        _say(version, sys.stderr)
        _say("wandb: W&B syncing is set to `offline` in this directory.  ", sys.stderr)
        _say(
            "wandb: Run `wandb online` or set WANDB_MODE=online to enable cloud syncing.",
            sys.stderr,
        )
        _say(
            f"wandb: Run data is saved locally in {os.getcwd()}/wandb/offline-run-{stamp}-{run_id}",
            sys.stderr,
        )
        return
    if not _has_wandb_key():
        _traceback(
            script,
            [(512, "<module>", "wandb.init(project=cfg.wandb_project, name=cfg.exp_name)")],
            "wandb.errors.errors.UsageError: api_key not configured (no-tty). call "
            "wandb.login(key=[your_api_key])",
        )
        sys.exit(1)
    project = "https://wandb.ai/bootstrap/openpi-waypoint"
    for line in (
        "wandb: Currently logged in as: bootstrap to https://api.wandb.ai. Use `wandb login "
        "--relogin` to force relogin",
        version,
        f"wandb: Run data is saved locally in {os.getcwd()}/wandb/run-{stamp}-{run_id}",
        "wandb: Run `wandb offline` to turn off syncing.",
        f"wandb: Syncing run {name}",
        f"wandb: ⭐️ View project at {project}",
        f"wandb: 🚀 View run at {project}/runs/{run_id}",
    ):
        _say(line, sys.stderr)


def _loss(mode: str, step: int, rng: random.Random) -> float:
    """Loss curves with the seeds' figures: AE 0.85 → 0.25; VLM 11.6 → 6.5 at 50 → 4.7 at 500."""
    if mode == "ae":
        base = 0.25 + 0.6 * math.exp(-step / 200)
    elif mode == "vlm":
        base = 4.2 + 2.5 * math.exp(-step / 300) + 4.9 * math.exp(-step / 15)
    else:
        base = 0.035 + 0.1 * math.exp(-step / 2000)
    return base * (1 + rng.uniform(-0.02, 0.02))


def _jax_log(message: str, line: int) -> None:
    """One line in openpi's `init_logging` format."""
    now = datetime.datetime.now()
    stamp = now.strftime("%H:%M:%S") + f".{now.microsecond // 1000:03d}"
    _say(f"{stamp} [I] {message:<80} ({os.getpid()}:train.py:{line})")


def _startup(args: argparse.Namespace, script: str) -> None:
    pause = args.startup_sleep
    if args.mode == "jax":
        _jax_log(f"Running on: {platform.node()}", 195)
        time.sleep(pause)
        _wandb(args.wandb, args.exp_name, script)
        if args.resume:
            _jax_log(f"Restoring checkpoint from step {args.start_step}", 240)
        _jax_log("Initialized data loader:", 224)
        time.sleep(pause)
        _jax_log("Initialized train state:", 236)
        return
    if args.mode == "ae":
        steps = [
            "WaypointAEDataset: 454 episodes, 8409 valid pairs",
            "Loaded 811 weight tensors, skipped 1",
            "Constructing tf.data.Dataset libero_object",
            "wandb",
            "Model: 3617.8M total, 3617.8M trainable",
        ]
    else:
        wp = f"{args.data_dir}/libero/libero_object_wp_001/waypoint_filtered_rlds__libero/1.0.0"
        steps = [
            f"WaypointVLMDataset: dir={wp}, M=7, stride=4, robot=libero",
            "PaliGemma weights loaded: 603 params, 1 missing, 0 unexpected",
            "Model: 2923.3M total, 2923.3M trainable",
            "wandb",
            "Constructing tf.data.Dataset waypoint_filtered_rlds",
        ]
    for line in steps:
        if line == "wandb":
            _wandb(args.wandb, Path(args.config or "waypoint").stem, script)
        else:
            _say(line)
        time.sleep(pause)
    if args.resume:
        # The fork's resume message is not in the seeds; this one names the step it resumes at.
        _say(f"Resuming from checkpoint at step {args.start_step}")


def _step_line(args: argparse.Namespace, step: int, loss: float, rng: random.Random) -> str:
    if args.mode == "jax":
        grad = 0.9 * math.exp(-step / 5000) + 0.1 + rng.uniform(0, 0.05)
        grad_text = "nan" if math.isnan(loss) else f"{grad:.4f}"
        return f"Step {step}: grad_norm={grad_text}, loss={loss:.4f}, param_norm=1802.4451"
    tag = "AE" if args.mode == "ae" else "VLM"
    return f"[{tag}] step={step}/{args.total} loss={loss:.4f}"


def _save_checkpoint(args: argparse.Namespace, step: int) -> None:
    """`save_checkpoint` of the fork (see the module doc): tmp_N, then renamed to N."""
    save_dir = Path(args.save_dir)
    final_dir, tmp_dir = save_dir / str(step), save_dir / f"tmp_{step}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(step)
    chunks = max(1, args.ckpt_chunks)
    with open(tmp_dir / "model.safetensors", "wb") as fh:
        for i in range(chunks):
            size = args.ckpt_bytes // chunks + (args.ckpt_bytes % chunks if i == chunks - 1 else 0)
            fh.write(rng.randbytes(size))
            fh.flush()
            time.sleep(args.ckpt_sleep)
    (tmp_dir / "optimizer.pt").write_text(json.dumps({"state": {}, "step": step}))
    meta = {"global_step": step, "timestamp": time.time()}
    (tmp_dir / "metadata.pt").write_text(json.dumps(meta))
    if final_dir.exists():
        shutil.rmtree(final_dir)
    tmp_dir.rename(final_dir)
    _say(f"Saved checkpoint step {step} -> {final_dir}")


def _load_latest_checkpoint(save_dir: Path, script: str) -> int:
    """`load_latest_checkpoint` of the fork: the highest all-digit directory, read whole."""
    steps = [int(d.name) for d in save_dir.iterdir() if d.is_dir() and d.name.isdigit()]
    if not steps:
        return 0
    ckpt = save_dir / str(max(steps))
    for name in ("model.safetensors", "optimizer.pt", "metadata.pt"):
        if not (ckpt / name).is_file():
            _traceback(
                script,
                [(248, "train_ae", "global_step = load_latest_checkpoint(...)")],
                f"FileNotFoundError: [Errno 2] No such file or directory: '{ckpt / name}'",
            )
            sys.exit(1)
    step = int(json.loads((ckpt / "metadata.pt").read_text())["global_step"])
    _say(f"Resumed from step {step}")
    return step


def _wandb_run_id(save_dir: Path, resuming: bool) -> None:
    """`init_wandb`'s run id file: reused when resuming, else a new run writes it."""
    path = save_dir / "wandb_run_id.txt"
    if resuming and path.exists():
        _say(f"wandb: Resuming run {path.read_text().strip()}", sys.stderr)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(uuid.uuid4().hex[:8])


def main(argv: list[str]) -> None:
    args = _parse(argv)
    script = os.path.abspath(sys.argv[0])
    if args.require_venv and sys.prefix == sys.base_prefix:
        _fail_import(script)
    if args.config and not Path(args.config).is_file():
        _traceback(
            script,
            [(590, "main", "cfg = load_config(args.config)")],
            f"FileNotFoundError: [Errno 2] No such file or directory: '{args.config}'",
        )
        sys.exit(1)
    if int(os.environ.get("RANK", "0")) != 0:
        # Other DDP ranks stay quiet, as in openpi: only rank 0 logs.
        while args.hold:
            time.sleep(3600)
        return
    rng = random.Random(0)
    if args.save_dir and args.resume:
        args.start_step = _load_latest_checkpoint(Path(args.save_dir), script)
    _startup(args, script)
    if args.save_dir and args.wandb != "disabled":
        _wandb_run_id(Path(args.save_dir), args.resume)
    for step in range(args.start_step, min(args.start_step + args.steps, args.total)):
        if args.fail == "oom" and step >= args.fail_at:
            _fail_oom(script, args.mode)
        loss = _loss(args.mode, step, rng)
        if args.fail == "nan" and step >= args.fail_at:
            loss = float("nan")
        _say(_step_line(args, step, loss, rng))
        time.sleep(args.step_sleep)
        if args.save_dir and (step + 1) % args.save_interval == 0:
            _save_checkpoint(args, step + 1)
    while args.hold:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1:])
