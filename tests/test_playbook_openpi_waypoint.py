"""playbooks/openpi-waypoint.yaml: resolved with the seed's figures, and run end to end over a test
sshd box against stand-ins (tests/openpi_standin.py) with real git, uv, rclone, GCS client, tmux."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uv as uv_package
import yaml
from boxes import Box
from gcs_emulator import in_process, upload
from githttp import serve_git
from gpu_fake import FAKES
from openpi_standin import (
    Sizes,
    build_repo,
    build_wheels,
    checkpoint_objects,
    uv_offline_env,
    write_drive,
)
from project import Project

from provision.errors import StepFailed
from provision.formats.safetensors import read_header
from provision.inventory import Host, Inventory, load_inventory
from provision.playbook import load_playbook, resolve, select
from provision.steps import wait_log
from provision.steps.base import StepContext

REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = REPO / "playbooks" / "openpi-waypoint.yaml"
NAME = "openpi-waypoint.yaml"
UV = uv_package.find_uv_bin()
TOKEN = "ghp_" + "W4yp0intT0ken" * 3
WANDB_KEY = "wandb_v1_" + "Wk3y" * 19 + "x"  # 86 characters, as new keys are
SECRETS = ("GIT_TOKEN", "RCLONE_DRIVE_TOKEN", "WANDB_API_KEY")


# --- the playbook as written: figures, tracks, tags, templates (no box) ----------------------


def _plan(**host_vars: Any) -> dict[str, dict[str, Any]]:
    inv = Inventory(path=None)
    inv.secret_sources = {name: {"value": "x"} for name in SECRETS}
    plan = resolve(load_playbook(PLAYBOOK), inv, Host(name="box1", host="h", vars=host_vars))
    return {step["id"]: step for step in plan["steps"]}


def test_seed_figures_and_paths_are_the_defaults() -> None:
    steps = _plan()
    params = {sid: step["params"] for sid, step in steps.items()}
    assert params["clone"]["branch"] == "pytorch_lora_blackwell"
    assert params["clone"]["dest"] == "/workspace/openpi"
    assert params["uv-sync"]["overrides"] == ["av>=13.1.0,<14.0.0"]
    assert params["uv-sync"]["python"] == "3.11"
    assert params["uv-sync"]["verify_imports"] == {
        "torch": "2.7",
        "jax": "0.5",
        "transformers": "4.53",
    }
    assert steps["uv-sync"]["env"]["UV_LINK_MODE"] == "copy"
    assert params["tf"]["cwd"] == "/workspace/openpi"
    assert params["tf"]["packages"] == ["tensorflow==2.15.0", "tensorflow-datasets==4.9.3"]
    assert 'ml_dtypes.__version__ == "0.4.1"' in params["tf"]["verify"]
    assert params["data-rlds"]["src"] == "gg1:dissert_ntu/libero/libero_object_no_noops/"
    assert params["data-rlds"]["transfers"] == 8 and params["data-wp"]["transfers"] == 4
    assert {"path": "libero_object_no_noops/1.0.0", "entries": 34} in params["data-rlds"]["expect"]
    assert {"path": "waypoint_filtered_rlds__libero/1.0.0", "entries": 6} in params["data-wp"][
        "expect"
    ]
    assert params["stats-ae"]["output"] == (
        "/workspace/data/libero_object_no_noops/1.0.0/dataset_statistics.json"
    )
    assert params["stats-ae"]["expect"] == {"action": 7, "proprio": 8}
    assert params["stats-ae"]["keys"]["state"] == "observation/state"
    assert params["stats-ae"]["expect_samples"] == 66984
    assert (params["stats-vlm"]["expect_samples"], params["stats-vlm"]["expect_episodes"]) == (
        8863,
        454,
    )
    assert params["ckpt"]["dest"] == "/workspace/models/pi05_base_jax"
    assert "pi05_base/params" in json.dumps(params["ckpt"]["expect"])
    assert "--checkpoint_dir /workspace/models/pi05_base_jax/pi05_base" in params["convert"]["run"]
    assert "--config_name pi05_libero" in params["convert"]["run"]
    assert steps["convert"]["env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert params["convert-check"]["count"] == 812 and params["convert-check"]["dtype"] == "BF16"
    assert params["convert-check"]["tensors"] == {
        "action_in_proj.weight": {"shape": [1024, 32]},
        "time_mlp_in.weight": {"shape": [1024, 1024]},
    }
    for mode in ("ae", "vlm"):
        assert ".venv/bin/torchrun --standalone" in params[f"train-{mode}"]["command"]
        assert params[f"train-{mode}"]["resume_args"] == "--resume"
        assert steps[f"train-{mode}"]["secrets"] == ["WANDB_API_KEY"]
    ae_markers = json.dumps(params["train-ae-started"]["markers"])
    assert "8409 valid pairs" in ae_markers and "step=0/10000" in ae_markers
    assert "[0.7, 1.0]" in ae_markers and "View run at" in ae_markers
    vlm_markers = json.dumps(params["train-vlm-started"]["markers"])
    assert "603 params" in vlm_markers and "step=0/30000" in vlm_markers
    assert "[11.0, 12.0]" in vlm_markers
    ae = yaml.safe_load(params["ae-config"]["_content"])
    vlm = yaml.safe_load(params["vlm-config"]["_content"])
    assert (ae["batch_size"], ae["num_train_steps"], vlm["batch_size"], vlm["num_train_steps"]) == (
        144,
        10000,
        12,
        30000,
    )
    assert ae["original_rlds_dir"] == (
        "/workspace/data/libero/libero_object_no_noops/libero_object_no_noops/1.0.0"
    )
    assert ae["dataset_statistics_path"] == "/workspace/data/libero_object_no_noops/1.0.0"
    assert (
        vlm["dataset_statistics_path"] == "/workspace/data/libero/libero_object_wp_001/norm_stats"
    )
    assert (
        ae["pretrained_weight_path"]
        == vlm["pretrained_weight_path"]
        == "/workspace/models/pi05_base_pytorch"
    )
    assert ae["checkpoint_dir"] == "checkpoints/waypoint_ae_libero"
    assert all(step["estimate"] for step in steps.values())


def test_tracks_run_in_parallel_as_the_seed_measured() -> None:
    needs = {sid: set(step["needs"]) - {"agent-venv"} for sid, step in _plan().items()}
    assert needs["av-override"] == {"clone"} and needs["uv-sync"] == {"av-override"}
    assert needs["tf"] == needs["patch"] == {"uv-sync"}
    assert needs["rclone-config"] == set() and needs["rclone-remote"] == {"rclone-config"}
    assert needs["data-rlds"] == needs["data-wp"] == {"rclone-remote"}
    assert (needs["stats-ae"], needs["stats-vlm"]) == ({"data-rlds"}, {"data-wp"})
    assert needs["ckpt"] == set() and needs["convert"] == {"ckpt", "uv-sync", "patch"}
    assert {"tf", "patch", "convert-check", "stats-ae", "data-wp", "ae-config"} <= needs["train-ae"]
    assert {"tf", "patch", "convert-check", "stats-vlm", "vlm-config"} <= needs["train-vlm"]
    assert "preflight" in needs["train-ae"] and needs["preflight"] == set()


def test_tags_pick_one_training_and_sync_pulls_in_no_training() -> None:
    book = load_playbook(PLAYBOOK)
    ae, vlm = select(book, ["ae"]), select(book, ["vlm"])
    assert {"train-ae", "train-ae-started", "stats-ae"} <= ae
    assert not {"train-vlm", "train-vlm-started", "stats-vlm", "wandb-sync"} & ae
    assert {"train-vlm", "train-vlm-started", "stats-vlm"} <= vlm
    assert not {"train-ae", "train-ae-started", "stats-ae", "data-rlds"} & vlm
    assert not {s for s in select(book, ["wandb-sync"]) if s.startswith(("train-ae", "train-vlm"))}


def test_templates_render_secrets_as_placeholders_and_omit_empty_wandb_settings() -> None:
    steps = _plan()
    assert (
        "token = @@bootstrap-secret:RCLONE_DRIVE_TOKEN@@"
        in steps["rclone-config"]["params"]["_content"]
    )
    assert steps["rclone-config"]["secrets"] == ["RCLONE_DRIVE_TOKEN"]
    assert steps["wandb-netrc"]["params"]["_content"].startswith("machine api.wandb.ai\n")
    env = steps["train-env"]["params"]["_content"]
    assert "WANDB_TAGS='waypoint,libero'" in env and "WANDB_MODE='online'" in env
    assert "WANDB_ENTITY" not in env and "WANDB_NOTES" not in env
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in env
    assert "XLA_PYTHON_CLIENT_PREALLOCATE=false" in env

    other = _plan(
        rclone_remote_type="alias",
        rclone_remote_options={"remote": "/srv/drive"},
        wandb_mode="disabled",
        wandb_tags=[],
        wandb_notes="it's mine",
    )
    conf = other["rclone-config"]["params"]["_content"]
    assert conf == "[gg1]\ntype = alias\nremote = /srv/drive\n"
    assert other["rclone-config"]["secrets"] == []
    env = other["train-env"]["params"]["_content"]
    assert "WANDB_TAGS" not in env and "WANDB_NOTES='it'\\''s mine'" in env
    assert "wandb_enabled: false" in other["ae-config"]["params"]["_content"]
    assert "View run at" not in json.dumps(other["train-ae-started"]["params"]["markers"])


TRAINER = REPO / "provision" / "data" / "fake_trainer.py"


def _wait_for_markers(tmp_path: Path, mode: str, wandb: str, *args: str) -> None:
    """Run the playbook's wait step for `mode` over what the trainer prints with `wandb`."""
    log = tmp_path / f"{mode}.log"
    with log.open("w") as out:
        subprocess.run(
            [sys.executable, str(TRAINER), "--mode", mode, "--wandb", wandb, "--steps", "3",
             "--step-sleep", "0", "--startup-sleep", "0", *args],
            cwd=tmp_path,
            env={**os.environ, "WANDB_API_KEY": WANDB_KEY},
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )  # fmt: skip
    params = dict(_plan(wandb_mode=wandb)[f"train-{mode}-started"]["params"], log=str(log))
    ctx = StepContext(
        step_id="wait", params=params, run_dir=tmp_path / "run", deadline=time.time() + 20
    )
    wait_log.KIND.run(ctx)


@pytest.mark.parametrize("mode", ["ae", "vlm"])
@pytest.mark.parametrize("wandb", ["online", "offline", "disabled"])
def test_training_markers_match_the_real_log_lines(tmp_path: Path, mode: str, wandb: str) -> None:
    _wait_for_markers(tmp_path, mode, wandb)
    _wait_for_markers(tmp_path, mode, wandb, "--resume")


def test_training_markers_fail_on_a_wrong_first_loss(tmp_path: Path) -> None:
    with pytest.raises(StepFailed, match="loss=nan"):
        _wait_for_markers(tmp_path, "ae", "online", "--fail", "nan")


def test_example_inventory_loads() -> None:
    inv = load_inventory(REPO / "inventory.yaml")
    assert inv.hosts["vast1"].host == "ssh5.vast.ai" and inv.hosts["vast1"].user == "root"
    assert inv.hosts["local"].connection == "local"
    assert set(inv.groups["fleet"]) == {"vast1", "vast2"}
    assert set(inv.secret_sources) == set(SECRETS)


# --- end to end over a test sshd box ---------------------------------------------------------


@dataclass
class StandIn:
    git_root: Path
    drive: Path
    wheels: Path
    sizes: Sizes


@pytest.fixture
def standin(tmp_path: Path) -> StandIn:
    sizes = Sizes()
    wheels = build_wheels(tmp_path / "wheels")
    return StandIn(
        git_root=build_repo(tmp_path / "git", wheels, UV),
        drive=write_drive(tmp_path / "gdrive", sizes),
        wheels=wheels,
        sizes=sizes,
    )


@pytest.fixture
def services(standin: StandIn) -> Iterator[tuple[str, str]]:
    """(GCS endpoint holding gs://openpi-assets/checkpoints/pi05_base, git server URL)."""
    with (
        in_process() as (_server, endpoint),
        serve_git(standin.git_root, "x-access-token", TOKEN) as git_server,
    ):
        upload(endpoint, "openpi-assets", checkpoint_objects())
        yield endpoint, git_server.url


def _box_environment(box: Box, standin: StandIn) -> None:
    """What the box's login shell sets up: a stand-in nvidia-smi and torchrun on PATH, and uv
    limited to the wheel directory (as on an air-gapped box)."""
    uv_env = uv_offline_env(standin.wheels, box.home / ".cache" / "uv")
    exports = "".join(f"export {k}={v}\n" for k, v in uv_env.items())
    (box.home / ".bashrc").write_text(
        f'export PATH="{FAKES}:{Path(UV).parent}:$PATH"\nexport FAKE_NVIDIA_SMI=healthy\n' + exports
    )


def _started(project: Project) -> dict[str, float]:
    return {sid: step["started"] for sid, step in project.steps("box1", NAME).items()}


def _rerun(before: dict[str, float], after: dict[str, float]) -> set[str]:
    return {sid for sid in after if after[sid] != before.get(sid)}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_end_to_end_noop_output_deleted_rerun_and_wandb_sync(
    project: Project, box: Box, standin: StandIn, services: tuple[str, str]
) -> None:
    endpoint, git_url = services
    _box_environment(box, standin)
    shutil.copytree(REPO / "templates", project.root / "templates")
    project.playbook(PLAYBOOK.read_text(), NAME)
    ws = box.home / "workspace"
    sizes = standin.sizes
    project.host_vars = {
        # This interpreter has the agent's libraries: agent_base_python with system site
        # packages would still `uv pip install` them, which an offline box cannot.
        "agent_python": sys.executable,
        "repo": str(ws / "openpi"),
        "data": str(ws / "data"),
        "models": str(ws / "models"),
        "apt_packages": ["git", "git-lfs", "tmux"],
        "git_user_email": "waypoint@example.invalid",
        "git_user_name": "Waypoint Test",
        "openpi_repo_url": f"{git_url}/openpi.git",
        "rclone_remote_type": "alias",
        "rclone_remote_options": {"remote": str(standin.drive)},
        "rclone_retries": 1,
        "gcs_endpoint": endpoint,
        "gcs_workers": 4,
        "ae_samples": sizes.rlds_steps,
        "vlm_samples": sizes.wp_steps,
        "vlm_episodes": sizes.wp_episodes,
        "disk_gb": 0.1,
        "train_checkpoints": 1,
        "checkpoint_gb": 0.1,
        "ram_gb": 0.5,
        "ae_batch_size": 4,
        "vlm_batch_size": 2,
        "ae_steps": 40,
        "vlm_steps": 60,
        "ae_gpus": "0",  # both trainings at once, so on GPUs of their own
        "vlm_gpus": "1",
        "wandb_mode": "offline",
        "wandb_entity": "waypoint-lab",
        "wandb_tags": ["waypoint", "test"],
        "wandb_notes": "it's a test",
    }
    project.secrets = {
        "GIT_TOKEN": {"value": TOKEN},
        "RCLONE_DRIVE_TOKEN": {"value": '{"access_token":"unused"}'},
        "WANDB_API_KEY": {"value": WANDB_KEY},
    }

    def up(*extra: str) -> None:
        result = project.cli("up", "box1", "-p", f"playbooks/{NAME}", *extra, timeout=600)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr

    up()
    snap = project.status("box1", NAME)
    assert snap["runner"] == "idle"
    statuses = {step["id"]: step["status"] for step in snap["steps"]}
    assert set(statuses.values()) == {"done"}, statuses
    assert set(statuses) == {step.id for step in load_playbook(PLAYBOOK).steps}
    for step in snap["steps"]:
        assert {"attempts", "started", "ended", "duration_s", "rc", "progress", "hint"} <= set(step)
        assert "log_tail" in step
    _check_box(box, project, standin)

    before = _started(project)
    up()
    assert _rerun(before, _started(project)) == set()
    plan = project.cli("plan", "box1", "-p", f"playbooks/{NAME}", "--json")
    assert plan.returncode == 0, plan.stderr
    reasons = {s["id"]: (s["run"], s["reason"]) for s in json.loads(plan.stdout)["steps"]}
    assert [sid for sid, (run, _) in reasons.items() if run] == []
    assert "launch" in reasons["train-ae"][1] or "running" in reasons["train-ae"][1]
    assert "markers seen" in reasons["train-vlm-started"][1], reasons

    # A deleted output re-runs exactly the steps downstream of it.
    (ws / "data/libero/libero_object_wp_001/norm_stats/dataset_statistics.json").unlink()
    before = _started(project)
    up()
    assert _rerun(before, _started(project)) == {"stats-vlm", "train-vlm", "train-vlm-started"}

    # `rerun` re-runs the step and what follows it; the relaunch resumes.
    before = _started(project)
    result = project.cli("rerun", "box1", "stats-ae", "-p", f"playbooks/{NAME}", timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr
    assert _rerun(before, _started(project)) == {"stats-ae", "train-ae", "train-ae-started"}
    assert "Resuming from checkpoint" in (ws / "openpi/logs/waypoint_ae_libero.log").read_text()

    # On demand: the offline runs go to wandb, once.
    offline = sorted((ws / "openpi/wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 4  # each training launched twice
    before = _started(project)
    up("--tags", "wandb-sync", "-e", "wandb_sync=true")
    assert _rerun(before, _started(project)) == {"wandb-sync"}
    assert all(Path(f"{run}.synced").exists() for run in offline)
    log = project.cli("logs", "box1", "wandb-sync", "-p", f"playbooks/{NAME}").stdout
    assert "Syncing: https://wandb.ai/waypoint-lab/waypoint_vla/runs/" in log
    before = _started(project)
    up("--tags", "wandb-sync", "-e", "wandb_sync=true")
    assert _rerun(before, _started(project)) == set()
    _no_secret_leaked(box)


def _check_box(box: Box, project: Project, standin: StandIn) -> None:
    """What the first `up` left on the box."""
    ws = box.home / "workspace"
    repo = ws / "openpi"
    sizes = standin.sizes
    assert '"av>=13.1.0,<14.0.0"' in (repo / "pyproject.toml").read_text()
    assert 'name = "av"\nversion = "13.1.0"' in (repo / "uv.lock").read_text()
    ae_stats = json.loads(
        (ws / "data/libero_object_no_noops/1.0.0/dataset_statistics.json").read_text()
    )
    ae = ae_stats["libero_object_no_noops"]
    assert ae["num_samples"] == sizes.rlds_steps
    assert (len(ae["action"]["q99"]), len(ae["proprio"]["q99"])) == (7, 8)
    vlm = json.loads(
        (ws / "data/libero/libero_object_wp_001/norm_stats/dataset_statistics.json").read_text()
    )
    assert (vlm["num_transitions"], vlm["num_trajectories"]) == (sizes.wp_steps, sizes.wp_episodes)
    model = ws / "models/pi05_base_pytorch"
    header = read_header(model / "model.safetensors")
    assert len(header.tensors) == 812
    assert (model / "assets/trossen/norm_stats.json").exists()
    for path in (box.home / ".config/rclone/rclone.conf", box.home / ".netrc"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert WANDB_KEY in (box.home / ".netrc").read_text()
    assert (box.home / ".no_auto_tmux").exists()

    ae_env = json.loads((repo / "logs/ae_env.json").read_text())
    assert ae_env["key"] is True and ae_env["ml_dtypes"] == "0.4.1"
    assert ae_env["venv"] == str(repo / ".venv")
    assert ae_env["WANDB_NAME"] == "waypoint_ae_libero" and ae_env["WANDB_MODE"] == "offline"
    assert ae_env["WANDB_ENTITY"] == "waypoint-lab" and ae_env["WANDB_NOTES"] == "it's a test"
    assert ae_env["WANDB_TAGS"] == "waypoint,test" and ae_env["WANDB_RESUME"] == "allow"
    assert ae_env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert ae_env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" and ae_env["WORLD_SIZE"] == "2"
    assert (ae_env["config"]["batch_size"], ae_env["config"]["num_train_steps"]) == ("4", "40")
    vlm_env = json.loads((repo / "logs/vlm_env.json").read_text())
    assert vlm_env["WANDB_NAME"] == "waypoint_vlm_libero" and vlm_env["config"]["batch_size"] == "2"

    for mode, low, high in (("ae", 0.7, 1.0), ("vlm", 11.0, 12.0)):
        markers = (
            box.home / f".bootstrap/runs/openpi-waypoint/steps/train-{mode}-started/markers.json"
        )
        values = json.loads(markers.read_text())["values"]
        assert low <= values["loss"] <= high, values


def _no_secret_leaked(box: Box) -> None:
    """The token and the key are nowhere on the box but in ~/.netrc (the key, by design)."""
    netrc = box.home / ".netrc"
    for path in box.home.rglob("*"):
        if path.is_file() and not path.is_symlink() and path != netrc:
            data = path.read_bytes()
            assert TOKEN.encode() not in data, path
            assert WANDB_KEY.encode() not in data, path
