"""Loads the generated `caffe_pb2` module, or says in one line how to generate it.

The generated code is not committed: protobuf gencode must match the installed protobuf runtime
(new grpcio-tools emits code that refuses older runtimes, and old gencode breaks under new
runtimes with "Descriptors cannot be created directly"), so `make proto` or `pip install .`
generates it against the protobuf that is actually installed.
"""

from __future__ import annotations

PROTOC_COMMAND = (
    "python -m grpc_tools.protoc -I proto --python_out=caffe_lmdb --pyi_out=caffe_lmdb proto/caffe.proto"
)


class ProtoNotGeneratedError(ImportError):
    """caffe_pb2 is missing or was generated for a different protobuf runtime."""


def _load_caffe_pb2():
    try:
        from . import caffe_pb2
    except ModuleNotFoundError as exc:
        if exc.name not in (f"{__package__}.caffe_pb2", "caffe_pb2"):
            raise
        raise ProtoNotGeneratedError(
            "caffe_lmdb/caffe_pb2.py is missing: run `make proto` "
            f"(or `{PROTOC_COMMAND}`) in the caffe-lmdb checkout"
        ) from None
    except (TypeError, ImportError) as exc:  # gencode/runtime mismatch, either direction
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ProtoNotGeneratedError(
            "caffe_lmdb/caffe_pb2.py does not match the installed protobuf "
            f"({first_line}): run `make proto` to regenerate it"
        ) from None
    return caffe_pb2


caffe_pb2 = _load_caffe_pb2()
