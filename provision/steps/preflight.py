"""`preflight`: check the box can take the run before hours are spent on it.

Example (the waypoint runbook on 2× RTX PRO 6000):

```yaml
- id: preflight
  kind: preflight
  min_gpus: 2
  min_gpu_memory_gb: 90
  min_cuda: "12.8"
  disk: {/workspace: 60}
  checkpoint_dir: /workspace/openpi/checkpoints/waypoint_ae_libero
  checkpoint_keep: 2          # the launch's `checkpoints.keep`: room for 2 + 1 being written
  checkpoint_gb: 22
  checkpoint_margin: 0.1
  workers: 8
  tools: [python3, tmux, git]
```

It checks GPUs (count, model, memory, driver and CUDA version from nvidia-smi; a GPU that
nvidia-smi shows as `ERR!` or cannot reach fails, although nvidia-smi exits 0), free disk
against the declared needs (paths on one filesystem are summed), disk for the checkpoints in
`checkpoint_dir` for the whole run (`checkpoint_gb` × `checkpoints`, or × `checkpoint_keep` + 1
for a job that keeps only its newest ones, less those already there, plus `checkpoint_margin`;
checkpoints already in the directory are measured and a larger real size wins), available RAM against `base_ram_gb` + `workers` × `gb_per_worker`
(seed 001: ~2-3 GB per DataLoader worker), CPU cores against workers + trainers, and the tools
on PATH (python3 >= `min_python`), and that no live job of another run on the box holds the
GPUs this run will use (`gpus`, default all when `min_gpus` > 0), so a busy box fails here
rather than at the launch after the downloads. See provision/monitor/preflight.py for every
param.

The step fails naming every failing row; its table is in the step log and in
`preflight.json` in the step's directory. It is a gate: once passed on a box it stays done (a
later `up`, with training filling GPUs and disk, does not re-check); `rerun` checks again, and
`bootstrap check TARGET` runs the same checks at any time without the DAG.
"""

from __future__ import annotations

import re
import time
from typing import Any

from provision.agent.files import read_json, write_json_atomic
from provision.agent.gpus import gpus_value
from provision.errors import StepFailed
from provision.monitor import preflight
from provision.monitor.render import render_rows
from provision.steps import box_tool
from provision.steps.base import Check, Kind, Param, ParamError, StepContext

RESULT = "preflight.json"


class Preflight(Kind):
    """Compare GPUs, disk, RAM, cores and tools with what the run declares it needs."""

    name = "preflight"
    # The tools it checks are made present first, and it checks after the playbook's installs.
    runs_after = ("apt",)
    summary = "check GPUs, disk, RAM, cores and tools against what the run needs"
    params = (
        Param("min_gpus", "int", "GPUs needed (0: none)", default=1),
        Param("min_gpu_memory_gb", "float", "memory each GPU must have, GB (10^9 bytes)"),
        Param("gpu_name", "str", "regex every GPU's name must match, e.g. 'H100|RTX PRO 6000'"),
        Param("min_driver", "str", "lowest NVIDIA driver version, e.g. '570'"),
        Param("min_cuda", "str", "lowest CUDA version the driver supports, e.g. '12.8'"),
        Param(
            "disk",
            "dict",
            "GB needed under each path, e.g. {/workspace: 60}",
            default={},
            items="float",
        ),
        Param("checkpoint_dir", "path", "where training writes its checkpoints"),
        Param("checkpoints", "int", "how many training checkpoints must fit", default=0),
        Param(
            "checkpoint_keep",
            "int",
            "complete checkpoints the job keeps (its `checkpoints.keep`): room for keep + 1",
        ),
        Param("checkpoint_gb", "float", "size of one training checkpoint, GB", default=22.0),
        Param(
            "checkpoint_margin",
            "float",
            "extra room over the checkpoints' need, a fraction (0.1: 10 %)",
            default=0.1,
        ),
        Param("workers", "int", "DataLoader worker processes in total", default=0),
        Param("gb_per_worker", "float", "RAM per DataLoader worker, GB", default=2.5),
        Param("base_ram_gb", "float", "RAM of the training processes themselves, GB", default=15.0),
        Param("trainers", "int", "training processes (default: min_gpus)"),
        Param(
            "tools",
            "list",
            "executables that must be on PATH",
            default=["python3", "tmux"],
            items="str",
        ),
        Param("min_python", "str", "lowest python3 version", default="3.9"),
        Param(
            "gpus",
            "any",
            "GPUs the run's jobs use (as tmux_launch `gpus:`); no other run's job may hold them",
        ),
    )

    def validate(self, params: dict[str, Any]) -> None:
        for key in ("min_gpus", "checkpoints", "workers", "trainers"):
            if params[key] is not None and params[key] < 0:
                raise ParamError(f"'{key}' must be >= 0", key)
        for key in (
            "min_gpu_memory_gb",
            "checkpoint_gb",
            "checkpoint_margin",
            "gb_per_worker",
            "base_ram_gb",
        ):
            if params[key] is not None and params[key] < 0:
                raise ParamError(f"'{key}' must be >= 0", key)
        for path, gb in params["disk"].items():
            if gb < 0:
                raise ParamError(f"'disk' needs for {path} must be >= 0 GB", "disk")
        for key in ("min_driver", "min_cuda", "min_python"):
            if params[key] is not None and not preflight.VERSION.match(params[key]):
                raise ParamError(f"'{key}' must be a version like 12.8, got {params[key]!r}", key)
        if params["gpus"] is not None and gpus_value(params["gpus"]) is None:
            raise ParamError("'gpus' must be an index, a list of indexes or '0,1'", "gpus")
        if params["gpu_name"] is not None:
            try:
                re.compile(params["gpu_name"])
            except re.error as exc:
                raise ParamError(f"'gpu_name' is not a valid regex: {exc}", "gpu_name") from exc
        if params["checkpoints"] and not params["checkpoint_dir"]:
            raise ParamError("'checkpoints' needs 'checkpoint_dir'", "checkpoint_dir")
        keep = params["checkpoint_keep"]
        if keep is not None:
            if keep < 1:
                raise ParamError("'checkpoint_keep' must be >= 1", "checkpoint_keep")
            if params["checkpoints"]:
                raise ParamError(
                    "give 'checkpoints' (a count) or 'checkpoint_keep', not both",
                    "checkpoint_keep",
                )
            if not params["checkpoint_dir"]:
                raise ParamError("'checkpoint_keep' needs 'checkpoint_dir'", "checkpoint_dir")

    def required_tools(self, params: dict[str, Any]) -> tuple[str, ...]:
        return tuple(box_tool.installable(params["tools"]))

    def describe(self, params: dict[str, Any]) -> str:
        parts = [f"{params['min_gpus']} GPU(s)"]
        if params["min_gpu_memory_gb"] is not None:
            parts[0] += f" >= {params['min_gpu_memory_gb']:g} GB"
        for path, gb in params["disk"].items():
            parts.append(f"{gb:g} GB on {path}")
        if params["checkpoints"]:
            parts.append(f"{params['checkpoints']} checkpoints in {params['checkpoint_dir']}")
        if params["checkpoint_keep"]:
            keep = params["checkpoint_keep"]
            parts.append(f"{keep} + 1 checkpoints in {params['checkpoint_dir']}")
        if params["workers"]:
            parts.append(f"{params['workers']} workers")
        return "check the box has " + ", ".join(parts)

    def check(self, ctx: StepContext) -> Check:
        result = read_json(ctx.workdir / RESULT, None)
        if not isinstance(result, dict):
            return Check(False, "not checked on this box yet")
        if not result.get("ok"):
            return Check(False, "failed last time: " + ", ".join(result.get("failed", [])))
        return Check(
            True, f"passed at {time.strftime('%Y-%m-%d %H:%M', time.localtime(result['at']))}"
        )

    def run(self, ctx: StepContext) -> None:
        rows = preflight.run_preflight(self._params(ctx), env=ctx.env, run=ctx.run_dir.name)
        shown = [r.to_dict() for r in rows]
        result = {
            "ok": all(r.ok for r in rows),
            "at": time.time(),
            "rows": shown,
            "failed": [r.check for r in rows if not r.ok],
        }
        ctx.log(render_rows(shown).rstrip("\n"))
        write_json_atomic(ctx.workdir / RESULT, result)
        failed = [r for r in rows if not r.ok]
        if failed:
            reason = "; ".join(f"{r.check}: {r.value} (need {r.expected})" for r in failed)
            hint = next((r.detail for r in failed if r.detail), None)
            raise StepFailed(f"preflight failed: {reason}", hint)

    def verify(self, ctx: StepContext) -> None:
        result = read_json(ctx.workdir / RESULT, None)
        if not isinstance(result, dict) or not result.get("ok"):
            raise StepFailed("preflight did not record a passing result")

    @staticmethod
    def _params(ctx: StepContext) -> dict[str, Any]:
        params = dict(ctx.params)
        if params["checkpoint_dir"]:
            params["checkpoint_dir"] = str(ctx.path(params["checkpoint_dir"]))
        params["disk"] = {str(ctx.path(p)): gb for p, gb in params["disk"].items()}
        return params


KIND = Preflight()
