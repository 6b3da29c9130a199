"""SSH to a box with the OpenSSH client.

- Host keys: trust on first use into bootstrap's own known_hosts (`StrictHostKeyChecking
  accept-new`), keyed by host and port; a changed key is refused with the command that forgets it.
- A silently dead link is noticed in ~10 s: ConnectTimeout 5, ServerAlive every 2 s, 3 misses.
- ControlMaster keeps one connection per box for 60 s, so follow-up commands cost one channel
  open instead of a handshake.
- BatchMode: never a password prompt; the user's ~/.ssh/config (aliases, IdentityFile,
  ProxyJump) still applies.
"""

from __future__ import annotations

import re
import subprocess

from provision.errors import HostKeyError, TargetError
from provision.home import control_dir, known_hosts
from provision.inventory import Host
from provision.transport import Result

#: ssh exits 255 for its own errors; these stderr fragments say which.
_UNREACHABLE = (
    "Connection refused",
    "Connection timed out",
    "No route to host",
    "Could not resolve hostname",
    "Network is unreachable",
    "Connection closed by",
    "Connection reset by",
    "Timeout, server",
    "Broken pipe",
    "kex_exchange_identification",
    "Operation timed out",
)


class SSHTransport:
    """A box reached over SSH."""

    def __init__(self, host: Host, accept_new_host_key: bool = False) -> None:
        self.host = host
        self.name = host.name
        if accept_new_host_key:
            forget_host_key(host)

    def base_argv(self, tty: bool = False) -> list[str]:
        h = self.host
        argv = [
            "ssh",
            "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={known_hosts()}",
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", "ConnectTimeout=5",
            "-o", "ServerAliveInterval=2",
            "-o", "ServerAliveCountMax=3",
            "-o", "ControlMaster=auto",
            "-o", f"ControlPath={control_dir()}/%C",
            "-o", "ControlPersist=60",
            "-o", "LogLevel=ERROR",
        ]  # fmt: skip
        argv.append("-t" if tty else "-T")
        if h.port:
            argv += ["-p", str(h.port)]
        if h.user:
            argv += ["-l", h.user]
        if h.key:
            argv += ["-i", h.key, "-o", "IdentitiesOnly=yes"]
        argv += h.ssh_options
        argv.append(h.host or h.name)
        return argv

    def run(self, command: str, stdin: bytes = b"", timeout: float = 60) -> Result:
        try:
            proc = subprocess.run(
                [*self.base_argv(), command], input=stdin, capture_output=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            raise TargetError(
                f"{self.name}: unreachable (no answer within {timeout:.0f}s)"
            ) from None
        stderr = proc.stderr.decode("utf-8", "replace")
        if proc.returncode == 255:
            raise connection_error(self.host, stderr)
        return Result(proc.returncode, proc.stdout, stderr)

    def stream(self, command: str, stdin: bytes = b"") -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [*self.base_argv(), command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdin is not None
        try:
            proc.stdin.write(stdin)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        return proc

    def check_stream(self, proc: subprocess.Popen[bytes], stderr: str) -> None:
        if proc.returncode == 255:
            raise connection_error(self.host, stderr)

    def interactive_argv(self, command: str) -> list[str]:
        return [*self.base_argv(tty=True), command]


def connection_error(host: Host, stderr: str) -> TargetError:
    """The one-line error for an ssh failure (exit 255)."""
    text = " ".join(stderr.split())
    if (
        "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr
        or "Host key verification failed" in stderr
    ):
        return HostKeyError(
            f"{host.name}: the host key of {host.address} changed since it was first trusted "
            f"(vast.ai reuses addresses). If the box was replaced, run: bootstrap forget {_forget_arg(host)} "
            "(or pass --accept-new-host-key)"
        )
    if "Permission denied" in stderr:
        key = host.key or "your default ssh keys"
        return TargetError(
            f"{host.name}: authentication failed for {host.address} with {key} "
            "(a new vast.ai box may still be installing your key: retry in a minute)"
        )
    for fragment in _UNREACHABLE:
        if fragment in stderr:
            return TargetError(f"{host.name}: unreachable ({host.address}): {fragment.lower()}")
    if not text:
        # ssh reports a dead link ("Timeout, server not responding") below LogLevel=ERROR.
        return TargetError(f"{host.name}: unreachable ({host.address}): the connection was lost")
    return TargetError(f"{host.name}: ssh to {host.address} failed: {text[-200:]}")


def _forget_arg(host: Host) -> str:
    return f"{host.host}:{host.port}" if host.port else str(host.host)


def forget_host_key(host: Host) -> bool:
    """Remove a host's key from bootstrap's known_hosts; True when one was removed."""
    entry = f"[{host.host}]:{host.port}" if host.port and host.port != 22 else str(host.host)
    path = known_hosts()
    if not path.exists():
        return False
    proc = subprocess.run(
        ["ssh-keygen", "-R", entry, "-f", str(path)], capture_output=True, text=True
    )
    old = path.with_name(path.name + ".old")
    old.unlink(missing_ok=True)
    return proc.returncode == 0 and "updated" in proc.stdout + proc.stderr


def parse_forget_target(text: str) -> Host:
    """`HOST[:PORT]` as given to `bootstrap forget`."""
    match = re.match(r"^(?:[^@]+@)?(\[[^\]]+\]|[^:]+)(?::(\d+))?$", text.strip())
    if not match:
        raise TargetError(f"cannot parse '{text}' as HOST[:PORT]")
    host, port = match.groups()
    return Host(name=text, host=host.strip("[]"), port=int(port) if port else None)
