"""`watch.json`: the guard's last look at its job, as `status`, `monitor` and `--json` read it.

Kept apart from the watcher so that reading it imports nothing of the monitor (a `status`
round trip stays cheap). Standard library only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from provision.agent.files import read_json

WATCH_FILE = "watch.json"
#: A guard's config, beside its step's files: one exists for every step that had a guard (so
#: `agent up` can tell whether any guard may need reviving without importing the guard).
CONFIG_FILE = "guard.json"


def read_watch(workdir: Path) -> dict[str, Any] | None:
    """The guard's last look at its job, without its private fields; None before the first."""
    doc = read_json(workdir / WATCH_FILE, None)
    if not isinstance(doc, dict):
        return None
    return {k: v for k, v in doc.items() if not k.startswith("_")}
