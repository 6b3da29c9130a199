"""Checkpoint remotes for tests: real rclone remotes (a `type = local` one, `rclone serve`)
and the stand-in trainer writing checkpoints the way openpi's fork does."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
