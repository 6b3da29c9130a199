"""Throwaway sshd "boxes" on loopback: simulated rented GPU boxes for end-to-end tests.

A box is an sshd of its own on 127.0.0.N and a free port, with its own host key, unix user and
HOME. The user has uid 0 (`useradd -o -u 0`), so a box is root like a vast.ai box: apt, dpkg and
root-owned tools work and any python on this machine runs. Everything outside HOME (installed
tools, /tmp, /etc) is shared with the machine; each box gets its own TMPDIR and TMUX_TMPDIR,
because with one shared uid every box's tmux would otherwise meet on the same /tmp/tmux-0 socket.

Which processes belong to a box? The shared uid cannot tell. So each box runs under a small
init (this file run as a script, see `_init_main`): a child subreaper (PR_SET_CHILD_SUBREAPER)
that starts sshd and reaps every orphan, as a container's init does on a real box (this
machine's PID 1 reaps nothing). Every process of the box (sshd, its sessions, `setsid nohup`
jobs, tmux servers) is a descendant of that init, orphans included, so `Box.processes()` walks the
process tree from it. If the test process dies, the init reads EOF on its stdin and kills the box.

No pytest here (fixtures are in conftest.py), so benchmarks can start boxes too:

    key = make_key(Path(tmp) / "id_ed25519")
    with start_box(Path(tmp) / "b1", key, "b1") as box:
        box.ssh("true")
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"  # sshd refuses to start unless called by absolute path
SSH_OPTIONS = (
    "-F", "/dev/null",  # ignore ~/.ssh/config and /etc/ssh/ssh_config: same behaviour everywhere
    "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=no",
    "-o", "UserKnownHostsFile=/dev/null",
    "-o", "LogLevel=ERROR",
    "-o", "IdentitiesOnly=yes",
    "-o", "ConnectTimeout=5",
)  # fmt: skip
USER_PREFIX = "bt"  # box users are bt<pid>_<n>: unique per test process, and sweepable by pid
_box_numbers = itertools.count(1)


def make_key(path: Path, comment: str = "bootstrap-tests") -> Path:
    """Generate an ed25519 key pair without passphrase at `path` (+ `.pub`); return `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path


class BoxCommandError(subprocess.CalledProcessError):
    """A command over ssh failed; the message carries its output and the tail of sshd's log."""

    def __init__(self, result: subprocess.CompletedProcess[str], sshd_log: str) -> None:
        super().__init__(result.returncode, result.args, result.stdout, result.stderr)
        self.sshd_log = sshd_log

    def __str__(self) -> str:
        return (
            f"{super().__str__()}\n--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
            f"--- sshd log (tail)\n{self.sshd_log}"
        )


@dataclass
class Box:
    """One simulated box. `root` holds its sshd config, host key, log and TMPDIR (not in HOME, so
    what runs in the box cannot trash them)."""

    name: str
    host: str
    port: int
    user: str
    home: Path
    key: Path
    root: Path
    _init: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def target(self) -> str:
        """`user@host:port`, as the bootstrap CLI takes a target."""
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def host_key(self) -> Path:
        return self.root / "ssh_host_ed25519_key"

    @property
    def log(self) -> Path:
        """sshd's stderr (`-e`), appended to across restarts."""
        return self.root / "sshd.log"

    def inventory_entry(self) -> dict[str, str | int]:
        """This box as a host entry of inventory.yaml."""
        return {"host": self.host, "port": self.port, "user": self.user, "key": str(self.key)}

    def ssh_argv(self, *options: str) -> list[str]:
        """The OpenSSH client command line for this box; append the remote command. Extra
        `options` override `SSH_OPTIONS` (ssh keeps the first value it is given)."""
        return [
            "ssh", *options, *SSH_OPTIONS,
            "-i", str(self.key), "-p", str(self.port), f"{self.user}@{self.host}",
        ]  # fmt: skip

    def ssh(
        self, cmd: str, check: bool = True, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` in the box (no pty, stdin closed) and capture its output as text."""
        result = subprocess.run(
            [*self.ssh_argv(), cmd],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise BoxCommandError(result, self.log_tail())
        return result

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of sshd's log, for failure messages."""
        with contextlib.suppress(FileNotFoundError):
            return "".join(self.log.read_text(errors="replace").splitlines(True)[-lines:])
        return ""

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every live process of the box: sshd, its connections, and
        everything started through them, detached or not. The box's init is not listed."""
        if self._init is None:
            return []
        table = _process_table()
        return [
            (pid, _cmdline(pid))
            for pid in _descendants(self._init.pid, table)
            if table[pid][1] != "Z"
        ]

    def start(self) -> None:
        """Start sshd (again) on the same address, port and host key; return once it listens."""
        if self._sshd_pids():
            return
        assert self._init is not None and self._init.stdin and self._init.stdout, "box is closed"
        offset = self.log.stat().st_size if self.log.exists() else 0
        self._init.stdin.write(b"start\n")
        self._init.stdin.flush()
        reply = self._init.stdout.readline()
        if not reply:
            raise RuntimeError(f"the init of box {self.name} is gone:\n{self.log_tail()}")
        sshd_pid = int(reply)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            new_log = self.log.read_bytes()[offset:].decode(errors="replace")
            if "Server listening on" in new_log:
                return
            if not _alive(sshd_pid):
                if "Address already in use" in new_log:
                    raise PortInUse(f"{self.host}:{self.port} is taken\n{new_log}")
                raise RuntimeError(f"sshd of box {self.name} exited at start:\n{new_log}")
            time.sleep(0.005)
        raise RuntimeError(f"sshd of box {self.name} not listening after 10 s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Kill the box's sshd, its connections included: new connections are refused (an
        outage) while everything else in the box keeps running."""
        self._kill_until_gone(self._sshd_pids)

    def kill_all(self) -> None:
        """SIGKILL every process of the box, sshd included (a crash); returns once all are
        reaped. `start()` brings sshd back."""
        self._kill_until_gone(lambda: [pid for pid, _ in self.processes()])

    def new_host_key(self) -> None:
        """Replace the host key (the box was reinstalled); restarts sshd if it was running."""
        running = bool(self._sshd_pids())
        self.stop()
        self.host_key.unlink()
        Path(f"{self.host_key}.pub").unlink()
        make_key(self.host_key, f"host-{self.name}")
        if running:
            self.start()

    def close(self) -> None:
        """Tear the box down: kill and reap all its processes, remove its user and HOME."""
        try:
            if self._init is not None:
                self.kill_all()
                try:  # EOF on its stdin: the init exits (killing anything left first)
                    self._init.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    self._init.kill()
                    self._init.communicate()
                self._init = None
        finally:
            _remove_user(self.user)
            shutil.rmtree(self.home, ignore_errors=True)

    def __enter__(self) -> Box:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sshd_pids(self) -> list[int]:
        return [pid for pid, _ in self.processes() if _comm(pid) == "sshd"]

    def _kill_until_gone(self, pids_of: Callable[[], list[int]]) -> None:
        # Loop: a process may fork while we kill its parent; the init reaps what we kill.
        deadline = time.monotonic() + 10
        killed: set[int] = set()
        while pids := pids_of():
            if time.monotonic() > deadline:
                raise RuntimeError(f"box {self.name}: processes survive SIGKILL: {pids}")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed.update(pids)
            time.sleep(0.005)
        while killed & _process_table().keys() and time.monotonic() < deadline:
            time.sleep(0.002)  # zombies the init has not reaped yet


class PortInUse(RuntimeError):
    """sshd could not bind its address (another process took the port meanwhile)."""


def start_box(root: Path, client_key: Path, name: str) -> Box:
    """Create user, HOME, host key and sshd config under `root`, start the box and return it
    once sshd listens. `client_key` (private key path) is authorized for the box's user."""
    n = next(_box_numbers)
    pid = os.getpid()
    # Each test process draws addresses from its own block of 16 (several run at once here).
    host = f"127.0.0.{2 + (pid % 15) * 16 + n % 16}"
    user = f"{USER_PREFIX}{pid}_{n}"
    home = root / "home"
    (home / ".ssh").mkdir(parents=True)
    (root / "tmp").mkdir()
    shutil.copyfile(f"{client_key}.pub", home / ".ssh" / "authorized_keys")
    box = Box(name=name, host=host, port=0, user=user, home=home, key=client_key, root=root)
    try:
        with box.log.open("ab") as log:
            box._init = subprocess.Popen(
                [sys.executable, __file__, SSHD, "-D", "-e", "-f", str(root / "sshd_config")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,  # a Ctrl-C on the terminal is pytest's, not the box's
            )
        # While the init's python starts up:
        make_key(box.host_key, f"host-{name}")
        _add_user(user, home)
        for attempt in itertools.count(1):
            box.port = _free_port(host)
            _write_sshd_config(box)
            try:
                box.start()
                return box
            except PortInUse:  # someone took the port between _free_port and sshd's bind
                if attempt == 3:
                    raise
    except BaseException:
        box.close()
        raise
    raise AssertionError("unreachable: itertools.count never ends")


def _write_sshd_config(box: Box) -> None:
    tmp = box.root / "tmp"
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    (box.root / "sshd_config").write_text(
        f"ListenAddress {box.host}:{box.port}\n"
        f"HostKey {box.host_key}\n"
        f"PidFile {box.root / 'sshd.pid'}\n"
        "UsePAM no\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n"
        "StrictModes no\n"  # HOME lives in pytest's tmp dir, not owned the way sshd wants
        "AuthorizedKeysFile .ssh/authorized_keys\n"
        "Subsystem sftp internal-sftp\n"
        f"SetEnv TMPDIR={tmp} TMUX_TMPDIR={tmp}\n"
        # Defaults (10 unauthenticated, 10 sessions per connection) drop parallel test traffic.
        "MaxStartups 200\n"
        "MaxSessions 200\n"
    )


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _add_user(user: str, home: Path) -> None:
    _user_cmd(
        ["useradd", "-o", "-u", "0", "-g", "0", "-M", "-d", str(home), "-s", "/bin/bash", user]
    )
    _user_cmd(["usermod", "-p", "*", user])  # useradd leaves the account locked


def _remove_user(user: str) -> None:
    # -f: userdel otherwise refuses, since uid 0 always has running processes. No -r: the
    # caller removes HOME itself. Failure is tolerated: a leftover entry is swept later.
    with contextlib.suppress(RuntimeError):
        _user_cmd(["userdel", "-f", user])


def _user_cmd(argv: list[str]) -> None:
    # useradd & co. fail at once when another process holds /etc/passwd's lock: retry.
    deadline = time.monotonic() + 15
    while True:
        result = subprocess.run(argv, capture_output=True, text=True)
        if result.returncode == 0:
            return
        if "lock" not in result.stderr or time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
        time.sleep(0.05)


def sweep_stale_users() -> None:
    """Remove box users left by test processes that died without teardown."""
    for line in Path("/etc/passwd").read_text().splitlines():
        match = re.match(rf"({USER_PREFIX}(\d+)_\d+):", line)
        if match and not Path(f"/proc/{match[2]}").exists():
            _remove_user(match[1])


def run_cli(
    args: Sequence[str], *, env: Mapping[str, str], timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the bootstrap CLI (`python -m provision ARGS`, as the console script) as a
    subprocess, output as text."""
    return subprocess.run(
        [sys.executable, "-m", "provision", *args],
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- the process table ----------------------------------------------------------------------


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process on the machine."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]  # comm may hold spaces and ")"
        table[int(entry.name)] = (int(ppid), state)
    return table


def _descendants(root: int, table: dict[int, tuple[int, str]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _comm(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip()
    return ""


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    return ""


# --- the box's init (this file run as a script) --------------------------------------------

PR_SET_CHILD_SUBREAPER = 36


def _init_main(sshd_argv: list[str]) -> None:
    """Reap every orphan of the box; on each `start` line from stdin start sshd and print its
    pid; on EOF kill every process of the box and exit."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    wake_r, wake_w = os.pipe()  # SIGCHLD writes here, so select() wakes when a child exits
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while True:
        ready, _, _ = select.select([0, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
        _reap()
        if 0 in ready:
            commands = os.read(0, 4096)
            if not commands:
                break
            for _ in range(commands.count(b"start\n")):
                pid = os.posix_spawn(sshd_argv[0], sshd_argv, os.environ)
                os.write(1, f"{pid}\n".encode())
    while pids := _descendants(os.getpid(), _process_table()):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)
        _reap()


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


if __name__ == "__main__":
    _init_main(sys.argv[1:])
