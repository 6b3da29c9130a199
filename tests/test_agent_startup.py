"""What an agent process imports before it knows its command: a no-op `up` starts one on the
box for every command, so what only some commands need (downloading a wheel, a launched job's
guard) is imported where it is used (issue 16: a cold no-op in one handshake)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from provision.agent import __main__ as agent_main
from provision.agent.state import RunDir
from provision.model import Plan, PlannedStep
from provision.watch import guard
from provision.watch.record import CONFIG_FILE

ROOT = Path(__file__).resolve().parent.parent
#: Modules a no-op `up` never needs: the wheel download (urllib.request pulls in http.client,
#: email and ssl; box_tool, whose check every tool step runs, uses it only to install), the
#: guard (checkpoints, the monitor's log parsing), the GPU leases (`status`), the median of an
#: ETA (statistics: fractions, decimal, random) and platform (the cache key reads os.uname).
ONLY_SOME_COMMANDS = (
    "urllib.request",
    "http.client",
    "ssl",
    "provision.watch.guard",
    "provision.agent.gpus",
    "statistics",
    "platform",
)


def test_agent_command_line_imports_nothing_only_some_commands_need() -> None:
    code = (
        "import json, sys\n"
        "import provision.agent.__main__, provision.steps.box_tool, provision.cache.key\n"
        f"print(json.dumps(sorted(m for m in {list(ONLY_SOME_COMMANDS)!r} if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) == []


@pytest.mark.parametrize("has_guard", [True, False])
def test_up_revives_guards_only_where_a_step_had_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, has_guard: bool
) -> None:
    calls: list[Path] = []

    def revive_all(run_dir: Path, env_of: Any) -> list[int]:
        calls.append(run_dir)
        return []

    monkeypatch.setattr(guard, "revive_all", revive_all)
    run = RunDir("r", root=tmp_path)
    (run.path / "steps" / "train").mkdir(parents=True)
    if has_guard:
        (run.path / "steps" / "train" / CONFIG_FILE).write_text("{}")
    plan = Plan(name="r", steps=[PlannedStep(id="train", kind="tmux_launch")])
    agent_main._revive_guards(run, plan, {})
    assert calls == ([run.path] if has_guard else [])
