"""One link for a whole simulated box: TCP proxies on loopback that share one token bucket.

Every server the bench runs (package index, git, GCS emulator, rclone's HTTP remote, the step
cache) sits behind `Shaper.front(port)`, a proxy on its own port; all bytes any proxy forwards
towards the box draw from one token bucket (and all it forwards from the box from another), so
the box sees one aggregate bandwidth, as a rented machine's NIC gives it, whichever service a
step talks to. Bytes are counted per service, so a run can say what crossed the link.

Hand-written because nothing at hand shapes the sum of several services on loopback without
side effects: `tc` on `lo` needs root and would slow every other process on this shared
machine (and other helpers' tests); `trickle` shapes one process at a time, not a box; toxiproxy
and the like are extra daemons that pace each proxy on its own, not one link.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

#: The size of one forwarded chunk: small enough that streams interleave fairly at 40 MB/s.
CHUNK = 64 * 1024


class TokenBucket:
    """`rate` bytes per second with a burst of `burst` bytes, shared by every caller."""

    def __init__(self, rate: float, burst: int = 256 * 1024) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Block until `n` bytes may pass (every caller pays in the order it asked)."""
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            # In debt: the caller sleeps until its bytes are paid, holding the lock, so that
            # later callers queue behind it instead of overtaking (a FIFO link).
            if self._tokens < 0:
                time.sleep(-self._tokens / self.rate)
                self._tokens = 0.0
                self._stamp = time.monotonic()


class Shaper:
    """Proxies sharing one link; `front()` each backend port, then use the returned port.

    The link is full duplex, as a NIC is: what the box receives draws from `down`, what it
    sends (requests, cache uploads) from `up`, both at `rate`. `received` and `sent` count the
    bytes per backend name."""

    def __init__(self, rate: float) -> None:
        self.down = TokenBucket(rate)
        self.up = TokenBucket(rate)
        self.received: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()
        self._count_lock = threading.Lock()
        self._listeners: list[socket.socket] = []
        self._closing = threading.Event()

    def set_rate(self, rate: float) -> None:
        """Change the link's bandwidth (0: unlimited, for setting the world up)."""
        self.down.rate = self.up.rate = rate

    def front(self, backend_port: int, name: str) -> int:
        """A new proxy for 127.0.0.1:`backend_port`; returns the port it listens on."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        self._listeners.append(listener)
        threading.Thread(
            target=self._accept, args=(listener, backend_port, name), daemon=True
        ).start()
        return int(listener.getsockname()[1])

    def reset_counts(self) -> None:
        with self._count_lock:
            self.received.clear()
            self.sent.clear()

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(received, sent) bytes per backend name since the last reset."""
        with self._count_lock:
            return dict(self.received), dict(self.sent)

    def close(self) -> None:
        self._closing.set()
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.close()

    def _accept(self, listener: socket.socket, backend_port: int, name: str) -> None:
        while not self._closing.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(
                target=self._connection, args=(client, backend_port, name), daemon=True
            ).start()

    def _connection(self, client: socket.socket, backend_port: int, name: str) -> None:
        try:
            backend = socket.create_connection(("127.0.0.1", backend_port))
        except OSError:
            client.close()
            return
        for sock in (client, backend):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream = threading.Thread(
            target=self._pump, args=(client, backend, self.up, self.sent, name), daemon=True
        )
        upstream.start()
        self._pump(backend, client, self.down, self.received, name)
        upstream.join()
        client.close()
        backend.close()

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        bucket: TokenBucket,
        counter: Counter[str],
        name: str,
    ) -> None:
        try:
            while True:
                data = src.recv(CHUNK)
                if not data:
                    break
                bucket.take(len(data))
                # Counted before it is sent: counted after, a client that has read the last
                # byte could read the counts a chunk short (the test of the link did, under load).
                with self._count_lock:
                    counter[name] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            # Half-close: the other direction may still carry a response.
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with contextlib.suppress(OSError):
                src.shutdown(socket.SHUT_RD)


@contextlib.contextmanager
def shaped(rate: float) -> Iterator[Shaper]:
    """A Shaper for the duration of a `with` block."""
    shaper = Shaper(rate)
    try:
        yield shaper
    finally:
        shaper.close()
