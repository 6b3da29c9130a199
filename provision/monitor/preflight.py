"""Pre-flight checks of a box against what a run needs: GPUs, disk, RAM, cores, tools.

`run_preflight(params)` returns rows `(check, value, expected, ok, detail)` for a table or JSON;
`preflight_report(params)` wraps them for `bootstrap check TARGET` (run on the box by the agent,
one SSH round trip). The `preflight` step kind (provision/steps/preflight.py) fails with the
failing rows. Params (all optional, see DEFAULTS):

- `min_gpus`, `min_gpu_memory_gb` (GB = 10^9 bytes: an "80GB" H100 has 85.5), `gpu_name` (a
  regex every GPU's name must match), `min_driver` ("570"), `min_cuda` ("12.8"). Any GPU that
  nvidia-smi shows as `ERR!` or cannot reach fails the check, although nvidia-smi exits 0.
- `disk`: `{path: GB}` needed under each path. Paths on the same filesystem are summed; a path
  that does not exist yet is measured at its nearest parent.
- Checkpoints add to the disk of `checkpoint_dir`: `checkpoint_gb` (a PyTorch training
  checkpoint of the waypoint AE is ~22 GB) times either `checkpoints` (a count that must fit)
  or, for a job that keeps only the newest `checkpoint_keep` (its `checkpoints.keep`), keep + 1
  (the next one is written before the oldest goes) less the complete ones already there; plus
  `checkpoint_margin` (a fraction, default 10 %). Complete checkpoints already in
  `checkpoint_dir` (digit-named subdirectories, as the fork and openpi name them) are measured,
  and a real size above the declared one wins: the disk is sized from what the job writes.
- `workers` (DataLoader worker processes in total), `gb_per_worker` (seed 001: 2-3 GB),
  `base_ram_gb` (the training processes themselves), `trainers` (processes, default
  `min_gpus`): available RAM must hold base + workers × gb_per_worker, and there must be a core
  per worker and per trainer (a worker saturates one core; too few starve the GPU).
- `tools`: executables that must be on PATH (`python3` is also checked against `min_python`).
- `gpus`: the GPUs the run's jobs will use (as tmux_launch's `gpus:`; default all of them when
  `min_gpus` > 0): none may be held by a live job of another run on the box
  (provision/agent/gpus.py), or its launch would be refused hours later.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Any

from provision.agent import catalog, gpus
from provision.monitor import checkpoint_disk, gpu, host

DEFAULTS: dict[str, Any] = {
    "min_gpus": 1,
    "min_gpu_memory_gb": None,
    "gpu_name": None,
    "min_driver": None,
    "min_cuda": None,
    "disk": {},
    "checkpoint_dir": None,
    "checkpoints": 0,
    "checkpoint_gb": 22.0,
    "checkpoint_keep": None,
    "checkpoint_margin": 0.1,
    "workers": 0,
    "gb_per_worker": 2.5,
    "base_ram_gb": 15.0,
    "trainers": None,
    "tools": ["python3", "tmux"],
    "min_python": "3.9",
    "gpus": None,
}

VERSION = re.compile(r"^\d+(?:\.\d+)*$")


@dataclass(frozen=True)
class Row:
    """One check: what was found (`value`), what is needed (`expected`), and whether it holds;
    `detail` says why it failed or how to fix it."""

    check: str
    value: str
    expected: str
    ok: bool
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


def run_preflight(
    params: dict[str, Any] | None = None,
    *,
    nvidia_smi: str = "nvidia-smi",
    env: dict[str, str] | None = None,
    run: str | None = None,
) -> list[Row]:
    """Every check's row, GPUs first. `env` (PATH) is where nvidia-smi and the tools are found;
    `run` is the run being checked (its own jobs' GPU leases are no obstacle)."""
    p = dict(DEFAULTS, **(params or {}))
    rows = _gpu_rows(p, gpu.query_gpus(nvidia_smi, env))
    rows += _lease_rows(p, run)
    rows += _disk_rows(p)
    rows += _ram_rows(p)
    rows += _tool_rows(p, env)
    return rows


def preflight_report(params: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """`{"ok", "rows", "failed"}` for `bootstrap check` (JSON-serialisable)."""
    rows = run_preflight(params, **kwargs)
    return {
        "ok": all(r.ok for r in rows),
        "rows": [r.to_dict() for r in rows],
        "failed": [r.check for r in rows if not r.ok],
    }


def version_at_least(found: str | None, minimum: str) -> bool:
    """Whether a dotted version ("570.172.08") is at least `minimum` ("570")."""
    if not found:
        return False
    have = [int(x) for x in re.findall(r"\d+", found)]
    want = [int(x) for x in minimum.split(".")]
    have += [0] * (len(want) - len(have))
    return have[: len(want)] >= want


def _gpu_rows(p: dict[str, Any], report: gpu.GpuReport) -> list[Row]:
    need = int(p["min_gpus"])
    if report.error:
        hint = catalog.hint_for(report.error) or ""
        return [Row("gpus", report.error, f">= {need}", need == 0, "" if need == 0 else hint)]
    gpus = report.gpus
    names = sorted({g.name for g in gpus})
    rows = [
        Row("gpus", f"{len(gpus)} × {', '.join(names) or 'none'}", f">= {need}", len(gpus) >= need)
    ]
    problems = report.problems()
    hint = (catalog.hint_for("\n".join(problems)) or "") if problems else ""
    rows.append(
        Row(
            "gpu health",
            "; ".join(problems) or "all OK",
            "no ERR!, no lost GPU",
            not problems,
            hint,
        )
    )
    if p["gpu_name"]:
        rx = re.compile(p["gpu_name"])
        bad = [g.name for g in gpus if not rx.search(g.name)]
        rows.append(Row("gpu model", ", ".join(names), f"matches /{p['gpu_name']}/", not bad))
    if p["min_gpu_memory_gb"] is not None:
        rows.append(_gpu_memory_row(gpus, float(p["min_gpu_memory_gb"])))
    driver, cuda = report.driver_version, report.cuda_version
    if p["min_driver"]:
        ok = version_at_least(driver, p["min_driver"])
        rows.append(Row("nvidia driver", driver or "unknown", f">= {p['min_driver']}", ok))
    else:
        rows.append(Row("nvidia driver", driver or "unknown", "any", True))
    if p["min_cuda"]:
        ok = version_at_least(cuda, p["min_cuda"])
        detail = "" if ok else "the driver's CUDA is older than the wheels need; rent another box"
        rows.append(Row("cuda (driver)", cuda or "unknown", f">= {p['min_cuda']}", ok, detail))
    else:
        rows.append(Row("cuda (driver)", cuda or "unknown", "any", True))
    return rows


def _lease_rows(p: dict[str, Any], run: str | None) -> list[Row]:
    """Whether the GPUs the run will use are free of other runs' jobs (none: no GPU needed)."""
    if p["gpus"] is None and not int(p["min_gpus"]):
        return []
    wanted = gpus.gpu_set(gpus.gpus_value(p["gpus"]) if p["gpus"] is not None else None)
    others = [lease for lease in gpus.GpuLeases().live() if lease.run != run]
    held = [lease for lease in others if gpus.shared(wanted, lease.gpus)]
    shown = "; ".join(f"{gpus.gpus_text(x.gpus)}: {x.describe()}" for x in others)
    expected = f"{gpus.gpus_text(wanted)} held by no other run's job"
    detail = held[0].stop_hint() if held else ""
    return [Row("gpus free", shown or "no job holds a GPU", expected, not held, detail)]


def _gpu_memory_row(gpus: list[gpu.Gpu], need: float) -> Row:
    sizes = [(g.memory_total_gb or 0.0, g) for g in gpus]
    if not sizes:
        return Row("gpu memory", "no GPU", f">= {need:g} GB each", False)
    smallest, g = min(sizes, key=lambda s: s[0])
    value = f"{smallest:.1f} GB ({g.memory_total_mib:.0f} MiB, gpu{g.index})"
    return Row("gpu memory", value, f">= {need:g} GB each", smallest >= need)


def _disk_rows(p: dict[str, Any]) -> list[Row]:
    needs: list[tuple[str, float, str]] = [
        (path, float(gb), f"{float(gb):.10g} for {path}") for path, gb in (p["disk"] or {}).items()
    ]
    if p["checkpoint_dir"] and (p["checkpoints"] or p["checkpoint_keep"]):
        needs.append((p["checkpoint_dir"], *_checkpoint_need(p)))
    groups: dict[int, dict[str, Any]] = {}
    for path, gb, what in needs:
        info = host.disk(path)
        group = groups.setdefault(info["device"], {"info": info, "paths": [], "gb": 0.0, "why": []})
        group["paths"].append(path)
        group["gb"] += gb
        group["why"].append(what)
    rows = []
    for group in groups.values():
        free = group["info"]["free_gb"]
        ok = free >= group["gb"]
        detail = (
            "" if ok else "free space or rent a bigger disk (checkpoints pile up during training)"
        )
        rows.append(
            Row(
                "disk " + ", ".join(group["paths"]),
                f"{free:.1f} GB free of {group['info']['total_gb']:.0f}",
                f">= {group['gb']:.1f} GB ({' + '.join(group['why'])})",
                ok,
                detail,
            )
        )
    return rows


def _checkpoint_need(p: dict[str, Any]) -> tuple[float, str]:
    """GB the checkpoints need on their disk, and how that was reckoned (module doc)."""
    declared = float(p["checkpoint_gb"])
    there, found = checkpoint_disk.measure(p["checkpoint_dir"], newest=checkpoint_disk.SIZE_WINDOW)
    measured = max((c.bytes for c in found), default=0) / checkpoint_disk.GB
    size = max(declared, measured)
    each = f"{size:.3g} measured" if measured > declared else f"{declared:g}"
    keep = p["checkpoint_keep"]
    if keep:
        count = keep + 1 - min(there, keep)
        why = f"keep {keep} + 1 being written" + (f", {there} there" if there else "")
    else:
        count, why = int(p["checkpoints"]), ""
    margin = float(p["checkpoint_margin"] or 0.0)
    what = f"{count} checkpoints × {each}" + (f" ({why})" if why else "")
    if margin:
        what += f" + {100 * margin:g} %"
    return count * size * (1 + margin), what


def _ram_rows(p: dict[str, Any]) -> list[Row]:
    workers = int(p["workers"])
    mem = host.memory()
    need = float(p["base_ram_gb"]) + workers * float(p["gb_per_worker"])
    why = f"{float(p['base_ram_gb']):g} base + {workers} workers × {float(p['gb_per_worker']):g}"
    ok = mem["available_gb"] >= need
    rows = [
        Row(
            "ram",
            f"{mem['available_gb']:.1f} GB available of {mem['total_gb']:.1f}",
            f">= {need:.1f} GB ({why})",
            ok,
            "" if ok else "fewer DataLoader workers, or a box with more RAM (else the OOM killer)",
        )
    ]
    if workers:
        trainers = int(p["trainers"] if p["trainers"] is not None else max(1, int(p["min_gpus"])))
        cores = host.cpu_cores()
        need_cores = workers + trainers
        ok = cores >= need_cores
        rows.append(
            Row(
                "cpu cores",
                f"{cores:g}",
                f">= {need_cores} ({workers} workers + {trainers} trainers)",
                ok,
                "" if ok else "fewer workers: each one saturates a core",
            )
        )
    return rows


def _tool_rows(p: dict[str, Any], env: dict[str, str] | None) -> list[Row]:
    path_var = (env if env is not None else os.environ).get("PATH")
    rows = []
    for tool in p["tools"] or []:
        found = shutil.which(tool, path=path_var)
        if found is None:
            rows.append(Row(tool, "not found", "on PATH", False, f"install {tool}"))
            continue
        version = _version(found, "-V" if tool == "tmux" else "--version")
        if tool.startswith("python") and p["min_python"]:
            ok = version_at_least(version, p["min_python"])
            rows.append(Row(tool, version or found, f">= {p['min_python']}", ok))
        else:
            rows.append(Row(tool, version or found, "on PATH", True))
    return rows


def _version(binary: str, flag: str) -> str | None:
    try:
        out = subprocess.run(
            [binary, flag], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\d+(?:\.\d+)+[a-z]?\w*", out.stdout + out.stderr)
    return m.group(0) if m else None
