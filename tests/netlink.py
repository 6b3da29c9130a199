"""A controller in its own network namespace, reaching one box over a veth pair that a test can
cut silently (a blackholed link) or use to prove a box is reachable only through another one.

The box side of the pair goes down to cut the link, while the namespace keeps a permanent
neighbour entry for the box's address: packets then vanish with no error at all (no ARP
failure, no reset), as on a dead route. Needs root and iproute2 (`ip netns`, veth).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

from boxes import Box

_numbers = itertools.count(1)


class Link:
    """`with Link(box) as link:` the box's sshd also listens on `link.box_addr`, reachable from
    the namespace `link.ns` (where `link.cli_argv(...)` runs the bootstrap CLI) and nothing else
    of this machine: inside the namespace, 127.0.0.0/8 is the namespace's own loopback."""

    def __init__(self, box: Box) -> None:
        n = next(_numbers) % 60 + 1
        pid = os.getpid()
        tag = f"{pid % 10000}x{n}"
        self.ns, self.outer, self.inner = f"btns{tag}", f"bt{tag}a", f"bt{tag}b"
        net = f"10.{200 + pid % 50}.{pid // 50 % 250}"
        self.box_addr, self.ns_addr = f"{net}.{4 * n + 1}", f"{net}.{4 * n + 2}"
        self.box = box

    def _ip(self, *args: str, ns: bool = False) -> None:
        prefix = ["ip", "netns", "exec", self.ns] if ns else []
        subprocess.run([*prefix, "ip", *args], check=True, capture_output=True)

    def __enter__(self) -> Link:
        self._ip("netns", "add", self.ns)
        try:
            self._ip("link", "add", self.outer, "type", "veth", "peer", "name", self.inner)
            self._ip("link", "set", self.inner, "netns", self.ns)
            self._ip("addr", "add", f"{self.box_addr}/30", "dev", self.outer)
            self._ip("link", "set", self.outer, "up")
            self._ip("addr", "add", f"{self.ns_addr}/30", "dev", self.inner, ns=True)
            self._ip("link", "set", self.inner, "up", ns=True)
            self._ip("link", "set", "lo", "up", ns=True)
            mac = Path(f"/sys/class/net/{self.outer}/address").read_text().strip()
            self._ip("neigh", "replace", self.box_addr, "lladdr", mac, "dev", self.inner,
                     "nud", "permanent", ns=True)  # fmt: skip
            config = self.box.root / "sshd_config"
            config.write_text(
                config.read_text() + f"ListenAddress {self.box_addr}:{self.box.port}\n"
            )
            self.box.stop()
            self.box.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "link", "del", self.outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)

    def cut(self) -> None:
        """Blackhole the link: from now on packets to the box vanish."""
        self._ip("link", "set", self.outer, "down")

    def restore(self) -> None:
        self._ip("link", "set", self.outer, "up")

    def entry(self, connection: str = "ssh") -> dict[str, str | int]:
        """The box as an inventory host reached over the link (with `connection`)."""
        return dict(self.box.inventory_entry(), host=self.box_addr, connection=connection)

    def inventory(self, path: Path, connection: str = "ssh") -> Path:
        path.write_text(json.dumps({"hosts": {self.box.name: self.entry(connection)}}))
        return path

    def cli_argv(self, *args: str) -> list[str]:
        """`bootstrap ARGS` run inside the namespace."""
        return ["ip", "netns", "exec", self.ns, sys.executable, "-m", "provision.cli", *args]
