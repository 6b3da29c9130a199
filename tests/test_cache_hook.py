"""When the runner starts a cache save (CacheHook in provision/agent/runner.py): only once every
step cached `with` the step has been done in this run, after it ran. No ssh, no root."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from provision.agent.runner import CacheHook
from provision.model import StepStatus


class _Runner:
    """The little of a Runner that CacheHook reads: its steps, their statuses, the run dir."""

    def __init__(self, tmp_path: Path) -> None:
        self.steps = {
            "build": SimpleNamespace(cache={"with": ["finish"]}),
            "finish": SimpleNamespace(cache=None),
        }
        self.statuses = {"build": StepStatus.DONE, "finish": StepStatus.DONE}
        self.run = SimpleNamespace(step_dir=lambda sid: tmp_path / sid)
        for sid in self.steps:
            (tmp_path / sid).mkdir()

    def status(self, step_id: str) -> StepStatus:
        return self.statuses[step_id]


@pytest.fixture
def hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[CacheHook, list[Any]]:
    spawned: list[Any] = []
    cache = CacheHook(_Runner(tmp_path))  # type: ignore[arg-type]
    monkeypatch.setattr(cache, "spawn", lambda *args: spawned.append(args))
    return cache, spawned


def test_a_member_done_from_an_earlier_run_does_not_start_the_save(
    hook: tuple[CacheHook, list[Any]],
) -> None:
    cache, spawned = hook
    # `finish` reads DONE (an earlier run's record) while `build` has just run again: `finish`
    # is yet to be checked, and may run and write into build's outputs.
    cache.step_done("build", {"key": "k1", "replace": True})
    assert spawned == []
    cache.step_done("finish", None)
    assert spawned == [("build", "k1", True)]


def test_a_save_waits_for_a_member_that_is_not_done(hook: tuple[CacheHook, list[Any]]) -> None:
    cache, spawned = hook
    cache.runner.statuses["finish"] = StepStatus.FAILED  # type: ignore[attr-defined]
    cache.step_done("build", {"key": "k2"})
    cache.step_done("finish", None)
    assert spawned == [], "the unit is not done: nothing is saved"


def test_a_restored_step_is_not_saved(hook: tuple[CacheHook, list[Any]]) -> None:
    cache, spawned = hook
    cache.step_done("build", {"key": "k3", "restored": True})
    cache.step_done("finish", None)
    assert spawned == [] and cache.restored_for("finish") == {"build"}


def test_a_save_left_pending_by_a_killed_runner_waits_for_this_run_s_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = _Runner(tmp_path)
    (tmp_path / "build" / CacheHook.PENDING).write_text('{"key": "k4", "replace": false}')
    spawned: list[Any] = []
    cache = CacheHook(runner)  # type: ignore[arg-type]
    monkeypatch.setattr(cache, "spawn", lambda *args: spawned.append(args))
    cache.step_done("build", None)  # found done in the new run: its save is still owed
    assert spawned == [], "finish, DONE from before the kill, has not been decided again"
    cache.step_done("finish", None)
    assert spawned == [("build", "k4", False)]
