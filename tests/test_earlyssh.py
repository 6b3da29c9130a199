"""Remembered ssh masters started at process start (provision/earlyssh.py): used only for the
same command line, directory and config dir with the inventory unchanged, and handed to the
transport, which then opens no second handshake. The box test counts real ssh invocations."""

from __future__ import annotations

import hashlib
import importlib
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import pytest
from project import QUICK, Project

from provision import earlyssh

MASTER = ["ssh", "-o", "ControlMaster=auto", "-T", "-N", "--", "box.example"]


class _Popen:
    """What earlyssh spawns, recorded instead of run."""

    started: ClassVar[list[list[str]]] = []

    def __init__(self, argv: list[str], **_: Any) -> None:
        self.argv = argv
        _Popen.started.append(argv)


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A new process's earlyssh (module state reset), its config dir and inventory in tmp."""
    monkeypatch.setenv("BOOTSTRAP_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _Popen.started = []

    def new_process() -> Any:
        module = importlib.reload(earlyssh)
        monkeypatch.setattr(module.subprocess, "Popen", _Popen)
        return module

    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("hosts: {box1: {host: box.example}}\n")
    return new_process, inventory


def _ran_once(new_process: Any, inventory: Path, args: list[str]) -> None:
    """A command that loaded `inventory` and opened MASTER the ordinary way."""
    module = new_process()
    module.start(args, "/proj")
    module.depends_on(str(inventory))
    module.remember(MASTER)


def test_the_same_command_line_starts_the_remembered_master_and_hands_it_over(fresh: Any) -> None:
    new_process, inventory = fresh
    _ran_once(new_process, inventory, ["up", "box1"])
    module = new_process()
    module.start(["up", "box1"], "/proj")
    assert _Popen.started == [MASTER]
    assert module.claim(list(MASTER)) is not None
    assert module.claim(list(MASTER)) is None, "handed over once"
    assert module.claim([*MASTER[:-1], "other.example"]) is None
    store = Path(os.environ["BOOTSTRAP_CONFIG_DIR"]) / "early-ssh.json"
    assert stat.S_IMODE(store.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("args", "cwd", "edit"),
    [
        (["up", "box1", "-p", "other.yaml"], "/proj", False),
        (["up", "box1"], "/elsewhere", False),
        (["up", "box1"], "/proj", True),
    ],
    ids=["another-command-line", "another-directory", "inventory-edited"],
)
def test_nothing_starts_unless_everything_it_came_from_is_the_same(
    fresh: Any, args: list[str], cwd: str, edit: bool
) -> None:
    new_process, inventory = fresh
    _ran_once(new_process, inventory, ["up", "box1"])
    if edit:
        inventory.write_text("hosts: {box1: {host: box.example, port: 2222}}\n")
    module = new_process()
    module.start(args, cwd)
    assert _Popen.started == []


def test_a_new_inventory_replaces_the_old_masters_instead_of_adding_to_them(fresh: Any) -> None:
    new_process, inventory = fresh
    _ran_once(new_process, inventory, ["up", "box1"])
    inventory.write_text("hosts: {box1: {host: new.example}}\n")
    moved = [*MASTER[:-1], "new.example"]
    module = new_process()
    module.start(["up", "box1"], "/proj")
    module.depends_on(str(inventory))
    module.remember(moved)
    new_process().start(["up", "box1"], "/proj")
    assert _Popen.started == [moved], "the old box's address is not dialled again"


# ------------------------------------------------------------------ over a box


def _logging_ssh(bin_dir: Path) -> Path:
    """An `ssh` on PATH that logs each call's arguments, then runs the real one. Each line
    starts with who started it: `early` (stdin /dev/null: earlyssh.start) or `transport` (stdin
    a pipe: the transport's own `subprocess.run(input=...)`)."""
    calls = bin_dir / "calls.log"
    bin_dir.mkdir(parents=True, exist_ok=True)
    real = "/usr/bin/ssh"
    script = bin_dir / "ssh"
    script.write_text(
        f"#!/bin/sh\nif [ -p /dev/stdin ]; then who=transport; else who=early; fi\n"
        f'echo "$who $*" >> {calls}\nexec {real} "$@"\n'
    )
    script.chmod(0o755)
    return calls


def _control_dir(config_dir: str) -> Path:
    """The CLI's socket directory for `config_dir` (provision/home.py's rule)."""
    tag = hashlib.sha256(config_dir.encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"bootstrap-{os.getuid()}-{tag}"


def test_a_repeated_cold_up_dials_once_and_a_changed_inventory_dials_anew(
    project: Project, tmp_path: Path
) -> None:
    if project.connection != "ssh":
        pytest.skip("the early master is OpenSSH's")
    calls = _logging_ssh(tmp_path / "bin")
    env = dict(project.env, PATH=f"{tmp_path / 'bin'}{os.pathsep}{project.env['PATH']}")
    project.playbook(QUICK)
    inventory = project.write_inventory()
    sockets = _control_dir(env["BOOTSTRAP_CONFIG_DIR"])

    def cold_up() -> list[str]:
        """`up` as the console script runs it, every master closed first; its `ssh -N` calls."""
        for sock in sockets.glob("*"):
            subprocess.run(["/usr/bin/ssh", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
                           capture_output=True)  # fmt: skip
        calls.write_text("")
        argv = [sys.executable, "-m", "provision", "up", "box1", "-p", "playbooks/test.yaml"]
        done = subprocess.run(argv, env=env, cwd=project.root, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        lines = calls.read_text().splitlines()
        return [line.split()[0] for line in lines if " -N " in f" {line} "]

    assert cold_up() == ["transport"], "the first time: the transport opens its master"
    assert cold_up() == ["early"], "the second time: the early master alone, no second"
    with inventory.open("a") as fh:
        fh.write("# edited\n")
    assert cold_up() == ["transport"], "an edited inventory: no early master"
    assert cold_up() == ["early"]
