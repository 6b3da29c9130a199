"""The rent loop: search, create, wait for SSH, check fitness; a bad box is swapped.

The boxes wanted (`--count`) are rented at once, one slot (thread) per box, each waiting out
its own image pull and SSH; a failed box is replaced within its slot. For each, the offers are
tried cheapest first (or by `--order`), no two slots on one machine. An instance is
created with bootstrap's label (`bootstrap:NAME`, which is how `bootstrap instances` finds it
from any machine), the user's public key attached, and `~/.no_auto_tmux` made by its on-start
script (vast.ai images otherwise put every SSH login inside tmux). Then:

- its status is polled: created -> loading -> running. One that turns `exited`, `offline` or
  `unknown` never comes back (openapi.yaml, "Poll trap"): destroyed, the next offer tried;
- once running, SSH is tried until it answers with our key (a key arrives late on vast.ai);
  no answer within `ssh_timeout`: destroyed, its machine remembered as bad;
- the fitness check (fitness.py) runs; a box that fails it is destroyed, its machine
  remembered as bad, and the next offer rented.

Billing starts at create, so every instance goes into the ledger then and leaves it when
destroyed; `--budget` counts it all, plus an hour of every box billing now, and stops renting
before a box would pass the cap within the hour. Ctrl-C calls every slot off: each destroys the
instance it was renting and closes its ledger entry before `rent` returns.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import ProvisionError, TargetError
from provision.rent import fitness, store
from provision.rent.vast import Instance, Offer, Vast, VastAuthError, VastError, parse_query

LABEL_PREFIX = "bootstrap:"
DEFAULT_IMAGE = "vastai/base-image:@vastai-automatic-tag"  # the spec's default (createInstance)
ONSTART = "touch ~/.no_auto_tmux"
DEAD_STATES = ("exited", "offline", "unknown")


class RentError(ProvisionError):
    """Nothing (or not enough) could be rented: no fitting offer, all failed, or the budget."""

    exit_code = 1


@dataclass
class Request:
    """What `bootstrap rent` was asked for."""

    query: str
    key: Path
    count: int = 1
    max_price: float | None = None
    interruptible: bool = False
    bid: float | None = None
    disk_gb: float = 50.0
    image: str = DEFAULT_IMAGE
    label: str | None = None
    budget: float | None = None
    order: str = "dph_total"
    tries: int = 6
    ssh_timeout: float = 600.0
    speed_urls: tuple[str, ...] = field(default_factory=fitness.default_speed_urls)
    min_speed_ratio: float = 0.2
    min_speed_mbps: float = 50.0
    playbook: str | None = None
    filters: dict[str, Any] = field(default_factory=dict, init=False)

    def like_this(self) -> dict[str, Any]:
        """The fields that rent another box like this one (JSON: kept in the store)."""
        keep = ("query", "max_price", "interruptible", "bid", "disk_gb", "image", "budget",
                "order", "tries", "ssh_timeout", "min_speed_ratio", "min_speed_mbps")  # fmt: skip
        return {k: getattr(self, k) for k in keep} | {
            "key": str(self.key),
            "speed_urls": list(self.speed_urls),
        }

    def validate(self) -> None:
        """Bad option combinations, before any call is made."""
        if self.interruptible and self.bid is None:
            raise ProvisionError(
                "--interruptible needs --bid $/h (without a bid vast.ai rents on demand)"
            )
        if self.bid is not None and not self.interruptible:
            raise ProvisionError("--bid is for interruptible boxes: add --interruptible")
        if self.count < 1:
            raise ProvisionError("--count must be at least 1")
        if not self.key.is_file() or not Path(f"{self.key}.pub").is_file():
            raise ProvisionError(
                f"{self.key}: no such ssh key (with {self.key}.pub beside it); use --key"
            )
        self.filters = parse_query(self.query)
        if self.max_price is not None:
            self.filters["dph_total"] = {"lte": self.max_price}


Say = Callable[[str], None]


def offer_lines(offers: list[Offer], limit: int = 5) -> list[str]:
    """The best few offers as aligned text lines."""
    lines = [
        f"{'offer':>10} {'machine':>8} {'gpus':<28} {'$/h':>7} {'reliab':>6} {'down':>10} {'cuda':>5}  where"
    ]
    for o in offers[:limit]:
        gpus = f"{o.num_gpus}× {o.gpu_name} {o.gpu_ram_gb:.0f}GB"
        price = o.min_bid if o.interruptible and o.min_bid is not None else o.dph
        lines.append(
            f"{o.id:>10} {o.machine_id:>8} {gpus:<28} {price:>7.3f} {o.reliability:>6.3f} "
            f"{o.inet_down:>5.0f} Mb/s {o.cuda:>5}  {o.location}"
        )
    return lines


def rent(vast: Vast, req: Request, say: Say) -> list[store.Rented]:
    """Rent `req.count` boxes that pass the fitness check; returns them (already stored)."""
    req.validate()
    vast.whoami()  # a refused key fails here, before anything is searched or created
    bad = store.bad_machines()
    offers = vast.search(
        req.filters, interruptible=req.interruptible, disk_gb=req.disk_gb, order=req.order,
        exclude_machines=set(bad),
    )  # fmt: skip
    if not offers:
        raise RentError(
            f"no offer matches '{req.query}'"
            + (f" (skipping {len(bad)} bad machines)" if bad else "")
        )
    say(f"{len(offers)} offers for '{req.query}'; the best:")
    for line in offer_lines(offers):
        say("  " + line)
    market = _Market(req, offers)
    _run_slots(vast, req, market, say)
    boxes = [b for b in market.boxes if b is not None]
    if len(boxes) < req.count:
        raise RentError(
            f"rented {len(boxes)} of {req.count} boxes (kept: {market.kept()}) after trying "
            f"{market.tried} offers"
        )
    return boxes


class Cancelled(Exception):
    """Ctrl-C (or another slot's error) while a slot rents: it destroys what it holds."""


class _Market:
    """The offers shared by the boxes rented at once, under one lock: each slot takes the next
    offer whose machine no other slot holds and that no slot found bad; `--tries` and
    `--budget` count over all slots."""

    def __init__(self, req: Request, offers: list[Offer]) -> None:
        self.req = req
        self.offers = list(offers)
        self.lock = threading.Lock()
        self.tried = 0
        self.boxes: list[store.Rented | None] = [None] * req.count
        self.held: dict[int, int] = {}  # slot -> machine id of the offer it is renting
        self.reserved: dict[int, float] = {}  # slot -> $/h of a create not yet in the ledger
        self.cancel = threading.Event()
        self.error: BaseException | None = None

    def kept(self) -> str:
        return ", ".join(b.name for b in self.boxes if b is not None) or "none"

    def take(self, slot: int) -> Offer | None:
        """The next offer for `slot`, its price reserved against the budget; None when the
        offers or the tries are used up."""
        with self.lock:
            bad = store.bad_machines()
            busy = set(self.held.values()) | {b.machine_id for b in self.boxes if b is not None}
            while self.offers and self.tried < self.req.tries and not self.cancel.is_set():
                offer = self.offers.pop(0)
                if offer.machine_id in bad or offer.machine_id in busy:
                    continue
                price = self.req.bid if self.req.bid is not None else offer.dph
                _check_budget(self.req, price, sum(self.reserved.values()), self.kept())
                self.tried += 1
                self.held[slot] = offer.machine_id
                self.reserved[slot] = price
                return offer
            return None

    def billed(self, slot: int) -> None:
        """The slot's instance is in the ledger now (which the budget reads)."""
        with self.lock:
            self.reserved.pop(slot, None)

    def done(self, slot: int, box: store.Rented | None) -> None:
        with self.lock:
            self.held.pop(slot, None)
            self.reserved.pop(slot, None)
            if box is not None:
                self.boxes[slot] = box

    def check(self) -> None:
        """Raise Cancelled in a slot once the rent is called off."""
        if self.cancel.is_set():
            raise Cancelled

    def pause(self, seconds: float) -> None:
        """Sleep, woken (Cancelled) by Ctrl-C."""
        if self.cancel.wait(seconds):
            raise Cancelled


def _run_slots(vast: Vast, req: Request, market: _Market, say: Say) -> None:
    """Rent every box at once, one thread (slot) per box, each waiting out its own image pull,
    SSH and fitness check; a failed box is replaced within its slot.

    Ctrl-C reaches only this (the main) thread: it calls the rent off and waits until every
    slot destroyed the instance it was renting and closed its ledger entry (a second Ctrl-C
    does not cut that short: a box left billing costs more than a wait).
    """
    lock = threading.Lock()

    def slot_say(slot: int) -> Say:
        prefix = f"[{slot + 1}/{req.count}] " if req.count > 1 else ""

        def emit(line: str) -> None:
            with lock:
                say(prefix + line)

        return emit

    def fill(slot: int) -> None:
        try:
            while market.boxes[slot] is None:
                offer = market.take(slot)
                if offer is None:
                    return
                box = None
                try:
                    box = _try_offer(
                        vast, req, offer, _name(req, slot), slot_say(slot), market, slot
                    )
                finally:
                    market.done(slot, box)
        except Cancelled:
            pass
        except BaseException as exc:  # the first error ends the rent: the others stop too
            with market.lock:
                market.error = market.error or exc
            market.cancel.set()

    ended: list[int] = []

    def run(slot: int) -> None:
        try:
            fill(slot)
        finally:
            with market.lock:
                ended.append(slot)

    for n in range(req.count):
        threading.Thread(target=run, args=(n,), daemon=True).start()
    interrupted = False
    # Polled with sleep, not Thread.join: a join cut by Ctrl-C can report a live thread as
    # ended (CPython's _tstate_lock race), and the rent would return with a box billing.
    while len(ended) < req.count:
        try:
            time.sleep(0.1)
        except KeyboardInterrupt:
            interrupted = True
            market.cancel.set()
    if interrupted:
        what = (
            "the instance being rented was destroyed"
            if req.count == 1
            else "the instances being rented were destroyed"
        )
        raise RentError(f"interrupted: {what}; kept: {market.kept()}")
    if market.error is not None:
        raise market.error


def _name(req: Request, index: int) -> str | None:
    if req.label is None:
        return None
    return req.label if req.count == 1 else f"{req.label}-{index + 1}"


def _check_budget(req: Request, price: float, reserved: float, kept: str) -> None:
    """Refuse a box that would pass the budget within the hour: what was spent, plus an hour
    of every box billing now (in the ledger, or being created), plus an hour of this one."""
    if req.budget is None:
        return
    spent, running = store.spent(), store.billing_rate()
    if spent + running + reserved + price > req.budget:
        raise RentError(
            f"budget: ${spent:.2f} spent of ${req.budget:.2f}, ${running + reserved:.3f}/h "
            f"billing; another box at ${price:.3f}/h would pass it within the hour: not renting "
            f"(kept: {kept})"
        )


def _try_offer(
    vast: Vast, req: Request, offer: Offer, name: str | None, say: Say, market: _Market, slot: int
) -> store.Rented | None:
    """Rent one offer; None (destroyed, machine remembered if it is to blame) when it fails.

    Runs in a slot's thread: Ctrl-C never lands inside it, so a create in flight runs to its
    end and the instance it made is destroyed when the rent is called off (`market.check`)."""
    price = f"bid ${req.bid:.3f}/h" if req.bid is not None else f"${offer.dph:.3f}/h"
    say(
        f"renting offer {offer.id} (machine {offer.machine_id}, {offer.num_gpus}× {offer.gpu_name}, {price})"
    )
    label = LABEL_PREFIX + (name or "")
    try:
        instance_id = vast.create(
            offer, image=req.image, disk_gb=req.disk_gb, label=label, onstart=ONSTART, bid=req.bid
        )
    except VastError as exc:
        # Taken by someone else between the search and the create (404/410 no_such_ask), or
        # its price changed (400): nothing was rented; the next offer is tried.
        if getattr(exc, "status", None) not in (400, 404, 410) or isinstance(exc, VastAuthError):
            raise
        say(f"  offer {offer.id} not rented: {exc}")
        return None
    name = name or f"vast-{instance_id}"
    try:  # from here on, whatever happens, this instance is destroyed unless it is kept
        store.open_ledger(instance_id, name, req.bid if req.bid is not None else offer.dph)
        market.billed(slot)
        market.check()
        if label == LABEL_PREFIX:
            vast.label(instance_id, LABEL_PREFIX + name)
        vast.attach_key(instance_id, Path(f"{req.key}.pub").read_text().strip())
        instance, failure = _wait_running(vast, instance_id, req, say, market)
        if instance is not None and instance.is_bid != req.interruptible:
            # vast-cli#403: a create that silently rented the other kind. Not the machine's fault.
            _destroy(vast, instance_id)
            kind = "interruptible" if req.interruptible else "on-demand"
            raise VastError(f"instance {instance_id} was not rented {kind} as asked: destroyed it")
        if instance is None:
            _give_up(vast, instance_id, offer, failure, say)
            return None
        rented = store.Rented(
            name=name, id=instance_id, label=LABEL_PREFIX + name, machine_id=offer.machine_id,
            host=str(instance.ssh_host), port=int(instance.ssh_port or 22), user=instance.ssh_user,
            key=str(req.key), dph=instance.dph or offer.dph, is_bid=instance.is_bid,
            query=req.query, gpu=f"{offer.num_gpus}× {offer.gpu_name}", playbook=req.playbook,
            request=req.like_this(),
        )  # fmt: skip
        failure = _reach_and_check(rented, offer, req, say, market)
        market.check()
        if failure:
            _give_up(vast, instance_id, offer, failure, say)
            return None
    except BaseException:
        _destroy(vast, instance_id)  # never leave a half-rented box billing
        raise
    store.add(rented)
    say(f"{name}: instance {instance_id} ready at {rented.user}@{rented.host}:{rented.port}")
    return rented


def _wait_running(
    vast: Vast, instance_id: int, req: Request, say: Say, market: _Market
) -> tuple[Instance | None, str]:
    """Poll until running with an SSH address: (instance, ""), or (None, why) when it ends dead
    or does not get there within `ssh_timeout`."""
    deadline = time.monotonic() + req.ssh_timeout
    delay, last = 0.5, ""
    while time.monotonic() < deadline:
        instance = vast.show(instance_id)
        if instance is None:
            return None, "the instance vanished (destroyed by vast.ai)"
        if instance.status != last:
            say(f"  instance {instance_id}: {instance.status}")
            last = instance.status
        if instance.status in DEAD_STATES:
            return None, f"the instance went {instance.status} before SSH answered"
        if instance.status == "running" and instance.ssh_host and instance.ssh_port:
            return instance, ""
        market.pause(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 5.0)
    return None, f"not running within {req.ssh_timeout:.0f}s (last status: {last or 'none'})"


def _reach_and_check(
    rented: store.Rented, offer: Offer, req: Request, say: Say, market: _Market
) -> str:
    """SSH until it answers (within what is left of `ssh_timeout`), then the fitness check;
    '' when the box is fit, else why not."""
    from provision import controller
    from provision.inventory import Host

    host = Host(name=rented.name, **rented.host_entry())
    start = time.monotonic()
    box = controller.connect(host, accept_new_host_key=True)
    delay = 1.0
    while True:
        # Refused, reset, or our key not installed yet: all normal in a new box's first minutes.
        try:
            box.transport.run("test -e ~/.no_auto_tmux || touch ~/.no_auto_tmux", timeout=30)
            break
        except TargetError as exc:
            left = req.ssh_timeout - (time.monotonic() - start)
            if left <= 0:
                return f"SSH did not answer within {req.ssh_timeout:.0f}s: {exc}"
            market.pause(min(delay, left))
            delay = min(delay * 1.5, 10.0)
    say(f"  {rented.name}: SSH answered after {time.monotonic() - start:.0f}s; checking fitness")
    checked = time.monotonic()
    try:
        verdict = fitness.check(
            box, offer, req.disk_gb, speed_urls=req.speed_urls,
            min_ratio=req.min_speed_ratio, min_mbps=req.min_speed_mbps,
        )  # fmt: skip
    except TargetError as exc:
        return f"the fitness check could not run: {exc}"
    for row in verdict.rows:
        mark = "ok  " if row["ok"] else "FAIL"
        say(f"    {mark} {row['check']}: {row['value']} (need {row['expected']})")
    say(f"  {rented.name}: fitness checked in {time.monotonic() - checked:.1f}s")
    return "" if verdict.ok else f"unfit: {verdict.reason()}"


def _give_up(vast: Vast, instance_id: int, offer: Offer, why: str, say: Say) -> None:
    _destroy(vast, instance_id)
    store.mark_bad(offer.machine_id, why, offer.gpu_name)
    say(f"  destroyed instance {instance_id}: {why}; machine {offer.machine_id} marked bad")


def _destroy(vast: Vast, instance_id: int) -> None:
    vast.destroy(instance_id)
    store.close_ledger(instance_id)
