"""`tf.train.Example` protobuf messages, decoded and encoded by hand (no TensorFlow, no protoc).

Wire format (tensorflow/core/example/example.proto, feature.proto):

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }   # map entry: key = 1, value = 2
    Feature  { oneof kind { BytesList bytes_list = 1; FloatList float_list = 2;
                            Int64List int64_list = 3; } }
    BytesList { repeated bytes value = 1; }
    FloatList { repeated float value = 1 [packed = true]; }
    Int64List { repeated int64 value = 1 [packed = true]; }

The decoder accepts packed and unpacked repeated fields and skips unknown fields. Given `keys`,
it reads each map entry's key and skips the value of every other entry by its length, so image
bytes are never touched. Packed floats become numpy views of the record (no copy).
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterator, Mapping, Sequence

import numpy as np

_LEN = 2  # wire type of length-delimited fields
_FIXED32 = struct.Struct("<f")


class ProtoError(ValueError):
    """The bytes are not a well-formed tf.train.Example."""


def parse_example(
    buf: bytes, keys: Collection[str] | None = None
) -> dict[str, np.ndarray | list[bytes]]:
    """Decode the features of one serialized Example; only `keys` when given.

    Each value is a float32 or int64 array, or the list of byte strings.
    """
    out: dict[str, np.ndarray | list[bytes]] = {}
    try:
        for field, start, end in _fields(buf, 0, len(buf)):
            if field == 1:
                _parse_features(buf, start, end, keys, out)
    except IndexError:
        raise ProtoError("truncated message") from None
    return out


def _parse_features(
    buf: bytes,
    start: int,
    end: int,
    keys: Collection[str] | None,
    out: dict[str, np.ndarray | list[bytes]],
) -> None:
    for field, entry_start, entry_end in _fields(buf, start, end):
        if field != 1:
            continue
        key = None
        value_span = None
        for sub, sub_start, sub_end in _fields(buf, entry_start, entry_end):
            if sub == 1:
                key = buf[sub_start:sub_end].decode("utf-8")
            elif sub == 2:
                value_span = (sub_start, sub_end)
        if key is None or (keys is not None and key not in keys):
            continue
        out[key] = _parse_feature(buf, *value_span) if value_span else []


def _parse_feature(buf: bytes, start: int, end: int) -> np.ndarray | list[bytes]:
    value: np.ndarray | list[bytes] = []
    for field, list_start, list_end in _fields(buf, start, end):
        if field == 1:
            value = [buf[s:e] for f, s, e in _fields(buf, list_start, list_end) if f == 1]
        elif field == 2:
            value = _parse_floats(buf, list_start, list_end)
        elif field == 3:
            value = _parse_ints(buf, list_start, list_end)
    return value


def _parse_floats(buf: bytes, start: int, end: int) -> np.ndarray:
    pieces: list[np.ndarray] = []
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        if tag == (1 << 3) | _LEN:
            size, pos = _varint(buf, pos)
            if size % 4:
                raise ProtoError("packed float list length is not a multiple of 4")
            pieces.append(np.frombuffer(buf, dtype="<f4", count=size // 4, offset=pos))
            pos += size
        elif tag == (1 << 3) | 5:
            pieces.append(np.array(_FIXED32.unpack_from(buf, pos), dtype=np.float32))
            pos += 4
        else:
            pos = _skip(buf, pos, tag)
    return _join(pieces, np.float32)


def _parse_ints(buf: bytes, start: int, end: int) -> np.ndarray:
    pieces: list[np.ndarray] = []
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        if tag == (1 << 3) | _LEN:
            size, pos = _varint(buf, pos)
            pieces.append(_varints(np.frombuffer(buf, dtype=np.uint8, count=size, offset=pos)))
            pos += size
        elif tag == 1 << 3:
            value, pos = _varint(buf, pos)
            pieces.append(np.array([value], dtype=np.uint64).view(np.int64))
        else:
            pos = _skip(buf, pos, tag)
    return _join(pieces, np.int64)


def _join(pieces: list[np.ndarray], dtype: type) -> np.ndarray:
    if len(pieces) == 1:
        return pieces[0]
    if not pieces:
        return np.zeros(0, dtype=dtype)
    return np.concatenate(pieces).astype(dtype, copy=False)


def _varints(raw: np.ndarray) -> np.ndarray:
    """Decode a packed run of varints at once (bool and int features, one per step)."""
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.flatnonzero(raw < 0x80)
    if ends.size == 0 or ends[-1] != raw.size - 1:
        raise ProtoError("packed varints end mid-value")
    starts = np.concatenate([[0], ends[:-1] + 1])
    sizes = ends - starts + 1
    if sizes.max() > 10:
        raise ProtoError("varint longer than 10 bytes")
    values = np.zeros(ends.size, dtype=np.uint64)
    for k in range(int(sizes.max())):
        more = sizes > k
        part = (raw[starts[more] + k] & 0x7F).astype(np.uint64)
        values[more] |= part << np.uint64(7 * k)
    return values.view(np.int64)


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """Yield (field number, start, end) of each length-delimited field; skip the others."""
    while pos < end:
        tag, pos = _varint(buf, pos)
        if tag & 7 == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ProtoError("field runs past the end of its message")
            yield tag >> 3, pos, pos + size
            pos += size
        else:
            pos = _skip(buf, pos, tag)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    byte = buf[pos]
    if byte < 0x80:
        return byte, pos + 1
    result = byte & 0x7F
    shift = 7
    while True:
        pos += 1
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos + 1
        shift += 7


def _skip(buf: bytes, pos: int, tag: int) -> int:
    wire = tag & 7
    if wire == 0:
        return _varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == _LEN:
        size, pos = _varint(buf, pos)
        return pos + size
    if wire == 5:
        return pos + 4
    raise ProtoError(f"unsupported wire type {wire}")


# --- encoding -------------------------------------------------------------------------------


def encode_example(features: Mapping[str, object], *, packed: bool = True) -> bytes:
    """Serialize features (keys sorted, as deterministic serialization does).

    Values: a float numpy array (FloatList), an integer or bool numpy array (Int64List), or
    a sequence of bytes/str (BytesList). `packed=False` writes repeated scalars one tag each,
    which readers must accept too.
    """
    entries = []
    for key in sorted(features):
        feature = _encode_feature(features[key], packed)
        entry = _len_field(1, key.encode("utf-8")) + _len_field(2, feature)
        entries.append(_len_field(1, entry))
    return _len_field(1, b"".join(entries))


def _encode_feature(value: object, packed: bool) -> bytes:
    if isinstance(value, np.ndarray):
        flat = value.reshape(-1)
        if np.issubdtype(flat.dtype, np.floating):
            floats = flat.astype("<f4")
            if packed:
                body = _len_field(1, floats.tobytes()) if floats.size else b""
            else:
                body = b"".join(b"\x0d" + _FIXED32.pack(v) for v in floats.tolist())
            return _len_field(2, body)
        if np.issubdtype(flat.dtype, np.integer) or flat.dtype == np.bool_:
            ints = flat.astype(np.int64).tolist()
            if packed:
                raw = b"".join(_varint_bytes(v) for v in ints)
                body = _len_field(1, raw) if ints else b""
            else:
                body = b"".join(b"\x08" + _varint_bytes(v) for v in ints)
            return _len_field(3, body)
        raise TypeError(f"cannot encode a {flat.dtype} array as a Feature")
    if isinstance(value, Sequence) and not isinstance(value, (bytes, str)):
        items = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in value]
        return _len_field(1, b"".join(_len_field(1, item) for item in items))
    raise TypeError(f"cannot encode {type(value).__name__} as a Feature")


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint_bytes((number << 3) | _LEN) + _varint_bytes(len(payload)) + payload


def _varint_bytes(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64: ten bytes of two's complement
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
