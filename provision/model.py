"""The run's data, typed: the plan the controller ships, the state the runner keeps, the snapshot
`status` reads. One class per JSON object of DESIGN.md, each with `to_json`/`from_json`.

Standard library only and Python 3.9 compatible: the agent core imports it on the box.

`from_json` checks every field it names (a state file damaged from outside must not crash a
command later with a `TypeError` deep in the runner) and raises `ModelError` naming the first
bad field. Keys it does not name are kept in `extra` and written back, so a file holding
fields of a newer bootstrap survives a round trip through an older one.

On disk and on the wire the JSON is the one the previous, dict-based code wrote, with one
difference in `state.json`: a step record or the runner record no longer spells out fields
that hold nothing (`"rc": null`, `"warnings": []`). Every reader, old and new, took a missing
field for an empty one, so state files of either version load in the other.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

_E = TypeVar("_E", bound=enum.Enum)
_Json = dict[str, Any]
#: A number read from JSON: an int stays an int when written back (600, not 600.0).
Number = Union[int, float]  # noqa: UP007 (evaluated at import, on Python 3.9 too)


class ModelError(ValueError):
    """A JSON object that does not fit the model; the message names the field."""


class StepStatus(str, enum.Enum):
    """Where a step stands (DESIGN.md, "Step statuses").

    `error`: it could not run (a crash, a missing interpreter), as opposed to `failed`: it ran
    and failed. `blocked`: an upstream step failed, errored or is blocked. `skipped`: not
    selected, or not needed (what needs it was restored from the step cache).
    """

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    ERROR = "error"
    BLOCKED = "blocked"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value

    @property
    def bad(self) -> bool:
        """Whether the step ended badly: its dependents are blocked."""
        return self in (StepStatus.FAILED, StepStatus.ERROR, StepStatus.BLOCKED)


class Outcome(str, enum.Enum):
    """How a step's last attempt ended, written at every start and end of an attempt.

    `running` on a record nobody runs means the runner died under the attempt.
    """

    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    ERROR = "error"
    INTERRUPTED = "interrupted"

    def __str__(self) -> str:
        return self.value


class RunnerStatus(str, enum.Enum):
    """What the runner recorded of itself; `crashed`: it stopped on a bug."""

    IDLE = "idle"
    RUNNING = "running"
    CRASHED = "crashed"

    def __str__(self) -> str:
        return self.value


# ------------------------------------------------------------------------------ reading JSON


def kind_of(value: Any) -> str:
    """The JSON name of a value's type, for messages (`null`, `str`, `list`...)."""
    return "null" if value is None else type(value).__name__


def _take(data: Mapping[str, Any], name: str, types: tuple[type, ...], default: Any = None) -> Any:
    """`data[name]` when it has one of `types` (a bool is no number), `default` when absent or
    null; raises ModelError otherwise."""
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ModelError(f"'{name}' is {kind_of(value)}")
    return value


def _object(data: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(data, dict):
        raise ModelError(f"{what} is a {kind_of(data)}, not an object")
    return data


def _strings(data: Mapping[str, Any], name: str) -> list[str]:
    values = _take(data, name, (list,), [])
    if not all(isinstance(v, str) for v in values):
        raise ModelError(f"'{name}' holds a non-string")
    return list(values)


def _enum(cls: type[_E], data: Mapping[str, Any], name: str, required: bool = False) -> Any:
    """`data[name]` as a member of the enum `cls` (None when absent and not `required`)."""
    value = _take(data, name, (str,))
    if value is None:
        if required:
            raise ModelError(f"'{name}' is null")
        return None
    try:
        return cls(value)
    except ValueError:
        raise ModelError(f"unknown {name} '{value}'") from None


_NUMBER = (int, float)


def _extra(data: Mapping[str, Any], known: tuple[str, ...]) -> _Json:
    return {k: v for k, v in data.items() if k not in known}


def _present(pairs: list[tuple[str, Any]]) -> _Json:
    """The pairs whose value holds something (not None, not an empty list or object)."""
    return {k: v for k, v in pairs if v is not None and v != [] and v != {}}


# --------------------------------------------------------------------------------- the plan


@dataclass
class PlannedStep:
    """One step of a plan, resolved for its host: what `agent exec` runs and checks.

    `params` are the kind's own, validated by the kind's param specs (provision/steps/base.py);
    each kind reads its own, so they stay a mapping here.
    """

    id: str
    kind: str
    params: _Json = field(default_factory=dict)
    needs: list[str] = field(default_factory=list)
    creates: str | None = None
    done_when: str | None = None
    timeout: Number | None = None
    retries: int = 0
    poll: Number | None = None
    estimate: Number | None = None
    env: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    #: The step's line in the playbook; 0 for a step the engine adds (`agent-venv`, `tool-*`).
    line: int = 0
    fingerprint: str = ""
    selected: bool = True
    #: The paths the step makes (`outputs:`), for the remote step cache (provision/cache/).
    outputs: list[str] | None = None
    #: The step's cache spec, completed by provision/cache/plan.py; the cache reads it.
    cache: _Json | None = None
    extra: _Json = field(default_factory=dict)

    _KEYS = (
        "id", "kind", "params", "needs", "creates", "done_when", "timeout", "retries", "poll",
        "estimate", "env", "secrets", "tags", "line", "fingerprint", "selected", "outputs",
        "cache",
    )  # fmt: skip

    def to_json(self) -> _Json:
        """The step as `plan.json` holds it."""
        return {
            "id": self.id,
            "kind": self.kind,
            "params": self.params,
            "needs": list(self.needs),
            "creates": self.creates,
            "done_when": self.done_when,
            "timeout": self.timeout,
            "retries": self.retries,
            "poll": self.poll,
            "estimate": self.estimate,
            "env": dict(self.env),
            "secrets": list(self.secrets),
            "tags": list(self.tags),
            "line": self.line,
            "fingerprint": self.fingerprint,
            "selected": self.selected,
            **_present([("outputs", self.outputs), ("cache", self.cache)]),
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: Any) -> PlannedStep:
        """Read one step of `plan.json`; raises ModelError."""
        data = _object(data, "a step")
        step_id = _take(data, "id", (str,))
        if not step_id:
            raise ModelError("a step has no 'id'")
        try:
            env = _take(data, "env", (dict,), {})
            return cls(
                id=step_id,
                kind=_take(data, "kind", (str,), ""),
                params=dict(_take(data, "params", (dict,), {})),
                needs=_strings(data, "needs"),
                creates=_take(data, "creates", (str,)),
                done_when=_take(data, "done_when", (str,)),
                timeout=_take(data, "timeout", _NUMBER),
                retries=_take(data, "retries", (int,), 0),
                poll=_take(data, "poll", _NUMBER),
                estimate=_take(data, "estimate", _NUMBER),
                env={str(k): str(v) for k, v in env.items()},
                secrets=_strings(data, "secrets"),
                tags=_strings(data, "tags"),
                line=_take(data, "line", (int,), 0),
                fingerprint=_take(data, "fingerprint", (str,), ""),
                selected=_take(data, "selected", (bool,), True),
                outputs=_strings(data, "outputs") if "outputs" in data else None,
                cache=_take(data, "cache", (dict,)),
                extra=_extra(data, cls._KEYS),
            )
        except ModelError as exc:
            raise ModelError(f"step '{step_id}': {exc}") from None

    def fingerprinted(self) -> _Json:
        """What the fingerprint hashes: what the step does (not its timeout, tags or line)."""
        return {
            "kind": self.kind,
            "params": self.params,
            "creates": self.creates,
            "done_when": self.done_when,
            "env": self.env,
            "secrets": self.secrets,
        }


@dataclass
class Plan:
    """A playbook resolved for one host: `plan.json` on the box."""

    name: str
    steps: list[PlannedStep]
    playbook: str | None = None
    host: str | None = None
    max_parallel: int = 8
    #: The interpreter of the library kinds' steps when the host gives one (no `agent-venv`).
    agent_python: str | None = None
    version: int = 1
    extra: _Json = field(default_factory=dict)

    _KEYS = ("version", "name", "playbook", "host", "max_parallel", "agent_python", "steps")

    def to_json(self) -> _Json:
        """The plan as the controller ships it and `plan.json` holds it."""
        return {
            "version": self.version,
            "name": self.name,
            "playbook": self.playbook,
            "host": self.host,
            "max_parallel": self.max_parallel,
            "agent_python": self.agent_python,
            "steps": [s.to_json() for s in self.steps],
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: Any) -> Plan:
        """Read a plan; raises ModelError."""
        data = _object(data, "the plan")
        name = _take(data, "name", (str,))
        if not name:
            raise ModelError("the plan has no 'name'")
        return cls(
            name=name,
            steps=[PlannedStep.from_json(s) for s in _take(data, "steps", (list,), [])],
            playbook=_take(data, "playbook", (str,)),
            host=_take(data, "host", (str,)),
            max_parallel=_take(data, "max_parallel", (int,), 8),
            agent_python=_take(data, "agent_python", (str,)),
            version=_take(data, "version", (int,), 1),
            extra=_extra(data, cls._KEYS),
        )

    def step(self, step_id: str) -> PlannedStep:
        """The step with this id; raises KeyError."""
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    @property
    def selected(self) -> list[PlannedStep]:
        """The steps this run is to bring to done, in plan order."""
        return [s for s in self.steps if s.selected]


# ------------------------------------------------------------------------------- the state


@dataclass
class StepRecord:
    """What the runner knows of one step: `state.json`'s `steps[id]`.

    `gen` counts the step's successful runs: a dependent records its needs' generations
    (`upstream`) when it becomes done, and runs again when one of them moved on.
    """

    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    gen: int = 0
    started: float | None = None
    ended: float | None = None
    duration_s: float | None = None
    rc: int | None = None
    #: The attempt's `agent exec` and its process group (kept after it ends, to kill leftovers).
    pid: int | None = None
    pgid: int | None = None
    fingerprint: str | None = None
    reason: str | None = None
    hint: str | None = None
    outcome: Outcome | None = None
    #: A rerun was requested: "all" (the step and what depends on it) or "only" (`--only`,
    #: which keeps the generation, so dependents stay done). On disk: true or "only".
    forced: str | None = None
    upstream: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    extra: _Json = field(default_factory=dict)

    _KEYS = (
        "status", "attempts", "gen", "started", "ended", "duration_s", "rc", "pid", "pgid",
        "fingerprint", "reason", "hint", "outcome", "forced", "upstream", "warnings",
    )  # fmt: skip

    def to_json(self) -> _Json:
        """The record as `state.json` holds it (fields holding nothing left out)."""
        forced: bool | str | None = True if self.forced == "all" else self.forced
        out = _present(
            [
                ("status", self.status.value),
                ("attempts", self.attempts),
                ("gen", self.gen),
                ("started", self.started),
                ("ended", self.ended),
                ("duration_s", self.duration_s),
                ("rc", self.rc),
                ("pid", self.pid),
                ("pgid", self.pgid),
                ("fingerprint", self.fingerprint),
                ("reason", self.reason),
                ("hint", self.hint),
                ("outcome", self.outcome.value if self.outcome else None),
                ("forced", forced),
                ("upstream", dict(self.upstream)),
                ("warnings", list(self.warnings)),
            ]
        )
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: Any) -> StepRecord:
        """Read a step record; raises ModelError saying what is wrong with it."""
        data = _object(data, "a")
        upstream = _take(data, "upstream", (dict,), {})
        if not all(isinstance(g, int) and not isinstance(g, bool) for g in upstream.values()):
            raise ModelError("'upstream' holds a non-integer generation")
        forced = _take(data, "forced", (bool, str))
        warnings = _take(data, "warnings", (list,), [])
        return cls(
            status=_enum(StepStatus, data, "status", required=True),
            attempts=_take(data, "attempts", (int,), 0),
            gen=_take(data, "gen", (int,), 0),
            started=_take(data, "started", _NUMBER),
            ended=_take(data, "ended", _NUMBER),
            duration_s=_take(data, "duration_s", _NUMBER),
            rc=_take(data, "rc", (int,)),
            pid=_take(data, "pid", (int,)),
            pgid=_take(data, "pgid", (int,)),
            fingerprint=_take(data, "fingerprint", (str,)),
            reason=_take(data, "reason", (str,)),
            hint=_take(data, "hint", (str,)),
            outcome=_enum(Outcome, data, "outcome"),
            forced=("all" if forced is True else forced) or None,
            upstream=dict(upstream),
            warnings=[str(w) for w in warnings],
            extra=_extra(data, cls._KEYS),
        )

    # Every change the runner makes to a record, by name.

    def begin_attempt(self, attempts: int, reason: str, now: float) -> None:
        """An attempt starts (its process group is recorded once it exists)."""
        self.status, self.outcome = StepStatus.RUNNING, Outcome.RUNNING
        self.attempts, self.started, self.reason = attempts, now, reason
        self.ended = self.rc = self.duration_s = self.hint = None
        self.warnings = []

    def end_attempt(self, rc: int, now: float, warnings: list[str], fingerprint: str) -> None:
        """The attempt's process exited with `rc` (what that means is decided next)."""
        self.rc, self.ended, self.warnings, self.fingerprint = rc, now, warnings, fingerprint
        self.duration_s = round(now - (self.started or now), 3)
        self.pid = None

    def succeed(self, reason: str | None, upstream: dict[str, int]) -> None:
        """The attempt succeeded. A forced `--only` rerun keeps the generation: what depends
        on the step stays done."""
        if self.forced != "only":
            self.gen += 1
        self.status, self.outcome = StepStatus.DONE, Outcome.OK
        self.upstream, self.reason, self.forced = upstream, reason, None

    def fail(self, status: StepStatus, reason: str, hint: str | None) -> None:
        """The attempt failed (`failed`) or could not run (`error`); no retry is left."""
        self.status, self.reason, self.hint = status, reason, hint
        self.outcome = Outcome.ERROR if status is StepStatus.ERROR else Outcome.FAILED

    def could_not_start(self, reason: str, now: float) -> None:
        """The attempt's process could not be started at all."""
        self.status, self.outcome = StepStatus.ERROR, Outcome.ERROR
        self.ended, self.reason, self.pid = now, reason, None

    def found_done(
        self, reason: str, fingerprint: str, upstream: dict[str, int], now: float
    ) -> None:
        """The step's checks say it is done without running it."""
        if self.status is not StepStatus.DONE:
            self.gen += 1
            self.upstream = upstream
            self.ended = self.ended or now
        self.status, self.reason, self.fingerprint, self.hint = (
            StepStatus.DONE,
            reason,
            fingerprint,
            None,
        )

    def block(self, bad_needs: list[str]) -> None:
        """An upstream step ended badly: this one does not run."""
        self.status, self.hint = StepStatus.BLOCKED, None
        self.reason = f"blocked by {', '.join(bad_needs)}"

    def skip(self) -> None:
        """The step is not selected in this run."""
        self.status, self.reason = StepStatus.SKIPPED, "not selected"

    def leave_out(self, reason: str) -> None:
        """The step is selected but not needed: what needs it comes from the step cache
        (provision/agent/prune.py)."""
        self.status, self.reason, self.hint = StepStatus.SKIPPED, reason, None

    def want(self, reason: str) -> None:
        """A step left out is needed after all (a restore it was left out for failed)."""
        self.status, self.reason = StepStatus.PENDING, reason

    def interrupt(self, reason: str) -> None:
        """The attempt was stopped from outside (runner stopping, rerun, runner died): the step
        runs again whatever its checks say."""
        self.status, self.outcome, self.reason, self.pid = (
            StepStatus.PENDING,
            Outcome.INTERRUPTED,
            reason,
            None,
        )

    def force(self, only: bool) -> None:
        """A rerun was requested (`only`: this step alone)."""
        self.status, self.reason, self.hint = StepStatus.PENDING, "rerun requested", None
        self.forced = "only" if only else "all"

    def unsuccessful(self) -> str | None:
        """How the last attempt ended badly (`failed`, `error`, `interrupted`), or None when it
        succeeded or none is on record.

        A record written before `outcome` existed is read from its status and reason.
        """
        if self.outcome is None:
            if self.status in (StepStatus.FAILED, StepStatus.ERROR):
                return str(self.status)
            if self.status is StepStatus.RUNNING or (self.reason or "").startswith("interrupted"):
                return "interrupted"
            return None
        if self.outcome is Outcome.RUNNING:  # it never ended: the runner died under it
            return "interrupted"
        return None if self.outcome is Outcome.OK else self.outcome.value


@dataclass
class RunnerRecord:
    """What the runner recorded of itself: `state.json`'s `runner`."""

    status: RunnerStatus = RunnerStatus.IDLE
    pid: int | None = None
    host: str | None = None
    started: float | None = None
    ended: float | None = None
    #: `crashed`: the exception, in one line (its traceback is in `runner.log`).
    error: str | None = None
    #: When an `up` last found every step done and settled them without starting a runner.
    checked: float | None = None
    extra: _Json = field(default_factory=dict)

    _KEYS = ("status", "pid", "host", "started", "ended", "error", "checked")

    def to_json(self) -> _Json:
        out = _present(
            [
                ("status", self.status.value),
                ("pid", self.pid),
                ("host", self.host),
                ("started", self.started),
                ("ended", self.ended),
                ("error", self.error),
                ("checked", self.checked),
            ]
        )
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: Any) -> RunnerRecord:
        """Read the runner record; raises ModelError."""
        data = _object(data, "'runner'")
        return cls(
            status=_enum(RunnerStatus, data, "status", required=True),
            pid=_take(data, "pid", (int,)),
            host=_take(data, "host", (str,)),
            started=_take(data, "started", _NUMBER),
            ended=_take(data, "ended", _NUMBER),
            error=_take(data, "error", (str,)),
            checked=_take(data, "checked", _NUMBER),
            extra=_extra(data, cls._KEYS),
        )


#: Measured durations kept per step (the newest): a median that one odd run does not move.
DURATIONS_KEPT = 5


@dataclass
class RunState:
    """`state.json`: the runner's record of itself and of every step.

    `damage` says what was wrong with the file it was read from (see provision/agent/state.py);
    it is never written.
    """

    run: str
    runner: RunnerRecord = field(default_factory=RunnerRecord)
    steps: dict[str, StepRecord] = field(default_factory=dict)
    #: Step id -> the newest DURATIONS_KEPT seconds it took to run to done on this box.
    durations: dict[str, list[float]] = field(default_factory=dict)
    #: One-line messages for the next `status`/`up` (a damaged file set aside).
    notices: list[str] = field(default_factory=list)
    updated: float | None = None
    version: int = 1
    damage: str | None = None
    extra: _Json = field(default_factory=dict)

    _KEYS = ("version", "run", "runner", "steps", "durations", "notices", "updated", "damage")

    def to_json(self) -> _Json:
        out: _Json = {
            "version": self.version,
            "run": self.run,
            "runner": self.runner.to_json(),
            "steps": {k: r.to_json() for k, r in self.steps.items()},
        }
        out.update(_present([("durations", self.durations), ("notices", self.notices)]))
        if self.updated is not None:
            out["updated"] = self.updated
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: Any, run: str) -> tuple[RunState, list[str]]:
        """The part of `data` that is a valid state, and what was wrong with the rest (a record
        that does not fit is dropped: its step is decided by its checks again)."""
        state = cls(run=run)
        if not isinstance(data, dict):
            return state, [f"the top level is a {kind_of(data)}, not an object"]
        problems: list[str] = []
        state.extra = _extra(data, cls._KEYS)
        for name, read in (
            ("version", lambda: _take(data, "version", (int,), 1)),
            ("run", lambda: _take(data, "run", (str,), run)),
            ("updated", lambda: _take(data, "updated", _NUMBER)),
            ("runner", lambda: RunnerRecord.from_json(data.get("runner", {"status": "idle"}))),
            ("durations", lambda: _durations(data.get("durations"))),
            ("notices", lambda: _strings(data, "notices")),
        ):
            try:
                setattr(state, name, read())
            except ModelError as exc:
                said = str(exc)
                problems.append(said if said.startswith(f"'{name}'") else f"'{name}': {said}")
        steps = data.get("steps")
        if not isinstance(steps, dict):
            problems.append(f"'steps' is {kind_of(steps)}, not an object")
            steps = {}
        for step_id, rec in steps.items():
            try:
                state.steps[step_id] = StepRecord.from_json(rec)
            except ModelError as exc:
                problems.append(f"step '{step_id}': {exc}")
        return state, problems

    def record(self, step_id: str) -> StepRecord:
        """The record of a step (created pending)."""
        rec = self.steps.get(step_id)
        if rec is None:
            rec = self.steps[step_id] = StepRecord()
        return rec

    def status(self, step_id: str) -> StepStatus:
        """A step's status (`pending` when it has no record)."""
        rec = self.steps.get(step_id)
        return rec.status if rec is not None else StepStatus.PENDING

    def gen(self, step_id: str) -> int:
        """A step's generation (0 when it has no record)."""
        rec = self.steps.get(step_id)
        return rec.gen if rec is not None else 0

    def remember_duration(self, step_id: str, seconds: float) -> None:
        """Keep how long a step took when it ran (or was restored) to done, for the ETA of the
        next runs of this playbook."""
        kept = self.durations.setdefault(step_id, [])
        kept.append(round(float(seconds), 3))
        del kept[:-DURATIONS_KEPT]

    def expected_duration(self, step_id: str) -> float | None:
        """The median of a step's measured durations on this box (None when it never ran)."""
        # Not statistics.median: importing it (fractions, decimal, random) cost every no-op
        # `up` ~9 ms on the box, for the middle of at most DURATIONS_KEPT numbers.
        kept = sorted(self.durations.get(step_id) or ())
        if not kept:
            return None
        mid = len(kept) // 2
        return float(kept[mid]) if len(kept) % 2 else (kept[mid - 1] + kept[mid]) / 2


def _durations(value: Any) -> dict[str, list[float]]:
    if value is None:
        return {}
    if isinstance(value, dict) and all(
        isinstance(v, list) and all(isinstance(d, _NUMBER) and not isinstance(d, bool) for d in v)
        for v in value.values()
    ):
        return {str(k): list(v) for k, v in value.items()}
    raise ModelError(f"'durations' is not step ids with lists of seconds ({kind_of(value)})")


# ---------------------------------------------------------------------------- the snapshot


@dataclass
class StepSnapshot:
    """One step of a status snapshot (DESIGN.md: `status --json`'s `steps`)."""

    id: str
    kind: str
    status: StepStatus
    needs: list[str] = field(default_factory=list)
    attempts: int = 0
    started: float | None = None
    ended: float | None = None
    duration_s: float | None = None
    rc: int | None = None
    #: The kind's `_progress.json` while the step runs (see provision/steps/base.py).
    progress: _Json | None = None
    reason: str | None = None
    hint: str | None = None
    warnings: list[str] = field(default_factory=list)
    log_tail: list[str] = field(default_factory=list)
    #: How long the step is expected to take, and from what: "measured" or "estimate".
    expected_s: float | None = None
    expected_from: str | None = None
    #: A cached step reports what its detached save did last (`cache`, provision/cache/save.py;
    #: null before the first); for other steps the key is absent.
    cached: bool = False
    cache: _Json | None = None
    #: A step that runs a job under a guard (`tmux_launch`) reports what the guard saw last
    #: (`watch`, null before its first look); for other steps the key is absent.
    guarded: bool = False
    watch: _Json | None = None
    extra: _Json = field(default_factory=dict)

    _KEYS = (
        "expected_s", "expected_from", "cache", "watch", "id", "kind", "needs", "status",
        "attempts", "started", "ended", "duration_s", "rc", "progress", "reason", "hint",
        "warnings", "log_tail",
    )  # fmt: skip

    def to_json(self) -> _Json:
        out: _Json = {"expected_s": self.expected_s, "expected_from": self.expected_from}
        if self.cached:
            out["cache"] = self.cache
        if self.guarded:
            out["watch"] = self.watch
        out.update(
            id=self.id,
            kind=self.kind,
            needs=list(self.needs),
            status=self.status.value,
            attempts=self.attempts,
            started=self.started,
            ended=self.ended,
            duration_s=self.duration_s,
            rc=self.rc,
            progress=self.progress,
            reason=self.reason,
            hint=self.hint,
            warnings=list(self.warnings),
            log_tail=list(self.log_tail),
        )
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, data: Any) -> StepSnapshot:
        """Read one step of a snapshot; raises ModelError."""
        data = _object(data, "a step")
        return cls(
            id=_take(data, "id", (str,), ""),
            kind=_take(data, "kind", (str,), ""),
            status=_enum(StepStatus, data, "status", required=True),
            needs=_strings(data, "needs"),
            attempts=_take(data, "attempts", (int,), 0),
            started=_take(data, "started", _NUMBER),
            ended=_take(data, "ended", _NUMBER),
            duration_s=_take(data, "duration_s", _NUMBER),
            rc=_take(data, "rc", (int,)),
            progress=_take(data, "progress", (dict,)),
            reason=_take(data, "reason", (str,)),
            hint=_take(data, "hint", (str,)),
            warnings=_strings(data, "warnings"),
            log_tail=_strings(data, "log_tail"),
            expected_s=_take(data, "expected_s", _NUMBER),
            expected_from=_take(data, "expected_from", (str,)),
            cached="cache" in data,
            cache=_take(data, "cache", (dict,)),
            guarded="watch" in data,
            watch=_take(data, "watch", (dict,)),
            extra=_extra(data, cls._KEYS),
        )


@dataclass
class Snapshot:
    """A run's status on one box: the `status --json` object of DESIGN.md and each event of
    the follow stream. The box fills what it knows; the controller adds `host` (its name for
    the box) and, for a followed run, the stream's `event`."""

    run: str
    box: str
    #: `running`, `idle` or `dead` (it stopped without ending the run; `up` recovers it).
    runner: str
    steps: list[StepSnapshot] = field(default_factory=list)
    playbook: str | None = None
    notices: list[str] = field(default_factory=list)
    runner_error: str | None = None
    #: `status` only: the GPU leases held on the box (provision/agent/gpus.py).
    gpu_leases: list[_Json] | None = None
    host: str | None = None
    event: str | None = None
    extra: _Json = field(default_factory=dict)

    _KEYS = (
        "playbook", "run", "box", "runner", "steps", "notices", "runner_error", "gpu_leases",
        "host", "event",
    )  # fmt: skip

    def to_json(self) -> _Json:
        out = self._head()
        out["steps"] = [s.to_json() for s in self.steps]
        return out

    def _head(self) -> _Json:
        """The JSON object less the steps' records (`steps` is empty, in its place)."""
        out: _Json = {
            "playbook": self.playbook,
            "run": self.run,
            "box": self.box,
            "runner": self.runner,
            "steps": [],
        }
        if self.notices:
            out["notices"] = list(self.notices)
        for key, value in (
            ("runner_error", self.runner_error),
            ("gpu_leases", self.gpu_leases),
        ):
            if value is not None:
                out[key] = value
        out.update(self.extra)
        for key, value in (("host", self.host), ("event", self.event)):
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, data: Any) -> Snapshot:
        """Read a snapshot; raises ModelError."""
        data = _object(data, "the snapshot")
        return cls(
            run=_take(data, "run", (str,), ""),
            box=_take(data, "box", (str,), ""),
            runner=_take(data, "runner", (str,), "idle"),
            steps=[StepSnapshot.from_json(s) for s in _take(data, "steps", (list,), [])],
            playbook=_take(data, "playbook", (str,)),
            notices=_strings(data, "notices"),
            runner_error=_take(data, "runner_error", (str,)),
            gpu_leases=_take(data, "gpu_leases", (list,)),
            host=_take(data, "host", (str,)),
            event=_take(data, "event", (str,)),
            extra=_extra(data, cls._KEYS),
        )

    def patched(self, change: Mapping[str, Any]) -> Snapshot:
        """The snapshot a `changes` event of the follow stream (provision/agent/report.py)
        turns this one into. Only the records it carries are read: following a 2,000-step
        run costs what changed, not the whole run at each event."""
        top = {k: v for k, v in change.items() if k not in ("steps", "event")}
        new = Snapshot.from_json({**self._head(), **top})
        changed = {s.id: s for s in map(StepSnapshot.from_json, change.get("steps") or [])}
        new.steps = [changed.get(s.id, s) for s in self.steps]
        return new

    def step(self, step_id: str) -> StepSnapshot | None:
        """The snapshot of one step, or None."""
        return next((s for s in self.steps if s.id == step_id), None)
