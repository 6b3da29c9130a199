"""nvidia-smi parsing with the stand-in nvidia-smi and real output samples."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from gpu_fake import FAKES, use_fake_gpus, write_scenario

from provision.monitor.gpu import parse_query, parse_table, query_gpus

# Real output (driver 610, MIG enabled: memory and utilisation read N/A).
TABLE_610_MIG = (
    "Tue Jul 14 19:44:18 2026       \n"
    + """\
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 610.43.02              KMD Version: 610.43.02     CUDA UMD Version: 13.3     |
+-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |
|                                         |                        |               MIG M. |
|=========================================+========================+======================|
|   0  NVIDIA RTX PRO 6000 Blac...    On  |   00000000:61:00.0 Off |                   On |
| N/A   34C    P0            108W /  600W |                  N/A   |     N/A      Default |
|                                         |                        |              Enabled |
+-----------------------------------------+------------------------+----------------------+

+-----------------------------------------------------------------------------------------+
| Processes:                                                                              |
|  GPU   GI   CI              PID   Type   Process name                        GPU Memory |
|        ID   ID                                                               Usage      |
|=========================================================================================|
|    0   N/A  N/A            4811      C   python3                                 10MiB |
+-----------------------------------------------------------------------------------------+
"""
)


def test_healthy(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_gpus(monkeypatch, "healthy")
    report = query_gpus()
    assert report.ok and report.error is None and not report.lost
    assert (report.driver_version, report.cuda_version) == ("570.172.08", "12.8")
    assert [g.index for g in report.gpus] == [0, 1]
    g = report.gpus[0]
    assert g.name == "NVIDIA RTX PRO 6000 Blackwell Workstation Edition"
    assert (g.memory_total_mib, g.memory_used_mib, g.utilization_pct, g.temperature_c) == (
        97887,
        0,
        0,
        27,
    )
    assert g.memory_total_gb == pytest.approx(102.64, abs=0.01)
    assert report.to_dict()["gpus"][0]["memory_pct"] == 0.0


def test_err_row_fails_although_nvidia_smi_exits_0(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_gpus(monkeypatch, "err")
    assert subprocess.run([str(FAKES / "nvidia-smi")], capture_output=True).returncode == 0
    report = query_gpus()
    assert not report.ok
    assert report.gpus[0].ok and not report.gpus[1].ok
    (problem,) = report.problems()
    assert problem.startswith("gpu1: nvidia-smi shows ERR! (ERR! 68C P8 28W / 600W")


def test_error_cells_in_the_csv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path / "s.json", "healthy", {"errors": ["temp", "util"]})
    use_fake_gpus(monkeypatch, scenario)
    report = query_gpus()
    g = report.gpus[0]
    assert g.temperature_c is None and g.utilization_pct is None
    assert "temperature.gpu is [Unknown Error]" in g.errors
    assert any("ERR!" in e for e in g.errors)  # the table shows it too
    assert report.gpus[1].ok


def test_lost_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_gpus(monkeypatch, "lost")
    report = query_gpus()
    assert not report.ok
    assert [g.index for g in report.gpus] == [0]
    assert report.lost == [
        "Unable to determine the device handle for GPU0000:27:00.0: Unknown Error"
    ]


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ("no_driver", "couldn't communicate with the NVIDIA driver"),
        ("mismatch", "Failed to initialize NVML: Driver/library version mismatch"),
        ("no_devices", "No devices were found"),
    ],
)
def test_nvidia_smi_failures(monkeypatch: pytest.MonkeyPatch, scenario: str, message: str) -> None:
    use_fake_gpus(monkeypatch, scenario)
    report = query_gpus()
    assert not report.ok and report.gpus == []
    assert message in report.error


def test_missing_nvidia_smi(tmp_path: Path) -> None:
    report = query_gpus(env={"PATH": str(tmp_path)})
    assert report.error == "nvidia-smi not found on PATH (no NVIDIA driver on this box?)"
    assert report.problems() == [report.error]


@pytest.mark.slow
def test_hanging_nvidia_smi_times_out(tmp_path: Path) -> None:
    hang = tmp_path / "nvidia-smi"
    hang.write_text("#!/bin/sh\nexec /bin/sleep 30\n")
    hang.chmod(0o755)
    report = query_gpus(env={"PATH": str(tmp_path)}, timeout=0.5)
    assert report.error == "nvidia-smi did not answer within 0.5 s"


def test_parse_query_with_header_units_and_na() -> None:
    text = (
        "index, name, memory.total [MiB], memory.used [MiB], utilization.gpu [%], "
        "temperature.gpu, driver_version\n"
        "0, NVIDIA H100 80GB HBM3, 81559 MiB, 72459 MiB, 100 %, 61, 535.129.03\n"
        "1, NVIDIA RTX PRO 6000 Blackwell Server Edition, [N/A], [N/A], [N/A], 34, 610.43.02\n"
    )
    gpus, other = parse_query(text)
    assert other == []
    assert (gpus[0].memory_used_mib, gpus[0].utilization_pct) == (72459, 100)
    assert gpus[0].memory_pct == pytest.approx(88.84, abs=0.01)
    assert gpus[1].memory_total_mib is None and gpus[1].memory_pct is None and gpus[1].ok


def test_parse_table_new_header_and_processes() -> None:
    driver, cuda, errors = parse_table(TABLE_610_MIG)
    assert (driver, cuda, errors) == ("610.43.02", "13.3", {})


def test_parse_table_maps_err_to_its_gpu() -> None:
    table = TABLE_610_MIG.replace("| N/A   34C    P0   ", "|ERR!   34C    P0   ")
    assert parse_table(table)[2] == {
        0: ["nvidia-smi shows ERR! (ERR! 34C P0 108W / 600W | N/A | N/A Default)"]
    }


@pytest.mark.parametrize("preset", ["healthy", "training", "err", "full", "hot", "h100", "small"])
def test_fake_table_lines_are_as_wide_as_the_real_ones(
    monkeypatch: pytest.MonkeyPatch, preset: str
) -> None:
    use_fake_gpus(monkeypatch, preset)
    out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert {len(line) for line in lines[1:]} == {91, 89}
    real = TABLE_610_MIG.splitlines()
    assert lines[4:7] == real[4:7]  # the column headers, byte for byte


def test_every_gpu_lost(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    scenario = write_scenario(tmp_path / "s.json", "healthy", {"lost": True}, {"lost": True})
    use_fake_gpus(monkeypatch, scenario)
    report = query_gpus()
    assert report.gpus == [] and not report.ok
    assert (
        report.error == "Unable to determine the device handle for GPU0000:16:00.0: Unknown Error"
    )
