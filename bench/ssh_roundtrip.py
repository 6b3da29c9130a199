"""No-op SSH round trips to a loopback test box, per transport, to choose the exec path.

Run as root (box users are uid 0): `python bench/ssh_roundtrip.py [-n 10]`. Prints medians (and
minimums) in ms of: starting and closing a box; `ssh box true` with the OpenSSH client, at its
default key exchange and at curve25519 (paramiko's); the same through a warm ControlMaster;
fabric `Connection.run("true")` on a new connection each time, and on one reused connection.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from boxes import Box, make_key, start_box


def timed(label: str, action: Callable[[], object], n: int) -> None:
    """Run `action` n times and print the median and the minimum."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1000)
    print(f"{label:<44} median {statistics.median(times):6.1f} ms   min {min(times):6.1f} ms")


def ssh(box: Box, *options: str) -> None:
    subprocess.run(
        [*box.ssh_argv(*options), "true"], stdin=subprocess.DEVNULL, capture_output=True, check=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="repetitions per figure")
    n = parser.parse_args().n
    tmp = Path(tempfile.mkdtemp(prefix="ssh-roundtrip-"))
    key = make_key(tmp / "id_ed25519")

    boxes = iter(range(n))
    started: list[Box] = []
    timed("box start", lambda: started.append(start_box(tmp / f"s{next(boxes)}", key, "s")), n)
    timed("box close", lambda: started.pop().close(), n)

    with start_box(tmp / "main", key, "main") as box:
        timed("openssh: ssh true (default kex)", lambda: ssh(box), n)
        timed("openssh: ssh true (curve25519 kex)", lambda: ssh(box, "-o", "KexAlgorithms=curve25519-sha256"), n)  # fmt: skip
        master = ["-o", "ControlMaster=auto", "-o", f"ControlPath={tmp}/cm-%C"]
        ssh(box, *master, "-o", "ControlPersist=30")  # warm-up: starts the master
        timed("openssh: ssh true (warm ControlMaster)", lambda: ssh(box, *master), n)
        ssh(box, *master, "-O", "exit")

        start = time.perf_counter()
        import fabric

        print(f"{'import fabric':<44} {(time.perf_counter() - start) * 1000:6.1f} ms")
        kwargs = {"key_filename": str(key), "look_for_keys": False, "allow_agent": False}

        def connect() -> fabric.Connection:
            return fabric.Connection(box.host, port=box.port, user=box.user, connect_kwargs=kwargs)

        def fresh() -> None:
            with connect() as connection:
                connection.run("true", in_stream=False, hide=True)

        timed("fabric: run('true'), new connection", fresh, n)
        with connect() as connection:
            connection.run("true", in_stream=False, hide=True)
            timed("fabric: run('true'), reused connection", lambda: connection.run("true", in_stream=False, hide=True), n)  # fmt: skip


if __name__ == "__main__":
    main()
