"""Cached steps fetched ahead: a step's entry downloaded while its needs still run.

On a warm box the environment unit (the venv) is restored first, then verified (its imports),
and only then can the conversion start and restore its own 7 GB `model.safetensors`: the link
idles through the venv's unpacking and verification, then the conversion's download waits for
nothing but its turn. Yet the conversion's key is final long before: it holds its needs' keys
(cached needs) and fingerprints (needs without outputs), not their outputs. So as soon as a
cached step's key is final (`Pruner.key_final`) and the step is still waiting for its needs,
the runner fetches its entry into a staging directory of its own (`provision.cache.restore.
fetch_ahead`: every archive checked against its sha256, a marker written last). When the step
starts, its `agent exec` finds the copy for the key it computes and only puts it in place,
then verifies it as always (a restored step is verified like a run one).

The fetch waits for the link while a cached step upstream is receiving its own archives
(its restore's progress says so, or it has not said anything yet): that step is on the way to
this one, and bytes shared with it would only delay it; the fetch then overlaps that step's
unpacking and verification (a venv's imports: seconds on which the link idles) instead.
A step whose fetch is still going when it becomes ready is held until the fetch ends (sooner
than a download of its own that starts then). A miss or a failed fetch leaves nothing: the step
restores or runs as without. Not fetched ahead: a step done on this box before (it is most
likely done again), a forced one (`rerun` runs it), one with a need that failed. What is not
put in place by the end of the run is removed; a runner that stops ends its fetches.

Standard library only (the agent core); the cache's modules are imported when a plan has a
cached step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from provision import dag
from provision.agent.files import read_json
from provision.agent.prune import Pruner, cache_inputs
from provision.agent.state import RunDir
from provision.model import PlannedStep, StepStatus


class Ahead:
    """The fetches ahead of one runner's life.

    `status(step_id)`, `forced(step_id)`, `env(step)` and `wake()` as for `Pruner`; `log`
    writes one line of the runner's log (redacted: a store's error may quote a URL).
    """

    def __init__(
        self,
        run: RunDir,
        steps: dict[str, PlannedStep],
        needs: dict[str, list[str]],
        pruner: Pruner,
        status: Callable[[str], StepStatus],
        forced: Callable[[str], bool],
        env: Callable[[PlannedStep], dict[str, str]],
        wake: Callable[[], None],
        log: Callable[[str], None],
    ) -> None:
        self.run, self.steps, self.needs, self.pruner = run, steps, needs, pruner
        self.status, self.forced, self.env, self.wake = status, forced, env, wake
        self.log = log
        # A step keyed on files (`inputs:`, a lock file its needs write) has its key only once
        # its needs are done, and then it starts: nothing to fetch ahead of it.
        self.candidates = [
            s for s in needs if steps[s].cache and steps[s].outputs and not cache_inputs(steps[s])
        ]
        self.fetches: dict[str, threading.Thread] = {}
        self.stop = threading.Event()

    def consider(self, started: Callable[[str], bool]) -> None:
        """Start the fetch of every cached step whose key is final while it still waits for its
        needs (`started(step_id)`: whether this runner has started the step already)."""
        for step_id in self.candidates:
            if step_id not in self.fetches and not started(step_id) and self._worth(step_id):
                self._start(step_id)

    def fetching(self, step_id: str) -> bool:
        """Whether the step's fetch is still going (the runner holds the step until it ends)."""
        thread = self.fetches.get(step_id)
        return thread is not None and thread.is_alive()

    def busy(self) -> bool:
        """Whether a fetch is going (the runner waits for it, as for a child)."""
        return any(thread.is_alive() for thread in self.fetches.values())

    def end(self) -> None:
        """The runner is ending: stop the fetches still going and remove every copy left."""
        if not self.fetches:
            return
        from provision.cache.restore import drop_ahead

        self.stop.set()
        for step_id, thread in self.fetches.items():
            thread.join()
            drop_ahead(self.steps[step_id].to_json())

    def _worth(self, step_id: str) -> bool:
        needs = self.needs[step_id]
        return (
            self.status(step_id) is not StepStatus.DONE
            and not self.forced(step_id)
            and not any(self.status(n).bad for n in needs)
            and not all(self.status(n) is StepStatus.DONE for n in needs)
            and self.pruner.key_final(step_id)
            and not self._receiving_upstream(step_id)
        )

    def _receiving_upstream(self, step_id: str) -> bool:
        """Whether a cached step upstream is to start or runs, and its archives' bytes are not
        all in yet (one not started yet: its needs are done, as `key_final` asked)."""
        from provision.cache.restore import RECEIVING

        for up in dag.upstream(self.needs, [step_id]) - {step_id}:
            if not self.steps[up].cache or self.status(up) is StepStatus.DONE:
                continue
            if self.status(up) is not StepStatus.RUNNING:
                return True
            said = read_json(self.run.step_dir(up) / "_progress.json", None)
            if not isinstance(said, dict):
                return True  # its restore has not begun (or it missed and runs: then wait)
            if said.get("message") == RECEIVING and said.get("done", 0) < said.get("total", 0):
                return True
        return False

    def _start(self, step_id: str) -> None:
        thread = threading.Thread(
            target=self._fetch, args=(step_id,), daemon=True, name=f"ahead-{step_id}"
        )
        self.fetches[step_id] = thread
        thread.start()

    def _fetch(self, step_id: str) -> None:
        from provision.cache.restore import fetch_ahead

        step = self.steps[step_id]
        try:
            said = fetch_ahead(self.run.path, step.to_json(), self.env(step), self.stop)
        except Exception as exc:  # a bug here must not cost the step its normal restore
            said = f"not fetched ahead ({type(exc).__name__}: {exc})"
        self.log(f"{step_id}: {said}")
        self.wake()
