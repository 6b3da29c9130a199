"""Alert rules: each fires on its condition and clears when a later snapshot no longer shows it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from gpu_fake import use_fake_gpus, waypoint_log, write_scenario

from provision.monitor import alerts
from provision.monitor.alerts import DEFAULT_THRESHOLDS, evaluate, merge_thresholds
from provision.monitor.snapshot import monitor_snapshot


def ids(snapshot: dict, thresholds: dict | None = None) -> list[str]:
    return [a.id for a in evaluate(snapshot, thresholds)]


def training(loss: float = 0.5, grad: float = 1.0, history: list | None = None) -> dict:
    return {"training": {"loss": loss, "grad_norm": grad, "history": history or []}}


@pytest.mark.parametrize(
    ("grad", "expected"),
    [
        (1.0, []),
        (10.0, []),
        (15.0, ["grad_norm_exploding"]),
        (150.0, ["grad_norm_diverging"]),
        (math.inf, ["grad_norm_diverging"]),
        ("nan", ["grad_norm_diverging"]),
        (0.005, ["grad_norm_vanishing"]),
    ],
)
def test_grad_norm_rules(grad: object, expected: list[str]) -> None:
    assert ids(training(grad=grad)) == expected  # type: ignore[arg-type]


def test_loss_nan_from_float_or_json_string() -> None:
    assert ids(training(loss=math.nan)) == ["loss_nan"]
    assert ids({"training": {"loss": "nan"}}) == ["loss_nan"]
    (alert,) = evaluate({"training": {"loss": "inf"}})
    assert alert.severity == "critical" and alert.to_dict()["value"] == "inf"


def test_loss_unchanged_for_1000_steps() -> None:
    moving = [[s, 0.9 - s / 10000, 1.0] for s in range(0, 500, 50)]
    flat = [[s, 0.3, 1.0] for s in range(500, 1550, 50)]
    history = moving + flat  # 0.3 from step 500 to 1500
    assert ids(training(loss=0.3, history=history)) == ["loss_flat"]
    (alert,) = evaluate(training(loss=0.3, history=history))
    assert alert.value == 1000 and "1000 steps" in alert.message
    assert ids(training(loss=0.3, history=history[:-1])) == []  # 950 steps only
    assert ids(training(loss=0.3, history=history), {"loss_flat_steps": 2000}) == []


def test_gpu_and_host_rules() -> None:
    snap = {
        "gpus": {
            "gpus": [
                {"index": 0, "memory_pct": 95.0, "temperature_c": 60, "utilization_pct": 99},
                {
                    "index": 1,
                    "memory_pct": 50.0,
                    "temperature_c": 90,
                    "utilization_pct": 40,
                    "errors": ["nvidia-smi shows ERR! (ERR! 68C P2)"],
                },
            ]
        },
        "host": {
            "cpu_pct": 97,
            "memory": {"used_pct": 96},
            "disks": [{"path": "/workspace", "free_gb": 12.5}, {"path": "/", "free_gb": 300}],
        },
        "log": {"age_s": 1200},
    }
    found = [(a.id, a.subject) for a in evaluate(snap)]
    assert found == [
        ("gpu_error", "gpu1"),  # critical first
        ("log_stale", "log"),
        ("gpu_memory", "gpu0"),
        ("gpu_temp", "gpu1"),
        ("cpu", "cpu"),
        ("ram", "ram"),
        ("disk", "/workspace"),
    ]
    assert ("gpu_util_low", "gpu1") in [
        (a.id, a.subject) for a in evaluate(snap, {"gpu_util_min_pct": 95})
    ]
    quiet = {key: None for key in DEFAULT_THRESHOLDS}
    assert ids(snap, quiet) == ["gpu_error"]  # a GPU in error is not a threshold


def test_nvidia_smi_failure_is_critical() -> None:
    (alert,) = evaluate({"gpus": {"error": "No devices were found", "gpus": []}})
    assert (alert.id, alert.severity) == ("gpu_error", "critical")


def test_thresholds_are_validated() -> None:
    assert merge_thresholds({"gpu_memory_pct": 97})["gpu_memory_pct"] == 97
    with pytest.raises(ValueError, match="unknown alert threshold 'gpu_mem'"):
        merge_thresholds({"gpu_mem": 97})
    with pytest.raises(ValueError, match="must be a number"):
        merge_thresholds({"cpu_pct": "90"})


@pytest.mark.slow
def test_alerts_fire_and_clear_as_the_fake_gpu_and_the_log_change(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    scenario = write_scenario(tmp_path / "gpus.json", "training")
    use_fake_gpus(monkeypatch, scenario)
    log = tmp_path / "train.log"
    log.write_text(waypoint_log("AE", range(0, 201, 50)))
    # VLM training runs at 93.5 % GPU memory by design (seed 003): its playbook raises the limit.
    quiet = {"cpu_pct": None, "ram_pct": None, "disk_free_gb": None, "gpu_memory_pct": 95}

    def alert_ids() -> set[str]:
        snap = monitor_snapshot(str(log), 288, quiet, cpu_interval=0.01)
        json.dumps(snap, allow_nan=False)
        return {a["id"] for a in snap["alerts"]}

    assert alert_ids() == set()
    write_scenario(scenario, "hot")
    assert alert_ids() == {"gpu_temp"}
    write_scenario(scenario, "full")
    assert alert_ids() == {"gpu_memory"}
    write_scenario(scenario, "training", {}, {"errors": ["fan"]})
    assert alert_ids() == {"gpu_error"}
    write_scenario(scenario, "training")
    with log.open("a") as fh:
        fh.write(waypoint_log("AE", range(250, 251), gnorm=15.0).split("\n", 1)[1])
    assert alert_ids() == {"grad_norm_exploding"}
    with log.open("a") as fh:
        fh.write(waypoint_log("AE", range(300, 301), gnorm=2.0).split("\n", 1)[1])
    assert alert_ids() == set()
    with log.open("a") as fh:
        fh.write(waypoint_log("AE", range(350, 351), loss=math.nan).split("\n", 1)[1])
    assert alert_ids() == {"loss_nan"}


def test_expectations_warn_off_the_validated_figures() -> None:
    expect = alerts.parse_expectations(
        {"s_per_step": [2.9, 3.5], "gpu_memory_gb": [88, 95], "loss_at": {50: [6, 7]},
         "alert_thresholds": {"gpu_memory_pct": 98}}
    )  # fmt: skip
    snap = {
        "training": {"s_per_step": 5.2, "history": [[0, 11.6, 1.0], [50, 8.1, 1.0]]},
        "gpus": {"gpus": [{"index": 0, "memory_used_mib": 92000}, {"index": 1,
                 "memory_used_mib": 60000}, {"index": 2, "memory_used_mib": 3}]},
    }  # fmt: skip
    found = {(a.id, a.subject) for a in alerts.expectation_alerts(snap, expect)}
    assert found == {("s_per_step", "speed"), ("gpu_memory_expected", "gpu1"),
                     ("loss_expected", "loss@50")}  # fmt: skip
    healthy = {"training": {"s_per_step": 3.2, "history": [[50, 6.4, 1.0]]}, "gpus": {}}
    assert alerts.expectation_alerts(healthy, expect) == []
    assert alerts.expectation_alerts({}, alerts.parse_expectations(None)) == []


def test_bad_expectations_are_refused() -> None:
    for bad in ({"speed": [1, 2]}, {"s_per_step": [3, 1]}, {"loss_at": {50: [1]}},
                {"alert_thresholds": {"nope": 1}}):  # fmt: skip
        with pytest.raises(ValueError):
            alerts.parse_expectations(bad)
