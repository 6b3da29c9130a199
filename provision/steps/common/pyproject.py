"""Ensure requirements in `[tool.uv] override-dependencies` of a pyproject.toml, editing the text
minimally so that comments, order and formatting of everything else survive.

A small scanner finds the table and the array (strings, comments and nested brackets are
skipped properly); where `tomllib` exists (python >= 3.11) the edited text is parsed again to
prove the edit means what it should before anything is written.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from provision.steps.common.venv import canonical_name

_KEY = "override-dependencies"


class PyprojectError(ValueError):
    """The file's layout is one this editor does not change safely (say how to fix it by hand)."""


@dataclass(frozen=True)
class _Item:
    start: int
    end: int
    value: str


def requirement_name(requirement: str) -> str | None:
    """The canonical distribution name a requirement string starts with, or None."""
    match = re.match(r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)", requirement)
    return canonical_name(match.group(1)) if match else None


def read_overrides(text: str) -> list[str]:
    """The entries of `[tool.uv] override-dependencies` (empty when there is none)."""
    found = _find_array(text)
    return [item.value for item in found[1]] if found else []


def ensure_overrides(text: str, wanted: list[str]) -> tuple[str, list[str]]:
    """Return the text with every `wanted` requirement among the overrides, and what changed.

    An entry already there (same text) is left alone; an entry for the same package with another
    specifier is replaced, since two unconditional overrides of one package contradict.
    """
    changes: list[str] = []
    for requirement in wanted:
        text, change = _ensure_one(text, requirement.strip())
        if change:
            changes.append(change)
    if changes:
        _prove(text, wanted)
    return text, changes


def _ensure_one(text: str, requirement: str) -> tuple[str, str | None]:
    found = _find_array(text)
    if found is None:
        return _add_key(text, requirement), f"added {requirement}"
    close, items = found
    if any(_squash(item.value) == _squash(requirement) for item in items):
        return text, None
    name = requirement_name(requirement)
    for item in items:
        if requirement_name(item.value) == name:
            new = text[: item.start] + json.dumps(requirement) + text[item.end :]
            return new, f"replaced {item.value} with {requirement}"
    return _append(text, close, items, requirement), f"added {requirement}"


def _squash(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement)


def _append(text: str, close: int, items: list[_Item], requirement: str) -> str:
    quoted = json.dumps(requirement)
    if not items:
        return text[:close] + quoted + text[close:]
    last = items[-1]
    after = last.end + len(text[last.end :]) - len(text[last.end :].lstrip(" \t"))
    has_comma = text.startswith(",", after)
    open_at = text.rfind("[", 0, items[0].start)
    if "\n" not in text[open_at:close]:
        if has_comma:
            return text[: after + 1] + " " + quoted + text[after + 1 :]
        return text[: last.end] + ", " + quoted + text[last.end :]
    line_start = text.rfind("\n", 0, last.start) + 1
    indent = re.match(r"[ \t]*", text[line_start:]).group()  # type: ignore[union-attr]
    if has_comma:
        return text[: after + 1] + "\n" + indent + quoted + "," + text[after + 1 :]
    return text[: last.end] + ",\n" + indent + quoted + text[last.end :]


def _add_key(text: str, requirement: str) -> str:
    line = f"{_KEY} = [{json.dumps(requirement)}]\n"
    header = _table_header(text)
    if header is not None:
        return text[:header] + line + text[header:]
    sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
    return f"{text}{sep}[tool.uv]\n{line}"


def _prove(text: str, wanted: list[str]) -> None:
    if sys.version_info < (3, 11):  # no tomllib: uv's own parse of the file is the proof then
        return
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PyprojectError(f"editing pyproject.toml would break it ({exc})") from exc
    present = {_squash(r) for r in data.get("tool", {}).get("uv", {}).get(_KEY, [])}
    missing = [r for r in wanted if _squash(r) not in present]
    if missing:
        raise PyprojectError(f"could not add {', '.join(missing)} to [tool.uv] {_KEY}")


def _table_header(text: str) -> int | None:
    """Offset just past the `[tool.uv]` header line, or None when there is no such table."""
    for start, line in _top_level_lines(text):
        if re.match(r"\s*\[\s*tool\s*\.\s*uv\s*\]\s*(#.*)?$", line):
            end = start + len(line)
            return end + 1 if text.startswith("\n", end) else end
    return None


def _find_array(text: str) -> tuple[int, list[_Item]] | None:
    """The `override-dependencies` array of `[tool.uv]`: offset of its `]` and its strings."""
    in_table = False
    for start, line in _top_level_lines(text):
        if re.match(r"\s*\[", line):
            in_table = re.match(r"\s*\[\s*tool\s*\.\s*uv\s*\]\s*(#.*)?$", line) is not None
            continue
        match = re.match(r'\s*("?)override-dependencies\1\s*=\s*\[', line)
        if in_table and match:
            return _scan_array(text, start + match.end() - 1)
    return None


def _scan_array(text: str, open_at: int) -> tuple[int, list[_Item]]:
    """Walk the array opened at `open_at`: its string items and the offset of its `]`."""
    items: list[_Item] = []
    depth, i = 0, open_at
    while i < len(text):
        ch = text[i]
        if ch in "\"'":
            end = _string_end(text, i)
            if depth == 1:
                items.append(_Item(i, end, _string_value(text[i:end])))
            i = end
            continue
        if ch == "#":
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
            continue
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth == 0:
                return i, items
        i += 1
    raise PyprojectError(f"unterminated {_KEY} array in pyproject.toml")


def _string_end(text: str, i: int) -> int:
    """Offset just past the TOML string starting at `i` (basic, literal, or multi-line)."""
    quote = text[i]
    if text.startswith(quote * 3, i):
        end = text.find(quote * 3, i + 3)
        if end < 0:
            raise PyprojectError("unterminated multi-line string in pyproject.toml")
        return end + 3
    j = i + 1
    while j < len(text) and text[j] != quote and text[j] != "\n":
        j += 2 if quote == '"' and text[j] == "\\" else 1
    if j >= len(text) or text[j] != quote:
        raise PyprojectError("unterminated string in pyproject.toml")
    return j + 1


def _string_value(token: str) -> str:
    if token.startswith('"') and not token.startswith('"""'):
        try:
            return str(json.loads(token))
        except ValueError:
            return token[1:-1]
    quote_len = 3 if token[:3] in ('"""', "'''") else 1
    return token[quote_len:-quote_len]


def _top_level_lines(text: str) -> Iterator[tuple[int, str]]:
    """(offset, line) of each line that starts outside any string or multi-line array."""
    depth, i, line_start = 0, 0, True
    while i < len(text):
        if line_start and depth == 0:
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            yield i, text[i:end]
        line_start = False
        ch = text[i]
        if ch in "\"'":
            i = _string_end(text, i)
            continue
        if ch == "#":
            nl = text.find("\n", i)
            i = len(text) if nl < 0 else nl
            continue
        if ch == "\n":
            line_start = True
        elif ch in "[{" and not _is_header(text, i, depth):
            depth += 1
        elif ch in "]}" and depth > 0:
            depth -= 1
        i += 1


def _is_header(text: str, i: int, depth: int) -> bool:
    """A `[` at depth 0 that is the first thing on its line opens a table header, not an array."""
    if depth != 0:
        return False
    line_start = text.rfind("\n", 0, i) + 1
    return text[line_start:i].strip() == ""
