"""`preflight` end to end: `bootstrap up` over an sshd box with the stand-in nvidia-smi."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from boxes import Box
from gpu_fake import FAKES, write_scenario
from project import Project

PLAYBOOK = """
name: preflight-e2e
steps:
  - id: preflight
    kind: preflight
    min_gpus: 2
    min_gpu_memory_gb: 90
    min_cuda: "12.8"
    disk: {{"~/work": 1}}
    checkpoint_dir: ~/work/checkpoints
    checkpoints: 1
    tools: [python3, tmux]
    env: {{PATH: "{path}", FAKE_NVIDIA_SMI: "{scenario}"}}
"""


@pytest.mark.slow
def test_preflight_up_noop_then_rerun_on_a_sick_gpu(
    tmp_path: Path, project: Project, box: Box
) -> None:
    scenario = write_scenario(tmp_path / "gpus.json", "healthy")
    path = f"{FAKES}{os.pathsep}{os.environ['PATH']}"
    project.playbook(PLAYBOOK.format(path=path, scenario=scenario))

    first = project.up("box1")
    assert first.returncode == 0, first.stdout + first.stderr
    steps = project.steps("box1")
    assert steps["preflight"]["status"] == "done"

    second = project.up("box1")
    assert second.returncode == 0, second.stdout + second.stderr
    assert project.steps("box1")["preflight"]["attempts"] == steps["preflight"]["attempts"]
    plan = project.cli("plan", "box1", "-p", "playbooks/test.yaml", "--json")
    assert plan.returncode == 0, plan.stderr
    steps_planned = {s["id"]: s for s in json.loads(plan.stdout)["steps"]}
    assert set(steps_planned) == {"preflight", "tool-tmux"}  # the tool it checks comes first
    step = steps_planned["preflight"]
    assert not step["run"] and "passed at" in step["reason"], step

    # The GPU breaks: a rerun checks again and fails with the rows and the catalog's hint.
    write_scenario(scenario, "err")
    rerun = project.cli("rerun", "box1", "preflight", "-p", "playbooks/test.yaml")
    assert rerun.returncode == 1, rerun.stdout + rerun.stderr
    failed = project.steps("box1")["preflight"]
    assert failed["status"] == "failed"
    assert "gpu health: gpu1: nvidia-smi shows ERR!" in failed["reason"]
    assert "rent another box" in failed["hint"]
