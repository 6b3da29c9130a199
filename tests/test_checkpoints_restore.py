"""Training resumes on another box from the newest verified checkpoint on the remote.

Real rclone (`type = local` remote), the real GCS emulator, real sshd boxes, tmux and the
stand-in trainer that saves and resumes as openpi's fork does (provision/data/fake_trainer.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ckpt_remotes import TRAINER, no_process_outlives, rclone_config, train
from gcs_emulator import EmulatorProcess, client
from project import Project, wait_for

from provision.checkpoints import restore
from provision.checkpoints.remote import Remote
from provision.checkpoints.spec import CheckpointSpec, parse_checkpoints
from provision.checkpoints.upload import Uploader
from provision.errors import StepFailed

FORK = {"dir": "ck", "step": r"(\d+)", "complete": "metadata.pt"}


@pytest.fixture(autouse=True)
def _no_process_outlives_the_test(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """Guards, their rclone and trainers a test started end with it, whatever happened."""
    with no_process_outlives(request, tmp_path):
        yield


def _setup(tmp_path: Path, **extra: object) -> tuple[CheckpointSpec, dict[str, str], Path]:
    conf = rclone_config(tmp_path / "rclone.conf", store={"type": "local"})
    raw = {**FORK, "remote": f"store:{tmp_path / 'remote'}", "rclone_config": str(conf)}
    raw.update(extra)
    return parse_checkpoints(raw), dict(os.environ), tmp_path / "remote"


def _upload(spec: CheckpointSpec, env: dict[str, str], cwd: Path) -> None:
    (cwd / "step").mkdir(exist_ok=True)
    report = Uploader(spec, cwd, cwd / "step", Remote(spec, env), print).sync()
    assert report.error is None


def _spoil(root: Path) -> None:
    """A partial upload of step 40 (no entry) and an entry for 50 whose file is gone."""
    shutil.copytree(root / "30", root / "40")
    (root / "40" / "metadata.pt").unlink()
    shutil.copytree(root / "30", root / "50")
    entry = json.loads((root / ".bootstrap/manifest/30.json").read_text())
    entry["name"], entry["step"] = "50", 50
    (root / ".bootstrap/manifest/50.json").write_text(json.dumps(entry) + "\n")
    (root / "50" / "model.safetensors").unlink()


@pytest.mark.slow
def test_survey_and_restore_skip_partial_and_broken(tmp_path: Path) -> None:
    spec, env, root = _setup(tmp_path, restore=True, carry=["ck/wandb_run_id.txt"])
    box1 = tmp_path / "box1"
    box1.mkdir()
    train(box1, 30, 10)
    _upload(spec, env, box1)
    _spoil(root)
    states = {c.name: c.state for c in restore.survey(Remote(spec, env), spec)}
    assert states == {"10": "verified", "20": "verified", "30": "verified", "40": "partial",
                      "50": "broken"}  # fmt: skip
    box2 = tmp_path / "box2"
    box2.mkdir()
    lines: list[str] = []
    got = restore.before_launch(spec, box2, env, lines.append)
    assert got is not None and got.name == "30"
    assert sorted(p.name for p in (box2 / "ck").iterdir()) == ["30", "wandb_run_id.txt"]
    for name in ("model.safetensors", "optimizer.pt", "metadata.pt"):
        assert (box2 / "ck/30" / name).read_bytes() == (box1 / "ck/30" / name).read_bytes()
    wandb_id = (box1 / "ck/wandb_run_id.txt").read_text()
    assert (box2 / "ck/wandb_run_id.txt").read_text() == wandb_id
    assert any("not restoring 50" in ln and "broken" in ln for ln in lines), lines
    assert any("not restoring 40" in ln and "partial" in ln for ln in lines), lines
    # The trainer resumes from it, and its run id is the first box's.
    out = train(box2, 5, 10, "--resume")
    assert "Resumed from step 30" in out and f"Resuming run {wandb_id}" in out
    # A box that has a checkpoint restores nothing.
    assert restore.before_launch(spec, box2, env, lines.append) is None


@pytest.mark.slow
def test_a_checkpoint_changed_on_the_remote_with_its_size_is_passed_over(tmp_path: Path) -> None:
    # The local remote hashes by reading the data, so its listing is by size: only the
    # download, checked against the manifest's hashes, shows the change.
    spec, env, root = _setup(tmp_path, restore=True)
    box1 = tmp_path / "box1"
    box1.mkdir()
    train(box1, 30, 10)
    _upload(spec, env, box1)
    model = root / "30" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[100] ^= 0xFF
    model.write_bytes(bytes(data))
    box2 = tmp_path / "box2"
    box2.mkdir()
    lines: list[str] = []
    got = restore.before_launch(spec, box2, env, lines.append)
    assert got is not None and got.name == "20"
    assert any("not restoring 30" in ln and "model.safetensors differs" in ln for ln in lines)
    assert sorted(p.name for p in box2.iterdir()) == ["ck"]  # no staging left
    assert sorted(p.name for p in (box2 / "ck").iterdir()) == ["20"]


def test_first_run_on_an_empty_remote_restores_nothing(tmp_path: Path) -> None:
    spec, env, _root = _setup(tmp_path, restore=True)
    assert restore.before_launch(spec, tmp_path, env, print) is None
    assert not (tmp_path / "ck").exists()


def test_unreadable_remote_fails_the_launch_rather_than_start_over(tmp_path: Path) -> None:
    spec, env, _root = _setup(tmp_path, restore=True, remote="nosuch:runs")
    with pytest.raises(StepFailed) as err:
        restore.before_launch(spec, tmp_path, env, print)
    assert "cannot list nosuch:runs" in err.value.reason
    assert "restore: false" in (err.value.hint or "")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 600 KiB tmpfs: too small for the checkpoint being restored."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.box  # mounts a tmpfs: root
def test_disk_full_during_download_leaves_nothing(tmp_path: Path, small_disk: Path) -> None:
    spec, env, _root = _setup(tmp_path, restore=True)
    box1 = tmp_path / "box1"
    box1.mkdir()
    train(box1, 10, 10, "--ckpt-bytes", str(1 << 20))
    _upload(spec, env, box1)
    with pytest.raises(StepFailed) as err:
        restore.before_launch(spec, small_disk, env, print)
    assert "no space left on device" in err.value.reason.lower(), err.value.reason
    assert list(small_disk.iterdir()) == []  # no staging, no checkpoint directory


@pytest.mark.slow
def test_a_stale_staging_directory_is_removed_first(tmp_path: Path) -> None:
    spec, env, _root = _setup(tmp_path, restore=True)
    box1 = tmp_path / "box1"
    box1.mkdir()
    train(box1, 10, 10)
    _upload(spec, env, box1)
    box2 = tmp_path / "box2"
    (box2 / ".ck.restoring-10").mkdir(parents=True)
    (box2 / ".ck.restoring-10" / "model.safetensors").write_bytes(b"half")
    assert restore.before_launch(spec, box2, env, print) is not None
    assert sorted(p.name for p in box2.iterdir()) == ["ck"]


# ---- over two boxes --------------------------------------------------------------------------

PLAYBOOK = """\
name: ckpt
steps:
  - id: train
    kind: tmux_launch
    session: train
    command: >-
      {python} {trainer} --mode ae --steps 100000 --total 100000 --step-sleep 0.08
      --startup-sleep 0 --wandb offline --save-dir ck --save-interval 10
      --ckpt-bytes 300000 --ckpt-chunks 6 --ckpt-sleep 0.5
    log: train.log
    resume_args: --resume
    env: {env}
    checkpoints:
      dir: ck
      complete: metadata.pt
      keep: 2
      remote: "{remote}"
      restore: true
      poll: 1
      carry: [ck/wandb_run_id.txt]
"""


@pytest.fixture(params=["rclone", "gs"])
def remote_kind(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict]:
    """The remote both boxes share: a local rclone remote, or a bucket on the GCS emulator."""
    if request.param == "rclone":
        root = tmp_path / "remote"
        yield {"remote": f"store:{root}", "env": {"RCLONE_CONFIG_STORE_TYPE": "local"}}
        return
    emulator = EmulatorProcess(threaded=True)
    try:
        client(emulator.endpoint).create_bucket("ckpts")
        yield {"remote": "gs://ckpts/runs/ae", "env": {"STORAGE_EMULATOR_HOST": emulator.endpoint}}
    finally:
        emulator.stop()


def _entries(remote: dict) -> dict[str, dict]:
    spec = parse_checkpoints({**FORK, "remote": remote["remote"]})
    return Remote(spec, {**os.environ, **remote["env"]}).entries()


def _survey(remote: dict) -> dict[str, str]:
    spec = parse_checkpoints({**FORK, "remote": remote["remote"]})
    found = restore.survey(Remote(spec, {**os.environ, **remote["env"]}), spec)
    return {c.name: c.state for c in found}


@pytest.mark.slow
def test_box_dies_and_training_resumes_on_another(
    tmp_path: Path, controller_env: dict[str, str], box_factory, remote_kind: dict
) -> None:  # type: ignore[no-untyped-def]
    box1, box2 = box_factory(2)
    project = Project(tmp_path / "project", controller_env, [box1, box2])
    project.host_vars = {"agent_python": sys.executable}
    project.playbook(
        PLAYBOOK.format(
            python=sys.executable,
            trainer=TRAINER,
            env=json.dumps(remote_kind["env"]),
            remote=remote_kind["remote"],
        )
    )
    first = project.up("box1")
    assert first.returncode == 0, first.stdout + first.stderr
    wait_for(lambda: len(_entries(remote_kind)) >= 2, timeout=90, what="two checkpoints uploaded")
    ck1 = box1.home / "ck"
    wait_for(lambda: list(ck1.glob("tmp_*")), timeout=30, what="box 1 writing a checkpoint")
    box1.kill_all()  # SIGKILL every process of the box, sshd included: it is gone
    box1.stop()
    partial = [p.name for p in ck1.glob("tmp_*")]
    assert partial, "box 1 was killed between two checkpoints"
    verified = {n for n, s in _survey(remote_kind).items() if s == "verified"}
    assert verified == set(_entries(remote_kind))  # the remote holds exactly the verified ones
    newest = max(int(n) for n in verified)
    assert all(not n.startswith("tmp_") for n in _survey(remote_kind))

    second = project.up("box2")
    assert second.returncode == 0, second.stdout + second.stderr
    log2 = box2.home / "train.log"
    wait_for(lambda: "Resumed from step" in log2.read_text(), timeout=60, what="resume on box 2")
    assert re.search(rf"Resumed from step {newest}\s", log2.read_text())
    launch = json.loads((box2.home / ".bootstrap/runs/ckpt/steps/train/launch.json").read_text())
    assert launch["restored"] == str(newest) and launch["resumed"]
    assert launch["command"].endswith(" --resume")
    wandb_id = (ck1 / "wandb_run_id.txt").read_text()
    assert (box2.home / "ck" / "wandb_run_id.txt").read_text() == wandb_id
    # Box 2 carries on uploading where box 1 stopped.
    wait_for(
        lambda: max(int(n) for n in _entries(remote_kind)) > newest + 10,
        timeout=90,
        what="box 2's own checkpoints uploaded",
    )
    listing = project.cli("checkpoints", "box2", "-p", "playbooks/test.yaml", "--json")
    assert listing.returncode == 0, listing.stderr
    report = json.loads(listing.stdout)
    assert report["guard"] and not report["remote_error"]
    states = [r["state"] for r in report["remote_checkpoints"]]
    assert set(states[:-1]) == {"verified"} and states[-1] in ("verified", "uploading"), states
    assert any(r["state"] == "uploaded" for r in report["local"])
