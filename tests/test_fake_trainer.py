"""The stand-in trainer prints the lines and figures of RUNBOOK.md A / seed 003 §13 / seed 004."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TRAINER = Path(__file__).resolve().parents[1] / "provision" / "data" / "fake_trainer.py"


def run(
    *args: str, env: dict[str, str] | None = None, python: str = sys.executable
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    # In a directory of its own: init_wandb writes checkpoints/<run>/wandb_run_id.txt there.
    with tempfile.TemporaryDirectory(prefix="fake-trainer-") as cwd:
        return subprocess.run(
            [python, str(TRAINER), "--step-sleep", "0", "--startup-sleep", "0", *args],
            cwd=cwd,
            env={**base, "HOME": "/nonexistent", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )


def losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"loss=([\d.]+|nan)", text)]


def _order(out: str, lines: list[str]) -> list[int]:
    return [out.index(line) for line in lines]


def test_vlm_lines_in_the_code_order_and_loss_curve() -> None:
    out = run("--mode", "vlm", "--steps", "60", env={"WANDB_API_KEY": "k" * 86}).stdout
    # train_waypoint.py@2a67705: init_wandb (:445) before `Model:` (:449), then the loader.
    order = [
        "WaypointVLMDataset: dir=/workspace/data/libero/libero_object_wp_001/"
        "waypoint_filtered_rlds__libero/1.0.0, M=7, stride=4, robot=libero",
        "PaliGemma weights loaded: 603 params, 1 missing, 0 unexpected",
        "wandb: 🚀 View run at https://wandb.ai/",
        "Model: 2923.3M total, 2923.3M trainable",
        "Constructing tf.data.Dataset waypoint_filtered_rlds",
        "[VLM] step=0/30000 loss=",
    ]
    positions = _order(out, order)
    assert positions == sorted(positions)
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{3} \[I\] Model: 2923\.3M .* \(\d+:train_waypoint\.py:449\)$",
                     out, re.M)  # fmt: skip
    curve = losses(out)
    assert 11 <= curve[0] <= 12 and 6 <= curve[50] <= 7


def test_ae_lines_in_the_code_order_and_loss() -> None:
    out = run("--mode", "ae", "--steps", "3", "--wandb", "offline").stdout
    order = [
        "WaypointAEDataset: 454 episodes, 8409 valid pairs",
        "Skipping time_mlp_in.weight",
        "Loaded 811 weight tensors, skipped 1",
        "wandb: W&B syncing is set to `offline`",
        "Model: 3617.8M total, 3617.8M trainable",
        "Constructing tf.data.Dataset libero_object_no_noops",
        "[AE] step=0/10000 loss=",
    ]
    positions = _order(out, order)
    assert positions == sorted(positions)
    curve = losses(out)
    assert 0.7 <= curve[0] <= 1.0
    late = losses(
        run("--resume", "--start-step", "2000", "--steps", "1", "--wandb", "disabled").stdout
    )
    assert 0.2 <= late[0] <= 0.3


def test_other_ranks_log_their_own_lines_only() -> None:
    out = run("--mode", "ae", "--steps", "3", env={"RANK": "1", "WORLD_SIZE": "2"}).stdout
    assert "Loaded 811 weight tensors, skipped 1" in out and "Constructing tf.data" in out
    assert "wandb" not in out and "Model:" not in out and "[AE] step" not in out


def _config(tmp_path: Path) -> str:
    (tmp_path / "ae.yaml").write_text(
        "exp_name: waypoint_ae_libero\ncheckpoint_dir: checkpoints/waypoint_ae_libero\n"
        "save_interval: 2\nlog_interval: 2\n"
    )
    return str(tmp_path / "ae.yaml")


def _in(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    return subprocess.run(
        [sys.executable, str(TRAINER), "--step-sleep", "0", "--startup-sleep", "0", *args],
        cwd=tmp_path, env={**base, "HOME": "/nonexistent"}, capture_output=True, text=True,
        check=False,
    )  # fmt: skip


def test_checkpoints_and_resume_at_the_seed_commit(tmp_path: Path) -> None:
    config = _config(tmp_path)
    first = _in(tmp_path, "--config", config, "--steps", "5", "--wandb", "offline")
    assert first.returncode == 0, first.stderr
    ckpts = tmp_path / "checkpoints" / "waypoint_ae_libero"
    assert sorted(p.name for p in ckpts.iterdir()) == ["2", "4", "wandb_run_id.txt"]
    assert sorted(p.name for p in (ckpts / "4").iterdir()) == [
        "metadata.pt", "model.safetensors", "optimizer.pt"
    ]  # fmt: skip
    assert "Saved checkpoint step 4 -> checkpoints/waypoint_ae_libero/4" in first.stderr
    assert re.findall(r"\[AE\] step=(\d+)/", first.stderr) == ["0", "2", "4"]
    again = _in(tmp_path, "--config", config, "--steps", "2", "--resume", "--wandb", "offline")
    assert again.returncode == 0, again.stderr
    assert "Resumed from step 4" in again.stderr
    assert re.findall(r"\[AE\] step=(\d+)/", again.stderr) == ["4"]


def test_resume_without_a_checkpoint_starts_at_zero_silently(tmp_path: Path) -> None:
    done = _in(
        tmp_path, "--config", _config(tmp_path), "--steps", "1", "--resume", "--wandb", "disabled"
    )
    assert "Resumed" not in done.stderr and "[AE] step=0/" in done.stderr


def test_head_writes_no_optimizer_state_and_its_resume_crashes(tmp_path: Path) -> None:
    config = _config(tmp_path)
    head = ("--commit", "7de21c7", "--config", config, "--wandb", "disabled")
    first = _in(tmp_path, *head, "--steps", "3")
    assert "Configuration Summary" in first.stderr and "gpu=78.7GB eta=" in first.stderr
    ckpt = tmp_path / "checkpoints" / "waypoint_ae_libero" / "2"
    assert sorted(p.name for p in ckpt.iterdir()) == ["metadata.pt", "model.safetensors"]
    resumed = _in(tmp_path, *head, "--steps", "1", "--resume")
    assert resumed.returncode == 1
    assert (
        "FileNotFoundError: [Errno 2] No such file or directory: "
        "'checkpoints/waypoint_ae_libero/2/optimizer.pt'" in resumed.stderr
    )


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


@pytest.mark.slow
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
