"""The step graph: order, cycles, up/downstream sets and the critical path.

Standard library only (`graphlib`); used on the controller to validate and draw a playbook, and by
the agent's runner to schedule steps.
"""

from __future__ import annotations

import graphlib
from collections.abc import Iterable, Mapping


class CycleFound(ValueError):
    """The graph has a cycle; `cycle` lists its step ids in order, first repeated last."""

    def __init__(self, cycle: list[str]) -> None:
        super().__init__(" -> ".join(cycle))
        self.cycle = cycle


def topo_order(needs: Mapping[str, Iterable[str]]) -> list[str]:
    """Step ids so that every step comes after what it needs; raises CycleFound.

    Among steps that are ready together, the declaration order of `needs` is kept, so plans and
    drawings read like the playbook.
    """
    position = {node: i for i, node in enumerate(needs)}
    sorter = graphlib.TopologicalSorter({k: tuple(v) for k, v in needs.items()})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        # graphlib lists the cycle so that each node is a predecessor (a need) of the next:
        # the order the steps would run in, dependency first.
        raise CycleFound(list(exc.args[1])) from None
    order: list[str] = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready(), key=lambda n: position.get(n, len(position)))
        order.extend(ready)
        sorter.done(*ready)
    return order


def dependents(needs: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """Invert `needs`: for each step, the steps that need it directly."""
    out: dict[str, set[str]] = {node: set() for node in needs}
    for node, deps in needs.items():
        for dep in deps:
            out.setdefault(dep, set()).add(node)
    return out


def downstream(needs: Mapping[str, Iterable[str]], roots: Iterable[str]) -> set[str]:
    """`roots` and every step that depends on them, transitively."""
    return _closure(dependents(needs), roots)


def upstream(needs: Mapping[str, Iterable[str]], roots: Iterable[str]) -> set[str]:
    """`roots` and every step they need, transitively."""
    return _closure({k: set(v) for k, v in needs.items()}, roots)


def _closure(edges: Mapping[str, set[str]], roots: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(edges.get(node, ()))
    return seen


def critical_path(
    needs: Mapping[str, Iterable[str]], estimate: Mapping[str, float]
) -> tuple[list[str], float]:
    """The longest chain by estimated seconds (missing estimates count 0) and its length."""
    finish: dict[str, float] = {}
    best_prev: dict[str, str | None] = {}
    for node in topo_order(needs):
        prev = max(needs.get(node, ()), key=lambda d: finish[d], default=None)
        start = finish[prev] if prev is not None else 0.0
        finish[node] = start + float(estimate.get(node) or 0.0)
        best_prev[node] = prev
    if not finish:
        return [], 0.0
    end = max(finish, key=lambda n: finish[n])
    path: list[str] = []
    cursor: str | None = end
    while cursor is not None:
        path.append(cursor)
        cursor = best_prev[cursor]
    return list(reversed(path)), finish[end]


def slack(needs: Mapping[str, Iterable[str]], duration: Mapping[str, float]) -> dict[str, float]:
    """Each step's total float (the critical path method): how many seconds it can start later
    than it could without making the whole graph end later; 0 on the critical path. Missing
    durations count 0."""
    order = topo_order(needs)
    earliest: dict[str, float] = {}  # earliest start
    for node in order:
        earliest[node] = max(
            (earliest[d] + float(duration.get(d) or 0.0) for d in needs.get(node, ())),
            default=0.0,
        )
    end = max((earliest[n] + float(duration.get(n) or 0.0) for n in order), default=0.0)
    after = dependents(needs)
    latest: dict[str, float] = {}  # latest start
    for node in reversed(order):
        finish = min((latest[d] for d in after.get(node, ())), default=end)
        latest[node] = finish - float(duration.get(node) or 0.0)
    return {node: max(0.0, latest[node] - earliest[node]) for node in order}
