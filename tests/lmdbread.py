"""An LMDB reader for tests that shares no code with caffe_lmdb's converter or dataset."""

from __future__ import annotations

import lmdb
import numpy as np

from caffe_lmdb import caffe_pb2


def read_all(path) -> list[tuple[bytes, bytes]]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return list(txn.cursor())
    finally:
        env.close()


def read_datums(path) -> dict[bytes, caffe_pb2.Datum]:
    out = {}
    for key, value in read_all(path):
        datum = caffe_pb2.Datum()
        datum.ParseFromString(value)
        out[key] = datum
    return out


def raw_rgb(datum: caffe_pb2.Datum) -> np.ndarray:
    """HWC RGB from a raw Datum, by plain numpy (planar BGR -> interleaved RGB)."""
    chw = np.frombuffer(datum.data, np.uint8).reshape(datum.channels, datum.height, datum.width)
    return chw[::-1].transpose(1, 2, 0) if datum.channels == 3 else chw[0]
