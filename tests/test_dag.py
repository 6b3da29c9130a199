"""provision/dag.py: order, cycles, up/downstream sets and the critical path (no box)."""

from __future__ import annotations

import pytest

from provision import dag

#: fetch -> (build, lint) -> test -> ship; docs stands alone.
NEEDS = {
    "fetch": [],
    "docs": [],
    "build": ["fetch"],
    "lint": ["fetch"],
    "test": ["build", "lint"],
    "ship": ["test"],
}


def test_topo_order_puts_needs_first_and_keeps_declaration_order_among_ready_steps() -> None:
    order = dag.topo_order(NEEDS)
    assert order == ["fetch", "docs", "build", "lint", "test", "ship"]
    reversed_decl = {k: NEEDS[k] for k in reversed(list(NEEDS))}
    assert dag.topo_order(reversed_decl) == ["docs", "fetch", "lint", "build", "test", "ship"]
    for step, deps in NEEDS.items():
        assert all(order.index(d) < order.index(step) for d in deps)


def test_a_cycle_is_reported_in_running_order_first_repeated_last() -> None:
    with pytest.raises(dag.CycleFound) as exc:
        dag.topo_order({"a": ["c"], "b": ["a"], "c": ["b"], "d": []})
    cycle = exc.value.cycle
    assert cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"} and len(cycle) == 4
    # Each step in the message comes before the one that needs it (the order they would run).
    needs = {"a": ["c"], "b": ["a"], "c": ["b"]}
    assert all(cycle[i] in needs[cycle[i + 1]] for i in range(3))
    assert str(exc.value) == " -> ".join(cycle)
    with pytest.raises(dag.CycleFound) as self_loop:
        dag.topo_order({"a": ["a"]})
    assert self_loop.value.cycle == ["a", "a"]


def test_a_need_outside_the_graph_still_orders_first() -> None:
    assert dag.topo_order({"b": ["a"]}) == ["a", "b"]


def test_dependents_downstream_and_upstream() -> None:
    assert dag.dependents(NEEDS)["fetch"] == {"build", "lint"}
    assert dag.dependents(NEEDS)["ship"] == set()
    assert dag.downstream(NEEDS, ["build"]) == {"build", "test", "ship"}
    assert dag.downstream(NEEDS, ["fetch"]) == {"fetch", "build", "lint", "test", "ship"}
    assert dag.upstream(NEEDS, ["test"]) == {"test", "build", "lint", "fetch"}
    assert dag.upstream(NEEDS, ["docs", "lint"]) == {"docs", "lint", "fetch"}
    assert dag.downstream(NEEDS, []) == set()


def test_critical_path_is_the_longest_chain_by_estimate() -> None:
    estimate = {"fetch": 10, "build": 100, "lint": 5, "test": 20, "ship": 1, "docs": 120}
    path, total = dag.critical_path(NEEDS, estimate)
    assert path == ["fetch", "build", "test", "ship"] and total == 131
    # Missing estimates count 0: the lone long step wins.
    path, total = dag.critical_path(NEEDS, {"docs": 200, "build": 1})
    assert (path, total) == (["docs"], 200)
    assert dag.critical_path({}, {}) == ([], 0.0)


def test_slack_is_zero_on_the_critical_path_and_the_spare_seconds_elsewhere() -> None:
    estimate = {"fetch": 10, "build": 100, "lint": 5, "test": 20, "ship": 1, "docs": 120}
    # The end is at 131 s (fetch, build, test, ship); lint may end as late as build (110 s),
    # docs as late as the end.
    assert dag.slack(NEEDS, estimate) == {
        "fetch": 0.0, "docs": 11.0, "build": 0.0, "lint": 95.0, "test": 0.0, "ship": 0.0,
    }  # fmt: skip
    assert dag.slack({}, {}) == {}
