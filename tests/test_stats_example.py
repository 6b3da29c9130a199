"""tf.train.Example codec: golden bytes, and round trips through the real protobuf runtime."""

from __future__ import annotations

import numpy as np
import pytest

from provision.stats.example import ProtoError, encode_example, parse_example


def _example_class():
    """tensorflow.Example built from its .proto definition with the protobuf library."""
    pb = pytest.importorskip("google.protobuf.descriptor_pb2")
    from google.protobuf import descriptor_pool, message_factory

    f = pb.FieldDescriptorProto
    file = pb.FileDescriptorProto(name="stats_test_example.proto", package="tensorflow")
    file.syntax = "proto3"

    def message(name: str, *fields: pb.FieldDescriptorProto) -> pb.DescriptorProto:
        msg = file.message_type.add(name=name)
        msg.field.extend(fields)
        return msg

    def repeated(type_: int, packed: bool) -> pb.FieldDescriptorProto:
        field = f(name="value", number=1, type=type_, label=f.LABEL_REPEATED)
        if packed:
            field.options.packed = True
        return field

    message("BytesList", repeated(f.TYPE_BYTES, False))
    message("FloatList", repeated(f.TYPE_FLOAT, True))
    message("Int64List", repeated(f.TYPE_INT64, True))
    feature = message(
        "Feature",
        *(
            f(name=n, number=i, type=f.TYPE_MESSAGE, type_name=f".tensorflow.{t}", oneof_index=0)
            for i, (n, t) in enumerate(
                [
                    ("bytes_list", "BytesList"),
                    ("float_list", "FloatList"),
                    ("int64_list", "Int64List"),
                ],
                1,
            )
        ),
    )
    feature.oneof_decl.add(name="kind")
    features = message(
        "Features",
        f(
            name="feature",
            number=1,
            type=f.TYPE_MESSAGE,
            label=f.LABEL_REPEATED,
            type_name=".tensorflow.Features.FeatureEntry",
        ),
    )
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.extend(
        [
            f(name="key", number=1, type=f.TYPE_STRING),
            f(name="value", number=2, type=f.TYPE_MESSAGE, type_name=".tensorflow.Feature"),
        ]
    )
    message(
        "Example",
        f(name="features", number=1, type=f.TYPE_MESSAGE, type_name=".tensorflow.Features"),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def test_golden_bytes_of_a_one_float_example() -> None:
    # Example{features{feature{key: "a" value{float_list{value: 1.0}}}}}, derived by hand
    golden = bytes.fromhex("0a0f0a0d0a0161120812060a040000803f")
    assert encode_example({"a": np.array([1.0], np.float32)}) == golden
    assert parse_example(golden)["a"].tolist() == [1.0]


FEATURES = {
    "steps/action": np.linspace(-1, 1, 14, dtype=np.float32),
    "steps/is_first": np.array([True, False]),
    "steps/big": np.array([-1, 0, 127, 128, 300, 2**40, -(2**63)], dtype=np.int64),
    "steps/observation/image": [b"\x89PNG" + bytes(50), b""],
    "steps/language_instruction": ["pick up the soup", "pick up the soup"],
    "steps/empty_floats": np.zeros(0, np.float32),
    "steps/empty_bytes": [],
}


@pytest.mark.parametrize("packed", [True, False])
def test_protobuf_parses_what_we_encode(packed: bool) -> None:
    example = _example_class()()
    example.ParseFromString(encode_example(FEATURES, packed=packed))
    feature = example.features.feature
    assert list(feature["steps/action"].float_list.value) == FEATURES["steps/action"].tolist()
    assert list(feature["steps/big"].int64_list.value) == FEATURES["steps/big"].tolist()
    assert list(feature["steps/is_first"].int64_list.value) == [1, 0]
    assert list(feature["steps/observation/image"].bytes_list.value) == [
        b"\x89PNG" + bytes(50),
        b"",
    ]
    assert feature["steps/empty_floats"].WhichOneof("kind") == "float_list"


@pytest.mark.parametrize("packed", [True, False])
def test_we_parse_what_protobuf_encodes(packed: bool) -> None:
    cls = _example_class()
    example = cls()
    feature = example.features.feature
    feature["f"].float_list.value.extend([0.5, -2.25, 3.0])
    feature["i"].int64_list.value.extend([-5, 0, 1 << 62])
    feature["b"].bytes_list.value.extend([b"abc", b"\x00\xff"])
    data = example.SerializeToString()
    if not packed:
        # the same values, unpacked: one tag per value (proto2 writers do this)
        data = encode_example(
            {
                "f": np.array([0.5, -2.25, 3.0], np.float32),
                "i": np.array([-5, 0, 1 << 62]),
                "b": [b"abc", b"\x00\xff"],
            },
            packed=False,
        )
    got = parse_example(data)
    assert got["f"].tolist() == [0.5, -2.25, 3.0]
    assert got["f"].dtype == np.float32
    assert got["i"].tolist() == [-5, 0, 1 << 62]
    assert got["b"] == [b"abc", b"\x00\xff"]


def test_only_requested_keys_are_decoded() -> None:
    data = encode_example(FEATURES)
    got = parse_example(data, {"steps/action", "steps/missing"})
    assert list(got) == ["steps/action"]
    np.testing.assert_array_equal(got["steps/action"], FEATURES["steps/action"])


def test_unknown_fields_are_skipped() -> None:
    # field 15 (varint) and field 9 (fixed64) before the features: a newer writer's extras
    extra = bytes([15 << 3, 0x96, 0x01, (9 << 3) | 1]) + bytes(8)
    data = extra + encode_example({"x": np.array([7], np.int64)})
    assert parse_example(data)["x"].tolist() == [7]


def test_truncated_message_is_an_error() -> None:
    data = encode_example(FEATURES)
    with pytest.raises(ProtoError):
        parse_example(data[:-3])
