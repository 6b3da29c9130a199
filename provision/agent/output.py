"""A step's output: read from its pipe, redacted, into its log and a tail kept in memory.

- Output reaches the log as it comes, not a line at a time: a progress bar that redraws with
  carriage returns (`\\r`, no newline) is in the log, and in `status`, while it is drawn. Only
  the last characters of an unfinished line may wait, when they could be the start of a secret
  that the next read completes (see `Pending`).
- Memory is bounded in bytes: the pipe is read `CHUNK` bytes at a time, an unfinished line
  holds at most one chunk plus the longest secret form, and the tail kept for the diagnosis
  holds the last `TAIL_CHARS` characters (a step printing 10 MB lines once took the runner to
  563 MB).
"""

from __future__ import annotations

import codecs
import collections
import contextlib
from collections.abc import Callable, Iterator
from typing import IO, Any

from provision.agent.redact import Redactor

#: Bytes read from a step's pipe at once.
CHUNK = 64 * 1024
#: Characters of output kept in memory per running step, for the known-issue diagnosis.
TAIL_CHARS = 64 * 1024


class Tail:
    """The last `limit` characters of a stream, in the pieces they came in."""

    def __init__(self, limit: int = TAIL_CHARS) -> None:
        self.limit = limit
        self._pieces: collections.deque[str] = collections.deque()
        self._size = 0

    def append(self, text: str) -> None:
        if len(text) >= self.limit:
            self._pieces.clear()
            text = text[-self.limit :]
            self._size = 0
        self._pieces.append(text)
        self._size += len(text)
        while self._size > self.limit:
            drop = self._size - self.limit
            first = self._pieces[0]
            if len(first) <= drop:
                self._pieces.popleft()
                self._size -= len(first)
            else:
                self._pieces[0] = first[drop:]
                self._size -= drop

    def __iter__(self) -> Iterator[str]:
        return iter(self._pieces)

    def text(self) -> str:
        return "".join(self._pieces)


class Pending:
    """Redacts a stream cut into arbitrary pieces, holding back what a secret could still span.

    Complete lines (ended by `\\n` or `\\r`) are redacted and released whole. Of an unfinished
    line all is released but its last `hold` characters (the longest form a secret can take):
    a secret whose start is in those characters is masked once the next piece completes it.
    """

    def __init__(self, redact: Callable[[str], str], hold: int) -> None:
        self.redact = redact
        self.hold = hold
        self._text = ""

    def feed(self, text: str) -> str:
        """Take the next piece; returns the redacted text that can be released now."""
        text = self._text + text
        end = max(text.rfind("\n"), text.rfind("\r")) + 1
        done, rest = self.redact(text[:end]) if end else "", text[end:]
        if len(rest) <= self.hold:
            self._text = rest
            return done
        rest = self.redact(rest)
        cut = len(rest) - self.hold
        self._text = rest[cut:]
        return done + rest[:cut]

    def flush(self) -> str:
        """The end of the stream: release what was held."""
        text, self._text = self._text, ""
        return self.redact(text)


def pump(stream: IO[bytes], log_path: Any, redact: Redactor, tail: Tail) -> None:
    """Copy a step's output into its log and `tail` through `redact`, until the pipe closes.

    `redact` is the run's Redactor (its `longest` is what `Pending` holds back). When the log
    cannot be written (disk full) the pipe is still drained, or the step would block on it;
    `tail` keeps the last output for the diagnosis.
    """
    log: Any = None
    with contextlib.suppress(OSError):
        log = open(log_path, "ab", buffering=0)  # noqa: SIM115 - closed below, or on error
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pending = Pending(redact, redact.longest)
    read = getattr(stream, "read1", stream.read)
    while True:
        raw = read(CHUNK)
        text = pending.feed(decoder.decode(raw)) if raw else pending.flush()
        text += "" if raw else decoder.decode(b"", final=True)
        if text:
            tail.append(text)
            if log is not None:
                try:
                    log.write(text.encode())
                except OSError:
                    log.close()
                    log = None
        if not raw:
            break
    if log is not None:
        log.close()
