"""bootstrap's instances on the account, and taking one down without losing its work.

`listing` asks the API (not this machine's store) for every instance whose label starts with
`bootstrap:`, so it also finds what another machine rented; those found are adopted as targets
here (with this controller's key). `down` destroys an instance only once its work is safe,
unless forced: when its playbook declares checkpoints (a tmux_launch step's `checkpoints:`),
every complete checkpoint on the box must be uploaded and verified on the remote
(`checkpoints_unsafe`, on `bootstrap checkpoints`' report); otherwise its run must be finished
(`run_finished`). An instance that is only stopped still bills its disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provision import bugs
from provision.bugs import BoxBug
from provision.errors import ProvisionError, TargetError
from provision.model import StepStatus
from provision.rent import store
from provision.rent.renter import LABEL_PREFIX
from provision.rent.vast import Instance, Vast


@dataclass(frozen=True)
class Listed:
    """One of bootstrap's instances, as `bootstrap instances` shows it."""

    name: str
    instance: Instance
    playbook: str | None
    here: bool  # rented (or adopted) by this controller

    def to_dict(self) -> dict[str, Any]:
        i = self.instance
        return {
            "name": self.name, "id": i.id, "state": state_of(i), "dph": i.dph,
            "uptime_s": round(i.uptime_s), "cost": round(cost(i), 4), "gpu": f"{i.num_gpus}× {i.gpu_name}",
            "ssh": f"{i.ssh_host}:{i.ssh_port}" if i.ssh_host else None, "machine_id": i.machine_id,
            "interruptible": i.is_bid, "playbook": self.playbook,
        }  # fmt: skip


def state_of(i: Instance) -> str:
    """`running`, `stopped`, `loading`, `offline`... (stopped: the contract is, whatever the
    container says; an outbid interruptible is stopped while it still intends to run)."""
    if i.raw.get("cur_state") == "stopped":
        return "stopped (outbid)" if i.intended == "running" else "stopped"
    return i.status


def cost(i: Instance) -> float:
    """$ so far: its $/h over its uptime (vast.ai bills the disk of a stopped one too)."""
    return i.dph * i.uptime_s / 3600


def listing(vast: Vast, key: Path) -> list[Listed]:
    """bootstrap's instances on the account; unknown ones become targets here."""
    mine = store.rented()
    by_id = {r.id: r for r in mine.values()}
    out = []
    for inst in vast.instances():
        if not inst.label.startswith(LABEL_PREFIX):
            continue
        known = by_id.get(inst.id)
        name = known.name if known else inst.label[len(LABEL_PREFIX) :] or f"vast-{inst.id}"
        if known is None and inst.ssh_host and inst.ssh_port and name not in mine:
            store.add(store.Rented(
                name=name, id=inst.id, label=inst.label, machine_id=inst.machine_id,
                host=inst.ssh_host, port=inst.ssh_port, user=inst.ssh_user, key=str(key),
                dph=inst.dph, is_bid=inst.is_bid, query="", gpu=f"{inst.num_gpus}× {inst.gpu_name}",
                started=inst.start_date or time.time(),
            ))  # fmt: skip
        out.append(Listed(name, inst, known.playbook if known else None, known is not None))
    return out


def runs(items: list[Listed]) -> dict[str, str]:
    """The run on each running box, asked of the box itself (one SSH round trip each, all at
    once): `playbook: 3/5 done, runner idle`, or why it could not be read."""
    import threading

    from provision import controller
    from provision.inventory import Host

    found: dict[str, str] = {}
    rented = store.rented()

    def ask(name: str) -> None:
        box = controller.connect(Host(name=name, **rented[name].host_entry()))
        try:
            snap = controller.status(box, None, lines=0)
        except TargetError as exc:
            found[name] = f"? ({exc})"
            return
        except BoxBug as exc:  # one line in the table, the traceback in the debug log
            found[name] = f"? ({bugs.report(exc)})"
            return
        done = sum(1 for s in snap.steps if s.status in (StepStatus.DONE, StepStatus.SKIPPED))
        found[name] = f"{snap.playbook}: {done}/{len(snap.steps)} done, runner {snap.runner}"

    live = [i.name for i in items if i.instance.status == "running" and i.name in rented]
    threads = [threading.Thread(target=ask, args=(n,), daemon=True) for n in live]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=40)
    return found


def stopped_warning(item: Listed) -> str | None:
    """The warning for a stopped instance: its disk still bills."""
    if not state_of(item.instance).startswith("stopped"):
        return None
    per_h = item.instance.disk_dph
    return (
        f"{item.name} is stopped: its {item.instance.disk_gb:.0f} GB disk still bills "
        f"(~${per_h:.3f}/h); `bootstrap down {item.name}` destroys it"
    )


def run_finished(rented: store.Rented) -> str:
    """'' when the run on the box is finished (every step done, runner not running), else why
    not. A box that cannot be reached cannot prove its checkpoints are safe: not finished."""
    from provision import controller
    from provision.inventory import Host

    box = controller.connect(Host(name=rented.name, **rented.host_entry()))
    try:
        snap = controller.status(box, None, lines=0)
    except TargetError as exc:
        return f"cannot check its run: {exc}"
    except BoxBug as exc:
        return f"cannot check its run: {bugs.report(exc)}"
    finished = (StepStatus.DONE, StepStatus.SKIPPED)
    pending = [s.id for s in snap.steps if s.status not in finished]
    if snap.runner == "running" or pending:
        not_done = ", ".join(pending) or "runner busy"
        return f"its run '{snap.playbook}' is not finished (not done: {not_done})"
    return ""


def checkpoints_unsafe(report: dict[str, Any]) -> str:
    """'' when every complete checkpoint on the box is verified on the remote (the
    `bootstrap checkpoints` report of one step), else what is not."""
    if not report.get("remote"):
        return "its checkpoints have no remote: they exist only on the box"
    if report.get("remote_error"):
        return f"its checkpoint remote cannot be read: {report['remote_error']}"
    pending = [r["name"] for r in report["local"] if r["state"] == "complete"]
    if pending:
        return f"checkpoints not yet verified on {report['remote']}: {', '.join(pending)}"
    if not any(c["state"] == "verified" for c in report.get("remote_checkpoints") or []):
        return f"no verified checkpoint on {report['remote']} yet"
    return ""


def down(
    vast: Vast, name: str, force: bool, unsafe: Callable[[store.Rented], str] | None = None
) -> tuple[store.Rented, list[str]]:
    """Destroy the rented box `name`, refused while `unsafe(box)` says why its work is not
    safe (default: `run_finished`) unless `force`; returns it and the lines to print."""
    rented = store.rented().get(name)
    if rented is None:
        known = ", ".join(sorted(store.rented())) or "none (see `bootstrap instances`)"
        raise ProvisionError(f"no rented box '{name}' (rented here: {known})")
    warnings: list[str] = []
    instance = vast.show(rented.id)
    if instance is None:
        store.close_ledger(rented.id)
        store.forget(name)
        return rented, [f"{name}: instance {rented.id} was already gone; forgotten here"]
    if not force:
        why = (unsafe or run_finished)(rented)
        if why:
            raise ProvisionError(
                f"{name}: not destroying instance {rented.id}: {why}; its checkpoints may not be "
                f"safe on the remote. `bootstrap down {name} --force` destroys it anyway"
            )
    vast.destroy(rented.id)
    store.close_ledger(rented.id)
    store.forget(name)
    warnings.append(
        f"{name}: destroyed instance {rented.id} after {instance.uptime_s / 3600:.2f} h, ~${cost(instance):.2f}"
    )
    return rented, warnings
