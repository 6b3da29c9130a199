"""The one place bootstrap talks to vast.ai: a thin layer over the pinned `vastai` package.

Everything goes through `vastai==1.9.1` (PyPI; `vastai-sdk` is only a deprecated wrapper of it).
The calls it makes, read in that wheel (the vast-ai/vast-cli mirror's newest commit, 5567983,
predates 1.9.1, so lines are cited in the wheel as installed):

| here          | vastai 1.9.1                           | HTTP                                     |
|---------------|----------------------------------------|------------------------------------------|
| `whoami`      | api/billing.py:225 `show_user`         | GET  /api/v0/users/current               |
| `search`      | api/offers.py:12 `search_offers`       | POST /api/v0/bundles/                    |
| `create`      | api/instances.py:198 payload, :298     | PUT  /api/v0/asks/{id}/                  |
| `instances`   | api/instances.py:31 `show_instances`   | GET  /api/v1/instances/ (pages of 25)    |
| `label`       | api/instances.py:354 `label_instance`  | PUT  /api/v0/instances/{id}/ {label}     |
| `attach_key`  | api/keys.py:69 `attach_ssh`            | POST /api/v0/instances/{id}/ssh/         |
| `destroy`     | api/instances.py:309 `destroy_instance`| DELETE /api/v0/instances/{id}/           |
| `stop`        | api/instances.py:331 `stop_instance`   | PUT  /api/v0/instances/{id}/ {state}     |

The client (api/client.py:123) sends the key as `Authorization: Bearer` (:161), never in the URL,
and retries 429/502/503/504 itself (:183-212, Retry-After honoured up to 60 s); on top of that
a 429 that outlasts its retries is waited out here with a growing backoff. The server URL is
`VAST_URL` (api/client.py:19), so the tests point the real client at a fake on loopback.

The API key comes from the inventory secret `VAST_API_KEY`, else the environment variable of
that name, else vast's own key files (`~/.config/vastai/vast_api_key`, `~/.vast_api_key`, the
order of vastai/_base.py:8-40). It is never put in argv, a log, the state or a message.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import ProvisionError

KEY_SECRET = "VAST_API_KEY"
KEY_FILES = ("~/.config/vastai/vast_api_key", "~/.vast_api_key")
# Filters the vast.ai web page sets, spelled as `vastai search offers` takes them (the
# vastai query language: `gpu_name=RTX_4090 num_gpus>=2 reliability>0.98 inet_down>500`).
_DEFAULT_FILTERS = {"verified": {"eq": True}, "external": {"eq": False}, "rentable": {"eq": True}}


class VastError(ProvisionError):
    """vast.ai refused a request, or answered something bootstrap cannot use."""


class VastAuthError(VastError):
    """The API key is missing or refused."""


class VastUnavailable(VastError):
    """The API did not answer (down, unreachable, or still rate-limiting after the backoff)."""


@dataclass(frozen=True)
class Offer:
    """One offer from a search, with the numbers a user compares."""

    id: int
    machine_id: int
    gpu_name: str
    num_gpus: int
    gpu_ram_gb: float
    dph: float  # $/h on demand, disk included
    min_bid: float | None
    reliability: float
    inet_down: float  # Mbit/s as listed
    cuda: str
    driver: str
    disk_gb: float
    location: str
    interruptible: bool  # found by an interruptible (bid) search
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Instance:
    """One instance as the API shows it."""

    id: int
    label: str
    status: str  # actual_status: created (null), loading, running, exited, offline, unknown...
    intended: str
    machine_id: int
    ssh_host: str | None
    ssh_port: int | None
    ssh_user: str  # root on vast.ai
    dph: float
    is_bid: bool
    start_date: float
    gpu_name: str
    num_gpus: int
    storage_cost: float  # $/GB/month: what a stopped instance still costs
    disk_gb: float
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def uptime_s(self) -> float:
        return max(0.0, time.time() - self.start_date) if self.start_date else 0.0

    @property
    def disk_dph(self) -> float:
        """$/h its disk costs, billed even while stopped (storage_cost is $/GB/month)."""
        return self.storage_cost * self.disk_gb / (30 * 24)


def api_key(secret: Any = None) -> tuple[str, str]:
    """(key, where it came from). `secret` is a callable name -> value (the inventory's
    `secret`) or None; the inventory wins, then the environment, then vast's key files."""
    if secret is not None:
        try:
            return secret(KEY_SECRET), f"inventory secret {KEY_SECRET}"
        except ProvisionError as exc:
            if "unknown secret" not in str(exc):
                raise
    if os.environ.get(KEY_SECRET):
        return os.environ[KEY_SECRET], f"${KEY_SECRET}"
    for name in KEY_FILES:
        path = Path(os.path.expanduser(name))
        if path.is_file():
            value = path.read_text(encoding="utf-8").strip()
            if value:
                return value, str(path)
    raise VastAuthError(
        f"no vast.ai API key: set the inventory secret {KEY_SECRET}, the environment variable "
        f"{KEY_SECRET}, or save it to {KEY_FILES[0]} (vastai set api-key)"
    )


def parse_query(text: str) -> dict[str, Any]:
    """The filters of a `vastai search offers` query string; an unknown field is bad input."""
    from vastai.api.query import offers_alias, offers_fields, offers_mult
    from vastai.api.query import parse_query as vast_parse

    words = re.findall(r"([A-Za-z0-9_]+)\s*(?:[=><!]+|\s+(?:[lg]te?|nin|neq|eq|in)\s)", text)
    unknown = [w for w in words if w not in offers_fields and w not in offers_alias]
    if unknown:
        raise VastError(f"query: unknown field '{unknown[0]}' (see `vastai search offers --help`)")
    if not words and text.strip():
        raise VastError(f"query: cannot read '{text}' (e.g. 'gpu_name=RTX_4090 num_gpus>=2')")
    parsed: dict[str, Any] = vast_parse(
        text, dict(_DEFAULT_FILTERS), offers_fields, offers_alias, offers_mult
    )
    return parsed


class Vast:
    """A vast.ai account, reached through the `vastai` client."""

    def __init__(
        self,
        key: str,
        *,
        url: str | None = None,
        backoff: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0, 30.0),
    ) -> None:
        from vastai.api.client import VastClient

        self.url = url or os.environ.get("VAST_URL") or "https://console.vast.ai"
        self.client = VastClient(api_key=key, server_url=self.url, retry=3, client_type="cli")
        self.backoff = backoff

    # ---------------------------------------------------------------- the calls

    def whoami(self) -> dict[str, Any]:
        """The account (balance included); the cheapest call that proves the key works."""
        from vastai.api.billing import show_user

        user: dict[str, Any] = self._call(show_user, self.client)
        return user

    def search(
        self,
        filters: dict[str, Any],
        *,
        interruptible: bool = False,
        disk_gb: float = 10.0,
        order: str = "dph_total",
        limit: int = 64,
        exclude_machines: set[int] | None = None,
    ) -> list[Offer]:
        """Offers matching `filters`, cheapest first (or by `order`), bad machines left out."""
        from vastai.api.offers import search_offers
        from vastai.api.query import parse_order

        query = dict(filters)
        if exclude_machines:
            query["machine_id"] = {"notin": sorted(exclude_machines)}
        rows = self._call(
            search_offers,
            self.client,
            query=query,
            offer_type="bid" if interruptible else "on-demand",
            order=parse_order(order),
            limit=limit,
            storage=disk_gb,
            no_default=True,
        )
        offers = [_offer(row, interruptible) for row in rows]
        # The server should have dropped them; a bad machine is never rented again regardless.
        return [o for o in offers if o.machine_id not in (exclude_machines or set())]

    def create(
        self,
        offer: Offer,
        *,
        image: str,
        disk_gb: float,
        label: str,
        onstart: str,
        bid: float | None,
    ) -> int:
        """Rent `offer`; returns the new instance id. An offer found by an interruptible search
        needs a bid: without one Vast silently rents it on demand (vast-cli#403)."""
        from vastai.api.instances import build_create_instance_payload, create_instance_from_payload

        if offer.interruptible and bid is None:
            raise VastError(
                f"offer {offer.id} is interruptible: a bid is needed (--bid $/h), or vast.ai "
                "rents it on demand at the full price"
            )
        if bid is not None and offer.min_bid is not None and bid < offer.min_bid:
            raise VastError(
                f"offer {offer.id}: bid ${bid:.3f}/h is under its min bid ${offer.min_bid:.3f}/h"
            )
        payload = build_create_instance_payload(
            image=image, disk=disk_gb, label=label, onstart_cmd=onstart, bid_price=bid, runtype="ssh"
        )  # fmt: skip
        # vastai fills every unset field with null and env with {}; the spec types them as
        # strings (env: "-e K=V" flags), so send only what is set.
        payload = {k: v for k, v in payload.items() if v is not None and v != {}}
        answer = self._call(create_instance_from_payload, self.client, offer.id, payload)
        if not answer.get("success") or "new_contract" not in answer:
            raise VastError(f"offer {offer.id}: create answered {answer.get('msg') or answer}")
        return int(answer["new_contract"])

    def instances(self) -> list[Instance]:
        """Every instance of the account (all pages)."""
        from vastai.api.instances import show_instances

        return [_instance(row) for row in self._call(show_instances, self.client)]

    def show(self, instance_id: int) -> Instance | None:
        """One instance, or None once it is gone (destroyed)."""
        from vastai.api.instances import show_instances

        rows = self._call(show_instances, self.client, select_filters={"id": {"eq": instance_id}})
        found = [_instance(r) for r in rows if int(r["id"]) == instance_id]
        return found[0] if found else None

    def label(self, instance_id: int, label: str) -> None:
        from vastai.api.instances import label_instance

        self._call(label_instance, self.client, instance_id, label)

    def attach_key(self, instance_id: int, public_key: str) -> None:
        from vastai.api.keys import attach_ssh

        self._call(attach_ssh, self.client, instance_id, public_key)

    def destroy(self, instance_id: int) -> None:
        """Destroy (billing stops); an instance already gone counts as destroyed."""
        from vastai.api.instances import destroy_instance

        try:
            self._call(destroy_instance, self.client, instance_id)
        except VastError as exc:
            if getattr(exc, "status", None) != 404:
                raise

    def stop(self, instance_id: int) -> None:
        """Stop: the GPU is released but the disk still bills."""
        from vastai.api.instances import stop_instance

        self._call(stop_instance, self.client, instance_id)

    # ---------------------------------------------------------------- errors and backoff

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import requests

        waits = list(self.backoff)
        while True:
            try:
                return fn(*args, **kwargs)
            except requests.HTTPError as exc:
                response = exc.response
                if response is not None and response.status_code == 429 and waits:
                    time.sleep(waits.pop(0))
                    continue
                raise self._http_error(response) from None
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise VastUnavailable(
                    f"cannot reach the vast.ai API at {self.url} ({type(exc).__name__}); "
                    "nothing was rented or changed by this call"
                ) from None
            except ValueError as exc:  # a body that is not JSON
                raise VastUnavailable(
                    f"the vast.ai API at {self.url} answered garbage: {exc}"
                ) from None

    def _http_error(self, response: Any) -> VastError:
        status = response.status_code if response is not None else 0
        try:
            body = response.json()
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        msg = str(body.get("msg") or body.get("detail") or body.get("error") or response.reason)
        error: VastError
        # searchOffers documents a bad key as 404 "Invalid user key"; the others as 401/403.
        if (
            status in (401, 403) and body.get("error") != "invalid_args"
        ) or "user key" in msg.lower():
            error = VastAuthError(f"vast.ai refused the API key: {msg}")
        elif status == 429:
            error = VastUnavailable(f"vast.ai is still rate-limiting after the backoff: {msg}")
        elif status >= 500:
            error = VastUnavailable(f"the vast.ai API failed ({status}): {msg}")
        else:
            error = VastError(f"vast.ai answered {status}: {msg}")
        error.status = status  # type: ignore[attr-defined]
        return error


def _num(value: Any, default: float = 0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _offer(row: dict[str, Any], interruptible: bool) -> Offer:
    min_bid = row.get("min_bid")
    return Offer(
        id=int(row["id"]),
        machine_id=int(row.get("machine_id") or 0),
        gpu_name=str(row.get("gpu_name") or "?"),
        num_gpus=int(row.get("num_gpus") or 0),
        gpu_ram_gb=_num(row.get("gpu_ram")) / 1000,  # MB in the API (openapi.yaml "Key Quirks")
        dph=_num(row.get("dph_total")),
        min_bid=None if min_bid is None else _num(min_bid),
        reliability=_num(row.get("reliability2", row.get("reliability"))),
        inet_down=_num(row.get("inet_down")),
        cuda=str(row.get("cuda_max_good") or ""),
        driver=str(row.get("driver_version") or ""),
        disk_gb=_num(row.get("disk_space")),
        location=str(row.get("geolocation") or ""),
        interruptible=interruptible,
        raw=row,
    )


def _instance(row: dict[str, Any]) -> Instance:
    # vast.ai logs in as root and its ssh_host is a bare host name; a `user@host` there is
    # taken as is (the tests' boxes log in as their own uid-0 user: root's HOME is shared).
    user, _, host = str(row.get("ssh_host") or "").rpartition("@")
    return Instance(
        id=int(row["id"]),
        label=str(row.get("label") or ""),
        status=str(row.get("actual_status") or "created"),
        intended=str(row.get("intended_status") or ""),
        machine_id=int(row.get("machine_id") or 0),
        ssh_host=host or None,
        ssh_port=int(row["ssh_port"]) if row.get("ssh_port") else None,
        ssh_user=user or "root",
        dph=_num(row.get("dph_total")),
        is_bid=bool(row.get("is_bid")),
        start_date=_num(row.get("start_date")),
        gpu_name=str(row.get("gpu_name") or "?"),
        num_gpus=int(row.get("num_gpus") or 0),
        storage_cost=_num(row.get("storage_cost")),
        disk_gb=_num(row.get("disk_space")),
        raw=row,
    )
