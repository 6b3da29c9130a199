"""TFRecord framing: round trip, and damaged files fail naming the file and the byte offset."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from provision.stats.crc32c import crc32c_small, masked
from provision.stats.errors import DatasetError
from provision.stats.tfrecord import frame, read_records, write_records

RECORDS = [b"first", b"", b"x" * 70_000, b"last"]


def _offsets(records: list[bytes]) -> list[int]:
    out, pos = [], 0
    for record in records:
        out.append(pos)
        pos += 16 + len(record)
    return out


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "d-train.tfrecord-00000-of-00001"
    assert write_records(path, RECORDS) == 4
    assert read_records(path) == RECORDS
    assert path.stat().st_size == sum(16 + len(r) for r in RECORDS)


def test_framing_is_tensorflows() -> None:
    data = b"hello"
    out = frame(data)
    length = struct.pack("<Q", 5)
    assert out[:8] == length
    assert struct.unpack("<I", out[8:12])[0] == masked(crc32c_small(length))
    assert out[12:17] == data
    assert struct.unpack("<I", out[17:])[0] == masked(crc32c_small(data))


def test_flipped_data_byte_names_file_and_record_offset(tmp_path: Path) -> None:
    path = tmp_path / "shard"
    write_records(path, RECORDS)
    damaged = bytearray(path.read_bytes())
    record_start = _offsets(RECORDS)[2]
    damaged[record_start + 12 + 40_000] ^= 0x10
    path.write_bytes(bytes(damaged))
    with pytest.raises(DatasetError) as err:
        read_records(path)
    message = str(err.value)
    assert str(path) in message
    assert f"record 2 at byte offset {record_start}: data CRC mismatch" in message
    assert "download it again" in err.value.hint


def test_damaged_length_is_caught_before_it_is_trusted(tmp_path: Path) -> None:
    path = tmp_path / "shard"
    write_records(path, RECORDS)
    damaged = bytearray(path.read_bytes())
    start = _offsets(RECORDS)[3]
    damaged[start] ^= 0x01
    path.write_bytes(bytes(damaged))
    with pytest.raises(DatasetError, match=f"record 3 at byte offset {start}: length CRC"):
        read_records(path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "shard"
    write_records(path, RECORDS)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DatasetError, match=r"record 3 at byte offset \d+ is truncated"):
        read_records(path)
    path.write_bytes(path.read_bytes()[: _offsets(RECORDS)[1] + 5])
    with pytest.raises(DatasetError, match="truncated record header at byte offset 21"):
        read_records(path)
