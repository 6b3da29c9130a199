"""The `dataset_stats` kind in-process on generated datasets, and end to end over an sshd box."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from boxes import Box
from project import Project

from provision.errors import StepFailed
from provision.stats import samples
from provision.steps.base import ParamError, StepContext, validate_params
from provision.steps.dataset_stats import KIND

WP = {"episodes": 12, "steps": 240, "shards": 4, "image_bytes": 32}


def _ctx(tmp_path: Path, **params: Any) -> StepContext:
    return StepContext(
        step_id="stats",
        params=validate_params(KIND, params),
        run_dir=tmp_path / "run",
        out=io.StringIO(),
    )


@pytest.fixture
def wp(tmp_path: Path) -> Path:
    return Path(samples.write_preset(tmp_path / "wp", "libero_wp", WP)["path"])


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"expect": {"joint_state": 7}}, "expect"),
        ({"keys": {"proprio": "x", "state": "y"}}, "keys"),
        ({"expect": {"action": 0}}, "expect"),
        ({"format": "rlds", "split_file": "/x/split.json"}, "split_file"),
        ({"action_horizon": 0}, "action_horizon"),
        ({"output": "relative/stats.json"}, "output"),
        ({"schema": "openpi", "dataset_name": "x"}, "dataset_name"),
        ({"schema": "json"}, "schema"),
    ],
)
def test_bad_params_name_their_key(params: dict[str, Any], key: str) -> None:
    raw = {"path": "/data/x", "output": "/data/stats.json", **params}
    with pytest.raises(ParamError) as err:
        validate_params(KIND, raw)
    assert err.value.key == key


def test_run_verify_then_done_until_an_input_changes(tmp_path: Path, wp: Path) -> None:
    out = tmp_path / "norm_stats" / "dataset_statistics.json"
    ctx = _ctx(
        tmp_path,
        path=str(wp),
        output=str(out),
        schema="vlm",
        expect={"action": 7, "proprio": 8},
        expect_samples=240,
        expect_episodes=12,
    )
    assert KIND.check(ctx).reason == f"{out} does not exist"
    KIND.run(ctx)
    KIND.verify(ctx)
    done = KIND.check(ctx)
    assert (
        done.done
        and done.reason == f"{out}: 240 samples, 12 episodes, dims {{'action': 7, 'state': 8}}"
    )
    progress = json.loads((ctx.workdir / "_progress.json").read_text())
    assert (progress["files_done"], progress["files_total"], progress["done"]) == (4, 4, 240)
    assert "240 samples, 12 episodes" in ctx.out.getvalue()

    shard = next(wp.glob("*-train.tfrecord-00002-of-00004"))
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1_000_000_000))
    changed = KIND.check(ctx)
    assert not changed.done and changed.reason == f"input files changed since: {shard}"
    KIND.run(ctx)
    assert KIND.check(ctx).done

    out.write_text(out.read_text().replace('"num_transitions": 240', '"num_transitions": 241'))
    assert KIND.check(ctx).reason == f"{out} changed since it was computed"
    with pytest.raises(StepFailed, match="241 samples, expected 240"):
        KIND.verify(ctx)


def test_joint_state_fails_with_reason_and_hint(tmp_path: Path, wp: Path) -> None:
    ctx = _ctx(
        tmp_path,
        path=str(wp),
        output=str(tmp_path / "s.json"),
        keys={"state": "observation/joint_state"},
        expect={"proprio": 8},
    )
    with pytest.raises(StepFailed) as err:
        KIND.run(ctx)
    assert err.value.reason == "proprio 'observation/joint_state' has 7 dims, expected 8"
    assert "'observation/state' has 8 dims" in (err.value.hint or "")
    assert not (tmp_path / "s.json").exists()
    assert not KIND.check(ctx).done


def test_openpi_warnings_reach_the_status_and_counts_are_verified(tmp_path: Path) -> None:
    root = samples.write_lerobot(tmp_path / "lr", samples.LeRobotSample())
    out = tmp_path / "assets" / "norm_stats.json"
    ctx = _ctx(
        tmp_path,
        path=str(root),
        output=str(out),
        schema="openpi",
        split_file=str(root / "split_info.json"),
        action_horizon=10,
        expect={"actions": 5, "state": 5},
        expect_episodes=31,
    )
    KIND.run(ctx)
    KIND.verify(ctx)
    warnings = json.loads((ctx.workdir / "_warnings.json").read_text())
    assert len(warnings) == 2 and all("are constant (std 0" in w for w in warnings)
    assert list(json.loads(out.read_text())["norm_stats"]) == ["state", "actions"]
    (root / "split_info.json").write_text(json.dumps({"train": [0, 1], "test": [2]}))
    assert "split_info.json" in KIND.check(ctx).reason


PLAYBOOK = """
name: stats-e2e
steps:
  - id: stats-vlm
    kind: dataset_stats
    path: "{wp}"
    schema: vlm
    output: ~/out/norm_stats/dataset_statistics.json
    expect: {{action: 7, proprio: 8}}
    expect_samples: 240
    expect_episodes: 12
  - id: norm-stats
    kind: dataset_stats
    path: "{lerobot}"
    schema: openpi
    split_file: "{lerobot}/split_info.json"
    output: ~/out/assets/norm_stats.json
    expect: {{actions: 5, state: 5}}
"""


@pytest.mark.slow
def test_up_over_a_box_then_noop(project: Project, box: Box) -> None:
    wp = samples.write_preset(box.home / "data" / "wp", "libero_wp", WP)["path"]
    lerobot = samples.write_lerobot(box.home / "data" / "lr", samples.LeRobotSample())
    project.host_vars = {"agent_python": sys.executable}
    project.playbook(PLAYBOOK.format(wp=wp, lerobot=lerobot))
    first = project.up("box1")
    assert first.returncode == 0, first.stdout + first.stderr
    steps = project.steps("box1")
    assert {s["status"] for s in steps.values()} == {"done"}, steps
    assert len(steps["norm-stats"]["warnings"]) == 2
    doc = json.loads((box.home / "out" / "norm_stats" / "dataset_statistics.json").read_text())
    assert (doc["num_transitions"], doc["num_trajectories"]) == (240, 12)

    second = project.up("box1")
    assert second.returncode == 0, second.stdout + second.stderr
    again = project.steps("box1")
    assert {k: s["attempts"] for k, s in again.items()} == {
        k: s["attempts"] for k, s in steps.items()
    }
    plan = project.cli("plan", "box1", "-p", "playbooks/test.yaml", "--json")
    assert plan.returncode == 0, plan.stderr
    reasons = {s["id"]: s for s in json.loads(plan.stdout)["steps"]}
    assert not reasons["stats-vlm"]["run"]
    assert "240 samples, 12 episodes" in reasons["stats-vlm"]["reason"]
