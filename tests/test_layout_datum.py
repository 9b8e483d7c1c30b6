"""The Datum layout over what NVIDIA DIGITS writes: image classification LMDBs and generic features/labels LMDBs.

DIGITS' facts (digits/tools/create_db.py, create_generic_db.py), written here from scratch:

* Classification datasets: `<job>/train_db`, `<job>/val_db` (LMDB folders) and `<job>/labels.txt`
  (class names, line i is label i). Keys `'%08d_%d' % (index, label)`. Raw records are pycaffe's
  `caffe.io.array_to_datum` of the H x W x C RGB image transposed to C x H x W with the channels
  swapped to BGR (one plane for gray): `channels/height/width/data/label` set, `encoded` never
  written. Encoded records are PIL's PNG or JPEG (quality 90) of the RGB image with `channels`,
  `height`, `width` set as well (Caffe leaves them 0), `label` and `encoded=True`.
* Generic datasets: `<job>/<stage>/features` and, when labels are not scalars,
  `<job>/<stage>/labels`, keys `'%09d' % n` in both. A feature is a C x H x W array, raw (BGR swap
  for 3 channels, then `array_to_datum` with the scalar label, or 0 when there is a labels LMDB)
  or PNG/JPEG encoded like the classification records. A label array (3-D) is its own Datum in the
  labels LMDB, `array_to_datum(label, 0)`: float labels in `float_data`, C x H x W.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from conftest import write_lmdb
from PIL import Image

from caffe_lmdb import LmdbDataset, LmdbDataset_train, open_tree
from caffe_lmdb.datum import array_to_datum, serialize_datum
from caffe_lmdb.proto import caffe_pb2


def _pycaffe_datum(chw: np.ndarray, label: int | None) -> bytes:
    """pycaffe's `caffe.io.array_to_datum` bytes: the project's array_to_datum without the explicit `encoded`."""
    datum = array_to_datum(chw, label)
    datum.ClearField("encoded")
    return serialize_datum(datum)


def _digits_raw(rgb: np.ndarray, label: int) -> bytes:
    """DIGITS' raw record of an H x W x 3 RGB or H x W gray image."""
    chw = rgb.transpose(2, 0, 1)[[2, 1, 0], ...] if rgb.ndim == 3 else rgb[np.newaxis]
    return _pycaffe_datum(chw, label)


def _digits_encoded(rgb: np.ndarray, label: int, fmt: str) -> tuple[bytes, bytes]:
    """DIGITS' encoded record (PIL's PNG, or JPEG at quality 90, channels/height/width set) and its file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    data = buffer.getvalue()
    datum = caffe_pb2.Datum(channels=rgb.shape[2] if rgb.ndim == 3 else 1, height=rgb.shape[0], width=rgb.shape[1],
                            label=label, data=data, encoded=True)
    return datum.SerializeToString(), data


def _opencv(data: bytes, flags: int) -> np.ndarray:
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    return decoded[:, :, ::-1] if decoded.ndim == 3 else decoded


def _images(rng, count: int, gray_every: int = 0) -> list[np.ndarray]:
    shapes = [(6, 9) if gray_every and i % gray_every == gray_every - 1 else (6, 9, 3) for i in range(count)]
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in shapes]


# ---------------------------------------------------------------- classification datasets

def test_digits_raw_classification_lmdb_reads_back_the_images_and_labels(tmp_path, rng):
    job = tmp_path / "20170101-000000-abcd"
    job.mkdir()
    (job / "labels.txt").write_text("cat\ndog\nfox\n")
    images = _images(rng, 11, gray_every=4)
    labels = [i % 3 for i in range(11)]
    write_lmdb(job / "train_db", {b"%08d_%d" % (i, label): _digits_raw(image, label)
                              for i, (image, label) in enumerate(zip(images, labels, strict=True))})
    dataset = LmdbDataset(job / "train_db")
    train = LmdbDataset_train(job / "train_db", output="numpy")
    assert dataset.layout.name == "datum" and len(dataset) == len(train) == 11
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        read, target = dataset[index]
        rgb = image if image.ndim == 3 else np.repeat(image[:, :, np.newaxis], 3, axis=2)
        np.testing.assert_array_equal(np.asarray(read), rgb)
        assert read.mode == "RGB" and target == label
        array, target = train[index]
        chw = image.transpose(2, 0, 1) if image.ndim == 3 else image[np.newaxis]
        np.testing.assert_array_equal(array, chw)  # LmdbDataset_train's numpy output: C x H x W, RGB
        assert target == label
    classes = (job / "labels.txt").read_text().splitlines()
    assert [classes[dataset[i][1]] for i in range(3)] == ["cat", "dog", "fox"]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_digits_encoded_classification_lmdb_reads_opencvs_pixels(tmp_path, rng, fmt):
    images = _images(rng, 7, gray_every=3)
    stored = {}
    for i, image in enumerate(images):
        record, data = _digits_encoded(image, i % 2, fmt)
        stored[b"%08d_%d" % (i, i % 2)] = (record, data)
    write_lmdb(tmp_path / "val_db", {key: record for key, (record, _) in stored.items()})
    dataset = LmdbDataset(tmp_path / "val_db")
    train = LmdbDataset_train(tmp_path / "val_db")
    color = LmdbDataset_train(tmp_path / "val_db", mode="color")
    assert dataset.layout.name == "datum" and len(dataset) == len(train) == 7
    for index, (_, data) in enumerate(stored.values()):
        image, label = dataset[index]
        np.testing.assert_array_equal(np.asarray(image), _opencv(data, cv2.IMREAD_COLOR))
        assert label == index % 2
        native, label = train[index]  # mode=None: gray files stay one channel
        gray = images[index].ndim == 2
        np.testing.assert_array_equal(np.asarray(native), _opencv(data, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR))
        assert native.mode == ("L" if gray else "RGB") and label == index % 2
        np.testing.assert_array_equal(np.asarray(color[index][0]), _opencv(data, cv2.IMREAD_COLOR))
        if fmt == "PNG":  # lossless: the very pixels DIGITS stored
            rgb = images[index] if not gray else np.repeat(images[index][:, :, np.newaxis], 3, axis=2)
            np.testing.assert_array_equal(np.asarray(image), rgb)


def test_a_digits_job_folder_opens_as_a_tree_of_its_lmdbs(tmp_path, rng):
    job = tmp_path / "job"
    job.mkdir()
    (job / "labels.txt").write_text("a\nb\n")
    for name, count in (("train_db", 4), ("val_db", 2)):
        write_lmdb(job / name, {b"%08d_%d" % (i, i % 2): _digits_raw(image, i % 2)
                            for i, image in enumerate(_images(rng, count))})
    tree = open_tree(job)
    assert len(tree) == 6 and [s.rsplit("/", 1)[-1] for s in tree.sources] == ["train_db", "val_db"]
    assert [tree[i][1] for i in range(6)] == [0, 1, 0, 1, 0, 1]


# ---------------------------------------------------------------- generic datasets: features and labels LMDBs

def test_digits_generic_features_with_scalar_labels(tmp_path, rng):
    features = [rng.integers(0, 256, size=(3, 5, 4), dtype=np.uint8) for _ in range(5)]  # C x H x W, RGB
    stage = tmp_path / "train"
    stage.mkdir()
    write_lmdb(stage / "features", {b"%09d" % i: _pycaffe_datum(chw[[2, 1, 0], ...], i + 10)
                                for i, chw in enumerate(features)})
    dataset = LmdbDataset(stage / "features")
    train = LmdbDataset_train(stage / "features", output="numpy")
    for index, chw in enumerate(features):
        image, label = dataset[index]
        np.testing.assert_array_equal(np.asarray(image), chw.transpose(1, 2, 0))
        array, same = train[index]
        np.testing.assert_array_equal(array, chw)
        assert label == same == index + 10


def test_digits_generic_features_with_a_labels_lmdb_of_float_vectors(tmp_path, rng):
    stage = tmp_path / "val"
    stage.mkdir()
    features = [rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8) for _ in range(4)]  # H x W x C, RGB
    vectors = [rng.normal(size=(1, 1, 5)).astype(np.float32) for _ in range(4)]  # a 3-D label array each
    encoded = {}
    for i, image in enumerate(features):
        record, data = _digits_encoded(image, 0, "PNG")  # label 0: the labels LMDB holds the labels
        encoded[b"%09d" % i] = record
        assert _opencv(data, cv2.IMREAD_COLOR).tolist() == image.tolist()
    write_lmdb(stage / "features", encoded)
    write_lmdb(stage / "labels", {b"%09d" % i: _pycaffe_datum(vector, 0) for i, vector in enumerate(vectors)})
    images = LmdbDataset(stage / "features")
    labels = LmdbDataset_train(stage / "labels", output="numpy")  # float records keep their values here
    assert len(images) == len(labels) == 4
    for index in range(4):
        np.testing.assert_array_equal(np.asarray(images[index][0]), features[index])
        vector, unused = labels[index]
        assert vector.dtype == np.float32 and unused == 0
        np.testing.assert_array_equal(vector, vectors[index])
