"""The commands around a run: check, monitor, diagnose, stats, sample-data, kinds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from boxes import Box, run_cli
from gpu_fake import FAKES, waypoint_log, write_scenario
from project import Project, one_line_error

CHECK = """
name: watch
steps:
  - id: preflight
    kind: preflight
    min_gpus: 2
    min_gpu_memory_gb: 90
    tools: [python3, tmux]
    env: {{PATH: "{path}", FAKE_NVIDIA_SMI: "{scenario}"}}
  - id: train
    kind: tmux_launch
    session: train-ae
    cwd: ~/openpi
    command: .venv/bin/torchrun scripts/train_waypoint.py --mode ae
    log: logs/waypoint_ae_libero.log
    env: {{PATH: "{path}", FAKE_NVIDIA_SMI: "{scenario}"}}
"""


def _project(project: Project, tmp_path: Path, preset: str) -> Path:
    scenario = write_scenario(tmp_path / "gpus.json", preset)
    path = f"{FAKES}{os.pathsep}{os.environ['PATH']}"
    project.playbook(CHECK.format(path=path, scenario=scenario))
    return scenario


def test_check_passes_on_healthy_gpus_and_fails_on_err(
    project: Project, box: Box, tmp_path: Path
) -> None:
    scenario = _project(project, tmp_path, "healthy")
    ok = project.cli("check", "box1", "-p", "playbooks/test.yaml", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = json.loads(ok.stdout)
    assert report["ok"] and report["host"] == "box1"
    write_scenario(scenario, "err")
    bad = project.cli("check", "box1", "-p", "playbooks/test.yaml")
    assert bad.returncode == 1
    assert "NOT ready" in bad.stdout and "ERR!" in bad.stdout


def test_monitor_reads_the_training_log_and_raises_alerts(
    project: Project, box: Box, tmp_path: Path
) -> None:
    scenario = _project(project, tmp_path, "healthy")
    log = box.home / "openpi/logs/waypoint_ae_libero.log"
    log.parent.mkdir(parents=True)
    log.write_text(waypoint_log("AE", steps=range(0, 501, 50)))
    result = project.cli("monitor", "box1", "-p", "playbooks/test.yaml", "--json")
    assert result.returncode in (0, 1), result.stderr
    snap = json.loads(result.stdout)
    assert snap["training"]["step"] == 500 and snap["training"]["total"] == 10000
    assert snap["gpus"]["gpus"], snap["gpus"]
    write_scenario(scenario, "hot")
    hot = project.cli("monitor", "box1", "-p", "playbooks/test.yaml", "--json")
    assert hot.returncode == 1
    assert any("temperature" in json.dumps(a) for a in json.loads(hot.stdout)["alerts"])


@pytest.mark.slow
def test_diagnose_file_and_stdin(tmp_path: Path, controller_env: dict[str, str]) -> None:
    log = tmp_path / "train.log"
    log.write_text("starting\nModuleNotFoundError: No module named 'safetensors'\n")
    found = run_cli(["diagnose", str(log)], env=controller_env)
    assert found.returncode == 0 and ".venv/bin/torchrun" in found.stdout
    clean = subprocess.run(
        [sys.executable, "-m", "provision.cli", "diagnose", "-"],
        input="all good\n",
        capture_output=True,
        text=True,
        env=controller_env,
    )
    assert clean.returncode == 1 and "No known issue" in clean.stdout
    missing = run_cli(["diagnose", str(tmp_path / "nope.log")], env=controller_env)
    assert "No such file" in one_line_error(missing)


@pytest.mark.slow
def test_sample_data_then_stats_in_each_schema(
    tmp_path: Path, controller_env: dict[str, str]
) -> None:
    made = run_cli(
        ["sample-data", str(tmp_path / "d"), "--episodes", "6", "--steps", "20"], env=controller_env
    )
    assert made.returncode == 0, made.stderr
    version_dir = next((tmp_path / "d").rglob("1.0.0"))
    for schema in ("ae", "vlm", "openpi"):
        out = tmp_path / f"{schema}.json"
        result = run_cli(
            ["stats", str(version_dir), "--schema", schema, "-o", str(out)], env=controller_env
        )
        assert result.returncode == 0, result.stderr
        assert "7 dims" in result.stdout and "8 dims" in result.stdout
        doc = json.loads(out.read_text())
        if schema == "openpi":
            assert set(doc["norm_stats"]) == {"state", "actions"}
    bad = run_cli(["stats", str(tmp_path / "none")], env=controller_env)
    assert "does not exist" in one_line_error(bad)


@pytest.mark.slow
def test_kinds_lists_and_describes(controller_env: dict[str, str]) -> None:
    listing = run_cli(["kinds"], env=controller_env)
    names = {line.split()[0] for line in listing.stdout.splitlines() if line.strip()}
    assert {"shell", "apt", "git_clone", "uv_sync", "rclone_copy", "tmux_launch"} <= names
    one = run_cli(["kinds", "shell"], env=controller_env)
    assert one.returncode == 0 and "example:" in one.stdout and "kind: shell" in one.stdout
    assert "no kind" in one_line_error(run_cli(["kinds", "nope"], env=controller_env))


def test_attach_opens_the_session_over_ssh_with_a_terminal(project: Project, box: Box) -> None:
    """`attach` runs `tmux attach` on the box through `ssh -t` (a pty comes from `script`)."""
    project.playbook("name: a\nsteps:\n  - {id: x, kind: shell, run: 'true'}\n")
    project.write_inventory()
    box.ssh("tmux new-session -d -s other 'sleep 60'")
    cli = f"{sys.executable} -m provision.cli attach box1 nosuch -p playbooks/test.yaml"
    result = subprocess.run(
        ["script", "-qec", cli, "/dev/null"],
        cwd=project.root,
        env=project.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # tmux ran on the box, in a terminal, and answered about the session it was asked for.
    assert "can't find session" in result.stdout + result.stderr, result
    assert result.returncode != 0
