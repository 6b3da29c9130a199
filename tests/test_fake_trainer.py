"""The stand-in trainer prints the lines and figures of RUNBOOK.md A / seed 003 §13 / seed 004."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

TRAINER = Path(__file__).resolve().parents[1] / "provision" / "data" / "fake_trainer.py"


def run(
    *args: str, env: dict[str, str] | None = None, python: str = sys.executable
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    return subprocess.run(
        [python, str(TRAINER), "--step-sleep", "0", "--startup-sleep", "0", *args],
        env={**base, "HOME": "/nonexistent", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )


def losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"loss=([\d.]+|nan)", text)]


def test_vlm_lines_in_order_and_loss_curve() -> None:
    out = run("--mode", "vlm", "--steps", "60", env={"WANDB_API_KEY": "k" * 86}).stdout
    order = [
        "WaypointVLMDataset: dir=/workspace/data/libero/libero_object_wp_001/"
        "waypoint_filtered_rlds__libero/1.0.0, M=7, stride=4, robot=libero",
        "PaliGemma weights loaded: 603 params, 1 missing, 0 unexpected",
        "Model: 2923.3M total, 2923.3M trainable",
        "wandb: 🚀 View run at https://wandb.ai/",
        "Constructing tf.data.Dataset waypoint_filtered_rlds",
        "[VLM] step=0/30000 loss=",
    ]
    positions = [out.index(line) for line in order]
    assert positions == sorted(positions)
    curve = losses(out)
    assert 11 <= curve[0] <= 12 and 6 <= curve[50] <= 7


def test_ae_loss_starts_in_range_and_falls() -> None:
    out = run("--mode", "ae", "--steps", "3", "--wandb", "offline").stdout
    assert "Model: 3617.8M total, 3617.8M trainable" in out
    curve = losses(out)
    assert 0.7 <= curve[0] <= 1.0
    late = losses(run("--start-step", "2000", "--steps", "1", "--wandb", "disabled").stdout)
    assert 0.2 <= late[0] <= 0.3


def test_jax_mode_prints_openpi_train_py_lines() -> None:
    out = run("pi05_custom", "--exp_name", "x", "--steps", "2", "--wandb", "offline").stdout
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{3} \[I\] Running on: ", out, re.M)
    steps = re.findall(
        r"^Step (\d+): grad_norm=[\d.]+, loss=([\d.]+), param_norm=[\d.]+$", out, re.M
    )
    assert [s for s, _ in steps] == ["0", "1"]
    assert 0.12 <= float(steps[0][1]) <= 0.15
    resumed = run("pi05_custom", "--resume", "--steps", "1", "--wandb", "disabled").stdout
    assert "Restoring checkpoint from step 1000" in resumed and "Step 1000:" in resumed


def test_wandb_online_without_a_key_fails_as_wandb_does() -> None:
    done = run("--steps", "1")
    assert done.returncode == 1
    assert "wandb.errors.errors.UsageError: api_key not configured (no-tty)" in done.stdout


def test_failures() -> None:
    oom = run("--fail", "oom", "--wandb", "disabled")
    assert oom.returncode == 1 and "torch.OutOfMemoryError: CUDA out of memory." in oom.stdout
    assert "[AE] step=" not in oom.stdout
    nan = run("--fail", "nan", "--fail-at", "1", "--steps", "3", "--wandb", "disabled")
    assert [str(x) for x in losses(nan.stdout)[1:]] == ["nan", "nan"]
    jax = run("pi05_custom", "--fail", "oom", "--wandb", "disabled")
    assert "RESOURCE_EXHAUSTED: Out of memory" in jax.stdout
    missing = run("--config", "configs/none.yaml")
    assert "FileNotFoundError: [Errno 2] No such file or directory: 'configs/none.yaml'" in (
        missing.stdout
    )
    system = str(Path(sys.base_prefix) / "bin" / "python3")  # not a venv, whatever runs pytest
    venv = run("--require-venv", "--wandb", "disabled", python=system)
    assert "ModuleNotFoundError: No module named 'safetensors'" in venv.stdout
