"""monitor_snapshot (one reading on the box), its plain-text rendering, and stdlib-only imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from gpu_fake import fake_env, use_fake_gpus, waypoint_log

from provision.monitor.render import duration, render_rows, render_snapshot, sparkline
from provision.monitor.snapshot import monitor_snapshot

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_snapshot_of_a_running_job(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use_fake_gpus(monkeypatch, "training")
    log = tmp_path / "logs" / "waypoint_ae_libero.log"
    log.parent.mkdir()
    log.write_text(waypoint_log("AE", range(0, 1001, 50)))
    snap = monitor_snapshot(str(log), batch_size=288, thresholds={"gpu_memory_pct": 95})
    json.dumps(snap, allow_nan=False)
    assert snap["log"]["exists"] and snap["log"]["age_s"] < 60
    tr = snap["training"]
    assert (tr["step"], tr["total"], tr["rate_source"]) == (1000, 10000, "log timestamps")
    assert tr["s_per_step"] == pytest.approx(13.5)
    assert [g["utilization_pct"] for g in snap["gpus"]["gpus"]] == [98, 98]
    assert snap["host"]["disks"][0]["path"] == str(log.parent)
    assert snap["known_issues"] == []

    text = render_snapshot(snap)
    assert "step 1000/10000 (10.0 %)   ETA 1d 09:45:00" in text
    assert "loss ▁" not in text and "loss █" in text  # falling loss: the sparkline starts high
    assert "13.5 s/step" in text and "samples/s" in text
    assert "gpu1 NVIDIA RTX PRO 6000 Blackwell Workstation Edition: util 98 %" in text


@pytest.mark.slow
def test_snapshot_of_a_crashed_job_names_the_issue(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_fake_gpus(monkeypatch, "healthy")
    log = tmp_path / "train.log"
    log.write_text(
        waypoint_log("VLM", range(0, 51, 50), total=30000)
        + "[rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 15.68 GiB.\n"
    )
    snap = monitor_snapshot(str(log))
    (issue,) = snap["known_issues"]
    assert issue["id"] == "cuda-oom" and issue["remediation"] == "expandable_segments"
    assert "known issue [cuda-oom]" in render_snapshot(snap)


def test_snapshot_without_log_or_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    snap = monitor_snapshot(str(tmp_path / "nope.log"), disk_paths=[str(tmp_path)])
    assert snap["log"] == {
        "path": str(tmp_path / "nope.log"),
        "exists": False,
        "size": 0,
        "age_s": None,
    }
    assert snap["training"]["step"] is None
    assert [a["id"] for a in snap["alerts"]][:1] == ["gpu_error"]
    assert "no step yet" in render_snapshot(snap)


def test_unknown_threshold_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown alert threshold 'gpu_temp'"):
        monitor_snapshot(str(tmp_path / "x.log"), thresholds={"gpu_temp": 80})


@pytest.mark.slow
def test_box_python_runs_the_snapshot_without_third_party_modules(tmp_path: Path) -> None:
    # The agent runs this with the box's bare python3: no yaml, rich, typer, numpy.
    log = tmp_path / "train.log"
    log.write_text(waypoint_log("AE", range(0, 101, 50)))
    code = (
        "import sys, json\n"
        "for name in ('yaml', 'rich', 'typer', 'numpy', 'jinja2'):\n"
        "    sys.modules[name] = None\n"
        "from provision.monitor.snapshot import monitor_snapshot\n"
        "from provision.monitor.preflight import preflight_report\n"
        f"snap = monitor_snapshot({str(log)!r}, 288)\n"
        "print(json.dumps({'step': snap['training']['step'], 'issues': snap['known_issues'],\n"
        "                  'check': preflight_report({'min_gpus': 2})['ok']}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=fake_env("healthy"),
        capture_output=True,
        text=True,
        check=True,
    )
    # No known_issues.json in a source checkout and no yaml: the catalog is skipped, not fatal.
    assert json.loads(out.stdout) == {"step": 100, "issues": [], "check": True}


def test_sparkline_and_duration() -> None:
    assert sparkline([3, 2, 1, None, "nan", 0]) == "█▆▃▁"
    assert sparkline([1.0, 1.0]) == "▁▁"
    assert sparkline([]) == ""
    assert len(sparkline(list(range(100)), width=40)) == 40
    assert duration(90061) == "1d 01:01:01" and duration(None) == "-"


def test_render_rows() -> None:
    rows = [
        {"check": "gpus", "value": "2 × H100", "expected": ">= 2", "ok": True, "detail": ""},
        {
            "check": "disk /workspace",
            "value": "40.0 GB free",
            "expected": ">= 60.0 GB",
            "ok": False,
            "detail": "free space",
        },
    ]
    assert render_rows(rows).splitlines() == [
        "check            value         expected",
        "gpus             2 × H100      >= 2        OK",
        "disk /workspace  40.0 GB free  >= 60.0 GB  FAIL",
        "                 -> free space",
    ]
