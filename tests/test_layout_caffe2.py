"""Caffe2 TensorProtos LMDBs (what NVIDIA DALI's readers.caffe2 reads): field numbers, read-back, keys, refusals."""

from __future__ import annotations

import io
import pickle
import shutil
import subprocess
import sys

import cv2
import lmdb
import numpy as np
import pytest
from conftest import REPO, write_lmdb
from PIL import Image
from wire import field_bytes, field_varint, packed_doubles, packed_floats, packed_varints

from caffe_lmdb import ConvertOptions, LmdbDataset, write_dataset
from caffe_lmdb.datum import parse_datum_view
from caffe_lmdb.errors import DatumError, LmdbFormatError
from caffe_lmdb.layout_caffe2 import Caffe2Layout, numeric_order, parse_tensor_protos
from caffe_lmdb.proto import caffe2_pb2

TensorProto = caffe2_pb2.TensorProto


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _opencv_rgb(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def _record(image: TensorProto, *more: TensorProto) -> bytes:
    protos = caffe2_pb2.TensorProtos()
    protos.protos.append(image)
    protos.protos.extend(more)
    return protos.SerializeToString()


def _encoded_image(data: bytes) -> TensorProto:
    return TensorProto(data_type=TensorProto.STRING, string_data=[data])


def _raw_image(bgr: np.ndarray) -> TensorProto:
    """Raw pixels as Caffe2 stores them: BYTE, dims H, W[, C], H x W x C bytes in OpenCV's BGR order."""
    return TensorProto(data_type=TensorProto.BYTE, dims=list(bgr.shape), byte_data=bgr.tobytes())


def _label(*values: int) -> TensorProto:
    return TensorProto(data_type=TensorProto.INT32, int32_data=list(values))


# ---------------------------------------------------------------- the vendored schema: Caffe2's numbers

def test_tensorproto_field_numbers_and_wire_types_are_caffe2s():
    proto = TensorProto(dims=[2, 3], data_type=TensorProto.BYTE, byte_data=b"abcdef", name="img")
    assert proto.SerializeToString() == (field_varint(1, 2) + field_varint(1, 3) + field_varint(2, 3)
                                         + field_bytes(5, b"abcdef") + field_bytes(7, b"img"))
    numbers = TensorProto(data_type=TensorProto.INT32, float_data=[0.5], int32_data=[7, 8],
                          string_data=[b"x", b"yz"], double_data=[0.25], int64_data=[9])
    assert numbers.SerializeToString() == (
        field_varint(2, 2) + packed_floats(3, [0.5]) + packed_varints(4, [7, 8])
        + field_bytes(6, b"x") + field_bytes(6, b"yz") + packed_doubles(9, [0.25]) + packed_varints(10, [9]))
    assert caffe2_pb2.TensorProtos(protos=[TensorProto(data_type=4)]).SerializeToString() == field_bytes(
        1, field_varint(2, 4))
    assert TensorProto.DESCRIPTOR.fields_by_name["device_detail"].number == 8
    assert TensorProto.DESCRIPTOR.fields_by_name["segment"].number == 11
    assert TensorProto().data_type == TensorProto.FLOAT  # Caffe2's default
    assert dict(TensorProto.DataType.items()) == {
        "UNDEFINED": 0, "FLOAT": 1, "INT32": 2, "BYTE": 3, "STRING": 4, "BOOL": 5, "UINT8": 6, "INT8": 7,
        "UINT16": 8, "INT16": 9, "INT64": 10, "FLOAT16": 12, "DOUBLE": 13}
    assert caffe2_pb2.DESCRIPTOR.package == "caffe2"


# ---------------------------------------------------------------- read back exactly

def test_encoded_records_read_back_opencvs_pixels_and_labels_in_numeric_key_order(tmp_path, rng):
    stored = []
    for i in range(12):  # 12: key order is 0, 1, 10, 11, 2, ...; samples are 0, 1, 2, ..., 11
        data = _encoded(rng.integers(0, 256, size=(5 + i % 3, 8, 3), dtype=np.uint8), "JPEG" if i % 2 else "PNG")
        stored.append((data, i % 4))
    write_lmdb(tmp_path / "c2.lmdb", {str(i).encode(): _record(_encoded_image(data), _label(label))
                                  for i, (data, label) in enumerate(stored)})
    dataset = LmdbDataset(tmp_path / "c2.lmdb")
    assert dataset.layout.name == "caffe2" and len(dataset) == 12
    assert dataset.layout.keys.tolist() == [str(i).encode() for i in range(12)]
    for index, (data, label) in enumerate(stored):
        image, target = dataset[index]
        assert image.mode == "RGB" and target == label and type(target) is int
        np.testing.assert_array_equal(np.asarray(image), _opencv_rgb(data))
    images, target = dataset.layout.stored([_record(_encoded_image(stored[3][0]), _label(3))])
    assert images == (stored[3][0],) and target == 3  # migrate gets the file bytes unchanged


def test_raw_byte_records_are_hwc_bgr_pixels_color_and_gray(tmp_path, rng):
    color = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)  # BGR, as OpenCV holds it
    gray = rng.integers(0, 256, size=(4, 6), dtype=np.uint8)
    one_channel = rng.integers(0, 256, size=(3, 5, 1), dtype=np.uint8)
    write_lmdb(tmp_path / "raw.lmdb", {b"0": _record(_raw_image(color), _label(1)),
                                   b"1": _record(_raw_image(gray), _label(2)),
                                   b"2": _record(_raw_image(one_channel), _label(0))})
    dataset = LmdbDataset(tmp_path / "raw.lmdb")
    image, label = dataset[0]
    np.testing.assert_array_equal(np.asarray(image), cv2.cvtColor(color, cv2.COLOR_BGR2RGB))
    assert label == 1
    image, label = dataset[1]
    np.testing.assert_array_equal(np.asarray(image), cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB))
    assert image.mode == "RGB" and label == 2
    np.testing.assert_array_equal(np.asarray(dataset[2][0]), cv2.cvtColor(one_channel[:, :, 0], cv2.COLOR_GRAY2RGB))
    (pixels,), _ = dataset.layout.stored([_record(_raw_image(color), _label(1))])
    np.testing.assert_array_equal(pixels, color[:, :, ::-1])  # stored: H x W x 3 RGB uint8, for migrate


def test_labels_multi_label_float_none_and_extra_tensors(tmp_path, rng):
    data = _encoded(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8), "PNG")
    box = TensorProto(data_type=TensorProto.INT32, int32_data=[0, 0, 2, 2])  # Caffe2's bounding box: not read
    weights = TensorProto(data_type=TensorProto.FLOAT, float_data=[0.5, 0.25])
    write_lmdb(tmp_path / "labels.lmdb", {
        b"0": _record(_encoded_image(data), _label(4), box),
        b"1": _record(_encoded_image(data), _label(2, 7), weights),
        b"2": _record(_encoded_image(data), TensorProto(data_type=TensorProto.FLOAT, float_data=[0.75])),
        b"3": _record(_encoded_image(data), TensorProto(data_type=TensorProto.INT64, int64_data=[1 << 40])),
        b"4": _record(_encoded_image(data)),
    })
    dataset = LmdbDataset(tmp_path / "labels.lmdb")
    assert [dataset[i][1] for i in range(5)] == [4, [2, 7], 0.75, 1 << 40, None]
    assert all(np.array_equal(np.asarray(dataset[i][0]), _opencv_rgb(data)) for i in range(5))


def test_the_dataset_pickles_to_workers(tmp_path, rng):
    data = _encoded(rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8), "PNG")
    write_lmdb(tmp_path / "p.lmdb", {str(i).encode(): _record(_encoded_image(data), _label(i)) for i in range(3)})
    copy = pickle.loads(pickle.dumps(LmdbDataset(tmp_path / "p.lmdb")))
    assert [copy[i][1] for i in range(3)] == [0, 1, 2]


# ---------------------------------------------------------------- keys

def test_keys_with_gaps_sort_numerically_and_other_keys_keep_lmdb_order(tmp_path, rng):
    data = _encoded(rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8), "PNG")
    numbers = [0, 2, 5, 10, 100]
    write_lmdb(tmp_path / "gaps.lmdb", {str(n).encode(): _record(_encoded_image(data), _label(n)) for n in numbers})
    dataset = LmdbDataset(tmp_path / "gaps.lmdb")
    assert [dataset[i][1] for i in range(len(dataset))] == numbers
    names = [b"b-img", b"a-img", b"c-img"]
    write_lmdb(tmp_path / "names.lmdb", {key: _record(_encoded_image(data), _label(i)) for i, key in enumerate(names)})
    assert LmdbDataset(tmp_path / "names.lmdb").layout.keys.tolist() == sorted(names)


def test_numeric_order_is_vectorised_and_leaves_mixed_keys_alone():
    keys = np.array([b"10", b"9", b"007", b"100"])
    assert numeric_order(keys).tolist() == [b"007", b"9", b"10", b"100"]
    mixed = np.array([b"1", b"x"])
    assert numeric_order(mixed) is mixed
    assert numeric_order(np.array([b"9" * 25, b"1"])).tolist() == [b"9" * 25, b"1"]  # too long for int64: as is
    many = np.arange(200_000)[::-1].astype("S")
    assert numeric_order(many)[:3].tolist() == [b"0", b"1", b"2"]


# ---------------------------------------------------------------- refusals: one line naming the LMDB and the key

def test_declared_sizes_are_checked_before_any_allocation(tmp_path):
    huge = TensorProto(data_type=TensorProto.BYTE, dims=[10**9, 10**9, 3], byte_data=b"\0" * 6)
    short = TensorProto(data_type=TensorProto.BYTE, dims=[2, 2, 3], byte_data=b"\0" * 11)
    floats = TensorProto(data_type=TensorProto.FLOAT, dims=[3, 2, 2], float_data=[0.5] * 12)
    odd = TensorProto(data_type=TensorProto.BYTE, dims=[2, 2, 4], byte_data=b"\0" * 16)
    empty = TensorProto(data_type=TensorProto.STRING)
    write_lmdb(tmp_path / "bad.lmdb", {b"0": _record(huge, _label(1)), b"1": _record(short, _label(1)),
                                   b"2": _record(floats, _label(1)), b"3": _record(odd, _label(1)),
                                   b"4": _record(empty, _label(1)),
                                   b"5": _record(_encoded_image(b"x"), TensorProto(data_type=TensorProto.STRING))})
    dataset = LmdbDataset(tmp_path / "bad.lmdb")
    expected = [
        r"key b'0': BYTE image tensor dims \[1000000000, 1000000000, 3\] declare 3000000000000000000 bytes "
        r"but byte_data holds 6",
        r"key b'1': BYTE image tensor dims \[2, 2, 3\] declare 12 bytes but byte_data holds 11",
        r"key b'2': image tensor has data_type FLOAT \(float tensors have no known pixel scale",
        r"key b'3': BYTE image tensor has dims \[2, 2, 4\]",
        r"key b'4': image tensor of type STRING holds no string_data",
        r"key b'5': label tensor has data_type STRING",
    ]
    for index, message in enumerate(expected):
        with pytest.raises(DatumError, match=r"bad.lmdb: " + message) as info:
            dataset[index]
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- detection: neither Datum nor TensorProtos is the other

def test_a_datum_lmdb_is_not_caffe2_and_a_caffe2_lmdb_is_not_datum(tmp_path, rng):
    samples = [(rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8), i) for i in range(3)]
    write_dataset(samples, tmp_path / "raw.lmdb", workers=0)
    write_dataset(samples, tmp_path / "enc.lmdb", workers=0, options=ConvertOptions(encoded=True, encode_type="png"))
    for name in ("raw.lmdb", "enc.lmdb"):
        assert LmdbDataset(tmp_path / name).layout.name == "datum"
        with pytest.raises(LmdbFormatError, match="does not hold the 'caffe2' layout"):
            LmdbDataset(tmp_path / name, layout="caffe2")
        env = lmdb.open(str(tmp_path / name), readonly=True, lock=False)
        with env.begin() as txn:
            value = txn.get(b"00000000") or next(iter(txn.cursor()))[1]
        env.close()
        with pytest.raises(DatumError, match="not a Caffe2 TensorProtos"):
            parse_tensor_protos(value)
    record = _record(_encoded_image(_encoded(samples[0][0], "PNG")), _label(1))
    write_lmdb(tmp_path / "c2.lmdb", {b"0": record})
    with pytest.raises(DatumError, match="field 1 with wire type 2"):
        parse_datum_view(record)
    with pytest.raises(LmdbFormatError, match="does not hold the 'datum' layout"):
        LmdbDataset(tmp_path / "c2.lmdb", layout="datum")


def test_values_that_are_not_image_tensorprotos_are_not_detected(tmp_path):
    unknown_type = _record(_encoded_image(b"x")).replace(field_varint(2, 4), field_varint(2, 11))
    for value in (b"world", b"", caffe2_pb2.TensorProtos().SerializeToString(),
                  _record(TensorProto(dims=[1])), unknown_type,
                  field_bytes(1, field_varint(2, 4) + field_varint(12, 1))):  # a field TensorProto lacks
        write_lmdb(tmp_path / "x.lmdb", {b"0": value})
        with pytest.raises(LmdbFormatError, match="does not hold the 'caffe2' layout"):
            LmdbDataset(tmp_path / "x.lmdb", layout="caffe2")
        shutil.rmtree(tmp_path / "x.lmdb")
    assert Caffe2Layout.name == "caffe2"


def test_import_without_caffe2_pb2_says_run_make_proto(tmp_path):
    package = tmp_path / "caffe_lmdb_without_caffe2_pb2"
    shutil.copytree(REPO / "caffe_lmdb", package, ignore=shutil.ignore_patterns("caffe2_pb2.py*", "__pycache__"))
    result = subprocess.run([sys.executable, "-c", "import caffe_lmdb_without_caffe2_pb2"],
                            cwd=tmp_path, capture_output=True, text=True, check=False)
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0
    assert "ProtoNotGeneratedError" in last_line and "caffe2_pb2.py is missing: run `make proto`" in last_line
