"""The done decision (provision/agent/checks.py, DESIGN.md "A step is done when..."), decided
against a temporary directory: no box, no runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from provision.agent import checks
from provision.model import Outcome, PlannedStep, StepRecord, StepStatus
from provision.steps.base import Check, Kind, StepContext


def _step(**fields: Any) -> PlannedStep:
    return PlannedStep(id="s", kind="shell", params={"run": "true"}, fingerprint="fp", **fields)


def _ctx(tmp_path: Path) -> StepContext:
    return StepContext(step_id="s", params={"run": "true"}, run_dir=tmp_path)


def _done(**fields: Any) -> StepRecord:
    """The record of a step that succeeded (with fingerprint `fp` unless told)."""
    fields = {"fingerprint": "fp", **fields}
    return StepRecord(status=StepStatus.DONE, outcome=Outcome.OK, gen=1, **fields)


def _decide(
    tmp_path: Path,
    step: PlannedStep,
    rec: StepRecord | None,
    gens: dict[str, int] | None = None,
    rerun: list[str] | None = None,
) -> tuple[bool, str]:
    decision = checks.decide(step, rec, gens or {}, _ctx(tmp_path), rerun)
    return decision.done, decision.reason


def test_a_step_without_checks_is_done_only_when_it_succeeded_before(tmp_path: Path) -> None:
    assert _decide(tmp_path, _step(), None) == (False, "never ran")
    assert _decide(tmp_path, _step(), _done()) == (True, "fingerprint matches (succeeded before)")
    pending = StepRecord(status=StepStatus.PENDING)
    assert _decide(tmp_path, _step(), pending) == (False, "never ran")


def test_changed_params_rerun(tmp_path: Path) -> None:
    changed = _done(fingerprint="other")
    assert _decide(tmp_path, _step(), changed) == (False, "params changed")


def test_a_requested_rerun_wins_over_everything(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    forced = _done(forced="only")
    assert _decide(tmp_path, _step(creates=str(tmp_path / "out")), forced) == (
        False,
        "rerun requested",
    )


def test_creates_decides_with_or_without_a_record(tmp_path: Path) -> None:
    out = tmp_path / "out"
    step = _step(creates=str(out))
    assert _decide(tmp_path, step, None) == (False, f"creates missing: {out}")
    assert _decide(tmp_path, step, _done()) == (False, f"creates missing: {out}")
    out.write_text("x")
    # A box set up by hand (no record): done, and `plan` says why.
    assert _decide(tmp_path, step, None) == (True, "already satisfied: creates exists")
    assert _decide(tmp_path, step, _done()) == (True, "fingerprint matches and creates exists")


def test_done_when_decides_by_its_exit_code(tmp_path: Path) -> None:
    marker = tmp_path / "ok"
    step = _step(done_when=f"test -f {marker}")
    assert _decide(tmp_path, step, _done()) == (False, "done_when failed (rc=1)")
    marker.write_text("")
    assert _decide(tmp_path, step, _done()) == (True, "fingerprint matches and done_when passed")
    both = _step(creates=str(marker), done_when="exit 0")
    assert _decide(tmp_path, both, None) == (
        True,
        "already satisfied: creates exists and done_when passed",
    )


@pytest.mark.parametrize(
    ("rec", "how"),
    [
        (StepRecord(status=StepStatus.FAILED, outcome=Outcome.FAILED, fingerprint="fp"), "failed"),
        (StepRecord(status=StepStatus.ERROR, outcome=Outcome.ERROR, fingerprint="fp"), "error"),
        # The runner (or the box) died under the attempt: the record still says running.
        (
            StepRecord(status=StepStatus.RUNNING, outcome=Outcome.RUNNING, fingerprint="fp"),
            "interrupted",
        ),
        (
            StepRecord(
                status=StepStatus.PENDING, outcome=Outcome.INTERRUPTED, fingerprint="fp", gen=1
            ),
            "interrupted",
        ),
        # A record of a version before `outcome`: read from its status.
        (StepRecord(status=StepStatus.FAILED, fingerprint="fp"), "failed"),
    ],
)
def test_an_unsuccessful_last_attempt_runs_again_whatever_the_checks_say(
    tmp_path: Path, rec: StepRecord, how: str
) -> None:
    out = tmp_path / "half-written"
    out.write_text("partial")
    assert _decide(tmp_path, _step(creates=str(out)), rec) == (False, f"last attempt {how}")


def test_an_upstream_that_ran_again_reruns_the_step(tmp_path: Path) -> None:
    step = _step(needs=["a", "b"])
    rec = _done(upstream={"a": 1, "b": 4})
    assert _decide(tmp_path, step, rec, {"a": 1, "b": 4}) == (
        True,
        "fingerprint matches (succeeded before)",
    )
    assert _decide(tmp_path, step, rec, {"a": 2, "b": 5}) == (False, "upstream ran again: a, b")
    # A need the record lacks was added after the step ran (a newer bootstrap's tool step).
    assert _decide(tmp_path, step, _done(upstream={"a": 1}), {"a": 1, "b": 9})[0]


def test_needs_that_run_in_this_session_rerun_the_step(tmp_path: Path) -> None:
    step = _step(needs=["a", "b"])
    assert _decide(tmp_path, step, _done(), rerun=["b", "a"]) == (
        False,
        "upstream ran again: a, b",
    )
    failed = StepRecord(status=StepStatus.FAILED, fingerprint="fp")
    assert _decide(tmp_path, step, failed, rerun=["a"]) == (False, "last attempt failed")
    assert _decide(tmp_path, step, None, rerun=["a"]) == (False, "never ran")


class _Probe(Kind):
    """A kind whose own check answers what the test says."""

    name = "probe"
    summary = "probe"

    def __init__(self, answer: Check | Exception) -> None:
        self.answer = answer

    def check(self, ctx: StepContext) -> Check:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (Check(True, "tool found"), (True, "already satisfied: tool found")),
        (Check(False, "tool missing"), (False, "tool missing")),
        (OSError("permission denied"), (False, "check error: OSError: permission denied")),
    ],
)
def test_the_kinds_own_check_decides_and_a_crash_means_not_done(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    answer: Check | Exception,
    expected: tuple[bool, str],
) -> None:
    monkeypatch.setattr(checks, "get_kind", lambda name: _Probe(answer))
    assert _decide(tmp_path, _step(), None) == expected
    assert checks.has_own_checks(_step(), _Probe(answer))
    assert not checks.has_own_checks(_step(), None)
