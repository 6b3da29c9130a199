"""playbooks/openpi-lerobot.yaml end to end over a test sshd box with one stand-in 24 GB GPU:
openpi from a bare git repo, offline wheels, seed 004's LeRobot dataset on a local rclone remote,
pi0.5 base from a GCS emulator, and openpi's train.py stand-in (tests/openpi_lerobot_standin.py).
Every step done, the norm stats as openpi reads them, a second `up` does nothing, and relaunching
the training over a saved checkpoint resumes it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gcs_emulator
import pytest
import uv as uv_package
from boxes import Box
from openpi_lerobot_standin import REPO_ID, build_repo, build_wheels, write_drive
from project import Project

REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = str(REPO / "playbooks" / "openpi-lerobot.yaml")
FAKES = Path(__file__).resolve().parent / "fakes"
WANDB_KEY = "wandb_v1_" + "L" * 77
STEPS = {
    "agent-venv", "preflight", "base-packages", "no-auto-tmux", "clone", "uv-sync", "pi05-config",
    "register-config", "rclone-config", "dataset", "norm-stats", "ckpt", "config-check",
    "wandb-netrc", "train-env", "train", "train-started",
    "tool-git", "tool-tmux", "tool-rclone", "tool-uv",  # implicit: the tools the kinds run
}  # fmt: skip


def _up(project: Project, *args: str) -> dict[str, dict]:
    result = project.cli(*args, "-p", PLAYBOOK, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    status = project.cli("status", "box1", "-p", PLAYBOOK, "--json")
    assert status.returncode == 0, status.stderr
    snap = json.loads(status.stdout.strip().splitlines()[0])
    assert snap["runner"] == "idle", snap
    return {s["id"]: s for s in snap["steps"]}


@pytest.mark.slow
def test_openpi_lerobot_over_ssh(tmp_path: Path, project: Project, box: Box) -> None:
    home = box.home
    repo = home / "workspace" / "openpi"
    srv = tmp_path / "srv"
    wheels = build_wheels(home / "wheels", repo / "src")
    uv = uv_package.find_uv_bin()
    origin = build_repo(srv, wheels, uv)
    drive = write_drive(srv / "drive")
    # Seed 004's split: single-episode tasks are the test set, wherever they are in the dataset.
    test = [2, 17, 30]
    train = [i for i in range(34) if i not in test]
    (drive / "split_info.json").write_text(json.dumps({"train": train, "test": test}))
    # What a GPU box's image sets up: nvidia-smi on PATH (one 24 GB RTX 4090), uv installed.
    (home / ".bashrc").write_text(f'export PATH="{FAKES}:$PATH" FAKE_NVIDIA_SMI=small\n')
    (home / ".bootstrap" / "bin").mkdir(parents=True)
    (home / ".bootstrap" / "bin" / "uv").symlink_to(uv)
    project.root.mkdir(parents=True)
    project.secrets = {"WANDB_API_KEY": {"value": WANDB_KEY}}

    with gcs_emulator.in_process() as (_, endpoint):
        gcs_emulator.upload(endpoint, "openpi-assets", gcs_emulator.pi05_like(4096, 256))
        project.host_vars = {
            "agent_base_python": sys.executable,
            "agent_system_site_packages": True,
            "repo": str(repo),
            "data": str(home / "workspace" / "data"),
            "models": str(home / "workspace" / "models"),
            "openpi_repo_url": str(origin),
            "uv_find_links": [str(wheels)],
            "uv_offline": True,
            "rclone_remote_type": "local",
            "dataset_remote_path": str(drive),
            "rclone_retries": 1,
            "gcs_endpoint": endpoint,
            "apt_packages": ["git", "tmux"],
            "disk_gb": 1,
            "ram_gb": 1,
            "num_workers": 1,
            "checkpoint_gb": 0.1,
            "wandb_mode": "offline",
        }
        first = _up(project, "up", "box1")
        assert set(first) == STEPS
        assert {s["status"] for s in first.values()} == {"done"}, first
        # No av override: the lock's av 17.0.0 stays, the checkout's pyproject and lock too.
        unchanged = subprocess.run(
            ["git", "-C", str(repo), "diff", "--quiet", "--", "pyproject.toml", "uv.lock"],
            check=False,
        )
        assert unchanged.returncode == 0
        assert 'name = "av"\nversion = "17.0.0"' in (repo / "uv.lock").read_text()

        second = _up(project, "up", "box1")
        assert {k: s["started"] for k, s in second.items()} == {
            k: s["started"] for k, s in first.items()
        }
        plan = project.cli("plan", "box1", "-p", PLAYBOOK, "--json")
        assert plan.returncode == 0, plan.stderr
        reasons = {s["id"]: s for s in json.loads(plan.stdout)["steps"]}
        assert not [(k, s["reason"]) for k, s in reasons.items() if s["run"]]

        # Lost norm stats: recomputed, checked again, and the training relaunched (its
        # checkpoint dir exists, so with --resume, which openpi drops while it holds no step).
        stats_file = repo / "assets" / "pi05_custom" / REPO_ID / "norm_stats.json"
        stats_file.unlink()
        third = _up(project, "up", "box1")
        changed = {k for k in STEPS if third[k]["started"] != first[k]["started"]}
        assert changed == {"norm-stats", "config-check", "train", "train-started"}
        log = (repo / "logs" / "pi05_custom_my_experiment.log").read_text()
        assert "does not contain any checkpoints. Aborting resume." in log

        # A changed training var: the config is rendered, registered (once), checked, relaunched.
        project.host_vars["batch_size"] = 16
        fourth = _up(project, "up", "box1")
        changed = {k for k in STEPS if fourth[k]["started"] != third[k]["started"]}
        assert changed == {
            "pi05-config",
            "register-config",
            "config-check",
            "train",
            "train-started",
        }
        config_py = (repo / "src/openpi/training/config.py").read_text()
        assert config_py.count("_bootstrap_configs.get_configs()") == 1
        assert json.loads((repo / "logs" / "jax_env.json").read_text())["batch_size"] == 16

    # The norm stats where openpi reads them, keyed `actions`, from the 31 training episodes.

    stats = json.loads(stats_file.read_text())["norm_stats"]
    assert set(stats) == {"state", "actions"}
    for entry in stats.values():
        assert set(entry) == {"mean", "std", "q01", "q99"} and len(entry["q99"]) == 5
    warnings = " ".join(first["norm-stats"]["warnings"])
    assert "dims 0, 1 are constant" in warnings  # the seed's two constant dims surface
    # The config as rendered and registered; the training got the playbook's environment.
    env = json.loads((repo / "logs" / "jax_env.json").read_text())
    assert env["argv"] == ["pi05_custom", "--exp_name", "my_experiment", "--resume"]
    assert env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
    assert env["HF_LEROBOT_HOME"] == str(home / "workspace" / "data" / "lerobot")
    assert env["CUDA_VISIBLE_DEVICES"] == "0" and env["WANDB_MODE"] == "offline" and env["key"]
    assert env["venv"] == str(repo / ".venv")
    assert env["action_sequence_keys"] == ["action"]
    # Training reads the 31 episodes the norm stats come from, each frame from its own episode
    # (openpi's loader alone would read all 34; lerobot's indexing alone would misplace them).
    assert env["episodes"] == train
    checked = project.cli("logs", "box1", "config-check", "-p", PLAYBOOK).stdout
    assert f"training reads 31 episodes of {REPO_ID}" in checked
    assert env["repack"]["actions"] == "action"
    log = (repo / "logs" / "pi05_custom_my_experiment.log").read_text()
    assert "Step 0: grad_norm=" in log

    # openpi saved step 1000; a relaunch resumes from it (the checkpoint dir decides --resume).
    (repo / "checkpoints" / "pi05_custom" / "my_experiment" / "1000").mkdir()
    rerun = project.cli("rerun", "box1", "train", "-p", PLAYBOOK, timeout=240)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    env = json.loads((repo / "logs" / "jax_env.json").read_text())
    assert env["argv"][-1] == "--resume"
    log = (repo / "logs" / "pi05_custom_my_experiment.log").read_text()
    assert "Restoring checkpoint from step 1000" in log and "Step 1000: grad_norm=" in log


TRAINER = REPO / "provision" / "data" / "fake_trainer.py"


def _jax_log(tmp_path: Path, wandb: str, *args: str) -> Path:
    """What openpi's scripts/train.py logs (the stand-in, upstream 15a9616's order)."""
    log = tmp_path / f"train-{wandb}.log"
    done = subprocess.run(
        [sys.executable, str(TRAINER), "pi05_custom", "--exp_name", "my_experiment", "--wandb",
         wandb, "--total", "10000", "--steps", "3", "--step-sleep", "0", "--startup-sleep", "0",
         *args],
        cwd=tmp_path, env={"WANDB_API_KEY": WANDB_KEY, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=True,
    )  # fmt: skip
    log.write_text(done.stdout)  # one stream, as `2>&1 | tee` keeps it
    return log


def _diagnose(log: Path, wandb: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "provision.cli", "diagnose", str(log), "-p", PLAYBOOK, "--step",
         "train-started", "-e", f"wandb_mode={wandb}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("wandb", ["online", "offline", "disabled"])
@pytest.mark.slow
def test_train_logs_pass_diagnose_fresh_and_resumed(tmp_path: Path, wandb: str) -> None:
    for args in ((), ("--resume", "--start-step", "1000")):
        found = _diagnose(_jax_log(tmp_path, wandb, *args), wandb)
        assert found.returncode == 0, found.stdout + found.stderr


@pytest.mark.slow
def test_a_nan_or_a_high_first_loss_fails_naming_the_step(tmp_path: Path) -> None:
    nan = _diagnose(_jax_log(tmp_path, "offline", "--fail", "nan"), "offline")
    assert nan.returncode == 1 and "marker `first step`" in nan.stdout.splitlines()[0]
    log = _jax_log(tmp_path, "offline")
    log.write_text(log.read_text().replace("Step 0: grad_norm", "Step 0: x=1, grad_norm").replace(
        ", loss=0.1", ", loss=2.1", 1))  # fmt: skip
    high = _diagnose(log, "offline")
    assert high.returncode == 1 and "outside [0.1, 0.2]" in high.stdout.splitlines()[0]
