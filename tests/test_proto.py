"""The vendored caffe.proto: Caffe's field numbers, and the one-line error without `make proto`."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO
from wire import field_bytes, field_varint, packed_doubles, packed_floats, packed_varints

from caffe_lmdb import caffe_pb2


def test_blobproto_legacy_fields_and_packed_data():
    blob = caffe_pb2.BlobProto(num=1, channels=3, height=1, width=2)
    blob.data.extend([0.5, 1.5, 2.5, 3.5, 4.5, 5.5])
    expected = (
        field_varint(1, 1) + field_varint(2, 3) + field_varint(3, 1) + field_varint(4, 2)
        + packed_floats(5, [0.5, 1.5, 2.5, 3.5, 4.5, 5.5])
    )
    assert blob.SerializeToString() == expected


def test_blobproto_shape_and_double_data_are_packed():
    blob = caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[1, 3, 300]))
    blob.double_data.extend([0.25])
    assert blob.SerializeToString() == field_bytes(7, packed_varints(1, [1, 3, 300])) + packed_doubles(8, [0.25])


def test_blobprotovector():
    vector = caffe_pb2.BlobProtoVector(blobs=[caffe_pb2.BlobProto(num=2)])
    assert vector.SerializeToString() == field_bytes(1, field_varint(1, 2))


def test_datum_defaults():
    datum = caffe_pb2.Datum()
    assert (datum.channels, datum.height, datum.width, datum.label, datum.encoded) == (0, 0, 0, 0, False)
    assert not datum.HasField("encoded")
    assert caffe_pb2.DESCRIPTOR.package == "caffe"


def test_import_without_generated_module_says_run_make_proto(tmp_path):
    # A renamed copy, so that an editable install of the real package cannot shadow it.
    package = tmp_path / "caffe_lmdb_without_pb2"
    shutil.copytree(REPO / "caffe_lmdb", package, ignore=shutil.ignore_patterns("caffe_pb2.py*", "__pycache__"))
    result = subprocess.run(
        [sys.executable, "-c", "import caffe_lmdb_without_pb2"],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "ProtoNotGeneratedError" in last_line and "run `make proto`" in last_line
    assert "ModuleNotFoundError" not in result.stderr
