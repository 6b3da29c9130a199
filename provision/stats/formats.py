"""The three statistics files training code reads, and how to read one back.

- `ae` (the runbook's action-expert file, seed 003 §9.2):
  `{dataset_name: {"action": S, "proprio": S, "num_samples": N}}`
- `vlm` (its waypoint VLM file, §9.3):
  `{"action": S, "proprio": S, "num_transitions": N, "num_trajectories": E}`
- `openpi` (`assets/<config>/<repo_id>/norm_stats.json`):
  `{"norm_stats": {"state": S4, "actions": S4}}` — the key is `actions`, plural: openpi ignores a
  file keyed `action` and trains unnormalised.

S = mean, std, q01, q99, min, max (lists, one value per dimension); S4 = mean, std, q01, q99, as
openpi's NormStats serialises them. This module is standard-library only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from provision.stats.errors import DatasetError

SCHEMAS = ("ae", "vlm", "openpi")
STAT_NAMES: tuple[str, ...] = ("mean", "std", "q01", "q99", "min", "max")
OPENPI_STAT_NAMES: tuple[str, ...] = ("mean", "std", "q01", "q99")
#: Names the roles ("action", "state") take in each schema's file.
ROLE_NAMES = {
    "ae": {"action": "action", "state": "proprio"},
    "vlm": {"action": "action", "state": "proprio"},
    "openpi": {"action": "actions", "state": "state"},
}
#: Names accepted for each role in `expect:` and `keys:` mappings.
ALIASES = {"action": "action", "actions": "action", "proprio": "state", "state": "state"}


def role_of(name: str) -> str:
    """The role ("action" or "state") an expectation or key name refers to."""
    try:
        return ALIASES[name]
    except KeyError:
        raise DatasetError(f"unknown name '{name}': use one of {', '.join(ALIASES)}") from None


def render(
    schema: str,
    stats: Mapping[str, Any],
    *,
    dataset_name: str,
    num_samples: int,
    num_episodes: int,
) -> dict[str, Any]:
    """The document for `schema`; `stats` maps role -> object with `as_lists(names)`."""
    names = ROLE_NAMES[schema]
    if schema == "openpi":
        return {
            "norm_stats": {
                names["state"]: stats["state"].as_lists(OPENPI_STAT_NAMES),
                names["action"]: stats["action"].as_lists(OPENPI_STAT_NAMES),
            }
        }
    body = {
        names["action"]: stats["action"].as_lists(STAT_NAMES),
        names["state"]: stats["state"].as_lists(STAT_NAMES),
    }
    if schema == "ae":
        return {dataset_name: {**body, "num_samples": num_samples}}
    return {**body, "num_transitions": num_samples, "num_trajectories": num_episodes}


@dataclass(frozen=True)
class Summary:
    """What a statistics file says: dims per role, and the counts it records (None if none)."""

    dims: dict[str, int]
    samples: int | None
    episodes: int | None
    dataset_name: str | None = None


def read_document(schema: str, doc: Any) -> Summary:
    """Validate a document's structure for `schema`; DatasetError naming what is wrong."""
    names = ROLE_NAMES[schema]
    if not isinstance(doc, dict):
        raise DatasetError("the statistics file does not hold a JSON object")
    dataset_name = None
    if schema == "openpi":
        body = doc.get("norm_stats")
        if not isinstance(body, dict):
            raise DatasetError("no 'norm_stats' object (openpi would not find the statistics)")
        if "action" in body and "actions" not in body:
            raise DatasetError("'norm_stats' has 'action', not 'actions': openpi ignores it")
        wanted, samples_key, episodes_key = OPENPI_STAT_NAMES, None, None
    elif schema == "ae":
        if len(doc) != 1:
            raise DatasetError(f"expected one dataset name at the top, found {len(doc)} keys")
        dataset_name, body = next(iter(doc.items()))
        wanted, samples_key, episodes_key = STAT_NAMES, "num_samples", None
    else:
        body = doc
        wanted, samples_key, episodes_key = STAT_NAMES, "num_transitions", "num_trajectories"
    if not isinstance(body, dict):
        raise DatasetError("the statistics are not a JSON object")
    dims = {role: _stat_dims(body, names[role], wanted) for role in ("action", "state")}
    return Summary(
        dims=dims,
        samples=_count(body, samples_key),
        episodes=_count(body, episodes_key),
        dataset_name=dataset_name,
    )


def _stat_dims(body: Mapping[str, Any], name: str, wanted: tuple[str, ...]) -> int:
    entry = body.get(name)
    if not isinstance(entry, dict):
        raise DatasetError(f"no '{name}' statistics")
    sizes = set()
    for stat in wanted:
        values = entry.get(stat)
        if not isinstance(values, list) or not values:
            raise DatasetError(f"'{name}' has no '{stat}' list")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise DatasetError(f"'{name}.{stat}' holds a value that is not a finite number")
        sizes.add(len(values))
    if len(sizes) > 1:
        raise DatasetError(f"'{name}' lists have different lengths {sorted(sizes)}")
    return sizes.pop()


def _count(body: Mapping[str, Any], key: str | None) -> int | None:
    if key is None:
        return None
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DatasetError(f"no '{key}' count")
    return value


def mismatches(
    summary: Summary,
    expect: Mapping[str, int] | None = None,
    samples: int | None = None,
    episodes: int | None = None,
) -> list[str]:
    """How the summary differs from the expectations, one phrase each."""
    out = []
    for name, dims in (expect or {}).items():
        role = role_of(name)
        if summary.dims[role] != dims:
            out.append(f"{name} has {summary.dims[role]} dims, expected {dims}")
    if samples is not None and summary.samples is not None and summary.samples != samples:
        out.append(f"{summary.samples} samples, expected {samples}")
    if episodes is not None and summary.episodes is not None and summary.episodes != episodes:
        out.append(f"{summary.episodes} episodes, expected {episodes}")
    return out
