#!/usr/bin/env python3
"""A stand-in trainer that logs what openpi's training scripts log, for boxes without a GPU.

Derived from the real source, not from the seeds' prose (where they disagree, the code wins):

- `ae` / `vlm`: the fork's `scripts/train_waypoint.py` (CharlieXie/openpi, branch
  pytorch_lora_blackwell), at `--commit 2a67705` (the seed-validated one, the default) or
  `--commit 7de21c7` (HEAD). Per rank, in the order the code runs:
  - HEAD only: `Config file: …`, `Training mode: …` (main, lines 654-655, every rank); rank 0:
    `GPU 0: … | Total memory: …` and the `Configuration Summary` block (666-667).
  - every rank: `Loading waypoint indices from …` and `WaypointAEDataset: 454 episodes, 8409
    valid pairs, …` (src/openpi/waypoint/ae_dataset.py:76, :97), or `WaypointVLMDataset: dir=…,
    M=7, stride=4, robot=libero` (vlm_dataset.py:57; HEAD adds `, image_aug=False`, :93);
    `Loading pretrained weights from …`, `  Skipping time_mlp_in.weight: …`, `Loaded 811 weight
    tensors, skipped 1` (train_waypoint.py@2a67705:191-208), or `Loading pretrained PaliGemma
    weights from …` and `PaliGemma weights loaded: 603 params, 1 missing, 0 unexpected`
    (:387, :401); with `--resume` and a checkpoint, `Resumed from step N` (:105).
  - rank 0 only: wandb's banner from `init_wandb` (:250 / :445; other ranks call
    `wandb.init(mode="disabled")`, silent), *then* `Model: 3617.8M total, 3617.8M trainable`
    (:254 / :449): wandb comes first for the VLM too, unlike seed 003 §13.2's table.
  - every rank, when the loader first iterates (after `Model:` on rank 0, but a non-zero rank
    gets there as soon as DDP is built, so its copy may come before rank 0's wandb lines):
    tfds' `Constructing tf.data.Dataset libero_object_no_noops for split train, from …`
    (ae_dataset.py:127-128, vlm_dataset.py:83-84).
  - rank 0: `[AE] step=N/TOTAL loss=… lr=… gnorm=… sps=…` every `log_interval` steps from the
    first one (:316; HEAD adds ` gpu=…GB eta=…min`), `[VLM] …` likewise (:491).
  Checkpoints (rank 0, after step N when N % save_interval == 0, :75-92): written to
  `checkpoint_dir/tmp_N/` then renamed to `checkpoint_dir/N/`, holding `model.safetensors`,
  `optimizer.pt` (not since d30a12f: HEAD comments it out) and `metadata.pt` (here JSON text
  `{"global_step": N}`, there a torch pickle), then `Saved checkpoint step N -> DIR`; the wandb
  run id goes to `checkpoint_dir/wandb_run_id.txt` (:134-146). `--resume` (:95-106) loads the
  highest numbered directory: none means step 0 without a word; one without `optimizer.pt`
  (any checkpoint HEAD wrote) crashes with `FileNotFoundError: … optimizer.pt`; otherwise
  `Resumed from step N`, and wandb resumes the run named in wandb_run_id.txt. `--save-dir`
  and `--save-interval` override the config's checkpoint_dir and save_interval (default 1000,
  as the code's); `--ckpt-bytes` sizes model.safetensors, written in `--ckpt-chunks` pieces
  `--ckpt-sleep` seconds apart, so a test can kill it mid-write.
- `jax`: upstream openpi's `scripts/train.py CONFIG --exp_name NAME` (Physical-Intelligence/
  openpi 15a9616): `Running on: HOST` (:196), wandb (:218), `Initialized data loader:` (:227),
  `Initialized train state:` (:238), restore on resume (:241), then `Step N: grad_norm=…,
  loss=…, param_norm=…` every log_interval steps (:267).

Each process is one rank (RANK from torchrun); lines use the scripts' `init_logging` format
(`HH:MM:SS.mmm [I] message… (pid:file:line)`). wandb prints its online banner, or with
`WANDB_MODE=offline` / `--wandb offline` its offline lines, nothing when disabled (mode or
`wandb_enabled: false` in the config); online without WANDB_API_KEY (or a netrc entry) it fails
as wandb does. `--fail oom|nan` emits a CUDA (or XLA) out-of-memory traceback and exits 1, or
logs NaN losses, at step `--fail-at`. `--start-step` overrides the step a `--resume` starts at.
`--require-venv` fails like the real script run by a system interpreter. Two departures, for
tests: without a config (or `--log-interval`) it logs every step (the code's default is 50),
and losses follow the seeds' curves instead of a model. `--hold` keeps the
process alive after the last step, like a long run. Standard library only.

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
#: The fork's commits the `ae`/`vlm` modes follow: the seed-validated one and HEAD.
COMMITS = ("2a67705", "7de21c7")
_SCRIPT = "train_waypoint.py"


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="stand-in for openpi's training scripts")
    parser.add_argument("config_name", nargs="?", help="openpi config name (JAX train.py)")
    parser.add_argument("--mode", choices=("ae", "vlm", "jax"))
    parser.add_argument("--config", help="YAML config (train_waypoint.py); must exist")
    parser.add_argument("--commit", choices=COMMITS, default=COMMITS[0])
    parser.add_argument("--exp_name", "--exp-name", default="fake_experiment")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--steps", type=int, default=20, help="steps to run")
    parser.add_argument("--total", type=int, help="total steps shown as step=N/TOTAL")
    parser.add_argument("--start-step", type=int, help="first step (default: the checkpoint's)")
    parser.add_argument("--log-interval", type=int, help="default: the config's, else 1")
    parser.add_argument("--save-interval", type=int, help="default: the config's, else 1000")
    parser.add_argument("--save-dir", help="checkpoint directory (default: the config's)")
    parser.add_argument("--ckpt-bytes", type=int, default=4096, help="size of model.safetensors")
    parser.add_argument("--ckpt-chunks", type=int, default=1)
    parser.add_argument("--ckpt-sleep", type=float, default=0.0, help="pause between chunks")
    parser.add_argument("--step-sleep", type=float, default=0.1)
    parser.add_argument("--startup-sleep", type=float, default=0.05)
    parser.add_argument("--fail", choices=("oom", "nan"))
    parser.add_argument("--fail-at", type=int, default=0, help="step of the failure")
    parser.add_argument("--wandb", choices=("online", "offline", "disabled"))
    parser.add_argument("--data-dir", default="/workspace/data")
    parser.add_argument("--require-venv", action="store_true")
    parser.add_argument("--hold", action="store_true", help="stay alive after the last step")
    # torch.distributed.launch (torchrun's predecessor) passes the local rank as an argument.
    parser.add_argument("--local-rank", "--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode is None:
        args.mode = "jax" if args.config_name else "ae"
    if args.wandb is None:
        args.wandb = os.environ.get("WANDB_MODE", "online")
    return args


def read_config(path: str | None) -> dict[str, str]:
    """The top-level `key: value` pairs of a YAML config (all the trainer reads of it here)."""
    config: dict[str, str] = {}
    if not path:
        return config
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split(" #", 1)[0].rstrip()
        if ":" in line and not line.startswith((" ", "#")):
            key, value = line.split(":", 1)
            config[key.strip()] = value.strip().strip("'\"")
    return config


def _say(text: str, stream: TextIO | None = None) -> None:
    # One write per line, as logging's StreamHandler does: ranks sharing a pipe interleave
    # whole lines, never halves.
    out = stream or sys.stdout
    out.write(text + "\n")
    out.flush()


def _log(message: str, where: str) -> None:
    """One line in the scripts' `init_logging` format, on stderr as logging's StreamHandler."""
    now = datetime.datetime.now()
    stamp = now.strftime("%H:%M:%S") + f".{now.microsecond // 1000:03d}"
    _say(f"{stamp} [I] {message:<80} ({os.getpid()}:{where})", sys.stderr)


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
        [(23, "<module>", "import safetensors.torch")],
        "ModuleNotFoundError: No module named 'safetensors'",
    )
    sys.exit(1)


def _fail_oom(script: str, mode: str) -> None:
    if mode == "jax":
        _traceback(
            script,
            [(280, "<module>", "main(_config.cli())"), (261, "main", "train_state, info = ...")],
            "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while "
            "trying to allocate 25769803776 bytes.",
        )
        sys.exit(1)
    _traceback(
        script,
        [(544, "<module>", "main()"), (300, f"train_{mode}", "loss.backward()")],
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


def _wandb(mode: str, name: str, script: str, resume_id: str | None = None) -> str | None:
    """wandb.init's terminal output (wandb 0.19, on stderr); returns the run id (None: off)."""
    if mode == "disabled":
        return None
    run_id = resume_id or uuid.uuid4().hex[:8]
    stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
    version = "wandb: Tracking run with wandb version 0.19.11"
    if mode == "offline":
        _say(version, sys.stderr)
        if resume_id:
            _say(f"wandb: Resuming run {run_id}", sys.stderr)
        _say("wandb: W&B syncing is set to `offline` in this directory.  ", sys.stderr)
        _say(
            "wandb: Run `wandb online` or set WANDB_MODE=online to enable cloud syncing.",
            sys.stderr,
        )
        _say(
            f"wandb: Run data is saved locally in {os.getcwd()}/wandb/offline-run-{stamp}-{run_id}",
            sys.stderr,
        )
        return run_id
    if not _has_wandb_key():
        _traceback(
            script,
            [(137, "init_wandb", "wandb.init(")],
            "wandb.errors.errors.UsageError: api_key not configured (no-tty). call "
            "wandb.login(key=[your_api_key])",
        )
        sys.exit(1)
    project = "https://wandb.ai/bootstrap/waypoint_vla"
    syncing = f"wandb: Resuming run {run_id}" if resume_id else f"wandb: Syncing run {name}"
    for line in (
        "wandb: Currently logged in as: bootstrap to https://api.wandb.ai. Use `wandb login "
        "--relogin` to force relogin",
        version,
        f"wandb: Run data is saved locally in {os.getcwd()}/wandb/run-{stamp}-{run_id}",
        "wandb: Run `wandb offline` to turn off syncing.",
        syncing,
        f"wandb: ⭐️ View project at {project}",
        f"wandb: 🚀 View run at {project}/runs/{run_id}",
    ):
        _say(line, sys.stderr)
    return run_id


def _loss(mode: str, step: int, rng: random.Random) -> float:
    """Loss curves with the seeds' figures: AE 0.85 → 0.25; VLM 11.6 → 6.5 at 50 → 4.7 at 500."""
    if mode == "ae":
        base = 0.25 + 0.6 * math.exp(-step / 200)
    elif mode == "vlm":
        base = 4.2 + 2.5 * math.exp(-step / 300) + 4.9 * math.exp(-step / 15)
    else:
        base = 0.035 + 0.1 * math.exp(-step / 2000)
    return base * (1 + rng.uniform(-0.02, 0.02))


class Waypoint:
    """One rank of `scripts/train_waypoint.py --mode ae|vlm` (see the module doc)."""

    def __init__(self, args: argparse.Namespace, script: str) -> None:
        self.args = args
        self.script = script
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.head = args.commit == COMMITS[1]
        self.cfg = read_config(args.config)
        self.mode = args.mode
        self.total = args.total or int(self.cfg.get("num_train_steps", _TOTALS[self.mode]))
        self.log_interval = args.log_interval or int(self.cfg.get("log_interval", 1))
        self.save_interval = args.save_interval or int(self.cfg.get("save_interval", 1000))
        name = self.cfg.get("exp_name", f"waypoint_{self.mode}")
        self.exp_name = name
        self.ckpt_dir = Path(
            args.save_dir
            or (
                self.cfg.get("checkpoint_dir", "checkpoints/{exp_name}").format(exp_name=name)
                if self.head
                else self.cfg.get("checkpoint_dir", f"checkpoints/waypoint_{self.mode}")
            )
        )

    def run(self) -> None:
        """main(): the rank's lines, checkpoints and steps."""
        pause = self.args.startup_sleep
        if self.head:
            _log(f"Config file: {os.path.abspath(self.args.config or 'config.yaml')}", "654")
            _log(f"Training mode: {self.mode}", "655")
        if self.head and self.rank == 0:
            _log(
                f"GPU {self.rank}: NVIDIA RTX PRO 6000 Blackwell  |  Total memory: 94.97 GB", "567"
            )
            self._config_summary()
        self._dataset()
        time.sleep(pause)
        self._weights()
        time.sleep(pause)
        step = self._resume()
        if self.rank == 0:
            time.sleep(pause)  # wandb.init talks to its service: the other ranks run ahead
            self._init_wandb(step > 0 or self.args.resume)
            total = "3617.8" if self.mode == "ae" else "2923.3"
            _log(f"Model: {total}M total, {total}M trainable", self._line(254, 449))
            if self.head and self.mode == "ae":
                _log("Dataset: 8,409 sample pairs", "270")
        self._tfds()
        self._train(step)

    def _line(self, ae: int, vlm: int) -> str:
        return f"{_SCRIPT}:{ae if self.mode == 'ae' else vlm}"

    def _config_summary(self) -> None:
        rule = "=" * 72
        batch = self.cfg.get("batch_size", "32")
        for text in (
            rule,
            f"  WAYPOINT {self.mode.upper()} TRAINING — Configuration Summary",
            rule,
            f"  Mode:                  {self.mode}",
            f"  DDP:                   {self.world > 1}  (world_size={self.world})",
            f"  Batch size (per GPU):  {batch}",
            f"  Num train steps:       {self.total}",
            f"  Checkpoint dir:        {self.cfg.get('checkpoint_dir', 'N/A')}",
            f"  Save interval:         {self.cfg.get('save_interval', 1000)} steps",
            f"  Resume:                {self.args.resume}",
            rule,
        ):
            _log(text, f"{_SCRIPT}:{600}")

    def _dataset(self) -> None:
        if self.mode == "ae":
            indices = self.cfg.get("wp_indices_path", f"{self.args.data_dir}/waypoint_indices.json")
            _log(f"Loading waypoint indices from {indices}", "ae_dataset.py:76")
            _log(
                "WaypointAEDataset: 454 episodes, 8409 valid pairs, 0 skipped (dur>32), "
                "actual_action=7→32, actual_proprio=8→32",
                "ae_dataset.py:97",
            )
            return
        wp = self.cfg.get(
            "wp_rlds_dir",
            f"{self.args.data_dir}/libero/libero_object_wp_001/waypoint_filtered_rlds__libero/1.0.0",
        )
        tail = ", image_aug=False" if self.head else ""
        _log(
            f"WaypointVLMDataset: dir={wp}, M=7, stride=4, robot=libero{tail}",
            "vlm_dataset.py:93" if self.head else "vlm_dataset.py:57",
        )

    def _weights(self) -> None:
        source = self.cfg.get("pretrained_weight_path", "/workspace/models/pi05_base_pytorch")
        if self.mode == "ae":
            _log(f"Loading pretrained weights from {source}", f"{_SCRIPT}:191")
            _log(
                "  Skipping time_mlp_in.weight: shape torch.Size([1024, 1024]) != "
                "torch.Size([1024, 2048])",
                f"{_SCRIPT}:203",
            )
            _log("Loaded 811 weight tensors, skipped 1", f"{_SCRIPT}:208")
            return
        _log(f"Loading pretrained PaliGemma weights from {source}", f"{_SCRIPT}:387")
        _log("PaliGemma weights loaded: 603 params, 1 missing, 0 unexpected", f"{_SCRIPT}:401")

    def _resume(self) -> int:
        """load_latest_checkpoint: the step to start at (0 without --resume or a checkpoint)."""
        if not self.args.resume:
            return 0
        if self.args.start_step is not None:
            _log(f"Resumed from step {self.args.start_step}", f"{_SCRIPT}:105")
            return int(self.args.start_step)
        steps = [int(d.name) for d in self._ckpt_entries() if d.is_dir() and d.name.isdigit()]
        if not steps:
            return 0
        latest = self.ckpt_dir / str(max(steps))
        # Read in the code's order (lines 102-104); HEAD's checkpoints stop at optimizer.pt.
        for name, line in (("model.safetensors", 102), ("optimizer.pt", 103), ("metadata.pt", 104)):
            if not (latest / name).is_file():
                _traceback(
                    self.script,
                    [(line, "load_latest_checkpoint", f"torch.load(ckpt / {name!r}, ...)")],
                    f"FileNotFoundError: [Errno 2] No such file or directory: '{latest / name}'",
                )
                sys.exit(1)
        meta = json.loads((latest / "metadata.pt").read_text(encoding="utf-8"))
        _log(f"Resumed from step {meta['global_step']}", f"{_SCRIPT}:105")
        return int(meta["global_step"])

    def _ckpt_entries(self) -> list[Path]:
        return list(self.ckpt_dir.iterdir()) if self.ckpt_dir.is_dir() else []

    def _init_wandb(self, resuming: bool) -> None:
        mode = self.args.wandb
        if self.cfg.get("wandb_enabled", "true").lower() == "false":
            mode = "disabled"
        id_file = self.ckpt_dir / "wandb_run_id.txt"
        resume_id = id_file.read_text().strip() if resuming and id_file.exists() else None
        run_id = _wandb(mode, self.exp_name, self.script, resume_id)
        if run_id is not None and resume_id is None:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run_id)

    def _tfds(self) -> None:
        if self.mode == "ae":
            name = "libero_object_no_noops"
            where = self.cfg.get(
                "original_rlds_dir", f"{self.args.data_dir}/libero_object_no_noops"
            )
        else:
            name = "waypoint_filtered_rlds"
            where = self.cfg.get("wp_rlds_dir", f"{self.args.data_dir}/waypoint_filtered_rlds")
        _log(
            f"Constructing tf.data.Dataset {name} for split train, from {where}",
            "logging_logger.py:49",
        )

    def _train(self, start: int) -> None:
        rng = random.Random(start)
        tag = "AE" if self.mode == "ae" else "VLM"
        for step in range(start, min(start + self.args.steps, self.total)):
            if self.args.fail == "oom" and step >= self.args.fail_at:
                _fail_oom(self.script, self.mode)
            loss = _loss(self.mode, step, rng)
            if self.args.fail == "nan" and step >= self.args.fail_at:
                loss = float("nan")
            if self.rank == 0 and step % self.log_interval == 0:
                line = (
                    f"[{tag}] step={step}/{self.total} loss={loss:.4f} lr=4.29e-06 gnorm=1.52 "
                    f"sps={1 / max(self.args.step_sleep, 1e-3):.1f}"
                )
                if self.head:
                    line += f" gpu={78.7 if self.mode == 'ae' else 91.5}GB eta=0min"
                _log(line, self._line(316, 491))
            time.sleep(self.args.step_sleep)
            if self.rank == 0 and self.save_interval and (step + 1) % self.save_interval == 0:
                self._save(step + 1)

    def _save(self, step: int) -> None:
        """save_checkpoint: tmp_N written, then renamed to N."""
        tmp, final = self.ckpt_dir / f"tmp_{step}", self.ckpt_dir / str(step)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        rng, chunks = random.Random(step), max(1, self.args.ckpt_chunks)
        size = self.args.ckpt_bytes
        with open(tmp / "model.safetensors", "wb") as fh:
            for i in range(chunks):
                fh.write(rng.randbytes(size // chunks + (size % chunks if i == chunks - 1 else 0)))
                fh.flush()
                time.sleep(self.args.ckpt_sleep)
        if not self.head:
            (tmp / "optimizer.pt").write_text(json.dumps({"state": {}, "step": step}))
        meta = {"global_step": step, "timestamp": time.time()}
        (tmp / "metadata.pt").write_text(json.dumps(meta), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _log(f"Saved checkpoint step {step} -> {final}", f"{_SCRIPT}:92")


def _jax(args: argparse.Namespace, script: str) -> None:
    """Upstream `scripts/train.py` (see the module doc)."""

    def log(message: str, line: int) -> None:
        _log(message, f"train.py:{line}")

    start = args.start_step if args.start_step is not None else (1000 if args.resume else 0)
    log(f"Running on: {platform.node()}", 196)
    time.sleep(args.startup_sleep)
    _wandb(args.wandb, args.exp_name, script)
    log("Initialized data loader:\n[0].images['base_0_rgb']: (32, 224, 224, 3)@float32", 227)
    time.sleep(args.startup_sleep)
    log("Initialized train state:\n['PaliGemma']['img']['Transformer']: …", 238)
    if args.resume:
        log(f"Restoring checkpoint from step {start}", 241)
    rng = random.Random(0)
    interval = args.log_interval or 1
    for step in range(start, start + args.steps):
        if args.fail == "oom" and step >= args.fail_at:
            _fail_oom(script, "jax")
        loss = _loss("jax", step, rng)
        if args.fail == "nan" and step >= args.fail_at:
            loss = float("nan")
        if step % interval == 0:
            grad = 0.9 * math.exp(-step / 5000) + 0.1 + rng.uniform(0, 0.05)
            grad_text = "nan" if math.isnan(loss) else f"{grad:.4f}"
            _say(f"Step {step}: grad_norm={grad_text}, loss={loss:.4f}, param_norm=1802.4451")
        time.sleep(args.step_sleep)


def main(argv: list[str]) -> None:
    args = _parse(argv)
    script = os.path.abspath(sys.argv[0])
    if args.require_venv and sys.prefix == sys.base_prefix:
        _fail_import(script)
    if args.config and not Path(args.config).is_file():
        _traceback(
            script,
            [(526, "main", "with open(args.config) as f:")],
            f"FileNotFoundError: [Errno 2] No such file or directory: '{args.config}'",
        )
        sys.exit(1)
    if args.mode == "jax":
        if int(os.environ.get("RANK", "0")) == 0:
            _jax(args, script)
    else:
        Waypoint(args, script).run()
    while args.hold:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1:])
