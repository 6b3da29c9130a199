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
from pathlib import Path

from provision.agent.prune import Pruner
from provision.model import PlannedStep, StepStatus


class Ahead:
    """The fetches ahead of one runner's life.

    `status(step_id)`, `forced(step_id)`, `env(step)` and `wake()` as for `Pruner`; `log`
    writes one line of the runner's log (redacted: a store's error may quote a URL).
    """

    def __init__(
        self,
        run_dir: Path,
        steps: dict[str, PlannedStep],
        needs: dict[str, list[str]],
        pruner: Pruner,
        status: Callable[[str], StepStatus],
        forced: Callable[[str], bool],
        env: Callable[[PlannedStep], dict[str, str]],
        wake: Callable[[], None],
        log: Callable[[str], None],
    ) -> None:
        self.run_dir, self.steps, self.needs, self.pruner = run_dir, steps, needs, pruner
        self.status, self.forced, self.env, self.wake = status, forced, env, wake
        self.log = log
        self.candidates = [s for s in needs if steps[s].cache and steps[s].outputs]
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
        )

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
            said = fetch_ahead(self.run_dir, step.to_json(), self.env(step), self.stop)
        except Exception as exc:  # a bug here must not cost the step its normal restore
            said = f"not fetched ahead ({type(exc).__name__}: {exc})"
        self.log(f"{step_id}: {said}")
        self.wake()
