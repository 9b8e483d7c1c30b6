"""A hand-written protobuf wire-format encoder, independent of the generated caffe_pb2, for tests."""

from __future__ import annotations

import struct

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


def varint(value: int) -> bytes:
    if value < 0:  # int32/int64 negatives are sign-extended to 64 bits
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint((field << 3) | wire_type)


def field_varint(field: int, value: int) -> bytes:
    return tag(field, VARINT) + varint(value)


def field_bytes(field: int, payload: bytes) -> bytes:
    return tag(field, LENGTH) + varint(len(payload)) + payload


def field_float(field: int, value: float) -> bytes:
    return tag(field, FIXED32) + struct.pack("<f", value)


def packed_floats(field: int, values) -> bytes:
    return field_bytes(field, b"".join(struct.pack("<f", v) for v in values))


def packed_doubles(field: int, values) -> bytes:
    return field_bytes(field, b"".join(struct.pack("<d", v) for v in values))


def packed_varints(field: int, values) -> bytes:
    return field_bytes(field, b"".join(varint(v) for v in values))
