"""The agent versions installed on this box, side by side.

The controller's prelude installs each version as `~/.bootstrap/agents/<sha256>.pyz` and points
`current.pyz` at the newest; a file is never replaced in place. A runner imports its step kinds
lazily from its own zipapp, so replacing that file under it would crash it mid-run
(`zipimport.ZipImportError: bad local file header`); with one file per version it keeps its
code to the end, and its steps run with the same agent as the runner.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from provision.agent.paths import agent_root, agents_dir

#: Versions kept besides those in use: commands in flight (an `up` following its run) have
#: no zipapp on their command line, so the newest few stay even when nothing names them.
KEEP_NEWEST = 3


def pyz_path() -> Path:
    """The agent zipapp this process runs from (`agent.pyz` outside a zipapp, in tests)."""
    for parent in Path(__file__).parents:
        if parent.suffix == ".pyz":
            return parent.resolve()  # `current.pyz` is a link that a newer install moves
    return agent_root() / "agent.pyz"


def prune_agents() -> list[Path]:
    """Remove the versions in `agents/` that no process runs from, except the newest few and
    this process's own; returns what was removed."""
    agents = agents_dir()
    try:
        files = sorted(agents.glob("*.pyz"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return []
    if len(files) <= KEEP_NEWEST:
        return []
    in_use = _in_use()
    mine = pyz_path()
    removed = []
    for path in files[KEEP_NEWEST:]:
        if path == mine or str(path).encode() in in_use:
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def _in_use() -> set[bytes]:
    """Every argument on the command line of every process, and every PYTHONPATH entry of
    its environment: runners and steps name the zipapp they run from on their command line,
    a job's checkpoint guard (`python3 -m provision.agent guard`) in its PYTHONPATH."""
    words: set[bytes] = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{name}/cmdline", "rb") as fh:
            words.update(fh.read().split(b"\0"))
        with contextlib.suppress(OSError), open(f"/proc/{name}/environ", "rb") as fh:
            for var in fh.read().split(b"\0"):
                if var.startswith(b"PYTHONPATH="):
                    words.update(var[len(b"PYTHONPATH=") :].split(b":"))
    return words
