"""The box's link goes to the critical path first.

The steps of a rented box that mostly receive bytes (a kind with `receives = True`: uv's sync
and installs, rclone, GCS and git downloads; a cached step's restore) share one link. Started
together, they split it: on seed 003's box the 12 GB checkpoint and the datasets took their
share of the bandwidth from the venv's sync, which everything after it waits for, and the run
reached step 0 later by what they took, although they had minutes to spare.

So, when every step has a duration (measured on this box, else its `estimate:`), the runner
computes each step's slack (the critical path method, `dag.slack`: how much later it can start
without the run ending later) and a ready receiving step waits while a running step with less
slack is still receiving, for at most its own slack (so it cannot become the late one). A step
is receiving until its progress says its bytes are in: a byte count reaching its total (a
restore, rclone, GCS) or a kind's `received` flag (uv once it has prepared every wheel); a
receiving kind that has said nothing yet is receiving. Without a duration for every step
nothing waits: a guess of 0 s would make a long step look as if it had slack.

Hand-written: it is a few lines over `dag` (graphlib); no scheduler library holds one download
while a more urgent one is receiving.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from provision import dag


def receiving(progress: dict[str, Any] | None, kind_receives: bool) -> bool:
    """Is a running step receiving bytes, by its last progress report?"""
    if progress and progress.get("unit") == "B" and progress.get("total"):
        return bool(progress.get("done", 0) < progress["total"])
    if not kind_receives:
        return False
    return not (progress and progress.get("received"))


class Link:
    """Which ready receiving step yields the link to which running one."""

    def __init__(
        self,
        needs: Mapping[str, list[str]],
        durations: Callable[[], Mapping[str, float | None]],
        receives: Callable[[str], bool],
        progress: Callable[[str], dict[str, Any] | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`durations()`: each step's expected seconds, None where unknown (asked once, when a
        step is first ranked); `receives(step)`: is its kind a receiving one; `progress(step)`:
        its last `_progress.json`."""
        self.needs = needs
        self.durations = durations
        self._slack: dict[str, float] | None = None
        self.receives = receives
        self.progress = progress
        self.clock = clock
        #: When each waiting step began to wait (it waits at most its slack in all).
        self.waiting_since: dict[str, float] = {}

    @property
    def slack(self) -> dict[str, float]:
        """Each step's seconds of slack; {} (no step waits) unless every step has a duration."""
        if self._slack is None:
            known = {k: v for k, v in self.durations().items() if v is not None}
            whole = len(known) == len(self.needs) and all(k in known for k in self.needs)
            self._slack = dag.slack(self.needs, known) if whole else {}
        return self._slack

    def rank(self, step_id: str) -> float:
        """The order ready steps are considered in: least slack first."""
        return self.slack.get(step_id, 0.0)

    def yields_to(self, step_id: str, running: Iterable[str]) -> str | None:
        """The running step that has the link before `step_id`, or None: `step_id` may start."""
        mine = self.slack.get(step_id, 0.0)
        if mine <= 0 or not self.receives(step_id):
            return None
        since = self.waiting_since.setdefault(step_id, self.clock())
        if self.clock() - since < mine:
            for other in sorted(running, key=self.rank):
                if self.slack.get(other, mine) < mine and receiving(
                    self.progress(other), self.receives(other)
                ):
                    return other
        del self.waiting_since[step_id]
        return None
