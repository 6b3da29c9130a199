"""`shell`: run a bash command — the escape hatch for anything no kind covers.

Example:

```yaml
- id: make-dirs
  kind: shell
  run: mkdir -p ~/work/data && echo ready > ~/work/data/READY
  creates: ~/work/data/READY
```

It runs with `bash -e -o pipefail`, in `cwd` (default: home). Without `creates` or `done_when`,
the step is done once it has succeeded with the same command (and its upstream steps have not
run again since).
"""

from __future__ import annotations

from typing import Any

from provision.errors import StepFailed
from provision.steps.base import Kind, Param, StepContext


class Shell(Kind):
    """Run `run` with bash in `cwd`; fails when it exits non-zero."""

    name = "shell"
    summary = "run a bash command (done by `creates`/`done_when`, or once succeeded)"
    params = (
        Param("run", "str", "the bash command or script", required=True),
        Param("cwd", "path", "working directory (default: the box user's home)"),
    )

    def describe(self, params: dict[str, Any]) -> str:
        first = params["run"].strip().splitlines()[0] if params["run"].strip() else ""
        return f"bash -c {first!r}" + (" ..." if "\n" in params["run"].strip() else "")

    def run(self, ctx: StepContext) -> None:
        cwd = ctx.path(ctx.params["cwd"]) if ctx.params.get("cwd") else ctx.path("~")
        cwd.mkdir(parents=True, exist_ok=True)
        # -e and pipefail: a multi-line runbook snippet stops at its first failing command.
        rc = ctx.sh(["bash", "-e", "-o", "pipefail", "-c", ctx.params["run"]], cwd=cwd, check=False)
        if rc != 0:
            raise StepFailed(f"the command exited {rc} (its output is in the log)")


KIND = Shell()
