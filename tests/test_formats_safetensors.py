"""The stdlib safetensors reader/writer, against hand-built files and the reference library."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from provision.formats.safetensors import SafetensorsError, read_header, write_file


def test_round_trip_keeps_names_shapes_dtypes_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_file(
        path,
        {
            "a.weight": ("BF16", [4, 3], bytes(range(24))),
            "b.bias": ("F32", [5], None),
            "scalar": ("I64", [], (7).to_bytes(8, "little")),
        },
        metadata={"format": "pt"},
    )
    header = read_header(path)
    assert list(header.tensors) == ["a.weight", "b.bias", "scalar"]
    assert header.tensors["a.weight"].shape == (4, 3)
    assert header.tensors["b.bias"].dtype == "F32"
    assert header.tensors["scalar"].numel == 1
    assert header.metadata == {"format": "pt"}
    assert (8 + header.header_bytes) % 8 == 0
    assert header.file_bytes == 8 + header.header_bytes + 24 + 20 + 8
    data = path.read_bytes()[8 + header.header_bytes :]
    assert data[:24] == bytes(range(24))
    assert data[24:44] == bytes(20)
    assert data[44:] == (7).to_bytes(8, "little")


def test_zero_tensors_stay_sparse(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    write_file(path, {f"layer{i}.weight": ("BF16", [1024, 1024], None) for i in range(64)})
    assert path.stat().st_size > 128 * 2**20
    assert path.stat().st_blocks * 512 < 2**20
    assert len(read_header(path).tensors) == 64


def _raw(path: Path, header: dict, data_bytes: int) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(data_bytes))


@pytest.mark.parametrize(
    ("header", "data_bytes", "message"),
    [
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 4, "truncated"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, "holds 12"),
        ({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "needs 12"),
        ({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, 8, "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, 8, "shape"),
        (
            {
                "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]},
            },
            6,
            "overlaps",
        ),
        (
            {
                "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                "b": {"dtype": "U8", "shape": [4], "data_offsets": [6, 10]},
            },
            10,
            "gap",
        ),
        ({"__metadata__": {"k": 1}}, 0, "__metadata__"),
        ([1, 2], 0, "not a JSON object"),
    ],
)
def test_malformed_headers_are_named(
    tmp_path: Path, header: dict, data_bytes: int, message: str
) -> None:
    path = tmp_path / "bad.safetensors"
    _raw(path, header, data_bytes)
    with pytest.raises(SafetensorsError, match=message):
        read_header(path)


def test_garbage_and_short_files(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(SafetensorsError, match="too short"):
        read_header(short)
    huge = tmp_path / "huge"
    huge.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(SafetensorsError, match="does not fit"):
        read_header(huge)
    notjson = tmp_path / "notjson"
    notjson.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(SafetensorsError, match="not valid JSON"):
        read_header(notjson)


def test_agrees_with_the_reference_library(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors")
    numpy_io = pytest.importorskip("safetensors.numpy")
    import numpy as np

    ours = tmp_path / "ours.safetensors"
    theirs = tmp_path / "theirs.safetensors"
    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "idx": np.array([1, 2, 3], dtype=np.int64),
        "flag": np.array([True, False]),
    }
    names = {np.dtype("float32"): "F32", np.dtype("int64"): "I64", np.dtype("bool"): "BOOL"}
    write_file(ours, {k: (names[v.dtype], list(v.shape), v.tobytes()) for k, v in arrays.items()})
    loaded = numpy_io.load_file(str(ours))
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value)
    numpy_io.save_file(arrays, str(theirs), metadata={"format": "np"})
    header = read_header(theirs)
    assert {k: (t.dtype, t.shape) for k, t in header.tensors.items()} == {
        k: (names[v.dtype], v.shape) for k, v in arrays.items()
    }
    assert header.metadata == {"format": "np"}
    assert safetensors.__version__
