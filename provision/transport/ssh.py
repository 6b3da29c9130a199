"""SSH to a box with the OpenSSH client.

- Host keys: trust on first use into bootstrap's own known_hosts (`StrictHostKeyChecking
  accept-new`), keyed by host and port; a changed key is refused with the command that forgets it.
- A silently dead link is noticed in under 10 s: a ControlMaster over it gives up after 4
  unanswered keepalives 1 s apart, then the new connection times out after 4 s.
- ControlMaster keeps one connection per box for 60 s, so follow-up commands cost one channel
  open instead of a handshake.
- `open_early` starts that master's handshake in a thread as soon as the targets are known, so
  it overlaps loading and resolving the playbook; every command waits for it, then rides it.
  For a command line seen before, the master was already started at process start
  (provision/earlyssh.py): `open_early` then waits for that one.
- BatchMode: never a password prompt; the user's ~/.ssh/config (aliases, IdentityFile,
  ProxyJump) still applies, and messages name the address and keys ssh really used (`ssh -G`).
- An authentication failure is retried with backoff for `auth_wait` seconds (a new vast.ai box
  installs the user's key a little after it accepts connections), then explained.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass

from provision import earlyssh
from provision.errors import ProvisionError, TargetError
from provision.home import control_dir, known_hosts
from provision.inventory import Host
from provision.transport import Result, Stream
from provision.transport import known_hosts as trusted
from provision.transport.failures import auth_failed, host_key_changed, unreachable

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


#: Options for every ssh bootstrap runs (the jump host's included).
_OPTIONS = (
    "-o", "BatchMode=yes",
    "-o", "StrictHostKeyChecking=accept-new",
    "-o", "ConnectTimeout=4",
    "-o", "ServerAliveInterval=1",
    "-o", "ServerAliveCountMax=4",
    "-o", "LogLevel=ERROR",
)  # fmt: skip


#: How long a command waits for the early handshake before it dials on its own.
EARLY_WAIT_S = 30.0


class SSHTransport:
    """A box reached over SSH."""

    def __init__(
        self, host: Host, accept_new_host_key: bool = False, auth_wait: float = 0.0
    ) -> None:
        self.host = host
        self.name = host.name
        self.auth_wait = auth_wait
        self._authenticated = False
        self._proxy: list[str] | None = None
        self._early: threading.Thread | None = None
        if accept_new_host_key:
            forget_host_key(host)

    def base_argv(self, tty: bool = False, no_command: bool = False) -> list[str]:
        """ssh's command line up to the destination; `no_command`: `-N`, the connection alone."""
        h = self.host
        argv = [
            "ssh",
            *_OPTIONS,
            "-o", f"UserKnownHostsFile={known_hosts()}",
            "-o", "ControlMaster=auto",
            "-o", f"ControlPath={control_dir()}/%C",
            "-o", "ControlPersist=60",
        ]  # fmt: skip
        if self._proxy is None:
            self._proxy = _proxy_command(effective(h).jump)
        argv += self._proxy
        argv.append("-t" if tty else "-T")
        if no_command:
            argv.append("-N")
        if h.port:
            argv += ["-p", str(h.port)]
        if h.user:
            argv += ["-l", h.user]
        if h.key:
            argv += ["-i", h.key, "-o", "IdentitiesOnly=yes"]
        argv += h.ssh_options
        # `--`: whatever the destination holds, ssh never reads it as an option.
        argv += ["--", h.host or h.name]
        return argv

    def open_early(self) -> None:
        if self._early is None:
            self._early = threading.Thread(target=self._open, name=f"ssh-{self.name}", daemon=True)
            self._early.start()

    def _open(self) -> None:
        # `-N`: the master alone, no session (a `true` would cost the box a shell and a round
        # trip); with ControlPersist, ssh returns once the master listens, or at once when one
        # already does. A failure is not reported here: the command that needs the box tries
        # again and says.
        argv = self.base_argv(no_command=True)
        early = earlyssh.claim(argv)  # the same master, started before the CLI's imports
        # A plain wait, bounded by `_await_early`'s join: `Popen.wait(timeout=)` polls with
        # sleeps that grow to 50 ms, so the first command started up to 50 ms after the master
        # was up (bench/noop_timeline.py: 44 ms between the two, median).
        if early is not None and early.wait() == 0:
            self._authenticated = True
            return
        with contextlib.suppress(ProvisionError):
            if self._ssh(argv, b"", timeout=EARLY_WAIT_S).rc == 0:
                earlyssh.remember(argv)

    def _await_early(self) -> None:
        """Wait for the early handshake: a second client started meanwhile would make its own
        (ControlMaster=auto only rides a master that is already listening). One that hangs
        is waited on for `EARLY_WAIT_S`; then the command dials on its own."""
        early = self._early
        if early is not None and early is not threading.current_thread():
            early.join(timeout=EARLY_WAIT_S)

    def run(self, command: str, stdin: bytes = b"", timeout: float = 60) -> Result:
        self._await_early()
        return self._ssh([*self.base_argv(), command], stdin, timeout)

    def _ssh(self, argv: list[str], stdin: bytes, timeout: float) -> Result:
        """Run ssh, retrying a refused key for `auth_wait` seconds."""
        start = time.monotonic()
        delay = 1.0
        while True:
            try:
                proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise TargetError(
                    f"{self.name}: unreachable (no answer within {timeout:.0f}s)"
                ) from None
            stderr = proc.stderr.decode("utf-8", "replace")
            if proc.returncode != 255:
                self._authenticated = True
                return Result(proc.returncode, proc.stdout, stderr)
            waited = time.monotonic() - start
            if not _auth_failed(stderr) or waited >= self.auth_wait:
                # The wait asked for, not the time measured (its last attempt may end late).
                raise connection_error(self.host, stderr, self.auth_wait or None)
            time.sleep(min(delay, self.auth_wait - waited))
            delay = min(delay * 2, 10.0)

    def stream(self, command: str, stdin: bytes = b"") -> subprocess.Popen[bytes]:
        self._await_early()
        if self.auth_wait and not self._authenticated:
            self.run("true", timeout=30)  # waits out a key still being installed
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

    def check_stream(self, proc: Stream, stderr: str) -> None:
        if proc.returncode == 255:
            raise connection_error(self.host, stderr)

    def interactive_argv(self, command: str) -> list[str]:
        """argv that runs `command` on the box attached to this terminal (with a pty)."""
        self._await_early()
        return [*self.base_argv(tty=True), command]

    def interactive(self, command: str) -> int:
        return subprocess.call(self.interactive_argv(command))

    def forget_host_key(self) -> bool:
        return forget_host_key(self.host)


def _auth_failed(stderr: str) -> bool:
    return "Permission denied" in stderr


def connection_error(host: Host, stderr: str, waited: float | None = None) -> TargetError:
    """The one-line error for an ssh failure (exit 255); `waited`: seconds auth was retried."""
    text = " ".join(stderr.split())
    if (
        "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr
        or "Host key verification failed" in stderr
    ):
        real = effective(host)
        return host_key_changed(host, real.address, real.port)
    if _auth_failed(stderr):
        return auth_failed(host, _keys(host), waited)
    for fragment in _UNREACHABLE:
        if fragment in stderr:
            return unreachable(host, fragment.lower())
    if not text:
        # ssh reports a dead link ("Timeout, server not responding") below LogLevel=ERROR.
        return unreachable(host, "the connection was lost")
    return TargetError(f"{host.name}: ssh to {host.address} failed: {text[-200:]}")


@dataclass(frozen=True)
class Effective:
    """What ssh really uses for a host after ~/.ssh/config."""

    address: str  # the name its key is trusted under (HostKeyAlias, else HostName)
    port: int
    keys: list[str]  # IdentityFile entries, expanded
    jump: str  # ProxyJump, '' when none


def _proxy_command(jump: str) -> list[str]:
    """ssh applies command-line options to the destination only, never to a ProxyJump host
    (which would then be checked against ~/.ssh/known_hosts, interactively): reach the jump
    host through a ProxyCommand that carries bootstrap's options, its TOFU included."""
    if not jump or jump == "none":
        return []
    *earlier, last = jump.split(",")
    inner = ["ssh", *_OPTIONS, "-o", f"UserKnownHostsFile={known_hosts()}", "-W", "[%h]:%p"]
    if earlier:
        inner += ["-J", ",".join(earlier)]
    inner += ["--", last if last.startswith("ssh://") else f"ssh://{last}"]
    return ["-o", "ProxyCommand=" + " ".join(shlex.quote(word) for word in inner)]


def effective(host: Host) -> Effective:
    """Address, port, identity files and jump host ssh really uses for `host`, after
    ~/.ssh/config (`ssh -G`: an alias's HostName, Port, IdentityFile, ProxyJump)."""
    argv = ["ssh", "-G"]
    if host.port:
        argv += ["-p", str(host.port)]
    if host.user:
        argv += ["-l", host.user]
    if host.key:
        argv += ["-i", host.key]
    argv += [*host.ssh_options, "--", host.host or host.name]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    config: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        config.setdefault(key, []).append(value)
    address = config.get("hostkeyalias") or config.get("hostname") or [host.host or host.name]
    ports = config.get("port")
    port = int(ports[0]) if ports else host.port or 22
    keys = list(dict.fromkeys(os.path.expanduser(k) for k in config.get("identityfile", [])))
    return Effective(address[0], port, keys, (config.get("proxyjump") or [""])[0])


def _keys(host: Host) -> str:
    """The keys an authentication attempt offered, for the error message."""
    if host.key:
        return host.key
    keys = [k for k in effective(host).keys if not k.endswith(("_sk", "_xmss", "_dsa"))]
    existing = [k for k in keys if os.path.exists(k)]
    if existing:
        return ", ".join(existing)
    return f"no key ({', '.join(keys) or '~/.ssh/id_*'}: none exists)"


def forget_host_key(host: Host) -> bool:
    """Remove a host's key from bootstrap's known_hosts; True when one was removed."""
    real = effective(host)
    return trusted.remove(known_hosts(), trusted.entry_name(real.address, real.port))


def parse_forget_target(text: str) -> Host:
    """`HOST[:PORT]` as given to `bootstrap forget`."""
    match = re.match(r"^(?:[^@]+@)?(\[[^\]]+\]|[^:]+)(?::(\d+))?$", text.strip())
    if not match:
        raise TargetError(f"cannot parse '{text}' as HOST[:PORT]")
    host, port = match.groups()
    return Host(name=text, host=host.strip("[]"), port=int(port) if port else None)
