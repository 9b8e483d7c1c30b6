"""tensorpack's LMDBSerializer and Efficient-PyTorch's folder2lmdb LMDBs, read directly and without running their code.

The LMDBs are written here as those writers lay them out, from their layout facts: tensorpack puts
`'{:08}'.format(i)` keys and a `__keys__` list, each value a serialized `[image, label]` datapoint
(pickle, or msgpack with msgpack-numpy's array maps, spelled out here as msgpack-numpy writes them);
folder2lmdb puts `str(i)` keys with `__keys__`/`__len__` meta keys and `(image bytes, label)` values.
Pixels are compared with OpenCV's decode of the stored bytes, as those projects' readers decode.
"""

from __future__ import annotations

import io
import os
import pickle
import sys

import cv2
import lmdb
import msgpack
import numpy as np
import pytest
from PIL import Image
from test_migration import pyarrow_serialized

from caffe_lmdb import LmdbDataset
from caffe_lmdb.datum import image_to_datum, serialize_datum
from caffe_lmdb.errors import DatumError, LmdbFormatError

COUNT = 12  # > 10: LMDB order of str(i) keys (0, 1, 10, 11, 2, ...) is not the samples' order


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def _opencv_rgb(data: bytes) -> np.ndarray:
    """What the LMDB's own readers see: OpenCV's decode of the stored bytes, as RGB."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


@pytest.fixture
def files(rng) -> list[bytes]:
    """COUNT image files, JPEG and PNG, of a few sizes."""
    return [_encoded(rng.integers(0, 256, size=(5 + i % 3, 8, 3), dtype=np.uint8), "JPEG" if i % 2 else "PNG")
            for i in range(COUNT)]


def _msgpack_numpy(obj):
    """msgpack-numpy's encoding of an ndarray: a map of nd, type (dtype.str), kind, shape and data."""
    if isinstance(obj, np.ndarray):
        return {b"nd": True, b"type": obj.dtype.str, b"kind": b"", b"shape": list(obj.shape), b"data": obj.tobytes()}
    raise TypeError(type(obj))


def _dumps(obj, serializer: str) -> bytes:
    if serializer == "pickle":
        return pickle.dumps(obj, protocol=-1)
    return msgpack.packb(obj, use_bin_type=True, default=_msgpack_numpy)


def write_tensorpack(path, datapoints, serializer: str = "pickle", subdir: bool = False, keys: bool = True):
    """An LMDB as LMDBSerializer.save writes one: '{:08}' keys, serialized datapoints, then `__keys__`."""
    env = lmdb.open(str(path), map_size=1 << 26, subdir=subdir)
    with env.begin(write=True) as txn:
        for i, datapoint in enumerate(datapoints):
            txn.put(f"{i:08}".encode("ascii"), _dumps(datapoint, serializer))
        if keys:
            txn.put(b"__keys__", _dumps([f"{i:08}".encode("ascii") for i in range(len(datapoints))],
                                        serializer))
    env.close()
    return path


def write_folder2lmdb(path, values, serializer: str = "pickle", meta: str = "both", length=None):
    """An LMDB as folder2lmdb writes one: str(i) keys, serialized records, `__keys__` and/or `__len__`."""
    env = lmdb.open(str(path), map_size=1 << 26)
    keys = [str(i).encode("ascii") for i in range(len(values))]
    with env.begin(write=True) as txn:
        for key, value in zip(keys, values, strict=True):
            txn.put(key, _dumps(value, serializer) if not isinstance(value, bytes) else value)
        if meta in ("both", "keys"):
            txn.put(b"__keys__", _dumps(keys, serializer))
        if meta in ("both", "len"):
            txn.put(b"__len__", length if isinstance(length, bytes) else
                    _dumps(len(keys) if length is None else length, serializer))
    env.close()
    return path


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------- tensorpack

@pytest.mark.parametrize("serializer", ["pickle", "msgpack"])
@pytest.mark.parametrize("subdir", [False, True])
def test_tensorpack_file_bytes_read_back_as_opencv_decodes_them(tmp_path, files, serializer, subdir):
    labels = [i % 5 for i in range(COUNT)]
    path = write_tensorpack(tmp_path / "train.lmdb", [[np.frombuffer(data, np.uint8), label]
                                                       for data, label in zip(files, labels, strict=True)],
                            serializer, subdir=subdir)
    assert (tmp_path / "train.lmdb").is_file() != subdir
    dataset = LmdbDataset(path)
    assert dataset.layout.name == "tensorpack" and dataset.layout.serializer == serializer
    assert len(dataset) == COUNT
    for index in range(COUNT):
        image, label = dataset[index]
        assert image.mode == "RGB" and label == labels[index] and type(label) is int
        np.testing.assert_array_equal(np.asarray(image), _opencv_rgb(files[index]))
    with dataset.reader.environment().begin(buffers=True) as txn:  # the value as stored
        (stored,), label = dataset.layout.stored([txn.get(b"00000003")])
    assert stored == files[3] and type(stored) is bytes and label == labels[3]
    again = pickle.loads(pickle.dumps(dataset))  # as a spawned worker gets it
    np.testing.assert_array_equal(np.asarray(again[7][0]), _opencv_rgb(files[7]))


@pytest.mark.parametrize("serializer", ["pickle", "msgpack"])
def test_tensorpack_decoded_bgr_arrays_come_back_as_rgb(tmp_path, files, serializer):
    bgr = [cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) for data in files]  # as the recipes decode
    path = write_tensorpack(tmp_path / "val.lmdb", [[image, i] for i, image in enumerate(bgr)], serializer)
    dataset = LmdbDataset(path)
    assert len(dataset) == COUNT
    for index in range(COUNT):
        image, label = dataset[index]
        assert label == index
        np.testing.assert_array_equal(np.asarray(image), _opencv_rgb(files[index]))
    with dataset.reader.environment().begin(buffers=True) as txn:  # the value as stored
        (stored,), _ = dataset.layout.stored([txn.get(b"00000002")])
    np.testing.assert_array_equal(stored, bgr[2][:, :, ::-1])


def test_tensorpack_without_keys_list_reads_the_key_index(tmp_path, files):
    path = write_tensorpack(tmp_path / "t.lmdb", [[np.frombuffer(data, np.uint8), 1] for data in files], keys=False)
    dataset = LmdbDataset(path)
    assert dataset.layout.name == "tensorpack" and len(dataset) == COUNT
    np.testing.assert_array_equal(np.asarray(dataset[11][0]), _opencv_rgb(files[11]))


def test_tensorpack_keys_list_is_checked_before_use(tmp_path, files):
    datapoints = [[np.frombuffer(data, np.uint8), 1] for data in files[:3]]
    for name, listed in (("long", [b"%08d" % i for i in range(10**5)]),  # far more than the LMDB holds
                         ("odd", [b"00000000", b"00000001", b"x"])):
        env = lmdb.open(str(write_tensorpack(tmp_path / f"{name}.lmdb", datapoints)), subdir=False, map_size=1 << 26)
        with env.begin(write=True) as txn:
            txn.put(b"__keys__", pickle.dumps(listed))
        env.close()
    with pytest.raises(LmdbFormatError) as exc:
        LmdbDataset(tmp_path / "long.lmdb")
    assert "long.lmdb: key b'__keys__': lists 100000 keys but the LMDB has 3 entries" in _one_line(exc)
    with pytest.raises(LmdbFormatError) as exc:
        LmdbDataset(tmp_path / "odd.lmdb")
    assert "odd.lmdb: key b'x' is not a tensorpack key" in _one_line(exc)


def test_tensorpack_pyarrow_values_are_one_line(tmp_path, files):
    env = lmdb.open(str(tmp_path / "old.lmdb"), subdir=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(b"00000000", pyarrow_serialized(files[0]))
        txn.put(b"__keys__", pyarrow_serialized(b"00000000"))
    env.close()
    with pytest.raises(LmdbFormatError) as exc:
        LmdbDataset(tmp_path / "old.lmdb")
    text = _one_line(exc)
    assert "old.lmdb: key b'00000000'" in text and "pyarrow.serialize no longer exists" in text


class _Evil:
    """A value whose unpickling would run a command (as a hostile LMDB's would)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_tensorpack_hostile_pickles_are_refused_untouched(tmp_path, files):
    marker = tmp_path / "ran"
    datapoints = [[np.frombuffer(data, np.uint8), 0] for data in files[:4]]
    datapoints[2] = [_Evil(marker), 0]
    dataset = LmdbDataset(write_tensorpack(tmp_path / "a.lmdb", datapoints))
    dataset[1]
    with pytest.raises(DatumError) as exc:
        dataset[2]
    text = _one_line(exc)
    assert "a.lmdb: key b'00000002'" in text and "refused to unpickle global" in text and "system" in text
    datapoints[0] = _Evil(marker)  # the value detection reads
    with pytest.raises(LmdbFormatError) as exc:
        LmdbDataset(write_tensorpack(tmp_path / "b.lmdb", datapoints))
    assert "b.lmdb: key b'00000000': refused to unpickle global" in _one_line(exc)
    assert not marker.exists()


def test_tensorpack_hostile_msgpack_numpy_arrays_are_one_line(tmp_path, files):
    good = {b"nd": True, b"type": "|u1", b"kind": b"", b"shape": [len(files[0])], b"data": files[0]}
    objects = {**good, b"kind": b"O", b"type": "|O", b"data": pickle.dumps([_Evil(tmp_path / "ran")])}
    huge = {**good, b"shape": [10**9, 10**9, 3]}
    path = write_tensorpack(tmp_path / "m.lmdb", [[good, 1], [objects, 1], [huge, 1]], "msgpack")
    dataset = LmdbDataset(path)
    np.testing.assert_array_equal(np.asarray(dataset[0][0]), _opencv_rgb(files[0]))
    with pytest.raises(DatumError) as exc:
        dataset[1]
    assert "m.lmdb: key b'00000001': msgpack-numpy array of Python objects (kind 'O')" in _one_line(exc)
    with pytest.raises(DatumError) as exc:
        dataset[2]
    assert "m.lmdb: key b'00000002': msgpack-numpy array declares shape (1000000000, 1000000000, 3)" in _one_line(exc)
    assert not (tmp_path / "ran").exists()


def test_datums_under_numbered_keys_still_read_as_datums(tmp_path, rng):
    pixels = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    env = lmdb.open(str(tmp_path / "mnist_like"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in range(3):  # Caffe's MNIST example keys its Datums '%08d'
            txn.put(b"%08d" % i, serialize_datum(image_to_datum(Image.fromarray(pixels), i)))
    env.close()
    dataset = LmdbDataset(tmp_path / "mnist_like")
    assert dataset.layout.name == "datum" and len(dataset) == 3 and dataset[2][1] == 2


# ---------------------------------------------------------------- folder2lmdb

@pytest.mark.parametrize("meta", ["both", "keys", "len", "none"])
def test_folder2lmdb_samples_come_in_numeric_key_order(tmp_path, files, meta):
    labels = [(7 * i) % 4 for i in range(COUNT)]
    path = write_folder2lmdb(tmp_path / "f.lmdb", [(data, label) for data, label in zip(files, labels, strict=True)],
                             meta=meta)
    dataset = LmdbDataset(path)
    assert dataset.layout.name == "folder2lmdb" and len(dataset) == COUNT
    for index in range(COUNT):  # LMDB order would be 0, 1, 10, 11, 2, ...
        image, label = dataset[index]
        assert label == labels[index]
        np.testing.assert_array_equal(np.asarray(image), _opencv_rgb(files[index]))
    with dataset.reader.environment().begin(buffers=True) as txn:  # the value as stored
        (stored,), _ = dataset.layout.stored([txn.get(b"10")])
    assert stored == files[10]


def test_folder2lmdb_dataloader_records_and_msgpack_records(tmp_path, files):
    # a batch-size-1 DataLoader's collation: the bytes in a one-element list, the label a shape-(1,) array
    collated = [([data], np.array([i % 3])) for i, data in enumerate(files)]
    dataset = LmdbDataset(write_folder2lmdb(tmp_path / "p.lmdb", collated))
    assert [dataset[i][1] for i in range(COUNT)] == [i % 3 for i in range(COUNT)]
    # the msgpack variant: [{data: bytes}, label], meta keys msgpack too (`__len__` a msgpack int)
    records = [[{b"data": data}, i] for i, data in enumerate(files)]
    dataset = LmdbDataset(write_folder2lmdb(tmp_path / "m.lmdb", records, "msgpack"))
    assert dataset.layout.serializer == "msgpack" and len(dataset) == COUNT
    for index in range(COUNT):
        image, label = dataset[index]
        assert label == index
        np.testing.assert_array_equal(np.asarray(image), _opencv_rgb(files[index]))


def test_folder2lmdb_ascii_len(tmp_path, files):
    path = write_folder2lmdb(tmp_path / "a.lmdb", [(data, 1) for data in files], meta="len", length=b"%d" % COUNT)
    assert len(LmdbDataset(path)) == COUNT


class LMDB_Image:  # the recipe's own class name, which the restricted unpickler recognises
    """The LMDB_Image recipe's class: RGB pixel bytes, (height, width), channels and the label."""

    def __init__(self, image: np.ndarray, label: int) -> None:
        self.channels = image.shape[2]
        self.size = image.shape[:2]
        self.image = image.tobytes()
        self.label = label


def test_folder2lmdb_lmdb_image_records_give_their_rgb_pixels(tmp_path, files):
    rgb = [_opencv_rgb(data) for data in files[:4]]
    LMDB_Image.__module__ = "__main__"  # where the recipe's class lives, in the user's script
    sys.modules["__main__"].LMDB_Image = LMDB_Image
    try:
        values = [pickle.dumps(LMDB_Image(image, i)) for i, image in enumerate(rgb)]
    finally:
        del sys.modules["__main__"].LMDB_Image
        LMDB_Image.__module__ = __name__
    dataset = LmdbDataset(write_folder2lmdb(tmp_path / "i.lmdb", values))
    for index in range(4):
        image, label = dataset[index]
        assert label == index
        np.testing.assert_array_equal(np.asarray(image), rgb[index])


def test_folder2lmdb_hostile_counts_and_values_are_one_line(tmp_path, files):
    records = [(data, 0) for data in files[:3]]
    with pytest.raises(LmdbFormatError) as exc:
        LmdbDataset(write_folder2lmdb(tmp_path / "l.lmdb", records, meta="len", length=10**18))
    assert "l.lmdb: key b'__len__': claims 1000000000000000000 samples but the LMDB has only 3 entries" \
        in _one_line(exc)
    with pytest.raises(LmdbFormatError) as exc:
        LmdbDataset(write_folder2lmdb(tmp_path / "s.lmdb", records, meta="len", length="three"))
    assert "s.lmdb: key b'__len__': expected a sample count" in _one_line(exc)
    with pytest.raises(LmdbFormatError) as exc:
        LmdbDataset(write_folder2lmdb(tmp_path / "g.lmdb", records, meta="both", length=pickle.dumps(_Evil("x"))))
    assert "g.lmdb: key b'__len__': refused to unpickle global" in _one_line(exc)
    hostile = [*records, (_Evil(tmp_path / "ran"), 0)]
    dataset = LmdbDataset(write_folder2lmdb(tmp_path / "h.lmdb", hostile))
    with pytest.raises(DatumError) as exc:
        dataset[3]
    assert "h.lmdb: key b'3': refused to unpickle global" in _one_line(exc)
    with pytest.raises(LmdbFormatError) as exc:
        LmdbDataset(write_folder2lmdb(tmp_path / "f.lmdb", [(_Evil(tmp_path / "ran"), 0)]))
    assert "f.lmdb: key b'0': refused to unpickle global" in _one_line(exc)
    assert not (tmp_path / "ran").exists()
