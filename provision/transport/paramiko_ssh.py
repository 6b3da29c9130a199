"""SSH to a box through Fabric/paramiko: for `connection: paramiko`, and for every SSH host on a
controller without the OpenSSH client. It runs the same agent protocol as `ssh.py`, with the
same policy:

- Host keys: trust on first use into bootstrap's own known_hosts (`known_hosts.py`: the same
  file and format the OpenSSH path writes, keyed by host and port); a changed key, or a key of
  another type than the one trusted, is refused with the command that forgets it.
- A silently dead link is noticed in under 10 s: a keepalive every second that wants a reply
  (paramiko's own wants none, so it never notices: TESTBED.md) closes the transport when none
  comes for 5 s, which ends every channel on it; the socket's `TCP_USER_TIMEOUT` (5 s) aborts
  it too when the kernel's packets go unacknowledged. A new connection gives up after 4 s (TCP
  connect, banner, authentication, channel open).
- One connection per transport, reused by every command of this process (there is no
  ControlMaster to share across processes); `open_early` starts its handshake in a thread.
- Fabric resolves the user's ~/.ssh/config (HostName, Port, User, IdentityFile, ProxyJump);
  every jump host gets the same host-key policy. Without a `key`, the agent and the default
  keys are offered, as the OpenSSH client does.
- stdin (plan and secrets) is written to the channel; nothing of it reaches argv or a log.
- An authentication failure is retried with backoff for `auth_wait` seconds, then explained.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import select
import shutil
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import paramiko
from fabric import Config, Connection

from provision.errors import ProvisionError, TargetError
from provision.home import known_hosts
from provision.inventory import Host
from provision.transport import Result, Stream
from provision.transport import known_hosts as trusted
from provision.transport.failures import auth_failed, host_key_changed, unreachable

if TYPE_CHECKING:
    from collections.abc import Iterator

#: Seconds for each phase of a new connection (TCP connect, banner, auth, channel open).
CONNECT_TIMEOUT = 4
#: Seconds between keepalives, and seconds without a reply to one before the link is given up:
#: a dead link is noticed within about KEEPALIVE + DEAD_AFTER seconds (OpenSSH here: 4 missed
#: keepalives 1 s apart). The kernel gives up on unacknowledged data after USER_TIMEOUT_MS.
KEEPALIVE = 1
DEAD_AFTER = 5
USER_TIMEOUT_MS = 5000
_CHUNK = 65536

# paramiko logs its handshake at INFO and its failures at ERROR, which Python's last-resort
# handler would print to the terminal: bootstrap says one line of its own instead (a debug log
# configured at the root still gets paramiko's warnings).
_LOG = logging.getLogger("paramiko")
_LOG.setLevel(logging.WARNING)
_LOG.addHandler(logging.NullHandler())


class _TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    """A host with no key on file: trust the one it shows, into bootstrap's known_hosts.
    (A host with a key on file never gets here: paramiko compares and raises BadHostKey.)"""

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        trusted.add(known_hosts(), hostname, key.get_name(), key.get_base64())
        client.get_host_keys().add(hostname, key.get_name(), key)


def _secure(connection: Connection) -> None:
    """Give a Fabric connection (and each jump host before it) bootstrap's host-key policy:
    Fabric's own is to add any key silently."""
    hop: Any = connection
    while isinstance(hop, Connection):
        client = hop.client
        client.set_missing_host_key_policy(_TrustOnFirstUse())
        path = known_hosts()
        if path.exists():
            client.load_host_keys(str(path))
        hop = hop.gateway


def _config() -> Config:
    """Fabric's config: ~/.ssh/config read, every phase of a connection bounded (jump hosts
    included, which Fabric builds from this config)."""
    timeouts = {"banner_timeout": CONNECT_TIMEOUT, "auth_timeout": CONNECT_TIMEOUT}
    return Config(
        overrides={
            "timeouts": {"connect": CONNECT_TIMEOUT},
            "connect_kwargs": {**timeouts, "channel_timeout": CONNECT_TIMEOUT},
        }
    )


def _jump(host: Host) -> str | None:
    """The jump host of `-J HOST` or `-o ProxyJump=HOST` among a host's ssh_options; any other
    option is refused (it is the OpenSSH client's: paramiko would silently go without it)."""
    jump = None
    words = iter(host.ssh_options)
    for word in words:
        value = word[2:] or next(words, "") if word.startswith(("-J", "-o")) else ""
        if word.startswith("-J"):
            jump = value
        elif word.startswith("-o") and value.lower().startswith("proxyjump="):
            jump = value.split("=", 1)[1]
        else:
            raise TargetError(
                f"{host.name}: ssh_options {' '.join(host.ssh_options)!r} are OpenSSH options; "
                "over paramiko only -J / ProxyJump applies (set connection: ssh, or drop them)"
            )
    return jump


def connection_for(host: Host) -> Connection:
    """The Fabric connection for a host (not opened): what ~/.ssh/config says about it, the
    host's own user, port, key and jump host winning."""
    config = _config()
    connect_kwargs: dict[str, Any] = dict(config.connect_kwargs)
    if host.key:
        # As IdentitiesOnly=yes: this key alone.
        key = os.path.expanduser(host.key)
        connect_kwargs.update(key_filename=[key], look_for_keys=False, allow_agent=False)
    gateway: Any = None
    jump = _jump(host)
    if jump and jump != "none":
        for hop in jump.split(","):
            gateway = Connection(hop, config=config, gateway=gateway or False)
    elif jump == "none":
        gateway = False
    connection = Connection(
        host.host or host.name,
        user=host.user,
        port=host.port,
        config=config,
        gateway=gateway,
        connect_kwargs=connect_kwargs,
    )
    _secure(connection)
    return connection


class ParamikoTransport:
    """A box reached over SSH through paramiko."""

    def __init__(
        self, host: Host, accept_new_host_key: bool = False, auth_wait: float = 0.0
    ) -> None:
        self.host = host
        self.name = host.name
        self.auth_wait = auth_wait
        self._lock = threading.Lock()
        self._connection: Connection | None = None
        _jump(host)  # options it cannot honour are refused now, before any connection
        if accept_new_host_key:
            self.forget_host_key()

    # -------------------------------------------------------------------- the connection

    def trusted_as(self) -> tuple[str, int]:
        """The address and port the box's key is filed under (after ~/.ssh/config)."""
        connection = connection_for(self.host)
        return connection.host, int(connection.port)

    def forget_host_key(self) -> bool:
        address, port = self.trusted_as()
        return trusted.remove(known_hosts(), trusted.entry_name(address, port))

    def open_early(self) -> None:
        threading.Thread(target=self._open_quietly, name=f"ssh-{self.name}", daemon=True).start()

    def _open_quietly(self) -> None:
        # A failure is not reported here: the command that needs the box tries again and says.
        with contextlib.suppress(ProvisionError):
            self._transport()

    def _transport(self) -> paramiko.Transport:
        """The live SSH transport to the box, connecting (again) when there is none."""
        with self._lock:
            current = self._connection
            if current is not None and current.transport is not None:
                if current.transport.is_active():
                    live: paramiko.Transport = current.transport
                    return live
                current.close()
            self._connection = self._connect()
            opened: paramiko.Transport = self._connection.transport
            return opened

    def _connect(self) -> Connection:
        start = time.monotonic()
        delay = 1.0
        while True:
            connection = connection_for(self.host)
            try:
                connection.open()
            except paramiko.AuthenticationException:
                connection.close()
                waited = time.monotonic() - start
                if waited >= self.auth_wait:
                    # The wait asked for, not the time measured (as ssh.py says it).
                    raise auth_failed(self.host, _keys(self.host), self.auth_wait or None) from None
                time.sleep(min(delay, self.auth_wait - waited))
                delay = min(delay * 2, 10.0)
                continue
            except paramiko.BadHostKeyException:
                connection.close()
                raise host_key_changed(self.host, connection.host, int(connection.port)) from None
            except Exception as exc:
                connection.close()
                raise _connect_error(self.host, exc) from None
            _watch_link(connection)
            return connection

    def _channel(self, command: str, pty: bool = False) -> paramiko.Channel:
        transport = self._transport()
        try:
            channel = transport.open_session(timeout=CONNECT_TIMEOUT)
            if pty:
                width, height = shutil.get_terminal_size()
                channel.get_pty(os.environ.get("TERM", "vt100"), width, height)
            channel.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise _connect_error(self.host, exc) from None
        return channel

    # -------------------------------------------------------------------- commands

    def run(self, command: str, stdin: bytes = b"", timeout: float = 60) -> Result:
        proc = ChannelProcess(self._channel(command), stdin)
        out: list[bytes] = []
        reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
        reader.start()
        reader.join(timeout)
        if reader.is_alive():
            proc.terminate()
            raise TargetError(f"{self.name}: unreachable (no answer within {timeout:.0f}s)")
        rc = proc.wait()
        stderr = proc.stderr.read().decode("utf-8", "replace")
        self.check_stream(proc, stderr)
        return Result(rc, b"".join(out), stderr)

    def stream(self, command: str, stdin: bytes = b"") -> Stream:
        return ChannelProcess(self._channel(command), stdin)

    def check_stream(self, proc: Stream, stderr: str) -> None:
        if isinstance(proc, ChannelProcess) and proc.lost:
            raise unreachable(self.host, "the connection was lost")

    def interactive(self, command: str) -> int:
        channel = self._channel(command, pty=sys.stdin.isatty())
        with _raw_terminal():
            _bridge(channel)
        return channel.recv_exit_status()


class ChannelProcess:
    """A command on an SSH channel, read as a `subprocess.Popen` is: stdin written and closed
    in a thread, stderr gathered in another (so that neither fills paramiko's window while the
    caller reads stdout), stdout read by the caller."""

    def __init__(self, channel: paramiko.Channel, stdin: bytes) -> None:
        self.channel = channel
        self.stdout = channel.makefile("rb")
        self._stderr = bytearray()
        self._terminated = False
        self._status: int | None = None
        self._threads = [
            threading.Thread(target=self._write, args=(stdin,), daemon=True),
            threading.Thread(target=self._gather_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            for start in range(0, len(data), _CHUNK):
                self.channel.sendall(data[start : start + _CHUNK])
            self.channel.shutdown_write()

    def _gather_stderr(self) -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            while data := self.channel.recv_stderr(_CHUNK):
                self._stderr += data

    @property
    def stderr(self) -> io.BytesIO:
        """What the command wrote to stderr (all of it, once it ended)."""
        self._threads[1].join(timeout=5)
        return io.BytesIO(bytes(self._stderr))

    @property
    def lost(self) -> bool:
        """Whether the channel ended without an exit status because the link died (not
        because this side closed it, nor because a signal ended the command)."""
        ended = self._status is not None and not self._terminated and not self._exited()
        transport = self.channel.get_transport()
        return ended and (transport is None or not transport.is_active())

    def _exited(self) -> bool:
        # paramiko's exit_status stays -1 when the channel closed without one.
        return self.channel.exit_status != -1

    @property
    def returncode(self) -> int | None:
        return self._status

    def poll(self) -> int | None:
        if self._status is None and self.channel.exit_status_ready():
            self.wait()
        return self._status

    def wait(self) -> int:
        if self._status is None:
            self.channel.recv_exit_status()
            if self._terminated:
                self._status = -signal.SIGTERM
            else:
                # 255 as the OpenSSH client reports a transport failure.
                self._status = self.channel.exit_status if self._exited() else 255
        return self._status

    def terminate(self) -> None:
        self._terminated = True
        self.channel.close()


def _watch_link(connection: Connection) -> None:
    """Notice a dead link to the box (and to each jump host before it, which carries it)."""
    hop: Any = connection
    while isinstance(hop, Connection):
        transport = hop.transport
        if transport is not None:
            sock = transport.sock
            if isinstance(sock, socket.socket) and hasattr(socket, "TCP_USER_TIMEOUT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
            name = f"keepalive-{hop.host}"
            threading.Thread(target=_keepalive, args=(transport,), name=name, daemon=True).start()
        hop = hop.gateway


def _keepalive(transport: paramiko.Transport) -> None:
    """Ask the server for a reply every KEEPALIVE seconds, as OpenSSH's ServerAliveInterval
    does, and close the transport when none comes within DEAD_AFTER: a box whose kernel still
    acknowledges packets but whose sshd no longer answers (stopped, swapping to death) is as
    unreachable as a cut link. (paramiko's own keepalive asks for no reply, so it notices
    neither.) Closing the transport ends every channel on it: a follower reads EOF."""
    while transport.is_active():
        replied = threading.Event()

        def probe(done: threading.Event = replied) -> None:
            with contextlib.suppress(Exception):  # a dying transport raises; is_active says
                transport.global_request("keepalive@openssh.com", wait=True)
            done.set()

        threading.Thread(target=probe, daemon=True).start()
        if not replied.wait(DEAD_AFTER):
            transport.close()
            return
        time.sleep(KEEPALIVE)


def _connect_error(host: Host, exc: BaseException) -> TargetError:
    """A failed connection or channel, as the same words the OpenSSH path uses."""
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        first = next(iter(exc.errors.values()), None)
        why = first.strerror if isinstance(first, OSError) else None
        return unreachable(host, (why or "connection refused").lower())
    if isinstance(exc, socket.gaierror):
        return unreachable(host, "could not resolve hostname")
    if isinstance(exc, TimeoutError):
        return unreachable(host, "connection timed out")
    if isinstance(exc, OSError) and exc.strerror:
        return unreachable(host, exc.strerror.lower())
    text = str(exc).lower()
    if "authentication methods" in text:
        return auth_failed(host, _keys(host), None)
    # 'No existing session': the handshake did not finish within the connect timeout (paramiko
    # then asks the half-made session for the server's key).
    if any(words in text for words in ("banner", "timeout", "timed out", "no existing session")):
        return unreachable(host, "connection timed out")
    return unreachable(host, "the connection was lost")


def _keys(host: Host) -> str:
    """The keys an authentication attempt offered, for the error message."""
    if host.key:
        return host.key
    names = ("id_rsa", "id_ecdsa", "id_ed25519")
    keys = connection_for(host).connect_kwargs.get("key_filename") or [
        os.path.expanduser(f"~/.ssh/{name}") for name in names
    ]
    existing = [k for k in keys if os.path.exists(k)]
    if existing:
        return ", ".join(existing)
    return f"no key ({', '.join(keys)}: none exists)"


@contextlib.contextmanager
def _raw_terminal() -> Iterator[None]:
    """This terminal in raw mode (keys go to the box as typed), restored after."""
    if not sys.stdin.isatty():
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(sys.stdin)
    try:
        tty.setraw(sys.stdin.fileno())
        yield
    finally:
        termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)


def _bridge(channel: paramiko.Channel) -> None:
    """Copy this terminal's input to the channel and its output here until it closes."""
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    reading = True
    while True:
        ready, _, _ = select.select([channel, stdin] if reading else [channel], [], [])
        if channel in ready:
            data = channel.recv(_CHUNK)
            if not data:
                return
            os.write(stdout, data)
        if stdin in ready:
            data = os.read(stdin, _CHUNK)
            if data:
                channel.sendall(data)
            else:
                reading = False
                channel.shutdown_write()
