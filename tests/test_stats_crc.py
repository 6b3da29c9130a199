"""CRC-32C: published check values, and the numpy code against google-crc32c's C code."""

from __future__ import annotations

import os

import numpy as np
import pytest

from provision.stats import crc32c

# RFC 3720 B.4 test vectors and the CRC catalogue's check value for "123456789".
VECTORS = [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
]


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_known_values(data: bytes, expected: int) -> None:
    assert crc32c.crc32c_small(data) == expected
    assert int(crc32c.crc32c_many([data], use_numpy=True)[0]) == expected
    assert crc32c.crc32c(data) == expected


def test_numpy_matches_reference_on_many_lengths() -> None:
    rng = np.random.default_rng(5)
    lengths = [0, 1, 3, 4, 5, 63, 64, 65, 255, 256, 1023, 1024, 1025, 70_000]
    lengths += rng.integers(0, 5000, 40).tolist()
    buffers = [rng.bytes(n) for n in lengths]
    numpy_crcs = crc32c.crc32c_many(buffers, use_numpy=True)
    reference = [crc32c.crc32c_small(b) for b in buffers[:20]]
    assert numpy_crcs[:20].tolist() == reference
    google = pytest.importorskip("google_crc32c")
    assert numpy_crcs.tolist() == [google.value(b) for b in buffers]


def test_large_buffer_uses_big_blocks_and_agrees() -> None:
    google = pytest.importorskip("google_crc32c")
    data = os.urandom(5_000_003)
    buffers = [data, memoryview(data)[17:4_000_000], b"x"]
    got = crc32c.crc32c_many(buffers, use_numpy=True).tolist()
    assert got == [google.value(bytes(b)) for b in buffers]
    assert crc32c.crc32c_many(buffers).tolist() == got


def test_mask_matches_tensorflow_definition() -> None:
    crc = 0xE3069283
    expected = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert crc32c.masked(crc) == expected
    assert int(crc32c.masked_many(np.array([crc], dtype=np.uint32))[0]) == expected
