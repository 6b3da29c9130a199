"""The `watch:` and `on_finish:` params of a `tmux_launch` step, checked when the playbook loads.

```yaml
watch:
  notify: NOTIFY_URL        # an inventory secret holding one or more apprise URLs
  poll: 30                  # seconds between two looks at the job (1..30)
  stall_factor: 5           # stalled: no new step for 5x the usual interval between steps...
  stall_min_s: 300          # ...and at least this long
  finish_grace_s: 300       # the last step reached and the job still there after this: ended
  repeat_s: 3600            # a failing upload is notified again this often
  thresholds: {gpu_memory_pct: 96}   # the monitor's alert rules (provision/monitor/alerts.py)
on_finish: stop             # nothing (default) | stop | destroy | {run: "command"}
```

`on_finish` runs once the run has ended (the job exited, or reached its last step and lingered
`finish_grace_s`) and the guard's last upload pass is over: `stop` ends the job's tmux session,
`{run: CMD}` runs CMD with bash in cwd, in the job's environment plus `BOOTSTRAP_OUTCOME`
(finished | crashed), `BOOTSTRAP_RC`, `BOOTSTRAP_LAST_STEP`, `BOOTSTRAP_CHECKPOINT` (the newest
verified one) and `BOOTSTRAP_UPLOADS_OK` (1 when every complete checkpoint is on the remote):
a hook of the user's own (`when: finished` keeps a crashed box for a look).

`destroy` is for a box bootstrap rented: the box cannot destroy itself (that takes the vast.ai
API key, which stays on the controller), so the guard ends the job and records whether the box
may go (`ready`: every complete checkpoint verified on the remote, no upload failing; a
checkpoint without a remote is not safe), and tells it; the controller that rented the box
destroys it once it sees `ready` and the run finished (provision/rent/keepalive.py `release`).
It applies to a finished run only unless `when:` says otherwise: a crashed box stays for a
look. Standard library only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from provision.monitor.alerts import merge_thresholds
from provision.steps.base import MAX_POLL_S, ParamError, check_keys

_WATCH_KEYS = ("notify", "poll", "stall_factor", "stall_min_s", "finish_grace_s", "repeat_s",
               "thresholds")  # fmt: skip
OUTCOMES = ("finished", "crashed")


@dataclass(frozen=True)
class WatchSpec:
    """A validated `watch:` block."""

    notify: str | None = None
    poll: float = 30.0
    stall_factor: float = 5.0
    stall_min_s: float = 300.0
    finish_grace_s: float = 300.0
    repeat_s: float = 3600.0
    thresholds: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FinishAction:
    """A validated `on_finish`: what to do, and for which outcomes."""

    action: str = "nothing"  # nothing | stop | run | destroy
    command: str | None = None
    when: tuple[str, ...] = OUTCOMES

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "command": self.command, "when": list(self.when)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinishAction:
        return cls(data["action"], data.get("command"), tuple(data.get("when") or OUTCOMES))


def parse_watch(raw: Any) -> WatchSpec:
    """Validate a `watch:` mapping (None: the defaults); ParamError keyed `watch.KEY`."""
    if raw is None:
        return WatchSpec()
    if not isinstance(raw, dict):
        raise ParamError("'watch' must be a mapping", "watch")
    check_keys(raw, _WATCH_KEYS, "'watch'", "watch", dotted=True)
    numbers = {}
    for key, low, high in (("poll", 1, MAX_POLL_S), ("stall_factor", 1.5, 1000),
                           ("stall_min_s", 1, 10**6), ("finish_grace_s", 0, 10**6),
                           ("repeat_s", 60, 10**7)):  # fmt: skip
        value = raw.get(key, getattr(WatchSpec, key))
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not low <= value <= high
        ):
            raise ParamError(f"'watch.{key}' must be a number in {low}..{high}", f"watch.{key}")
        numbers[key] = float(value)
    notify = raw.get("notify")
    if notify is not None and (not isinstance(notify, str) or not notify.strip()):
        raise ParamError("'watch.notify' must name an inventory secret", "watch.notify")
    thresholds = raw.get("thresholds") or {}
    if not isinstance(thresholds, dict):
        raise ParamError("'watch.thresholds' must be a mapping", "watch.thresholds")
    try:
        merge_thresholds(thresholds)
    except ValueError as exc:
        raise ParamError(f"'watch.thresholds': {exc}", "watch.thresholds") from None
    return WatchSpec(notify=notify, thresholds=dict(thresholds), **numbers)


def parse_on_finish(raw: Any) -> FinishAction:
    """Validate `on_finish` (None: nothing); ParamError keyed `on_finish`."""
    if raw is None or raw == "nothing":
        return FinishAction()
    if raw == "stop":
        return FinishAction("stop")
    if raw == "destroy":
        return FinishAction("destroy", None, ("finished",))
    if not isinstance(raw, dict) or set(raw) - {"run", "stop", "destroy", "when"}:
        raise ParamError(
            "'on_finish' must be nothing, stop, destroy, {run: COMMAND}, {stop: true} or "
            "{destroy: true}, with an optional when: finished|crashed|[finished, crashed]",
            "on_finish",
        )
    if len(set(raw) & {"run", "stop", "destroy"}) != 1:
        raise ParamError("'on_finish' needs one of run: COMMAND, stop: true, destroy: true",
                         "on_finish")  # fmt: skip
    default = ["finished"] if "destroy" in raw else list(OUTCOMES)
    when = raw.get("when", default)
    when = [when] if isinstance(when, str) else when
    if not isinstance(when, list) or not when or not set(when) <= set(OUTCOMES):
        raise ParamError("'on_finish.when' must be finished, crashed or both", "on_finish.when")
    if "run" in raw:
        command = raw["run"]
        if not isinstance(command, str) or not command.strip():
            raise ParamError("'on_finish.run' must be a command line", "on_finish.run")
        return FinishAction("run", command.strip(), tuple(when))
    action = "destroy" if "destroy" in raw else "stop"
    if raw.get(action) is not True:
        raise ParamError(f"'on_finish.{action}' must be true", f"on_finish.{action}")
    return FinishAction(action, None, tuple(when))
