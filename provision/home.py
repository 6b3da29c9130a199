"""Where bootstrap keeps its own files on the controller (known_hosts, agent cache, sockets,
the debug log)."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def config_dir() -> Path:
    """`$BOOTSTRAP_CONFIG_DIR`, else `~/.config/bootstrap` (created 0700)."""
    path = Path(os.environ.get("BOOTSTRAP_CONFIG_DIR") or os.path.expanduser("~/.config/bootstrap"))
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def debug_log() -> Path:
    """Where a bug's traceback goes (the terminal gets one line naming this file)."""
    return config_dir() / "debug.log"


def known_hosts() -> Path:
    """bootstrap's own known_hosts: trust on first use, separate from the user's."""
    return config_dir() / "known_hosts"


def control_dir() -> Path:
    """A short directory for SSH ControlMaster sockets (unix socket paths are limited to ~100
    bytes, so not under a possibly long config dir)."""
    tag = hashlib.sha256(str(config_dir()).encode()).hexdigest()[:8]
    path = Path(tempfile.gettempdir()) / f"bootstrap-{os.getuid()}-{tag}"
    path.mkdir(exist_ok=True, mode=0o700)
    return path
