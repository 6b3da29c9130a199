"""Alert rules over a monitor snapshot (seeds 000/001), as a pure function.

`evaluate(snapshot, thresholds)` looks only at the snapshot it is given (the latest values plus
the loss history the log parser keeps), so an alert fires while its condition holds and clears
as soon as a later snapshot no longer shows it. Thresholds are configurable; None disables a
rule. The users' rules: grad_norm > 10 exploding, > 100 diverging, < 0.01 vanishing; loss NaN;
loss unchanged for 1000 steps; GPU memory > 90 %; GPU temperature > 85 °C; CPU > 90 %. Added:
a GPU in error, RAM nearly full (the OOM killer is next), disk below one checkpoint, a log that
stopped growing, and (off by default) GPU utilisation below a target such as 95 %. The
checkpoint directory's own rule (the disk will not hold the next `checkpoints_ahead`
checkpoints) lives in provision/monitor/checkpoint_disk.py.

Full fine-tuning of the waypoint VLM runs at 91-93 GB of 97.9 (93-95 %) by design (seed 003):
its playbook raises `gpu_memory_pct` for that training (`training_expect`). `expectation_alerts`
warns when a training is off the figures it was validated with (s/step, GPU memory, the loss at
given steps: `parse_expectations`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_THRESHOLDS: dict[str, float | None] = {
    "grad_norm_exploding": 10.0,
    "grad_norm_diverging": 100.0,
    "grad_norm_vanishing": 0.01,
    "loss_flat_steps": 1000,
    "gpu_memory_pct": 90.0,
    "gpu_temp_c": 85.0,
    "cpu_pct": 90.0,
    "ram_pct": 95.0,
    "disk_free_gb": 25.0,
    "checkpoints_ahead": 3,
    "log_stale_s": 900,
    "gpu_util_min_pct": None,
}

CRITICAL = "critical"
WARNING = "warning"


@dataclass(frozen=True)
class Alert:
    """One firing rule: which, how bad, about what (e.g. "gpu1"), and the numbers."""

    id: str
    severity: str
    subject: str
    message: str
    value: float | str | None = None
    threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (a non-finite value becomes "nan"/"inf")."""
        out = asdict(self)
        if isinstance(self.value, float) and not math.isfinite(self.value):
            out["value"] = str(self.value)
        return out


def merge_thresholds(overrides: dict[str, Any] | None) -> dict[str, float | None]:
    """Defaults updated with `overrides`; raises ValueError naming an unknown or bad key."""
    merged = dict(DEFAULT_THRESHOLDS)
    for key, value in (overrides or {}).items():
        if key not in DEFAULT_THRESHOLDS:
            known = ", ".join(sorted(DEFAULT_THRESHOLDS))
            raise ValueError(f"unknown alert threshold '{key}' (known: {known})")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"alert threshold '{key}' must be a number or null, got {value!r}")
        merged[key] = value
    return merged


def evaluate(snapshot: dict[str, Any], thresholds: dict[str, Any] | None = None) -> list[Alert]:
    """Alerts that hold for `snapshot` (monitor_snapshot's dict), critical ones first."""
    limits = merge_thresholds(thresholds)
    alerts: list[Alert] = []
    alerts += _training(snapshot.get("training") or {}, limits)
    alerts += _log(snapshot.get("log") or {}, limits)
    alerts += _gpus(snapshot.get("gpus") or {}, limits)
    alerts += _host(snapshot.get("host") or {}, limits)
    return sorted(alerts, key=lambda a: a.severity != CRITICAL)


def as_float(value: Any) -> float | None:
    """A number from a snapshot field: floats, ints, or the strings "nan"/"inf" of JSON output."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _training(tr: dict[str, Any], limits: dict[str, float | None]) -> list[Alert]:
    out: list[Alert] = []
    loss = as_float(tr.get("loss"))
    if loss is not None and not math.isfinite(loss):
        out.append(Alert("loss_nan", CRITICAL, "loss", f"loss is {loss}: training diverged", loss))
    grad = as_float(tr.get("grad_norm"))
    if grad is not None:
        out += _grad_norm(grad, limits)
    flat = limits["loss_flat_steps"]
    if flat is not None and loss is not None and math.isfinite(loss):
        span = _flat_span(tr.get("history") or [], loss)
        if span >= flat:
            out.append(
                Alert(
                    "loss_flat",
                    WARNING,
                    "loss",
                    f"loss unchanged at {loss:g} for {span} steps: training stalled",
                    span,
                    flat,
                )
            )
    return out


def _grad_norm(grad: float, limits: dict[str, float | None]) -> list[Alert]:
    diverging = limits["grad_norm_diverging"]
    exploding = limits["grad_norm_exploding"]
    vanishing = limits["grad_norm_vanishing"]
    if not math.isfinite(grad) or (diverging is not None and grad > diverging):
        msg = f"grad_norm {grad:g}: training is diverging"
        return [Alert("grad_norm_diverging", CRITICAL, "grad_norm", msg, grad, diverging)]
    if exploding is not None and grad > exploding:
        msg = f"grad_norm {grad:g} > {exploding:g}: exploding gradients"
        return [Alert("grad_norm_exploding", WARNING, "grad_norm", msg, grad, exploding)]
    if vanishing is not None and grad < vanishing:
        msg = f"grad_norm {grad:g} < {vanishing:g}: vanishing gradients"
        return [Alert("grad_norm_vanishing", WARNING, "grad_norm", msg, grad, vanishing)]
    return []


def _flat_span(history: list[Any], loss: float) -> int:
    """Steps over which the latest loss value has not changed."""
    if not history:
        return 0
    last_step = history[-1][0]
    first_step = last_step
    for step, value, _ in reversed(history):
        if as_float(value) != loss:
            break
        first_step = step
    return max(0, int(last_step) - int(first_step))


def _log(log: dict[str, Any], limits: dict[str, float | None]) -> list[Alert]:
    stale = limits["log_stale_s"]
    age = as_float(log.get("age_s"))
    if stale is None or age is None or age <= stale:
        return []
    msg = f"the training log has not changed for {age / 60:.0f} min: job stopped or hung?"
    return [Alert("log_stale", WARNING, "log", msg, round(age), stale)]


def _gpus(report: dict[str, Any], limits: dict[str, float | None]) -> list[Alert]:
    out: list[Alert] = []
    if report.get("error"):
        out.append(Alert("gpu_error", CRITICAL, "nvidia-smi", str(report["error"])))
    for line in report.get("lost") or []:
        out.append(Alert("gpu_error", CRITICAL, "nvidia-smi", str(line)))
    for gpu in report.get("gpus") or []:
        subject = f"gpu{gpu.get('index')}"
        for error in gpu.get("errors") or []:
            out.append(Alert("gpu_error", CRITICAL, subject, f"{subject}: {error}"))
        rules = (
            ("gpu_memory", "memory_pct", "gpu_memory_pct", "memory {:.1f} % used"),
            ("gpu_temp", "temperature_c", "gpu_temp_c", "temperature {:.0f} °C"),
        )
        for alert_id, field, key, text in rules:
            value, limit = as_float(gpu.get(field)), limits[key]
            if value is not None and limit is not None and value > limit:
                msg = f"{subject}: {text.format(value)} > {limit:g}"
                out.append(Alert(alert_id, WARNING, subject, msg, value, limit))
        util, floor = as_float(gpu.get("utilization_pct")), limits["gpu_util_min_pct"]
        if util is not None and floor is not None and util < floor:
            msg = f"{subject}: utilisation {util:.0f} % < {floor:g} %: data loading too slow?"
            out.append(Alert("gpu_util_low", WARNING, subject, msg, util, floor))
    return out


def _host(host: dict[str, Any], limits: dict[str, float | None]) -> list[Alert]:
    out: list[Alert] = []
    cpu, cpu_limit = as_float(host.get("cpu_pct")), limits["cpu_pct"]
    if cpu is not None and cpu_limit is not None and cpu > cpu_limit:
        msg = f"CPU {cpu:.0f} % > {cpu_limit:g} %: CPU-bound (data loading?)"
        out.append(Alert("cpu", WARNING, "cpu", msg, cpu, cpu_limit))
    ram = as_float((host.get("memory") or {}).get("used_pct"))
    ram_limit = limits["ram_pct"]
    if ram is not None and ram_limit is not None and ram > ram_limit:
        msg = f"RAM {ram:.0f} % used > {ram_limit:g} %: the OOM killer may stop training"
        out.append(Alert("ram", WARNING, "ram", msg, ram, ram_limit))
    floor = limits["disk_free_gb"]
    for disk in host.get("disks") or []:
        free = as_float(disk.get("free_gb"))
        if free is not None and floor is not None and free < floor:
            path = disk.get("path")
            msg = f"{path}: {free:.1f} GB free < {floor:g} GB (a checkpoint is ~22 GB)"
            out.append(Alert("disk", WARNING, str(path), msg, free, floor))
    return out


def parse_expectations(raw: Any) -> dict[str, Any]:
    """A training's expected figures (a playbook's `training_expect` entry), checked.

    Keys: `s_per_step` and `gpu_memory_gb` ([low, high]; GB as nvidia-smi's MiB / 1000, as the
    seeds quote them), `loss_at` ({step: [low, high]}) and `alert_thresholds` (overrides of
    DEFAULT_THRESHOLDS for this training). Raises ValueError naming the bad key.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"expected a mapping, got {raw!r}")
    unknown = set(raw) - {"s_per_step", "gpu_memory_gb", "loss_at", "alert_thresholds"}
    if unknown:
        raise ValueError(f"unknown key '{sorted(unknown)[0]}'")
    out: dict[str, Any] = {"alert_thresholds": raw.get("alert_thresholds") or {}}
    merge_thresholds(out["alert_thresholds"])
    for key in ("s_per_step", "gpu_memory_gb"):
        if raw.get(key) is not None:
            out[key] = _bounds(raw[key], key)
    out["loss_at"] = {
        int(step): _bounds(bounds, f"loss_at {step}")
        for step, bounds in (raw.get("loss_at") or {}).items()
    }
    return out


def _bounds(value: Any, key: str) -> tuple[float, float]:
    if not (isinstance(value, list) and len(value) == 2):
        raise ValueError(f"'{key}' must be [low, high], got {value!r}")
    low, high = as_float(value[0]), as_float(value[1])
    if low is None or high is None or low > high:
        raise ValueError(f"'{key}' must be [low, high] numbers with low <= high, got {value!r}")
    return low, high


def expectation_alerts(snapshot: dict[str, Any], expect: dict[str, Any]) -> list[Alert]:
    """Warnings where a running training is off the figures it was validated with.

    `expect` is `parse_expectations`' result: seconds per step, GPU memory of the GPUs in use
    (more than 1 GB used), and the loss at given steps (the first logged step at or after each,
    from the parser's history). A figure the snapshot lacks is not judged.
    """
    out: list[Alert] = []
    training = snapshot.get("training") or {}
    rate = as_float(training.get("s_per_step"))
    if rate is not None and "s_per_step" in expect:
        out += _outside("s_per_step", "speed", rate, expect["s_per_step"], "{:.2f} s/step")
    if "gpu_memory_gb" in expect:
        for gpu in (snapshot.get("gpus") or {}).get("gpus") or []:
            used = as_float(gpu.get("memory_used_mib"))
            if used is None or used < 1000:
                continue
            subject = f"gpu{gpu.get('index')}"
            out += _outside("gpu_memory_expected", subject, used / 1000, expect["gpu_memory_gb"],
                            "{:.1f} GB used")  # fmt: skip
    history = training.get("history") or []
    for step, bounds in sorted((expect.get("loss_at") or {}).items()):
        later = [(int(s), as_float(loss)) for s, loss, _ in history if int(s) >= step]
        if not later:
            continue
        at, loss = later[0]
        if loss is not None:
            text = f"loss {{:.4g}} at step {at}"
            out += _outside("loss_expected", f"loss@{at}", loss, bounds, text)
    return out


def _outside(
    alert_id: str, subject: str, value: float, bounds: tuple[float, float], text: str
) -> list[Alert]:
    low, high = bounds
    if low <= value <= high:
        return []
    msg = f"{subject}: {text.format(value)}, expected {low:g}-{high:g} (the validated run's)"
    return [Alert(alert_id, WARNING, subject, msg, value, high if value > high else low)]


def monitor_settings(
    context_vars: dict[str, Any], step_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What `monitor` checks one training against: its expectations (the var
    `training_expect: {STEP: ...}`) and the alert thresholds (the var `alert_thresholds`, the
    training's own on top: the waypoint VLM runs at 93-95 % of GPU memory by design).
    ValueError names the var that is wrong."""
    try:
        expect = parse_expectations((context_vars.get("training_expect") or {}).get(step_id))
    except ValueError as exc:
        raise ValueError(f"training_expect: {step_id}: {exc}") from None
    thresholds = {**(context_vars.get("alert_thresholds") or {}), **expect["alert_thresholds"]}
    try:
        merge_thresholds(thresholds)
    except ValueError as exc:
        raise ValueError(f"alert_thresholds: {exc}") from None
    return expect, thresholds
