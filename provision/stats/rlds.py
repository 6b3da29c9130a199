"""RLDS / TFDS datasets read without TensorFlow, guided by the dataset's own `features.json`.

A TFDS version dir (`NAME/1.0.0/`) holds `dataset_info.json` (name, splits, episodes per shard),
`features.json` (the feature tree) and shards `NAME-train.tfrecord-00000-of-00032`. Each record
is one episode as a `tf.train.Example` whose step fields are flattened over time:
`steps/action` holds T*7 floats, `steps/observation/state` T*8, bools are int64, images and text
are byte lists. `features.json` gives every field's per-step shape, so T and the rows follow.

Shards are read one at a time (CRCs verified), only the requested keys are decoded, and every
count the metadata promises (shards, episodes per shard) is checked against what is on disk.
"""

from __future__ import annotations

import difflib
import math
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from provision.stats import jsonfile
from provision.stats.errors import DatasetError
from provision.stats.example import ProtoError, parse_example
from provision.stats.tfrecord import read_records

_SHARD = re.compile(r"-(\d+)-of-(\d+)$")
_SEARCH_DEPTH = 3
#: How many candidate fields a missing-key message names.
_LISTED = 4


@dataclass(frozen=True)
class StepField:
    """One per-step field of the episodes, from features.json."""

    key: str  # relative to the steps sequence: "observation/state"
    kind: str  # tensor | image | text | other
    shape: tuple[int, ...]
    dtype: str
    encoding: str = "none"

    @property
    def size(self) -> int | None:
        """Values per step (1 for a scalar); None when a dimension is unknown."""
        return None if any(d < 0 for d in self.shape) else math.prod(self.shape)

    @property
    def numeric(self) -> bool:
        """Whether statistics make sense for it (a fixed-size number tensor)."""
        return self.kind == "tensor" and self.dtype != "string" and self.size is not None


def load_step_fields(features: dict[str, Any]) -> dict[str, StepField]:
    """The fields of the `steps` sequence in a features.json document, by relative key."""
    top = features.get("featuresDict", {}).get("features", {})
    sequences = {k: v for k, v in top.items() if "sequence" in v}
    if not sequences:
        return {}
    name = "steps" if "steps" in sequences else sorted(sequences)[0]
    fields: dict[str, StepField] = {}
    _walk(sequences[name]["sequence"].get("feature", {}), "", fields)
    return fields


def _walk(node: dict[str, Any], prefix: str, out: dict[str, StepField]) -> None:
    if "featuresDict" in node:
        for name, child in node["featuresDict"].get("features", {}).items():
            _walk(child, f"{prefix}{name}/", out)
        return
    key = prefix.rstrip("/")
    for kind in ("tensor", "image"):
        if kind in node:
            spec = node[kind]
            dims = tuple(int(d) for d in spec.get("shape", {}).get("dimensions", []))
            out[key] = StepField(
                key, kind, dims, spec.get("dtype", "float32"), spec.get("encoding", "none")
            )
            return
    if "text" in node:
        out[key] = StepField(key, "text", (), "string")
    elif "classLabel" in node:
        out[key] = StepField(key, "tensor", (), "int64")
    else:
        out[key] = StepField(key, "other", (), "")


def describe(field: StepField) -> str:
    """How a field reads in messages: '7 dims', 'image 256x256x3', 'text'."""
    if field.numeric:
        return f"{field.size} dims" if field.shape else "scalar"
    if field.kind == "image":
        return "image " + "x".join(map(str, field.shape))
    return field.kind


def version_dirs(path: Path) -> list[Path]:
    """TFDS version dirs (features.json + dataset_info.json) at or up to 3 levels below `path`."""
    if (path / "features.json").is_file():
        return [path]
    found: list[Path] = []
    for depth in range(1, _SEARCH_DEPTH + 1):
        found += [p.parent for p in path.glob("/".join(["*"] * depth) + "/features.json")]
    return sorted(p for p in found if (p / "dataset_info.json").is_file())


def find_version_dir(path: Path) -> Path:
    """The one TFDS version dir at or below `path`, e.g. `name/1.0.0`."""
    found = version_dirs(path)
    if not found:
        raise DatasetError(
            f"no RLDS/TFDS dataset at {path}: no features.json + dataset_info.json within "
            f"{_SEARCH_DEPTH} levels",
            "point at the version dir (NAME/1.0.0) of a downloaded dataset",
        )
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(path)) for p in found)
        raise DatasetError(f"several RLDS datasets under {path}: {names}", "pick one of them")
    return found[0]


class RldsReader:
    """One split of one RLDS dataset."""

    def __init__(self, path: Path, split: str = "train") -> None:
        self.version_dir = find_version_dir(path)
        self.info = jsonfile.load(self.version_dir / "dataset_info.json")
        features_path = self.version_dir / "features.json"
        self.features_path = features_path
        self.fields = load_step_fields(jsonfile.load(features_path))
        if not self.fields:
            raise DatasetError(f"{features_path} declares no steps sequence (not RLDS?)")
        self.name = str(self.info.get("name") or self.version_dir.parent.name)
        self.split = split
        self.shards, self.shard_lengths = self._find_shards()

    def input_files(self) -> list[Path]:
        """Every file the statistics depend on."""
        return [self.version_dir / "dataset_info.json", self.features_path, *self.shards]

    def numeric_fields(self) -> dict[str, int]:
        """Keys of the fixed-size number fields and their dims."""
        return {k: f.size for k, f in self.fields.items() if f.numeric and f.size is not None}

    def resolve(self, key: str) -> str:
        """The step key for `key` ('action' or 'steps/action'); a clear error when absent."""
        rel = key[len("steps/") :] if key.startswith("steps/") else key
        field = self.fields.get(rel)
        if field is None:
            raise DatasetError(
                f"no '{rel}' in {self.features_path}; found {_listing(rel, self.fields)}",
                "name the right field in keys: {action: ..., state: ...}",
            )
        if not field.numeric:
            raise DatasetError(f"'{rel}' in {self.features_path} is {describe(field)}, not numbers")
        return rel

    def episodes(
        self, keys: Sequence[str], progress: Callable[..., None] | None = None
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(episode index, {key: (T, dims) array}) for every episode, shard by shard."""
        wanted = {f"steps/{k}": self.fields[k] for k in keys}
        index = 0
        steps = 0
        for number, shard in enumerate(self.shards):
            records = read_records(shard)
            expected = self.shard_lengths[number] if self.shard_lengths else None
            if expected is not None and expected != len(records):
                raise DatasetError(
                    f"{shard} holds {len(records)} episodes; dataset_info.json lists {expected} "
                    "for it",
                    "the shard was not fully copied or belongs to another version: copy it again",
                )
            for position, record in enumerate(records):
                arrays = self._decode(record, wanted, f"{shard}: record {position}")
                steps += len(next(iter(arrays.values()))) if arrays else 0
                yield index, arrays
                index += 1
            del records  # before the next shard is read: one shard in memory at a time
            if progress:
                progress(
                    files_done=number + 1,
                    files_total=len(self.shards),
                    done=steps,
                    unit="steps",
                    message=shard.name,
                )

    def _decode(
        self, record: bytes, wanted: dict[str, StepField], where: str
    ) -> dict[str, np.ndarray]:
        try:
            values = parse_example(record, wanted)
        except ProtoError as exc:
            raise DatasetError(f"{where}: not a tf.train.Example ({exc})") from None
        out: dict[str, np.ndarray] = {}
        for example_key, field in wanted.items():
            if example_key not in values:
                raise DatasetError(f"{where} has no '{example_key}' feature")
            out[field.key] = _rows(field, values[example_key], where)
        lengths = {k: len(v) for k, v in out.items()}
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"'{k}' {n}" for k, n in lengths.items())
            raise DatasetError(f"{where}: step counts differ between fields ({detail})")
        return out

    def _find_shards(self) -> tuple[list[Path], list[int] | None]:
        splits = {s.get("name"): s for s in self.info.get("splits", []) if isinstance(s, dict)}
        if splits and self.split not in splits:
            raise DatasetError(
                f"split '{self.split}' is not in {self.version_dir}/dataset_info.json "
                f"(it has {', '.join(sorted(map(str, splits)))})"
            )
        lengths = [int(n) for n in splits.get(self.split, {}).get("shardLengths", [])] or None
        shards: dict[int, Path] = {}
        totals: set[int] = set()
        for path in self.version_dir.glob(f"*-{self.split}.tfrecord-*-of-*"):
            match = _SHARD.search(path.name)
            if match:
                shards[int(match.group(1))] = path
                totals.add(int(match.group(2)))
        if not shards:
            raise DatasetError(
                f"no '{self.split}' shards (*-{self.split}.tfrecord-*) in {self.version_dir}"
            )
        if len(totals) > 1:
            raise DatasetError(
                f"{self.version_dir}: shard names disagree on the shard count "
                f"({', '.join(map(str, sorted(totals)))})"
            )
        total = totals.pop()
        if lengths is not None and len(lengths) != total:
            raise DatasetError(
                f"{self.version_dir}: shards say {total} files, dataset_info.json lists "
                f"{len(lengths)}"
            )
        missing = [i for i in range(total) if i not in shards]
        if missing:
            shown = ", ".join(f"{i:05d}" for i in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DatasetError(
                f"{self.version_dir}: missing shards {shown}{more} of {total:05d}",
                "an interrupted download: run the copy again",
            )
        return [shards[i] for i in range(total)], lengths


def _rows(field: StepField, value: Any, where: str) -> np.ndarray:
    """One field of one episode as a (T, size) array."""
    size = field.size or 1
    if field.encoding in ("bytes", "zlib"):
        if not isinstance(value, list):
            raise DatasetError(f"{where}: '{field.key}' should hold bytes ({field.encoding})")
        chunks = [zlib.decompress(v) if field.encoding == "zlib" else v for v in value]
        flat = np.frombuffer(b"".join(chunks), dtype=np.dtype(field.dtype).newbyteorder("<"))
    elif isinstance(value, np.ndarray):
        flat = value
    elif value == []:
        flat = np.zeros(0, dtype=np.float32)
    else:
        raise DatasetError(f"{where}: '{field.key}' holds bytes, features.json says numbers")
    if flat.size % size:
        raise DatasetError(
            f"{where}: '{field.key}' has {flat.size} values, not a multiple of its "
            f"{size} dims per step (features.json does not match the data)"
        )
    # a copy: a view would keep the whole record (images and all) alive until the end
    rows: np.ndarray = flat.reshape(-1, size).copy()
    return rows


def _listing(missing: str, fields: dict[str, StepField]) -> str:
    """Number fields, the most similar to `missing` first: "'a' (7 dims), 'b' (8 dims)"."""
    numeric = [k for k, f in fields.items() if f.numeric and f.dtype != "bool"]
    if not numeric:
        return "no numeric step fields"
    numeric.sort(key=lambda k: (-difflib.SequenceMatcher(None, missing, k).ratio(), k))
    return ", ".join(f"'{k}' ({describe(fields[k])})" for k in numeric[:_LISTED])
