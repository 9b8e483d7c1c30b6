"""Build hook: generate caffe_lmdb/caffe_pb2.py and caffe2_pb2.py from proto/caffe.proto and caffe2.proto at build time.

The generated module is not committed because protobuf gencode must match the runtime it runs
under; building it here (with the grpcio-tools pinned in pyproject.toml) keeps the pair in step.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_pb2() -> None:
    from grpc_tools import protoc

    args = ["grpc_tools.protoc", "-I", str(ROOT / "proto"), f"--python_out={ROOT / 'caffe_lmdb'}",
            f"--pyi_out={ROOT / 'caffe_lmdb'}", str(ROOT / "proto" / "caffe.proto"),
            str(ROOT / "proto" / "caffe2.proto")]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed to compile proto/caffe.proto and proto/caffe2.proto")


class BuildPyWithProto(build_py):
    def run(self) -> None:
        generate_pb2()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProto})
