"""LeRobot datasets (v2.x and v3.0) read column by column with pyarrow.

v2.x: `meta/info.json`, `meta/episodes.jsonl`, `meta/tasks.jsonl` and one parquet file per
episode at `data/chunk-000/episode_000000.parquet`. v3.0: many episodes per file
(`data/chunk-000/file-000.parquet`) indexed by `meta/episodes/chunk-000/file-000.parquet`.
Vector features are list columns (`observation.state`, `action`; `state`/`actions` in openpi's
own conversions). Only the requested columns are read: images and videos are never decoded.

Which episodes count: an explicit list, a split file (`{"train": [0, 1, ...], "test": [...]}`),
or the `splits` ranges of info.json (`{"train": "0:34"}`), in that order.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from provision.stats import jsonfile
from provision.stats.errors import DatasetError

_NUMERIC = {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"}
_LISTED = 4
#: Files read at once: pyarrow releases the GIL while decoding, so threads overlap I/O and work.
_READERS = min(8, os.cpu_count() or 1)
#: A split file at the dataset root that seed 004's conversion writes.
SPLIT_FILE = "split_info.json"


class LeRobotReader:
    """A LeRobot dataset root (the dir holding `meta/info.json`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        info_path = root / "meta" / "info.json"
        self.info = jsonfile.load(info_path)
        self.version = str(self.info.get("codebase_version", ""))
        if not self.version.startswith(("v2", "v3")):
            raise DatasetError(
                f"{info_path}: codebase_version {self.version or '(none)'} is not v2.x or v3.0"
            )
        self.name = root.name
        self.features: dict[str, Any] = self.info.get("features", {})
        #: episode index -> (data file holding it, length the metadata records or None)
        self.index = self._episode_index()

    def input_files(self, selected: Sequence[int]) -> list[Path]:
        """Every file statistics over the `selected` episodes depend on."""
        meta = self.root / "meta"
        index = sorted((meta / "episodes").glob("*/*.parquet")) or [meta / "episodes.jsonl"]
        data = dict.fromkeys(self.index[e][0] for e in sorted(selected))
        return [meta / "info.json", *index, *data]

    def numeric_fields(self) -> dict[str, int]:
        """Columns holding fixed-size numbers and their dims, from info.json."""
        return {
            name: math.prod(spec.get("shape") or [1])
            for name, spec in self.features.items()
            if spec.get("dtype") in _NUMERIC
        }

    def resolve(self, key: str | None, defaults: Sequence[str]) -> str:
        """The column for `key`, or the first of `defaults` present; a clear error otherwise."""
        numeric = self.numeric_fields()
        names = [key] if key else list(defaults)
        for name in names:
            if name in numeric:
                return name
        wanted = " or ".join(f"'{n}'" for n in names)
        others = sorted(
            (
                n
                for n in numeric
                if n not in ("timestamp", "frame_index", "episode_index", "index", "task_index")
            ),
            key=lambda n: (-difflib.SequenceMatcher(None, names[0], n).ratio(), n),
        )
        found = ", ".join(f"'{n}' ({numeric[n]} dims)" for n in others[:_LISTED]) or "nothing"
        raise DatasetError(
            f"no {wanted} column in {self.root}/meta/info.json; found {found}",
            "name the right columns in keys: {action: ..., state: ...}",
        )

    def select(
        self,
        split: str = "train",
        split_file: Path | None = None,
        episodes: Sequence[int] | None = None,
    ) -> tuple[list[int], str]:
        """Episode indices to use, and a phrase saying where the choice came from."""
        known = sorted(self.index)
        if episodes is not None:
            chosen, source = sorted(set(episodes)), "the episode list"
        elif split_file is not None:
            chosen, source = load_split_file(split_file, split), f"'{split}' of {split_file}"
        else:
            ranges = self.info.get("splits") or {}
            if split not in ranges:
                if ranges or split != "train":
                    raise DatasetError(
                        f"split '{split}' is not in {self.root}/meta/info.json "
                        f"(it has {', '.join(sorted(ranges)) or 'none'})",
                        f"give a split file ({SPLIT_FILE}) or an episode list",
                    )
                return known, "all episodes"
            chosen, source = _parse_range(ranges[split], split), f"info.json split '{split}'"
        unknown = sorted(set(chosen) - set(known))
        if unknown:
            shown = ", ".join(map(str, unknown[:5]))
            raise DatasetError(
                f"{source} names episodes the dataset lacks: {shown}"
                + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
                + f" (it has {len(known)})"
            )
        return chosen, source

    def episodes(
        self,
        columns: Sequence[str],
        selected: Sequence[int],
        progress: Callable[..., None] | None = None,
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(episode index, {column: (T, dims) array}) for the selected episodes, file by file."""
        wanted = set(selected)
        files = list(dict.fromkeys(self.index[e][0] for e in sorted(wanted)))
        absent = [p for p in files if not p.is_file()]
        if absent:
            raise DatasetError(
                f"{len(absent)} data files are missing, e.g. {absent[0]}",
                "an interrupted download: copy the dataset again",
            )
        dims = {c: self.numeric_fields()[c] for c in columns}
        read_columns = [*columns, "episode_index"]

        def read(path: Path) -> pa.Table:
            try:  # ParquetFile.read: a fraction of read_table's per-file overhead
                return pq.ParquetFile(path).read(columns=read_columns, use_threads=False)
            except (OSError, pa.ArrowException) as exc:
                raise DatasetError(f"cannot read {path}: {exc}") from None

        rows = 0
        seen: set[int] = set()
        with ThreadPoolExecutor(_READERS) as pool:
            for done, table in enumerate(pool.map(read, files), 1):
                path = files[done - 1]
                for index, arrays in self._split_table(path, table, dims, wanted):
                    if index in seen:
                        raise DatasetError(f"{path}: episode {index} appears twice in the data")
                    seen.add(index)
                    rows += len(next(iter(arrays.values())))
                    yield index, arrays
                if progress:
                    progress(
                        files_done=done,
                        files_total=len(files),
                        done=rows,
                        unit="rows",
                        message=path.name,
                    )
        absent_episodes = sorted(wanted - seen)
        if absent_episodes:
            raise DatasetError(
                f"episode {absent_episodes[0]} is in {self.root}/meta but has no rows in "
                f"{self.index[absent_episodes[0]][0]}"
                + (f" ({len(absent_episodes)} such episodes)" if len(absent_episodes) > 1 else ""),
                "the data and meta/ disagree: copy the dataset again",
            )

    def _split_table(
        self, path: Path, table: pa.Table, dims: dict[str, int], wanted: set[int]
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Cut one file's rows into episodes (contiguous runs of episode_index)."""
        arrays = {
            c: _column_rows(table.column(c), n, f"{path}: column '{c}'") for c, n in dims.items()
        }
        owners = table.column("episode_index").to_numpy()
        bounds = [0, *(np.flatnonzero(np.diff(owners)) + 1).tolist(), len(owners)]
        for start, end in ((bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)):
            index = int(owners[start])
            if index in wanted:
                expected = self.index.get(index, (None, None))[1]
                if expected is not None and end - start != expected:
                    raise DatasetError(
                        f"{path}: episode {index} has {end - start} rows; the metadata says "
                        f"{expected}",
                        "the data and meta/ disagree: copy the dataset again",
                    )
                yield index, {c: a[start:end] for c, a in arrays.items()}

    def _episode_index(self) -> dict[int, tuple[Path, int | None]]:
        template = self.info.get("data_path")
        if not template:
            raise DatasetError(f"{self.root}/meta/info.json has no data_path")
        meta = self.root / "meta"
        if self.version.startswith("v3"):
            columns = ["episode_index", "length", "data/chunk_index", "data/file_index"]
            tables = [
                pq.read_table(p, columns=columns)
                for p in sorted((meta / "episodes").glob("*/*.parquet"))
            ]
            if not tables:
                raise DatasetError(f"{meta}/episodes holds no parquet files")
            return {
                int(row["episode_index"]): (
                    self.root
                    / template.format(
                        chunk_index=row["data/chunk_index"], file_index=row["data/file_index"]
                    ),
                    int(row["length"]),
                )
                for row in pa.concat_tables(tables).to_pylist()
            }
        chunk_size = int(self.info.get("chunks_size") or 1000)
        path = meta / "episodes.jsonl"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from None
        out: dict[int, tuple[Path, int | None]] = {}
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                index = int(entry["episode_index"])
                length = entry.get("length")
            except (ValueError, KeyError, TypeError):
                raise DatasetError(f"{path}:{number}: not an episode entry") from None
            data = template.format(episode_chunk=index // chunk_size, episode_index=index)
            out[index] = (self.root / data, length)
        return out


def load_split_file(path: Path, split: str) -> list[int]:
    """Episode indices of `split` in a split file: a list, or {split: [...]} and variants."""
    data = jsonfile.load(path, allow_list=True)
    if isinstance(data, list):
        return _indices(data, path)
    for key in (split, f"{split}_episodes", f"{split}_episode_indices"):
        value = data.get(key)
        if isinstance(value, dict):
            value = value.get("episodes", value.get("episode_indices"))
        if value is not None:
            return _indices(value, path)
    raise DatasetError(
        f"{path} has no '{split}' episode list (its keys: {', '.join(map(str, data)) or 'none'})"
    )


def _indices(value: Any, path: Path) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise DatasetError(f"{path}: episode lists must hold integers")
    return sorted(set(value))


def _parse_range(text: str, split: str) -> list[int]:
    try:
        start, end = (int(part) for part in str(text).split(":"))
    except ValueError:
        raise DatasetError(f"split '{split}' in info.json is {text!r}, not 'start:end'") from None
    return list(range(start, end))


def _column_rows(column: pa.ChunkedArray, dims: int, where: str) -> np.ndarray:
    """A list (or scalar) column as a (rows, dims) numpy array."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        raise DatasetError(f"{where} has {array.null_count} null rows")
    kind = array.type
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        if not pa.types.is_fixed_size_list(kind) and len(array):
            sizes = np.diff(np.asarray(array.offsets))
            if (sizes != dims).any():
                raise DatasetError(
                    f"{where}: rows have {int(sizes[sizes != dims][0])} values; info.json says "
                    f"{dims}"
                )
        values = array.flatten()
        if values.null_count:
            raise DatasetError(f"{where} has null values")
        flat: np.ndarray = values.to_numpy(zero_copy_only=False)
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        flat = array.to_numpy(zero_copy_only=False)
    else:
        raise DatasetError(f"{where} has type {kind}, not numbers")
    if flat.size != len(array) * dims:
        raise DatasetError(f"{where}: {flat.size} values for {len(array)} rows of {dims} dims")
    return flat.reshape(len(array), dims)
