"""Value-based redaction: every log line on the box passes through it.

A secret is matched as its plain value and its common encodings (base64, URL-encoded), since a
tool may echo a token inside a URL or an Authorization header.
"""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Iterable

MASK = "***"
#: Values shorter than this are not redacted: masking "1" or "yes" would shred every log.
MIN_SECRET_LEN = 6
_URLSAFE = str.maketrans("+/", "-_")


def _forms(value: str) -> set[str]:
    raw = value.encode()
    forms = {
        value,
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote_plus(value),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
    }
    # The value inside a longer base64 blob (e.g. "user:token" in Basic auth) starts at one of
    # three alignments, and the bytes around it change the 4-character groups it shares with
    # them: only the groups encoding the value's bytes alone appear verbatim, at every offset.
    for shift in (0, 1, 2):
        blob = base64.b64encode(b"\0" * shift + raw).decode()
        core = blob[4 * ((shift + 2) // 3) : 4 * ((shift + len(raw)) // 3)]
        forms.add(core)
        forms.add(core.translate(_URLSAFE))
    return {f.rstrip("=") for f in forms if len(f.rstrip("=")) >= MIN_SECRET_LEN}


class Redactor:
    """Replace every known form of every secret value with `***`."""

    def __init__(self, values: Iterable[str]) -> None:
        forms: set[str] = set()
        for value in values:
            if value and len(value) >= MIN_SECRET_LEN:
                forms |= _forms(value)
        # Longest first, so a value is masked before a shorter form of it could split it.
        self._forms = sorted(forms, key=len, reverse=True)

    def __bool__(self) -> bool:
        return bool(self._forms)

    def __call__(self, text: str) -> str:
        for form in self._forms:
            if form in text:
                text = text.replace(form, MASK)
        return text
