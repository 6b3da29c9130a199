"""How the controller reaches a box: run a command with bytes on stdin, or stream its output.

`ssh.py` uses the OpenSSH client (measured faster than paramiko for the exec path, and it honours
~/.ssh/config, ProxyJump and ControlMaster for free); `local.py` runs on this machine.
"""

from __future__ import annotations

import subprocess
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


class Transport(Protocol):
    """A connection to one box."""

    name: str

    def run(self, command: str, stdin: bytes = b"", timeout: float = 60) -> Result:
        """Run a shell command on the box; raises TargetError when the box is unreachable."""
        ...

    def stream(self, command: str, stdin: bytes = b"") -> subprocess.Popen[bytes]:
        """Start a shell command whose stdout the caller reads line by line."""
        ...

    def check_stream(self, proc: subprocess.Popen[bytes], stderr: str) -> None:
        """Raise TargetError if a finished stream failed for connection reasons."""
        ...

    def interactive_argv(self, command: str) -> list[str]:
        """argv that runs `command` on the box attached to this terminal (with a pty)."""
        ...

    def open_early(self) -> None:
        """Start connecting now, in the background, so that the handshake overlaps the
        controller's own work (loading and resolving the playbook); commands wait for it."""
        ...


def for_host(host: Host, accept_new_host_key: bool = False, auth_wait: float = 0.0) -> Transport:
    """The transport that reaches a host (no connection is made yet); `auth_wait`: seconds to
    keep retrying a refused key (a new vast.ai box installs it a little after it answers)."""
    if host.connection == "local":
        from provision.transport.local import LocalTransport

        return LocalTransport(host.name)
    from provision.transport.ssh import SSHTransport

    return SSHTransport(host, accept_new_host_key, auth_wait)
