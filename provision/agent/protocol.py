"""How the agent answers the controller: the one protocol every verb it is asked follows.

Every verb the controller calls (`up`, `plan`, `status`, `logs`, `check`, `monitor`,
`checkpoints`) is reached through the controller's prelude and prints JSON objects, one a line,
on stdout; its exit code says how it went:

- `ANSWERED` (0): the lines are the answer (`up` and `logs` stream several as they come).
- `REFUSED` (2): the request cannot be answered on this box (no run there, no log for that
  step, a plan of another run in progress with --detach): the last line is
  `{"error": "...", "reason": "no_run" | ...}`, one line for the user, who can fix it.
- `BUG` (70, sysexits' EX_SOFTWARE): the agent crashed; the last line is
  `{"error": "TYPE: message", "bug": true}` and the traceback is on stderr, for the
  controller's debug log.

The prelude's own exit codes (3 to 6, see `provision/controller.py`) come with a marker line
instead of JSON. Standard library only: the agent on the box imports this module.
"""

from __future__ import annotations

import json
import sys
from typing import Any

ANSWERED = 0
REFUSED = 2
BUG = 70

#: `reason` of a refusal: there is no bootstrap run on the box (or none of that name).
NO_RUN = "no_run"
#: `reason` of a refusal: the step has no log (it never ran, or there is no such step).
NO_LOG = "no_log"
#: `reason` of a refusal: `up` cannot go on (another plan's run with --detach, a full disk).
UP_REFUSED = "refused"


class Refusal(Exception):
    """Raised by a verb that cannot answer; `reason` is one of the constants above."""

    def __init__(self, message: str, reason: str, **extra: Any) -> None:
        super().__init__(message)
        self.reason = reason
        self.extra = extra


def emit(data: dict[str, Any]) -> None:
    """One line of an answer."""
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def refuse(exc: Refusal) -> int:
    """Print a refusal's line; its exit code."""
    emit({"error": str(exc), "reason": exc.reason, **exc.extra})
    return REFUSED


def crashed(exc: BaseException) -> int:
    """Print what a crash is to the controller (the traceback on stderr); its exit code."""
    import traceback  # only on a crash: linecache and tokenize cost every process ~6 ms

    sys.stderr.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    sys.stderr.flush()
    emit({"error": f"{type(exc).__name__}: {exc}", "bug": True})
    return BUG


def last_answer(stdout: bytes) -> dict[str, Any] | None:
    """The last JSON object in an agent's output (None when there is none)."""
    for raw in reversed(stdout.splitlines()):
        if raw.startswith(b"{"):
            try:
                data = json.loads(raw)
            except ValueError:
                return None
            return data if isinstance(data, dict) else None
    return None
