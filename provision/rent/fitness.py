"""A new box's fitness, checked in its first minute, before any hour is spent on it.

Two SSH round trips: the agent's preflight (`bootstrap check`: GPU count and model, `ERR!` or
lost GPUs, driver and CUDA version, free disk, python) with needs taken from the offer that was
rented, and a download probe that reads from the package index and from GCS for a few seconds
and reports the speed really measured. A listing that promised 800 Mbit/s and delivers 60 is a
box that will spend an hour on `uv sync` and the dataset: it fails.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from typing import Any

from provision.rent.vast import Offer

# What the first steps of every runbook download from: the package index (uv sync, pip) and
# GCS (checkpoints, datasets). Both are large files read for a few seconds: PyPI's JSON for torch
# is followed to its largest wheel (hundreds of MB), and Landsat's public index on GCS is as big.
# A small page would measure TLS set-up, not bandwidth.
SPEED_URLS = (
    "https://pypi.org/pypi/torch/json",
    "https://storage.googleapis.com/gcp-public-data-landsat/index.csv.gz",
)
SPEED_URLS_ENV = "BOOTSTRAP_SPEED_URLS"  # space-separated: probe these instead (a local mirror)
PROBE_SECONDS = 4.0
PROBE_BYTES = 256 * 1024 * 1024

# Runs on the box (stdlib python3 only). For each URL: a JSON answer listing files (`urls`, as
# PyPI's JSON API does) is followed to its largest file; the body is then read for at most `s`
# seconds or `n` bytes, timed from its first byte (connection and TLS set-up left out).
_PROBE = r"""
import json,sys,time,urllib.request
a=json.load(sys.stdin);out=[]
def get(u):
    return urllib.request.urlopen(urllib.request.Request(u,headers={"User-Agent":"bootstrap-probe"}),timeout=10)
for u in a["urls"]:
    n=0;err="";t=time.monotonic();e=t;f=u
    try:
        r=get(u)
        if "json" in r.headers.get("Content-Type",""):
            files=json.load(r).get("urls") or []
            f=max(files,key=lambda x:x.get("size") or 0)["url"];r=get(f)
        b=r.read(65536);t=time.monotonic()
        while b and n<a["n"] and time.monotonic()-t<a["s"]:
            n+=len(b);b=r.read(262144)
        e=time.monotonic()
    except Exception as x:
        err="%s: %s"%(type(x).__name__,x);e=time.monotonic()
    out.append({"url":u,"file":f,"bytes":n,"seconds":max(e-t,1e-6),"error":err})
print(json.dumps(out))
"""


def default_speed_urls() -> tuple[str, ...]:
    """`$BOOTSTRAP_SPEED_URLS` (space-separated), else the package index and GCS."""
    import os

    return tuple(os.environ.get(SPEED_URLS_ENV, "").split()) or SPEED_URLS


@dataclass(frozen=True)
class Fitness:
    """The verdict: every row, and the failing checks by name."""

    rows: list[dict[str, Any]]

    @property
    def failed(self) -> list[str]:
        return [r["check"] for r in self.rows if not r["ok"]]

    @property
    def ok(self) -> bool:
        return not self.failed

    def reason(self) -> str:
        """One line: the failing rows with what was found."""
        bad = [r for r in self.rows if not r["ok"]]
        return "; ".join(f"{r['check']}: {r['value']} (need {r['expected']})" for r in bad)


def gpu_pattern(offer_gpu: str) -> str:
    """A regex nvidia-smi's name must match for the listed GPU: its model number ("RTX 4090"
    -> 4090, "H100 SXM" -> H100; nvidia-smi says "NVIDIA H100 80GB HBM3", not "SXM")."""
    for word in re.split(r"[\s_]+", offer_gpu):
        if re.search(r"\d", word):
            return re.escape(word)
    return re.escape(offer_gpu)


def preflight_params(offer: Offer, disk_gb: float) -> dict[str, Any]:
    """What the listing promises, as preflight needs: every GPU there, healthy and of the
    listed model, the listed CUDA, and the disk that was paid for (90%: the image uses some)."""
    params: dict[str, Any] = {
        "min_gpus": offer.num_gpus,
        "gpu_name": gpu_pattern(offer.gpu_name),
        "disk": {"/": round(disk_gb * 0.9, 1)},
        "tools": ["python3"],
        "base_ram_gb": 0.0,
    }
    if re.match(r"^\d+(\.\d+)?$", offer.cuda):
        params["min_cuda"] = offer.cuda
    return params


def speed_rows(
    results: list[dict[str, Any]], listed_mbps: float, min_ratio: float, min_mbps: float
) -> list[dict[str, Any]]:
    """One row per probed URL: measured Mbit/s against max(min_mbps, min_ratio × listing)."""
    need = max(min_mbps, min_ratio * listed_mbps)
    rows = []
    for r in results:
        mbps = r["bytes"] * 8 / r["seconds"] / 1e6
        ok = not r["error"] and mbps >= need
        value = (
            r["error"] or f"{mbps:.0f} Mbit/s ({r['bytes'] / 1e6:.1f} MB in {r['seconds']:.1f} s)"
        )
        rows.append(
            {
                "check": f"download {_host_of(r['url'])}",
                "value": value,
                "expected": f">= {need:.0f} Mbit/s (listed {listed_mbps:.0f})",
                "ok": ok,
                "detail": "" if ok else "the box downloads far slower than its listing",
            }
        )
    return rows


def _host_of(url: str) -> str:
    match = re.match(r"^[a-z]+://([^/]+)", url)
    return match.group(1) if match else url


def check(
    box: Any,
    offer: Offer,
    disk_gb: float,
    *,
    speed_urls: tuple[str, ...] = SPEED_URLS,
    min_ratio: float = 0.2,
    min_mbps: float = 50.0,
) -> Fitness:
    """Preflight plus download probe on a freshly rented box (a controller `Box`)."""
    from provision import controller

    report = controller.check(box, preflight_params(offer, disk_gb), {})
    rows = list(report["rows"])
    if speed_urls:
        payload = json.dumps({"urls": list(speed_urls), "s": PROBE_SECONDS, "n": PROBE_BYTES})
        result = box.transport.run(
            f"python3 -c {shlex.quote(_PROBE)}", payload.encode(), timeout=15 + 12 * len(speed_urls)
        )
        if result.rc != 0:
            rows.append(
                {"check": "download", "value": f"probe failed: {result.stderr.strip()[-200:]}",
                 "expected": "a speed", "ok": False, "detail": ""}
            )  # fmt: skip
        else:
            measured = json.loads(result.stdout.decode().strip().splitlines()[-1])
            rows += speed_rows(measured, offer.inet_down, min_ratio, min_mbps)
    return Fitness(rows)
