"""Training-log parsing on the formats openpi, its waypoint fork and the users' extensions print."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from gpu_fake import waypoint_log

from provision.monitor.logparse import parse_log, parse_log_file


def test_waypoint_ae_log_with_tqdm_and_timestamps() -> None:
    st = parse_log(waypoint_log("AE", range(0, 501, 50), s_per_step=13.5), batch_size=288)
    assert (st.step, st.total) == (500, 10000)
    assert st.loss == pytest.approx(0.65)
    assert st.grad_norm == 3.0 and st.lr == 5e-05
    # The log rounds sps to 0.1 (10 s/step); the timestamps give the real 13.5 s/step.
    assert st.rate_source == "log timestamps"
    assert st.s_per_step == pytest.approx(13.5)
    assert st.steps_per_s == pytest.approx(1 / 13.5)
    assert st.samples_per_s == pytest.approx(288 / 13.5)
    assert st.eta_s == pytest.approx(9500 * 13.5)
    assert st.progress == pytest.approx(0.05)
    assert st.fields == {"gpu_mem_gb": 51.2}
    assert [h[0] for h in st.history] == list(range(0, 501, 50))
    # Debiased EMA (weight 0.6): between the first and the last loss, nearer the last.
    assert 0.65 < st.loss_smoothed < 0.7


def test_waypoint_vlm_log() -> None:
    text = waypoint_log("VLM", range(0, 201, 50), total=30000, s_per_step=3.2, loss=11.5)
    st = parse_log(text, batch_size=24)
    assert (st.step, st.total, st.loss) == (200, 30000, 11.5)
    assert st.s_per_step == pytest.approx(3.2)
    assert st.samples_per_s == pytest.approx(24 / 3.2)


def test_jax_openpi_log_uses_tqdm_rate_and_keeps_extra_fields() -> None:
    lines = []
    for step in (0, 100, 200):
        lines.append(
            f"Step {step}: grad_norm=0.2345, loss={0.05 - step / 10000:.4f}, "
            f"param_norm=1802.3456, loss_std=0.0123, grad_max=0.5, update_ratio=0.0009"
        )
        lines.append(f"  1%|▏         | {step + 1}/30000 [02:31<6:14:56,  1.33it/s]")
    st = parse_log("\n".join(lines) + "\n", batch_size=32)
    assert (st.step, st.total) == (201, 30000)  # tqdm's counter is newer than the last Step line
    assert st.loss == pytest.approx(0.03)
    assert st.grad_norm == 0.2345
    assert st.rate_source == "tqdm"
    assert st.steps_per_s == pytest.approx(1.33)
    assert st.samples_per_s == pytest.approx(32 * 1.33)
    assert st.fields == {
        "param_norm": 1802.3456,
        "loss_std": 0.0123,
        "grad_max": 0.5,
        "update_ratio": 0.0009,
    }


def test_pytorch_openpi_log_time_per_interval() -> None:
    # train_pytorch.py: `time` is the wall time of the whole log interval (100 steps here).
    text = (
        "step=0 loss=0.1500 lr=2.50e-07 grad_norm=1.23 time=9.1s\n"
        "step=100 loss=0.1200 lr=2.50e-05 grad_norm=1.10 time=45.2s\n"
    )
    st = parse_log(text)
    assert st.rate_source == "interval time"
    assert st.s_per_step == pytest.approx(0.452)
    assert st.step == 100 and st.total is None and st.eta_s is None


def test_seed_001_extended_line() -> None:
    text = (
        "[I] Training config: pi0_lighter_cup_trossen with 8 workers\n"
        "Step 100: loss=0.0234, grad_norm=1.2345, efficiency/samples_per_sec=394.1, "
        "efficiency/time_per_step=0.0811, update_norm=0.02 | 12.34 steps/s\n"
    )
    st = parse_log(text, batch_size=32)
    assert st.rate_source == "time_per_step"
    assert st.s_per_step == pytest.approx(0.0811)
    assert st.samples_per_s == pytest.approx(394.1)  # logged, not recomputed
    assert st.fields == {"update_norm": 0.02}


def test_lines_with_a_step_but_no_metrics_are_ignored() -> None:
    text = (
        "12:00:00.000 [I] Step 0 (after_backward): GPU memory - allocated: 12.30GB, reserved: "
        "14.00GB (1:train_pytorch.py:1)\n"
        "12:00:01.000 [I] Saved checkpoint step 1000 -> checkpoints/x/1000 (1:train.py:1)\n"
        "12:00:02.000 [I] Training: 0 -> 10000 steps  |  save every 1000  |  log every 50\n"
    )
    st = parse_log(text)
    assert st.records == 0 and st.step is None and st.loss is None


def test_restart_and_midnight() -> None:
    first = waypoint_log("AE", range(0, 201, 50), s_per_step=10, start=86400 - 3000)
    resumed = waypoint_log("AE", range(0, 101, 50), s_per_step=12, start=1000)
    st = parse_log(first + resumed)
    assert st.restarts == 1
    assert st.step == 100
    # Only the current run counts for the speed; the first run crossed midnight cleanly.
    assert st.s_per_step == pytest.approx(12)
    crossing = parse_log(first)
    assert crossing.s_per_step == pytest.approx(10)


def test_nan_loss_is_reported_and_json_safe() -> None:
    text = waypoint_log("AE", range(0, 151, 50), loss=lambda s: math.nan if s == 150 else 0.5)
    st = parse_log(text)
    assert math.isnan(st.loss)
    assert st.loss_smoothed == pytest.approx(0.5)  # NaN does not poison the smoothing
    data = st.to_dict()
    assert data["loss"] == "nan" and data["history"][-1][1] == "nan"
    json.dumps(data, allow_nan=False)


def test_tqdm_only_log() -> None:
    st = parse_log(
        "Training:  12%|█▏        | 1200/10000 [1:23:45<10:12:34,  4.17s/it, loss=0.1234, lr=2.50e-05, step=1200]"
    )
    assert (st.step, st.total, st.loss) == (1200, 10000, 0.1234)
    assert st.s_per_step == pytest.approx(4.17)
    assert st.eta_s == pytest.approx(8800 * 4.17)


def test_ansi_colours_do_not_matter() -> None:
    st = parse_log("\x1b[32m12:00:00.000 [I] [AE] step=50/100 loss=0.3000 gnorm=1.00\x1b[0m\n")
    assert (st.step, st.loss, st.grad_norm) == (50, 0.3, 1.0)


def test_parse_log_file_reads_the_tail(tmp_path: Path) -> None:
    assert parse_log_file(tmp_path / "missing.log").records == 0
    log = tmp_path / "train.log"
    log.write_text(waypoint_log("AE", range(0, 5001, 50)))
    st = parse_log_file(log, max_bytes=4096)
    assert st.step == 5000 and 0 < st.records < 101


@pytest.mark.slow
def test_big_log_parses_in_reasonable_time() -> None:
    text = waypoint_log("AE", range(0, 200_001, 5), total=200_000)  # ~8 MB
    started = time.perf_counter()
    st = parse_log(text)
    elapsed = time.perf_counter() - started
    assert st.step == 200_000 and st.records == 40_001
    assert len(st.history) == 200
    assert elapsed < 30, elapsed
