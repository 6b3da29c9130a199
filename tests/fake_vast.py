"""A fake vast.ai API on loopback whose instances are test sshd boxes (tests/boxes.py).

Held to the real thing twice:

- Vast's own OpenAPI spec (vast-ai/docs, `api-reference/openapi.yaml` at commit
  c624622622496828c1ae58edec481bba1f5d675d, git blob 5f36a511e2307386cadae6cff711ed426225df19)
  validates every request the fake receives and every response it sends (`openapi-core`); a
  request or response that does not validate is answered 599 with the validation error, which
  fails the test that caused it. The pinned copy is kept as test data (tests/data/vast/, with a
  README naming its source); `spec_path()` also honours `$VAST_OPENAPI_SPEC`. Without any copy
  the fake still serves (`validated` is False) and test_rent.py's spec test skips saying so.
- The real pinned client, `vastai==1.9.1`, is what talks to it (its server URL is `VAST_URL`).

Endpoints (spec path; the vastai 1.9.1 function that calls it, file:line in the wheel):

| spec                                  | vastai                               |
|---------------------------------------|--------------------------------------|
| GET  /api/v0/users/current (showUser) | api/billing.py:225 show_user         |
| POST /api/v0/bundles (searchOffers)   | api/offers.py:12 search_offers       |
| PUT  /api/v0/asks/{id} (createInstance)| api/instances.py:298 create_instance_from_payload |
| GET  /api/v1/instances (show instances)| api/instances.py:31, :61 show_instances(_v1) |
| PUT  /api/v0/instances/{id} (manageInstance: label, state) | api/instances.py:331 stop, :354 label |
| POST /api/v0/instances/{id}/ssh (attachSshKey) | api/keys.py:69 attach_ssh    |
| DELETE /api/v0/instances/{id} (destroyInstance) | api/instances.py:309 destroy_instance |

What the fake takes from the spec's words: `new_contract` is the new instance's id; a status of
exited/offline/unknown never reaches running ("Poll trap", info.description); a create without
`price` is on demand even for an offer found by a bid search (vast-cli#403); a bad key on
searchOffers is a 404 "Invalid user key", elsewhere 401. The client adds a trailing slash to
every path (api/client.py:140 builds `/api/v0` + subpath, the subpaths end in `/`); the spec's
paths have none, so the slash is dropped before validation.

Spec errata, applied to the loaded copy and nothing else: searchOffers' `type` enum lists
`ondemand`, yet its own example and vastai (api/offers.py:12, default `on-demand`) send
`on-demand`; the enum gets `on-demand` added. Its `order` puts `minItems: 2, maxItems: 2` on
the list of sort keys while its description (and vastai, api/query.py:251 `parse_order`:
`[["dph_total", "asc"]]`) means each entry; the bounds move to the entries.

Boxes: each offer has a `behaviour`: `healthy`, `err` (nvidia-smi shows ERR!, from
tests/fakes/nvidia-smi), `no_ssh` (running, but nothing listens on its SSH port), `exits`
(goes `exited` while loading). A box is started when its instance leaves `loading`; keys
attached through the API are written to its authorized_keys then, after `key_delay` seconds;
its on-start script runs in it through SSH with the fake's own operator key, as vast's
container runs `onstart`. `stop()` / `outbid()` kill every process of the box (a stopped
container), `offline()` kills its sshd only (the machine dropped off the network).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import operator
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from boxes import Box, make_key, start_box
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

SPEC_BLOB = "5f36a511e2307386cadae6cff711ed426225df19"  # git blob of the pinned openapi.yaml
SPEC_COMMIT = "c624622622496828c1ae58edec481bba1f5d675d"
FAKES = Path(__file__).resolve().parent / "fakes"
REPO = Path(__file__).resolve().parent.parent


def spec_path() -> Path | None:
    """Vast's pinned openapi.yaml: `$VAST_OPENAPI_SPEC`, else the copy kept as test data
    (tests/data/vast/openapi.yaml, see its README), else shared/vast/openapi.yaml."""
    candidates = [os.environ.get("VAST_OPENAPI_SPEC")]
    candidates += [str(Path(__file__).resolve().parent / "data" / "vast" / "openapi.yaml")]
    candidates += [str(REPO.parent / "shared" / "vast" / "openapi.yaml")]
    candidates += [str(REPO / "shared" / "vast" / "openapi.yaml")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def git_blob_sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@functools.cache
def _checked_spec(path: Path) -> dict[str, Any]:
    """The pinned spec (its blob hash checked), errata applied, validated as an OpenAPI document:
    once per process (parsing and validating it takes seconds of CPU; every FakeVast needs it)."""
    from openapi_core import OpenAPI

    data = path.read_bytes()
    if git_blob_sha(data) != SPEC_BLOB:
        raise AssertionError(f"{path} is not openapi.yaml at vast-ai/docs@{SPEC_COMMIT}")
    spec: dict[str, Any] = yaml.load(data, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    search = spec["paths"]["/api/v0/bundles"]["post"]["requestBody"]["content"]
    props = search["application/json"]["schema"]["properties"]
    props["type"]["enum"].append("on-demand")
    order = props["order"]
    order["items"]["minItems"] = order.pop("minItems")
    order["items"]["maxItems"] = order.pop("maxItems")
    OpenAPI.from_dict(spec)  # raises when the document (errata applied) is not valid OpenAPI
    return spec


def load_spec(path: Path, url: str) -> Any:
    """The pinned spec (see `_checked_spec`), served from `url`: requests and responses are
    validated against it exactly as before; only the document's own check is not repeated (the
    server URL does not change whether the document is valid)."""
    from openapi_core import Config, OpenAPI

    spec = {**_checked_spec(path), "servers": [{"url": url}]}
    return OpenAPI.from_dict(spec, config=Config(spec_validator_cls=None))


def offer_row(offer_id: int, machine_id: int, **over: Any) -> dict[str, Any]:
    """An offer as searchOffers lists one (fields of the spec's example; vast's units: gpu_ram
    MB, inet_down Mbit/s, disk_space GB, storage_cost $/GB/month)."""
    row = {
        "id": offer_id, "ask_contract_id": offer_id, "machine_id": machine_id,
        "host_id": 1000 + machine_id, "gpu_name": "RTX 4090", "num_gpus": 2, "gpu_ram": 24564,
        "gpu_total_ram": 49128, "cpu_cores": 32, "cpu_cores_effective": 16.0, "cpu_ram": 128000,
        "disk_space": 500.0, "disk_bw": 2000.0, "dph_base": 0.6, "dph_total": 0.62,
        "min_bid": 0.3, "storage_cost": 0.15, "reliability": 0.995, "reliability2": 0.995,
        "inet_down": 900.0, "inet_up": 800.0, "cuda_max_good": 12.8,
        "driver_version": "570.172.08", "geolocation": "Norway, NO", "verified": True,
        "verification": "verified", "rentable": True, "rented": False, "external": False,
        "compute_cap": 890, "dlperf": 60.0, "score": 100.0, "is_bid": False,
        "static_ip": True, "direct_port_count": 10, "os_version": "22.04",
    }  # fmt: skip
    row.update(over)
    return row


@dataclass
class FakeOffer:
    row: dict[str, Any]
    behaviour: str = "healthy"
    nvidia: str = "healthy"  # tests/fakes/nvidia-smi preset inside the box


@dataclass
class FakeInstance:
    id: int
    offer: FakeOffer
    label: str | None
    disk: float
    price: float | None  # the bid; None: on demand
    onstart: str
    image: str
    created: float = field(default_factory=time.time)
    status: str | None = None  # actual_status: None (created) -> loading -> running ...
    cur_state: str = "running"
    intended: str = "running"
    keys: list[str] = field(default_factory=list)
    box: Box | None = None
    dead_port: int | None = None
    ended: bool = False


class FakeVast:
    """The fake API server; `url` goes into VAST_URL. Use as a context manager."""

    def __init__(
        self,
        root: Path,
        spec: Path | None,
        *,
        api_key: str = "test-key-0123456789",
        created_s: float = 0.2,
        loading_s: float = 0.4,
        key_delay: float = 0.0,
    ) -> None:
        self.root = root
        self.api_key = api_key
        self.created_s, self.loading_s, self.key_delay = created_s, loading_s, key_delay
        self.offers: dict[int, FakeOffer] = {}
        self.instances: dict[int, FakeInstance] = {}
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, json body)
        self.violations: list[str] = []
        self.rate_limited = 0  # the next N create calls answer 429
        self.taken: set[int] = set()  # offers someone else rents between search and create
        self._ids = iter(range(7_000_001, 8_000_000))
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.operator_key = make_key(root / "operator" / "id_ed25519", "fake-vast-operator")
        self.blob = b"\0" * (8 * 1024 * 1024)
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        self._server = make_server("127.0.0.1", 0, self._wsgi, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self.openapi = load_spec(spec, self.url) if spec is not None else None
        self.validated = self.openapi is not None
        self._threads = [
            threading.Thread(target=self._server.serve_forever, daemon=True),
            threading.Thread(target=self._tick, daemon=True),
        ]

    # ------------------------------------------------------------------ test controls

    def add_offer(
        self,
        offer_id: int,
        machine_id: int,
        behaviour: str = "healthy",
        nvidia: str = "healthy",
        **row: Any,
    ) -> None:
        self.offers[offer_id] = FakeOffer(offer_row(offer_id, machine_id, **row), behaviour, nvidia)

    def stop(self, instance_id: int) -> None:
        """The instance is stopped (outbid): every process of its box dies, state stopped."""
        with self._lock:
            inst = self.instances[instance_id]
            inst.status, inst.cur_state = "exited", "stopped"
        if inst.box is not None:
            inst.box.kill_all()

    def outbid(self, instance_id: int) -> None:
        """An interruptible instance outbid: stopped by vast.ai, though intended running."""
        self.stop(instance_id)

    def offline(self, instance_id: int) -> None:
        """The machine dropped off the network: its sshd stops answering."""
        with self._lock:
            inst = self.instances[instance_id]
            inst.status = "offline"
        if inst.box is not None:
            inst.box.stop()

    def live(self) -> list[FakeInstance]:
        """Instances not destroyed (what is still billing)."""
        with self._lock:
            return [i for i in self.instances.values() if not i.ended]

    def calls(self, method: str, prefix: str) -> list[Any]:
        return [body for m, p, body in self.requests if m == method and p.startswith(prefix)]

    def __enter__(self) -> FakeVast:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.shutdown()
        for inst in list(self.instances.values()):
            if inst.box is not None:
                inst.box.close()
        for t in self._threads:
            t.join(timeout=10)

    # ------------------------------------------------------------------ HTTP

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ["PATH_INFO"] == "/blob.json":  # as PyPI's JSON API lists a release's files
            files = {"urls": [{"url": f"{self.url}/blob", "size": len(self.blob)},
                              {"url": f"{self.url}/nothing", "size": 10}]}  # fmt: skip
            return Response(json.dumps(files), content_type="application/json")(
                environ, start_response
            )
        if environ["PATH_INFO"] == "/blob":  # the download-speed probe's object, not the API
            return Response(self.blob, content_type="application/octet-stream")(
                environ, start_response
            )
        environ["PATH_INFO"] = environ["PATH_INFO"].rstrip("/")
        request = Request(environ)
        response = self._validated(request)
        return response(environ, start_response)

    def _validated(self, request: Request) -> Response:
        from openapi_core.contrib.werkzeug import WerkzeugOpenAPIRequest, WerkzeugOpenAPIResponse

        body = request.get_json(silent=True)
        self.requests.append((request.method, request.path, body))
        oreq = WerkzeugOpenAPIRequest(request)
        try:
            if self.openapi is not None:
                self.openapi.validate_request(oreq)
        except Exception as exc:
            return self._violation(f"request {request.method} {request.path}: {_why(exc)}")
        status, payload = self._handle(request, body)
        response = Response(json.dumps(payload), status=status, content_type="application/json")
        if status == 429:
            response.headers["Retry-After"] = "0.05"
        if self.openapi is None:
            return response
        try:
            self.openapi.validate_response(oreq, WerkzeugOpenAPIResponse(response))
        except Exception as exc:
            return self._violation(
                f"response {status} to {request.method} {request.path}: {_why(exc)}"
            )
        return response

    def _violation(self, message: str) -> Response:
        self.violations.append(message)
        return Response(
            json.dumps({"error": "spec_violation", "msg": message}),
            status=599,
            content_type="application/json",
        )

    def _handle(self, request: Request, body: Any) -> tuple[int, Any]:
        path, method = request.path, request.method
        parts = path.strip("/").split("/")
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            # Each operation's own documented answer to a bad key.
            if path == "/api/v0/bundles":
                return 404, {"error": "auth_error", "msg": "Invalid user key"}
            if method == "DELETE":
                return 404, {"success": False, "error": "not_found", "msg": "Invalid user key"}
            return 401, {"success": False, "error": "auth_error", "msg": "Invalid user key"}
        with self._lock:
            if path == "/api/v0/users/current":
                return 200, {"id": 42, "email": "test@example.com", "balance": 25.0, "sid": "x"}
            if path == "/api/v0/bundles":
                return 200, {"offers": self._search(body)}
            if parts[:3] == ["api", "v0", "asks"] and method == "PUT":
                return self._create(int(parts[3]), body)
            if path == "/api/v1/instances":
                return 200, self._list(request.args)
            if parts[:3] == ["api", "v0", "instances"] and len(parts) == 5 and parts[4] == "ssh":
                return self._attach(int(parts[3]), body)
            if parts[:3] == ["api", "v0", "instances"] and len(parts) == 4:
                inst = self.instances.get(int(parts[3]))
                if inst is None or inst.ended:
                    return 404, {
                        "success": False,
                        "error": "not_found",
                        "msg": "Instance not found",
                    }
                if method == "DELETE":
                    self._destroy(inst)
                    return 200, {"success": True, "msg": "Instance destroyed successfully"}
                return self._manage(inst, body)
        return 404, {"success": False, "error": "not_found", "msg": f"fake has no {method} {path}"}

    # ------------------------------------------------------------------ operations

    def _search(self, q: dict[str, Any]) -> list[dict[str, Any]]:
        rented = {i.offer.row["id"] for i in self.live()}
        skip = {"order", "type", "limit", "allocated_storage", "disable_bundling"}
        rows = []
        for offer in self.offers.values():
            row = dict(offer.row, rented=offer.row["id"] in rented)
            if row["rented"]:
                continue
            if all(_matches(row, name, cond) for name, cond in q.items() if name not in skip):
                if q.get("type") == "bid":
                    row["dph_total"], row["is_bid"] = row["min_bid"], True
                rows.append(row)
        for name, direction in reversed(q.get("order") or []):
            rows.sort(key=lambda r: r.get(name) or 0, reverse=direction == "desc")
        return rows[: int(q.get("limit") or 64)]

    def _create(self, offer_id: int, body: dict[str, Any]) -> tuple[int, Any]:
        if self.rate_limited:
            self.rate_limited -= 1
            return 429, {"detail": "API requests too frequent endpoint threshold=4.5"}
        if offer_id in self.taken:
            del self.offers[offer_id]
            msg = f"error 410/3907: no_such_ask Instance type {offer_id} is no longer available."
            return 410, {"success": False, "error": "no_such_ask", "msg": msg, "ask_id": offer_id}
        offer = self.offers.get(offer_id)
        if offer is None or offer_id in {i.offer.row["id"] for i in self.live()}:
            msg = f"error 404/3603: no_such_ask Instance type by id {offer_id} is not available."
            return 404, {"success": False, "error": "invalid_args", "msg": msg, "ask_id": offer_id}
        price = body.get("price")
        if price is not None and price < offer.row["min_bid"]:
            return 400, {
                "success": False,
                "error": "invalid_price",
                "msg": "bid under min_bid",
                "ask_id": offer_id,
            }
        inst = FakeInstance(
            id=next(self._ids), offer=offer, label=body.get("label"), disk=float(body.get("disk") or 10),
            price=price, onstart=body.get("onstart") or "", image=body["image"],
        )  # fmt: skip
        self.instances[inst.id] = inst
        return 200, {"success": True, "new_contract": inst.id}

    def _attach(self, instance_id: int, body: dict[str, Any]) -> tuple[int, Any]:
        inst = self.instances.get(instance_id)
        if inst is None or inst.ended:
            return 404, {"success": False, "error": "not_found", "msg": "Instance not found"}
        inst.keys.append(body["ssh_key"])
        if inst.box is not None:
            self._install_keys(inst)
        return 200, {"success": True, "msg": "SSH key attached successfully"}

    def _manage(self, inst: FakeInstance, body: dict[str, Any]) -> tuple[int, Any]:
        if "label" in body:
            inst.label = body["label"]
        if body.get("state") == "stopped":
            inst.intended, inst.cur_state, inst.status = "stopped", "stopped", "exited"
            if inst.box is not None:
                threading.Thread(target=inst.box.kill_all, daemon=True).start()
        return 200, {"success": True}

    def _destroy(self, inst: FakeInstance) -> None:
        inst.ended = True
        box, inst.box = inst.box, None
        if box is not None:
            threading.Thread(target=box.close, daemon=True).start()

    def _list(self, args: Any) -> dict[str, Any]:
        filters = json.loads(args.get("select_filters") or "{}")
        after = int(base64.b64decode(args["after_token"])) if args.get("after_token") else 0
        limit = min(int(args.get("limit") or 25), 25)
        rows = [self._row(i) for i in sorted(self.live(), key=lambda i: i.id) if i.id > after]
        rows = [r for r in rows if all(_matches(r, k, c) for k, c in filters.items())]
        page, more = rows[:limit], len(rows) > limit
        token = base64.b64encode(str(page[-1]["id"]).encode()).decode() if more else None
        labels: dict[str, int] = {}
        for r in rows:
            labels[r["label"] or ""] = labels.get(r["label"] or "", 0) + 1
        return {"success": True, "instances_found": len(page), "total_instances": len(rows),
                "label_counts": labels, "next_token": token, "instances": page}  # fmt: skip

    def _row(self, inst: FakeInstance) -> dict[str, Any]:
        o = inst.offer.row
        dph = inst.price if inst.price is not None else o["dph_total"]
        row: dict[str, Any] = {
            "id": inst.id, "actual_status": inst.status, "cur_state": inst.cur_state,
            "next_state": inst.cur_state, "intended_status": inst.intended, "label": inst.label,
            "image_uuid": inst.image, "image_args": [], "image_runtype": "ssh", "extra_env": [],
            "onstart": inst.onstart, "machine_id": o["machine_id"], "host_id": o["host_id"],
            "start_date": inst.created, "duration": time.time() - inst.created,
            "gpu_name": o["gpu_name"], "num_gpus": o["num_gpus"], "gpu_ram": o["gpu_ram"],
            "disk_space": inst.disk, "dph_base": dph, "dph_total": dph, "min_bid": o["min_bid"],
            "is_bid": inst.price is not None, "storage_cost": o["storage_cost"],
            "geolocation": o["geolocation"], "verification": "verified", "rentable": True,
            "static_ip": True, "external": False, "reliability2": o["reliability2"],
            "status_msg": None, "ports": None,
        }  # fmt: skip
        if inst.status == "running" and (inst.box is not None or inst.dead_port):
            # user@: a test box logs in as its own uid-0 user, not root (provision/rent/vast.py reads it)
            row["ssh_host"] = f"{inst.box.user}@{inst.box.host}" if inst.box else "127.0.0.1"
            row["ssh_port"] = inst.box.port if inst.box else inst.dead_port
            row["public_ipaddr"] = inst.box.host if inst.box else "127.0.0.1"
        return row

    # ------------------------------------------------------------------ the machines

    def _tick(self) -> None:
        while not self._stop.wait(0.05):
            with self._lock:
                due = [
                    i
                    for i in self.live()
                    if i.status in (None, "loading") and i.cur_state == "running"
                ]
            for inst in due:
                age = time.time() - inst.created
                if inst.status is None and age >= self.created_s:
                    inst.status = "loading"
                elif inst.status == "loading" and age >= self.created_s + self.loading_s:
                    self._boot(inst)

    def _boot(self, inst: FakeInstance) -> None:
        behaviour = inst.offer.behaviour
        if behaviour == "exits":
            inst.status = "exited"
            return
        if behaviour == "no_ssh":
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                inst.dead_port = s.getsockname()[1]
            inst.status = "running"
            return
        box = start_box(self.root / f"i{inst.id}", self.operator_key, f"i{inst.id}")
        (box.home / ".bashrc").write_text(
            f'export PATH="{FAKES}:$PATH" FAKE_NVIDIA_SMI={inst.offer.nvidia}\n'
        )
        if inst.onstart:
            box.ssh(inst.onstart)
        with self._lock:
            if inst.ended:  # destroyed while booting
                threading.Thread(target=box.close, daemon=True).start()
                return
            inst.box = box
            inst.status = "running"
        if self.key_delay:
            threading.Timer(self.key_delay, self._install_keys, args=(inst,)).start()
        else:
            self._install_keys(inst)

    def _install_keys(self, inst: FakeInstance) -> None:
        with self._lock:
            if inst.box is None:
                return
            keys = inst.box.home / ".ssh" / "authorized_keys"
            have = keys.read_text()
            new = [k for k in inst.keys if k not in have]
            with keys.open("a") as f:
                for k in new:
                    f.write(k + "\n")


def _why(exc: Exception) -> str:
    details = [str(exc)]
    with contextlib.suppress(Exception):
        details += [str(e) for e in exc.__cause__.schema_errors]  # type: ignore[union-attr]
    return " | ".join(details)[:2000]


def _matches(row: dict[str, Any], name: str, cond: Any) -> bool:
    """A searchOffers filter (`{"gte": 4}`, `{"in": [...]}`) against a row's field."""
    if not isinstance(cond, dict):
        return True
    if name not in row:
        raise ValueError(f"fake offers have no field {name!r}")
    have = row[name]
    for op, want in cond.items():
        if op in ("in", "notin"):
            inside = have in [_coerce(have, w)[1] for w in want]
            ok = inside if op == "in" else not inside
        else:
            a, b = _coerce(have, want)
            ok = _OPS[op](a, b)
        if not ok:
            return False
    return True


_OPS = {"eq": operator.eq, "neq": operator.ne, "gt": operator.gt, "gte": operator.ge,
        "lt": operator.lt, "lte": operator.le}  # fmt: skip


def _coerce(have: Any, want: Any) -> tuple[Any, Any]:
    """The API compares numbers the query sends as strings ('2') with numeric fields."""
    if isinstance(have, bool) or not isinstance(have, (int, float)) or isinstance(want, list):
        return have, want
    try:
        return have, float(want)
    except (TypeError, ValueError):
        return have, want
