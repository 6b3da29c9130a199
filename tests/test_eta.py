"""The ETA of a run (provision/eta.py), its bars and line in `up`'s view, and the durations it
learns from: the box's state (`durations`) and the controller's history (provision/timings.py).
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from boxes import Box
from project import Project
from rich.console import Console

from provision import console, eta, timings
from provision.agent import state as agent_state
from provision.model import Snapshot, StepSnapshot, StepStatus

#: Seed 003's environment track beside its checkpoint track, then the training's step-0 wait.
NEEDS = {
    "clone": [],
    "uv-sync": ["clone"],
    "patch": ["uv-sync"],
    "ckpt": [],
    "convert": ["patch", "ckpt"],
    "train": ["convert"],
    "wait-step0": ["train"],
}


def _timings(**over: eta.StepTiming) -> dict[str, eta.StepTiming]:
    base = {
        "clone": eta.StepTiming("pending", expected=10),
        "uv-sync": eta.StepTiming("pending", expected=120),
        "patch": eta.StepTiming("pending", expected=5),
        "ckpt": eta.StepTiming("pending", expected=200),
        "convert": eta.StepTiming("pending", expected=90),
        "train": eta.StepTiming("pending", expected=1),
        "wait-step0": eta.StepTiming("pending", expected=60),
    }
    return {**base, **over}


def test_eta_is_the_longest_chain_not_the_sum() -> None:
    result = eta.eta(NEEDS, _timings(), ["wait-step0"])
    assert result is not None
    # ckpt (200) beats clone + uv-sync + patch (135): 200 + 90 + 1 + 60.
    assert result.seconds == pytest.approx(351)
    assert result.path == ["ckpt", "convert", "train", "wait-step0"]
    assert result.target == "wait-step0" and result.untimed == []


def test_running_download_counts_its_bytes_left_at_its_rate() -> None:
    # 3 GB of 12 left at 100 MB/s: 30 s left, whatever the history says (200 s).
    ckpt = eta.StepTiming(
        "running", elapsed=90, expected=200,
        progress={"done": 9e9, "total": 12e9, "unit": "B", "speed": 1e8},
    )  # fmt: skip
    done = eta.StepTiming("done", expected=10)
    result = eta.eta(
        NEEDS, _timings(ckpt=ckpt, clone=done, **{"uv-sync": eta.StepTiming("running", 100, 120)})
    )
    assert result is not None
    # uv-sync has 20 s left + patch 5 = 25 s, so the checkpoint (30 s left) still leads.
    assert result.seconds == pytest.approx(30 + 90 + 1 + 60)
    assert result.path[0] == "ckpt"


def test_running_step_without_progress_uses_its_history_and_never_reaches_zero() -> None:
    assert eta.remaining(eta.StepTiming("running", elapsed=30, expected=120)) == 90
    assert eta.remaining(eta.StepTiming("running", elapsed=500, expected=120)) == eta.OVERRUN_S
    assert eta.remaining(eta.StepTiming("running", elapsed=5)) is None
    # Files only: extrapolated from the rate so far.
    files = {"files_done": 3, "files_total": 12}
    assert eta.remaining(eta.StepTiming("running", elapsed=6, progress=files)) == 18
    # Bytes without a rate: likewise.
    by_bytes = {"done": 25, "total": 100}
    assert eta.remaining(eta.StepTiming("running", elapsed=10, progress=by_bytes)) == 30


def test_untimed_steps_are_named_and_done_or_failed_runs_have_no_eta() -> None:
    result = eta.eta(NEEDS, _timings(patch=eta.StepTiming("pending")), ["wait-step0"])
    assert result is not None and result.untimed == ["patch"]
    text = eta.line(result, step0=True)
    assert text is not None and text.endswith("; 1 step never timed")
    failed = _timings(patch=eta.StepTiming("failed", expected=5))
    assert eta.eta(NEEDS, failed, ["wait-step0"]) is None
    finished = {k: eta.StepTiming("done") for k in NEEDS}
    assert eta.eta(NEEDS, finished, ["wait-step0"]) is None


def test_a_target_taking_no_time_still_ends_the_path() -> None:
    steps = {"a": eta.StepTiming("pending", expected=5), "w": eta.StepTiming("pending", expected=0)}
    result = eta.eta({"a": [], "w": ["a"]}, steps, ["w"])
    assert result is not None and result.target == "w" and result.path == ["a", "w"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(4, "~4s"), (59.6, "~1m00s"), (250, "~4m10s"), (3900, "~1h05m")],
)
def test_human(seconds: float, text: str) -> None:
    assert eta.human(seconds) == text


def test_expected_is_the_median_and_history_keeps_the_newest() -> None:
    assert eta.expected([10, 500, 12]) == 12
    assert eta.expected([]) is None
    history: list[float] = []
    for d in range(8):
        history = eta.remember(history, d)
    assert history == [3, 4, 5, 6, 7]


def _snap(**steps: dict[str, Any]) -> Snapshot:
    rows = []
    for sid, extra in steps.items():
        rows.append({"id": sid, "kind": "shell", "needs": [], "status": "pending", **extra})
    return Snapshot.from_json(
        {"host": "b1", "run": "seed", "box": "b1", "runner": "running", "steps": rows}
    )


def _plain_view() -> tuple[console.RunView, io.StringIO]:
    out = console.Out()
    buffer = io.StringIO()
    out.console = Console(file=buffer, highlight=False, soft_wrap=True, width=200)
    return console.RunView(out, live=False), buffer


def test_non_tty_prints_one_line_per_change_with_the_eta_on_changes_only() -> None:
    view, buffer = _plain_view()
    clone = {"expected_s": 10, "expected_from": "measured"}
    wait = {"kind": "wait_log", "needs": ["clone"], "expected_s": 60}
    with view:
        view.update("b1", _snap(clone=dict(clone, status="running", duration_s=0), wait=wait))
        for second in range(1, 4):  # progress ticks: no status changed, nothing printed
            view.update(
                "b1", _snap(clone=dict(clone, status="running", duration_s=second), wait=wait)
            )
        view.update("b1", _snap(clone=dict(clone, status="done", duration_s=9.5), wait=wait))
        view.update(
            "b1",
            _snap(clone=dict(clone, status="done", duration_s=9.5), wait=dict(wait, status="done")),
        )
    lines = buffer.getvalue().splitlines()
    assert lines == [
        "[b1] clone: running (0.0s)",
        "[b1] step 0 expected in ~1m10s (clone -> wait)",
        "[b1] clone: done (9.5s)",
        "[b1] step 0 expected in ~1m00s (wait)",
        "[b1] wait: done",
    ]


def test_live_table_draws_a_bar_with_bytes_rate_and_time_left() -> None:
    view, buffer = _plain_view()
    progress = {"done": 3 * 2**30, "total": 12 * 2**30, "unit": "B", "speed": 100 * 2**20}
    snap = _snap(ckpt={"status": "running", "duration_s": 30, "progress": progress})
    view.out.console.print(console.status_table(snap, lambda s: s))
    text = buffer.getvalue()
    assert "3.0GiB/12.0GiB" in text and "100.0MiB/s" in text and "~1m32s left · 3.0GiB" in text
    assert "━" in text  # rich's bar


def test_controller_history_fills_in_where_the_box_measured_nothing() -> None:
    snap = _snap(
        a={"status": "pending", "expected_s": 7, "expected_from": "estimate"},
        b={"status": "pending", "expected_s": 3, "expected_from": "measured"},
    )
    assert console.eta_line(snap) == "run end expected in ~7s (a)"
    # What another box measured beats the playbook's guess, not the box's own measure.
    assert console.eta_line(snap, {"a": 1, "b": 50}) == "run end expected in ~3s (b)"


def test_timings_record_each_finished_run_once(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("BOOTSTRAP_CONFIG_DIR", str(tmp_path))
    step = StepSnapshot(
        id="sync", kind="shell", status=StepStatus.DONE, ended=1000.0, duration_s=40.0
    )
    timings.record("seed/003", [step])
    timings.record("seed/003", [step])  # the same run seen again (a no-op up)
    timings.record("seed/003", [replace(step, ended=2000.0, duration_s=60.0)])
    failed = StepSnapshot(id="x", kind="shell", status=StepStatus.FAILED, ended=1, duration_s=9)
    timings.record("seed/003", [failed])
    assert timings.load("seed/003") == {"sync": [[1000.0, 40.0], [2000.0, 60.0]]}
    assert timings.expected("seed/003") == {"sync": 50.0}
    next(tmp_path.glob("durations/*.json")).write_text("{not json")
    assert timings.expected("seed/003") == {}


def test_a_damaged_duration_history_is_dropped_and_announced(tmp_path: Path) -> None:
    run = agent_state.RunDir("r", root=tmp_path)
    run.make()
    run.state.write_text(json.dumps({"runner": {"status": "idle"}, "steps": {}, "durations": [1]}))
    loaded = agent_state.load_state(run)
    assert loaded.durations == {} and loaded.damage and "durations" in loaded.damage
    loaded.remember_duration("a", 2.0)
    loaded.remember_duration("a", 4.0)
    assert loaded.expected_duration("a") == 3.0


SLEEPY = """
name: timed
steps:
  - id: nap
    kind: shell
    run: sleep 0.3
  - id: quick
    kind: shell
    needs: [nap]
    run: "true"
"""


def test_box_keeps_step_durations_across_runs_and_graph_uses_them(
    project: Project, box: Box
) -> None:
    project.playbook(SLEEPY)
    assert project.up("box1").returncode == 0
    first = project.steps("box1")
    assert first["nap"]["expected_s"] == pytest.approx(first["nap"]["duration_s"])
    assert first["nap"]["expected_from"] == "measured"
    assert first["quick"]["needs"] == ["nap"]
    # Run it again for real: the box keeps both runs.
    assert project.cli("rerun", "box1", "nap", "-p", "playbooks/test.yaml").returncode == 0
    state = json.loads(next(box.home.glob(".bootstrap/runs/timed/state.json")).read_text())
    assert len(state["durations"]["nap"]) == 2 and 0.3 <= min(state["durations"]["nap"]) < 5
    graph = project.cli("graph", "-p", "playbooks/test.yaml")
    assert graph.returncode == 0, graph.stderr
    assert "critical path (" in graph.stdout and "nap -> quick" in graph.stdout
