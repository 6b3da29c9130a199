"""What this controller rented: `~/.config/bootstrap/instances.json`.

Three things live there, under one lock (fcntl, so two `bootstrap` processes on one machine do
not lose each other's writes) and written atomically (temp file + rename):

- `instances`: the rented boxes by target name (instance id, SSH address, key, $/h, the query
  and playbook it was rented for), which `status`, `rerun`, `logs`, `monitor` and `attach` take
  as targets like inventory hosts;
- `ledger`: every instance ever created here with its $/h, start and end, so the cost so far
  (and `--budget`) counts the boxes destroyed on the way too;
- `bad_machines`: vast.ai machine ids whose box failed its fitness check or never answered,
  with the reason, so no later search rents them again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import ProvisionError
from provision.home import config_dir

FILE = "instances.json"


@dataclass
class Rented:
    """One rented box, as a target."""

    name: str
    id: int
    label: str
    machine_id: int
    host: str
    port: int
    user: str
    key: str
    dph: float
    is_bid: bool
    query: str
    gpu: str = ""
    playbook: str | None = None
    started: float = field(default_factory=time.time)
    # How it was rented (renter.Request's fields), so a replacement is rented alike.
    request: dict[str, Any] = field(default_factory=dict)

    def host_entry(self) -> dict[str, Any]:
        """The inventory-host fields of this box."""
        return {"host": self.host, "port": self.port, "user": self.user, "key": self.key}


def path() -> Path:
    return config_dir() / FILE


@contextlib.contextmanager
def editing() -> Iterator[dict[str, Any]]:
    """The store's data, locked; written back (atomically) when the block ends cleanly."""
    target = path()
    with open(target.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _read(target)
        yield data
        tmp = target.with_name(f".{FILE}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, target)


def load() -> dict[str, Any]:
    """A snapshot of the store (no lock held: for reading only)."""
    return _read(path())


def _read(target: Path) -> dict[str, Any]:
    data: dict[str, Any]
    try:
        data = json.loads(target.read_text())
    except FileNotFoundError:
        data = {}
    except (OSError, ValueError) as exc:
        raise ProvisionError(
            f"{target}: unreadable ({exc}); move it aside to start afresh"
        ) from None
    data.setdefault("instances", {})
    data.setdefault("ledger", [])
    data.setdefault("bad_machines", {})
    return data


def rented() -> dict[str, Rented]:
    """The rented boxes by target name."""
    return {name: Rented(**entry) for name, entry in load()["instances"].items()}


def add(box: Rented) -> None:
    with editing() as data:
        data["instances"][box.name] = asdict(box)


def forget(name: str) -> None:
    with editing() as data:
        data["instances"].pop(name, None)


def set_playbook(name: str, playbook: str) -> None:
    with editing() as data:
        if name in data["instances"]:
            data["instances"][name]["playbook"] = playbook


def open_ledger(instance_id: int, name: str, dph: float) -> None:
    """Start counting an instance's cost (at creation: billing starts then)."""
    with editing() as data:
        data["ledger"].append(
            {"id": instance_id, "name": name, "dph": dph, "started": time.time(), "ended": None}
        )


def close_ledger(instance_id: int) -> None:
    """Stop counting an instance's cost (destroyed)."""
    with editing() as data:
        for entry in data["ledger"]:
            if entry["id"] == instance_id and entry["ended"] is None:
                entry["ended"] = time.time()


def spent(now: float | None = None) -> float:
    """$ spent on every instance in the ledger, destroyed ones included."""
    now = time.time() if now is None else now
    total = 0.0
    for e in load()["ledger"]:
        total += float(e["dph"]) * max(0.0, (e["ended"] or now) - e["started"]) / 3600
    return total


def billing_rate() -> float:
    """$/h of the instances billing now (in the ledger, not destroyed)."""
    return sum(float(e["dph"]) for e in load()["ledger"] if e["ended"] is None)


def mark_bad(machine_id: int, reason: str, gpu: str = "") -> None:
    with editing() as data:
        data["bad_machines"][str(machine_id)] = {"reason": reason, "gpu": gpu, "when": time.time()}


def bad_machines() -> dict[int, str]:
    """machine id -> why it was found bad."""
    return {int(k): v["reason"] for k, v in load()["bad_machines"].items()}
