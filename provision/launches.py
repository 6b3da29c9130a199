"""Which steps of a resolved plan the commands around a run act on.

`monitor`, `attach`, `checkpoints` and `down` act on a tmux_launch step (the job); `check`
preflights with the plan's preflight step. Where that job is on the box (its log, its tmux
session) is the box's to say, from the launch record (`controller.launch`, `monitor`'s
`launch`): nothing here guesses a path on the box.
"""

from __future__ import annotations

from typing import Any

from provision.errors import ProvisionError
from provision.model import Plan, PlannedStep


def launch_step(plan: Plan, step_id: str | None) -> PlannedStep:
    """The tmux_launch step named `step_id`, else the first selected one (else the first)."""
    launches = [s for s in plan.steps if s.kind == "tmux_launch"]
    if step_id is not None:
        launches = [s for s in launches if s.id == step_id]
        if not launches:
            raise ProvisionError(f"no tmux_launch step '{step_id}' in {plan.playbook}")
    else:
        launches = [s for s in launches if s.selected] or launches
    if not launches:
        raise ProvisionError(f"{plan.playbook} has no tmux_launch step")
    return launches[0]


def checkpoint_steps(plan: Plan, step_id: str | None = None) -> list[PlannedStep]:
    """The tmux_launch steps that declare `checkpoints:` (only `step_id`, when given)."""
    return [
        s
        for s in plan.steps
        if s.kind == "tmux_launch"
        and s.params.get("checkpoints")
        and (step_id is None or s.id == step_id)
    ]


def preflight_step(plan: Plan) -> PlannedStep:
    """The plan's first preflight step (one with no params or env when it has none: `check`
    then tests the box against the defaults)."""
    steps = [s for s in plan.steps if s.kind == "preflight"]
    return steps[0] if steps else PlannedStep(id="preflight", kind="preflight")


def preflight_checkpoints(plan: Plan) -> dict[str, Any] | None:
    """The checkpoint directory a preflight step declares (`checkpoint_dir`, with its
    `checkpoint_keep` and `checkpoint_gb`): `monitor` forecasts the disk for it when the
    launch step declares no `checkpoints:` of its own."""
    for step in plan.steps:
        params = step.params if step.kind == "preflight" else {}
        if params.get("checkpoint_dir"):
            keep, size = params.get("checkpoint_keep"), params.get("checkpoint_gb")
            return {"dir": params["checkpoint_dir"], "keep": keep, "size_gb": size}
    return None
