"""playbooks/smoke.yaml end to end: over a test sshd box and on `local`, every step done, a
second `up` does nothing, and a deleted output re-runs exactly what depends on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import uv as uv_package
from boxes import Box
from project import Project

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "playbooks" / "smoke.yaml")
WORK = Path(".bootstrap/smoke-work")  # under the box's HOME
ALL_STEPS = {
    "agent-venv", "workdir", "packages", "preflight", "git-server", "wheels", "clone", "uv-sync",
    "pip-install", "patch", "rclone-config", "remote-model", "pull-model", "model-check",
    "remote-data", "pull-data", "stats", "train-config", "train", "train-started",
    "tool-git", "tool-tmux", "tool-rclone", "tool-uv",  # implicit: the tools the kinds run
}  # fmt: skip
#: What the steps after `stats` are: deleting its output re-runs these and nothing else.
AFTER_STATS = {"stats", "train", "train-started"}


def _up(project: Project, target: str) -> dict[str, dict]:
    project.root.mkdir(parents=True, exist_ok=True)  # the inventory goes there
    result = project.cli("up", target, "-p", SMOKE, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return _steps(project, target)


def _steps(project: Project, target: str) -> dict[str, dict]:
    result = project.cli("status", target, "-p", SMOKE, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    snap = json.loads(result.stdout.strip().splitlines()[0])
    assert snap["runner"] == "idle", snap
    return {s["id"]: s for s in snap["steps"]}


def _starts(steps: dict[str, dict]) -> dict[str, float | None]:
    return {k: s["started"] for k, s in steps.items()}


def _check_outputs(home: Path) -> None:
    work = home / WORK
    stats = json.loads((work / "stats" / "dataset_statistics.json").read_text())
    (entry,) = stats.values()
    assert entry["num_samples"] == 400
    assert len(entry["action"]["q99"]) == 7 and len(entry["proprio"]["q99"]) == 8
    log = (work / "tinyproj" / "logs" / "smoke_ae.log").read_text()
    assert "[AE] step=19/20 loss=" in log and "exited with status 0" in log
    site = next((work / "tinyproj" / ".venv").glob("lib/python*/site-packages"))
    assert "PATCHED = True" in (site / "smokepkg" / "__init__.py").read_text()
    assert (site / "smokeextra" / "__init__.py").exists()


def _noop_and_plan(project: Project, target: str, first: dict[str, dict]) -> None:
    second = _up(project, target)
    assert _starts(second) == _starts(first)
    plan = project.cli("plan", target, "-p", SMOKE, "--json")
    assert plan.returncode == 0, plan.stderr
    reasons = {s["id"]: s for s in json.loads(plan.stdout)["steps"]}
    assert not any(s["run"] for s in reasons.values()), reasons
    assert "all 7 markers seen" in reasons["train-started"]["reason"]


@pytest.mark.slow
def test_smoke_over_ssh(project: Project, box: Box) -> None:
    project.host_vars = {
        "agent_base_python": sys.executable,
        "agent_system_site_packages": True,
        "uv_bin": uv_package.find_uv_bin(),
    }
    first = _up(project, "box1")
    assert set(first) == ALL_STEPS
    assert {s["status"] for s in first.values()} == {"done"}, first
    _check_outputs(box.home)
    _noop_and_plan(project, "box1", first)

    # A lost output re-runs its step and what follows; the trainer relaunches with --resume.
    (box.home / WORK / "stats" / "dataset_statistics.json").unlink()
    third = _up(project, "box1")
    changed = {k for k in ALL_STEPS if third[k]["started"] != first[k]["started"]}
    assert changed == AFTER_STATS
    log = (box.home / WORK / "tinyproj" / "logs" / "smoke_ae.log").read_text()
    assert "Resumed from step 10" in log


@pytest.mark.slow
def test_smoke_on_local(tmp_path: Path, controller_env: dict[str, str]) -> None:
    """`bootstrap up local` with the embedded default playbook (no -p), HOME in a tmp dir."""
    home = tmp_path / "home"
    home.mkdir()
    env = dict(controller_env, HOME=str(home), TMUX_TMPDIR=str(tmp_path))
    env.pop("BOOTSTRAP_AGENT_DIR", None)
    project = Project(tmp_path / "project", env)
    project.root.mkdir()
    try:
        result = project.cli("up", "local", timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr
        first = _steps(project, "local")
        assert set(first) == ALL_STEPS
        assert {s["status"] for s in first.values()} == {"done"}, first
        assert (home / ".bootstrap" / "runs" / "smoke" / "state.json").exists()
        _check_outputs(home)
        _noop_and_plan(project, "local", first)
    finally:
        # The trainer has finished by now; a leftover server would only outlive a failure.
        subprocess.run(
            ["tmux", "kill-server"], env={**os.environ, "TMUX_TMPDIR": str(tmp_path)},
            capture_output=True, check=False,
        )  # fmt: skip
