"""The `local` target: the box is this machine, reached without SSH."""

from __future__ import annotations

import os
import subprocess

from provision.errors import TargetError
from provision.transport import Result, Stream


class LocalTransport:
    """Runs commands with `sh -c` on this machine."""

    def __init__(self, name: str = "local", env: dict[str, str] | None = None) -> None:
        self.name = name
        self.env = env

    def run(self, command: str, stdin: bytes = b"", timeout: float = 60) -> Result:
        try:
            proc = subprocess.run(
                ["sh", "-c", command],
                input=stdin,
                capture_output=True,
                timeout=timeout,
                env=self.env,
                cwd=os.path.expanduser("~"),
            )
        except subprocess.TimeoutExpired:
            raise TargetError(f"{self.name}: command timed out after {timeout:.0f}s") from None
        return Result(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))

    def stream(self, command: str, stdin: bytes = b"") -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["sh", "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=os.path.expanduser("~"),
        )
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
        return proc

    def check_stream(self, proc: Stream, stderr: str) -> None:
        return None

    def open_early(self) -> None:
        """Nothing to open: the box is this machine."""

    def interactive(self, command: str) -> int:
        return subprocess.call(["sh", "-c", command])

    def forget_host_key(self) -> bool:
        """No key: nothing to forget."""
        return False
