"""Where a run lives on the box, and its state file.

`~/.bootstrap/runs/<name>/` holds `plan.json` (from the controller), `state.json` (written only
by the runner or, while no runner holds the lock, by `agent up`), `secrets.json` (0600, removed
when the run ends), `lock`, `reserve` (disk space set aside for the state), `logs/<step>.log`
and `steps/<step>/` (each kind's markers, progress and warnings). Every write is atomic: temp
file, fsync, rename.

A state file damaged from outside (a full disk under another tool, a hand edit) is validated on
load: the records that make sense are kept, the file itself is set aside as
`state.json.damaged-TIME` by the next `up` and a one-line notice says so; the steps whose
records were lost are decided by their checks, like on a box set up by hand.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from pathlib import Path

from provision.agent.files import TEMP_NAME, read_json, write_json_atomic
from provision.agent.paths import agent_root
from provision.model import RunState

#: Disk space the runner keeps aside for writing the state once the disk is full.
RESERVE_BYTES = 256 * 1024


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


def load_state(run: RunDir) -> RunState:
    """The run's state (a fresh one when there is no file). Never raises: a damaged file gives
    what could be kept of it, with `damage` saying what was wrong (see `set_aside_damaged`)."""
    try:
        with open(run.state, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return RunState(run=run.name)
    except OSError as exc:
        return RunState(run=run.name, damage=f"unreadable: {exc.strerror}")
    try:
        parsed = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return RunState(run=run.name, damage="not UTF-8 text")
    except json.JSONDecodeError as exc:
        where = f"not valid JSON at line {exc.lineno} column {exc.colno}"
        return RunState(run=run.name, damage="empty" if not data.strip() else where)
    state, problems = RunState.from_json(parsed, run.name)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        state.damage = problems[0] + more
    return state


def set_aside_damaged(run: RunDir, keep_notices: bool = False) -> None:
    """With the run's lock held: move a damaged state file aside (`state.json.damaged-TIME`)
    and write what could be kept of it, with a notice saying so. Unless `keep_notices`, the
    notices a previous `up` left are dropped first (they were shown). Raises OSError when
    the disk takes neither."""
    state = load_state(run)
    damage, state.damage = state.damage, None
    if damage is None:
        if not keep_notices and state.notices:
            state.notices = []
            save_state(run, state)
        return
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = run.state.with_name(f"state.json.damaged-{stamp}")
    n = 1
    while kept.exists():
        n += 1
        kept = run.state.with_name(f"state.json.damaged-{stamp}-{n}")
    os.replace(run.state, kept)
    state.notices = [
        f"state.json was damaged ({damage}); kept it as {kept.name}; "
        "steps without a record are decided by their checks again"
    ]
    save_state(run, state)


def save_state(run: RunDir, state: RunState) -> None:
    """Write the state atomically; on a full disk, spend the run's reserve and try once more.

    Raises OSError when the state cannot be written even then (the old state stays intact).
    """
    state.updated = time.time()
    data = state.to_json()
    try:
        write_json_atomic(run.state, data)
    except OSError as exc:
        if exc.errno != errno.ENOSPC or not release_reserve(run):
            raise
        write_json_atomic(run.state, data)


def remove_stale_temps(run: RunDir) -> None:
    """Remove the temp files of writers killed mid-write (`.NAME.PID.tmp` whose PID is gone):
    the renames keep every file whole, but each kill would leave one behind."""
    for directory in (run.path, run.requests):
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in names:
            match = TEMP_NAME.match(name)
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


def write_secrets(run: RunDir, secrets: dict[str, str]) -> None:
    """Store secret values for the runner, readable by the box user only (two `up`s may race:
    each writes its own temp file)."""
    write_json_atomic(run.secrets, secrets, indent=None, sort_keys=False, mode=0o600)


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
