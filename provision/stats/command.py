"""What `bootstrap stats`, `bootstrap sample-data` and the `dataset_stats` step call.

`stats_command` finds the dataset's format, picks the action and state keys (failing early, from
the metadata alone, when a key is missing or has the wrong number of dims), streams the episodes,
computes exact statistics, checks them, and writes the chosen schema atomically. Every problem a
user can cause raises `DatasetError` (a `ConfigError`) with one line and, often, a hint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provision.errors import ConfigError
from provision.stats import compute, formats, jsonfile, samples
from provision.stats.errors import DatasetError
from provision.stats.lerobot import SPLIT_FILE, LeRobotReader
from provision.stats.rlds import RldsReader, version_dirs

FORMATS = ("auto", "rlds", "lerobot")
#: Keys tried when none is named: the runbook's RLDS keys; LeRobot's and openpi's column names.
RLDS_DEFAULTS = {"action": ("action",), "state": ("observation/state",)}
LEROBOT_DEFAULTS = {"action": ("action", "actions"), "state": ("observation.state", "state")}


def stats_command(
    path: str,
    fmt: str = "auto",
    schema: str = "ae",
    output: str | None = None,
    action_key: str | None = None,
    state_key: str | None = None,
    expect: Mapping[str, int] | None = None,
    *,
    split: str = "train",
    split_file: str | None = None,
    episodes: Sequence[int] | None = None,
    action_horizon: int | None = None,
    dataset_name: str | None = None,
    expect_samples: int | None = None,
    expect_episodes: int | None = None,
    progress: Callable[..., None] | None = None,
) -> dict[str, Any]:
    """Compute statistics of the dataset at `path`; write them to `output` when given.

    Returns a summary: format, dataset, keys, dims, counts, warnings, seconds, the input
    files read, and the `document` (what the file holds).
    """
    started = time.monotonic()
    _check_choices(fmt, schema, expect, action_horizon)
    root = Path(path).expanduser()
    if not root.exists():
        raise DatasetError(f"{root} does not exist")
    kind = _detect(root) if fmt == "auto" else fmt
    if kind == "rlds":
        if split_file is not None or episodes is not None:
            raise ConfigError("split_file and episodes apply to LeRobot datasets only")
        source = _open_rlds(root, split, action_key, state_key, progress)
    else:
        source = _open_lerobot(root, split, split_file, episodes, action_key, state_key, progress)
    _check_dims(source.fields, source.keys, expect, schema)
    result = compute.compute(compute.gather(source.episodes, source.keys, action_horizon))
    _check_counts(result, expect_samples, expect_episodes)
    name = dataset_name or source.name
    doc = formats.render(
        schema,
        result.stats,
        dataset_name=name,
        num_samples=result.num_steps,
        num_episodes=result.num_episodes,
    )
    if output:
        jsonfile.write_atomic(Path(output).expanduser(), doc)
    return {
        "path": str(source.where),
        "format": kind,
        "dataset": name,
        "schema": schema,
        "output": str(Path(output).expanduser()) if output else None,
        "keys": result.keys,
        "dims": {role: s.dims for role, s in result.stats.items()},
        "num_samples": result.num_steps,
        "num_episodes": result.num_episodes,
        "empty_episodes": result.empty_episodes,
        "episodes_from": source.selection,
        "warnings": source.warnings + result.warnings,
        "seconds": round(time.monotonic() - started, 3),
        "inputs": [str(p) for p in source.inputs],
        "document": doc,
    }


@dataclass
class _Source:
    """An opened dataset: chosen keys, the episode stream, and what to report about it."""

    name: str
    where: Path
    fields: dict[str, int]
    keys: dict[str, str]
    episodes: Iterator[tuple[int, dict[str, Any]]]
    inputs: list[Path]
    selection: str
    warnings: list[str] = field(default_factory=list)


def _open_rlds(
    root: Path,
    split: str,
    action_key: str | None,
    state_key: str | None,
    progress: Callable[..., None] | None,
) -> _Source:
    reader = RldsReader(root, split)
    keys = {
        "action": reader.resolve(action_key or RLDS_DEFAULTS["action"][0]),
        "state": reader.resolve(state_key or RLDS_DEFAULTS["state"][0]),
    }
    return _Source(
        name=reader.name,
        where=reader.version_dir,
        fields=reader.numeric_fields(),
        keys=keys,
        episodes=reader.episodes(list(dict.fromkeys(keys.values())), progress),
        inputs=reader.input_files(),
        selection=f"split '{split}'",
    )


def _open_lerobot(
    root: Path,
    split: str,
    split_file: str | None,
    episodes: Sequence[int] | None,
    action_key: str | None,
    state_key: str | None,
    progress: Callable[..., None] | None,
) -> _Source:
    reader = LeRobotReader(root)
    keys = {
        "action": reader.resolve(action_key, LEROBOT_DEFAULTS["action"]),
        "state": reader.resolve(state_key, LEROBOT_DEFAULTS["state"]),
    }
    split_path = Path(split_file).expanduser() if split_file else None
    chosen, selection = reader.select(split, split_path, episodes)
    return _Source(
        name=reader.name,
        where=root,
        fields=reader.numeric_fields(),
        keys=keys,
        episodes=reader.episodes(list(dict.fromkeys(keys.values())), chosen, progress),
        inputs=reader.input_files(chosen) + ([split_path] if split_path else []),
        selection=selection,
        warnings=_split_warnings(root, split_file, episodes, selection, len(chosen)),
    )


def describe_result(result: Mapping[str, Any]) -> list[str]:
    """Lines summarising a `stats_command` result, for a terminal or a step log."""
    names = formats.ROLE_NAMES[result["schema"]]
    lines = [
        f"{result['format']} dataset {result['dataset']} at {result['path']} "
        f"({result['episodes_from']}): {result['num_samples']} samples, "
        f"{result['num_episodes']} episodes, {result['seconds']} s",
    ]
    for role in ("action", "state"):
        lines.append(f"  {names[role]}: '{result['keys'][role]}', {result['dims'][role]} dims")
    if result["output"]:
        lines.append(f"  written to {result['output']} ({result['schema']} format)")
    lines += [f"  warning: {w}" for w in result["warnings"]]
    return lines


def sample_data_command(
    output: str,
    preset: str = "libero_object",
    *,
    episodes: int | None = None,
    steps: int | None = None,
    shards: int | None = None,
    image_bytes: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a generated dataset in a preset's layout (see `provision.stats.samples`)."""
    if preset not in samples.PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; presets: {', '.join(samples.PRESETS)}")
    lerobot = preset.startswith("lerobot")
    if lerobot and shards is not None:
        raise ConfigError("shards applies to RLDS presets only")
    for label, value in (("episodes", episodes), ("steps", steps), ("shards", shards)):
        if value is not None and value < 1:
            raise ConfigError(f"{label} must be at least 1")
    if image_bytes is not None and image_bytes < 0:
        raise ConfigError("image_bytes must be >= 0")
    overrides: dict[str, Any] = {"seed": seed}
    for label, value in (
        ("episodes", episodes),
        ("frames" if lerobot else "steps", steps),
        ("shards", shards),
        ("image_bytes", image_bytes),
    ):
        if value is not None:
            overrides[label] = value
    if lerobot and episodes is not None:
        test = samples.LeRobotSample().test_episodes
        overrides["test_episodes"] = min(test, max(episodes - 1, 0))
    if shards is not None and shards > (episodes or 454):
        raise ConfigError("more shards than episodes")
    return samples.write_preset(Path(output).expanduser(), preset, overrides)


def _check_choices(
    fmt: str, schema: str, expect: Mapping[str, int] | None, action_horizon: int | None
) -> None:
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if schema not in formats.SCHEMAS:
        raise ConfigError(f"schema must be one of {', '.join(formats.SCHEMAS)}, got '{schema}'")
    for name, dims in (expect or {}).items():
        formats.role_of(name)
        if not isinstance(dims, int) or dims < 1:
            raise ConfigError(f"expect.{name} must be a positive number of dims")
    if action_horizon is not None and action_horizon < 1:
        raise ConfigError("action_horizon must be at least 1")


def _detect(root: Path) -> str:
    if (root / "meta" / "info.json").is_file():
        return "lerobot"
    if version_dirs(root):
        return "rlds"
    raise DatasetError(
        f"{root} is neither an RLDS/TFDS dataset (features.json) nor a LeRobot one (meta/info.json)"
    )


def _split_warnings(
    root: Path, split_file: str | None, episodes: Sequence[int] | None, source: str, count: int
) -> list[str]:
    if split_file is None and episodes is None and (root / SPLIT_FILE).is_file():
        return [
            f"{root / SPLIT_FILE} exists but is not used: statistics cover {count} episodes "
            f"({source}); set split_file to compute them from the training split only"
        ]
    return []


def _check_dims(
    fields: Mapping[str, int],
    keys: Mapping[str, str],
    expect: Mapping[str, int] | None,
    schema: str,
) -> None:
    """Compare the chosen keys' dims with `expect`, before any data is read."""
    for name, want in (expect or {}).items():
        role = formats.role_of(name)
        key = keys[role]
        if fields[key] == want:
            continue
        fitting = [k for k, n in fields.items() if n == want and k not in keys.values()]
        label = formats.ROLE_NAMES[schema][role]
        hint = (
            f"'{fitting[0]}' has {want} dims: set keys: {{{role}: {fitting[0]}}}"
            if fitting
            else "statistics of another dataset or robot? (RUNBOOK D)"
        )
        raise DatasetError(f"{label} '{key}' has {fields[key]} dims, expected {want}", hint)


def _check_counts(result: compute.DatasetStats, samples_: int | None, episodes: int | None) -> None:
    problems = formats.mismatches(
        formats.Summary(
            dims={r: s.dims for r, s in result.stats.items()},
            samples=result.num_steps,
            episodes=result.num_episodes,
        ),
        samples=samples_,
        episodes=episodes,
    )
    if problems:
        raise DatasetError(
            "; ".join(problems), "a different or partly copied dataset: check the path and copy"
        )
