"""`expect:` checks shared by the download kinds: what must be under the destination afterwards.

Each check names a `path` relative to the step's destination directory and one or more of:

- `exists: true|false` — the path is there (file or directory), or is not;
- `entries: N` — the path is a directory holding exactly N entries (not recursive);
- `contains: [name, ...]` — the path is a directory holding these entries (among others).

```yaml
expect:
  - {path: "1.0.0", entries: 34}
  - {path: "waypoint_indices.json", exists: true}
  - {path: "pi05_base/params", contains: ["ocdbt.process_0", "commit_success.txt"]}
```

Standard library only: the runner imports the kinds that use it.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any

from provision.steps.base import ParamError, check_keys

#: The keys a check may hold besides `path`.
_TESTS = ("exists", "entries", "contains")
#: How many names a failure message lists before summarising the rest.
_SHOWN = 8


def validate_expect(checks: list[Any], key: str = "expect") -> None:
    """Raise ParamError (naming `key`) unless `checks` is a list of well-formed checks."""
    for i, check in enumerate(checks):
        where = f"'{key}[{i}]'"
        if not isinstance(check, dict):
            raise ParamError(f"{where} must be a mapping like {{path: ..., exists: true}}", key)
        check_keys(check, ("path", *_TESTS), where, key)
        path = check.get("path")
        if not isinstance(path, str) or not path.strip():
            raise ParamError(f"{where} needs 'path' (relative to the destination)", key)
        parts = PurePosixPath(path).parts
        if path.startswith(("/", "~")) or ".." in parts:
            raise ParamError(f"{where} 'path' must stay inside the destination: {path!r}", key)
        if not any(t in check for t in _TESTS):
            raise ParamError(f"{where} needs one of: {', '.join(_TESTS)}", key)
        if "exists" in check and not isinstance(check["exists"], bool):
            raise ParamError(f"{where} 'exists' must be true or false", key)
        entries = check.get("entries")
        if "entries" in check and (
            isinstance(entries, bool) or not isinstance(entries, int) or entries < 0
        ):
            raise ParamError(f"{where} 'entries' must be a whole number >= 0", key)
        contains = check.get("contains")
        if "contains" in check and (
            not isinstance(contains, list)
            or not contains
            or not all(isinstance(n, str) and n for n in contains)
        ):
            raise ParamError(f"{where} 'contains' must be a non-empty list of names", key)


def failed_expectations(root: Path, checks: list[dict[str, Any]]) -> list[str]:
    """Run `checks` against the tree at `root`; one message per failed check (empty: all hold)."""
    failures: list[str] = []
    for check in checks:
        path = root / check["path"]
        shown = check["path"]
        if "exists" in check:
            there = os.path.lexists(path)
            if there != check["exists"]:
                failures.append(f"{shown} {'is missing' if check['exists'] else 'exists'}")
                continue
        if "entries" not in check and "contains" not in check:
            continue
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            failures.append(f"{shown} is not a readable directory ({exc.strerror})")
            continue
        if "entries" in check and len(names) != check["entries"]:
            failures.append(
                f"{shown} holds {len(names)} entries, expected {check['entries']}: " + _names(names)
            )
        missing = [n for n in check.get("contains", []) if n not in names]
        if missing:
            failures.append(f"{shown} lacks {_names(missing)} (it holds {_names(names)})")
    return failures


def _names(names: list[str]) -> str:
    if not names:
        return "nothing"
    more = len(names) - _SHOWN
    return ", ".join(names[:_SHOWN]) + (f", ... ({more} more)" if more > 0 else "")
