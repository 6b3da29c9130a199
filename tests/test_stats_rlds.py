"""RLDS statistics against numpy on the same generated arrays, and every failure the runbook met."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from provision.stats import samples
from provision.stats.command import stats_command
from provision.stats.errors import DatasetError
from provision.stats.rlds import RldsReader

SMALL = samples.RldsSample(
    name="libero_small", episodes=23, steps=1500, shards=3, image_bytes=300, empty_episodes=1
)


def _seed_stats(arr: np.ndarray) -> dict[str, Any]:
    """The runbook's own stats() (seed 003 §9.2), on the same rows."""
    return {
        "mean": arr.mean(0).tolist(),
        "std": arr.std(0).tolist(),
        "q01": np.percentile(arr, 1, 0).tolist(),
        "q99": np.percentile(arr, 99, 0).tolist(),
        "min": arr.min(0).tolist(),
        "max": arr.max(0).tolist(),
    }


def _seed_rows(sample: samples.RldsSample, key: str) -> np.ndarray:
    """The seed's loop: one row per step, appended to a list, then stacked."""
    rows = []
    for episode in samples.rlds_episodes(sample, images=False):
        for step in episode[key]:
            rows.append(step.astype("float32").flatten())
    return np.stack(rows)


def _assert_matches_seed(ours: dict[str, list[float]], arr: np.ndarray) -> None:
    expected = _seed_stats(arr)
    for name in ("q01", "q99", "min", "max"):
        assert ours[name] == expected[name], name  # exact: same values, same interpolation
    np.testing.assert_allclose(ours["mean"], arr.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(ours["std"], arr.astype(np.float64).std(0), rtol=1e-12)
    np.testing.assert_allclose(ours["mean"], expected["mean"], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rlds")
    samples.write_rlds_sample(root, SMALL)
    return root


def test_ae_file_matches_the_seed_method(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "dataset_statistics.json"
    result = stats_command(str(small), output=str(out), expect={"action": 7, "proprio": 8})
    doc = json.loads(out.read_text())
    assert list(doc) == ["libero_small"]
    body = doc["libero_small"]
    assert list(body) == ["action", "proprio", "num_samples"]
    assert list(body["action"]) == ["mean", "std", "q01", "q99", "min", "max"]
    assert body["num_samples"] == 1500 == result["num_samples"]
    _assert_matches_seed(body["action"], _seed_rows(SMALL, "action"))
    _assert_matches_seed(body["proprio"], _seed_rows(SMALL, "observation/state"))
    assert result["num_episodes"] == 23 and result["empty_episodes"] == 1
    assert "1 of 23 episodes have no steps" in result["warnings"]
    assert result["format"] == "rlds" and result["path"].endswith("libero_small/1.0.0")


def test_vlm_file_counts_transitions_and_trajectories(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "norm_stats" / "dataset_statistics.json"
    stats_command(str(small / "libero_small" / "1.0.0"), schema="vlm", output=str(out))
    doc = json.loads(out.read_text())
    assert list(doc) == ["action", "proprio", "num_transitions", "num_trajectories"]
    assert (doc["num_transitions"], doc["num_trajectories"]) == (1500, 23)
    assert len(doc["action"]["q99"]) == 7 and len(doc["proprio"]["q99"]) == 8


def test_episodes_come_back_ragged_in_shard_order(small: Path) -> None:
    reader = RldsReader(small)
    assert len(reader.shards) == 3 and reader.shard_lengths == [8, 8, 7]
    got = list(reader.episodes(["action", "observation/state"]))
    expected = list(samples.rlds_episodes(SMALL, images=False))
    assert [i for i, _ in got] == list(range(23))
    for (_, arrays), episode in zip(got, expected, strict=True):
        np.testing.assert_array_equal(arrays["action"], episode["action"])
        np.testing.assert_array_equal(arrays["observation/state"], episode["observation/state"])
    assert sorted({len(a["action"]) for _, a in got})[0] == 0


def test_joint_state_trap_fails_before_reading_and_names_the_right_key(small: Path) -> None:
    with pytest.raises(DatasetError) as err:
        stats_command(str(small), state_key="observation/joint_state", expect={"proprio": 8})
    assert str(err.value) == "proprio 'observation/joint_state' has 7 dims, expected 8"
    assert "'observation/state' has 8 dims" in err.value.hint


def _write(root: Path, features: list[samples.StepFeature], episodes: list[dict]) -> Path:
    version_dir = root / "custom" / "1.0.0"
    samples.write_rlds(version_dir, "custom", features, iter(episodes), len(episodes), 2)
    return version_dir


def _features(*keys: tuple[str, int]) -> list[samples.StepFeature]:
    return [samples.StepFeature(k, "tensor", (n,)) for k, n in keys] + [
        samples.StepFeature("observation/image", "image", (8, 8, 3), "uint8"),
    ]


def _episode(steps: int, **arrays: np.ndarray) -> dict[str, Any]:
    return {"observation/image": [b"img"] * steps, **arrays}


def test_missing_state_key_lists_what_exists(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    episodes = [
        _episode(
            4,
            action=rng.normal(size=(4, 7)),
            **{"observation/joint_state": rng.normal(size=(4, 7))},
        )
        for _ in range(3)
    ]
    _write(tmp_path, _features(("action", 7), ("observation/joint_state", 7)), episodes)
    with pytest.raises(DatasetError) as err:
        stats_command(str(tmp_path))
    assert "no 'observation/state' in " in str(err.value)
    assert str(err.value).endswith("found 'observation/joint_state' (7 dims), 'action' (7 dims)")


def test_nan_is_found_with_its_episode_and_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    episodes = [
        _episode(
            5, action=rng.normal(size=(5, 7)), **{"observation/state": rng.normal(size=(5, 8))}
        )
        for _ in range(4)
    ]
    episodes[2]["observation/state"][3, 6] = np.nan
    episodes[3]["observation/state"][0, 1] = np.inf
    _write(tmp_path, _features(("action", 7), ("observation/state", 8)), episodes)
    with pytest.raises(DatasetError) as err:
        stats_command(str(tmp_path))
    assert str(err.value) == (
        "state 'observation/state' has 2 NaN/inf values in dims 1, 6; the first in episode 2, "
        "step 3"
    )


def test_constant_and_narrow_dims_are_warned_about(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    episodes = []
    for _ in range(3):
        action = rng.normal(size=(50, 7)).astype(np.float32)
        action[:, 6] = 1.0
        state = rng.normal(size=(50, 8)).astype(np.float32)
        state[:, 2] = 0.5 + rng.normal(0, 1e-7, 50)
        episodes.append(_episode(50, action=action, **{"observation/state": state}))
    _write(tmp_path, _features(("action", 7), ("observation/state", 8)), episodes)
    result = stats_command(str(tmp_path), output=str(tmp_path / "s.json"))
    assert result["warnings"] == [
        "action 'action': dims 6 are constant (std 0; values 1): z-score normalisation divides "
        "by 0",
        result["warnings"][1],
    ]
    assert result["warnings"][1].startswith("state 'observation/state': dims 2 have q99 - q01 < ")


def test_missing_shard_and_short_shard_are_named(small: Path, tmp_path: Path) -> None:
    copy = tmp_path / "libero_small" / "1.0.0"
    copy.mkdir(parents=True)
    for f in (small / "libero_small" / "1.0.0").iterdir():
        os.link(f, copy / f.name)
    shard = copy / "libero_small-train.tfrecord-00001-of-00003"
    shard.unlink()
    with pytest.raises(DatasetError, match="missing shards 00001 of 00003"):
        stats_command(str(copy))
    records = [b"x"]  # a shard holding fewer episodes than dataset_info.json lists
    from provision.stats.tfrecord import write_records

    write_records(shard, records)
    with pytest.raises(DatasetError, match=r"holds 1 episodes; dataset_info\.json lists 8"):
        stats_command(str(copy))


def test_damaged_shard_names_file_and_offset(small: Path, tmp_path: Path) -> None:
    copy = tmp_path / "d" / "1.0.0"
    copy.mkdir(parents=True)
    for f in (small / "libero_small" / "1.0.0").iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    shard = copy / "libero_small-train.tfrecord-00002-of-00003"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"{shard}: record \d+ at byte offset \d+: data CRC"):
        stats_command(str(copy))


def test_features_json_that_does_not_fit_the_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    episodes = [
        _episode(
            3, action=rng.normal(size=(3, 7)), **{"observation/state": rng.normal(size=(3, 8))}
        )
        for _ in range(2)
    ]
    version_dir = _write(tmp_path, _features(("action", 7), ("observation/state", 8)), episodes)
    features = json.loads((version_dir / "features.json").read_text())
    steps = features["featuresDict"]["features"]["steps"]["sequence"]["feature"]
    steps["featuresDict"]["features"]["action"]["tensor"]["shape"]["dimensions"] = ["5"]
    (version_dir / "features.json").write_text(json.dumps(features))
    with pytest.raises(DatasetError, match="'action' has 21 values, not a multiple of its 5 dims"):
        stats_command(str(version_dir))


def test_path_above_several_datasets_is_ambiguous(small: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        samples.write_rlds_sample(
            tmp_path, samples.RldsSample(name=name, episodes=2, steps=4, shards=1)
        )
    with pytest.raises(DatasetError, match=r"several RLDS datasets under .*: a/1\.0\.0, b/1\.0\.0"):
        stats_command(str(tmp_path))
    with pytest.raises(DatasetError, match="neither an RLDS/TFDS dataset"):
        (tmp_path / "empty").mkdir()
        stats_command(str(tmp_path / "empty"))


@pytest.mark.slow
def test_runbook_presets_have_the_runbook_layout_and_counts(tmp_path: Path) -> None:
    data = tmp_path / "libero_object_no_noops"
    info = samples.write_preset(data, "libero_object", {"image_bytes": 8})
    version_dir = Path(info["path"])
    assert version_dir == data / "libero_object_no_noops" / "1.0.0"
    names = sorted(p.name for p in version_dir.iterdir())
    assert len(names) == 34 and names[:2] == ["dataset_info.json", "features.json"]
    assert names[2] == "libero_object_no_noops-train.tfrecord-00000-of-00032"
    result = stats_command(str(data), expect={"action": 7, "proprio": 8}, expect_samples=66984)
    assert (result["num_samples"], result["num_episodes"]) == (66984, 454)

    wp = tmp_path / "libero_object_wp_001"
    info = samples.write_preset(wp, "libero_wp", {"image_bytes": 8})
    assert len(list(Path(info["path"]).iterdir())) == 6
    assert (wp / "waypoint_indices.json").is_file()
    result = stats_command(info["path"], schema="vlm", expect_samples=8863, expect_episodes=454)
    assert result["document"]["num_transitions"] == 8863
    with pytest.raises(DatasetError, match="8863 samples, expected 66984"):
        stats_command(info["path"], schema="vlm", expect_samples=66984)


def test_no_samples_is_an_error(tmp_path: Path) -> None:
    features = _features(("action", 7), ("observation/state", 8))
    empty = {"action": np.zeros((0, 7)), "observation/state": np.zeros((0, 8))}
    _write(tmp_path, features, [_episode(0, **empty), _episode(0, **empty)])
    with pytest.raises(DatasetError, match="no samples: 2 episodes, none with a step"):
        stats_command(str(tmp_path))
