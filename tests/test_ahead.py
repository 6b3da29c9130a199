"""Cached steps fetched ahead while their needs run (provision/agent/ahead.py, and
`fetch_ahead`/`take_ahead` in provision/cache/restore.py).

The runner against a temporary run directory (tests/test_runner_local.py's fixtures), real
`agent exec` children, real rclone on a local remote (a directory) as the bucket, real zstd and
tar. A "second box" is a new run directory after the cached output was removed (a cached
step's outputs live at the same absolute path on every box).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from test_runner_local import agent_dir, agent_pyz  # noqa: F401 (fixtures)

from provision.agent.runner import Runner
from provision.agent.state import RunDir
from provision.cache import restore
from provision.inventory import Host, Inventory
from provision.model import StepStatus
from provision.playbook import load_playbook, resolve

# `prep` has no outputs: `convert`'s key holds its fingerprint, so it is final before prep ran
# (and `use` needs it too: it is not left out when convert is in the cache, see prune.py).
# `src` has outputs: `late`'s key holds their content, known only once src ran.
PLAYBOOK = """\
name: aheadtest
cache: {{remote: "{bucket}"}}
steps:
  - id: prep
    kind: shell
    run: |
      sleep 2 && echo prep >> {sh}/count-prep
      if [ -e {sh}/fail-prep ]; then  # fail once convert's copy is complete (however slow)
        for i in $(seq 300); do
          [ -e {sh}/.bootstrap-ahead-convert/.bootstrap-ahead.json ] && break; sleep 0.1
        done
        exit 1
      fi
  - id: convert
    kind: shell
    needs: [prep]
    run: |
      echo convert >> {sh}/count-convert
      mkdir -p {sh}/out && head -c 3000000 /dev/urandom > {sh}/out/model
    creates: "{sh}/out/model"
    outputs: ["{sh}/out"]
    cache: true
  - id: use
    kind: shell
    needs: [convert, prep]
    run: test -s {sh}/out/model && echo use >> {sh}/count-use
  - id: src
    kind: shell
    run: mkdir -p {sh}/src && echo v1 > {sh}/src/lock
    outputs: ["{sh}/src"]
  - id: late
    kind: shell
    needs: [src]
    run: mkdir -p {sh}/late && cp {sh}/src/lock {sh}/late/lock
    creates: "{sh}/late/lock"
    outputs: ["{sh}/late"]
    cache: true
"""


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


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _filled(tmp_path: Path) -> tuple[Path, str]:
    """Box 1 ran the playbook and saved convert; the next box lacks its output. (shared dir,
    the model's sha256)"""
    sh, bucket = tmp_path / "shared", tmp_path / "bucket"
    assert _box(tmp_path, "box1").execute()
    deadline = time.time() + 60
    while len(list(bucket.glob("entries/*.json"))) < 2:  # convert's and late's saves
        assert time.time() < deadline, "the cache saves never wrote their entries"
        time.sleep(0.2)
    model = _digest(sh / "out" / "model")
    shutil.rmtree(sh / "out")
    return sh, model


def _copies_left(sh: Path) -> list[str]:
    return sorted(p.name for p in sh.glob(".bootstrap-*"))


pytestmark = [
    pytest.mark.skipif(shutil.which("rclone") is None, reason="needs rclone"),
    pytest.mark.slow,  # runs of the real runner, agent and rclone: seconds each
]


def test_a_step_is_fetched_while_its_need_runs_and_only_placed_when_it_starts(
    agent_dir: Path,  # noqa: F811
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    sh, model = _filled(tmp_path)
    capfd.readouterr()  # box 1's
    second = _box(tmp_path, "box2")
    assert set(second.ahead.candidates) == {"convert", "late"}
    assert second.execute()
    st = second.state.steps
    reason = st["convert"].reason
    assert reason.startswith("restored from cache") and "fetched ahead" in reason, reason
    assert (_count(sh, "prep"), _count(sh, "convert"), _count(sh, "use")) == (2, 1, 2)
    assert _digest(sh / "out" / "model") == model
    err = capfd.readouterr().err
    assert "runner: convert: fetched ahead (key " in err, err
    # late's key waits for src's content: by then late is ready, and restores as before.
    assert "runner: late:" not in err, err
    assert "fetched ahead" not in st["late"].reason, st["late"].reason
    assert st["late"].reason.startswith("restored from cache"), st["late"].reason
    assert _copies_left(sh) == []


def test_a_corrupt_entry_is_not_fetched_ahead_and_the_step_runs(
    agent_dir: Path,  # noqa: F811
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    sh, _model = _filled(tmp_path)
    capfd.readouterr()  # box 1's
    bucket = tmp_path / "bucket"
    for obj in (p for p in (bucket / "objects").rglob("*") if p.is_file()):
        obj.write_bytes(obj.read_bytes()[:-100])
    second = _box(tmp_path, "box2")
    assert second.execute()
    err = capfd.readouterr().err
    assert "runner: convert: not fetched ahead (" in err and "corrupt or truncated" in err, err
    reason = second.state.steps["convert"].reason
    assert "cached copy unusable" in reason and "ran in" in reason, reason
    assert _count(sh, "convert") == 2
    assert _copies_left(sh) == []


def test_a_copy_fetched_for_a_step_that_never_starts_is_removed(
    agent_dir: Path,  # noqa: F811
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    sh, _model = _filled(tmp_path)
    capfd.readouterr()  # box 1's
    (sh / "fail-prep").touch()
    second = _box(tmp_path, "box2")
    assert not second.execute()
    st = second.state.steps
    assert st["prep"].status is StepStatus.FAILED
    assert st["convert"].status is StepStatus.BLOCKED
    assert "runner: convert: fetched ahead (key " in capfd.readouterr().err
    assert _copies_left(sh) == [] and not (sh / "out").exists()


def test_a_forced_step_is_not_fetched_ahead(
    agent_dir: Path,  # noqa: F811
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """`rerun` runs a step, never restores it: fetching it would be bytes for nothing."""
    sh, _model = _filled(tmp_path)
    capfd.readouterr()  # box 1's
    second = _box(tmp_path, "box2")
    second.state.record("convert").force(only=False)
    assert second.execute()
    assert "runner: convert:" not in capfd.readouterr().err
    assert second.state.steps["convert"].reason.startswith("ran in")
    assert _count(sh, "convert") == 2


def test_a_fetch_told_to_stop_gives_up_and_leaves_nothing(
    agent_dir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    sh, _model = _filled(tmp_path)
    box = _box(tmp_path, "box2")
    step = box.steps["convert"].to_json()
    stop = threading.Event()
    stop.set()
    said = restore.fetch_ahead(box.run.path, step, {"PATH": "/usr/bin:/bin"}, stop)
    assert said == "not fetched ahead (its runner is ending)", said
    assert _copies_left(sh) == []
    said = restore.fetch_ahead(box.run.path, step, {"PATH": "/usr/bin:/bin"}, threading.Event())
    assert said.startswith("fetched ahead (key "), said
    assert _copies_left(sh) == [".bootstrap-ahead-convert"]


def test_only_a_complete_copy_for_the_very_key_is_taken(tmp_path: Path) -> None:
    """The marker is written last; a copy without one, or for another key, is removed."""
    step = {"id": "convert", "outputs": [str(tmp_path / "out")]}
    staging = Path(restore.ahead_dir(step))
    assert staging == tmp_path / ".bootstrap-ahead-convert"
    entry = {"key": "k1", "paths": [str(tmp_path / "out")]}

    staging.mkdir()
    (staging / "half").write_text("a fetch that died")
    assert restore.take_ahead(step, "k1") is None and not staging.exists()

    staging.mkdir()
    (staging / restore.AHEAD_MARKER).write_text(json.dumps({"key": "k0", "entry": entry}))
    assert restore.take_ahead(step, "k1") is None and not staging.exists()

    staging.mkdir()
    (staging / restore.AHEAD_MARKER).write_text(json.dumps({"key": "k1", "entry": entry}))
    assert restore.take_ahead(step, "k1") == entry and staging.exists()


YIELD_PLAYBOOK = """\
name: aheadyield
cache: {{remote: "{bucket}"}}
steps:
  - id: venv
    kind: shell
    run: mkdir -p {sh}/venv
    outputs: ["{sh}/venv"]
    cache: true
  - id: lockfile
    kind: shell
    run: echo v1 > {sh}/lock
  - id: keyed-on-a-file
    kind: shell
    needs: [lockfile]
    run: mkdir -p {sh}/k
    outputs: ["{sh}/k"]
    cache: {{inputs: ["{sh}/lock"]}}
  - id: convert
    kind: shell
    needs: [venv]
    run: mkdir -p {sh}/out
    outputs: ["{sh}/out"]
    cache: true
"""


def test_a_fetch_ahead_waits_for_the_link_while_a_cached_step_upstream_receives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """convert's key is final at once (venv's key needs nothing); its fetch starts only once
    venv's restore says its bytes are all in. A step keyed on a file is never a candidate."""
    monkeypatch.setenv("BOOTSTRAP_AGENT_DIR", str(tmp_path / "agent"))
    sh = tmp_path / "shared"
    sh.mkdir()
    book = tmp_path / "book.yaml"
    book.write_text(YIELD_PLAYBOOK.format(sh=sh, bucket=tmp_path / "bucket"))
    plan = resolve(load_playbook(book), Inventory(), Host(name="local", connection="local"))
    run = RunDir("yield")
    run.make()
    runner = Runner(run, plan=plan, secrets={})
    assert runner.ahead.candidates == ["venv", "convert"]
    fetched: list[str] = []
    monkeypatch.setattr(runner.ahead, "_start", fetched.append)
    runner.mark_done("tool-rclone", "rclone is there")  # bootstrap's own step, needed by all

    def consider() -> list[str]:
        runner.ahead.consider(lambda sid: sid == "venv")
        return fetched

    assert consider() == [], "venv is about to start: its restore comes first"
    runner.state.record("venv").begin_attempt(1, "never ran", time.time())
    progress = run.step_dir("venv") / "_progress.json"
    run.step_dir("venv").mkdir(parents=True, exist_ok=True)
    assert consider() == [], "venv has not said anything yet: its restore is about to begin"
    progress.write_text(json.dumps({"message": restore.RECEIVING, "done": 5, "total": 9}))
    assert consider() == []
    progress.write_text(json.dumps({"message": restore.RECEIVING, "done": 9, "total": 9}))
    assert consider() == ["convert"]
