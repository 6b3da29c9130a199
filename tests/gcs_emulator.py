"""The GCS emulator for tests and benches: in this process, or as a subprocess that can be paused.

gcp-storage-emulator is single-threaded plain http: keep objects small, and never use gsutil
against it (gsutil only talks https and hangs in retries).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def client(endpoint: str) -> Any:
    """An anonymous client for the emulator at `endpoint`."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project="test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": endpoint},
    )


def upload(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    """Create `bucket` (unless it exists) holding `objects`."""
    gcs = client(endpoint)
    target = gcs.lookup_bucket(bucket) or gcs.create_bucket(bucket)
    for name, content in objects.items():
        target.blob(name).upload_from_string(content)


@contextmanager
def in_process() -> Iterator[tuple[Any, str]]:
    """An in-memory emulator on a free port in this process: yields (server, endpoint)."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def corrupt(server: Any, bucket: str, name: str) -> None:
    """Flip one byte of a stored object, keeping its listed size and checksums."""
    storage = server._storage
    path = storage._object_path(bucket, name)
    content = bytearray(storage._store.read_bytes(path))
    content[len(content) // 2] ^= 0xFF
    storage._store.write_bytes(path, bytes(content))


#: Runs the emulator as GCS serves: a thread per request, a deep accept queue, keep-alive, and
#: optionally each response paced to EMULATOR_STREAM_BPS bytes/s (one stream's bandwidth).
_THREADED = """
import http.server, os, sys, time
class Threaded(http.server.ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True
http.server.HTTPServer = Threaded
from gcp_storage_emulator import server
server.RequestHandler.protocol_version = "HTTP/1.1"  # keep-alive: it always sends Content-Length
rate = int(os.environ.get("EMULATOR_STREAM_BPS") or 0)
class Paced:
    def __init__(self, raw):
        self.raw = raw
    def write(self, data):
        view = memoryview(data)
        for i in range(0, len(view), 1 << 18):
            self.raw.write(view[i : i + (1 << 18)])
            time.sleep(len(view[i : i + (1 << 18)]) / rate)
        return len(view)
    def __getattr__(self, name):
        return getattr(self.raw, name)
if rate:
    plain_setup = server.RequestHandler.setup
    def setup(self):
        plain_setup(self)
        self.wfile = Paced(self.wfile)
    server.RequestHandler.setup = setup
from gcp_storage_emulator.__main__ import main
main(sys.argv[1:])
"""


class EmulatorProcess:
    """The emulator as a subprocess, so a test can freeze it (SIGSTOP) mid-transfer.

    The stock emulator serves one request at a time from an accept queue of 5 (more concurrent
    connections wait for a SYN retry, about 1 s) and closes each connection after one request;
    `threaded` serves requests in parallel over kept-alive connections, each response paced to
    `stream_bytes_per_s` when given (as one stream from GCS is limited, but many are not).
    """

    def __init__(self, threaded: bool = False, stream_bytes_per_s: int = 0) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        main = ["-c", _THREADED] if threaded else ["-m", "gcp_storage_emulator"]
        start = [sys.executable, *main, "start", "--in-memory", "--quiet"]
        self.proc = subprocess.Popen(
            [*start, "--host", "127.0.0.1", "--port", str(self.port)],
            env={**os.environ, "EMULATOR_STREAM_BPS": str(stream_bytes_per_s)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port)
        except OSError:
            self.stop()
            raise

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.proc.terminate()
        self.proc.wait(10)


def pi05_like(big_bytes: int, small_bytes: int = 40_000, shards: int = 14) -> dict[str, bytes]:
    """Objects shaped like gs://openpi-assets/checkpoints/pi05_base (Orbax OCDBT), 20 in all."""
    base = "checkpoints/pi05_base/params/"
    objects = {
        base + "_METADATA": b'{"tree_metadata": {}}',
        base + "_sharding": b"{}",
        base + "commit_success.txt": b"Checkpoint commit was successful to gs://...",
        base + "manifest.ocdbt": os.urandom(120),
        base + "ocdbt.process_0/manifest.ocdbt": os.urandom(200),
        base + "ocdbt.process_0/d/big0000000000000000000000000000": os.urandom(big_bytes),
    }
    for i in range(shards):
        objects[base + f"ocdbt.process_0/d/{i:032x}"] = os.urandom(small_bytes + 1000 * i)
    return objects
