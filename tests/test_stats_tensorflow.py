"""Our RLDS reader against TensorFlow's own (optional: skipped when TensorFlow is absent).

Same generated dataset, read by `tensorflow_datasets` as the runbook does (seed 003 §9.2) and by
`provision.stats`: the framing, the Examples, the episodes and the statistics must agree.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from provision.stats import samples
from provision.stats.command import stats_command
from provision.stats.example import parse_example
from provision.stats.rlds import RldsReader
from provision.stats.tfrecord import read_records

pytestmark = [pytest.mark.tensorflow, pytest.mark.slow]

SAMPLE = samples.RldsSample(
    name="libero_tf", episodes=9, steps=400, shards=3, image_bytes=50, empty_episodes=1
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
    skip = tfds.decode.SkipDecoding()
    ds = builder.as_dataset(
        split="train",
        decoders={"steps": {"observation": {"image": skip, "wrist_image": skip}}},
    )
    actions, proprios, per_episode = [], [], []
    for episode in ds:
        rows = [
            (s["action"].numpy().astype("float32"), s["observation"]["state"].numpy())
            for s in episode["steps"]
        ]
        per_episode.append(len(rows))
        for action, state in rows:
            actions.append(action)
            proprios.append(state.astype("float32").flatten())
    reader = RldsReader(version_dir)
    ours = list(reader.episodes(["action", "observation/state"]))
    assert per_episode == [len(a["action"]) for _, a in ours]

    result = stats_command(str(version_dir))
    body = result["document"]["libero_tf"]
    for name, rows in (("action", np.stack(actions)), ("proprio", np.stack(proprios))):
        assert body[name]["q01"] == np.percentile(rows, 1, 0).tolist()
        assert body[name]["q99"] == np.percentile(rows, 99, 0).tolist()
        assert body[name]["min"] == rows.min(0).tolist()
        np.testing.assert_allclose(body[name]["mean"], rows.mean(0), rtol=1e-5, atol=1e-6)
    assert body["num_samples"] == len(actions) == SAMPLE.steps
