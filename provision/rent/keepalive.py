"""Unattended: a rented box that is stopped (an interruptible one outbid) or goes offline is
replaced by one rented with the same query, and the caller runs the same playbook there; one
whose run asked to be destroyed when done (`on_finish: destroy`) is destroyed once it is.

The playbook's own checkpoints (a tmux_launch step's `checkpoints:` with `restore: true`) make
the new box resume from the newest checkpoint verified on the remote; nothing here copies data.
The replacement takes over the target name (so `status NAME` follows it); the lost instance is
destroyed once the replacement is rented, not before: renting can fail (no offer, the budget),
and a stopped interruptible may still come back when its bid wins again. `--budget` is the one
that was given at the first rent, counted over every box rented here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from provision.errors import ProvisionError, TargetError
from provision.rent import manage, store
from provision.rent.renter import DEAD_STATES, Request, Say, rent
from provision.rent.vast import Instance, Vast


def lost(instance: Instance | None) -> str:
    """Why this instance no longer runs the job ('' while it does)."""
    if instance is None:
        return "is gone from the account"
    if instance.raw.get("cur_state") == "stopped":
        return "was stopped (outbid)" if instance.intended == "running" else "was stopped"
    if instance.status in DEAD_STATES:
        return f"went {instance.status}"
    return ""


def replace(vast: Vast, name: str, say: Say) -> store.Rented:
    """Rent a box like `name`'s under the same name, then destroy the lost one."""
    old = store.rented()[name]
    if not old.request:
        raise ProvisionError(
            f"{name}: rented by another controller: its query is not known here, so no "
            "replacement is rented (run `monitor --watch` where it was rented)"
        )
    fields = {k: v for k, v in old.request.items() if k not in ("key", "speed_urls")}
    request = Request(
        **fields, key=Path(old.request["key"]), speed_urls=tuple(old.request["speed_urls"]),
        label=name, count=1, playbook=old.playbook,
    )  # fmt: skip
    (new,) = rent(vast, request, say)
    vast.destroy(old.id)
    store.close_ledger(old.id)
    return new


def check(vast: Vast, name: str, say: Say) -> store.Rented | None:
    """The replacement when `name`'s instance is lost, else None."""
    old = store.rented()[name]
    why = lost(vast.show(old.id))
    if not why:
        return None
    say(f"{name}: instance {old.id} {why}: renting a replacement ('{old.query}')")
    new = replace(vast, name, say)
    say(f"{name}: replaced by instance {new.id} at {new.host}:{new.port}, ${new.dph:.3f}/h")
    return new


def release(vast: Vast, name: str, watch: dict[str, Any] | None, say: Say) -> bool:
    """Destroy the rented box `name` when its run is over and asked for it; True once done.

    `watch` is a tmux_launch step's `watch.json` as `status`/`monitor` read it from the box.
    The box cannot destroy itself (the API key stays here): its guard, told `on_finish:
    destroy`, ends the job and records `ready` once every complete checkpoint is verified on
    the remote. Here the run must also be finished (`manage.down`'s check: every step done,
    the runner idle), and the box must be one rented by this controller.
    """
    record = (watch or {}).get("on_finish")
    if not isinstance(record, dict) or record.get("action") != "destroy":
        return False
    if name not in store.rented():
        return False
    if not record.get("ready"):
        say(f"{name}: on_finish destroy: not destroying: {record.get('why_not') or 'not ready'}")
        return False
    try:
        _rented, lines = manage.down(vast, name, force=False)
    except ProvisionError as exc:
        say(f"{name}: on_finish destroy: {exc}")
        return False
    for line in lines:
        say(line)
    return True


def release_when_asked(vast: Vast, name: str, say: Say) -> bool:
    """`release` for every guarded step of the rented box's run, read from its `status`
    (`up --keep-alive` polls it); True once the box was destroyed. A box that does not answer
    is not released (its checkpoints cannot be proven safe): `check` deals with a lost one."""
    from provision import controller
    from provision.inventory import Host

    rented = store.rented().get(name)
    if rented is None:
        return False
    box = controller.connect(Host(name=name, **rented.host_entry()))
    try:
        snap = controller.status(box, None, lines=0)
    except TargetError:
        return False
    return any(release(vast, name, step.watch, say) for step in snap.steps if step.watch)


def say_once(say: Say) -> Say:
    """`say`, saying each line once (a poll that finds the same reason again stays quiet)."""
    said: set[str] = set()

    def once(line: str) -> None:
        if line not in said:
            said.add(line)
            say(line)

    return once
