"""Dataset statistics for normalisation: RLDS/TFDS without TensorFlow, LeRobot parquet.

Modules: `crc32c` and `tfrecord` (framing), `example` (tf.train.Example protobuf), `rlds` and
`lerobot` (readers), `compute` (exact per-dimension statistics and checks), `formats` (the
output files), `samples` (writers of both formats), `command` (what the CLI and the
`dataset_stats` step call). This package imports numpy and pyarrow; only the controller and the
agent's venv import it.
"""
