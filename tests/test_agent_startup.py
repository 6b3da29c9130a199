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
from provision.agent import blobs
from provision.agent.paths import ROOT_ENV
from provision.agent.state import RunDir
from provision.model import Plan, PlannedStep
from provision.watch import guard
from provision.watch.record import CONFIG_FILE

ROOT = Path(__file__).resolve().parent.parent
#: Modules a no-op `up` never needs: the wheel download (urllib.request pulls in http.client,
#: email and ssl; box_tool, whose check every tool step runs, uses it only to install), the
#: guard (checkpoints, the monitor's log parsing), the GPU leases (`status`), the median of an
#: ETA (statistics: fractions, decimal, random), platform (the cache key reads os.uname),
#: socket (the host's name is os.uname's too), traceback (a crash's), difflib (a bad key's
#: hint), pkgutil (listing the kinds), base64 (a secret's forms) and hashlib (a blob's, a
#: cached step's key).
ONLY_SOME_COMMANDS = (
    "urllib.request",
    "http.client",
    "ssl",
    "provision.watch.guard",
    "provision.agent.gpus",
    "statistics",
    "platform",
    "socket",
    "traceback",
    "difflib",
    "pkgutil",
    "base64",
)
#: What a whole no-op `up` never imports, at any point of its life: the above, and what the
#: standard library pulls in at run time (argparse's help width asks shutil, which loads bz2
#: and lzma; a stream's follow loop once took a snapshot more).
NEVER_IN_A_NOOP = (*ONLY_SOME_COMMANDS, "hashlib", "shutil", "bz2", "lzma")


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


#: Runs the agent's `up` as the box does (`python3 -S`), then prints the modules it loaded.
_NOOP_UP = (
    "import json, sys\n"
    "from provision.agent.__main__ import main\n"
    "rc = main(['up'])\n"
    "sys.stderr.write(json.dumps({'rc': rc, 'modules': sorted(sys.modules)}) + '\\n')\n"
)


def _agent_up(tmp_path: Path, plan: Plan) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One `agent up` process: its events, and its exit code with the modules it loaded."""
    done = subprocess.run(
        [sys.executable, "-S", "-c", _NOOP_UP],
        cwd=ROOT,
        input=blobs.encode({"plan": plan.to_json()}, {}),
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", ROOT_ENV: str(tmp_path / "agent")},
        capture_output=True,
        check=True,
    )
    events = [json.loads(line) for line in done.stdout.decode().splitlines()]
    return events, json.loads(done.stderr.decode().splitlines()[-1])


def test_a_noop_up_loads_only_what_it_uses_and_answers_once(tmp_path: Path) -> None:
    made = tmp_path / "made"
    made.write_text("x")
    note = tmp_path / "note.txt"
    note.write_text("hello\n")
    plan = Plan(
        name="r",
        steps=[
            PlannedStep(id="made", kind="shell", params={"run": "false"}, creates=str(made)),
            PlannedStep(
                id="note", kind="template", params={"content": "hello\n", "dest": str(note)}
            ),
        ],
    )
    events, end = _agent_up(tmp_path, plan)
    assert end["rc"] == 0
    assert [e["event"] for e in events] == ["final"]
    assert {s["id"]: s["status"] for s in events[0]["steps"]} == {
        "made": "done",
        "note": "done",
    }
    assert sorted(m for m in NEVER_IN_A_NOOP if m in end["modules"]) == []
