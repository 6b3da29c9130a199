"""Writers of RLDS and LeRobot datasets in their exact on-disk layouts, with known contents.

Used by the tests, by `bootstrap sample-data` (the smoke playbook) and by the benchmark. The
presets mimic the runbook's datasets: `libero_object` (RLDS, 454 episodes, 66,984 steps in 32
shards + dataset_info.json + features.json under `libero_object_no_noops/1.0.0/`), `libero_wp`
(the waypoint-filtered RLDS: 454 episodes, 8,863 steps, 4 shards, plus `waypoint_indices.json`)
and `lerobot`/`lerobot_v3` (seed 004: 34 episodes, 1,962 frames, 5-dim state and action with
two constant dims, a 31/3 train/test `split_info.json`). Every size is a parameter.

Contents are deterministic in (seed, episode index): `rlds_episodes`/`lerobot_episodes`
regenerate exactly the arrays written, so tests compare statistics against numpy on them.
Images are random bytes of a chosen size stored as image features: readers must skip them. With
`RldsSample(png=True)` they are real PNGs of the declared shape instead, which `tfds` decodes
(the runbook's own loop decodes every image). `features.json` and `dataset_info.json` are
written as TFDS writes them: sorted keys, indent 4 and 2, no final newline, empty proto3 strings
left out. Records hold each Example's features in sorted key order (protobuf's deterministic
serialization); TFDS's own map order is the C++ hash map's and cannot be reproduced.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from provision.stats import jsonfile
from provision.stats.example import encode_example
from provision.stats.tfrecord import write_records

LIBERO_TASK = "pick up the alphabet soup and place it in the basket"

# --- RLDS -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepFeature:
    """A per-step feature as features.json declares it."""

    key: str  # "observation/state"
    kind: str  # tensor | image | text
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    description: str = ""


def libero_step_features(image_shape: tuple[int, int, int] = (256, 256, 3)) -> list[StepFeature]:
    """The step features of the LIBERO RLDS conversions (modified_libero_rlds)."""
    return [
        StepFeature("action", "tensor", (7,), description="Robot EEF action."),
        StepFeature("discount", "tensor", (), description="Discount if provided, default to 1."),
        StepFeature("is_first", "tensor", (), "bool", "True on first step of the episode."),
        StepFeature("is_last", "tensor", (), "bool", "True on last step of the episode."),
        StepFeature("is_terminal", "tensor", (), "bool", "True on last step if terminal."),
        StepFeature("language_instruction", "text", (), "string", "Language Instruction."),
        StepFeature("observation/image", "image", image_shape, "uint8", "Main camera RGB."),
        StepFeature("observation/joint_state", "tensor", (7,), description="Robot joint angles."),
        StepFeature("observation/state", "tensor", (8,), description="Robot EEF state."),
        StepFeature("observation/wrist_image", "image", image_shape, "uint8", "Wrist camera."),
        StepFeature("reward", "tensor", (), description="Reward if provided, 1 on final step."),
    ]


def features_json(step_features: Sequence[StepFeature]) -> dict[str, Any]:
    """features.json as TFDS writes it for an RLDS builder (steps + episode_metadata)."""
    tree: dict[str, Any] = {}
    for feature in step_features:
        node = tree
        *parents, leaf = feature.key.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = _feature_node(feature)
    return _features_dict(
        {
            "episode_metadata": _features_dict(
                {"file_path": _text_node("Path to the original data file.")}
            ),
            "steps": {
                "pythonClassName": "tensorflow_datasets.core.features.dataset_feature.Dataset",
                "sequence": {"feature": _nest(tree), "length": "-1"},
            },
        }
    )


def _nest(tree: dict[str, Any]) -> dict[str, Any]:
    return _features_dict({k: v if "pythonClassName" in v else _nest(v) for k, v in tree.items()})


def _features_dict(features: dict[str, Any]) -> dict[str, Any]:
    return {
        "pythonClassName": "tensorflow_datasets.core.features.features_dict.FeaturesDict",
        "featuresDict": {"features": features},
    }


def _text_node(description: str) -> dict[str, Any]:
    return {
        "pythonClassName": "tensorflow_datasets.core.features.text_feature.Text",
        "text": {},
        "description": description,
    }


def _feature_node(feature: StepFeature) -> dict[str, Any]:
    if feature.kind == "text":
        return _text_node(feature.description)
    shape = {"dimensions": [str(d) for d in feature.shape]} if feature.shape else {}
    if feature.kind == "image":
        return {
            "pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
            "image": {"shape": shape, "dtype": feature.dtype, "encodingFormat": "png"},
            "description": feature.description,
        }
    scalar = "scalar.Scalar" if not feature.shape else "tensor_feature.Tensor"
    return {
        "pythonClassName": f"tensorflow_datasets.core.features.{scalar}",
        "tensor": {"shape": shape, "dtype": feature.dtype, "encoding": "none"},
        "description": feature.description,
    }


def dataset_info_json(
    name: str, version: str, shard_lengths: Sequence[int], num_bytes: int
) -> dict[str, Any]:
    """dataset_info.json as TFDS writes it (proto3 JSON: int64 values as strings, no empty ones)."""
    return {
        "description": f"{name}: generated by provision.stats.samples",
        "fileFormat": "tfrecord",
        "moduleName": f"{name}.{name}_dataset_builder",
        "name": name,
        "releaseNotes": {version: "Initial release."},
        "splits": [
            {
                "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
                "name": "train",
                "numBytes": str(num_bytes),
                "shardLengths": [str(n) for n in shard_lengths],
            }
        ],
        "version": version,
    }


def split_evenly(total: int, parts: int) -> list[int]:
    """How TFDS spreads examples over shards: sizes differ by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def encode_episode(episode: Mapping[str, Any], step_features: Sequence[StepFeature]) -> bytes:
    """One episode as the tf.train.Example TFDS writes: step fields flattened over time."""
    features: dict[str, Any] = {
        "episode_metadata/file_path": [episode.get("file_path", b"")],
    }
    for feature in step_features:
        value = episode[feature.key]
        if feature.kind in ("image", "text"):
            features[f"steps/{feature.key}"] = list(value)
        elif feature.dtype == "bool" or feature.dtype.startswith(("int", "uint")):
            features[f"steps/{feature.key}"] = np.asarray(value).astype(np.int64)
        else:
            features[f"steps/{feature.key}"] = np.asarray(value, dtype=np.float32)
    return encode_example(features)


def write_rlds(
    version_dir: Path,
    name: str,
    step_features: Sequence[StepFeature],
    episodes: Iterator[Mapping[str, Any]],
    num_episodes: int,
    num_shards: int,
    *,
    version: str = "1.0.0",
) -> list[Path]:
    """Write a TFDS version dir: shards `NAME-train.tfrecord-XXXXX-of-YYYYY` and the JSONs."""
    version_dir.mkdir(parents=True, exist_ok=True)
    lengths = split_evenly(num_episodes, num_shards)
    shards = []
    num_bytes = 0
    for number, count in enumerate(lengths):
        records = [encode_episode(next(episodes), step_features) for _ in range(count)]
        num_bytes += sum(len(r) for r in records)
        path = version_dir / f"{name}-train.tfrecord-{number:05d}-of-{num_shards:05d}"
        write_records(path, records)
        shards.append(path)
    # byte for byte what tfds writes: json.dumps(indent=4, sort_keys=True) and MessageToJson
    tfds_style = {"sort_keys": True, "newline": False}
    features = features_json(step_features)
    jsonfile.write_atomic(version_dir / "features.json", features, indent=4, **tfds_style)
    info = dataset_info_json(name, version, lengths, num_bytes)
    jsonfile.write_atomic(version_dir / "dataset_info.json", info, indent=2, **tfds_style)
    return shards


@dataclass(frozen=True)
class RldsSample:
    """A generated LIBERO-like RLDS dataset; defaults are the runbook's libero_object set."""

    name: str = "libero_object_no_noops"
    episodes: int = 454
    steps: int = 66984
    shards: int = 32
    image_bytes: int = 64
    image_shape: tuple[int, int, int] = (256, 256, 3)
    empty_episodes: int = 0
    seed: int = 0
    version: str = "1.0.0"
    #: images as PNGs of `image_shape` (about `image_bytes` each, at least one row of noise)
    png: bool = False

    def lengths(self) -> list[int]:
        """Ragged episode lengths summing to `steps`; `empty_episodes` of them are 0."""
        return _ragged_lengths(self.steps, self.episodes, self.empty_episodes, self.seed)


def rlds_episodes(sample: RldsSample, *, images: bool = True) -> Iterator[dict[str, Any]]:
    """The episodes of `sample`, regenerated exactly; `images=False` leaves the images out."""
    for index, steps in enumerate(sample.lengths()):
        rng = np.random.default_rng([sample.seed, index, 0])
        episode: dict[str, Any] = {
            "action": _libero_actions(rng, steps),
            "observation/state": _walk(rng, steps, 8, gripper=2),
            "observation/joint_state": _walk(rng, steps, 7, gripper=0),
            "discount": np.ones(steps, np.float32),
            "reward": (np.arange(steps) == steps - 1).astype(np.float32),
            "is_first": np.arange(steps) == 0,
            "is_last": np.arange(steps) == steps - 1,
            "is_terminal": np.arange(steps) == steps - 1,
            "language_instruction": [LIBERO_TASK.encode()] * steps,
            "file_path": f"/data/libero_object/demo_{index}.hdf5".encode(),
        }
        if images:
            pixels = np.random.default_rng([sample.seed, index, 1])
            for key in ("observation/image", "observation/wrist_image"):
                episode[key] = _images(pixels, steps, sample)
        yield episode


def _images(rng: np.random.Generator, steps: int, sample: RldsSample) -> list[bytes]:
    size = sample.image_bytes
    if sample.png:
        return [encode_png(png_pixels(rng, sample.image_shape, size)) for _ in range(steps)]
    blob = rng.bytes(steps * size)
    return [blob[i * size : (i + 1) * size] for i in range(steps)]


def png_pixels(rng: np.random.Generator, shape: tuple[int, int, int], size: int) -> np.ndarray:
    """An (H, W, C) uint8 image whose PNG takes about `size` bytes: random rows on top (they do
    not compress), zeros below (they vanish). Decoding costs what any H x W x C PNG costs."""
    height, width, channels = shape
    noisy = min(height, max(1, size // (width * channels)))
    pixels = np.zeros(shape, np.uint8)
    pixels[:noisy] = rng.integers(0, 256, (noisy, width, channels), np.uint8)
    return pixels


#: PNG colour types by channel count: grey, grey + alpha, RGB, RGBA.
_PNG_COLOUR = {1: 0, 2: 4, 3: 2, 4: 6}


def encode_png(pixels: np.ndarray) -> bytes:
    """An 8-bit (H, W, C) uint8 array as a PNG: IHDR, one IDAT (filter 0 rows), IEND."""
    height, width, channels = pixels.shape
    rows = np.zeros((height, 1 + width * channels), np.uint8)  # column 0: filter type 0
    rows[:, 1:] = pixels.reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8, _PNG_COLOUR[channels], 0, 0, 0)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)),
            _png_chunk(b"IEND", b""),
        ]
    )


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def write_rlds_sample(root: Path, sample: RldsSample) -> Path:
    """Write `sample` under `root/NAME/VERSION/`; returns that version dir."""
    version_dir = root / sample.name / sample.version
    write_rlds(
        version_dir,
        sample.name,
        libero_step_features(sample.image_shape),
        rlds_episodes(sample),
        sample.episodes,
        sample.shards,
        version=sample.version,
    )
    return version_dir


def write_waypoint_indices(path: Path, sample: RldsSample, original: RldsSample) -> None:
    """waypoint_indices.json beside the waypoint-filtered set: for each episode, the steps of
    the original episode that were kept (spread evenly over it)."""
    totals = original.lengths()
    doc = {
        str(index): np.linspace(0, max(totals[index] - 1, 0), kept).astype(int).tolist()
        for index, kept in enumerate(sample.lengths())
    }
    jsonfile.write_atomic(path, doc, indent=None)


def _libero_actions(rng: np.random.Generator, steps: int) -> np.ndarray:
    """6 end-effector deltas in [-1, 1] and a gripper command of -1 or +1."""
    deltas = np.clip(rng.normal(0.0, 0.3, (steps, 6)), -0.9375, 0.9375)
    gripper = np.where(rng.random((steps, 1)) < 0.55, -1.0, 1.0)
    return np.concatenate([deltas, gripper], axis=1).astype(np.float32)


def _walk(rng: np.random.Generator, steps: int, dims: int, gripper: int) -> np.ndarray:
    """Joint-like random walks; the last `gripper` dims are finger positions in [0, 0.04]."""
    start = rng.uniform(-1.0, 1.0, dims)
    path = start + np.cumsum(rng.normal(0.0, 0.01, (steps, dims)), axis=0)
    if gripper:
        path[:, -gripper:] = rng.uniform(0.0, 0.04, (steps, gripper))
    return path.astype(np.float32)


def _ragged_lengths(total: int, count: int, empty: int, seed: int) -> list[int]:
    """`count` lengths summing to `total`, varying around the mean; `empty` of them are 0."""
    if count <= 0:
        return []
    rng = np.random.default_rng([seed, 7])
    filled = count - empty
    if filled <= 0:
        return [0] * count
    weights = rng.uniform(0.6, 1.4, filled)
    lengths = np.floor(weights / weights.sum() * total).astype(int)
    lengths[: total - int(lengths.sum())] += 1
    out: list[int] = lengths.tolist()
    # spread the empty episodes through the set rather than bunching them at one end
    for k in range(empty):
        out.insert((k * 7 + 3) % (len(out) + 1), 0)
    return out


# --- LeRobot --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeRobotSample:
    """A generated LeRobot dataset; defaults mimic seed 004's (34 episodes, 5-dim)."""

    name: str = "openpi_segmented_data"
    version: str = "v2.1"
    episodes: int = 34
    frames: int = 1962
    dims: int = 5
    state_key: str = "observation.state"
    action_key: str = "action"
    image_key: str = "observation.images.cam_0"
    image_bytes: int = 32
    #: dims held constant (seed 004's stats have state dims 0, 1 at 0.0 and 50.0)
    constant_state: dict[int, float] = field(default_factory=lambda: {0: 0.0, 1: 50.0})
    constant_action: dict[int, float] = field(default_factory=lambda: {0: 0.0, 1: 0.0})
    test_episodes: int = 3
    fixed_size_lists: bool = True
    rows_per_file: int = 100_000  # v3.0: episodes are packed into files of about this many rows
    fps: int = 10
    seed: int = 0

    def lengths(self) -> list[int]:
        """Ragged episode lengths summing to `frames`."""
        return _ragged_lengths(self.frames, self.episodes, 0, self.seed)

    def split(self) -> dict[str, list[int]]:
        """The train/test split: the last `test_episodes` episodes are the test set."""
        cut = self.episodes - self.test_episodes
        return {"train": list(range(cut)), "test": list(range(cut, self.episodes))}


def lerobot_episodes(sample: LeRobotSample) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(index, {state_key: (T, d), action_key: (T, d)}) of `sample`, regenerated exactly."""
    for index, steps in enumerate(sample.lengths()):
        rng = np.random.default_rng([sample.seed, index, 3])
        state = (50.0 + np.cumsum(rng.normal(0.0, 2.0, (steps, sample.dims)), axis=0)).astype(
            np.float32
        )
        action = rng.normal(0.05, 0.8, (steps, sample.dims)).astype(np.float32)
        for dim, value in sample.constant_state.items():
            state[:, dim] = value
        for dim, value in sample.constant_action.items():
            action[:, dim] = value
        yield index, {sample.state_key: state, sample.action_key: action}


def write_lerobot(root: Path, sample: LeRobotSample) -> Path:
    """Write `sample` as a LeRobot dataset at `root` (v2.1 or v3.0), plus split_info.json."""
    root.mkdir(parents=True, exist_ok=True)
    tables = []
    offset = 0
    for index, arrays in lerobot_episodes(sample):
        tables.append(_episode_table(sample, index, arrays, offset))
        offset += tables[-1].num_rows
    if sample.version.startswith("v3"):
        _write_v3(root, sample, tables)
    else:
        _write_v2(root, sample, tables)
    jsonfile.write_atomic(root / "meta" / "info.json", _info_json(sample, offset), indent=4)
    jsonfile.write_atomic(root / "split_info.json", sample.split())
    return root


def _episode_table(
    sample: LeRobotSample, index: int, arrays: dict[str, np.ndarray], offset: int
) -> pa.Table:
    steps = len(arrays[sample.state_key])
    columns: dict[str, pa.Array] = {}
    if sample.image_bytes:
        blobs = np.random.default_rng([sample.seed, index, 4]).bytes(steps * sample.image_bytes)
        size = sample.image_bytes
        columns[sample.image_key] = pa.array(
            [
                {"bytes": blobs[i * size : (i + 1) * size], "path": f"frame_{i:06d}.png"}
                for i in range(steps)
            ],
            type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
    for key in (sample.state_key, sample.action_key):
        columns[key] = _list_column(arrays[key], sample.fixed_size_lists)
    columns["timestamp"] = pa.array(np.arange(steps, dtype=np.float32) / sample.fps)
    columns["frame_index"] = pa.array(np.arange(steps, dtype=np.int64))
    columns["episode_index"] = pa.array(np.full(steps, index, dtype=np.int64))
    columns["index"] = pa.array(np.arange(offset, offset + steps, dtype=np.int64))
    columns["task_index"] = pa.array(np.zeros(steps, dtype=np.int64))
    return pa.table(columns)


def _list_column(rows: np.ndarray, fixed: bool) -> pa.Array:
    values = pa.array(rows.reshape(-1), type=pa.float32())
    if fixed:
        return pa.FixedSizeListArray.from_arrays(values, rows.shape[1])
    offsets = pa.array(np.arange(0, rows.size + 1, rows.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values)


def _write_v2(root: Path, sample: LeRobotSample, tables: list[pa.Table]) -> None:
    episodes, stats = [], []
    for index, table in enumerate(tables):
        path = root / "data" / f"chunk-{index // 1000:03d}" / f"episode_{index:06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        episodes.append({"episode_index": index, "tasks": [LIBERO_TASK], "length": len(table)})
        stats.append({"episode_index": index, "stats": _episode_stats(sample, table)})
    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    _write_jsonl(meta / "episodes.jsonl", episodes)
    _write_jsonl(meta / "tasks.jsonl", [{"task_index": 0, "task": LIBERO_TASK}])
    if sample.version != "v2.0":
        _write_jsonl(meta / "episodes_stats.jsonl", stats)


def _write_v3(root: Path, sample: LeRobotSample, tables: list[pa.Table]) -> None:
    files: list[list[int]] = [[]]
    rows = 0
    for index, table in enumerate(tables):
        if files[-1] and rows + len(table) > sample.rows_per_file:
            files.append([])
            rows = 0
        files[-1].append(index)
        rows += len(table)
    episodes = []
    start = 0
    for file_index, members in enumerate(files):
        path = root / "data" / "chunk-000" / f"file-{file_index:03d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables([tables[i] for i in members]), path)
        for index in members:
            length = len(tables[index])
            episodes.append(
                {
                    "episode_index": index,
                    "tasks": [LIBERO_TASK],
                    "length": length,
                    "data/chunk_index": 0,
                    "data/file_index": file_index,
                    "dataset_from_index": start,
                    "dataset_to_index": start + length,
                    "meta/episodes/chunk_index": 0,
                    "meta/episodes/file_index": 0,
                }
            )
            start += length
    meta = root / "meta"
    (meta / "episodes" / "chunk-000").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episodes), meta / "episodes/chunk-000/file-000.parquet")
    pq.write_table(
        pa.table({"task_index": pa.array([0], pa.int64()), "task": [LIBERO_TASK]}),
        meta / "tasks.parquet",
    )
    jsonfile.write_atomic(meta / "stats.json", _episode_stats(sample, pa.concat_tables(tables)))


def _episode_stats(sample: LeRobotSample, table: pa.Table) -> dict[str, Any]:
    out = {}
    for key in (sample.state_key, sample.action_key):
        rows = np.asarray(table.column(key).combine_chunks().flatten()).reshape(len(table), -1)
        out[key] = {
            "min": rows.min(0).tolist(),
            "max": rows.max(0).tolist(),
            "mean": rows.mean(0, dtype=np.float64).tolist(),
            "std": rows.std(0, dtype=np.float64).tolist(),
            "count": [len(rows)],
        }
    return out


def _info_json(sample: LeRobotSample, frames: int) -> dict[str, Any]:
    v3 = sample.version.startswith("v3")
    vector = {"dtype": "float32", "shape": [sample.dims], "names": None}
    scalar = {"shape": [1], "names": None}
    features: dict[str, Any] = {}
    if sample.image_bytes:
        features[sample.image_key] = {
            "dtype": "image",
            "shape": [224, 224, 3],
            "names": ["height", "width", "channel"],
        }
    features[sample.state_key] = vector
    features[sample.action_key] = vector
    features["timestamp"] = {"dtype": "float32", **scalar}
    for name in ("frame_index", "episode_index", "index", "task_index"):
        features[name] = {"dtype": "int64", **scalar}
    info: dict[str, Any] = {
        "codebase_version": sample.version,
        "robot_type": None,
        "total_episodes": sample.episodes,
        "total_frames": frames,
        "total_tasks": 1,
    }
    if v3:
        info.update(
            {
                "chunks_size": 1000,
                "data_files_size_in_mb": 100,
                "video_files_size_in_mb": 500,
                "fps": sample.fps,
                "splits": {"train": f"0:{sample.episodes}"},
                "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
                "video_path": None,
            }
        )
    else:
        info.update(
            {
                "total_videos": 0,
                "total_chunks": (sample.episodes + 999) // 1000,
                "chunks_size": 1000,
                "fps": sample.fps,
                "splits": {"train": f"0:{sample.episodes}"},
                "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
                "video_path": None,
            }
        )
    info["features"] = features
    return info


def _write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


# --- presets --------------------------------------------------------------------------------

#: The runbook's waypoint-filtered set (seed 003 §9.3): same episodes, fewer steps.
LIBERO_WP = RldsSample(name="waypoint_filtered_rlds__libero", steps=8863, shards=4, seed=1)


def write_preset(
    root: Path,
    preset: str,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a preset dataset under `root`; returns where it went and its size."""
    overrides = dict(overrides or {})
    if preset in ("libero_object", "libero_wp"):
        base = RldsSample() if preset == "libero_object" else LIBERO_WP
        sample = replace(base, **overrides)
        version_dir = write_rlds_sample(root, sample)
        if preset == "libero_wp":
            original = replace(RldsSample(), episodes=sample.episodes, seed=sample.seed)
            write_waypoint_indices(root / "waypoint_indices.json", sample, original)
        return {
            "path": str(version_dir),
            "format": "rlds",
            "episodes": sample.episodes,
            "steps": sample.steps,
            "shards": sample.shards,
        }
    if preset in ("lerobot", "lerobot_v3"):
        robot = LeRobotSample() if preset == "lerobot" else LeRobotSample(version="v3.0")
        robot = replace(robot, **overrides)
        write_lerobot(root, robot)
        return {
            "path": str(root),
            "format": "lerobot",
            "version": robot.version,
            "episodes": robot.episodes,
            "steps": robot.frames,
        }
    raise ValueError(f"unknown preset {preset!r}")


PRESETS = ("libero_object", "libero_wp", "lerobot", "lerobot_v3")
