"""Parse a training log into progress, loss, gradient norm, speed and ETA.

Understood formats (all as openpi and its forks print them):

- PyTorch openpi: `12:58:30.101 [I] step=100 loss=0.1234 lr=2.50e-05 grad_norm=1.23 time=45.2s`
  (`time` is the wall time of the log interval).
- JAX openpi: `Step 100: grad_norm=0.2345, loss=0.0123, param_norm=1802.3456`, with the users'
  extra fields (`loss_std`, `loss_max`, `loss_min`, `grad_max`, `update_norm`, `update_ratio`,
  `efficiency/steps_per_sec`, ...) and `... | 12.34 steps/s` suffixes.
- Waypoint fork: `[AE] step=350/10000 loss=0.4410 lr=3.51e-05 gnorm=2.91 sps=0.1 gpu=51.0GB
  eta=2190min` and the same with `[VLM]`.
- tqdm bars, also when they share a line through `\\r`: `  4%|▎   | 351/10000 [1:19:00<36:10:12,
  13.50s/it, loss=0.4410]` (`it/s` or `s/it`).

A metrics record is a line with a step number and a loss or gradient norm. Seconds per step come,
in this order, from an explicit per-step time field, the log's own timestamps across the latest
records, tqdm's rate, a steps-per-second field (the waypoint fork rounds it to 0.1, hence late),
or `time=` over the step interval.
"""

from __future__ import annotations

import calendar
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

#: Metric names as logged → the names this module reports.
ALIASES = {
    "loss": "loss",
    "train/loss": "loss",
    "avg_loss": "loss",
    "grad_norm": "grad_norm",
    "gnorm": "grad_norm",
    "train/grad_norm": "grad_norm",
    "lr": "lr",
    "learning_rate": "lr",
    "train/lr": "lr",
    "sps": "steps_per_s",
    "steps_per_sec": "steps_per_s",
    "efficiency/steps_per_sec": "steps_per_s",
    "train/steps_per_sec": "steps_per_s",
    "time_per_step": "s_per_step",
    "efficiency/time_per_step": "s_per_step",
    "samples_per_sec": "samples_per_s",
    "efficiency/samples_per_sec": "samples_per_s",
    "time": "interval_s",
    "eta": "eta_s",
    "gpu": "gpu_mem_gb",
}
#: Reported as their own values, not as extra fields.
_CORE = ("loss", "grad_norm", "lr", "steps_per_s", "s_per_step", "samples_per_s", "interval_s")
_TIME_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|NaN|inf|Inf)"
_STEP = re.compile(r"(?<![\w/])(?:global_)?[Ss]tep\s*[=:]?\s*(\d+)(?:\s*/\s*(\d+))?")
# Keys hold no "." and follow no ":", so logging's "(pid:file.py:line)" suffix is no field.
_KV = re.compile(r"(?<![\w./:-])([A-Za-z_][\w/-]*)\s*[=:]\s*(" + _NUM + r")([A-Za-z%]*)")
_PER_S = re.compile(r"(" + _NUM + r")\s*(steps|samples)/s\b")
_TQDM = re.compile(
    r"(?:(\d+)%\|[^|]*\|\s*)?(\d+)(?:/(\d+)|it)\s*\[([\d:]+)(?:<([\d:?]+))?,\s*"
    r"(\?|[\d.]+)\s*(s/\w+|\w+/s)(?:,\s*([^\]]*))?\]"
)
_CLOCK = re.compile(
    r"^\s*(?:(\d{4})-(\d\d)-(\d\d)[ T]|[IWEF]\d{4} )?(\d\d):(\d\d):(\d\d)(?:[.,](\d{1,6}))?\b"
)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class Record:
    """One metrics line: its step, the run's total steps when logged, its clock time, fields."""

    step: int
    total: int | None
    time: float | None
    fields: dict[str, float]


@dataclass
class Tqdm:
    """The latest tqdm bar: iterations done, total, seconds per iteration, postfix loss."""

    n: int
    total: int | None
    s_per_it: float | None
    loss: float | None = None


@dataclass
class TrainingStatus:
    """What the log says about the run; `to_dict()` is JSON-safe (non-finite → "nan"/"inf")."""

    step: int | None = None
    total: int | None = None
    loss: float | None = None
    loss_smoothed: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    s_per_step: float | None = None
    steps_per_s: float | None = None
    samples_per_s: float | None = None
    eta_s: float | None = None
    rate_source: str | None = None
    fields: dict[str, float] = field(default_factory=dict)
    history: list[tuple[int, float | None, float | None]] = field(default_factory=list)
    records: int = 0
    restarts: int = 0

    @property
    def progress(self) -> float | None:
        """Fraction of the total steps done."""
        if self.step is None or not self.total:
            return None
        return min(1.0, self.step / self.total)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "step": self.step,
            "total": self.total,
            "progress": json_number(self.progress),
            "loss": json_number(self.loss),
            "loss_smoothed": json_number(self.loss_smoothed),
            "grad_norm": json_number(self.grad_norm),
            "lr": json_number(self.lr),
            "s_per_step": json_number(self.s_per_step),
            "steps_per_s": json_number(self.steps_per_s),
            "samples_per_s": json_number(self.samples_per_s),
            "eta_s": json_number(self.eta_s),
            "rate_source": self.rate_source,
            "fields": {k: json_number(v) for k, v in self.fields.items()},
            "history": [[s, json_number(lo), json_number(g)] for s, lo, g in self.history],
            "records": self.records,
            "restarts": self.restarts,
        }


def parse_log(
    text: str,
    batch_size: int | None = None,
    *,
    smoothing: float = 0.6,
    history: int = 200,
) -> TrainingStatus:
    """Parse a log's text. `batch_size` (global) gives samples/s; `smoothing` is the EMA weight
    of the previous value (W&B's 0.6 by default); `history` caps the kept (step, loss, grad_norm)
    points."""
    records, bar = parse_lines(text)
    return summarize(records, bar, batch_size, smoothing=smoothing, history=history)


def parse_log_file(
    path: str | os.PathLike[str],
    batch_size: int | None = None,
    *,
    max_bytes: int = 4 * 1024 * 1024,
    smoothing: float = 0.6,
    history: int = 200,
) -> TrainingStatus:
    """Parse the last `max_bytes` of a log file (an empty status when it does not exist)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return TrainingStatus()
    return parse_log(text, batch_size, smoothing=smoothing, history=history)


def parse_lines(text: str) -> tuple[list[Record], Tqdm | None]:
    """Every metrics record in order, and the last tqdm bar."""
    records: list[Record] = []
    bar: Tqdm | None = None
    day = 0.0
    last_time: float | None = None
    for raw in text.split("\n"):
        if "\x1b" in raw:
            raw = _ANSI.sub("", raw)
        for part in raw.split("\r"):
            if "s/" in part or "/s" in part:
                m = _TQDM.search(part)
                if m is not None:
                    bar = _tqdm(m)
                    # logging writes its line right after the bar, without a line break.
                    part = part[m.end() :]
            if "tep" not in part:
                continue
            rec = _record(part)
            if rec is None:
                continue
            if rec.time is not None:
                # Clock-only timestamps wrap at midnight.
                if last_time is not None and rec.time + day < last_time - 3600:
                    day += 86400.0
                rec.time += day
                last_time = rec.time
            records.append(rec)
    return records, bar


def summarize(
    records: list[Record],
    bar: Tqdm | None,
    batch_size: int | None = None,
    *,
    smoothing: float = 0.6,
    history: int = 200,
) -> TrainingStatus:
    """Fold parsed records and the tqdm bar into a TrainingStatus."""
    st = TrainingStatus(records=len(records))
    segment = _current_segment(records)
    st.restarts = _count_restarts(records)
    ema, weight = 0.0, 0.0
    for rec in segment:
        loss = rec.fields.get("loss")
        if loss is not None and math.isfinite(loss):
            ema = smoothing * ema + (1 - smoothing) * loss
            weight = smoothing * weight + (1 - smoothing)
    st.loss_smoothed = ema / weight if weight else None
    st.history = [
        (r.step, r.fields.get("loss"), r.fields.get("grad_norm")) for r in records[-history:]
    ]
    if segment:
        last = segment[-1]
        st.step, st.total = last.step, last.total
        st.loss = last.fields.get("loss")
        st.grad_norm = last.fields.get("grad_norm")
        st.lr = last.fields.get("lr")
        st.fields = {k: v for k, v in last.fields.items() if k not in _CORE and k != "eta_s"}
    if bar is not None:
        if st.step is None or bar.n > st.step:
            st.step = bar.n
        st.total = st.total or bar.total
        if st.loss is None:
            st.loss = bar.loss
    st.s_per_step, st.rate_source = _seconds_per_step(segment, bar)
    if st.s_per_step:
        st.steps_per_s = 1.0 / st.s_per_step
        if st.total is not None and st.step is not None:
            st.eta_s = max(0, st.total - st.step) * st.s_per_step
    logged = segment[-1].fields.get("samples_per_s") if segment else None
    if logged is not None:
        st.samples_per_s = logged
    elif batch_size and st.steps_per_s:
        st.samples_per_s = batch_size * st.steps_per_s
    return st


def _record(part: str) -> Record | None:
    step_m = _STEP.search(part)
    if step_m is None:
        return None
    fields: dict[str, float] = {}
    for key, value, unit in _KV.findall(part):
        name = ALIASES.get(key, key)
        if name.lower() in ("step", "global_step"):
            continue
        number = float(value)
        if name in ("eta_s", "interval_s"):
            if unit not in _TIME_UNITS:
                continue
            number *= _TIME_UNITS[unit]
        fields[name] = number
    if "s/s" in part:  # cheap guard: the number-first regex is slow on every line
        for value, what in _PER_S.findall(part):
            fields.setdefault("steps_per_s" if what == "steps" else "samples_per_s", float(value))
    if "loss" not in fields and "grad_norm" not in fields:
        return None
    total = int(step_m.group(2)) if step_m.group(2) else None
    return Record(int(step_m.group(1)), total, _clock(part), fields)


def _tqdm(m: re.Match[str]) -> Tqdm:
    _, n, total, _, _, rate, unit, postfix = m.groups()
    s_per_it = None
    if rate != "?" and float(rate) > 0:
        s_per_it = float(rate) if unit.startswith("s/") else 1.0 / float(rate)
    loss = None
    if postfix:
        lm = re.search(r"\bloss=(" + _NUM + ")", postfix)
        loss = float(lm.group(1)) if lm else None
    return Tqdm(int(n), int(total) if total else None, s_per_it, loss)


def _clock(line: str) -> float | None:
    m = _CLOCK.match(line)
    if m is None:
        return None
    year, month, day, hh, mm, ss, frac = m.groups()
    seconds = int(hh) * 3600 + int(mm) * 60 + int(ss) + (float("0." + frac) if frac else 0.0)
    if year:
        midnight = calendar.timegm((int(year), int(month), int(day), 0, 0, 0, 0, 0, 0))
        return midnight + seconds
    return float(seconds)


def _current_segment(records: list[Record]) -> list[Record]:
    """Records since the last restart (a step lower than the one before it)."""
    start = 0
    for i in range(1, len(records)):
        if records[i].step < records[i - 1].step:
            start = i
    return records[start:]


def _count_restarts(records: list[Record]) -> int:
    # (no zip(strict=)/pairwise: this runs on Python 3.9)
    return sum(1 for i in range(1, len(records)) if records[i].step < records[i - 1].step)


def _seconds_per_step(segment: list[Record], bar: Tqdm | None) -> tuple[float | None, str | None]:
    last = segment[-1] if segment else None
    if last is not None and last.fields.get("s_per_step"):
        return last.fields["s_per_step"], "time_per_step"
    timed = [r for r in segment[-6:] if r.time is not None]
    if len(timed) >= 2:
        steps = timed[-1].step - timed[0].step
        seconds = timed[-1].time - timed[0].time  # type: ignore[operator]
        if steps > 0 and seconds > 0:
            return seconds / steps, "log timestamps"
    if bar is not None and bar.s_per_it:
        return bar.s_per_it, "tqdm"
    if last is not None and last.fields.get("steps_per_s"):
        return 1.0 / last.fields["steps_per_s"], "steps/s field"
    if last is not None and last.fields.get("interval_s") and len(segment) >= 2:
        steps = last.step - segment[-2].step
        if steps > 0:
            return last.fields["interval_s"] / steps, "interval time"
    return None, None


def json_number(value: float | None) -> float | str | None:
    """A float for JSON: non-finite values become "nan", "inf" or "-inf" (JSON has none)."""
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
