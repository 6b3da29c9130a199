"""The guard's findings as `status` and `monitor` print them (console.print_watch), from the
`watch.json` documents the real watcher writes over the waypoint trainer's log."""

from __future__ import annotations

import io
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from gpu_fake import use_fake_gpus, waypoint_log
from rich.console import Console

from provision import console
from provision.watch import watcher as watcher_module
from provision.watch.spec import WatchSpec
from provision.watch.watcher import Watcher


def _render(watch: dict[str, Any] | None, now: float | None = None) -> str:
    out = console.Out()
    buffer = io.StringIO()
    out.console = Console(file=buffer, highlight=False, soft_wrap=True, width=200)
    console.print_watch(out, "train-ae", watch, now)
    return buffer.getvalue()


def _watcher(tmp_path: Path, text: str) -> tuple[Watcher, Path]:
    log = tmp_path / "train.log"
    log.write_text(text)
    (tmp_path / "step").mkdir()
    spec = WatchSpec(stall_factor=3, stall_min_s=1)
    return Watcher(tmp_path / "step", str(log), "l1", "train-ae", spec), log


FAILING = {
    "remote": "gg1:runs/ae",
    "verified": ["50", "100"],
    "pending": ["150"],
    "failing": {"since": 0, "error": "ERROR : 150: 403 Forbidden", "attempts": 3},
    "last_upload": None,
    "uploading": None,
}


@pytest.mark.slow
def test_training_with_a_remote_refusing_checkpoints_is_loud(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_fake_gpus(monkeypatch, "training")
    watcher, _log = _watcher(tmp_path, waypoint_log("AE", range(0, 201, 50)))
    doc = watcher.observe(None, False, FAILING)
    text = _render(doc, doc["updated"] + 600)  # ten minutes later
    lines = text.splitlines()
    assert lines[0].startswith("  train-ae: training · step 200/10000 · ")
    assert "steps/s" in lines[0] and "loss " in lines[0]
    loud = [ln for ln in lines if ln.startswith("    !!! ")]
    assert len(loud) == 1
    assert "checkpoints are not leaving the box (3 failed passes; pending: 150): " in loud[0]
    assert "403 Forbidden" in loud[0] and "(for 10m00s)" in loud[0]
    assert lines[-1] == "    checkpoints -> gg1:runs/ae: 2 verified (newest 100) · pending 150"


@pytest.mark.slow
def test_a_crash_shows_its_status_diagnosis_and_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_fake_gpus(monkeypatch, "healthy")
    oom = "[rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 15.68 GiB.\n"
    watcher, _log = _watcher(tmp_path, waypoint_log("VLM", range(0, 51, 50), total=30000) + oom)
    doc = watcher.observe(137, True, {})
    text = _render(doc)
    assert text.splitlines()[0].startswith("  train-ae: crashed · step 50/30000")
    crash = next(ln for ln in text.splitlines() if ln.startswith("    ✗ "))
    assert crash.startswith("    ✗ the job exited with status 137: ")
    assert "out of memory" in crash.lower()
    assert any(ln.startswith("      fix: ") for ln in text.splitlines()), text
    assert "checkpoints ->" not in text  # no remote: no checkpoint line


@pytest.mark.slow
def test_stalled_then_finished_and_on_finish(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_fake_gpus(monkeypatch, "training")
    clock = [time.time()]  # the watcher's clock: a look may take a second on a busy machine
    monkeypatch.setattr(watcher_module, "time", SimpleNamespace(time=lambda: clock[0]))
    watcher, log = _watcher(tmp_path, waypoint_log("AE", range(0, 101, 50), total=200))
    watcher.observe(None, False, {})
    clock[0] += 0.05
    log.write_text(waypoint_log("AE", range(0, 151, 50), total=200))
    watcher.observe(None, False, {})
    clock[0] += 1.2  # no new step for > stall_min_s and > 3x the usual gap
    doc = watcher.observe(None, False, {})
    stalled = [ln for ln in _render(doc).splitlines() if "stalled: no new step" in ln]
    assert len(stalled) == 1 and stalled[0].startswith("    ! stalled: no new step for ")
    assert "(last step 150; steps came every" in stalled[0]
    log.write_text(waypoint_log("AE", range(0, 200, 50), total=200) + waypoint_log(
        "AE", [199], total=200))  # fmt: skip
    doc = watcher.observe(0, True, {})
    doc["on_finish"] = {"outcome": "finished", "action": "run", "rc": 0, "at": clock[0]}
    text = _render(doc, clock[0])
    assert text.splitlines()[0].startswith("  train-ae: finished · step 199/200")
    assert "    the job finished with status 0 (last step 199/200)" in text
    assert "    on_finish run after the run finished: rc 0" in text
    assert "stalled" not in text  # a condition that cleared is not shown


def test_a_guard_that_stopped_looking_is_said_and_nothing_without_a_guard() -> None:
    now = time.time()
    doc = {"updated": now - 900, "state": "training", "progress": {"step": 7}, "findings": []}
    text = _render(doc, now)
    assert "the guard has not looked for 15m00s (dead? the next `up` starts it again)" in text
    assert "has not looked" not in _render({**doc, "state": "finished"}, now)
    assert _render(None) == ""


def test_on_finish_destroy_says_whether_the_box_may_go() -> None:
    """The controller destroys a rented box only once its guard says its work is safe."""
    base = {"state": "finished", "last_step": 30, "total": 30}
    kept = {"action": "destroy", "outcome": "finished", "stopped": True, "ready": False}
    kept["why_not"] = "checkpoint 30 not verified on the remote yet"
    text = _render({**base, "on_finish": kept})
    assert "on_finish destroy after the run finished: stopped True: kept (checkpoint 30 " in text
    ready = dict(kept, ready=True, why_not=None)
    assert "stopped True: may be destroyed" in _render({**base, "on_finish": ready})
