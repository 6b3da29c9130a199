"""provision/agent/link.py: a ready download with slack waits while a more critical one
receives, at most its slack (no box, no processes; the runner's own use is in
tests/test_runner_local.py)."""

from __future__ import annotations

from typing import Any

from provision.agent.link import Link, receiving

#: The bench's tracks in small: clone -> sync -> convert <- ckpt; data alone.
NEEDS = {"clone": [], "sync": ["clone"], "ckpt": [], "convert": ["sync", "ckpt"], "data": []}
DURATIONS = {"clone": 2.0, "sync": 20.0, "ckpt": 5.0, "convert": 5.0, "data": 3.0}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _link(
    progress: dict[str, dict[str, Any] | None],
    durations: dict[str, float | None] | None = None,
    receives: set[str] | None = None,
) -> tuple[Link, Clock]:
    clock = Clock()
    link = Link(
        NEEDS,
        lambda: dict(DURATIONS if durations is None else durations),
        lambda sid: sid in (receives if receives is not None else set(NEEDS) - {"convert"}),
        progress.get,
        clock,
    )
    return link, clock


def test_receiving_by_the_last_progress_report() -> None:
    assert receiving(None, True), "a receiving kind that has said nothing yet is receiving"
    assert not receiving(None, False)
    assert receiving({"message": "downloading jax (80MiB)"}, True)
    assert not receiving({"message": "prepared 69 packages", "received": True}, True)
    # A byte count says it for any kind: a cached step's restore, rclone, GCS.
    assert receiving({"unit": "B", "done": 10, "total": 20}, False)
    assert not receiving({"unit": "B", "done": 20, "total": 20}, True)


def test_a_step_with_slack_waits_while_a_critical_one_receives() -> None:
    progress: dict[str, dict[str, Any] | None] = {"sync": {"message": "resolved 69 packages"}}
    link, clock = _link(progress)
    assert link.slack["ckpt"] == 17.0 and link.slack["sync"] == 0.0
    assert sorted(NEEDS, key=link.rank)[:3] == ["clone", "sync", "convert"]
    assert link.yields_to("ckpt", ["sync"]) == "sync"
    assert link.yields_to("sync", ["ckpt"]) is None, "the critical step never waits"
    assert link.yields_to("ckpt", []) is None, "nothing receiving: it starts"
    clock.now += 3
    progress["sync"] = {"message": "prepared 69 packages", "received": True}
    assert link.yields_to("ckpt", ["sync"]) is None, "the sync's bytes are in: it starts"


def test_a_step_waits_at_most_its_slack() -> None:
    link, clock = _link({})  # the sync never says its bytes are in
    assert link.yields_to("data", ["ckpt", "sync"]) == "sync"  # the one with least slack
    clock.now += link.slack["data"] - 0.1
    assert link.yields_to("data", ["sync"]) == "sync"
    clock.now += 0.1
    assert link.yields_to("data", ["sync"]) is None, "any longer would make the run end later"


def test_only_receiving_kinds_wait_and_only_for_receiving_ones() -> None:
    link, _ = _link({}, receives={"sync", "ckpt"})
    assert link.yields_to("data", ["sync"]) is None, "data's kind does not receive: CPU work"
    assert link.yields_to("ckpt", ["clone"]) is None, "clone's kind does not receive"
    assert link.yields_to("ckpt", ["sync"]) == "sync"


def test_nothing_waits_without_a_duration_for_every_step() -> None:
    link, _ = _link({}, durations={**DURATIONS, "convert": None})
    assert link.slack == {}
    assert link.yields_to("ckpt", ["sync"]) is None
