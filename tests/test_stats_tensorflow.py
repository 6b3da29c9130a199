"""Our RLDS reader against TensorFlow's own (optional: skipped when TensorFlow is absent).

Same generated dataset, read by `tensorflow_datasets` as the runbook does (seed 003 §9.2, images
decoded) and by `provision.stats`: the framing, the Examples, the episodes and the statistics must
agree, and a dataset that tfds itself writes with the same features must have the same
`features.json`, `dataset_info.json` and Examples as our writer's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from provision.stats import samples
from provision.stats.command import stats_command
from provision.stats.example import parse_example
from provision.stats.rlds import RldsReader
from provision.stats.tfrecord import read_records

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]

SAMPLE = samples.RldsSample(
    name="libero_tf", episodes=9, steps=400, shards=3, image_bytes=800, empty_episodes=1, png=True
)


@pytest.fixture(scope="module")
def tf_modules():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = pytest.importorskip("tensorflow")
    tfds = pytest.importorskip("tensorflow_datasets")
    tf.config.set_visible_devices([], "GPU")
    return tf, tfds


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return samples.write_rlds_sample(tmp_path_factory.mktemp("tf"), SAMPLE)


def test_tensorflow_reads_our_framing_and_examples(tf_modules, version_dir: Path) -> None:
    tf, _ = tf_modules
    for shard in sorted(version_dir.glob("*.tfrecord-*")):
        theirs = [r.numpy() for r in tf.data.TFRecordDataset(str(shard))]
        ours = read_records(shard)
        assert theirs == ours
        for record in ours:
            example = tf.train.Example.FromString(record)
            mine = parse_example(record)
            for key, feature in example.features.feature.items():
                kind = feature.WhichOneof("kind")
                values = list(getattr(feature, kind).value) if kind else []
                got = mine[key]
                assert (got.tolist() if isinstance(got, np.ndarray) else got) == values, key


def test_episodes_and_statistics_match_tfds(tf_modules, version_dir: Path) -> None:
    _, tfds = tf_modules
    builder = tfds.builder_from_directory(str(version_dir))
    ds = builder.as_dataset(split="train")  # the runbook's call: every image is decoded
    actions, proprios, per_episode = [], [], []
    for episode in ds:
        steps = list(episode["steps"])
        per_episode.append(len(steps))
        for s in steps:
            assert s["observation"]["image"].shape == SAMPLE.image_shape
            actions.append(s["action"].numpy().astype("float32"))
            proprios.append(s["observation"]["state"].numpy().astype("float32").flatten())
    reader = RldsReader(version_dir)
    ours = list(reader.episodes(["action", "observation/state"]))
    # under 16 episodes per shard, tfds's interleave reads the shards in order
    assert per_episode == [len(a["action"]) for _, a in ours]

    result = stats_command(str(version_dir))
    body = result["document"]["libero_tf"]
    for name, rows in (("action", np.stack(actions)), ("proprio", np.stack(proprios))):
        assert body[name]["q01"] == np.percentile(rows, 1, 0).tolist()
        assert body[name]["q99"] == np.percentile(rows, 99, 0).tolist()
        assert body[name]["min"] == rows.min(0).tolist()
        assert body[name]["max"] == rows.max(0).tolist()
        # the runbook's mean and std run in float32; ours in float64
        np.testing.assert_allclose(body[name]["mean"], rows.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(body[name]["std"], rows.std(0), rtol=1e-5, atol=1e-6)
    assert body["num_samples"] == len(actions) == SAMPLE.steps


@pytest.mark.parametrize("shape", [(5, 7, 1), (4, 6, 3), (3, 2, 4)])
def test_tensorflow_decodes_our_png(tf_modules, shape: tuple[int, int, int]) -> None:
    tf, _ = tf_modules
    pixels = np.random.default_rng(len(shape)).integers(0, 256, shape, np.uint8)
    decoded = tf.io.decode_png(samples.encode_png(pixels), channels=shape[2]).numpy()
    assert (decoded == pixels).all()


def test_tfds_writes_what_we_write(tf_modules, tmp_path: Path) -> None:
    """tfds's own builder, same features and episodes: same JSON files, same Examples."""
    tf, tfds = tf_modules

    def decode(png: bytes) -> np.ndarray:
        return tf.io.decode_png(png).numpy()

    sample = samples.RldsSample(
        name="libero_twin", episodes=5, steps=60, shards=1, image_shape=(4, 4, 3), png=True
    )
    theirs = _tfds_builder(tfds, sample, tmp_path / "theirs")
    ours = samples.write_rlds_sample(tmp_path / "ours", sample)
    assert (ours / "features.json").read_bytes() == (theirs / "features.json").read_bytes()
    info = {p: json.loads((p / "dataset_info.json").read_text()) for p in (ours, theirs)}
    for doc in info.values():  # the builder's own text and module, and image bytes, differ
        doc.pop("description", None)
        doc.pop("moduleName")
        doc["splits"][0].pop("numBytes")
    assert info[ours] == info[theirs]
    assert (ours / "dataset_info.json").read_text().startswith('{\n  "description": ')
    assert not (ours / "dataset_info.json").read_text().endswith("\n")

    def by_path(version_dir: Path) -> dict[bytes, dict]:
        records = [r for s in sorted(version_dir.glob("*.tfrecord-*")) for r in read_records(s)]
        examples = [parse_example(r) for r in records]
        return {e["episode_metadata/file_path"][0]: e for e in examples}

    mine, tfds_own = by_path(ours), by_path(theirs)  # tfds shuffles episodes
    assert mine.keys() == tfds_own.keys()
    for path, example in mine.items():
        other = tfds_own[path]
        assert example.keys() == other.keys()
        for key, value in example.items():
            if key.endswith("image"):  # tfds re-encodes images: compare the pixels
                assert len(value) == len(other[key]), key
                for mine_png, their_png in zip(value, other[key], strict=True):
                    assert (decode(mine_png) == decode(their_png)).all(), key
            elif isinstance(value, np.ndarray):
                assert value.dtype == other[key].dtype and (value == other[key]).all(), key
            else:
                assert value == other[key], key


def _tfds_builder(tfds, sample: samples.RldsSample, data_dir: Path) -> Path:
    """Generate `sample` with a tfds GeneratorBasedBuilder declaring LIBERO's RLDS features."""
    features = tfds.features
    image = {"shape": sample.image_shape, "dtype": np.uint8, "encoding_format": "png"}
    episodes = list(samples.rlds_episodes(sample))

    class Builder(tfds.core.GeneratorBasedBuilder):
        name = sample.name
        VERSION = tfds.core.Version(sample.version)
        RELEASE_NOTES: ClassVar[dict[str, str]] = {sample.version: "Initial release."}

        def _info(self):
            scalar = features.Scalar
            return tfds.core.DatasetInfo(
                builder=self,
                features=features.FeaturesDict(
                    {
                        "steps": features.Dataset(
                            {
                                "observation": {
                                    "image": features.Image(**image, doc="Main camera RGB."),
                                    "wrist_image": features.Image(**image, doc="Wrist camera."),
                                    "state": features.Tensor(
                                        shape=(8,), dtype=np.float32, doc="Robot EEF state."
                                    ),
                                    "joint_state": features.Tensor(
                                        shape=(7,), dtype=np.float32, doc="Robot joint angles."
                                    ),
                                },
                                "action": features.Tensor(
                                    shape=(7,), dtype=np.float32, doc="Robot EEF action."
                                ),
                                "discount": scalar(
                                    dtype=np.float32, doc="Discount if provided, default to 1."
                                ),
                                "reward": scalar(
                                    dtype=np.float32, doc="Reward if provided, 1 on final step."
                                ),
                                "is_first": scalar(
                                    dtype=np.bool_, doc="True on first step of the episode."
                                ),
                                "is_last": scalar(
                                    dtype=np.bool_, doc="True on last step of the episode."
                                ),
                                "is_terminal": scalar(
                                    dtype=np.bool_, doc="True on last step if terminal."
                                ),
                                "language_instruction": features.Text(doc="Language Instruction."),
                            }
                        ),
                        "episode_metadata": {
                            "file_path": features.Text(doc="Path to the original data file.")
                        },
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for index, episode in enumerate(episodes):
                yield (
                    index,
                    {
                        "steps": _steps(episode),
                        "episode_metadata": {"file_path": episode["file_path"].decode()},
                    },
                )

    builder = Builder(data_dir=str(data_dir))
    builder.download_and_prepare()
    return Path(builder.data_dir)


def _steps(episode: dict) -> list[dict]:
    """One episode of `samples.rlds_episodes` as the nested per-step dicts tfds encodes."""
    nested = []
    for t in range(len(episode["action"])):
        step: dict = {}
        for key, value in episode.items():
            if key == "file_path":
                continue
            *parents, leaf = key.split("/")
            node = step
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value[t].decode() if key == "language_instruction" else value[t]
        nested.append(step)
    return nested
