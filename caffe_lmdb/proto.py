"""Loads the generated `caffe_pb2` and `caffe2_pb2` modules, or says in one line how to generate them.

The generated code is not committed: protobuf gencode must match the installed protobuf runtime
(new grpcio-tools emits code that refuses older runtimes, and old gencode breaks under new
runtimes with "Descriptors cannot be created directly"), so `make proto` or `pip install .`
generates it against the protobuf that is actually installed. `caffe_pb2` is Caffe's schema
(`proto/caffe.proto`: Datum, BlobProto, nets); `caffe2_pb2` the part of Caffe2's that image LMDBs
use (`proto/caffe2.proto`: TensorProtos, read by `layout_caffe2`).
"""

from __future__ import annotations

import importlib

PROTOC_COMMAND = (
    "python -m grpc_tools.protoc -I proto --python_out=caffe_lmdb --pyi_out=caffe_lmdb "
    "proto/caffe.proto proto/caffe2.proto"
)


class ProtoNotGeneratedError(ImportError):
    """A generated `*_pb2` module is missing or was generated for a different protobuf runtime."""


def _load_pb2(name: str):
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in (f"{__package__}.{name}", name):
            raise
        raise ProtoNotGeneratedError(
            f"caffe_lmdb/{name}.py is missing: run `make proto` "
            f"(or `{PROTOC_COMMAND}`) in the caffe-lmdb checkout"
        ) from None
    except (TypeError, ImportError) as exc:  # gencode/runtime mismatch, either direction
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ProtoNotGeneratedError(
            f"caffe_lmdb/{name}.py does not match the installed protobuf "
            f"({first_line}): run `make proto` to regenerate it"
        ) from None


caffe_pb2 = _load_pb2("caffe_pb2")
caffe2_pb2 = _load_pb2("caffe2_pb2")
