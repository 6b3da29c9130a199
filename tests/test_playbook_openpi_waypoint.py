"""playbooks/openpi-waypoint.yaml: resolved with the seed's figures, and run end to end over a test
sshd box against stand-ins (tests/openpi_standin.py) with real git, uv, rclone, GCS client, tmux."""

from __future__ import annotations

import json
import os
import secrets
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
    seed_commit,
    uv_offline_env,
    write_drive,
)
from project import Project, wait_for

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
    return {step.id: step.to_json() for step in plan.steps}  # as plan.json holds them


def test_seed_figures_and_paths_are_the_defaults() -> None:
    steps = _plan()
    params = {sid: step["params"] for sid, step in steps.items()}
    # Pinned to the commit seed 003 was validated on, not the branch's moving tip.
    assert params["clone"]["ref"] == "2a6770512c5d27623ef3e7221b0d1001b8f58aab"
    assert params["clone"]["branch"] is None
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
    assert "[8409, 8409]" in ae_markers and "[811, 811]" in ae_markers
    assert "View run at" in ae_markers
    ae_progress = json.dumps(params["train-ae-started"]["progress"])
    assert "step=0/10000" in ae_progress and "[0.7, 1.0]" in ae_progress
    vlm_markers = json.dumps(params["train-vlm-started"]["markers"])
    assert "[603, 603]" in vlm_markers and "[2923.3, 2923.3]" in vlm_markers
    vlm_progress = json.dumps(params["train-vlm-started"]["progress"])
    assert "step=0/30000" in vlm_progress and "[11.0, 12.0]" in vlm_progress
    assert steps["torch-cuda"]["env"] == {"WANT_TORCH": "2.7", "WANT_CUDA": "12.8"}
    assert params["train-vlm"]["watch"] == {"thresholds": {"gpu_memory_pct": 98}}
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
    implicit = {"agent-venv", "tool-git", "tool-tmux", "tool-rclone", "tool-uv"}
    needs = {sid: set(step["needs"]) - implicit for sid, step in _plan().items()}
    assert needs["av-override"] == {"clone"} and needs["uv-sync"] == {"av-override"}
    assert needs["tf"] == needs["patch"] == {"uv-sync"}
    assert needs["rclone-config"] == set() and needs["rclone-remote"] == {"rclone-config"}
    assert needs["data-rlds"] == needs["data-wp"] == {"rclone-remote"}
    assert (needs["stats-ae"], needs["stats-vlm"]) == ({"data-rlds"}, {"data-wp"})
    assert needs["ckpt"] == set() and needs["convert"] == {"ckpt", "uv-sync", "patch"}
    assert {"tf", "patch", "convert-check", "stats-ae", "data-wp", "ae-config"} <= needs["train-ae"]
    assert {"tf", "patch", "convert-check", "stats-vlm", "vlm-config"} <= needs["train-vlm"]
    assert {"torch-cuda", "stats-ae"} <= needs["train-vlm"] and "torch-cuda" in needs["train-ae"]
    # preflight checks tools after the installs: the apt step, and tmux provided by the engine
    assert "preflight" in needs["train-ae"] and needs["preflight"] == {"base-packages"}
    assert "tool-tmux" in _plan()["preflight"]["needs"]


def test_tags_pick_one_training_and_sync_pulls_in_no_training() -> None:
    book = load_playbook(PLAYBOOK)
    # One training by default (the AE): the VLM alone fills 91-93 GB of a 97.9 GB GPU.
    default = select(book, None)
    assert {"train-ae", "train-ae-started"} <= default
    assert not {"train-vlm", "train-vlm-started", "stats-vlm", "vlm-config"} & default
    ae, vlm = select(book, ["ae"]), select(book, ["vlm"])
    assert {"train-ae", "train-ae-started", "stats-ae"} <= ae
    assert not {"train-vlm", "train-vlm-started", "stats-vlm", "wandb-sync"} & ae
    assert {"train-vlm", "train-vlm-started", "stats-vlm"} <= vlm
    assert not {"train-ae", "train-ae-started", "ae-config"} & vlm
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
TORCHRUN = REPO / "tests" / "fakes" / "torchrun"


def _real_log(
    tmp_path: Path, mode: str, wandb: str, ranks: int, *args: str, **plan_vars: Any
) -> tuple[Path, dict[str, Any]]:
    """A training log in the real order: torchrun starting `ranks` ranks of the stand-in
    train_waypoint.py (derived from the fork's code) with the config the playbook renders.
    Returns the log and the wait step's resolved params (its log path pointed at it)."""
    steps = _plan(wandb_mode=wandb, **plan_vars)
    configs = tmp_path / "configs"
    configs.mkdir(exist_ok=True)
    (configs / f"{mode}.yaml").write_text(steps[f"{mode}-config"]["params"]["_content"])
    log = tmp_path / f"{mode}-{wandb}-{ranks}.log"
    launch = secrets.token_hex(6)
    with log.open("a") as out:  # bracketed as tmux_launch brackets each launch in the log
        out.write(f"[bootstrap] job {launch} started in tmux session waypoint_{mode}\n")
        out.flush()
        done = subprocess.run(
            [sys.executable, str(TORCHRUN), "--standalone", f"--nproc_per_node={ranks}",
             str(TRAINER), "--mode", mode, "--config", f"configs/{mode}.yaml", "--wandb", wandb,
             "--step-sleep", "0", "--startup-sleep", "0.01", *args],
            cwd=tmp_path,
            env={**os.environ, "WANDB_API_KEY": WANDB_KEY},
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        )  # fmt: skip
        out.write(f"[bootstrap] job {launch} exited with status {done.returncode}\n")
    return log, dict(steps[f"train-{mode}-started"]["params"], log=str(log))


def _wait(tmp_path: Path, params: dict[str, Any]) -> None:
    ctx = StepContext(
        step_id="wait", params=params, run_dir=tmp_path / "run", deadline=time.time() + 20
    )
    wait_log.KIND.run(ctx)


def _diagnose(log: Path, mode: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "provision.cli", "diagnose", str(log), "-p", str(PLAYBOOK),
         "--step", f"train-{mode}-started", *extra],
        capture_output=True, text=True, check=False, env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["ae", "vlm"])
@pytest.mark.parametrize("wandb", ["online", "offline", "disabled"])
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.slow
def test_real_order_logs_pass_the_markers(
    tmp_path: Path, mode: str, wandb: str, ranks: int
) -> None:
    # Fresh, then resumed from the checkpoint the first run saved.
    saved = 50
    fast = {"vlm_save_interval": saved}  # not 2000 steps of the stand-in
    log, params = _real_log(tmp_path, mode, wandb, ranks, "--steps", str(saved + 1), **fast)
    _wait(tmp_path, params)
    found = _diagnose(log, mode, "-e", f"wandb_mode={wandb}", "--json")
    assert found.returncode == 0, found.stdout + found.stderr
    assert json.loads(found.stdout)["met"] is True
    resumed, params = _real_log(tmp_path, mode, wandb, ranks, "--steps", "6", "--resume", **fast)
    text = resumed.read_text()
    assert f"Resumed from step {saved}" in text
    assert f"step={saved}/" in text and (wandb != "online" or "wandb: Resuming run" in text)
    _wait(tmp_path, params)  # the latest launch only (tmux_launch's bracket lines)
    assert _diagnose(resumed, mode, "-e", f"wandb_mode={wandb}").returncode == 0


@pytest.mark.parametrize(
    ("mode", "edit", "named"),
    [
        ("ae", ("loss=0.8", "loss=nan"), "loss=nan"),
        ("ae", ("step=0/10000 loss=0.", "step=0/10000 loss=3."), "marker `first AE step`"),
        ("ae", ("Loaded 811 weight", "Loaded 603 weight"), "marker `AE weights`"),
        ("vlm", ("603 params, 1 missing", "603 params, 4 missing"), "marker `VLM weights`"),
        (
            "vlm",
            ("[VLM] step=", "[VLM] stop="),
            "exited with status 0 before marker `first VLM step`",
        ),
        ("ae", ("Model: 3617.8M", "Model: 3300.1M"), "marker `AE model`"),
    ],
)
@pytest.mark.slow
def test_broken_logs_fail_naming_the_marker(
    tmp_path: Path, mode: str, edit: tuple[str, str], named: str
) -> None:
    log, params = _real_log(tmp_path, mode, "offline", 2, "--steps", "3")
    log.write_text(log.read_text().replace(*edit))
    found = _diagnose(log, mode, "-e", "wandb_mode=offline")
    assert found.returncode == 1, found.stdout + found.stderr
    assert named in found.stdout.splitlines()[0]
    with pytest.raises(StepFailed) as err:
        _wait(tmp_path, params)
    assert named in err.value.reason


@pytest.mark.slow
def test_head_resume_crash_is_diagnosed(tmp_path: Path) -> None:
    # At HEAD (since d30a12f) checkpoints lack optimizer.pt and --resume crashes on them.
    _real_log(tmp_path, "ae", "offline", 2, "--steps", "51", "--commit", "7de21c7")
    log, _ = _real_log(tmp_path, "ae", "offline", 2, "--steps", "1", "--resume", "--commit",
                       "7de21c7")  # fmt: skip
    found = _diagnose(log, "ae", "-e", "wandb_mode=offline")
    assert found.returncode == 1
    assert "[resume-no-optimizer]" in found.stdout
    assert "NOT met" in found.stdout.splitlines()[0]


def test_the_pin_decides_vlm_stats_and_resume() -> None:
    seed = _plan()
    assert seed["train-vlm"]["params"]["resume_args"] == "--resume"
    assert "wp_001/norm_stats" in seed["vlm-config"]["params"]["_content"]
    head = _plan(openpi_ref="7de21c782d402fc2118b1e2c15c3599efc06dc05")
    assert head["clone"]["params"]["ref"].startswith("7de21c7")
    assert head["train-vlm"]["params"]["resume_args"] is None
    vlm = yaml.safe_load(head["vlm-config"]["params"]["_content"])
    assert vlm["dataset_statistics_path"] == "/workspace/data/libero_object_no_noops/1.0.0"
    tip = _plan(openpi_ref="")
    assert tip["clone"]["params"]["ref"] is None
    assert tip["clone"]["params"]["branch"] == "pytorch_lora_blackwell"


@pytest.mark.slow
def test_diagnose_bad_input_exits_2(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("hello\n")
    for extra in (["--step", "train-ae"], ["--step", "train-ae-strated"], ["-e", "1x=2", "--step",
                  "train-ae-started"]):  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "provision.cli", "diagnose", str(log), "-p", str(PLAYBOOK),
             *extra], capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "Traceback" not in done.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "provision.cli", "diagnose", str(tmp_path / "none.log"), "-p",
         str(PLAYBOOK), "--step", "train-ae-started"], capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert missing.returncode == 2 and "none.log" in missing.stderr


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
        # The stand-in fork's "2a67705" (its tip plays HEAD, whose --resume crashes).
        "openpi_ref": seed_commit(standin.git_root),
        "openpi_seed_ref": seed_commit(standin.git_root),
        "rclone_remote_type": "alias",
        "rclone_remote_options": {"remote": str(standin.drive)},
        "rclone_retries": 1,
        "gcs_endpoint": endpoint,
        "gcs_workers": 4,
        "ae_samples": sizes.rlds_steps,
        "vlm_samples": sizes.wp_steps,
        "vlm_episodes": sizes.wp_episodes,
        "disk_gb": 0.1,
        "checkpoint_keep": 2,
        "checkpoint_gb": 0.1,
        "ram_gb": 0.5,
        "ae_batch_size": 4,
        "vlm_batch_size": 2,
        "ae_steps": 40,
        "vlm_steps": 60,
        "ae_gpus": "0",  # the two trainings side by side, so on GPUs of their own
        "vlm_gpus": "1",
        "ae_save_interval": 5,
        "vlm_save_interval": 5,
        "vlm_log_interval": 5,
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

    # One training by default (the AE); the VLM by tag, here on a GPU of its own (vlm_gpus).
    vlm = ("--tags", "vlm")
    up()
    snap = project.status("box1", NAME)
    assert snap["runner"] == "idle"
    statuses = {step["id"]: step["status"] for step in snap["steps"]}
    tools = {"tool-git", "tool-tmux", "tool-rclone", "tool-uv"}  # implicit: what the kinds run
    assert {s for s, status in statuses.items() if status == "done"} == select(
        load_playbook(PLAYBOOK), None
    ) | tools, statuses
    assert statuses["train-vlm"] == "skipped"
    for step in snap["steps"]:
        assert {"attempts", "started", "ended", "duration_s", "rc", "progress", "hint"} <= set(step)
        assert "log_tail" in step
    up(*vlm)
    statuses = {step["id"]: step["status"] for step in project.status("box1", NAME)["steps"]}
    assert statuses["train-vlm-started"] == "done" and statuses["train-ae-started"] == "done"
    _check_box(box, project, standin)

    before = _started(project)
    up()
    assert _rerun(before, _started(project)) == set()
    plan = project.cli("plan", "box1", "-p", f"playbooks/{NAME}", "--json")
    assert plan.returncode == 0, plan.stderr
    reasons = {s["id"]: (s["run"], s["reason"]) for s in json.loads(plan.stdout)["steps"]}
    assert [sid for sid, (run, _) in reasons.items() if run] == []
    assert "launch" in reasons["train-ae"][1] or "running" in reasons["train-ae"][1]
    assert "markers seen" in reasons["train-ae-started"][1], reasons

    # A deleted output re-runs exactly the steps downstream of it.
    (ws / "data/libero/libero_object_wp_001/norm_stats/dataset_statistics.json").unlink()
    before = _started(project)
    up(*vlm)
    assert _rerun(before, _started(project)) == {"stats-vlm", "train-vlm", "train-vlm-started"}
    assert "Resumed from step 10" in (ws / "openpi/logs/waypoint_vlm_libero.log").read_text()

    # `rerun` re-runs the step and what follows it; the relaunch resumes from the checkpoint
    # the first launch saved (the pinned code writes optimizer.pt).
    before = _started(project)
    result = project.cli("rerun", "box1", "stats-ae", "-p", f"playbooks/{NAME}", timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr
    assert _rerun(before, _started(project)) == {"stats-ae", "train-ae", "train-ae-started"}
    ae_log = ws / "openpi/logs/waypoint_ae_libero.log"
    assert "Resumed from step 10" in ae_log.read_text()
    ckpts = ws / "openpi/checkpoints/waypoint_ae_libero"
    newest = max((p for p in ckpts.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert int(newest.name) >= 10
    assert sorted(p.name for p in newest.iterdir()) == [
        "metadata.pt", "model.safetensors", "optimizer.pt"
    ]  # fmt: skip
    # keep: 2: the guard deletes the oldest complete checkpoints once the job writes more.
    wait_for(lambda: len([p for p in ckpts.iterdir() if p.name.isdigit()]) <= 2, timeout=60)
    # The log checks offline as on the box (a copy from the box, as users would).
    copy = Path(project.root) / "ae.log"
    copy.write_text(ae_log.read_text())
    found = project.cli("diagnose", str(copy), "-p", f"playbooks/{NAME}", "--step",
                        "train-ae-started", "-e", "wandb_mode=offline", "-e", "ae_steps=40")  # fmt: skip
    assert found.returncode == 0, found.stdout + found.stderr

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


def _run_step_script(
    step: dict[str, Any], cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """A shell step's resolved `run` script, run by bash as the agent runs it."""
    return subprocess.run(
        ["bash", "-c", step["params"]["run"]], cwd=cwd, capture_output=True, text=True,
        env={**env, **step["env"]}, check=False,
    )  # fmt: skip


def test_rclone_remote_verifies_the_config_without_rclone(tmp_path: Path) -> None:
    conf = tmp_path / "rclone.conf"
    step = _plan(rclone_config=str(conf))["rclone-remote"]
    tools = tmp_path / "bin"  # the shell and grep, no rclone (this machine has one on PATH)
    tools.mkdir()
    for tool in ("bash", "grep"):
        (tools / tool).symlink_to(shutil.which(tool) or f"/bin/{tool}")
    env = {"PATH": str(tools), "HOME": str(tmp_path)}
    missing = _run_step_script(step, tmp_path, env)
    assert missing.returncode == 1 and "defines no [gg1] remote" in missing.stdout
    conf.write_text("[gg1]\ntype = drive\nscope = drive\n")
    tokenless = _run_step_script(step, tmp_path, env)
    assert tokenless.returncode == 1 and "has no token" in tokenless.stdout
    conf.write_text('[gg1]\ntype = drive\nscope = drive\ntoken = {"access_token":"x"}\n')
    ready = _run_step_script(step, tmp_path, env)
    assert ready.returncode == 0 and "[gg1] is configured" in ready.stdout


@pytest.mark.parametrize(("version", "cuda", "ok"), [
    ("2.7.1+cu128", "12.8", True), ("2.7.1+cu126", "12.6", False), ("2.6.0+cu128", "12.8", False),
    ("2.7.1+cpu", None, False),
])  # fmt: skip
def test_torch_cuda_wants_a_cu128_build(
    tmp_path: Path, version: str, cuda: str | None, ok: bool
) -> None:
    torch = tmp_path / "site" / "torch"
    torch.mkdir(parents=True)
    (torch / "__init__.py").write_text(f"__version__ = {version!r}\nfrom torch import version\n")
    (torch / "version.py").write_text(f"cuda = {cuda!r}\n")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to(sys.executable)
    step = _plan()["torch-cuda"]
    done = _run_step_script(
        step, tmp_path, {"PATH": os.environ["PATH"], "PYTHONPATH": str(tmp_path / "site")}
    )
    assert (done.returncode == 0) == ok, done.stdout + done.stderr
    if not ok:
        assert "wanted" in done.stderr


def test_with_a_cache_a_warm_box_may_leave_out_the_checkpoint_only() -> None:
    """Only `convert` needs `ckpt`, and `convert` is cached: a box whose bucket holds the
    conversion skips the 12 GB download (provision/agent/prune.py); nothing else qualifies."""
    from provision.agent.prune import Pruner
    from provision.model import PlannedStep, StepStatus

    steps = {sid: PlannedStep.from_json(s) for sid, s in _plan(cache_remote="gs://b/c").items()}
    needs = {sid: list(s.needs) for sid, s in steps.items() if s.selected}

    def pruner() -> Pruner:
        return Pruner(
            "/nonexistent", steps, needs, lambda _s: StepStatus.PENDING, lambda _s: False,
            lambda _s: {}, lambda: None,
        )  # fmt: skip

    assert pruner().candidates == {"ckpt"}
    steps = {sid: PlannedStep.from_json(s) for sid, s in _plan().items()}  # no cache
    assert pruner().candidates == set()
