"""The OCR layouts: CRNN / deep-text-recognition-benchmark (`crnn`) and PaddleOCR's super-resolution pairs (`crnn-sr`)."""

from __future__ import annotations

import io
import pickle

import cv2
import numpy as np
import pytest
from conftest import write_lmdb
from PIL import Image

from caffe_lmdb import LmdbDataset, open_tree
from caffe_lmdb.errors import DatumError, KeysFileError, LmdbFormatError

#: Labels as OCR sets hold them: several scripts, emoji, combining marks, spaces, an empty one.
LABELS = ["hello", "你好世界", "مرحبا بالعالم", "🙂👍🏽", "e\u0301a\u0300 n\u0303", "Ünïcödé ß", "", "x y\tz"]


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _opencv_rgb(data: bytes) -> np.ndarray:
    """What the OCR trainers' readers see: OpenCV's decode of the stored bytes, as RGB."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def make_crnn(path, labels, rng, *, subdir: bool = True, lexicon: bool = False) -> list[bytes]:
    """An LMDB as create_lmdb_dataset.py writes one: image-/label-%09d from 1, num-samples; the image bytes."""
    records, images = {}, []
    for i, label in enumerate(labels, start=1):
        pixels = rng.integers(0, 256, size=(8 + i % 3, 20 + i, 3), dtype=np.uint8)
        data = _encoded(pixels, "PNG" if i % 2 else "JPEG")
        images.append(data)
        records[b"image-%09d" % i] = data
        records[b"label-%09d" % i] = label.encode("utf-8")
        if lexicon:
            records[b"lexicon-%09d" % i] = b"word1 word2"
    records[b"num-samples"] = str(len(labels)).encode()
    write_lmdb(path, records, subdir)
    return images


def test_crnn_reads_back_opencvs_pixels_and_every_script_exactly(tmp_path, rng):
    images = make_crnn(tmp_path / "train_lmdb", LABELS, rng)
    dataset = LmdbDataset(tmp_path / "train_lmdb")
    assert dataset.layout.name == "crnn" and len(dataset) == len(LABELS)
    for index, label in enumerate(LABELS):
        image, text = dataset[index]
        assert image.mode == "RGB" and text == label
        np.testing.assert_array_equal(np.asarray(image), _opencv_rgb(images[index]))
    assert dataset.reader.sample_keys(0) == (b"image-000000001", b"label-000000001")
    assert dataset[-1][1] == LABELS[-1]


def test_crnn_single_file_lmdb_lexicon_values_and_an_error_log_in_the_folder(tmp_path, rng):
    images = make_crnn(tmp_path / "single.lmdb", LABELS[:3], rng, subdir=False)
    dataset = LmdbDataset(tmp_path / "single.lmdb")
    assert dataset.layout.name == "crnn" and len(dataset) == 3
    np.testing.assert_array_equal(np.asarray(dataset[2][0]), _opencv_rgb(images[2]))
    assert dataset[1][1] == LABELS[1]
    folder = tmp_path / "tree" / "with_lexicon"
    lexicon_images = make_crnn(folder, LABELS[3:6], rng, lexicon=True)
    (folder / "error_image_log.txt").write_text("3-th image data occured error\n", encoding="utf-8")
    with_lexicon = LmdbDataset(folder)
    assert with_lexicon.layout.name == "crnn" and len(with_lexicon) == 3
    assert [with_lexicon[i][1] for i in range(3)] == LABELS[3:6]
    make_crnn(tmp_path / "tree" / "plain", LABELS[:2], rng)
    tree = open_tree(tmp_path / "tree")
    assert len(tree) == 5 and [tree.sources[0], tree.sources[1]] == [str(folder.parent / "plain"), str(folder)]
    np.testing.assert_array_equal(np.asarray(tree[2][0]), _opencv_rgb(lexicon_images[0]))
    assert tree[2][1] == LABELS[3]


def test_crnn_is_forced_by_name_and_pickles_to_workers(tmp_path, rng):
    make_crnn(tmp_path / "a_lmdb", LABELS[:4], rng)
    dataset = LmdbDataset(tmp_path / "a_lmdb", layout="crnn")
    copy = pickle.loads(pickle.dumps(dataset))
    assert [copy[i][1] for i in range(4)] == LABELS[:4]
    with pytest.raises(LmdbFormatError, match="does not hold the 'crnn-sr' layout"):
        LmdbDataset(tmp_path / "a_lmdb", layout="crnn-sr")


@pytest.mark.parametrize("count", [b"1000000000000000000", b"12abc", b"-1", b"\xff\xfe"])
def test_a_hostile_num_samples_is_one_line_naming_the_lmdb_and_the_key(tmp_path, rng, count):
    make_crnn(tmp_path / "bad_lmdb", LABELS[:2], rng)
    write_lmdb(tmp_path / "bad_lmdb", {b"num-samples": count})
    with pytest.raises(LmdbFormatError, match=r"bad_lmdb: key b'num-samples': ") as raised:
        LmdbDataset(tmp_path / "bad_lmdb")
    assert "\n" not in str(raised.value)


def test_a_num_samples_beyond_the_images_present_reads_as_a_missing_key(tmp_path, rng):
    make_crnn(tmp_path / "short_lmdb", LABELS[:3], rng, lexicon=True)  # 3 samples, 10 entries
    write_lmdb(tmp_path / "short_lmdb", {b"num-samples": b"5"})
    dataset = LmdbDataset(tmp_path / "short_lmdb")
    assert len(dataset) == 5 and dataset[2][1] == LABELS[2]
    with pytest.raises(KeysFileError, match=r"short_lmdb: key b'image-000000004' is not in the LMDB"):
        dataset[3]


def test_a_label_that_is_not_utf8_names_the_lmdb_and_the_label_key(tmp_path, rng):
    make_crnn(tmp_path / "latin1_lmdb", LABELS[:3], rng)
    write_lmdb(tmp_path / "latin1_lmdb", {b"label-000000002": "café".encode("latin-1"),
                                          b"image-000000003": b"not an image"})
    dataset = LmdbDataset(tmp_path / "latin1_lmdb")
    assert dataset[0][1] == LABELS[0]
    with pytest.raises(DatumError, match=r"latin1_lmdb: key b'label-000000002': label is not UTF-8"):
        dataset[1]
    with pytest.raises(DatumError, match=r"latin1_lmdb: key b'image-000000003': cannot decode"):
        dataset[2]


def test_an_empty_crnn_lmdb_has_no_samples(tmp_path):
    write_lmdb(tmp_path / "empty_lmdb", {b"num-samples": b"0"})
    dataset = LmdbDataset(tmp_path / "empty_lmdb")
    assert dataset.layout.name == "crnn" and len(dataset) == 0


def make_crnn_sr(path, labels, rng) -> list[tuple[bytes, bytes]]:
    """An LMDB as PaddleOCR's text super-resolution sets hold: image_hr/image_lr/label-%09d from 1, num-samples."""
    records, pairs = {}, []
    for i, label in enumerate(labels, start=1):
        high = rng.integers(0, 256, size=(32, 128, 3), dtype=np.uint8)
        low = _encoded(high[::2, ::2], "JPEG")
        pairs.append((low, _encoded(high, "PNG")))
        records[b"image_hr-%09d" % i] = pairs[-1][1]
        records[b"image_lr-%09d" % i] = low
        records[b"label-%09d" % i] = label.encode("utf-8")
    records[b"num-samples"] = str(len(labels)).encode()
    write_lmdb(path, records)
    return pairs


def test_crnn_sr_gives_the_low_resolution_input_first(tmp_path, rng):
    pairs = make_crnn_sr(tmp_path / "textzoom_lmdb", LABELS[:4], rng)
    dataset = LmdbDataset(tmp_path / "textzoom_lmdb")
    assert dataset.layout.name == "crnn-sr" and len(dataset) == 4
    for index, (low, high) in enumerate(pairs):
        (low_image, high_image), text = dataset[index]
        assert text == LABELS[index] and low_image.size == (64, 16) and high_image.size == (128, 32)
        np.testing.assert_array_equal(np.asarray(low_image), _opencv_rgb(low))
        np.testing.assert_array_equal(np.asarray(high_image), _opencv_rgb(high))


def test_crnn_sr_counts_three_entries_a_sample_and_names_the_bad_image(tmp_path, rng):
    make_crnn_sr(tmp_path / "sr_lmdb", LABELS[:2], rng)  # 7 entries: room for 2 samples, not 3
    write_lmdb(tmp_path / "sr_lmdb", {b"num-samples": b"3"})
    with pytest.raises(LmdbFormatError, match="sr_lmdb: key b'num-samples': claims 3 samples but the LMDB has only 7"):
        LmdbDataset(tmp_path / "sr_lmdb")
    make_crnn_sr(tmp_path / "sr2_lmdb", LABELS[:2], rng)
    write_lmdb(tmp_path / "sr2_lmdb", {b"image_hr-000000002": b"garbage"})
    dataset = LmdbDataset(tmp_path / "sr2_lmdb")
    with pytest.raises(DatumError, match=r"sr2_lmdb: key b'image_hr-000000002': cannot decode"):
        dataset[1]
