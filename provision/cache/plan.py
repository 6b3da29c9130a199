"""The cache in a playbook and a plan: checking what is written, and giving each cached step
of a plan what its `agent exec` needs to key, restore and save it.

```yaml
cache: {remote: "{{ cache_remote }}", max_size_gb: 30}   # top level; or the var cache_remote
steps:
  - id: uv-sync
    outputs: ["{{ repo }}/.venv"]          # what the step makes (absolute or ~ paths)
    cache:                                 # or `cache: true` (no facts, no inputs)
      facts: [python, glibc, arch]         # box facts its outputs depend on
      inputs: ["{{ repo }}/uv.lock"]       # files whose content its outputs depend on
      with: [tf, patch]                    # later steps saved and restored as one unit
      max_size_gb: 20
```

A step in a unit (`with`) must depend on the cached step, may need only the unit and what the
cached step itself depends on (the key must be known before the cached step runs), and is not
cached itself. A step given secrets cannot be cached (its outputs may hold them), nor a step
whose params hold a secret (a template). With no remote (the default), nothing is cached and
the plan carries no `cache`. Standard library only: also imported on the box.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import Any

from provision import dag
from provision.cache.key import FACTS
from provision.errors import ConfigError
from provision.steps.base import ParamError, check_keys

STEP_CACHE_KEYS = ("facts", "inputs", "with", "max_size_gb")
PLAYBOOK_CACHE_KEYS = ("remote", "max_size_gb", "rclone_config")
#: The var that sets the remote when the playbook's `cache:` does not.
REMOTE_VAR = "cache_remote"
SECRET_TEXT = "@@bootstrap-secret:"

Err = Callable[[str, "str | None"], ConfigError]


def _is_gb(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _templated(value: Any) -> bool:
    return isinstance(value, str) and "{{" in value


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def check_step(raw: Any, err: Err) -> None:
    """A step's `outputs` and `cache` as written (ConfigError with the key's line)."""
    outputs = raw.get("outputs")
    if outputs is not None and not (_str_list(outputs) and outputs) and not _templated(outputs):
        raise err("'outputs' must be a non-empty list of paths", "outputs")
    cache = raw.get("cache")
    if cache is None or cache is False:
        return
    if cache is not True and not hasattr(cache, "items"):
        raise err("'cache' must be true, false or a mapping (facts, inputs, with)", "cache")
    if hasattr(cache, "items"):
        try:
            check_keys(cache, STEP_CACHE_KEYS, "cache", "cache")
        except ParamError as exc:
            raise err(str(exc), "cache") from None
        facts = cache.get("facts", [])
        if not _str_list(facts) and facts != []:
            raise err("'cache.facts' must be a list of box facts", "cache")
        unknown = [f for f in facts if f not in FACTS]
        if unknown:
            raise err(
                f"unknown box fact '{unknown[0]}' in cache.facts (facts: {', '.join(FACTS)})",
                "cache",
            )
        for key in ("inputs", "with"):
            value = cache.get(key, [])
            if value != [] and not _str_list(value) and not _templated(value):
                raise err(f"'cache.{key}' must be a list of strings", "cache")
        size = cache.get("max_size_gb")
        if size is not None and not _is_gb(size) and not _templated(size):
            raise err("'cache.max_size_gb' must be a positive number", "cache")
    if outputs is None:
        raise err("a cached step must declare its 'outputs' (what is saved and restored)", "cache")
    if raw.get("secrets"):
        raise err("a step given secrets cannot be cached: its outputs may hold them", "cache")


def check_units(steps: list[Any], src: str) -> None:
    """Each `cache.with` names later steps that depend on the cached one (see the module doc)."""
    by_id = {s.id: s for s in steps}
    needs = {s.id: list(s.needs) for s in steps}
    taken: dict[str, str] = {}
    for step in steps:
        cache = step.raw.get("cache")
        members = list(cache.get("with") or []) if hasattr(cache, "get") else []
        if not members:
            continue
        line = step.raw.line_of("cache")
        before = dag.upstream(needs, [step.id])
        unit = {step.id, *members}
        fail = functools.partial(ConfigError, file=src, line=line, step=step.id)
        for member in members:
            other = by_id.get(member)
            if other is None:
                raise fail(f"cache.with names unknown step '{member}'")
            if step.id not in dag.upstream(needs, [member]) or member == step.id:
                raise fail(f"cache.with: '{member}' does not depend on '{step.id}'")
            outside = [n for n in other.needs if n not in unit and n not in before]
            if outside:
                raise fail(
                    f"cache.with: '{member}' needs '{outside[0]}', which is neither in the "
                    f"unit nor before '{step.id}' (the key must be known before it runs)"
                )
            if other.raw.get("cache"):
                raise fail(f"cache.with: '{member}' is cached itself")
            if member in taken:
                raise fail(f"cache.with: '{member}' is already cached with '{taken[member]}'")
            taken[member] = step.id


def check_playbook(value: Any, src: str, line: int) -> dict[str, Any]:
    """The playbook's top-level `cache:` mapping as written ({} when absent)."""
    if value is None:
        return {}
    if not hasattr(value, "items"):
        raise ConfigError("'cache' must be a mapping (remote, max_size_gb)", file=src, line=line)
    try:
        check_keys(value, PLAYBOOK_CACHE_KEYS, "cache", "cache", dotted=True)
    except ParamError as exc:
        bad = (exc.key or "").partition(".")[2]
        where = value.line_of(bad) if hasattr(value, "line_of") else line
        raise ConfigError(str(exc), file=src, line=where) from None
    size = value.get("max_size_gb")
    if size is not None and not _is_gb(size) and not _templated(size):
        raise ConfigError("'cache.max_size_gb' must be a positive number", file=src, line=line)
    return dict(value)


def render_paths(value: Any, what: str, src: str, step: Any) -> list[str]:
    """Rendered `outputs` / `cache.inputs`: absolute or `~` paths."""
    paths = [value] if isinstance(value, str) else value
    if not _str_list(paths):
        raise ConfigError(
            f"'{what}' must be a list of paths", file=src, line=step.raw.line_of(what), step=step.id
        )
    for path in paths:
        if not path.startswith(("/", "~")):
            raise ConfigError(
                f"'{what}' holds '{path}': paths must be absolute or start with ~ (the cache "
                "key holds the path: a venv works only where it was made)",
                file=src,
                line=step.raw.line_of("outputs" if what == "outputs" else "cache"),
                step=step.id,
            )
    return list(paths)


def step_spec(rendered: Any, step: Any, src: str) -> dict[str, Any] | None:
    """A step's rendered `cache:` as {facts, inputs, with, max_size_gb}; None when off."""
    if not rendered:
        return None
    spec = dict(rendered) if isinstance(rendered, dict) else {}
    size = spec.get("max_size_gb")
    if size is not None and not _is_gb(size):
        raise ConfigError(
            "'cache.max_size_gb' must be a positive number",
            file=src,
            line=step.raw.line_of("cache"),
            step=step.id,
        )
    return {
        "facts": sorted(spec.get("facts") or []),
        "inputs": render_paths(spec.get("inputs") or [], "cache.inputs", src, step)
        if spec.get("inputs")
        else [],
        "with": list(spec.get("with") or []),
        "max_size_gb": size,
    }


def attach(
    book_cache: dict[str, Any], context: dict[str, Any], steps: list[dict[str, Any]], src: str
) -> None:
    """Give each cached step of a plan its `cache` object, or drop `cache` when off.

    `book_cache` is the playbook's rendered `cache:`; without a remote there, the var
    `cache_remote` (inventory, host, `-e`) sets it; none of them: the cache is off.
    """
    remote = book_cache.get("remote") if "remote" in book_cache else context.get(REMOTE_VAR)
    needs = {s["id"]: list(s["needs"]) for s in steps}
    by_id = {s["id"]: s for s in steps}
    for step in steps:
        spec = step.pop("cache", None)
        if not spec or not remote:
            continue
        if SECRET_TEXT in json.dumps(step["params"]):
            raise ConfigError(
                "a step whose params hold a secret cannot be cached (its outputs would too)",
                file=src,
                line=step["line"],
                step=step["id"],
            )
        gb = spec.get("max_size_gb") or book_cache.get("max_size_gb")
        step["cache"] = {
            "remote": str(remote),
            "rclone_config": book_cache.get("rclone_config"),
            "max_bytes": int(float(gb) * 10**9) if gb else None,
            "with": spec["with"],
            "graph": {},
        }
        step["_spec"] = spec
    for step in steps:
        spec = step.pop("_spec", None)
        if spec is None:
            continue
        unit = [step["id"], *spec["with"]]
        graph = step["cache"]["graph"]
        for sid in sorted(dag.upstream(needs, unit)):
            other = by_id[sid]
            node_spec = spec if sid == step["id"] else None
            graph[sid] = {
                "fingerprint": other["fingerprint"],
                "outputs": list(other.get("outputs") or []),
                "needs": list(other["needs"]),
                "cache": None,
            }
            if node_spec is not None:
                graph[sid]["cache"] = {
                    "facts": node_spec["facts"],
                    "inputs": node_spec["inputs"],
                    "with": node_spec["with"],
                }
    # Upstream cached steps key by their own key: their node carries their spec, and the
    # graph holds their own graph too (their unit's members are hashed into their key, and a
    # member need not be upstream of this step). Until nothing changes: chains of units.
    changed = True
    while changed:
        changed = False
        for step in steps:
            if step.get("cache"):
                changed |= _merge_upstream_units(step, by_id)


def _merge_upstream_units(step: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> bool:
    """Give `step`'s key graph each upstream cached step's spec and graph; True if it grew."""
    graph = step["cache"]["graph"]
    grew = False
    for sid in list(graph):
        up = by_id[sid].get("cache")
        if not up or sid == step["id"]:
            continue
        if graph[sid]["cache"] is None:
            graph[sid]["cache"] = dict(up["graph"][sid]["cache"])
            grew = True
        for other_id, other in up["graph"].items():
            if other_id not in graph:
                graph[other_id] = {**other, "cache": other["cache"] and dict(other["cache"])}
                grew = True
    return grew
