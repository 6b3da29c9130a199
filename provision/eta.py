"""When a run is expected to reach step 0: the critical path of the work that is left.

Pure functions, no I/O. A step's remaining seconds come from its status and, while it runs, its
live progress (bytes or files left at the reported rate), else from its expected duration: the
median of its measured durations on earlier runs of the playbook (a cache restore counts as the
time it took), else the playbook's `estimate:`. The run's ETA is the longest chain of remaining
seconds that ends at the target steps (the `wait_log` steps that wait for step 0; without any,
the whole run), so steps that run beside the critical path cost nothing, as on the box.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from provision import dag

#: Durations kept per step (the newest): enough for a median that one odd run does not move.
HISTORY = 5
#: Statuses after which a step takes no more time.
FINISHED = ("done", "skipped")
#: Statuses after which the target cannot be reached in this run.
STUCK = ("failed", "error", "blocked")
#: A running step past its expected duration is still given this much: it is not done yet.
OVERRUN_S = 1.0
#: The sink node `eta` adds after the targets (no step id can be empty).
_END = ""


@dataclass(frozen=True)
class StepTiming:
    """What the ETA knows of one step."""

    status: str
    #: Seconds it has been running (running steps).
    elapsed: float | None = None
    #: Its expected duration in seconds, or None when it was never measured nor estimated.
    expected: float | None = None
    #: Its live progress, as the step reports it (`done`, `total`, `speed`, `files_*`, ...).
    progress: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Eta:
    """The expected time to the targets' end."""

    seconds: float
    #: The target that ends last.
    target: str
    #: The chain of steps (left to run) that decides it.
    path: list[str]
    #: Steps on the way with no expected duration (counted as 0 s).
    untimed: list[str]


def expected(durations: Iterable[float]) -> float | None:
    """The expected duration from measured ones: their median (None when there are none)."""
    values = [float(d) for d in durations]
    return statistics.median(values) if values else None


def remember(history: list[float], duration: float) -> list[float]:
    """`history` with `duration` added, the newest HISTORY kept."""
    return [*history, round(float(duration), 3)][-HISTORY:]


def progress_left(progress: Mapping[str, Any] | None, elapsed: float | None) -> float | None:
    """Seconds left by a step's live progress: bytes (or units) left at the reported rate,
    else the fraction done so far extrapolated over the time it took. None when it says
    neither."""
    if not progress:
        return None
    done, total, speed = (_positive(progress.get(k)) for k in ("done", "total", "speed"))
    spent = _positive(elapsed)
    if total is not None and progress.get("done") is not None:
        left = max(total - (done or 0.0), 0.0)
        if speed is not None:
            return left / speed
        if done is not None and spent is not None:
            return spent * left / done
    files_done, files_total = (_positive(progress.get(k)) for k in ("files_done", "files_total"))
    if files_total is not None and files_done is not None and spent is not None:
        return spent * (files_total - files_done) / files_done
    return None


def _positive(value: Any) -> float | None:
    """`value` as a float when it is a number > 0, else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def remaining(step: StepTiming) -> float | None:
    """Seconds a step still needs (0 once finished); None when nothing tells."""
    if step.status in FINISHED:
        return 0.0
    if step.status == "running":
        by_progress = progress_left(step.progress, step.elapsed)
        if by_progress is not None:
            return by_progress
        if step.expected is not None:
            return max(step.expected - float(step.elapsed or 0), OVERRUN_S)
        return None
    return step.expected


def eta(
    needs: Mapping[str, Iterable[str]],
    steps: Mapping[str, StepTiming],
    targets: Iterable[str] | None = None,
) -> Eta | None:
    """The expected seconds until the last of `targets` ends (default: every step); None when
    they all ended, or one of them cannot end in this run (a step on the way failed)."""
    wanted = [t for t in (targets if targets is not None else needs) if t in steps]
    if not wanted or all(steps[t].status in FINISHED for t in wanted):
        return None
    on_way = dag.upstream(needs, wanted)
    if any(steps[s].status in STUCK for s in on_way if s in steps):
        return None
    sub = {s: [n for n in needs.get(s, ()) if n in on_way] for s in on_way}
    left = {s: remaining(steps[s]) if s in steps else 0.0 for s in on_way}
    # A sink after every target, taking 1 s so that it ends last alone: the chain found ends
    # at the target that ends last (a target taking 0 s would tie with the step before it).
    sub[_END] = wanted
    path, total = dag.critical_path(sub, {_END: 1.0, **{s: v or 0.0 for s, v in left.items()}})
    path, total = path[:-1], total - 1.0
    end = path[-1]
    untimed = sorted(s for s, v in left.items() if v is None)
    return Eta(total, end, [s for s in path if (left[s] or 0) > 0 or s == end], untimed)


def human(seconds: float) -> str:
    """`~4m10s`, `~35s`, `~1h05m`: coarse enough to read at a glance."""
    s = round(seconds)
    if s < 60:
        return f"~{s}s"
    if s < 3600:
        return f"~{s // 60}m{s % 60:02d}s"
    return f"~{s // 3600}h{s % 3600 // 60:02d}m"


def targets_of(kinds: Mapping[str, str]) -> list[str]:
    """The steps that mean "step 0": the `wait_log` steps; every step when there are none."""
    waits = [s for s, kind in kinds.items() if kind == "wait_log"]
    return waits or list(kinds)


def line(result: Eta | None, step0: bool) -> str | None:
    """The run's one line: `step 0 expected in ~4m10s (uv-sync -> convert -> wait-step0)`."""
    if result is None:
        return None
    what = "step 0" if step0 else "run end"
    text = f"{what} expected in {human(result.seconds)}"
    if result.path:
        text += f" ({' -> '.join(result.path)})"
    if result.untimed:
        n = len(result.untimed)
        text += f"; {n} step{'s' if n > 1 else ''} never timed"
    return text
