"""`done_when` commands: their exit code decides, and one that hangs is cut off as rc 124."""

from __future__ import annotations

from pathlib import Path

import pytest

from provision.agent import checks
from provision.steps.base import StepContext, validate_params
from provision.steps.shell import KIND


def _ctx(tmp_path: Path) -> StepContext:
    return StepContext(step_id="x", params=validate_params(KIND, {"run": "true"}), run_dir=tmp_path)


def test_exit_code_is_returned(tmp_path: Path) -> None:
    assert checks.run_done_when("true", _ctx(tmp_path)) == 0
    assert checks.run_done_when("exit 3", _ctx(tmp_path)) == 3


@pytest.mark.slow
def test_a_hanging_command_is_killed_as_not_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checks, "DONE_WHEN_TIMEOUT_S", 0.3)
    # `sleep 30` would exit 0 if it were waited for; 124 says it was killed at the timeout.
    assert checks.run_done_when("sleep 30", _ctx(tmp_path)) == 124
