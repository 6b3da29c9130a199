"""Checkpoint remotes for tests: real rclone remotes (a `type = local` one, `rclone serve`)
and the stand-in trainer writing checkpoints the way openpi's fork does."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from gcs_emulator import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
TRAINER = REPO / "provision" / "data" / "fake_trainer.py"


def rclone_config(path: Path, **remotes: dict[str, str]) -> Path:
    """Write an rclone.conf holding `remotes` (name → options)."""
    lines = []
    for name, options in remotes.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {v}" for k, v in options.items()]
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def train(cwd: Path, steps: int, interval: int, *extra: str, save_dir: str = "ck") -> str:
    """Run the stand-in trainer to completion in `cwd`; returns its output."""
    done = subprocess.run(
        [sys.executable, str(TRAINER), "--mode", "ae", "--steps", str(steps), "--step-sleep", "0",
         "--startup-sleep", "0", "--wandb", "offline", "--save-dir", save_dir,
         "--save-interval", str(interval), *extra],
        cwd=cwd, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout + done.stderr


def trainer_command(save_dir: str, interval: int, steps: int, *extra: str) -> str:
    """The stand-in trainer as a tmux_launch command line."""
    parts = [sys.executable, str(TRAINER), "--mode", "ae", "--steps", str(steps),
             "--startup-sleep", "0", "--wandb", "offline", "--save-dir", save_dir,
             "--save-interval", str(interval), *extra]  # fmt: skip
    return " ".join(parts)


def manifest(root: Path) -> dict[str, dict]:
    """The manifest entries under a local remote directory `root` (one being written, not yet
    whole, is left out: rclone's local backend writes in place)."""
    folder = root / ".bootstrap" / "manifest"
    if not folder.is_dir():
        return {}
    found = {}
    for path in folder.glob("*.json"):
        try:
            found[path.stem] = json.loads(path.read_text())
        except ValueError:
            continue
    return found


@contextmanager
def serve(kind: str, root: Path, *flags: str) -> Iterator[str]:
    """`rclone serve KIND root` on a loopback port; yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        ["rclone", "serve", kind, str(root), "--addr", f"127.0.0.1:{port}", *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _proc_of(pid: int) -> tuple[str, str, str] | None:
    """(state, cmdline, cwd) of a live process, or None (gone, or a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        argv = (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, IndexError):
        return None
    return None if state in ("Z", "X") else (state, argv, cwd)


def processes_of(root: Path) -> dict[int, str]:
    """Live processes that belong to a test whose files are under `root`: their command line
    names a path under it, or they run in it (a guard and its rclone, a trainer); {pid: argv}.
    The caller's own process and its ancestors are left out."""
    mine, pid = set(), os.getpid()
    while pid > 1 and pid not in mine:
        mine.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    found = {}
    prefix = str(root)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        info = _proc_of(int(entry.name))
        if info is None:
            continue
        _state, argv, cwd = info
        if prefix in argv or cwd == prefix or cwd.startswith(prefix + "/"):
            found[int(entry.name)] = argv
    return found


def reap(root: Path, grace: float = 5.0) -> dict[int, str]:
    """End what a test under `root` left running: the processes of `processes_of(root)` still
    alive after `grace` seconds get SIGKILL, by pid (a guard runs in a session of its own, so
    neither pytest nor a killed tmux server takes it along). Returns the ones killed."""
    deadline = time.monotonic() + grace
    left = processes_of(root)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = processes_of(root)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    end = time.monotonic() + 10
    while time.monotonic() < end and any(_proc_of(pid) for pid in left):
        time.sleep(0.05)
    return left


@contextmanager
def no_process_outlives(request: pytest.FixtureRequest, root: Path) -> Iterator[None]:
    """Around one test: afterwards every process it left under `root` is killed (whatever
    happened), and a test that passed fails if it left one (a leak, not a flake)."""
    failed_before = request.session.testsfailed
    try:
        yield
    finally:
        left = reap(root)
        if left and request.session.testsfailed == failed_before:
            listed = "; ".join(f"{pid}: {argv[:200]}" for pid, argv in left.items())
            pytest.fail(f"processes outlived the test (killed now): {listed}")
