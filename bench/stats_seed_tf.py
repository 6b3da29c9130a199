"""The runbook's statistics loop (seed 003 §9.2) with TensorFlow, as a worker for bench/stats.py.

Run with an interpreter that has tensorflow and tensorflow_datasets (bench/.venv-tf), never the
project's: `bench/.venv-tf/bin/python bench/stats_seed_tf.py VERSION_DIR`. It imports TensorFlow
once, prints one JSON line (versions, import seconds), then for each line `run` on stdin runs
the seed's method on VERSION_DIR and prints one JSON line, its output document (the caller times
the round trip). A line `check` answers with the float64 mean and std of the rows the last run
gathered: the exact values the seed's float32 ones approximate. Standard library, numpy and
TensorFlow only: it must not depend on the code it is compared with.

The venv (about 1.7 GB, ignored by git; measured with tensorflow-cpu 2.21.0,
tensorflow-datasets 4.9.10, numpy 2.4.6, protobuf 7.36.2 on Python 3.11):

    uv venv -p 3.11 bench/.venv-tf
    uv pip install -p bench/.venv-tf/bin/python tensorflow-cpu tensorflow-datasets \
        pytest pytest-timeout -e .

The project is installed in it only for tests/test_stats_tensorflow.py:
`bench/.venv-tf/bin/python -m pytest tests/test_stats_tensorflow.py`.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
_started = time.perf_counter()
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

tf.config.set_visible_devices([], "GPU")
_IMPORT_SECONDS = time.perf_counter() - _started


def seed_rows(version_dir: str) -> tuple[str, np.ndarray, np.ndarray]:
    """Seed 003 §9.2's script up to its stats, unchanged but for the path: name and rows."""
    b = tfds.builder_from_directory(version_dir)
    ds = b.as_dataset(split="train")

    all_actions, all_proprios = [], []
    for ep in ds:
        for step in ep["steps"]:
            all_actions.append(step["action"].numpy().astype("float32"))
            all_proprios.append(step["observation"]["state"].numpy().astype("float32").flatten())

    all_actions = np.stack(all_actions)
    all_proprios = np.stack(all_proprios)
    return b.info.name, all_actions, all_proprios


def seed_document(name: str, all_actions: np.ndarray, all_proprios: np.ndarray) -> dict:
    """The rest of the seed's script: its stats and output document (not written to a file)."""

    def stats(arr):
        return {
            "mean": arr.mean(0).tolist(),
            "std": arr.std(0).tolist(),
            "q01": np.percentile(arr, 1, 0).tolist(),
            "q99": np.percentile(arr, 99, 0).tolist(),
            "min": arr.min(0).tolist(),
            "max": arr.max(0).tolist(),
        }

    return {
        name: {
            "action": stats(all_actions),
            "proprio": stats(all_proprios),
            "num_samples": len(all_actions),
        }
    }


def exact_moments(actions: np.ndarray, proprios: np.ndarray) -> dict:
    """float64 mean and std of the rows: what the seed's float32 reductions approximate."""
    return {
        key: {"mean": wide.mean(0).tolist(), "std": wide.std(0).tolist()}
        for key, wide in (
            ("action", actions.astype(np.float64)),
            ("proprio", proprios.astype(np.float64)),
        )
    }


def main() -> None:
    version_dir = sys.argv[1]
    hello = {"tf": tf.__version__, "tfds": tfds.__version__, "numpy": np.__version__}
    print(json.dumps({**hello, "import_seconds": _IMPORT_SECONDS}), flush=True)
    rows: tuple[str, np.ndarray, np.ndarray] | None = None
    for line in sys.stdin:
        if line.strip() == "run":
            rows = seed_rows(version_dir)
            print(json.dumps({"out": seed_document(*rows)}), flush=True)
        elif line.strip() == "check" and rows:
            print(json.dumps(exact_moments(rows[1], rows[2])), flush=True)


if __name__ == "__main__":
    main()
