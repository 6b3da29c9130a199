"""`agent_venv`: the agent's private venv for kinds that need third-party libraries.

The controller adds this step by itself (id `agent-venv`) when a selected step's kind lists
`pip` requirements, and makes only those steps need it: the other tracks start at once. Set the
host var `agent_python` to use an existing interpreter instead, or `agent_base_python` (and
`agent_system_site_packages: true`) to build the venv on an interpreter that already has them.

```yaml
- id: libs-venv   # (the implicit step is called agent-venv)
  kind: agent_venv
  requirements: [google-cloud-storage, rclone-python]
```
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

from provision.steps.base import Check, Kind, Param, StepContext

VENV_DIR = "~/.bootstrap/venv"


def _uv() -> str | None:
    for candidate in ("~/.bootstrap/bin/uv", "/usr/local/bin/uv", "~/.local/bin/uv"):
        path = os.path.expanduser(candidate)
        if os.access(path, os.X_OK):
            return path
    return shutil.which("uv")


class AgentVenv(Kind):
    """Create `~/.bootstrap/venv` and install the requirements of the library kinds."""

    name = "agent_venv"
    summary = "the agent's private venv for kinds that need libraries (added automatically)"
    params = (
        Param("requirements", "list", "pip requirements", required=True, items="str"),
        Param("python", "str", "base interpreter for the venv", default="python3"),
        Param(
            "system_site_packages", "bool", "let the venv see the base's packages", default=False
        ),
    )

    def _marker(self, params: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()

    def describe(self, params: dict[str, Any]) -> str:
        return f"venv {VENV_DIR} with {', '.join(params['requirements'])}"

    def check(self, ctx: StepContext) -> Check:
        venv = ctx.path(VENV_DIR)
        marker = venv / ".bootstrap-requirements"
        if not (venv / "bin" / "python").exists():
            return Check(False, f"no venv at {VENV_DIR}")
        try:
            recorded = marker.read_text(encoding="utf-8").strip()
        except OSError:
            recorded = ""
        if recorded != self._marker(ctx.params):
            return Check(False, "requirements changed")
        return Check(True, "venv has the requirements")

    def run(self, ctx: StepContext) -> None:
        venv = ctx.path(VENV_DIR)
        params = ctx.params
        if params["system_site_packages"] and self._base_has_all(ctx):
            # The base interpreter has every requirement: a venv over it needs no index at
            # all (an offline box, the tests), and no time.
            ctx.sh(
                [
                    params["python"],
                    "-m",
                    "venv",
                    "--system-site-packages",
                    "--without-pip",
                    str(venv),
                ]
            )
            (venv / ".bootstrap-requirements").write_text(
                self._marker(params) + "\n", encoding="utf-8"
            )
            return
        uv = _uv()
        env = dict(ctx.env, UV_NATIVE_TLS="1", UV_PYTHON_DOWNLOADS="never")
        if uv:
            cmd = [uv, "venv", "--allow-existing", "--python", params["python"], str(venv)]
            if params["system_site_packages"]:
                cmd.insert(2, "--system-site-packages")
            ctx.sh(cmd, env=env)
            ctx.sh(
                [
                    uv,
                    "pip",
                    "install",
                    "--python",
                    str(venv / "bin" / "python"),
                    *params["requirements"],
                ],
                env=env,
            )
        else:
            cmd = [params["python"], "-m", "venv", str(venv)]
            if params["system_site_packages"]:
                cmd.append("--system-site-packages")
            ctx.sh(cmd)
            ctx.sh(
                [
                    str(venv / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    *params["requirements"],
                ]
            )
        (venv / ".bootstrap-requirements").write_text(self._marker(params) + "\n", encoding="utf-8")

    def _base_has_all(self, ctx: StepContext) -> bool:
        """Whether the base interpreter already has every requirement installed."""
        probe = (
            "import sys, importlib.metadata as m\nfor name in sys.argv[1:]:\n    m.version(name)\n"
        )
        names = [
            r.split("=")[0].split("<")[0].split(">")[0].strip() for r in ctx.params["requirements"]
        ]
        return ctx.capture([ctx.params["python"], "-c", probe, *names]).returncode == 0

    def verify(self, ctx: StepContext) -> None:
        ctx.sh([str(ctx.path(VENV_DIR) / "bin" / "python"), "-c", "import sys; print(sys.version)"])


KIND = AgentVenv()
