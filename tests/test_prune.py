"""Steps left out because what needs them comes from the step cache (provision/agent/prune.py).

The runner against a temporary run directory (tests/test_runner_local.py's fixtures), real
`agent exec` children, real rclone on a local remote (a directory) as the bucket. No ssh, no
root. A "second box" is a new run directory after the cached outputs and the checkpoint were
removed (a cached step's outputs live at the same absolute path on every box).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_runner_local import agent_dir, agent_pyz  # noqa: F401 (fixtures)

from provision.agent import prune
from provision.agent.runner import Runner
from provision.agent.state import RunDir
from provision.inventory import Host, Inventory
from provision.model import StepStatus
from provision.playbook import load_playbook, resolve

PLAYBOOK = """\
name: prunetest
cache: {{remote: "{bucket}"}}
steps:
  - id: src
    kind: shell
    run: sleep 1 && mkdir -p {sh}/src && echo v1 > {sh}/src/lock && echo src >> {sh}/count-src
    done_when: test -s {sh}/src/lock
    outputs: ["{sh}/src"]
  - id: ckpt
    kind: shell
    run: echo ckpt >> {sh}/count-ckpt && mkdir -p {sh}/ckpt && echo weights > {sh}/ckpt/w
    creates: "{sh}/ckpt/w"
  - id: convert
    kind: shell
    needs: [ckpt, src]
    run: |
      echo convert >> {sh}/count-convert
      mkdir -p {sh}/out && cat {sh}/ckpt/w {sh}/src/lock > {sh}/out/model
    creates: "{sh}/out/model"
    outputs: ["{sh}/out"]
    cache: true
  - id: use
    kind: shell
    needs: [convert]
    run: grep -q weights {sh}/out/model && echo use >> {sh}/count-use
"""

pytestmark = [
    pytest.mark.skipif(shutil.which("rclone") is None, reason="needs rclone"),
    pytest.mark.slow,  # runs of the real runner, agent and rclone: seconds each
]


def _count(sh: Path, name: str) -> int:
    path = sh / f"count-{name}"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _box(tmp_path: Path, run_name: str) -> Runner:
    """A runner of the playbook in a run of its own (a fresh box's state)."""
    sh = tmp_path / "shared"
    sh.mkdir(exist_ok=True)
    book_path = tmp_path / "book.yaml"
    book_path.write_text(PLAYBOOK.format(sh=sh, bucket=tmp_path / "bucket"))
    plan = resolve(load_playbook(book_path), Inventory(), Host(name="local", connection="local"))
    plan.name = run_name
    run = RunDir(run_name)
    run.make()
    run.plan.write_text(json.dumps(plan.to_json()))
    return Runner(run, plan=plan, secrets={})


def _saved(bucket: Path) -> None:
    """Wait for the detached save of box 1 to write its entry."""
    deadline = time.time() + 60
    while not list(bucket.glob("entries/*.json")):
        assert time.time() < deadline, "the cache save never wrote its entry"
        time.sleep(0.2)


def _new_box(sh: Path) -> None:
    """What a fresh box lacks: the checkpoint and the cached outputs (src stays: its content
    is part of the key, and it is the same on every box)."""
    shutil.rmtree(sh / "ckpt", ignore_errors=True)
    shutil.rmtree(sh / "out", ignore_errors=True)


def _cache_filled(tmp_path: Path) -> tuple[Path, Path]:
    """Box 1 ran the playbook and saved convert; the next box has neither its outputs nor the
    checkpoint. (shared dir, bucket)"""
    sh, bucket = tmp_path / "shared", tmp_path / "bucket"
    assert _box(tmp_path, "box1").execute()
    _saved(bucket)
    _new_box(sh)
    return sh, bucket


def test_a_warm_box_leaves_out_what_only_a_restored_step_needs(
    agent_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    sh, bucket = tmp_path / "shared", tmp_path / "bucket"
    first = _box(tmp_path, "box1")
    assert first.prune.candidates == {"ckpt"}  # src has outputs, use is needed by no cache
    assert first.execute()
    st = first.state.steps
    assert "cache miss" in st["convert"].reason, st["convert"].reason
    assert (_count(sh, "ckpt"), _count(sh, "convert"), _count(sh, "use")) == (1, 1, 1)
    _saved(bucket)

    _new_box(sh)
    second = _box(tmp_path, "box2")
    assert second.execute()
    st = second.state.steps
    assert st["ckpt"].status is StepStatus.SKIPPED
    assert st["ckpt"].reason == "not needed: convert in the step cache", st["ckpt"].reason
    assert st["convert"].reason.startswith("restored from cache"), st["convert"].reason
    assert not (sh / "ckpt").exists(), "the checkpoint was downloaded for nothing"
    assert (_count(sh, "ckpt"), _count(sh, "convert"), _count(sh, "use")) == (1, 1, 2)

    # The same box again: convert is done, so the checkpoint is still not needed; nothing runs.
    again = _box(tmp_path, "box2")
    assert again.execute()
    assert again.state.steps["ckpt"].reason == "not needed: convert done"
    assert (_count(sh, "ckpt"), _count(sh, "convert"), _count(sh, "use")) == (1, 1, 2)


def test_a_restore_that_fails_after_its_need_was_left_out_runs_that_need_first(
    agent_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    sh, bucket = _cache_filled(tmp_path)
    # The archive is truncated after its entry was written: the lookup finds the entry (the
    # checkpoint is left out), the restore finds the archive corrupt.
    (obj,) = [p for p in (bucket / "objects").rglob("*") if p.is_file()]
    obj.write_bytes(obj.read_bytes()[:-100])
    second = _box(tmp_path, "box2")
    assert second.execute()
    st = second.state.steps
    assert st["ckpt"].status is StepStatus.DONE and st["convert"].status is StepStatus.DONE
    assert (_count(sh, "ckpt"), _count(sh, "convert"), _count(sh, "use")) == (2, 2, 2)
    log = second.run.log("convert").read_text()
    assert "ckpt must run first (left out for the cache)" in log, log
    assert "corrupt or truncated" in st["convert"].reason or "ran in" in st["convert"].reason


def test_a_step_waits_for_its_dependents_keys_at_most_the_hold(
    agent_dir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The checkpoint is ready at once, but convert's key needs src's content (1 s away): with
    a hold shorter than that, the checkpoint runs without waiting for the lookup."""
    monkeypatch.setattr(prune, "HOLD_S", 0.2)
    sh = tmp_path / "shared"
    runner = _box(tmp_path, "box1")
    assert runner.execute()
    ckpt, src = runner.state.steps["ckpt"], runner.state.steps["src"]
    assert ckpt.started is not None and src.ended is not None
    assert ckpt.started < src.ended, "the checkpoint waited for src past its hold"
    assert _count(sh, "ckpt") == 1


def test_a_rerun_of_the_dependent_runs_what_it_needs(
    agent_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A forced dependent runs (never restores), so what it needs cannot be left out."""
    sh, _bucket = _cache_filled(tmp_path)
    runner = _box(tmp_path, "box2")
    runner.state.record("convert").force(only=False)
    assert runner.execute()
    assert runner.state.steps["ckpt"].status is StepStatus.DONE
    assert (_count(sh, "ckpt"), _count(sh, "convert")) == (2, 2)


def test_plan_says_which_step_may_be_left_out(
    agent_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """`plan` cannot know yet (the lookup waits for the keys), so it says what decides."""
    runner = _box(tmp_path, "box1")
    payload = json.dumps({"plan": runner.plan.to_json(), "secrets": {}}).encode()
    done = subprocess.run(
        [sys.executable, str(agent_dir / "agent.pyz"), "plan"],
        input=payload, capture_output=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    reasons = {s["id"]: s["reason"] for s in json.loads(done.stdout.splitlines()[-1])["steps"]}
    assert reasons["ckpt"].endswith(
        "; left out if convert can be restored from the step cache then"
    ), reasons["ckpt"]
    assert "left out" not in reasons["src"] + reasons["use"]
