"""Plain-text rendering of monitor snapshots and pre-flight rows (no rich: usable on the box,
in logs, and as the CLI's fallback), plus the loss sparkline."""

from __future__ import annotations

import math
from typing import Any

from provision.monitor.alerts import as_float

TICKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[Any], width: int = 40) -> str:
    """A one-line chart of the last `width` finite values (▁ lowest, █ highest)."""
    finite = [v for v in (as_float(x) for x in values) if v is not None and math.isfinite(v)]
    finite = finite[-width:]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    if hi == lo:
        return TICKS[0] * len(finite)
    top = len(TICKS) - 1
    return "".join(TICKS[int((v - lo) / (hi - lo) * top + 0.5)] for v in finite)


def duration(seconds: Any) -> str:
    """`1d 02:03:04`, `02:03:04` or `-` for a number of seconds."""
    value = as_float(seconds)
    if value is None or not math.isfinite(value):
        return "-"
    total = round(value)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


def render_rows(rows: list[dict[str, Any]]) -> str:
    """Pre-flight rows as an aligned table: check, value, expected, OK/FAIL (and the detail)."""
    table = [("check", "value", "expected", "")]
    table += [(r["check"], r["value"], r["expected"], "OK" if r["ok"] else "FAIL") for r in rows]
    widths = [max(len(str(cells[i])) for cells in table) for i in range(4)]
    lines = [_aligned(table[0], widths)]
    for i, row in enumerate(rows):
        lines.append(_aligned(table[i + 1], widths))
        if not row["ok"] and row.get("detail"):
            lines.append(" " * (widths[0] + 2) + "-> " + row["detail"])
    return "\n".join(lines) + "\n"


def _aligned(cells: tuple[Any, ...], widths: list[int]) -> str:
    return "  ".join(str(cells[i]).ljust(widths[i]) for i in range(len(widths))).rstrip()


def render_snapshot(snap: dict[str, Any], width: int = 40) -> str:
    """A monitor snapshot as a few lines of text: progress, loss, speed, GPUs, host, alerts."""
    tr = snap.get("training") or {}
    out = []
    step, total = tr.get("step"), tr.get("total")
    progress = as_float(tr.get("progress"))
    where = f"step {step}" + (f"/{total}" if total else "") if step is not None else "no step yet"
    if progress is not None:
        where += f" ({100 * progress:.1f} %)"
    out.append(f"{where}   ETA {duration(tr.get('eta_s'))}")
    out.append(
        f"loss {_num(tr.get('loss'))} (smoothed {_num(tr.get('loss_smoothed'))})   "
        f"grad_norm {_num(tr.get('grad_norm'))}   lr {_num(tr.get('lr'))}"
    )
    history = [h[1] for h in tr.get("history") or []]
    if history:
        out.append(f"loss {sparkline(history, width)}")
    speed = f"{_num(tr.get('s_per_step'))} s/step   {_num(tr.get('steps_per_s'))} steps/s"
    if tr.get("samples_per_s") is not None:
        speed += f"   {_num(tr.get('samples_per_s'))} samples/s"
    out.append(speed)
    gpus = snap.get("gpus") or {}
    if gpus.get("error"):
        out.append(f"GPUs: {gpus['error']}")
    for g in gpus.get("gpus") or []:
        state = "OK" if g.get("ok") else "ERROR"
        out.append(
            f"gpu{g.get('index')} {g.get('name')}: util {_num(g.get('utilization_pct'))} %  "
            f"mem {_num(g.get('memory_used_mib'))}/{_num(g.get('memory_total_mib'))} MiB  "
            f"temp {_num(g.get('temperature_c'))} °C  {state}"
        )
    hs = snap.get("host") or {}
    mem = hs.get("memory") or {}
    if hs:
        out.append(
            f"cpu {_num(hs.get('cpu_pct'))} % of {_num(hs.get('cpu_cores'))} cores   "
            f"ram {_num(mem.get('used_pct'))} % of {_num(mem.get('total_gb'))} GB"
        )
        for d in hs.get("disks") or []:
            out.append(f"disk {d.get('path')}: {_num(d.get('free_gb'))} GB free")
    if snap.get("checkpoints"):
        out.append(f"checkpoints {_checkpoint_line(snap['checkpoints'])}")
    for a in snap.get("alerts") or []:
        out.append(f"{a['severity'].upper()}: {a['message']}")
    for issue in snap.get("known_issues") or []:
        out.append(f"known issue [{issue['id']}]: {issue['diagnosis']} Fix: {issue['fix']}")
    return "\n".join(out) + "\n"


def _checkpoint_line(found: dict[str, Any]) -> str:
    """The checkpoint disk forecast in one line (see checkpoint_disk.Forecast.describe)."""
    from provision.monitor.checkpoint_disk import Forecast

    try:
        return Forecast(**found).describe()
    except TypeError:  # an agent of another version
        return str(found.get("dir"))


def _num(value: Any) -> str:
    number = as_float(value)
    if number is None:
        return "-"
    if not math.isfinite(number):
        return str(number)
    if number == int(number) and abs(number) < 1e6:
        return str(int(number))
    magnitude = abs(number)
    if magnitude >= 100:
        return f"{number:.1f}"
    if magnitude >= 0.01:
        return f"{number:.4g}"
    return f"{number:.2e}"
