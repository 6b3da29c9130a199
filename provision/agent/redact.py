"""Value-based redaction: every log line on the box passes through it.

A secret is matched in the forms tools really print it in:

- as is, URL-encoded, base64 (alone or inside a longer blob, as in a Basic auth header);
- escaped: JSON (`json.dumps`, Go's `\\u003c` for `<>&`, as `rclone config dump` prints), the
  shell's `printf %q` and `$'...'`, `repr`, and the same escaped again (a JSON string inside a
  JSON string): any run of backslashes before a character that is not a letter or digit;
- single-quoted for a shell (`shlex.quote`, `'\\''`), when the value holds a quote;
- for a secret that is itself a JSON document (the rclone Drive token): each of its string
  fields of `MIN_FIELD_LEN` characters or more is a secret of its own, so `access_token` and
  `refresh_token` are masked however the document is re-printed (pretty, or inside another).

Arbitrary transforms (hex, a change of case, a value split over two lines) are out of scope.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterable, Iterator

MASK = "***"
#: Values shorter than this are not redacted: masking "1" or "yes" would shred every log.
MIN_SECRET_LEN = 6
#: String fields of a JSON secret shorter than this ("Bearer", "drive") are not secrets.
MIN_FIELD_LEN = 12
_URLSAFE = str.maketrans("+/", "-_")
#: ASCII letters and digits: no quoting scheme escapes them.
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
#: Control characters as escape letters (JSON, C, the shell's $'...', Python's repr).
_LETTERS = {"\n": "n", "\t": "t", "\r": "r", "\b": "b", "\f": "f", "\v": "v", "\a": "a"}
#: At most this many backslashes before one character: three levels of nested escaping.
_MAX_BACKSLASHES = 7


def secret_values(value: str) -> Iterator[str]:
    """The value, and, when it is a JSON document, each string field of useful length in it."""
    yield value
    stripped = value.strip()
    if not stripped.startswith(("{", "[")):
        return
    try:
        document = json.loads(stripped)
    except ValueError:
        return
    yield from (s for s in _strings(document) if len(s) >= MIN_FIELD_LEN)


def _strings(document: object) -> Iterator[str]:
    if isinstance(document, str):
        yield document
    elif isinstance(document, dict):
        for item in document.values():
            yield from _strings(item)
    elif isinstance(document, list):
        for item in document:
            yield from _strings(item)


def _forms(value: str) -> set[str]:
    """Literal forms: plain, URL-encoded, base64, shell single-quoted."""
    import base64  # only where a run has secrets: struct and binascii for every process else

    raw = value.encode()
    forms = {
        value,
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote_plus(value),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
    }
    if "'" in value:
        forms.add(value.replace("'", "'\"'\"'"))  # shlex.quote
        forms.add(value.replace("'", "'\\''"))  # the usual hand-written form
    # The value inside a longer base64 blob (e.g. "user:token" in Basic auth) starts at one of
    # three alignments, and the bytes around it change the 4-character groups it shares with
    # them: only the groups encoding the value's bytes alone appear verbatim, at every offset.
    for shift in (0, 1, 2):
        blob = base64.b64encode(b"\0" * shift + raw).decode()
        core = blob[4 * ((shift + 2) // 3) : 4 * ((shift + len(raw)) // 3)]
        forms.add(core)
        forms.add(core.translate(_URLSAFE))
    return {f.rstrip("=") for f in forms if len(f.rstrip("=")) >= MIN_SECRET_LEN}


def _escaped(value: str) -> str | None:
    """A pattern for the value with any character but a letter or digit escaped, any number of
    times: `\\$`, `\\"`, `\\\\\\"`, `\\u003c`, `\\n`, `\\x0a`, `\\012`. None when nothing in it
    can be escaped (its plain form is the only one)."""
    if all(c in _PLAIN for c in value):
        return None
    slashes = r"\\{0," + str(_MAX_BACKSLASHES) + "}"
    parts = []
    for c in value:
        if c in _PLAIN:
            parts.append(re.escape(c))
            continue
        code = ord(c)
        # Hex digits in either case: Go writes \u003c, others \u003C.
        ways = [re.escape(c), f"(?i:u{code:04x})"] if code < 0x10000 else [re.escape(c)]
        if code < 0x100:
            ways += [f"(?i:x{code:02x})", f"{code:03o}"]
        if c in _LETTERS:
            ways.append(_LETTERS[c])
        parts.append(f"{slashes}(?:{'|'.join(ways)})")
    return "".join(parts)


class Redactor:
    """Replace every known form of every secret value with `***`."""

    def __init__(self, values: Iterable[str]) -> None:
        values = list(values)
        forms: set[str] = set()
        escaped: set[str] = set()
        for value in values:
            if not value or len(value) < MIN_SECRET_LEN:
                continue
            for secret in secret_values(value):
                forms |= _forms(secret)
                pattern = _escaped(secret)
                if pattern is not None:
                    escaped.add(pattern)
        # Longest first, so a value is masked before a shorter form of it could split it.
        self._forms = sorted(forms, key=len, reverse=True)
        self._escaped = (
            re.compile("|".join(sorted(escaped, key=len, reverse=True))) if escaped else None
        )
        #: The longest text one match can span (for cutting a stream without splitting one).
        self.longest = max(
            [len(f) for f in forms] + [len(v) * (_MAX_BACKSLASHES + 6) for v in values if v],
            default=0,
        )

    def __bool__(self) -> bool:
        return bool(self._forms)

    def __call__(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, MASK)
        # Every escaped form holds a backslash; most lines hold none.
        if self._escaped is not None and "\\" in text:
            text = self._escaped.sub(MASK, text)
        return text
