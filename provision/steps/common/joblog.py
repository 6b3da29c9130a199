"""The lines `tmux_launch` writes into a job's log, shared with `wait_log`, and log diagnosis.

`tmux_launch` tees a job's output into its log and brackets each launch with two lines of its
own, so that a watcher reading the log knows where the latest launch begins (a relaunch appends
to the same log) and when the job has ended:

    [bootstrap] job 3f2a9c1b7d04 started in tmux session waypoint_ae
    [bootstrap] job 3f2a9c1b7d04 exited with status 1

`diagnose` asks the known-issues catalog (`provision.agent.catalog`) what a log line or tail
means. Standard library only: both kinds use this on the box's plain python3.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from provision.agent import catalog
from provision.errors import ConfigError

#: printf formats the launch script uses (launch id, then session name or exit status).
STARTED_FORMAT = "[bootstrap] job %s started in tmux session %s"
EXITED_FORMAT = "[bootstrap] job %s exited with status %s"

STARTED_RE = re.compile(r"^\[bootstrap\] job (?P<launch>[0-9a-f]+) started in tmux session \S+")
EXITED_RE = re.compile(r"^\[bootstrap\] job (?P<launch>[0-9a-f]+) exited with status (?P<rc>\d+)")


def diagnose(text: str, ignore: Collection[str] = ()) -> catalog.Match | None:
    """The known-issues catalog's earliest issue in `text` (skipping the issue ids in `ignore`):
    its `.hint` is the diagnosis and fix, its `.line` the line that showed it. None when nothing
    matches or no catalog ships."""
    try:
        found = catalog.default_catalog().match(text)
    except ConfigError:
        return None
    return next((m for m in found if m.id not in ignore), None)


def last_message(lines: list[str]) -> str:
    """The last line that says something (not a `=====` rule, not our own exit line)."""
    for line in reversed(lines):
        if re.search(r"[A-Za-z]", line) and not EXITED_RE.match(line):
            return line.strip()
    return ""
