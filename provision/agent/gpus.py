"""GPU leases: one training per GPU set on a box, across every run and playbook on it.

A job that `tmux_launch` starts holds the GPUs it was given (its `gpus:`, else the step's
CUDA_VISIBLE_DEVICES, else all of them) for as long as it lives. The leases are one JSON file
in the agent's directory (`~/.bootstrap/gpu-leases.json`, `$BOOTSTRAP_AGENT_DIR` when set),
shared by every run there; a launch claims its GPUs under an exclusive flock on
`gpu-leases.lock`, held from the conflict check until the job runs and its lease is written, so
two launches racing for one GPU cannot both win.

A lease is never trusted, it is checked: the job lives while a process of the Unix session its
launch script leads is alive (tmux starts each pane in a new session, so the trainer and its
DataLoader workers are all members, even after the script itself died). A lease whose session
has no live member, or whose leader pid now belongs to a younger process, is stale and is
dropped. A lease written before the job's pid was known (a launch in progress, or a launcher
killed mid-launch) is read through the launch's pid file, and counts as alive for
`STARTING_S` without one.

Standard library only: the runner's plain python3 reads leases for `status`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from provision.agent.files import read_json, write_json_atomic
from provision.agent.paths import agent_root
from provision.errors import StepFailed

#: GPU names in a `gpus:` param: indexes or UUIDs, comma-separated.
_GPUS_RE = re.compile(r"^[A-Za-z0-9-]+(,[A-Za-z0-9-]+)*$")
#: The GPU set of a job that was given none: it sees, and so holds, every GPU of the box.
ALL = "all"
LEASES_FILE = "gpu-leases.json"
LOCK_FILE = "gpu-leases.lock"
#: How long a lease without a known pid counts as a launch in progress.
STARTING_S = 60.0
#: How long a claim waits for another launch to finish claiming (it holds the lock while its
#: job starts: at most the launch script's start timeout plus stopping an old session).
LOCK_WAIT_S = 120.0


@dataclass(frozen=True)
class Lease:
    """GPUs held by one launched job, with what a user needs to find and stop it."""

    gpus: tuple[str, ...]
    session: str
    socket: str | None
    launch_id: str
    run: str
    playbook: str
    step: str
    since: float
    pid_file: str
    pid: int | None = None
    pid_start: int | None = None

    @property
    def owner(self) -> tuple[str, str]:
        """The step that holds it: a relaunch of the same step replaces its lease."""
        return self.run, self.step

    def alive(self) -> bool:
        """Whether the job still runs (see the module doc); never trusts the record alone."""
        running = self.running()
        return running if running is not None else time.time() - self.since < STARTING_S

    def running(self) -> bool | None:
        """Whether the job's session has a live process; None while its pid is not known."""
        pid, start = self.pid, self.pid_start
        if pid is None:
            pid = launch_pid(Path(self.pid_file), self.launch_id)
            if pid is None:
                return None
        leader = _stat(pid)
        if leader is not None and leader[0] != "Z":
            # Linux reuses no pid that still names a session, so a live process with this pid
            # that is younger, or leads no session of its own, means the job's session is gone.
            reused = start is not None and int(leader[19]) != start
            return not reused and int(leader[3]) == pid
        return bool(session_members([pid]))  # the script died: its children may still run

    def describe(self) -> str:
        """`tmux session S (playbook P, run R, step X, since T, pid N)`."""
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        run = f", run {self.run}" if self.run != self.playbook else ""
        pid = f", pid {self.pid}" if self.pid else ""
        return (
            f"tmux session {self.session} (playbook {self.playbook}{run}, step {self.step}, "
            f"since {when}{pid})"
        )

    def stop_hint(self) -> str:
        """How to stop the holder, on the box: its tmux session, or, once the launch script
        is gone, the processes of its session that outlived it."""
        pid = self.pid or launch_pid(Path(self.pid_file), self.launch_id)
        leader = _stat(pid) if pid else None
        if pid and (leader is None or leader[0] == "Z"):
            left = " ".join(map(str, session_members([pid])))
            how = f"its launch script is gone but these processes still run: `kill {left}`"
        else:
            where = ""
            if self.socket:
                where = f"-S {self.socket} " if "/" in self.socket else f"-L {self.socket} "
            how = (
                f"`tmux {where}kill-session -t ={self.session}`, or `bootstrap attach HOST "
                f"{self.session}` and Ctrl-C"
            )
        return f"stop that job first (on the box: {how}), or give this step other GPUs (`gpus:`)"

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as stored and as `status --json` shows it."""
        out = asdict(self)
        out["gpus"] = list(self.gpus)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Lease | None:
        """A stored lease, or None when the entry is malformed (it is then dropped)."""
        try:
            return cls(
                gpus=tuple(str(g) for g in data["gpus"]),
                session=str(data["session"]),
                socket=data.get("socket"),
                launch_id=str(data["launch_id"]),
                run=str(data["run"]),
                playbook=str(data.get("playbook") or data["run"]),
                step=str(data["step"]),
                since=float(data["since"]),
                pid_file=str(data["pid_file"]),
                pid=int(data["pid"]) if data.get("pid") is not None else None,
                pid_start=int(data["pid_start"]) if data.get("pid_start") is not None else None,
            )
        except (KeyError, TypeError, ValueError):
            return None


def gpus_value(gpus: Any) -> str | None:
    """CUDA_VISIBLE_DEVICES for a `gpus:` param (1, "0,1", [0, 1]), None when malformed."""
    if isinstance(gpus, bool):
        return None
    if isinstance(gpus, int):
        return str(gpus) if gpus >= 0 else None
    if isinstance(gpus, list):
        ok = gpus and all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus)
        return ",".join(map(str, gpus)) if ok else None
    if isinstance(gpus, str):
        value = ",".join(part.strip() for part in gpus.split(","))
        return value if _GPUS_RE.match(value) else None
    return None


def gpu_set(cuda_visible_devices: str | None) -> tuple[str, ...]:
    """The GPUs a job holds: `"0,1"` → ("0", "1"); None → (ALL,); "" → () (it sees none)."""
    if cuda_visible_devices is None:
        return (ALL,)
    return tuple(dict.fromkeys(g.strip() for g in cuda_visible_devices.split(",") if g.strip()))


def shared(a: Sequence[str], b: Sequence[str]) -> tuple[str, ...]:
    """The GPUs two sets have in common; ALL shares every GPU with any non-empty set."""
    if not a or not b:
        return ()
    if ALL in a:
        return tuple(b)
    if ALL in b:
        return tuple(a)
    return tuple(g for g in a if g in b)


def gpus_text(gpus: Sequence[str]) -> str:
    """`GPU 1`, `GPUs 0,1`, `all GPUs`."""
    if ALL in gpus:
        return "all GPUs"
    return ("GPU " if len(gpus) == 1 else "GPUs ") + ",".join(gpus)


class GpuLeases:
    """The box's lease file (under `root`, default the agent directory)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or agent_root()
        self.path = self.root / LEASES_FILE
        self.lock_path = self.root / LOCK_FILE

    def live(self) -> list[Lease]:
        """The leases whose jobs still run (read without the lock: the file is replaced
        atomically). Stale ones are dropped from the file when the lock is free, so each
        costs its /proc scan once, not on every `status`."""
        leases = self._read()
        alive = [lease for lease in leases if lease.alive()]
        if len(alive) < len(leases):
            self._prune()
        return alive

    def _prune(self) -> None:
        """Rewrite the file without stale leases, unless a launch holds the lock right now."""
        try:
            fd = os.open(str(self.lock_path), os.O_RDWR)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._write([lease for lease in self._read() if lease.alive()])
        except (BlockingIOError, OSError):
            return  # a launch is claiming (it writes the live ones), or the disk is full
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def claim(
        self,
        gpus: Sequence[str],
        *,
        run: str,
        step: str,
        session: str,
        socket: str | None,
    ) -> Iterator[Claim]:
        """Hold the lock, refuse if a live job of another step holds any of `gpus` (or runs in
        the same tmux session), and yield a Claim whose `grant` records the new lease.

        Raises StepFailed naming the holder. A launch that fails before its job runs takes its
        lease back; the step's old lease, if any, is dropped once its job is seen dead.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.lock_path), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _lock(fd, self.lock_path)
            others = [x for x in self._read() if x.owner != (run, step) and x.alive()]
            _refuse_conflicts(others, gpus, session, socket)
            claim = Claim(self, others, tuple(gpus), run, step, session, socket)
            try:
                yield claim
            except BaseException:
                if claim.lease is not None and not claim.lease.running():
                    self._write(others)  # the launch failed before its job ran
                raise
        finally:
            os.close(fd)  # releases the flock

    def check(
        self, gpus: Sequence[str], *, run: str, step: str, session: str, socket: str | None
    ) -> None:
        """Refuse as `claim` would, without the lock: a cheap early look before slow work (a
        checkpoint restore) that `claim` then confirms."""
        others = [x for x in self._read() if x.owner != (run, step) and x.alive()]
        _refuse_conflicts(others, gpus, session, socket)

    def _read(self) -> list[Lease]:
        data = read_json(self.path, {})
        entries = data.get("leases") if isinstance(data, dict) else None
        leases = (Lease.from_dict(e) for e in entries or [] if isinstance(e, dict))
        return [lease for lease in leases if lease is not None]

    def _write(self, leases: Collection[Lease]) -> None:
        write_json_atomic(self.path, {"version": 1, "leases": [x.to_dict() for x in leases]})


@dataclass
class Claim:
    """GPUs found free under the lock; `grant` records them as held by the new job."""

    book: GpuLeases
    others: list[Lease]
    gpus: tuple[str, ...]
    run: str
    step: str
    session: str
    socket: str | None
    lease: Lease | None = None

    def grant(self, launch_id: str, pid_file: Path, playbook: str) -> Lease:
        """Write the lease before the job starts (pid unknown yet): a launcher killed from
        here on still leaves the job's GPUs held."""
        self.lease = Lease(
            gpus=self.gpus,
            session=self.session,
            socket=self.socket,
            launch_id=launch_id,
            run=self.run,
            playbook=playbook,
            step=self.step,
            since=time.time(),
            pid_file=str(pid_file),
        )
        self.book._write([*self.others, self.lease])
        return self.lease

    def started(self, pid: int) -> None:
        """Record the pid of the job's session leader, now that it runs."""
        if self.lease is None:
            raise RuntimeError("Claim.started before Claim.grant")
        self.lease = replace(self.lease, pid=pid, pid_start=process_start(pid))
        self.book._write([*self.others, self.lease])


def _refuse_conflicts(
    others: Sequence[Lease], gpus: Sequence[str], session: str, socket: str | None
) -> None:
    """Raise StepFailed naming the first live lease of another step that holds any of `gpus`
    or runs in the tmux session this launch would take over (and so kill)."""
    for lease in others:
        busy = shared(gpus, lease.gpus)
        if busy:
            verb = "is" if len(busy) == 1 and ALL not in busy else "are"
            raise StepFailed(
                f"{gpus_text(busy)} {verb} held by {lease.describe()}", lease.stop_hint()
            )
        if (lease.session, lease.socket) == (session, socket):
            raise StepFailed(
                f"tmux session {session} is already used by {lease.describe()}",
                "give this step another `session:` name, or stop that job first",
            )


def launch_pid(pid_file: Path, launch_id: str) -> int | None:
    """The pid the launch script wrote as `PID LAUNCH_ID`, if it is this launch's."""
    try:
        fields = pid_file.read_text(encoding="utf-8").split()
    except OSError:
        return None
    if len(fields) == 2 and fields[1] == launch_id and fields[0].isdigit():
        return int(fields[0])
    return None


def process_start(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a live process, None if there is none."""
    stat = _stat(pid)
    if stat is None or stat[0] == "Z":
        return None
    return int(stat[19])


def session_members(sids: Collection[int]) -> list[int]:
    """Pids of the live (not zombie) processes whose Unix session is one of `sids`."""
    if not sids:
        return []
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and int(stat[3]) in sids and stat[0] != "Z":
                members.append(int(entry.name))
    return members


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from the state on (field 3 is index 0)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _lock(fd: int, path: Path) -> None:
    """Take the exclusive flock, waiting up to LOCK_WAIT_S for another launch to finish."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise StepFailed(
                    f"another launch has held {path} for over {LOCK_WAIT_S:.0f}s",
                    "look for a stuck `agent exec` process on the box",
                ) from None
            time.sleep(0.05)
