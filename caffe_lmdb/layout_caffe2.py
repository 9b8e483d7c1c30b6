"""Caffe2's image LMDBs: one serialized `caffe2.TensorProtos` per key, as NVIDIA DALI's `readers.caffe2` reads them.

The tensors of a value, in order (Caffe2's ImageInputOp and DALI agree on them):

* the **image**: `data_type` STRING with the encoded file (JPEG, PNG, ...) in `string_data[0]`,
  or BYTE with raw uint8 pixels in `byte_data`, `dims` (H, W) or (H, W, C) with C 1 or 3, stored
  H x W x C in OpenCV's BGR order (both readers wrap the bytes as an OpenCV image). Other image
  types are refused when the sample is read: FLOAT image tensors (Caffe2's
  `lmdb_create_example.py` writes random C x H x W floats) carry no pixel scale or channel order,
  and Caffe2's ImageInputOp refuses them too.
* the **label**: INT32 (`int32_data`), INT64 (`int64_data`) or FLOAT (`float_data`). One value is the
  target (an int, or a float for a FLOAT label); several (a multi-label record: DALI's sparse label
  indices, or a dense label vector) make the target the list of them. A value holding the image
  alone (DALI's `label_type=4`, no label) has the target None.
* further tensors (Caffe2's bounding box: INT32 ymin, xmin, height, width; DALI's additional
  inputs; the weights of a weighted multi-label record) are not read.

Keys: Caffe2's examples write `str(i)`. Caffe2 and DALI read an LMDB in key order (0, 1, 10, 100,
...); here sample i is key `str(i)`, numeric order: computed from the entry count when the keys
are exactly `0`..`n-1` (first keys decimal, `str(n-1)` present, `str(n)` absent), else every key
from the key index, sorted numerically when all are decimal, in LMDB order otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet

from .errors import DatumError
from .layouts import Layout, Probe
from .proto import caffe2_pb2

TensorProto = caffe2_pb2.TensorProto
TensorProtos = caffe2_pb2.TensorProtos

#: Decimal keys this long or shorter sort numerically as int64 (19 digits could overflow).
_MAX_SORTED_DIGITS = 18
#: Label tensor types and the field holding their values.
_LABEL_FIELDS = {TensorProto.INT32: "int32_data", TensorProto.INT64: "int64_data", TensorProto.FLOAT: "float_data"}


def parse_tensor_protos(value: Any) -> TensorProtos:
    """A serialized `caffe2.TensorProtos` (an LMDB value), refusing anything that is not one.

    Strict, so that detection never takes another record for one: fields TensorProtos or
    TensorProto does not have, a field of the wrong wire type (a Caffe Datum's field 1 is a varint,
    TensorProtos' a message) and a `data_type` outside Caffe2's enum are all unknown fields here.

    Raises:
        DatumError: the bytes are not a TensorProtos (no LMDB or key: the reader adds both).
    """
    protos = TensorProtos()
    try:
        protos.ParseFromString(bytes(value))
    except DecodeError as exc:
        raise DatumError(f"not a Caffe2 TensorProtos ({len(value)} bytes that do not parse: {exc})") from None
    if len(UnknownFieldSet(protos)) or any(len(UnknownFieldSet(proto)) for proto in protos.protos):
        raise DatumError(f"not a Caffe2 TensorProtos ({len(value)} bytes with fields it does not have)")
    return protos


def tensor_image(proto: TensorProto) -> bytes | np.ndarray:
    """The image tensor as its encoded bytes (STRING) or H x W x 3 RGB / H x W gray uint8 pixels (BYTE).

    The declared `dims` are checked against the stored bytes before any array is made, so a
    record claiming 10**12 pixels is one error line, never an allocation.

    Raises:
        DatumError: another data type, or dims that do not match the data.
    """
    kind = TensorProto.DataType.Name(proto.data_type)
    if proto.data_type == TensorProto.STRING:
        if not proto.string_data:
            raise DatumError("image tensor of type STRING holds no string_data")
        return bytes(proto.string_data[0])
    if proto.data_type != TensorProto.BYTE:
        why = " (float tensors have no known pixel scale or channel order)" if kind in ("FLOAT", "DOUBLE") else ""
        raise DatumError(f"image tensor has data_type {kind}{why}; caffe-lmdb reads STRING (encoded) and "
                         "BYTE (raw H x W x C uint8) images, as Caffe2's ImageInputOp and DALI do")
    dims = list(proto.dims)
    channels = dims[2] if len(dims) == 3 else 1
    if len(dims) not in (2, 3) or channels not in (1, 3) or min(dims) <= 0:
        raise DatumError(f"BYTE image tensor has dims {dims}; expected H, W or H, W, C with C 1 or 3")
    data = proto.byte_data
    if math.prod(dims) != len(data):
        raise DatumError(f"BYTE image tensor dims {dims} declare {math.prod(dims)} bytes "
                         f"but byte_data holds {len(data)}")
    pixels = np.frombuffer(data, dtype=np.uint8).reshape(dims[0], dims[1], channels)
    return pixels[:, :, 0].copy() if channels == 1 else pixels[:, :, ::-1].copy()  # BGR -> RGB


def tensor_label(proto: TensorProto) -> int | float | list[int] | list[float]:
    """The label tensor's value: one number, or the list of them for a multi-label record.

    Raises:
        DatumError: a type other than INT32, INT64 or FLOAT, or no values.
    """
    field = _LABEL_FIELDS.get(proto.data_type)
    if field is None:
        raise DatumError(f"label tensor has data_type {TensorProto.DataType.Name(proto.data_type)}; "
                         "expected INT32, INT64 or FLOAT")
    values = list(getattr(proto, field))
    if not values:
        raise DatumError(f"label tensor of type {TensorProto.DataType.Name(proto.data_type)} holds no values")
    return values[0] if len(values) == 1 else values


def numeric_order(keys: np.ndarray) -> np.ndarray:
    """`keys` sorted by their number when all are decimal (`0, 1, 2, ..., 10`), else unchanged (LMDB order)."""
    if not len(keys) or not np.char.isdigit(keys).all() or np.char.str_len(keys).max() > _MAX_SORTED_DIGITS:
        return keys
    return keys[np.argsort(keys.astype(np.int64), kind="stable")]


class Caffe2Layout(Layout):
    """Caffe2 TensorProtos records; the target is the label tensor (int, or a list for multi-label)."""

    name = "caffe2"

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype="S1")

    @classmethod
    def detect(cls, probe: Probe) -> Caffe2Layout | None:
        if not probe.first_keys:
            return None
        value = probe.value(probe.first_keys[0])
        if value is None:
            return None
        try:
            protos = parse_tensor_protos(value)
        except DatumError:
            return None
        first = protos.protos[0] if protos.protos else None
        if first is None or not first.HasField("data_type") or first.data_type == TensorProto.UNDEFINED:
            return None
        return cls()

    def open(self, probe: Probe) -> None:
        count = probe.entries
        if (count and all(key.isdigit() for key in probe.first_keys)
                and probe.value(str(count - 1).encode()) is not None and probe.value(str(count).encode()) is None):
            self.keys = np.arange(count).astype(f"S{len(str(count - 1))}")  # exactly 0..n-1: no scan needed
            return
        self.keys = numeric_order(probe.all_keys())

    def __len__(self) -> int:
        return len(self.keys)

    def sample_keys(self, index: int) -> Sequence[bytes]:
        return (self.keys[index],)

    def stored(self, values: Sequence[Any]) -> tuple[tuple[bytes | np.ndarray, ...], Any]:
        protos = parse_tensor_protos(values[0])
        if not protos.protos:
            raise DatumError("TensorProtos holds no tensors (expected an image, then a label)")
        target = tensor_label(protos.protos[1]) if len(protos.protos) > 1 else None
        return (tensor_image(protos.protos[0]),), target

    def describe(self) -> str:
        return "caffe2 (Caffe2 TensorProtos records; target: the label tensor, a list for multi-label)"
