"""How the controller reaches a box: run a command with bytes on stdin, or stream its output.

`ssh.py` uses the OpenSSH client (measured faster than paramiko for the exec path, and it honours
~/.ssh/config, ProxyJump and ControlMaster for free); `local.py` runs on this machine.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Protocol


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
