"""GPUs as nvidia-smi reports them: model, memory, utilisation, temperature, driver and CUDA.

Two calls: the CSV query (`QUERY`) for the numbers, and plain `nvidia-smi` for the CUDA version
in its header and for `ERR!` cells. nvidia-smi exits 0 while a GPU's row shows `ERR!` (a fan,
temperature or power reading it cannot get, i.e. a sick GPU), and the CSV query does not show
that cell at all, so a GPU is healthy only when neither output shows an error for it. Lines such
as `Unable to determine the device handle for GPU...: Unknown Error` mean a GPU is lost.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

FIELDS = (
    "index",
    "name",
    "memory.total",
    "memory.used",
    "utilization.gpu",
    "temperature.gpu",
    "driver_version",
)
QUERY = ["--query-gpu=" + ",".join(FIELDS), "--format=csv,noheader,nounits"]
#: Cell values that mean nvidia-smi could not read the value because the GPU is in error.
ERROR_VALUES = ("ERR!", "[Unknown Error]", "[GPU requires reset]", "[GPU is lost]")
#: Cell values that only mean "not available here" (MIG mode, unsupported sensor, ...).
NA_VALUES = ("", "N/A", "[N/A]", "[Not Supported]", "[Insufficient Permissions]")

_DRIVER = re.compile(r"(?:Driver|KMD) Version:\s*([\w.]+)")
_CUDA = re.compile(r"CUDA (?:UMD )?Version:\s*([\w.]+)")
_GPU_ROW = re.compile(r"^\|\s+(\d+)\s+\S")
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


@dataclass
class Gpu:
    """One GPU; numbers are None when nvidia-smi shows N/A or an error for them."""

    index: int
    name: str
    memory_total_mib: float | None = None
    memory_used_mib: float | None = None
    utilization_pct: float | None = None
    temperature_c: float | None = None
    driver_version: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """False when nvidia-smi shows an error value for this GPU."""
        return not self.errors

    @property
    def memory_pct(self) -> float | None:
        """Used memory in percent of the total."""
        if self.memory_total_mib and self.memory_used_mib is not None:
            return 100.0 * self.memory_used_mib / self.memory_total_mib
        return None

    @property
    def memory_total_gb(self) -> float | None:
        """Total memory in GB (10^9 bytes): an "80GB" H100 has 81559 MiB = 85.5 GB."""
        return _gb(self.memory_total_mib)

    @property
    def memory_used_gb(self) -> float | None:
        """Used memory in GB (10^9 bytes)."""
        return _gb(self.memory_used_mib)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "index": self.index,
            "name": self.name,
            "memory_total_mib": self.memory_total_mib,
            "memory_used_mib": self.memory_used_mib,
            "memory_pct": _round(self.memory_pct),
            "utilization_pct": self.utilization_pct,
            "temperature_c": self.temperature_c,
            "driver_version": self.driver_version,
            "ok": self.ok,
            "errors": list(self.errors),
        }


@dataclass
class GpuReport:
    """Everything nvidia-smi said: the GPUs, versions, and what went wrong."""

    gpus: list[Gpu] = field(default_factory=list)
    driver_version: str | None = None
    cuda_version: str | None = None
    #: nvidia-smi missing, failing or timing out (its first output line).
    error: str | None = None
    #: Lines about GPUs nvidia-smi cannot reach at all.
    lost: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """nvidia-smi worked and no GPU is lost or in error."""
        return self.error is None and not self.lost and all(g.ok for g in self.gpus)

    def problems(self) -> list[str]:
        """One line per problem, for a table or a failure reason."""
        out = [self.error] if self.error else []
        out.extend(self.lost)
        out.extend(f"gpu{g.index}: {e}" for g in self.gpus for e in g.errors)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "ok": self.ok,
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
            "error": self.error,
            "lost": list(self.lost),
            "gpus": [g.to_dict() for g in self.gpus],
        }


def query_gpus(
    nvidia_smi: str = "nvidia-smi", env: dict[str, str] | None = None, timeout: float = 30.0
) -> GpuReport:
    """Run nvidia-smi (found on `env`'s PATH) and parse both of its outputs."""
    path_var = (env if env is not None else os.environ).get("PATH")
    binary = shutil.which(nvidia_smi, path=path_var)
    if binary is None:
        return GpuReport(error=f"{nvidia_smi} not found on PATH (no NVIDIA driver on this box?)")
    rc, out = _run([binary, *QUERY], env, timeout)
    gpus, other = parse_query(out)
    if not gpus:
        first = next((ln.strip() for ln in out.splitlines() if ln.strip()), "")
        return GpuReport(error=first or f"nvidia-smi exited {rc} without output")
    if rc != 0 and not other:
        other = [f"nvidia-smi exited {rc}"]
    # Some GPUs answered: the other lines (exit 15) are about GPUs it cannot reach.
    report = GpuReport(gpus=gpus, lost=other)
    rc, table = _run([binary], env, timeout)
    driver, cuda, table_errors = parse_table(table if rc == 0 else "")
    report.driver_version = driver or next((g.driver_version for g in gpus), None)
    report.cuda_version = cuda
    for gpu in gpus:
        gpu.errors.extend(table_errors.get(gpu.index, []))
    return report


def parse_query(text: str) -> tuple[list[Gpu], list[str]]:
    """GPUs from `--query-gpu=FIELDS --format=csv[,noheader][,nounits]` output, and the other
    lines (a lost GPU's message)."""
    gpus: list[Gpu] = []
    other: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("index,"):
            continue
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != len(FIELDS) or not cells[0].isdigit():
            other.append(line.strip())
            continue
        values = dict(zip(FIELDS, cells))  # noqa: B905 (lengths checked; py3.9 has no strict=)
        gpu = Gpu(index=int(values["index"]), name=values["name"])
        gpu.memory_total_mib = _number(gpu, "memory.total", values["memory.total"])
        gpu.memory_used_mib = _number(gpu, "memory.used", values["memory.used"])
        gpu.utilization_pct = _number(gpu, "utilization.gpu", values["utilization.gpu"])
        gpu.temperature_c = _number(gpu, "temperature.gpu", values["temperature.gpu"])
        driver = values["driver_version"]
        gpu.driver_version = None if driver in NA_VALUES or driver in ERROR_VALUES else driver
        gpus.append(gpu)
    return gpus, other


def parse_table(text: str) -> tuple[str | None, str | None, dict[int, list[str]]]:
    """Driver version, CUDA version and the `ERR!` rows per GPU index from plain nvidia-smi."""
    driver = _DRIVER.search(text)
    cuda = _CUDA.search(text)
    errors: dict[int, list[str]] = {}
    in_gpus = False
    current: int | None = None
    for line in text.splitlines():
        if line.startswith("|=") and not in_gpus:
            in_gpus = True
            continue
        if not in_gpus:
            continue
        if not line.strip():
            break  # the GPU section ends; the processes table follows
        row = _GPU_ROW.match(line)
        if row is not None:
            current = int(row.group(1))
        if current is not None and "ERR!" in line:
            row_text = " ".join(line.strip().strip("|").split())
            errors.setdefault(current, []).append(f"nvidia-smi shows ERR! ({row_text})")
    return (
        driver.group(1) if driver else None,
        cuda.group(1) if cuda else None,
        errors,
    )


def _number(gpu: Gpu, name: str, cell: str) -> float | None:
    if cell in ERROR_VALUES:
        gpu.errors.append(f"{name} is {cell}")
        return None
    if cell in NA_VALUES:
        return None
    m = _NUMBER.match(cell)
    return float(m.group(0)) if m else None


def _run(argv: list[str], env: dict[str, str] | None, timeout: float) -> tuple[int, str]:
    try:
        proc = subprocess.run(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        # A hanging nvidia-smi is itself a symptom of a GPU in trouble.
        return 124, f"nvidia-smi did not answer within {timeout:g} s"
    except OSError as exc:
        return 127, f"cannot run nvidia-smi: {exc.strerror}"
    return proc.returncode, proc.stdout


def _gb(mib: float | None) -> float | None:
    return None if mib is None else mib * 1048576 / 1e9


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
