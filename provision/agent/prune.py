"""Steps a box does not need: the input of a step restored from the remote step cache.

On a box whose cache holds the conversion of seed 003 (the 7.2 GB `model.safetensors`), the
12 GB JAX checkpoint it was converted from is needed by nothing else: downloading it is minutes
of the link and 12 GB of disk for no use. This is Bazel's "build without the bytes" applied to
a runbook: a step U is *not needed* when every step that needs it is cached and is either done
already or has an entry in the cache now (its key, computed on the box, found in the bucket).
U is then `skipped`, with the reason saying which steps made it unneeded.

Only a step whose dependents' keys do not depend on its outputs can be left out: one that
declares no `outputs:` (its dependents' keys hold its fingerprint, not its content), is not
cached itself, is not one of bootstrap's implicit steps, and whose dependents declare no
`inputs:` (files it may write). Its dependents' keys must be
computable without it: a U that becomes ready before them (the checkpoint download, at once;
the keys wait for the clone's lock file) is held until they are, at most `HOLD_S`, then runs.
The lookup runs in a thread, beside the runner's loop.

A dependent whose restore then fails (a corrupt archive, a failed verification) does not run
without U: its `agent exec` answers `execute.EXIT_NEEDS_PRUNED`, and the runner runs U, then it, for
the rest of the run (`Pruner.needed`). A rerun of U, or of a dependent (which then runs, not
restores), runs U.

Standard library only (the agent core); the cache's key and store are imported when a plan
has a cached step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from provision import dag
from provision.model import PlannedStep, StepStatus

#: How long a step waits for its dependents' keys to become computable before it runs anyway
#: (a cold box then pays at most this for the chance to skip it on a warm one).
HOLD_S = 60.0


class Verdict:
    """What `Pruner.verdict` says of a ready step."""

    RUN = "run"
    HOLD = "hold"
    SKIP = "skip"


@dataclass
class _Lookup:
    """The keys of one step's dependents looked up in the cache: `hits` once it is over."""

    hits: list[str] | None = None
    misses: list[str] = field(default_factory=list)


class Pruner:
    """Which ready steps of a run may be left out, and when to ask the cache.

    `status(step_id)` is the run's current status of a step, `forced(step_id)` whether a
    rerun was asked for it; `env(step)` the environment a step sees (the cache's remote may
    need its credentials); `wake()` interrupts the runner's wait when a lookup ends.
    """

    def __init__(
        self,
        run_dir: Path,
        steps: dict[str, PlannedStep],
        needs: dict[str, list[str]],
        status: Callable[[str], StepStatus],
        forced: Callable[[str], bool],
        env: Callable[[PlannedStep], dict[str, str]],
        wake: Callable[[], None],
    ) -> None:
        self.run_dir, self.steps, self.needs = run_dir, steps, needs
        self.status, self.forced, self.env, self.wake = status, forced, env, wake
        self.dependents = {u: sorted(c) for u, c in dag.dependents(needs).items()}
        self.candidates = {u for u in needs if self._can_leave_out(u)}
        self.held: dict[str, float] = {}
        self.lookups: dict[str, _Lookup] = {}
        #: Steps that must run this run: a dependent's restore failed after they were left out.
        self.needed: set[str] = set()

    def _can_leave_out(self, step_id: str) -> bool:
        step = self.steps[step_id]
        users = [self.steps[c] for c in self.dependents.get(step_id, []) if c in self.needs]
        if not (
            users
            and not step.cache
            and not step.outputs
            # A dependent's `inputs` may be what this step writes (av-override edits the
            # pyproject.toml uv-sync is keyed on): its key would then need this step run.
            and all(
                u.cache and not cache_inputs(u) and step_id not in (u.cache.get("with") or [])
                for u in users
            )
        ):
            return False
        from provision.cache.key import is_implicit  # only with cached steps: it costs hashlib

        return not is_implicit(step_id)

    def busy(self) -> bool:
        """Whether a step is held or looked up (the runner waits for it, as for a child)."""
        return bool(self.held or any(lk.hits is None for lk in self.lookups.values()))

    def verdict(self, step_id: str, rerun: set[str]) -> tuple[str, str]:
        """RUN, HOLD (ask again later) or SKIP (with the reason) for a ready, not-done step.

        `rerun`: the steps that ran this run (a done dependent with one of them among its
        needs will run again, so it is not done yet)."""
        if step_id not in self.candidates or step_id in self.needed:
            return Verdict.RUN, ""
        users = [u for u in self.dependents[step_id] if u in self.needs]
        if any(self.forced(s) for s in (step_id, *users)):  # a rerun runs, never restores
            return Verdict.RUN, ""
        open_users = [u for u in users if not self._done(u, rerun)]
        if not open_users:
            self.held.pop(step_id, None)
            return Verdict.SKIP, f"not needed: {', '.join(users)} done"
        lookup = self.lookups.get(step_id)
        if lookup is not None and lookup.hits is not None:
            self.held.pop(step_id, None)
            if lookup.misses:
                return Verdict.RUN, ""
            return Verdict.SKIP, f"not needed: {', '.join(lookup.hits)} in the step cache"
        if lookup is not None:
            return Verdict.HOLD, ""
        since = self.held.setdefault(step_id, time.monotonic())
        if all(self._keyable(u, step_id) for u in open_users):
            self._look_up(step_id, open_users)
            return Verdict.HOLD, ""
        if time.monotonic() - since > HOLD_S:
            self.held.pop(step_id, None)
            return Verdict.RUN, ""
        return Verdict.HOLD, ""

    def _done(self, step_id: str, rerun: set[str]) -> bool:
        return self.status(step_id) is StepStatus.DONE and not (set(self.needs[step_id]) & rerun)

    def key_final(self, step_id: str) -> bool:
        """Whether the cached step's key can be computed now and is the one it will have when
        it starts: every part of it that comes from its needs is final (provision/agent/
        ahead.py fetches its entry then)."""
        return all(self._upstream_ready(n) for n in self._unit_needs(step_id))

    def _keyable(self, user: str, left_out: str) -> bool:
        """Whether `user`'s key can be computed now, with `left_out` not run: every part of
        it that comes from its needs is final."""
        return all(n == left_out or self._upstream_ready(n) for n in self._unit_needs(user))

    def _unit_needs(self, step_id: str) -> list[str]:
        cache = self.steps[step_id].cache or {}
        unit = [step_id, *(cache.get("with") or [])]
        return [n for m in unit if m in self.needs for n in self.needs[m] if n not in unit]

    def _needs_done(self, step_id: str) -> bool:
        return all(self.status(n) is StepStatus.DONE for n in self._unit_needs(step_id))

    def _upstream_ready(self, step_id: str) -> bool:
        """Whether the part of a key that `step_id` contributes is final (see cache/key.py)."""
        step = self.steps.get(step_id)
        if step is None or self.status(step_id) is StepStatus.DONE:
            return True
        if step.cache:  # its own key: its inputs come from its needs
            return self._needs_done(step_id)
        if step.outputs:  # its content
            return False
        return all(self._upstream_ready(n) for n in self.needs.get(step_id, []))

    def _look_up(self, step_id: str, users: list[str]) -> None:
        lookup = self.lookups[step_id] = _Lookup()
        threading.Thread(
            target=self._run_lookup, args=(lookup, users), daemon=True, name=f"prune-{step_id}"
        ).start()

    def _run_lookup(self, lookup: _Lookup, users: list[str]) -> None:
        hits: list[str] = []
        misses: list[str] = []
        for user in users:
            (hits if self._in_cache(self.steps[user]) else misses).append(user)
        lookup.misses = misses
        lookup.hits = hits  # last: the runner's thread reads `hits` to know it is over
        self.wake()

    def _in_cache(self, step: PlannedStep) -> bool:
        """Whether the bucket has an entry for the step's key now (any doubt: it has not)."""
        from provision.cache.restore import compute_key
        from provision.cache.store import Store

        cache = step.cache or {}
        try:
            key = compute_key(self.run_dir, step.to_json())
            store = Store(cache["remote"], self.env(step), cache.get("rclone_config"))
            return store.entry(key) is not None
        except Exception:  # a key that cannot be computed, a bucket that does not answer
            return False

    def restore_failed(self, step_id: str) -> list[str]:
        """A dependent's restore failed: the steps left out that it needs run after all."""
        back = self.left_out_needs(step_id)
        self.needed.update(back)
        for n in back:
            self.lookups.pop(n, None)
        return back

    def left_out_needs(self, step_id: str) -> list[str]:
        """The needs of `step_id` left out of this run (`skipped` while selected)."""
        return [
            n
            for n in self.needs.get(step_id, [])
            if n in self.candidates and self.status(n) is StepStatus.SKIPPED
        ]


def cache_inputs(step: PlannedStep) -> list[str]:
    """The files a cached step is keyed on (its node of its key graph: cache/plan.py)."""
    node = ((step.cache or {}).get("graph") or {}).get(step.id) or {}
    return list((node.get("cache") or {}).get("inputs") or [])
