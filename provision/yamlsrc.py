"""YAML that remembers where each value came from, for one-line errors with file:line.

Mappings load as `LineMap` (a dict with `.line` and `.key_lines`), sequences as `LineList`
(a list with `.line` and `.item_lines`). Duplicate keys are an error, not a silent overwrite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from provision.errors import ConfigError


class LineMap(dict):  # type: ignore[type-arg]
    """A mapping with the line of itself and of each key."""

    line: int = 0
    key_lines: dict[Any, int]

    def line_of(self, key: Any) -> int:
        """Line of `key`, or of the mapping when the key is absent."""
        lines: dict[Any, int] = getattr(self, "key_lines", {})
        return lines.get(key, self.line)


class LineList(list):  # type: ignore[type-arg]
    """A sequence with the line of itself and of each item."""

    line: int = 0
    item_lines: list[int]


#: libyaml's parser when PyYAML was built with it: the same nodes and marks, ~7x less CPU (a
#: playbook parses in ~5 ms instead of ~35: a no-op `up` pays it before anything else).
try:
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # PyYAML without libyaml
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]


class _Loader(_SafeLoader):
    """SafeLoader building LineMap/LineList and refusing duplicate keys."""

    source = "<yaml>"


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> LineMap:
    loader.flatten_mapping(node)
    out = LineMap()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise ConfigError(
                f"duplicate key '{key}'", file=loader.source, line=key_node.start_mark.line + 1
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    out = LineList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def load_yaml(path: Path, text: str | None = None) -> Any:
    """Parse a YAML file; a syntax error becomes a ConfigError with its line."""
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", file=str(path)) from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"not UTF-8 text (byte {exc.start})", file=str(path)) from None
    loader = _Loader(text)
    loader.source = str(path)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"invalid YAML: {problem}", file=str(path), line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=str(path)) from None
    finally:
        loader.dispose()
