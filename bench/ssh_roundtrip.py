"""No-op SSH round trips to a loopback test box, per transport: what each of bootstrap's two
transports costs a command, against the plain OpenSSH client, in one run.

Run as root (box users are uid 0): `python bench/ssh_roundtrip.py [-n 10]`. Paired,
interleaved medians (bench/harness.py) of `true` run on the box by: the OpenSSH client on a new
connection (the baseline) at its default key exchange and at curve25519 (paramiko's), and
through a warm ControlMaster; bootstrap's OpenSSH transport (its ControlMaster warm); bootstrap's
paramiko transport on a new connection and on its open one; plain Fabric, likewise. The
transports run in this process (no interpreter start), so their "local CPU" column, which counts
child processes only, is blank for paramiko. Also: the one-off cost of importing fabric, which
only a controller that uses the paramiko transport pays.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import harness  # first: it puts tests/ and the repository on the path
from boxes import Box, make_key, start_box

BASELINE = "openssh: ssh true, new connection (default kex)"


def ssh(box: Box, *options: str) -> Callable[[], None]:
    def action() -> None:
        subprocess.run(
            [*box.ssh_argv(*options), "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=True,
        )

    return action


def bootstrap_transports(box: Box) -> dict[str, Callable[[], None]]:
    """`true` through bootstrap's own transports (their known_hosts in BOOTSTRAP_CONFIG_DIR)."""
    from provision.inventory import Host
    from provision.transport.paramiko_ssh import ParamikoTransport
    from provision.transport.ssh import SSHTransport

    host = Host(name="main", host=box.host, port=box.port, user=box.user, key=str(box.key))

    def ok(transport: SSHTransport | ParamikoTransport) -> None:
        result = transport.run("true", timeout=30)
        assert result.rc == 0, result.stderr

    openssh = SSHTransport(host)
    ok(openssh)  # its ControlMaster stays up for 60 s after each command
    reused = ParamikoTransport(host)
    ok(reused)
    return {
        "bootstrap openssh transport: warm ControlMaster": lambda: ok(openssh),
        "bootstrap paramiko transport: new connection": lambda: ok(ParamikoTransport(host)),
        "bootstrap paramiko transport: its open connection": lambda: ok(reused),
    }


def fabric_runs(box: Box) -> dict[str, Callable[[], None]]:
    import fabric

    kwargs = {"key_filename": str(box.key), "look_for_keys": False, "allow_agent": False}

    def connect() -> fabric.Connection:
        return fabric.Connection(box.host, port=box.port, user=box.user, connect_kwargs=kwargs)

    def fresh() -> None:
        with connect() as connection:
            connection.run("true", in_stream=False, hide=True)

    reused = connect()
    return {
        "fabric: run('true'), new connection": fresh,
        "fabric: run('true'), reused connection": lambda: reused.run(
            "true", in_stream=False, hide=True
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10, help="timed runs per figure")
    n = parser.parse_args().n
    tmp = Path(tempfile.mkdtemp(prefix="ssh-roundtrip-"))
    os.environ["BOOTSTRAP_CONFIG_DIR"] = str(tmp / "controller")
    key = make_key(tmp / "id_ed25519")

    start = time.perf_counter()
    import fabric  # noqa: F401  (timed: the paramiko transport's one-off import)

    imported = (time.perf_counter() - start) * 1000

    with start_box(tmp / "main", key, "main") as box:
        master = ("-o", "ControlMaster=auto", "-o", f"ControlPath={tmp}/cm-%C")
        ssh(box, *master, "-o", "ControlPersist=60")()  # starts the master
        samples = harness.paired(
            {
                BASELINE: ssh(box),
                "openssh: ssh true, new connection (curve25519)": ssh(
                    box, "-o", "KexAlgorithms=curve25519-sha256"
                ),
                "openssh: ssh true, warm ControlMaster": ssh(box, *master),
                **bootstrap_transports(box),
                **fabric_runs(box),
            },
            n,
        )
        harness.report("transport: `true` on a loopback box", samples, BASELINE)
        ssh(box, *master, "-O", "exit")()
    print(f"  {'import fabric (paramiko, invoke), once per process':<48} {imported:7.0f} ms")


if __name__ == "__main__":
    main()
