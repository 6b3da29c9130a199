"""Finding (or installing) uv on the box, the arguments and environment every uv call gets, and
uv's output turned into progress. Shared by the `uv_sync` and `pip_install` kinds.

uv is always called by absolute path: over SSH the environment is minimal and `~/.local/bin` is
not on PATH (TESTBED.md).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

from provision.agent.paths import tools_bin
from provision.errors import StepFailed
from provision.steps import box_tool
from provision.steps.base import Param, ParamError, StepContext

#: Environment every uv call gets unless the step's `env` says otherwise: no git-lfs downloads
#: while resolving git dependencies, and copies instead of hardlinks into uv's cache (patching a
#: hardlinked file in the venv would patch the cache too; RUNBOOK E).
UV_ENV_DEFAULTS = {"GIT_LFS_SKIP_SMUDGE": "1", "UV_LINK_MODE": "copy"}

#: The params about uv itself and where packages come from, shared by both kinds.
UV_PARAMS = (
    Param("uv", "path", "uv executable to use (default: found by absolute path, else installed)"),
    Param(
        "find_links", "list", "local wheel directories or URLs to look in", default=[], items="str"
    ),
    Param("index_url", "str", "package index to use instead of PyPI"),
    Param(
        "offline",
        "bool",
        "never touch the network (with `find_links` on air-gapped boxes)",
        default=False,
    ),
)


def uv_env(ctx: StepContext) -> dict[str, str]:
    """The step's environment with the uv defaults filled in where it does not set them."""
    env = dict(ctx.env)
    for key, value in UV_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    return env


def index_args(params: dict[str, Any], offline_flag: str = "--offline") -> list[str]:
    """Options for `find_links`, `index_url` and `offline` (uv's; pip's with `--no-index`)."""
    args: list[str] = []
    for link in params["find_links"]:
        args += ["--find-links", os.path.expanduser(link)]
    if params["index_url"]:
        args += ["--index-url", params["index_url"]]
    if params["offline"]:
        args.append(offline_flag)
    return args


def validate_index(params: dict[str, Any]) -> None:
    """Reject an empty `find_links` entry (it would make uv look in the working directory)."""
    if any(not link.strip() for link in params["find_links"]):
        raise ParamError("'find_links' holds an empty entry", "find_links")


def locate_uv(ctx: StepContext, explicit: str | None) -> Path | None:
    """uv's absolute path: `explicit`, else the usual places, else PATH; None when absent."""
    if explicit:
        path = ctx.path(explicit)
        return path if _is_executable(path) else None
    # The absolute places uv usually lives are searched before PATH, bootstrap's own first.
    for candidate in (str(tools_bin() / "uv"), *box_tool.TOOLS["uv"].places):
        path = ctx.path(candidate)
        if _is_executable(path):
            return path
    found = shutil.which("uv", path=ctx.env.get("PATH", os.defpath))
    return Path(found).absolute() if found else None


def ensure_uv(ctx: StepContext, explicit: str | None) -> Path:
    """uv's absolute path: `explicit` (a kind's `uv` param), else the box's, else installed
    (`box_tool`: the engine provides it before the step as `tool-uv`; a kind run on its own
    gets it here)."""
    found = locate_uv(ctx, explicit)
    if found:
        return found
    if explicit:
        raise StepFailed(f"uv not found at {explicit}", hint="fix the `uv` param or drop it")
    return box_tool.provide(ctx, "uv")


def _is_executable(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISREG(mode) and os.access(path, os.X_OK)


#: uv's summary lines: the progress message each makes, and whether uv has all its bytes by
#: then (it prints "Prepared" once every wheel is downloaded and built; what follows is linking
#: them into the venv, the box's own work).
_PROGRESS_LINES = (
    (re.compile(r"^Resolved (\d+) packages? in "), "resolved {0} packages", False),
    (re.compile(r"^Downloading (\S+) \(([^)]+)\)"), "downloading {0} ({1})", False),
    (re.compile(r"^\s*Downloaded (\S+)"), "downloaded {0}", False),
    (re.compile(r"^Building (\S+)"), "building {0}", False),
    (re.compile(r"^\s*Built (\S+)"), "built {0}", False),
    (re.compile(r"^Prepared (\d+) packages? in "), "prepared {0} packages", True),
    (re.compile(r"^Uninstalled (\d+) packages? in "), "uninstalled {0} packages", True),
    (re.compile(r"^Installed (\d+) packages? in "), "installed {0} packages", True),
    (re.compile(r"^Audited (\d+) packages? in "), "audited {0} packages", True),
)


def progress_message(line: str) -> tuple[str, bool] | None:
    """The progress message for one line of uv's output and whether uv's bytes are all in by
    then, or None for lines that carry none."""
    for pattern, template, received in _PROGRESS_LINES:
        match = pattern.match(line)
        if match:
            return template.format(*match.groups()), received
    return None


class _UvOutput:
    """A stream for `StepContext.sh`: forwards uv's output to the log, and its summary lines
    (Resolved / Downloading / Prepared / Installed ...) to the step's progress."""

    def __init__(self, ctx: StepContext) -> None:
        self._ctx = ctx
        self._out = ctx.out or sys.stdout
        self._partial = ""  # output comes in chunks: a line can end in the next write

    def write(self, text: str) -> int:
        self._out.write(text)
        lines = (self._partial + text).replace("\r", "\n").split("\n")
        self._partial = lines.pop()
        for line in lines:
            said = progress_message(line)
            if said:
                message, received = said
                self._ctx.progress(message=message, received=received or None)
        return len(text)

    def flush(self) -> None:
        self._out.flush()


def run_uv(ctx: StepContext, argv: list[str], *, cwd: Path, env: dict[str, str]) -> None:
    """Run a uv command, its output in the log and its summary lines in the progress."""
    dataclasses.replace(ctx, out=_UvOutput(ctx)).sh(argv, cwd=cwd, env=env)
