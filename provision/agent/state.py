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
import statistics
import time
from pathlib import Path
from typing import Any

from provision.agent.files import TEMP_NAME, read_json, write_json_atomic
from provision.agent.paths import agent_root

#: Every status a step can have. `error`: it could not run (crash, missing interpreter), as
#: opposed to `failed`: it ran and failed. `blocked`: an upstream step failed or errored.
#: Disk space the runner keeps aside for writing the state once the disk is full.
RESERVE_BYTES = 256 * 1024
STATUSES = ("pending", "running", "done", "failed", "error", "blocked", "skipped")
BAD = ("failed", "error", "blocked")


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


def fresh_state(run: RunDir) -> dict[str, Any]:
    return {"version": 1, "run": run.name, "runner": {"status": "idle"}, "steps": {}}


def load_state(run: RunDir) -> dict[str, Any]:
    """The run's state (a fresh one when there is no file). Never raises: a damaged file gives
    what could be kept of it, with `damage` saying what was wrong (see `set_aside_damaged`)."""
    try:
        with open(run.state, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return fresh_state(run)
    except OSError as exc:
        return dict(fresh_state(run), damage=f"unreadable: {exc.strerror}")
    try:
        parsed = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return dict(fresh_state(run), damage="not UTF-8 text")
    except json.JSONDecodeError as exc:
        where = f"not valid JSON at line {exc.lineno} column {exc.colno}"
        return dict(fresh_state(run), damage="empty" if not data.strip() else where)
    state, problems = _validated(run, parsed)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        state["damage"] = problems[0] + more
    return state


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


#: Fields of a step record and the values each may hold (the runner reads them with int(),
#: float(), `in`: anything else would crash every command).
_NUMBER = (int, float)
_FIELDS: dict[str, tuple[type, ...]] = {
    "status": (str,),
    "attempts": (int,),
    "gen": (int,),
    "started": _NUMBER,
    "ended": _NUMBER,
    "duration_s": _NUMBER,
    "rc": (int,),
    "pid": (int,),
    "pgid": (int,),
    "fingerprint": (str,),
    "reason": (str,),
    "hint": (str,),
    "outcome": (str,),
    "forced": (bool, str),
    "upstream": (dict,),
    "warnings": (list,),
}


def _record_problem(rec: Any) -> str | None:
    """What is wrong with one step record, or None."""
    if not isinstance(rec, dict):
        return f"a {_kind(rec)}, not an object"
    for name, types in _FIELDS.items():
        value = rec.get(name)
        if value is None and name != "status":
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            return f"'{name}' is {_kind(value)}"
    if rec["status"] not in STATUSES:
        return f"unknown status '{rec['status']}'"
    upstream = rec.get("upstream") or {}
    if not all(isinstance(g, int) and not isinstance(g, bool) for g in upstream.values()):
        return "'upstream' holds a non-integer generation"
    return None


def _validated(run: RunDir, data: Any) -> tuple[dict[str, Any], list[str]]:
    """The part of `data` that is a valid state, and what was wrong with the rest."""
    if not isinstance(data, dict):
        return fresh_state(run), [f"the top level is a {_kind(data)}, not an object"]
    problems = []
    state = fresh_state(run)
    state.update({k: v for k, v in data.items() if k not in ("steps", "runner", "damage")})
    runner = data.get("runner", {"status": "idle"})
    if isinstance(runner, dict) and isinstance(runner.get("status"), str):
        state["runner"] = runner
    else:
        problems.append(f"'runner' is {_kind(runner)}")
    steps = data.get("steps")
    if not isinstance(steps, dict):
        problems.append(f"'steps' is {_kind(steps)}, not an object")
        steps = {}
    for step_id, rec in steps.items():
        problem = _record_problem(rec)
        if problem:
            problems.append(f"step '{step_id}': {problem}")
        else:
            state["steps"][step_id] = rec
    durations = state.get("durations")
    if durations is not None and not _durations_valid(durations):
        problems.append(f"'durations' is not step ids with lists of seconds ({_kind(durations)})")
        state.pop("durations")
    notices = state.get("notices")
    if notices is not None and not (
        isinstance(notices, list) and all(isinstance(n, str) for n in notices)
    ):
        problems.append(f"'notices' is {_kind(notices)}")
        state.pop("notices")
    return state, problems


def _durations_valid(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(v, list) and all(isinstance(d, _NUMBER) and not isinstance(d, bool) for d in v)
        for v in value.values()
    )


#: Measured durations kept per step (the newest): a median that one odd run does not move.
DURATIONS_KEPT = 5


def remember_duration(state: dict[str, Any], step_id: str, seconds: float) -> None:
    """Keep how long a step took when it ran (or was restored) to done, for the ETA of the next
    runs of this playbook (`durations`: step id -> the newest DURATIONS_KEPT, in seconds)."""
    kept = state.setdefault("durations", {}).setdefault(step_id, [])
    kept.append(round(float(seconds), 3))
    del kept[:-DURATIONS_KEPT]


def expected_duration(state: dict[str, Any], step_id: str) -> float | None:
    """The median of a step's measured durations on this box (None when it never ran)."""
    kept = (state.get("durations") or {}).get(step_id)
    return float(statistics.median(kept)) if kept else None


def set_aside_damaged(run: RunDir, keep_notices: bool = False) -> None:
    """With the run's lock held: move a damaged state file aside (`state.json.damaged-TIME`)
    and write what could be kept of it, with a notice saying so. Unless `keep_notices`, the
    notices a previous `up` left are dropped first (they were shown). Raises OSError when
    the disk takes neither."""
    state = load_state(run)
    damage = state.pop("damage", None)
    if damage is None:
        if not keep_notices and state.pop("notices", None) is not None:
            save_state(run, state)
        return
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = run.state.with_name(f"state.json.damaged-{stamp}")
    n = 1
    while kept.exists():
        n += 1
        kept = run.state.with_name(f"state.json.damaged-{stamp}-{n}")
    os.replace(run.state, kept)
    state["notices"] = [
        f"state.json was damaged ({damage}); kept it as {kept.name}; "
        "steps without a record are decided by their checks again"
    ]
    save_state(run, state)


def save_state(run: RunDir, state: dict[str, Any]) -> None:
    """Write the state atomically; on a full disk, spend the run's reserve and try once more.

    Raises OSError when the state cannot be written even then (the old state stays intact).
    """
    state["updated"] = time.time()
    try:
        write_json_atomic(run.state, state)
    except OSError as exc:
        if exc.errno != errno.ENOSPC or not release_reserve(run):
            raise
        write_json_atomic(run.state, state)


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


def record(state: dict[str, Any], step_id: str) -> dict[str, Any]:
    """The mutable record of one step in `state` (created pending)."""
    steps = state.setdefault("steps", {})
    rec: dict[str, Any] | None = steps.get(step_id)
    if rec is None:
        rec = steps[step_id] = {"status": "pending", "attempts": 0, "gen": 0}
    return rec


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
