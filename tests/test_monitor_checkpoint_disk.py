"""The checkpoint disk forecast (provision/monitor/checkpoint_disk.py) over checkpoints written by
the stand-in trainer the way the fork's save_checkpoint writes them (tmp_<step>, renamed to
<step>), on the real disk, then through `bootstrap monitor` on a box."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ckpt_remotes import TRAINER, trainer_command
from project import Project, wait_for

from provision.monitor import checkpoint_disk
from provision.monitor.alerts import CRITICAL, WARNING
from provision.monitor.snapshot import monitor_snapshot

MB = 1_000_000


def write_run(cwd: Path, checkpoints: int, *extra: str) -> Path:
    """The stand-in trainer to completion: a 1 MB checkpoint every 2 steps of 0.1 s."""
    subprocess.run(
        [sys.executable, str(TRAINER), "--mode", "ae", "--steps", str(2 * checkpoints),
         "--step-sleep", "0.1", "--startup-sleep", "0", "--wandb", "offline", "--save-dir", "ck",
         "--save-interval", "2", "--ckpt-bytes", str(MB), *extra],
        cwd=cwd, capture_output=True, check=True, timeout=120,
    )  # fmt: skip
    return cwd / "ck"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run(tmp_path_factory.mktemp("train"), 5)


@pytest.mark.slow
def test_size_and_interval_come_from_the_directory(run_dir: Path) -> None:
    found = checkpoint_disk.forecast(str(run_dir), ahead=3, size_gb=500)
    assert found.complete == 5 and found.size_measured
    assert MB / 1e9 <= found.size_gb < 1.1 * MB / 1e9  # the real size, not the declared 500 GB
    assert found.interval_s is not None and 0.15 <= found.interval_s < 10  # 2 steps of 0.1 s
    assert found.ok and found.need_gb == pytest.approx(3 * found.size_gb)
    assert found.fits is not None and found.fits * found.size_gb <= found.free_gb
    assert "5 complete checkpoint(s) (0.0 GB each, one every" in found.describe()


@pytest.mark.slow
def test_a_disk_that_will_not_hold_the_next_n_warns(run_dir: Path) -> None:
    fits = checkpoint_disk.forecast(str(run_dir)).fits
    assert fits is not None
    found = checkpoint_disk.forecast(str(run_dir), ahead=fits + 5).to_dict()
    assert not found["ok"] and found["full_in_s"] is not None
    (alert,) = checkpoint_disk.disk_alerts(found)
    assert alert.id == "checkpoint_disk" and alert.severity == WARNING
    assert f"holds {fits} more checkpoint(s)" in alert.message
    assert f"the next {fits + 5} checkpoint(s) need" in alert.message
    assert "set `keep`" in alert.message and "full in ~" in alert.message


def test_a_keep_policy_bounds_what_the_disk_must_hold(run_dir: Path) -> None:
    """With keep 2, at most 3 exist at a time: the 5 there already need room for one more."""
    fits = checkpoint_disk.forecast(str(run_dir)).fits
    assert fits is not None
    found = checkpoint_disk.forecast(str(run_dir), keep=2, ahead=fits + 5)
    assert found.ok and found.need_gb == pytest.approx(found.size_gb)
    assert found.full_in_s is None and checkpoint_disk.disk_alerts(found.to_dict()) == []


def test_before_the_first_checkpoint_the_declared_size_stands_in(tmp_path: Path) -> None:
    empty = checkpoint_disk.forecast(str(tmp_path / "ck"), ahead=3)
    assert empty.ok and empty.size_gb is None and "no complete checkpoint yet" in empty.describe()
    huge = checkpoint_disk.forecast(str(tmp_path / "ck"), keep=1, size_gb=1e9).to_dict()
    assert not huge["ok"] and not huge["size_measured"] and huge["need_gb"] == 2e9
    (alert,) = checkpoint_disk.disk_alerts(huge)
    assert alert.severity == CRITICAL and "holds 0 more" in alert.message
    assert "with keep 1 the next checkpoint(s) need 2000000000.0 GB" in alert.message


@pytest.mark.slow
def test_a_checkpoint_being_written_is_not_counted(tmp_path: Path) -> None:
    """tmp_<step> while its chunks land: neither a checkpoint nor its (partial) size."""
    command = trainer_command("ck", 2, 6, "--step-sleep", "0", "--ckpt-bytes", str(4 * MB))
    extra = ["--ckpt-chunks", "4", "--ckpt-sleep", "1"]
    proc = subprocess.Popen([*command.split(), *extra], cwd=tmp_path, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: (tmp_path / "ck" / "2").is_dir(), timeout=60, what="checkpoint 2")
        wait_for(lambda: (tmp_path / "ck" / "tmp_4").is_dir(), timeout=60, what="tmp_4")
        found = checkpoint_disk.forecast(str(tmp_path / "ck"))
        assert (tmp_path / "ck" / "tmp_4").is_dir()  # still being written while we looked
        assert found.complete == 1 and found.size_gb == pytest.approx(4 * MB / 1e9, rel=0.05)
    finally:
        proc.kill()
        proc.wait()


def test_the_snapshot_carries_the_forecast_and_its_alert(run_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text("[AE] step=10/10000 loss=0.5\n")
    spec = {"dir": str(run_dir), "keep": None, "step": r"(\d+)", "complete": "metadata.pt"}
    calm = monitor_snapshot(str(log), checkpoints=spec, cpu_interval=0.01)
    assert calm["checkpoints"]["complete"] == 5
    assert not [a for a in calm["alerts"] if a["id"] == "checkpoint_disk"]
    fits = calm["checkpoints"]["fits"]
    tight = monitor_snapshot(
        str(log), thresholds={"checkpoints_ahead": fits + 1}, checkpoints=spec, cpu_interval=0.01
    )
    assert [a["id"] for a in tight["alerts"]].count("checkpoint_disk") == 1
    json.dumps(tight, allow_nan=False)  # the agent prints it as JSON
    off = monitor_snapshot(
        str(log), thresholds={"checkpoints_ahead": None}, checkpoints=spec, cpu_interval=0.01
    )
    assert off["checkpoints"] is None


MONITORED = """
name: ckdisk
vars: {{alert_thresholds: {{checkpoints_ahead: {ahead}}}}}
steps:
  - id: train
    kind: tmux_launch
    session: train
    cwd: ~/job
    command: mkdir -p ~/job && {command}
    log: train.log
    checkpoints: {{dir: ck, complete: metadata.pt}}
"""


@pytest.mark.slow
def test_monitor_warns_when_the_box_disk_will_not_hold_the_next_checkpoints(
    project: Project, box
) -> None:  # type: ignore[no-untyped-def]
    project.host_vars = {"agent_python": sys.executable}
    (box.home / "job").mkdir()
    command = trainer_command("ck", 2, 100000, "--step-sleep", "0.1", "--ckpt-bytes", str(MB))
    project.playbook(MONITORED.format(ahead=3, command=command))
    started = project.up("box1")
    assert started.returncode == 0, started.stdout + started.stderr
    wait_for(lambda: len(list((box.home / "job" / "ck").glob("[0-9]*"))) >= 3, timeout=60)

    def monitor() -> tuple[int, dict]:
        result = project.cli("monitor", "box1", "-p", "playbooks/test.yaml", "--json")
        return result.returncode, json.loads(result.stdout.strip().splitlines()[-1])

    rc, snap = monitor()
    found = snap["checkpoints"]
    assert found["dir"].endswith("/job/ck") and found["complete"] >= 3 and found["ok"]
    assert not [a for a in snap["alerts"] if a["id"] == "checkpoint_disk"]
    # The guard's findings come with it, and `status` prints them too.
    watch = wait_for(lambda: monitor()[1]["watch"], timeout=30, what="the guard's first look")
    assert watch["state"] == "training" and watch["progress"]["step"] is not None
    shown = project.cli("status", "box1", "-p", "playbooks/test.yaml").stdout
    assert "  train: training · step " in shown and "steps/s" in shown, shown
    # The same disk, asked to hold more checkpoints than it has room for at this size.
    project.playbook(MONITORED.format(ahead=found["fits"] + 10, command=command))
    time.sleep(0.5)
    rc, snap = monitor()
    assert rc == 1
    (alert,) = [a for a in snap["alerts"] if a["id"] == "checkpoint_disk"]
    assert alert["severity"] == "warning" and "/job/ck:" in alert["message"]
    text = project.cli("monitor", "box1", "-p", "playbooks/test.yaml").stdout
    assert "  train: training · step " in text
    assert "checkpoints " in text and "complete checkpoint(s) (0.0 GB each, one every" in text
    assert "WARNING: " in text and "more checkpoint(s) of 0.0 GB" in text


@pytest.mark.slow
def test_only_the_newest_checkpoints_are_walked(tmp_path: Path) -> None:
    directory = write_run(tmp_path, 8)
    count, walked = checkpoint_disk.measure(str(directory))
    assert count == 8 and [c.step for c in walked] == [6, 8, 10, 12, 14, 16]
    assert checkpoint_disk.forecast(str(directory)).complete == 8
