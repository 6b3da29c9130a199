"""The failure catalog: known log signatures → diagnosis and fix.

The catalog's source is `provision/known_issues.yaml`. The box has no PyYAML, so the agent build
ships a JSON copy next to it (`provision/known_issues.json`, written with `catalog_to_json()`);
`load_catalog()` reads whichever the running interpreter can.

API (what other modules use):

```python
from provision.agent import catalog

catalog.hint_for(log_tail)          # "diagnosis — fix" of the first match, or None (never raises)
cat = catalog.load_catalog()        # the packaged catalog (cached: default_catalog())
cat = catalog.load_catalog("known_issues.yaml")   # or a .json path, or already-parsed data
for m in cat.match(text):           # earliest-matching issue first
    print(m.id, m.line_no, m.line, m.diagnosis, m.fix, m.remediation)
```

Matching works on any text (a step's log tail, a pasted terminal): ANSI colour codes are dropped
and carriage returns (tqdm) count as line breaks. Each entry is searched once over the whole
text with its compiled patterns, so the cost is a few C-level regex scans per entry; pass a tail
(`provision.agent.files.tail_text`) rather than a 10 GB log.

Entry fields: `id` ([a-z0-9-]+), `title`, `patterns` (Python regexes, searched line by line:
`^`/`$` anchor at line ends), `diagnosis`, `fix`, and optionally `remediation` (one of
REMEDIATIONS: a mechanical, safe fix a step may apply once before failing), `supersedes` (ids
of more general entries to drop when this one matches), `fallback: true` (reported only when
no other entry matched, e.g. torchrun's generic ChildFailedError wrapper), `transient: true`
(a condition the job usually survives, e.g. wandb's network retries: reported, but `wait_log`
does not fail on it) and `source`.
"""

from __future__ import annotations

import functools
import json
import os
import pkgutil
import re
from dataclasses import dataclass
from typing import Any

from provision.errors import ConfigError

#: Remediations a catalog entry may name; the kinds that apply them implement the action.
REMEDIATIONS = {
    "av_override": "add av>=13.1.0,<14.0.0 to [tool.uv] override-dependencies, then retry",
    "venv_torchrun": "use the venv's .venv/bin/torchrun (and .venv/bin/python), then retry",
    "expandable_segments": "set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, then retry",
}

_ID = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
_FIELDS = {
    "id",
    "title",
    "patterns",
    "diagnosis",
    "fix",
    "remediation",
    "supersedes",
    "fallback",
    "transient",
    "source",
}
_REQUIRED = ("id", "title", "patterns", "diagnosis", "fix")
#: How much of a matching line a Match keeps (a line can be megabytes long).
MAX_LINE = 300


@dataclass(frozen=True)
class Entry:
    """One known issue."""

    id: str
    title: str
    patterns: tuple[str, ...]
    diagnosis: str
    fix: str
    remediation: str | None = None
    supersedes: tuple[str, ...] = ()
    fallback: bool = False
    transient: bool = False
    source: str = ""


@dataclass(frozen=True)
class Match:
    """An entry found in a text: where (1-based line number, the line itself) and what to do."""

    id: str
    title: str
    diagnosis: str
    fix: str
    line: str
    line_no: int
    remediation: str | None = None
    transient: bool = False

    @property
    def hint(self) -> str:
        """One line for a step's status: diagnosis and fix."""
        return f"{self.diagnosis} — fix: {self.fix}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for `--json` outputs)."""
        return {
            "id": self.id,
            "title": self.title,
            "diagnosis": self.diagnosis,
            "fix": self.fix,
            "line": self.line,
            "line_no": self.line_no,
            "remediation": self.remediation,
            "transient": self.transient,
        }


class Catalog:
    """A validated list of entries with their patterns compiled."""

    def __init__(self, entries: list[Entry], origin: str = "<data>") -> None:
        self.entries = entries
        self.origin = origin
        self._compiled = [
            (entry, [re.compile(p, re.MULTILINE) for p in entry.patterns]) for entry in entries
        ]

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, issue_id: str) -> Entry | None:
        """The entry called `issue_id`, or None."""
        return next((e for e in self.entries if e.id == issue_id), None)

    def match(self, text: str) -> list[Match]:
        """Every entry whose patterns occur in `text`, earliest occurrence first.

        An entry superseded by another match is dropped; fallback entries only appear when
        nothing else matched.
        """
        clean = normalize(text)
        found: list[tuple[int, Entry, re.Match[str]]] = []
        for entry, regexes in self._compiled:
            first: re.Match[str] | None = None
            for rx in regexes:
                m = rx.search(clean)
                if m is not None and (first is None or m.start() < first.start()):
                    first = m
            if first is not None:
                found.append((first.start(), entry, first))
        dropped = {sid for _, entry, _ in found for sid in entry.supersedes}
        kept = [f for f in found if f[1].id not in dropped]
        if any(not entry.fallback for _, entry, _ in kept):
            kept = [f for f in kept if not f[1].fallback]
        kept.sort(key=lambda f: f[0])
        return [_to_match(clean, pos, entry) for pos, entry, _ in kept]

    def to_data(self) -> dict[str, Any]:
        """The catalog as plain data (the YAML's structure), for JSON export."""
        issues = []
        for e in self.entries:
            item: dict[str, Any] = {
                "id": e.id,
                "title": e.title,
                "patterns": list(e.patterns),
                "diagnosis": e.diagnosis,
                "fix": e.fix,
            }
            if e.remediation:
                item["remediation"] = e.remediation
            if e.supersedes:
                item["supersedes"] = list(e.supersedes)
            if e.fallback:
                item["fallback"] = True
            if e.transient:
                item["transient"] = True
            if e.source:
                item["source"] = e.source
            issues.append(item)
        return {"issues": issues}


def normalize(text: str) -> str:
    """Drop ANSI escapes and turn carriage returns into line breaks."""
    if "\x1b" in text:
        text = _ANSI.sub("", text)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _to_match(clean: str, pos: int, entry: Entry) -> Match:
    start = clean.rfind("\n", 0, pos) + 1
    end = clean.find("\n", pos)
    end = end if end >= 0 else len(clean)
    if end - start > MAX_LINE:
        # Keep the part of a very long line around the match, marked as cut.
        lo = max(start, min(pos - MAX_LINE // 3, end - MAX_LINE))
        line = ("..." if lo > start else "") + clean[lo : lo + MAX_LINE].strip()
        line += "..." if lo + MAX_LINE < end else ""
    else:
        line = clean[start:end].strip()
    return Match(
        id=entry.id,
        title=entry.title,
        diagnosis=entry.diagnosis,
        fix=entry.fix,
        line=line,
        line_no=clean.count("\n", 0, pos) + 1,
        remediation=entry.remediation,
        transient=entry.transient,
    )


def load_catalog(source: str | os.PathLike[str] | dict[str, Any] | None = None) -> Catalog:
    """Load and validate a catalog.

    `source`: a path to the YAML (needs PyYAML, imported only then) or to its JSON copy, data
    already parsed (`{"issues": [...]}`), or None for the packaged catalog (the YAML when PyYAML
    is importable, else the shipped JSON). Raises ConfigError naming the file and entry.
    """
    if source is None:
        data, origin = _packaged()
    elif isinstance(source, dict):
        data, origin = source, "<data>"
    else:
        origin = os.fspath(source)
        data = _read(origin)
    return Catalog(_entries(data, origin), origin)


@functools.lru_cache(maxsize=1)
def default_catalog() -> Catalog:
    """The packaged catalog, loaded once per process."""
    return load_catalog()


def hint_for(text: str) -> str | None:
    """The hint of the earliest known issue in `text`, or None (also when no catalog ships)."""
    try:
        found = default_catalog().match(text)
    except ConfigError:
        return None
    return found[0].hint if found else None


def catalog_to_json(source: str | os.PathLike[str] | dict[str, Any] | None = None) -> str:
    """The catalog as JSON text, for the agent build to ship as `provision/known_issues.json`."""
    cat = load_catalog(source if source is not None else _yaml_path())
    return json.dumps(cat.to_data(), indent=1, ensure_ascii=False) + "\n"


def _yaml_path() -> str:
    return os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "known_issues.yaml"
    )


def _packaged() -> tuple[Any, str]:
    try:
        import yaml  # noqa: F401  (only to learn whether the YAML is readable here)
    except ImportError:
        yaml_ok = False
    else:
        yaml_ok = os.path.isfile(_yaml_path())
    if yaml_ok:
        return _read(_yaml_path()), _yaml_path()
    # pkgutil reads from inside the agent's zipapp too, where open() cannot.
    try:
        raw = pkgutil.get_data("provision", "known_issues.json")
    except OSError:
        raw = None
    if raw is None:
        raise ConfigError("no failure catalog: provision/known_issues.json is not shipped")
    try:
        return json.loads(raw.decode("utf-8")), "provision/known_issues.json"
    except ValueError as exc:
        raise ConfigError(f"invalid JSON: {exc}", file="provision/known_issues.json") from exc


def _read(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the failure catalog: {exc.strerror}", file=path) from exc
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML: {exc}", file=path) from exc
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"invalid JSON: {exc}", file=path) from exc


def _entries(data: Any, origin: str) -> list[Entry]:
    if not isinstance(data, dict) or not isinstance(data.get("issues"), list):
        raise ConfigError("expected a mapping with an 'issues' list", file=origin)
    entries = [_entry(raw, i, origin) for i, raw in enumerate(data["issues"])]
    ids = [e.id for e in entries]
    for e in entries:
        if ids.count(e.id) > 1:
            raise ConfigError(f"issue '{e.id}' is defined twice", file=origin)
        for sid in e.supersedes:
            if sid not in ids or sid == e.id:
                raise ConfigError(f"issue '{e.id}' supersedes unknown issue '{sid}'", file=origin)
    return entries


def _entry(raw: Any, index: int, origin: str) -> Entry:
    where = f"issue #{index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping", file=origin)
    if isinstance(raw.get("id"), str):
        where = f"issue '{raw['id']}'"
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'", file=origin)
    for key in _REQUIRED:
        if not raw.get(key):
            raise ConfigError(f"{where}: '{key}' is required", file=origin)
    for key in ("id", "title", "diagnosis", "fix"):
        if not isinstance(raw[key], str):
            raise ConfigError(f"{where}: '{key}' must be a string", file=origin)
    if not _ID.match(raw["id"]):
        raise ConfigError(f"{where}: id must match [a-z0-9][a-z0-9-]*", file=origin)
    patterns = raw["patterns"]
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"{where}: 'patterns' must be a list of regexes", file=origin)
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise ConfigError(f"{where}: bad regex {p!r}: {exc}", file=origin) from exc
    remediation = raw.get("remediation")
    if remediation is not None and remediation not in REMEDIATIONS:
        known = ", ".join(sorted(REMEDIATIONS))
        raise ConfigError(
            f"{where}: unknown remediation '{remediation}' (known: {known})", file=origin
        )
    supersedes = raw.get("supersedes", [])
    if not isinstance(supersedes, list) or not all(isinstance(s, str) for s in supersedes):
        raise ConfigError(f"{where}: 'supersedes' must be a list of ids", file=origin)
    for flag in ("fallback", "transient"):
        if not isinstance(raw.get(flag, False), bool):
            raise ConfigError(f"{where}: '{flag}' must be true or false", file=origin)
    return Entry(
        id=raw["id"],
        title=raw["title"],
        patterns=tuple(patterns),
        diagnosis=raw["diagnosis"].strip(),
        fix=raw["fix"].strip(),
        remediation=remediation,
        supersedes=tuple(supersedes),
        fallback=raw.get("fallback", False),
        transient=raw.get("transient", False),
        source=str(raw.get("source", "")),
    )
