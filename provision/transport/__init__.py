"""How the controller reaches a box: run a command with bytes on stdin, or stream its output.

`for_host` is the one place that picks a transport: `ssh.py` uses the OpenSSH client (measured
faster than paramiko for the exec path, and it honours ~/.ssh/config, ProxyJump and
ControlMaster for free); `paramiko_ssh.py` speaks SSH through Fabric/paramiko, for a host with
`connection: paramiko` and for every SSH host when this machine has no `ssh` binary;
`local.py` runs on this machine. Each module is imported only when a host needs it (paramiko
costs ~140 ms to import).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from provision.inventory import Host


@dataclass
class Result:
    """A finished remote command."""

    rc: int
    stdout: bytes
    stderr: str


class Readable(Protocol):
    """The output side of a running command."""

    def readline(self) -> bytes:
        """The next line, with its newline; b"" at the end."""
        ...

    def read(self) -> bytes:
        """Everything up to the end."""
        ...


class Stream(Protocol):
    """A command running on the box, as a `subprocess.Popen` is (OpenSSH gives one)."""

    @property
    def stdout(self) -> Readable | None:
        """Its standard output, read as it comes."""
        ...

    @property
    def stderr(self) -> Readable | None:
        """Its standard error, read once it ended."""
        ...

    @property
    def returncode(self) -> int | None:
        """Its exit status once it ended (255: the transport failed, as ssh reports it)."""
        ...

    def poll(self) -> int | None:
        """The exit status if it ended, else None."""
        ...

    def wait(self) -> int:
        """Wait until it ended; its exit status."""
        ...

    def terminate(self) -> None:
        """Stop following it (the remote command ends with the channel)."""
        ...


class Transport(Protocol):
    """A connection to one box."""

    name: str

    def run(self, command: str, stdin: bytes = b"", timeout: float = 60) -> Result:
        """Run a shell command on the box; raises TargetError when the box is unreachable."""
        ...

    def stream(self, command: str, stdin: bytes = b"") -> Stream:
        """Start a shell command whose stdout the caller reads line by line."""
        ...

    def check_stream(self, proc: Stream, stderr: str) -> None:
        """Raise TargetError if a finished stream failed for connection reasons."""
        ...

    def interactive(self, command: str) -> int:
        """Run `command` on the box attached to this terminal (with a pty); its exit status."""
        ...

    def open_early(self) -> None:
        """Start connecting now, in the background, so that the handshake overlaps the
        controller's own work (loading and resolving the playbook); commands wait for it."""
        ...

    def forget_host_key(self) -> bool:
        """Forget the box's trusted host key; True when one was stored."""
        ...


def kind_of(host: Host) -> str:
    """Which transport reaches `host`: 'local', 'openssh' or 'paramiko' (an SSH host, when
    this machine has no OpenSSH client)."""
    if host.connection == "local":
        return "local"
    if host.connection == "paramiko" or shutil.which("ssh") is None:
        return "paramiko"
    return "openssh"


def for_host(host: Host, accept_new_host_key: bool = False, auth_wait: float = 0.0) -> Transport:
    """The transport that reaches a host (no connection is made yet); `accept_new_host_key`
    forgets the key trusted for it first; `auth_wait`: seconds to keep retrying a refused key
    (a new vast.ai box installs it a little after it answers)."""
    kind = kind_of(host)
    if kind == "local":
        from provision.transport.local import LocalTransport

        return LocalTransport(host.name)
    if kind == "paramiko":
        from provision.transport.paramiko_ssh import ParamikoTransport

        return ParamikoTransport(host, accept_new_host_key, auth_wait)
    from provision.transport.ssh import SSHTransport

    return SSHTransport(host, accept_new_host_key, auth_wait)
