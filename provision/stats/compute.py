"""Exact per-dimension statistics of actions and states, with the checks that catch bad inputs.

Rows of the two sampled keys are gathered episode by episode (a few MB even for large sets:
67k steps x 15 floats), then summarised exactly: mean and population std accumulated in float64,
min/max, and q01/q99 by `np.percentile(rows, 1 | 99, axis=0)` on the rows as stored, which is
what the runbook's own script computes (no histograms). Optional openpi-style action chunks:
each step contributes the actions of steps t..t+H-1, clamped to the episode's last step.

Failures (DatasetError): no samples, NaN/inf values. Warnings: constant dimensions (std 0) and
near-constant ones (q99 - q01 < 1e-4), which break z-score or quantile normalisation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from provision.stats.errors import DatasetError

#: The statistics of one key, in the order the runbook's files list them.
STAT_NAMES = ("mean", "std", "q01", "q99", "min", "max")
#: Below this q99 - q01 a dimension is flagged: quantile normalisation divides by it.
MIN_QUANTILE_RANGE = 1e-4
ROLES = ("action", "state")


@dataclass(frozen=True)
class Stats:
    """Per-dimension statistics of one key (arrays of `dims` float64 values)."""

    count: int
    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray
    q99: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @property
    def dims(self) -> int:
        """Number of dimensions."""
        return len(self.mean)

    def as_lists(self, names: Iterable[str] = STAT_NAMES) -> dict[str, list[float]]:
        """The named statistics as JSON-ready lists of floats."""
        return {name: [float(v) for v in getattr(self, name)] for name in names}


def summarize(rows: np.ndarray) -> Stats:
    """Exact statistics over the rows (axis 0) of a non-empty (N, dims) array.

    Quantiles are taken one at a time with a scalar q, as the runbook's script does: numpy then
    interpolates in the rows' own dtype, so q01/q99 equal that script's values bit for bit.
    Each dimension is first made contiguous, which makes every reduction a sequential pass.
    """
    columns = np.ascontiguousarray(rows.T)
    wide = columns.astype(np.float64)
    return Stats(
        count=len(rows),
        mean=wide.mean(axis=1),
        std=wide.std(axis=1),
        min=columns.min(axis=1).astype(np.float64),
        max=columns.max(axis=1).astype(np.float64),
        # overwrite_input: `columns` is our copy; partitioning it in place spares two more
        q01=np.percentile(columns, 1, axis=1, overwrite_input=True).astype(np.float64),
        q99=np.percentile(columns, 99, axis=1, overwrite_input=True).astype(np.float64),
    )


def chunk_actions(actions: np.ndarray, horizon: int) -> np.ndarray:
    """Rows of every action chunk: step t contributes steps t..t+horizon-1, clamped at the end."""
    steps = len(actions)
    if steps == 0:
        return actions
    index = np.minimum(np.arange(steps)[:, None] + np.arange(horizon)[None, :], steps - 1)
    rows: np.ndarray = actions[index].reshape(-1, actions.shape[1])
    return rows


@dataclass
class Gathered:
    """The sampled rows of a dataset, by role ("action", "state"), and its episode layout."""

    keys: dict[str, str]
    rows: dict[str, np.ndarray]
    lengths: list[int] = field(default_factory=list)
    episodes: list[int] = field(default_factory=list)
    chunked_actions: np.ndarray | None = None


def gather(
    episodes: Iterable[tuple[int, Mapping[str, np.ndarray]]],
    keys: Mapping[str, str],
    action_horizon: int | None = None,
) -> Gathered:
    """Collect the rows of `keys` ({role: dataset key}) from (index, arrays) episodes."""
    pieces: dict[str, list[np.ndarray]] = {role: [] for role in keys}
    chunks: list[np.ndarray] = []
    out = Gathered(dict(keys), {})
    for index, arrays in episodes:
        out.episodes.append(index)
        out.lengths.append(len(arrays[keys[ROLES[0]]]))
        for role, key in keys.items():
            pieces[role].append(arrays[key])
        if action_horizon:
            chunks.append(chunk_actions(arrays[keys["action"]], action_horizon))
    for role, parts in pieces.items():
        out.rows[role] = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    if action_horizon and chunks:
        out.chunked_actions = np.concatenate(chunks)
    return out


@dataclass
class DatasetStats:
    """What the statistics files are made of."""

    stats: dict[str, Stats]
    keys: dict[str, str]
    num_steps: int
    num_episodes: int
    empty_episodes: int
    warnings: list[str]


def compute(gathered: Gathered) -> DatasetStats:
    """Check the gathered rows and summarise them; DatasetError when they cannot be used."""
    steps = sum(gathered.lengths)
    if steps == 0:
        raise DatasetError(
            f"no samples: {len(gathered.episodes)} episodes, none with a step",
            "wrong split, episode list or path?",
        )
    for role, key in gathered.keys.items():
        _check_finite(role, key, gathered.rows[role], gathered)
    stats = {}
    warnings = []
    for role, key in gathered.keys.items():
        rows = gathered.rows[role]
        if role == "action" and gathered.chunked_actions is not None:
            rows = gathered.chunked_actions
        stats[role] = summarize(rows)
        warnings += flat_dimensions(role, key, stats[role])
    empty = sum(1 for n in gathered.lengths if n == 0)
    if empty:
        warnings.append(f"{empty} of {len(gathered.lengths)} episodes have no steps")
    return DatasetStats(
        stats=stats,
        keys=dict(gathered.keys),
        num_steps=steps,
        num_episodes=len(gathered.episodes),
        empty_episodes=empty,
        warnings=warnings,
    )


def flat_dimensions(role: str, key: str, stats: Stats) -> list[str]:
    """Warnings for constant dimensions and for those with q99 - q01 below the threshold."""
    out = []
    constant = np.flatnonzero(stats.std == 0)
    if constant.size:
        values = ", ".join(f"{stats.mean[d]:g}" for d in constant)
        out.append(
            f"{role} '{key}': dims {_dims(constant)} are constant (std 0; values {values}): "
            "z-score normalisation divides by 0"
        )
    spread = stats.q99 - stats.q01
    narrow = np.flatnonzero((spread < MIN_QUANTILE_RANGE) & (stats.std != 0))
    if narrow.size:
        ranges = ", ".join(f"{spread[d]:.3g}" for d in narrow)
        out.append(
            f"{role} '{key}': dims {_dims(narrow)} have q99 - q01 < {MIN_QUANTILE_RANGE:g} "
            f"({ranges}): quantile normalisation divides by almost 0"
        )
    return out


def _check_finite(role: str, key: str, rows: np.ndarray, gathered: Gathered) -> None:
    if not np.issubdtype(rows.dtype, np.floating):
        return
    bad = ~np.isfinite(rows)
    if not bad.any():
        return
    first_row = int(np.flatnonzero(bad.any(axis=1))[0])
    starts = np.cumsum([0, *gathered.lengths])
    episode = int(np.searchsorted(starts, first_row, side="right")) - 1
    raise DatasetError(
        f"{role} '{key}' has {int(bad.sum())} NaN/inf values in dims "
        f"{_dims(np.flatnonzero(bad.any(axis=0)))}; the first in episode "
        f"{gathered.episodes[episode]}, step {first_row - int(starts[episode])}",
        "the dataset is corrupt or was converted wrongly: statistics over it are meaningless",
    )


def _dims(dims: np.ndarray) -> str:
    return ", ".join(str(int(d)) for d in dims)
