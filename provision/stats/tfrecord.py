"""TFRecord files: read and write the framing, verifying both CRCs of every record.

A record is: length (u64 little-endian), masked CRC-32C of those 8 bytes (u32), the data, masked
CRC-32C of the data (u32). A damaged file fails with the file and the byte offset of the record,
never with a half-read dataset.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from provision.agent.files import atomic_writer
from provision.stats.crc32c import crc32c_many, crc32c_small, masked, masked_many
from provision.stats.errors import DatasetError

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_REDOWNLOAD = "the file is damaged or was not fully copied: download it again"


def read_records(path: Path) -> list[bytes]:
    """Every record of one TFRecord file, in order, after verifying their CRCs."""
    records: list[bytes] = []
    offsets: list[int] = []
    stored: list[int] = []
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        offset = 0
        while offset < size:
            header = fh.read(_HEADER.size)
            if len(header) < _HEADER.size:
                raise DatasetError(
                    f"{path}: truncated record header at byte offset {offset}", _REDOWNLOAD
                )
            length, length_crc = _HEADER.unpack(header)
            if masked(crc32c_small(header[:8])) != length_crc:
                raise DatasetError(
                    f"{path}: record {len(records)} at byte offset {offset}: "
                    "length CRC mismatch (not a TFRecord file, or damaged)",
                    _REDOWNLOAD,
                )
            if offset + _HEADER.size + length + _FOOTER.size > size:
                raise DatasetError(
                    f"{path}: record {len(records)} at byte offset {offset} is truncated "
                    f"({length} bytes announced, file ends at {size})",
                    _REDOWNLOAD,
                )
            records.append(fh.read(length))
            (crc,) = _FOOTER.unpack(fh.read(_FOOTER.size))
            stored.append(crc)
            offsets.append(offset)
            offset += _HEADER.size + length + _FOOTER.size
    if records:
        _check_data_crcs(path, records, offsets, stored)
    return records


def _check_data_crcs(
    path: Path, records: list[bytes], offsets: list[int], stored: list[int]
) -> None:
    computed = masked_many(crc32c_many(records))
    bad = np.flatnonzero(computed != np.array(stored, dtype=np.uint32))
    if bad.size:
        i = int(bad[0])
        raise DatasetError(
            f"{path}: record {i} at byte offset {offsets[i]}: data CRC mismatch "
            f"(stored {stored[i]:#010x}, computed {int(computed[i]):#010x})"
            + (f"; {bad.size} damaged records in all" if bad.size > 1 else ""),
            _REDOWNLOAD,
        )


def frame(data: bytes) -> bytes:
    """One record with its framing, as TensorFlow's TFRecordWriter writes it."""
    length = struct.pack("<Q", len(data))
    crc = int(crc32c_many([data])[0])
    return length + _FOOTER.pack(masked(crc32c_small(length))) + data + _FOOTER.pack(masked(crc))


def write_records(path: Path, records: Iterable[bytes]) -> int:
    """Write records to a new TFRecord file (atomically: `files.atomic_writer`); returns the
    number written."""
    count = 0
    with atomic_writer(path, binary=True) as fh:
        for data in records:
            fh.write(frame(data))
            count += 1
    return count
