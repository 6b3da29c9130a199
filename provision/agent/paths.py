"""Where bootstrap keeps its own things on the box: one root for all of them.

The root is `~/.bootstrap`, or `$BOOTSTRAP_AGENT_DIR` when set (the controller's prelude and the
tests set it); every path below it is derived here, read at call time, so no module hard-codes
`~/.bootstrap` and misses the override. Standard library only (shipped in the agent zipapp).
"""

from __future__ import annotations

import os
from pathlib import Path

#: The environment variable that moves the root.
ROOT_ENV = "BOOTSTRAP_AGENT_DIR"


def agent_root() -> Path:
    """`~/.bootstrap`, or `$BOOTSTRAP_AGENT_DIR` when set."""
    return Path(os.environ.get(ROOT_ENV) or os.path.expanduser("~/.bootstrap"))


def runs_dir() -> Path:
    """The runs, one directory each (`state.RunDir`)."""
    return agent_root() / "runs"


def tools_bin() -> Path:
    """Executables bootstrap installed itself (`steps.box_tool`): on every step's PATH, last."""
    return agent_root() / "bin"


def venv_dir() -> Path:
    """The agent's private venv, for the kinds that import libraries (`steps.agent_venv`)."""
    return agent_root() / "venv"


def venv_python() -> Path:
    """The agent venv's interpreter."""
    return venv_dir() / "bin" / "python"


def agents_dir() -> Path:
    """The installed agent zipapps, `<sha256>.pyz` each (`versions`)."""
    return agent_root() / "agents"


def blobs_dir() -> Path:
    """Plan values shipped once per box, by content hash (`blobs`)."""
    return agent_root() / "blobs"
