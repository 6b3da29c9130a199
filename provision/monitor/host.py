"""CPU, RAM and disk of the box, from /proc, cgroups and statvfs.

Rented boxes are usually containers: /proc shows the host's cores and RAM while the container is
limited by its cgroup. CPU cores and RAM therefore take the cgroup's limits into account (v2
`cpu.max`/`memory.max`, v1 `cpu.cfs_quota_us`/`memory.limit_in_bytes`), and CPU % is measured
against what the container may use. Roots are parameters so tests can point at fixture trees.
"""

from __future__ import annotations

import os
import time
from typing import Any

GB = 1e9
#: cgroup v1 reports "no limit" as a huge number near 2^63.
_UNLIMITED = 1 << 60


def cpu_cores(cgroup: str = "/sys/fs/cgroup") -> float:
    """CPU cores this process may use: affinity, capped by a cgroup CPU quota."""
    cores = float(len(os.sched_getaffinity(0)))
    quota = _cpu_quota(cgroup)
    return min(cores, quota) if quota else cores


def memory(proc: str = "/proc", cgroup: str = "/sys/fs/cgroup") -> dict[str, float]:
    """RAM in GB: `total`, `available` and `used_pct`, within a cgroup memory limit if lower."""
    info = _meminfo(os.path.join(proc, "meminfo"))
    total = info.get("MemTotal", 0.0)
    available = info.get("MemAvailable", info.get("MemFree", 0.0))
    limit, working_set = _cgroup_memory(cgroup)
    if limit is not None and limit < total:
        total = limit
        available = max(0.0, limit - (working_set or 0.0))
    used_pct = 100.0 * (total - available) / total if total else 0.0
    return {"total_gb": total / GB, "available_gb": available / GB, "used_pct": used_pct}


def disk(path: str) -> dict[str, Any]:
    """Free and total space (GB) of the filesystem holding `path` (or its nearest existing
    parent: the directory may not exist yet), with its device id to group paths."""
    existing = nearest_existing(path)
    st = os.statvfs(existing)
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    return {
        "path": path,
        "checked": existing,
        "device": os.stat(existing).st_dev,
        "total_gb": total / GB,
        "free_gb": free / GB,
        "used_pct": 100.0 * (total - free) / total if total else 0.0,
    }


def nearest_existing(path: str) -> str:
    """`path` itself, or its nearest ancestor that exists."""
    current = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(current):
        current = os.path.dirname(current)
    return current


class CpuSampler:
    """CPU utilisation in % of the usable cores between two samples.

    Uses the cgroup's CPU usage counter when the box limits this container's CPU, else
    /proc/stat.
    """

    def __init__(self, proc: str = "/proc", cgroup: str = "/sys/fs/cgroup") -> None:
        self.proc = proc
        self.cgroup = cgroup
        self.cores = cpu_cores(cgroup)
        self.use_cgroup = _cpu_quota(cgroup) is not None and _cgroup_usage_s(cgroup) is not None
        self.last = self._sample()

    def percent(self) -> float | None:
        """Utilisation since the previous call (or construction); None if no time passed."""
        now = self._sample()
        (t0, busy0, total0), (t1, busy1, total1) = self.last, now
        self.last = now
        if self.use_cgroup:
            elapsed = t1 - t0
            if elapsed <= 0:
                return None
            return min(100.0, 100.0 * (busy1 - busy0) / (elapsed * self.cores))
        if total1 <= total0:
            return None
        return 100.0 * (busy1 - busy0) / (total1 - total0)

    def _sample(self) -> tuple[float, float, float]:
        if self.use_cgroup:
            return time.monotonic(), _cgroup_usage_s(self.cgroup) or 0.0, 0.0
        busy, total = _proc_stat(os.path.join(self.proc, "stat"))
        return time.monotonic(), busy, total


def cpu_percent(
    interval: float = 0.2, proc: str = "/proc", cgroup: str = "/sys/fs/cgroup"
) -> float:
    """CPU utilisation over `interval` seconds, in % of the usable cores."""
    sampler = CpuSampler(proc, cgroup)
    time.sleep(interval)
    return sampler.percent() or 0.0


def host_snapshot(
    disk_paths: list[str] | tuple[str, ...] = ("/",),
    cpu_interval: float = 0.2,
    proc: str = "/proc",
    cgroup: str = "/sys/fs/cgroup",
) -> dict[str, Any]:
    """CPU %, cores, load, RAM and disks, JSON-serialisable."""
    load = os.getloadavg()
    return {
        "cpu_pct": round(cpu_percent(cpu_interval, proc, cgroup), 1),
        "cpu_cores": cpu_cores(cgroup),
        "load_1m": round(load[0], 2),
        "memory": {k: round(v, 2) for k, v in memory(proc, cgroup).items()},
        "disks": [_rounded(disk(p)) for p in disk_paths],
    }


def _rounded(info: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in info.items()}


def _proc_stat(path: str) -> tuple[float, float]:
    with open(path, encoding="ascii") as fh:
        for line in fh:
            if line.startswith("cpu "):
                values = [float(v) for v in line.split()[1:]]
                # user nice system idle iowait irq softirq steal (guest is inside user)
                idle = values[3] + (values[4] if len(values) > 4 else 0.0)
                total = sum(values[:8])
                return total - idle, total
    raise OSError(f"no cpu line in {path}")


def _meminfo(path: str) -> dict[str, float]:
    out: dict[str, float] = {}
    with open(path, encoding="ascii") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = float(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return None


def _cpu_quota(cgroup: str) -> float | None:
    v2 = _read(os.path.join(cgroup, "cpu.max"))
    if v2 is not None:
        quota, _, period = v2.partition(" ")
        return float(quota) / float(period or 100000) if quota != "max" else None
    quota_us = _read(os.path.join(cgroup, "cpu", "cpu.cfs_quota_us"))
    period_us = _read(os.path.join(cgroup, "cpu", "cpu.cfs_period_us"))
    if quota_us and period_us and int(quota_us) > 0:
        return int(quota_us) / int(period_us)
    return None


def _cgroup_usage_s(cgroup: str) -> float | None:
    stat = _read(os.path.join(cgroup, "cpu.stat"))
    if stat is not None:
        for line in stat.splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
    v1 = _read(os.path.join(cgroup, "cpuacct", "cpuacct.usage"))
    return int(v1) / 1e9 if v1 else None


def _cgroup_memory(cgroup: str) -> tuple[float | None, float | None]:
    """(limit, working set) in bytes; the working set leaves out reclaimable page cache."""
    limit = _read(os.path.join(cgroup, "memory.max"))
    if limit is not None:
        usage = _read(os.path.join(cgroup, "memory.current"))
        stat = _read(os.path.join(cgroup, "memory.stat"))
        inactive_key = "inactive_file"
    else:
        limit = _read(os.path.join(cgroup, "memory", "memory.limit_in_bytes"))
        usage = _read(os.path.join(cgroup, "memory", "memory.usage_in_bytes"))
        stat = _read(os.path.join(cgroup, "memory", "memory.stat"))
        inactive_key = "total_inactive_file"
    if limit is None or limit == "max" or int(limit) >= _UNLIMITED:
        return None, None
    inactive = 0.0
    for line in (stat or "").splitlines():
        key, _, value = line.partition(" ")
        if key == inactive_key:
            inactive = float(value)
    used = float(usage) - inactive if usage else None
    return float(limit), used
