"""Host probes: the real /proc and statvfs, and container limits from cgroup fixture trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from provision.monitor import host

MEMINFO = (
    "MemTotal:       131072000 kB\nMemFree:        60000000 kB\nMemAvailable:   100000000 kB\n"
)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_real_host_values_are_sane(tmp_path: Path) -> None:
    snap = host.host_snapshot([str(tmp_path), str(tmp_path / "not" / "yet")], cpu_interval=0.05)
    assert 0 <= snap["cpu_pct"] <= 100
    assert snap["cpu_cores"] >= 1
    assert 0 < snap["memory"]["available_gb"] <= snap["memory"]["total_gb"]
    made, later = snap["disks"]
    assert made["free_gb"] > 0 and made["device"] == later["device"]
    assert later["checked"] == str(tmp_path)


def test_cgroup_v2_limits(tmp_path: Path) -> None:
    proc = write(tmp_path / "proc", {"meminfo": MEMINFO})
    cgroup = write(
        tmp_path / "cg",
        {
            "cpu.max": "150000 100000\n",
            "memory.max": str(8 * 10**9),
            "memory.current": str(7 * 10**9),
            "memory.stat": f"anon 5000000000\ninactive_file {2 * 10**9}\n",
        },
    )
    assert host.cpu_cores(str(cgroup)) == min(1.5, len(os.sched_getaffinity(0)))
    mem = host.memory(str(proc), str(cgroup))
    assert mem["total_gb"] == pytest.approx(8)
    assert mem["available_gb"] == pytest.approx(3)  # page cache is reclaimable
    assert mem["used_pct"] == pytest.approx(62.5)


def test_cgroup_v1_unlimited_falls_back_to_meminfo(tmp_path: Path) -> None:
    proc = write(tmp_path / "proc", {"meminfo": MEMINFO})
    cgroup = write(
        tmp_path / "cg",
        {
            "memory/memory.limit_in_bytes": "9223372036854771712\n",
            "memory/memory.usage_in_bytes": "1386180608\n",
            "cpu/cpu.cfs_quota_us": "-1\n",
            "cpu/cpu.cfs_period_us": "100000\n",
        },
    )
    assert host.cpu_cores(str(cgroup)) == len(os.sched_getaffinity(0))
    mem = host.memory(str(proc), str(cgroup))
    assert mem["total_gb"] == pytest.approx(131072000 * 1024 / 1e9)
    assert mem["available_gb"] == pytest.approx(100000000 * 1024 / 1e9)


def test_cpu_percent_from_proc_stat(tmp_path: Path) -> None:
    proc = write(tmp_path / "proc", {"stat": "cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n"})
    sampler = host.CpuSampler(str(proc), str(tmp_path / "no-cgroup"))
    write(proc, {"stat": "cpu  200 0 200 850 50 0 0 0 0 0\n"})
    # busy +200, idle+iowait +100 -> 200 / 300
    assert sampler.percent() == pytest.approx(200 / 3)


def test_cpu_percent_of_a_cpu_limited_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cgroup = write(tmp_path / "cg", {"cpu.max": "100000 100000\n", "cpu.stat": "usage_usec 0\n"})
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(host.time, "monotonic", lambda: next(clock))
    sampler = host.CpuSampler(str(tmp_path / "proc"), str(cgroup))
    write(cgroup, {"cpu.stat": "usage_usec 1500000\nuser_usec 1400000\n"})
    # 1.5 CPU-seconds in 2 s on a 1-core quota
    assert sampler.percent() == pytest.approx(75)


def test_disk_of_a_missing_path_uses_its_parent(tmp_path: Path) -> None:
    info = host.disk(str(tmp_path / "a" / "b"))
    assert info["checked"] == str(tmp_path) and info["path"] == str(tmp_path / "a" / "b")
    assert host.nearest_existing("~") == os.path.expanduser("~")
