"""`monitor` watches the log the tmux_launch kind really writes: the box reads it from the
launch record (not the controller re-deriving a path). The job is launched by the real kind
in a real tmux server, then `controller.monitor` asks this machine (`connection: local`)
through the prelude and the agent zipapp, as for any box.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from project import wait_for

from provision import controller
from provision.inventory import Host
from provision.model import PlannedStep
from provision.steps.base import StepContext, validate_params
from provision.steps.tmux_launch import KIND, launch_facts

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "provision" / "data" / "fake_trainer.py"


@pytest.fixture
def agent_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "agent"
    monkeypatch.setenv("BOOTSTRAP_AGENT_DIR", str(path))
    monkeypatch.setenv("BOOTSTRAP_CONFIG_DIR", str(tmp_path / "controller"))
    return path


def _step(job: Path, socket: str, **more: str) -> PlannedStep:
    (job / "configs").mkdir(parents=True, exist_ok=True)
    (job / "configs" / "ae.yaml").write_text("mode: ae\n")
    command = f"python3 {TRAINER} --mode ae --config configs/ae.yaml --startup-sleep 0 "
    command += "--steps 100000 --step-sleep 0.05 --wandb offline"
    raw = {"session": "train-ae", "socket": socket, "cwd": str(job), "command": command, **more}
    return PlannedStep(id="train", kind="tmux_launch", params=validate_params(KIND, raw))


def _launch(agent_dir: Path, step: PlannedStep) -> StepContext:
    ctx = StepContext(
        step_id="train",
        params=step.params,
        run_dir=agent_dir / "runs" / "book",
        env=dict(os.environ),
        out=io.StringIO(),
    )
    KIND.run(ctx)
    return ctx


@pytest.mark.slow
def test_monitor_watches_the_log_the_kind_writes_with_no_log_param(
    tmp_path: Path, agent_dir: Path, socket: str
) -> None:
    job = tmp_path / "job"
    step = _step(job, socket)
    _launch(agent_dir, step)
    written = job / "logs" / "train-ae.log"  # <cwd>/logs/SESSION.log: where the kind writes
    wait_for(lambda: "[AE] step=20/" in written.read_text(), what="20 training steps")
    box = controller.Box(Host(name="here", connection="local"), _local())
    snap = controller.monitor(box, "book", step, None, None, {})
    assert snap["launch"]["launched"] and snap["launch"]["log"] == str(written)
    assert snap["launch"]["session"] == "train-ae"
    assert snap["training"]["step"] >= 20
    assert f"step=20/{snap['training']['total']} " in written.read_text()  # parsed from it
    # What the controller used to watch (a path it derived itself) never existed.
    assert not (Path.home() / ".bootstrap" / "runs" / "logs" / "train-ae.log").exists()


@pytest.mark.slow
def test_the_record_wins_over_a_changed_plan(tmp_path: Path, agent_dir: Path, socket: str) -> None:
    """The playbook renamed the log since the launch: the running job still writes the old
    one, and monitor reads that; before any launch the box says where the next will write."""
    job = tmp_path / "job"
    step = _step(job, socket, log="out/first.log")
    ctx = _launch(agent_dir, step)
    first = job / "out" / "first.log"
    wait_for(lambda: "[AE] step=5/" in first.read_text(), what="5 training steps")
    renamed = _step(job, socket, log="out/second.log")
    box = controller.Box(Host(name="here", connection="local"), _local())
    snap = controller.monitor(box, "book", renamed, None, None, {})
    assert snap["launch"]["log"] == str(first) and snap["training"]["step"] >= 5
    never = controller.launch(box, "other-run", renamed)
    assert never == {
        "launched": False,
        "log": str(job / "out" / "second.log"),
        "session": "train-ae",
        "socket": socket,
    }
    assert launch_facts(ctx.workdir, renamed.params)["log"] == str(first)


def _local() -> controller.Transport:
    from provision.transport.local import LocalTransport

    return LocalTransport("here")


def test_monitor_json_names_the_launch(tmp_path: Path) -> None:
    """The snapshot's `launch` is plain JSON (the CLI prints it in `monitor --json`)."""
    facts = launch_facts(None, {"session": "s", "cwd": str(tmp_path), "log": None})
    assert json.loads(json.dumps(facts))["log"] == str(tmp_path / "logs" / "s.log")
