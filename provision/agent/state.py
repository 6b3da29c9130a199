"""Where a run lives on the box, and its state file.

`~/.bootstrap/runs/<name>/` holds `plan.json` (from the controller), `state.json` (written only
by the runner or, while no runner holds the lock, by `agent up`), `secrets.json` (0600, removed
when the run ends), `lock`, `reserve` (disk space set aside for the state), `logs/<step>.log`
and `steps/<step>/` (each kind's markers, progress and warnings). Every write is atomic: temp
file, fsync, rename.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from provision.steps.base import read_json

#: Every status a step can have. `error`: it could not run (crash, missing interpreter), as
#: opposed to `failed`: it ran and failed. `blocked`: an upstream step failed or errored.
#: Disk space the runner keeps aside for writing the state once the disk is full.
RESERVE_BYTES = 256 * 1024
#: A temp file of an atomic write: `.NAME.PID.tmp`.
_TEMP = re.compile(r"^\..+\.(\d+)\.tmp$")
STATUSES = ("pending", "running", "done", "failed", "error", "blocked", "skipped")
BAD = ("failed", "error", "blocked")


def agent_root() -> Path:
    """`~/.bootstrap`, or `$BOOTSTRAP_AGENT_DIR` when set."""
    return Path(os.environ.get("BOOTSTRAP_AGENT_DIR") or os.path.expanduser("~/.bootstrap"))


class RunDir:
    """Paths of one run on the box."""

    def __init__(self, name: str, root: Path | None = None) -> None:
        self.name = name
        self.path = (root or agent_root()) / "runs" / name

    @property
    def plan(self) -> Path:
        return self.path / "plan.json"

    @property
    def state(self) -> Path:
        return self.path / "state.json"

    @property
    def secrets(self) -> Path:
        return self.path / "secrets.json"

    @property
    def lock(self) -> Path:
        return self.path / "lock"

    @property
    def requests(self) -> Path:
        return self.path / "requests"

    @property
    def reserve(self) -> Path:
        return self.path / "reserve"

    @property
    def runner_log(self) -> Path:
        return self.path / "runner.log"

    def log(self, step_id: str) -> Path:
        return self.path / "logs" / f"{step_id}.log"

    def step_dir(self, step_id: str) -> Path:
        return self.path / "steps" / step_id

    def make(self) -> None:
        for sub in ("logs", "steps", "requests"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)


def load_state(run: RunDir) -> dict[str, Any]:
    """The run's state, or a fresh one."""
    state = read_json(run.state, None)
    if not isinstance(state, dict) or "steps" not in state:
        state = {"version": 1, "run": run.name, "runner": {"status": "idle"}, "steps": {}}
    return state


def save_state(run: RunDir, state: dict[str, Any]) -> None:
    """Write the state atomically; on a full disk, spend the run's reserve and try once more.

    Raises OSError when the state cannot be written even then (the old state stays intact).
    """
    state["updated"] = time.time()
    try:
        _write_atomic(run.state, state)
    except OSError as exc:
        if exc.errno != errno.ENOSPC or not release_reserve(run):
            raise
        _write_atomic(run.state, state)


def _write_atomic(path: Path, data: Any) -> None:
    """Temp file, fsync, rename; a failed write removes its temp file (it may hold the space
    the next attempt needs)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove_stale_temps(run: RunDir) -> None:
    """Remove the temp files of writers killed mid-write (`.NAME.PID.tmp` whose PID is gone):
    the renames keep every file whole, but each kill would leave one behind."""
    for directory in (run.path, run.requests):
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in names:
            match = _TEMP.match(name)
            if match and not _alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    (directory / name).unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return True


def make_reserve(run: RunDir) -> None:
    """Set aside RESERVE_BYTES of disk for the state, so a step that fills the disk can still
    be recorded as failed (best effort: nothing happens when the disk is already full)."""
    if run.reserve.exists():
        return
    try:
        with open(run.reserve, "wb") as fh:
            fh.write(b"\0" * RESERVE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        with contextlib.suppress(OSError):
            run.reserve.unlink()


def release_reserve(run: RunDir) -> bool:
    """Free the reserve; True when there was one."""
    try:
        run.reserve.unlink()
    except FileNotFoundError:
        return False
    return True


def record(state: dict[str, Any], step_id: str) -> dict[str, Any]:
    """The mutable record of one step in `state` (created pending)."""
    steps = state.setdefault("steps", {})
    rec = steps.get(step_id)
    if rec is None:
        rec = steps[step_id] = {"status": "pending", "attempts": 0, "gen": 0}
    return rec


def write_secrets(run: RunDir, secrets: dict[str, str]) -> None:
    """Store secret values for the runner, readable by the box user only."""
    tmp = run.secrets.with_name(f".secrets.json.{os.getpid()}.tmp")  # two `up`s may race
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(secrets, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, run.secrets)


def read_secrets(run: RunDir) -> dict[str, str]:
    """The secret values shipped with the run (empty when none)."""
    data = read_json(run.secrets, {})
    return data if isinstance(data, dict) else {}


def forget_secrets(run: RunDir) -> None:
    """Remove the secrets file (at the end of a run)."""
    with contextlib.suppress(FileNotFoundError):
        run.secrets.unlink()


class RunLock:
    """One runner per run: an exclusive, non-blocking flock on `lock`.

    The lock lives with the open file description, so a runner started with the fd inherited
    (`pass_fds`) keeps holding it with no gap after the starter exits.
    """

    def __init__(self, run: RunDir, fd: int | None = None) -> None:
        self.run = run
        self.fd = fd

    def acquire(self) -> bool:
        """Take the lock; False when another process holds it."""
        self.run.make()
        fd = os.open(str(self.run.lock), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def runner_active(run: RunDir) -> bool:
    """Whether a runner holds the run's lock right now (probes without keeping it)."""
    if not run.lock.exists():
        return False
    fd = os.open(str(run.lock), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
