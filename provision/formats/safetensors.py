"""safetensors files without torch: read and validate the header, write small files.

Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian unsigned header
length N, then N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...,
"__metadata__": {str: str}}` (possibly padded with spaces), then the data buffer. Offsets are
relative to the buffer; tensors must tile it exactly, without gaps or overlaps.

Reading only the header costs two small reads however large the file is (7.2 GB for pi0.5), so
checks can run it on every `plan`.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: Bytes per element of every dtype the format defines.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

#: The reference implementation refuses larger headers; so do we (a corrupt length is huge).
MAX_HEADER_BYTES = 100_000_000

METADATA_KEY = "__metadata__"


class SafetensorsError(ValueError):
    """The file is not a valid safetensors file; the message says what is wrong."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry; `begin`/`end` are offsets into the data buffer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in file order, the metadata, and the sizes."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_bytes: int
    file_bytes: int


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of the safetensors file at `path`.

    Raises OSError when the file cannot be read and SafetensorsError when it is malformed:
    truncated, a header that is not a JSON object, an unknown dtype, a tensor whose byte size
    does not match its shape, or offsets that do not tile the data buffer.
    """
    with open(path, "rb") as fh:
        file_bytes = os.fstat(fh.fileno()).st_size
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise SafetensorsError(f"{file_bytes} bytes: too short for a header length")
        (size,) = struct.unpack("<Q", prefix)
        if size > MAX_HEADER_BYTES or size > file_bytes - 8:
            raise SafetensorsError(
                f"header length {size} does not fit the file ({file_bytes} bytes)"
            )
        raw = fh.read(size)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SafetensorsError(f"header is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SafetensorsError("header is not a JSON object")
    metadata = _metadata(data.pop(METADATA_KEY, None))
    tensors = [_tensor(name, entry) for name, entry in data.items()]
    _check_tiling(tensors, file_bytes - 8 - size)
    tensors.sort(key=lambda t: t.begin)
    return Header({t.name: t for t in tensors}, metadata, size, file_bytes)


def _metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise SafetensorsError(f"{METADATA_KEY} must map strings to strings")
    return dict(value)


def _tensor(name: str, entry: object) -> TensorInfo:
    if not isinstance(entry, dict):
        raise SafetensorsError(f"tensor {name!r}: entry is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise SafetensorsError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise SafetensorsError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_natural(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise SafetensorsError(f"tensor {name!r}: bad data_offsets {offsets!r}")
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    expected = info.numel * DTYPE_SIZES[dtype]
    if info.end - info.begin != expected:
        raise SafetensorsError(
            f"tensor {name!r}: {info.end - info.begin} bytes, but {dtype} {list(shape)} "
            f"needs {expected}"
        )
    return info


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tiling(tensors: Sequence[TensorInfo], buffer_bytes: int) -> None:
    """Offsets must cover [0, buffer_bytes) exactly once, as the reference reader demands."""
    position = 0
    for info in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            what = "overlaps the previous tensor" if info.begin < position else "leaves a gap"
            raise SafetensorsError(
                f"tensor {info.name!r} starts at {info.begin}, expected {position}: {what}"
            )
        position = info.end
    if position != buffer_bytes:
        raise SafetensorsError(
            f"tensors cover {position} data bytes but the file holds {buffer_bytes}"
            + (" (truncated?)" if position > buffer_bytes else "")
        )


def write_file(
    path: str | os.PathLike[str],
    tensors: Mapping[str, tuple[str, Sequence[int], bytes | None]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file holding `tensors` (name: dtype, shape, raw bytes) in order.

    A tensor whose bytes are None is all zeros and is not written at all: the file is extended
    with `truncate`, so stand-ins with full-size shapes stay sparse and cheap on disk.
    """
    header: dict[str, object] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    position = 0
    for name, (dtype, shape, data) in tensors.items():
        if dtype not in DTYPE_SIZES:
            raise SafetensorsError(f"tensor {name!r}: unknown dtype {dtype!r}")
        size = DTYPE_SIZES[dtype]
        for dim in shape:
            size *= dim
        if data is not None and len(data) != size:
            raise SafetensorsError(f"tensor {name!r}: {len(data)} bytes given, {size} needed")
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [position, position + size],
        }
        position += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # The reference writer pads the header with spaces so the buffer starts 8-byte aligned.
    encoded += b" " * (-len(encoded) % 8)
    start = 8 + len(encoded)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)))
        fh.write(encoded)
        for name, (_dtype, _shape, data) in tensors.items():
            if data:
                fh.seek(start + header[name]["data_offsets"][0])  # type: ignore[index]
                fh.write(data)
        fh.truncate(start + position)
