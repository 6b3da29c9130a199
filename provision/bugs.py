"""What the controller does with a bug: an exception no code path expected.

A bug is not the user's doing, so it is not shown as bad input (exit 2): the terminal gets one
line naming the box and step when known, saying it is a bug and where its traceback went, and
the traceback (with the command line and version) is appended to the debug log
(`home.debug_log()`, `~/.config/bootstrap/debug.log`). `cli.py` turns it into exit code 3.

Secret values the command resolved are registered here and replaced in what the log keeps, as
on the terminal: an exception's message can quote a value it was handed.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from pathlib import Path

from provision import __version__
from provision.agent.redact import Redactor
from provision.home import debug_log

#: The log is rotated once past this size (one older file is kept beside it).
MAX_LOG_BYTES = 1 << 20

_lock = threading.RLock()
_secrets: set[str] = set()


class BoxBug(Exception):
    """The agent on a box crashed answering a command: a bug in bootstrap, not bad input.

    `traceback` is what the box printed (it goes to the debug log, not the terminal).
    """

    def __init__(self, box: str, verb: str, traceback: str, step: str | None = None) -> None:
        super().__init__(f"the agent crashed answering `{verb}`")
        self.box = box
        self.verb = verb
        self.traceback = traceback
        self.step = step


def register_secrets(values: list[str]) -> None:
    """Values the debug log must never hold (the command's resolved secrets)."""
    with _lock:
        _secrets.update(v for v in values if v)


def report(exc: BaseException, box: str | None = None, step: str | None = None) -> str:
    """Append `exc`'s traceback to the debug log; the one line the terminal shows for it."""
    box = box or getattr(exc, "box", None)
    step = step or getattr(exc, "step", None)
    where = "".join(
        [f"{box}: " if box else "", f"step '{step}': " if step else ""]
    )  # the box and step, when the bug happened in per-box work
    what = f"{type(exc).__name__}: {exc}" if not isinstance(exc, BoxBug) else str(exc)
    try:
        path = _append(_entry(exc, where))
    except OSError as err:
        sys.stderr.write(_redact("".join(traceback.format_exception(exc))))
        return f"{where}this is a bug in bootstrap: {what} (no debug log: {err})"
    return _redact(f"{where}this is a bug in bootstrap: {what} (traceback in {path})")


def _entry(exc: BaseException, where: str) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    lines = [
        f"=== {stamp} bootstrap {__version__} (python {sys.version.split()[0]})",
        f"command: {' '.join(sys.argv)}",
        f"where: {where.rstrip(': ') or 'the controller'}",
        "".join(traceback.format_exception(exc)).rstrip(),
    ]
    if isinstance(exc, BoxBug):
        lines += [f"on the box ({exc.box}):", exc.traceback.rstrip()]
    return "\n".join(lines) + "\n\n"


def _append(text: str) -> Path:
    path = debug_log()
    with _lock:
        try:
            if path.stat().st_size > MAX_LOG_BYTES:
                path.replace(path.with_name(path.name + ".1"))
        except FileNotFoundError:
            pass
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(_redact(text))
    return path


def _redact(text: str) -> str:
    with _lock:
        values = sorted(_secrets)
    return Redactor(values)(text) if values else text
