"""LeRobot v2.1 / v3.0 statistics: splits, openpi's file and action chunks, failures."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from provision.stats import samples
from provision.stats.command import stats_command
from provision.stats.compute import chunk_actions
from provision.stats.errors import DatasetError

SEED004 = samples.LeRobotSample(image_bytes=64)


def _rows(sample: samples.LeRobotSample, key: str, episodes: list[int], horizon: int = 0):
    parts = []
    for index, arrays in samples.lerobot_episodes(sample):
        if index in episodes:
            parts.append(chunk_actions(arrays[key], horizon) if horizon else arrays[key])
    return np.concatenate(parts)


def _check(stats: dict[str, list[float]], rows: np.ndarray) -> None:
    assert stats["q01"] == np.percentile(rows, 1, 0).tolist()
    assert stats["q99"] == np.percentile(rows, 99, 0).tolist()
    np.testing.assert_allclose(stats["mean"], rows.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["std"], rows.astype(np.float64).std(0), rtol=1e-12)


@pytest.fixture(scope="module")
def v21(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return samples.write_lerobot(tmp_path_factory.mktemp("v21") / "data", SEED004)


def test_openpi_file_from_the_train_split(v21: Path, tmp_path: Path) -> None:
    out = tmp_path / "assets" / "norm_stats.json"
    result = stats_command(
        str(v21),
        schema="openpi",
        output=str(out),
        split_file=str(v21 / "split_info.json"),
        expect={"actions": 5, "state": 5},
    )
    doc = json.loads(out.read_text())
    assert list(doc) == ["norm_stats"]
    assert list(doc["norm_stats"]) == ["state", "actions"]
    assert list(doc["norm_stats"]["actions"]) == ["mean", "std", "q01", "q99"]
    train = SEED004.split()["train"]
    assert len(train) == 31 and result["num_episodes"] == 31
    assert result["num_samples"] == sum(SEED004.lengths()[i] for i in train)
    _check(doc["norm_stats"]["state"], _rows(SEED004, "observation.state", train))
    _check(doc["norm_stats"]["actions"], _rows(SEED004, "action", train))
    # seed 004: state dims 0 and 1 are constant (0 and 50), so are action dims 0 and 1
    assert result["warnings"] == [
        "action 'action': dims 0, 1 are constant (std 0; values 0, 0): z-score normalisation "
        "divides by 0",
        "state 'observation.state': dims 0, 1 are constant (std 0; values 0, 50): z-score "
        "normalisation divides by 0",
    ]


def test_unused_split_file_is_warned_about(v21: Path) -> None:
    result = stats_command(str(v21), schema="openpi")
    assert result["num_episodes"] == 34
    assert result["warnings"][0].startswith(f"{v21 / 'split_info.json'} exists but is not used")


def test_action_chunks_like_openpi(v21: Path) -> None:
    result = stats_command(str(v21), schema="openpi", episodes=[0, 3, 5], action_horizon=10)
    doc = result["document"]["norm_stats"]
    _check(doc["actions"], _rows(SEED004, "action", [0, 3, 5], horizon=10))
    _check(doc["state"], _rows(SEED004, "observation.state", [0, 3, 5]))
    assert result["num_samples"] == sum(SEED004.lengths()[i] for i in (0, 3, 5))


def test_chunks_are_clamped_at_the_episode_end() -> None:
    actions = np.arange(4, dtype=np.float32).reshape(4, 1)
    assert chunk_actions(actions, 3)[:, 0].tolist() == [0, 1, 2, 1, 2, 3, 2, 3, 3, 3, 3, 3]


def test_v3_gives_the_same_statistics_as_v21(v21: Path, tmp_path: Path) -> None:
    v3 = samples.write_lerobot(tmp_path / "v3", replace(SEED004, version="v3.0", rows_per_file=500))
    assert len(list((v3 / "data" / "chunk-000").glob("file-*.parquet"))) > 1
    a = stats_command(str(v21), schema="vlm", split_file=str(v21 / "split_info.json"))
    b = stats_command(str(v3), schema="vlm", split_file=str(v3 / "split_info.json"))
    assert a["document"] == b["document"]
    assert b["document"]["num_trajectories"] == 31


def test_openpi_column_names_and_variable_length_lists(tmp_path: Path) -> None:
    sample = replace(
        SEED004, state_key="state", action_key="actions", fixed_size_lists=False, image_bytes=0
    )
    root = samples.write_lerobot(tmp_path / "openpi_libero", sample)
    result = stats_command(str(root), schema="ae", split="train")
    assert result["keys"] == {"action": "actions", "state": "state"}
    _check(result["document"]["openpi_libero"]["action"], _rows(sample, "actions", list(range(34))))


def test_info_json_split_ranges_and_unknown_split(tmp_path: Path) -> None:
    root = samples.write_lerobot(tmp_path / "d", replace(SEED004, episodes=6, frames=60))
    info = json.loads((root / "meta" / "info.json").read_text())
    info["splits"] = {"train": "0:4", "test": "4:6"}
    (root / "meta" / "info.json").write_text(json.dumps(info))
    assert stats_command(str(root), split="test")["num_episodes"] == 2
    with pytest.raises(DatasetError, match=r"split 'val' is not in .* \(it has test, train\)"):
        stats_command(str(root), split="val")
    with pytest.raises(DatasetError, match="no 'val' episode list"):
        stats_command(str(root), split="val", split_file=str(root / "split_info.json"))
    with pytest.raises(DatasetError, match="names episodes the dataset lacks: 9"):
        stats_command(str(root), episodes=[1, 9])


def test_missing_column_names_the_columns_that_exist(v21: Path) -> None:
    with pytest.raises(DatasetError) as err:
        stats_command(str(v21), state_key="observation.joint_state")
    assert str(err.value) == (
        f"no 'observation.joint_state' column in {v21}/meta/info.json; found "
        "'observation.state' (5 dims), 'action' (5 dims)"
    )


def test_data_that_disagrees_with_the_metadata(tmp_path: Path) -> None:
    root = samples.write_lerobot(tmp_path / "d", replace(SEED004, episodes=4, frames=40))
    lines = (root / "meta" / "episodes.jsonl").read_text().splitlines()
    entry = json.loads(lines[2])
    entry["length"] += 1
    lines[2] = json.dumps(entry)
    (root / "meta" / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"episode 2 has \d+ rows; the metadata says"):
        stats_command(str(root))
    (root / "data" / "chunk-000" / "episode_000001.parquet").unlink()
    with pytest.raises(DatasetError, match="1 data files are missing"):
        stats_command(str(root))


def test_an_empty_selection_has_no_samples(v21: Path) -> None:
    with pytest.raises(DatasetError, match="no samples: 0 episodes"):
        stats_command(str(v21), episodes=[])


def test_v3_episode_without_rows_is_named(tmp_path: Path) -> None:
    sample = replace(SEED004, version="v3.0", episodes=5, frames=50, image_bytes=0)
    root = samples.write_lerobot(tmp_path / "v3", sample)
    data = root / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(data)
    keep = [i for i, e in enumerate(table.column("episode_index").to_pylist()) if e != 3]
    pq.write_table(table.take(keep), data)
    with pytest.raises(DatasetError, match=r"episode 3 is in \S+/meta but has no rows in"):
        stats_command(str(root))
