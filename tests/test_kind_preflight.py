"""Pre-flight checks and the `preflight` kind, driven by the stand-in nvidia-smi."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from gpu_fake import fake_env, use_fake_gpus

from provision.agent.gpus import GpuLeases
from provision.errors import StepFailed
from provision.monitor.preflight import Row, preflight_report, run_preflight, version_at_least
from provision.steps.base import ParamError, StepContext, validate_params
from provision.steps.preflight import KIND

HUGE = 10**9  # GB: no disk has that much


@pytest.fixture(autouse=True)
def agent_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own agent directory: the GPU leases it reads are box-wide."""
    monkeypatch.setenv("BOOTSTRAP_AGENT_DIR", str(tmp_path / "agent"))
    return tmp_path / "agent"


def rows(params: dict) -> dict[str, dict]:
    return {r.check: r.to_dict() for r in run_preflight(params)}


def test_healthy_box_passes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use_fake_gpus(monkeypatch, "healthy")
    report = preflight_report(
        {
            "min_gpus": 2,
            "min_gpu_memory_gb": 96,
            "gpu_name": "RTX PRO 6000",
            "min_driver": "570",
            "min_cuda": "12.8",
            "disk": {str(tmp_path): 1},
            "tools": ["python3", "tmux"],
        }
    )
    assert report["ok"] and report["failed"] == [], report
    found = {r["check"]: r for r in report["rows"]}
    assert found["gpus"]["value"] == "2 × NVIDIA RTX PRO 6000 Blackwell Workstation Edition"
    assert found["gpu memory"]["value"] == "102.6 GB (97887 MiB, gpu0)"
    assert found["nvidia driver"]["value"] == "570.172.08"
    assert found["cuda (driver)"]["value"] == "12.8"
    assert re.match(r"\d+\.\d+", found["python3"]["value"])
    json.dumps(report)


def test_err_gpu_fails_with_the_hardware_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_gpus(monkeypatch, "err")
    health = rows({"min_gpus": 2})["gpu health"]
    assert not health["ok"]
    assert health["value"].startswith("gpu1: nvidia-smi shows ERR!")
    assert "rent another box" in health["detail"]


@pytest.mark.slow
def test_not_enough_gpu_memory_or_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_gpus(monkeypatch, "small")
    found = rows({"min_gpus": 2, "min_gpu_memory_gb": 80, "gpu_name": "H100|RTX PRO 6000"})
    assert not found["gpus"]["ok"] and found["gpus"]["value"] == "1 × NVIDIA GeForce RTX 4090"
    assert not found["gpu memory"]["ok"]
    assert found["gpu memory"]["value"] == "25.8 GB (24564 MiB, gpu0)"
    assert not found["gpu model"]["ok"]
    use_fake_gpus(monkeypatch, "h100")
    assert rows({"min_gpu_memory_gb": 80})["gpu memory"]["ok"]  # an "80GB" H100 is 85.5 GB


def test_old_driver_and_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_gpus(monkeypatch, "small")  # 550.135, CUDA 12.4
    found = rows({"min_driver": "570", "min_cuda": "12.8"})
    assert not found["nvidia driver"]["ok"] and not found["cuda (driver)"]["ok"]
    assert version_at_least("570.172.08", "570") and version_at_least("12.10", "12.8")
    assert not version_at_least("12.4", "12.8") and not version_at_least(None, "1")


def test_no_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_gpus(monkeypatch, "no_driver")
    gpus = rows({"min_gpus": 1})["gpus"]
    assert not gpus["ok"] and "couldn't communicate" in gpus["value"]
    assert "nvidia-smi" in gpus["detail"]  # the catalog's no-gpu-visible fix
    assert rows({"min_gpus": 0})["gpus"]["ok"]  # a CPU-only playbook does not care


def test_low_disk_sums_paths_on_one_filesystem(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_fake_gpus(monkeypatch, "healthy")
    params = {
        "disk": {str(tmp_path / "data"): 1, str(tmp_path / "models"): HUGE},
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "checkpoints": 3,
    }
    (disk,) = [r for r in run_preflight(params) if r.check.startswith("disk ")]
    assert not disk.ok
    assert disk.expected == (
        f">= {HUGE + 1 + 66 * 1.1:.1f} GB (1 for {tmp_path / 'data'} + {HUGE} for "
        f"{tmp_path / 'models'} + 3 checkpoints × 22 + 10 %)"
    )
    assert "bigger disk" in disk.detail


def checkpoint_row(params: dict) -> Row:
    (disk,) = [r for r in run_preflight({"min_gpus": 0, **params}) if r.check.startswith("disk ")]
    return disk


def write_checkpoints(directory: Path, size: int, *steps: int) -> None:
    """Checkpoints as the fork leaves them: `<step>/` complete, `tmp_<step>/` being written."""
    for step in steps:
        (directory / str(step)).mkdir(parents=True)
        (directory / str(step) / "model.safetensors").write_bytes(os.urandom(size))
    (directory / f"tmp_{max(steps) + 50}").mkdir()
    (directory / f"tmp_{max(steps) + 50}" / "model.safetensors").write_bytes(os.urandom(size * 9))
    (directory / "wandb_run_id.txt").write_text("abc\n")


def test_checkpoint_disk_is_sized_from_keep(tmp_path: Path) -> None:
    params = {"checkpoint_dir": str(tmp_path / "ck"), "checkpoint_keep": 2, "checkpoint_gb": 22}
    disk = checkpoint_row(params)
    assert disk.expected == ">= 72.6 GB (3 checkpoints × 22 (keep 2 + 1 being written) + 10 %)"
    disk = checkpoint_row({**params, "checkpoint_margin": 0})
    assert disk.expected == ">= 66.0 GB (3 checkpoints × 22 (keep 2 + 1 being written))"


def test_checkpoint_disk_is_sized_from_the_real_checkpoints(tmp_path: Path) -> None:
    """A declared size below what the job really writes loses; those already there count."""
    write_checkpoints(tmp_path / "ck", 2_000_000, 50, 100)  # 2 MB each, one more being written
    params = {"checkpoint_dir": str(tmp_path / "ck"), "checkpoint_keep": 3, "checkpoint_gb": 0.001}
    disk = checkpoint_row({**params, "checkpoint_margin": 0})
    # keep 3 + 1 being written, 2 complete there already: 2 more of the measured size.
    assert disk.expected.startswith(">= 0.0 GB (2 checkpoints × 0.002 measured (keep 3 + 1")
    assert disk.expected.endswith("being written, 2 there))")
    bigger = checkpoint_row({**params, "checkpoint_gb": 5, "checkpoint_margin": 0})
    assert bigger.expected == ">= 10.0 GB (2 checkpoints × 5 (keep 3 + 1 being written, 2 there))"
    full = checkpoint_row({**params, "checkpoint_keep": 1, "checkpoint_gb": HUGE})
    assert not full.ok and "1 checkpoints × 1e+09 (keep 1 + 1 being written" in full.expected


@pytest.mark.slow
def test_workers_need_ram_and_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_gpus(monkeypatch, "healthy")
    found = rows({"min_gpus": 2, "workers": 4096})
    assert not found["ram"]["ok"]
    assert "(15 base + 4096 workers × 2.5)" in found["ram"]["expected"]
    assert not found["cpu cores"]["ok"]
    assert found["cpu cores"]["expected"] == ">= 4098 (4096 workers + 2 trainers)"
    assert "cpu cores" not in rows({"workers": 0})


def test_missing_tool(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_gpus(monkeypatch, "healthy")
    found = rows({"tools": ["python3", "no-such-tool-bootstrap"], "min_python": "99"})
    assert found["no-such-tool-bootstrap"] == {
        "check": "no-such-tool-bootstrap",
        "value": "not found",
        "expected": "on PATH",
        "ok": False,
        "detail": "install no-such-tool-bootstrap",
    }
    assert not found["python3"]["ok"] and found["python3"]["expected"] == ">= 99"


def context(tmp_path: Path, scenario: str, **params: object) -> StepContext:
    return StepContext(
        step_id="preflight",
        params=validate_params(KIND, params),
        run_dir=tmp_path / "run",
        env=fake_env(scenario),
    )


def test_kind_passes_then_stays_done(tmp_path: Path) -> None:
    ctx = context(tmp_path, "healthy", min_gpus=2, disk={str(tmp_path): 1})
    assert not KIND.check(ctx).done
    KIND.run(ctx)
    KIND.verify(ctx)
    check = KIND.check(ctx)
    assert check.done and check.reason.startswith("passed at ")
    saved = json.loads((ctx.workdir / "preflight.json").read_text())
    assert saved["ok"] and saved["failed"] == []


def test_kind_fails_naming_every_failing_row(tmp_path: Path) -> None:
    ctx = context(tmp_path, "err", min_gpus=4, min_gpu_memory_gb=120)
    with pytest.raises(StepFailed) as failed:
        KIND.run(ctx)
    reason = failed.value.reason
    assert reason.startswith("preflight failed: gpus: 2 × NVIDIA RTX PRO 6000")
    assert "(need >= 4)" in reason and "gpu health: gpu1: nvidia-smi shows ERR!" in reason
    assert "gpu memory: 102.6 GB (97887 MiB, gpu0) (need >= 120 GB each)" in reason
    assert "rent another box" in failed.value.hint
    check = KIND.check(ctx)
    assert not check.done and check.reason == "failed last time: gpus, gpu health, gpu memory"
    with pytest.raises(StepFailed):
        KIND.verify(ctx)


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"min_gpus": -1}, "min_gpus"),
        ({"min_cuda": "twelve"}, "min_cuda"),
        ({"gpu_name": "H100("}, "gpu_name"),
        ({"checkpoints": 2}, "checkpoint_dir"),
        ({"checkpoint_keep": 2}, "checkpoint_dir"),
        ({"checkpoint_keep": 0, "checkpoint_dir": "/c"}, "checkpoint_keep"),
        ({"checkpoint_keep": 2, "checkpoints": 3, "checkpoint_dir": "/c"}, "checkpoint_keep"),
        ({"checkpoint_margin": -0.1}, "checkpoint_margin"),
        ({"disk": {"/workspace": -5}}, "disk"),
        ({"disk": {"/workspace": "60G"}}, "disk"),
        ({"workers": "8"}, "workers"),
    ],
)
def test_bad_params(params: dict, key: str) -> None:
    with pytest.raises(ParamError) as err:
        validate_params(KIND, params)
    assert err.value.key == key


@pytest.mark.slow
def test_gpus_held_by_another_runs_job_fail_before_the_downloads(
    monkeypatch: pytest.MonkeyPatch, agent_dir: Path, tmp_path: Path
) -> None:
    use_fake_gpus(monkeypatch, "healthy")
    assert rows({"min_gpus": 1})["gpus free"]["value"] == "no job holds a GPU"
    job = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        leases = GpuLeases(agent_dir)
        with leases.claim(
            ("0", "1"), run="waypoint", step="train-ae", session="ae", socket=None
        ) as c:
            c.grant("abc123", tmp_path / "job.pid", "playbooks/openpi-waypoint.yaml")
            c.started(job.pid)
        held = rows({"min_gpus": 1})["gpus free"]
        assert not held["ok"] and held["expected"] == "all GPUs held by no other run's job"
        assert held["value"].startswith("GPUs 0,1: tmux session ae (playbook playbooks/openpi")
        assert "kill-session -t =ae" in held["detail"]
        assert not rows({"gpus": "1,2"})["gpus free"]["ok"]
        assert rows({"gpus": [2, 3]})["gpus free"]["ok"]  # disjoint: side by side
        own = run_preflight({"min_gpus": 1}, run="waypoint")  # the run's own training
        assert [r.ok for r in own if r.check == "gpus free"] == [True]
        assert "gpus free" not in rows({"min_gpus": 0})  # a run that needs no GPU
    finally:
        job.kill()
        job.wait()
    assert rows({"min_gpus": 1})["gpus free"]["ok"]  # the job ended: its GPUs are free
