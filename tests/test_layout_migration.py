"""`migrate` of read layouts: LSUN and test-only layouts (text targets, pixels, pairs) to Datums, nothing dropped.

The test layouts below are written here from their facts alone: a count key, image and text keys
computed from the index (an OCR-style LMDB), raw pixels, and pairs of images. At the end, every real
layout (`reader.LAYOUTS` but Datum), written by its own test module's writer, round-trips: migrate ->
`LmdbDataset_train` gives the samples `LmdbDataset` reads from the source.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import cv2
import lmdb
import numpy as np
import pytest
import test_layout_caffe2 as caffe2
from conftest import assert_one_line_error, run_cli, tree_snapshot, write_lmdb
from lmdbread import read_all, read_datums
from PIL import Image
from test_layout_basicsr import make_basicsr, make_edvr
from test_layout_crnn import LABELS, make_crnn, make_crnn_sr
from test_layout_stylegan2 import make_stylegan2
from test_layout_tensorpack import write_folder2lmdb, write_tensorpack
from test_lmdb_dataset import make_lsun

from caffe_lmdb import LmdbDataset, LmdbDataset_train, load_keys
from caffe_lmdb.cli import main
from caffe_lmdb.datum import encoded_to_datum, image_to_datum_bytes, serialize_datum
from caffe_lmdb.errors import ConversionError, InputError, LmdbFormatError
from caffe_lmdb.files import sidecar_path
from caffe_lmdb.keys import make_key
from caffe_lmdb.layouts import Layout, Probe, checked_count, text_target
from caffe_lmdb.migration import MigrateResult, migrate
from caffe_lmdb.reader import LAYOUTS
from caffe_lmdb.text_targets import escape_text, read_texts, unescape_text

TEXTS = ["hello", "", "two\nlines", "back\\slash \\n", "tab\there", "naïve 東京", "para\u2028sep\x85\x0c", "hello"]


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _opencv_rgb(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


class OcrLayout(Layout):
    """Test-only: `num` holds the count; `img-%05d` an encoded image (or raw pixels), `txt-%05d` its text.

    `shape` set: the image values are raw H x W x 3 RGB (or H x W gray) pixels. `pair`: `lq-%05d`
    holds a second image. `stop_at`: reading that sample raises KeyboardInterrupt (an interrupted run).
    """

    name = "ocr-test"

    def __init__(self, shape: tuple[int, ...] | None = None, pair: bool = False, stop_at: int = -1) -> None:
        self.shape, self.pair, self.stop_at, self.count = shape, pair, stop_at, 0

    @classmethod
    def detect(cls, probe: Probe) -> Layout | None:
        return None  # forced only

    def open(self, probe: Probe) -> None:
        self.count = checked_count(probe, b"num", probe.value(b"num"), per_sample=2)

    def __len__(self) -> int:
        return self.count

    def sample_keys(self, index: int) -> Sequence[bytes]:
        keys = [b"img-%05d" % index, b"txt-%05d" % index]
        return [*keys, b"lq-%05d" % index] if self.pair else keys

    def stored(self, values: Sequence[Any]) -> tuple[tuple[bytes | np.ndarray, ...], Any]:
        first = bytes(values[0])
        if first == b"stop":
            raise KeyboardInterrupt
        image = first if self.shape is None else np.frombuffer(first, np.uint8).reshape(self.shape).copy()
        images = (image, bytes(values[2])) if self.pair else (image,)
        return images, text_target(values[1])


def make_ocr(path, texts, rng, *, shape=None, pair=False, count=None) -> list:
    images = []
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for index, text in enumerate(texts):
            pixels = rng.integers(0, 256, size=shape or (8, 11 + index, 3), dtype=np.uint8)
            value = pixels.tobytes() if shape is not None else _jpeg(pixels)
            images.append(pixels if shape is not None else value)
            txn.put(b"img-%05d" % index, value)
            txn.put(b"txt-%05d" % index, text.encode("utf-8"))
            if pair:
                txn.put(b"lq-%05d" % index, _jpeg(pixels[::2, ::2].copy()))
        txn.put(b"num", str(len(texts) if count is None else count).encode())
    env.close()
    return images


def _train(out) -> LmdbDataset_train:
    return LmdbDataset_train(out, keys_path=out.with_name(out.name.replace(".lmdb", "_keys.npy")))


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lsun_migrates_bytes_unchanged_and_its_category_as_class_0(tmp_path, rng, fmt):
    source = tmp_path / "church_outdoor_train_lmdb"
    values = make_lsun(source, 10, rng, fmt)
    result = migrate(source, tmp_path / "church.lmdb", workers=0, progress=False)
    assert result.written == 10 and result.reencoded == 0 and result.targets == "classes"
    assert "classes.txt" in str(result)
    out = tmp_path / "church.lmdb"
    keys = sorted(values)
    assert [bytes(k) for k in load_keys(tmp_path / "church_keys.npy")] == [make_key(i, k.decode())
                                                                          for i, k in enumerate(keys)]
    # WebP is a format Caffe (OpenCV) decodes (formats.CAFFE_FORMATS): stored unchanged, as convert does
    records = dict(read_all(out))
    for index, key in enumerate(keys):
        assert records[make_key(index, key.decode())] == serialize_datum(encoded_to_datum(values[key], 0))
    assert (tmp_path / "church_classes.txt").read_text() == "church_outdoor\n"
    assert not (tmp_path / "church_texts.txt").exists()
    train, source_view = _train(out), LmdbDataset(source)
    assert len(train) == len(source_view) == 10
    for index, key in enumerate(keys):
        image, label = train[index]
        expected, category = source_view[index]
        assert label == 0 and category == "church_outdoor"
        np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
        np.testing.assert_array_equal(np.asarray(image), _opencv_rgb(values[key]))


def test_the_output_is_the_same_for_any_number_of_workers(tmp_path, rng):
    make_lsun(tmp_path / "bedroom_val_lmdb", 40, rng)
    migrate(tmp_path / "bedroom_val_lmdb", tmp_path / "w0.lmdb", workers=0, progress=False)
    migrate(tmp_path / "bedroom_val_lmdb", tmp_path / "w2.lmdb", workers=2, progress=False)
    assert read_all(tmp_path / "w0.lmdb") == read_all(tmp_path / "w2.lmdb")
    assert (tmp_path / "w0_keys.npy").read_bytes() == (tmp_path / "w2_keys.npy").read_bytes()


def test_texts_rule_escapes_and_round_trips_every_line_breaker():
    for text in [*TEXTS, "\\x0b literally", "\r\n", "\\"]:
        line = escape_text(text)
        assert len(line.splitlines()) <= 1 and "\n" not in line
        assert unescape_text(line) == text


@pytest.mark.parametrize("workers", [0, 2])
def test_text_targets_go_to_the_texts_file_one_line_per_record(tmp_path, rng, workers):
    texts = TEXTS * (3 if workers else 1)
    images = make_ocr(tmp_path / "ocr.lmdb", texts, rng)
    result = migrate(tmp_path / "ocr.lmdb", tmp_path / "out.lmdb", layout=OcrLayout(), workers=workers,
                     progress=False)
    assert result.targets == "texts" and result.written == len(texts)
    assert read_texts(tmp_path / "out.lmdb") == texts
    assert not (tmp_path / "out_classes.txt").exists()
    train, source = _train(tmp_path / "out.lmdb"), LmdbDataset(tmp_path / "ocr.lmdb", layout=OcrLayout())
    for index in range(len(texts)):
        image, label = train[index]
        expected, text = source[index]
        assert label == 0 and text == texts[index]
        np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
        np.testing.assert_array_equal(np.asarray(image), _opencv_rgb(images[index]))
    assert bytes(load_keys(tmp_path / "out_keys.npy")[0]) == make_key(0, "img-00000")


def test_text_targets_as_classes_number_them_in_order_of_first_appearance(tmp_path, rng):
    texts = ["cat", "dog", "cat", "eel", "dog"]
    make_ocr(tmp_path / "ocr.lmdb", texts, rng)
    result = migrate(tmp_path / "ocr.lmdb", tmp_path / "out.lmdb", layout=OcrLayout(), targets="classes", workers=0)
    assert result.classes == ["cat", "dog", "eel"]
    assert (tmp_path / "out_classes.txt").read_text().splitlines() == ["cat", "dog", "eel"]
    assert [label for _, label in _train(tmp_path / "out.lmdb")] == [0, 1, 0, 2, 1]
    assert read_texts(tmp_path / "out.lmdb") is None


@pytest.mark.parametrize("shape", [(5, 7, 3), (6, 4)])
def test_stored_pixels_become_raw_planar_datums_pixel_exact(tmp_path, rng, shape):
    images = make_ocr(tmp_path / "ocr.lmdb", ["a", "b", "c"], rng, shape=shape)
    migrate(tmp_path / "ocr.lmdb", tmp_path / "out.lmdb", layout=OcrLayout(shape=shape), workers=0)
    datums = list(read_datums(tmp_path / "out.lmdb").values())
    gray = len(shape) == 2
    for pixels, datum, value in zip(images, datums, (v for _, v in read_all(tmp_path / "out.lmdb")), strict=True):
        assert not datum.encoded and datum.channels == (1 if gray else 3)
        assert value == image_to_datum_bytes(Image.fromarray(pixels), 0, gray=gray)
    for index, (image, _label) in enumerate(_train(tmp_path / "out.lmdb")):
        expected = np.stack([images[index]] * 3, axis=2) if gray else images[index]
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), expected)


def test_a_pair_is_refused_in_one_line_unless_one_image_is_chosen(tmp_path, rng):
    make_ocr(tmp_path / "pair.lmdb", ["x", "y"], rng, pair=True)
    with pytest.raises(InputError, match=r"2 images per sample .* --image 0, --image 1$"):
        migrate(tmp_path / "pair.lmdb", tmp_path / "out.lmdb", layout=OcrLayout(pair=True), workers=0)
    assert not (tmp_path / "out.lmdb").exists()
    migrate(tmp_path / "pair.lmdb", tmp_path / "lq.lmdb", layout=OcrLayout(pair=True), image=1, workers=0)
    source = LmdbDataset(tmp_path / "pair.lmdb", layout=OcrLayout(pair=True))
    for index, (image, _label) in enumerate(_train(tmp_path / "lq.lmdb")):
        np.testing.assert_array_equal(np.asarray(image), np.asarray(source[index][0][1]))
    assert read_texts(tmp_path / "lq.lmdb") == ["x", "y"]


def test_a_bad_sample_midway_leaves_nothing_and_names_the_key(tmp_path, rng):
    make_ocr(tmp_path / "ocr.lmdb", TEXTS, rng)
    env = lmdb.open(str(tmp_path / "ocr.lmdb"))
    with env.begin(write=True) as txn:
        txn.put(b"img-00005", b"\xff\xd8\xff\xe0 truncated jpeg")
    env.close()
    before = tree_snapshot(tmp_path)
    with pytest.raises(ConversionError, match=r"sample 5 \(key b'img-00005'\).*nothing was written"):
        migrate(tmp_path / "ocr.lmdb", tmp_path / "out.lmdb", layout=OcrLayout(), workers=0)
    assert tree_snapshot(tmp_path) == before


def test_a_count_pointing_at_absent_keys_is_one_line_naming_the_key(tmp_path, rng):
    make_ocr(tmp_path / "ocr.lmdb", ["a", "b", "c"], rng, count=3)
    env = lmdb.open(str(tmp_path / "ocr.lmdb"))
    with env.begin(write=True) as txn:
        txn.delete(b"txt-00002")
        txn.put(b"pad", b"x")
    env.close()
    before = tree_snapshot(tmp_path)
    with pytest.raises(ConversionError, match=r"key b'txt-00002' is not in the LMDB"):
        migrate(tmp_path / "ocr.lmdb", tmp_path / "out.lmdb", layout=OcrLayout(), workers=0)
    assert tree_snapshot(tmp_path) == before


def test_an_interrupted_run_leaves_no_output_that_looks_complete(tmp_path, rng):
    make_ocr(tmp_path / "ocr.lmdb", TEXTS, rng)
    migrate(tmp_path / "ocr.lmdb", tmp_path / "out.lmdb", layout=OcrLayout(), workers=0)
    env = lmdb.open(str(tmp_path / "ocr.lmdb"))
    with env.begin(write=True) as txn:
        txn.put(b"img-00006", b"stop")
    env.close()
    published = tree_snapshot(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        migrate(tmp_path / "ocr.lmdb", tmp_path / "out.lmdb", layout=OcrLayout(), workers=0, overwrite=True)
    assert tree_snapshot(tmp_path) == published  # the old output, untouched; no temporaries


def test_overwrite_removes_a_texts_file_the_new_output_has_no_use_for(tmp_path, rng):
    make_ocr(tmp_path / "ocr.lmdb", ["a", "b"], rng)
    migrate(tmp_path / "ocr.lmdb", tmp_path / "out.lmdb", layout=OcrLayout(), workers=0)
    assert (tmp_path / "out_texts.txt").exists()
    with pytest.raises(InputError, match="--overwrite"):
        migrate(tmp_path / "ocr.lmdb", tmp_path / "out.lmdb", layout=OcrLayout(), workers=0)
    migrate(tmp_path / "ocr.lmdb", tmp_path / "out.lmdb", layout=OcrLayout(), workers=0, targets="classes",
            overwrite=True)
    assert not (tmp_path / "out_texts.txt").exists() and (tmp_path / "out_classes.txt").exists()


def test_cli_migrates_lsun_and_dry_run_writes_nothing(tmp_path, rng, capsys):
    make_lsun(tmp_path / "tower_val_lmdb", 4, rng)
    assert main(["migrate", str(tmp_path / "tower_val_lmdb"), str(tmp_path / "t.lmdb"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "lsun (encoded images" in out and "samples: 4" in out and "encoded JPEG, bytes unchanged" in out
    assert "class names ->" in out and sorted(p.name for p in tmp_path.glob("t*")) == ["tower_val_lmdb"]
    assert main(["migrate", str(tmp_path / "tower_val_lmdb"), str(tmp_path / "t.lmdb"), "-q", "-j", "0",
                 "--targets", "texts"]) == 0
    assert "4 records migrated" in capsys.readouterr().out
    assert read_texts(tmp_path / "t.lmdb") == ["tower"] * 4


def test_cli_bad_layout_and_wrong_layout_are_one_line(tmp_path, rng):
    make_lsun(tmp_path / "tower_val_lmdb", 2, rng)
    result = run_cli("migrate", tmp_path / "tower_val_lmdb", tmp_path / "t.lmdb", "--layout", "nope")
    assert_one_line_error(result, 2, "unknown layout 'nope'")
    result = run_cli("migrate", tmp_path / "tower_val_lmdb", tmp_path / "t.lmdb", "--layout", "datum")
    assert "does not hold the 'datum' layout" in result.stderr and "Traceback" not in result.stderr
    assert result.returncode != 0 and not (tmp_path / "t.lmdb").exists()


def test_an_unknown_lmdb_keeps_the_old_message(tmp_path):
    env = lmdb.open(str(tmp_path / "odd.lmdb"))
    with env.begin(write=True) as txn:
        txn.put(b"a", b"plain text")
    env.close()
    with pytest.raises((InputError, LmdbFormatError, ConversionError, Exception), match="neither a pickle"):
        migrate(tmp_path / "odd.lmdb", tmp_path / "out.lmdb")


# --------------------------------------------------------------------------- every real layout round-trips


def _roundtrip_source(case: str, tmp_path, rng) -> tuple[Any, dict[str, Any], int | None, str]:
    """Case's source LMDB, written by its layout's own test writer; migrate's options, the image side, the target kind.

    The kinds: "int" (the Datum label), "texts" (label 0, `<out>_texts.txt`), "class" (LSUN: label 0,
    the category in `<out>_classes.txt`), "none" (label 0).
    """
    def noise(*shape: int) -> np.ndarray:
        return rng.integers(0, 256, size=shape, dtype=np.uint8)

    def files(count: int) -> list[bytes]:
        return [_jpeg(noise(5 + i % 3, 8, 3)) if i % 2 else cv2.imencode(".png", noise(6, 5 + i % 4, 3))[1].tobytes()
                for i in range(count)]

    source = tmp_path / "source.lmdb"
    if case == "crnn":
        make_crnn(source, LABELS, rng)
        return source, {}, None, "texts"
    if case.startswith("crnn-sr"):
        make_crnn_sr(source, LABELS[:4], rng)
        side = int(case[-1])
        return source, {"image": side}, side, "texts"
    if case == "stylegan2":
        make_stylegan2(source, 4, rng, sizes=(8, 16))
        return source, {}, None, "none"
    if case == "basicsr":
        make_basicsr(source, {"0002_s001.png": noise(6, 9, 3), "0001.png": noise(5, 7, 3), "0003.png": noise(8, 4, 3)})
        return source, {}, None, "none"
    if case == "edvr":
        make_edvr(source, {"a": noise(4, 6, 3), "b": noise(5, 6, 3), "g": noise(3, 7, 1)},
                  resolution=["3_4_6", "3_5_6", "1_3_7"])
        return source, {}, None, "none"
    if case.startswith("tensorpack"):
        _, serializer, form = case.split("-")
        data = files(12)  # the file bytes, or the decoded BGR arrays: both forms the recipes store
        points = [[np.frombuffer(d, np.uint8) if form == "files"
                   else cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR), i % 5] for i, d in enumerate(data)]
        write_tensorpack(source, points, serializer)
        return source, {}, None, "int"
    if case == "folder2lmdb":
        write_folder2lmdb(source, [(d, (7 * i) % 4) for i, d in enumerate(files(12))])
        return source, {}, None, "int"
    if case == "caffe2-encoded":
        write_lmdb(source, {str(i).encode(): caffe2._record(caffe2._encoded_image(d), caffe2._label(i % 4))
                               for i, d in enumerate(files(12))})
        return source, {}, None, "int"
    if case == "caffe2-raw":
        raws = [noise(5, 7, 3), noise(4, 6), noise(3, 5, 1), noise(6, 4, 3)]  # BGR, gray, one channel
        write_lmdb(source, {str(i).encode(): caffe2._record(caffe2._raw_image(bgr), caffe2._label(i))
                               for i, bgr in enumerate(raws)})
        return source, {}, None, "int"
    assert case == "lsun"
    source = tmp_path / "kitchen_val_lmdb"
    make_lsun(source, 6, rng)
    return source, {}, None, "class"


#: Case -> the layout it is: every real layout in `reader.LAYOUTS` but Caffe's own Datums.
ROUNDTRIP_CASES = {
    "crnn": "crnn", "crnn-sr-0": "crnn-sr", "crnn-sr-1": "crnn-sr", "stylegan2": "stylegan2", "basicsr": "basicsr",
    "edvr": "edvr", "tensorpack-pickle-files": "tensorpack", "tensorpack-msgpack-files": "tensorpack",
    "tensorpack-pickle-pixels": "tensorpack", "tensorpack-msgpack-pixels": "tensorpack", "folder2lmdb": "folder2lmdb",
    "caffe2-encoded": "caffe2", "caffe2-raw": "caffe2", "lsun": "lsun",
}


def test_the_round_trip_cases_cover_every_real_layout():
    assert set(ROUNDTRIP_CASES.values()) == {layout.name for layout in LAYOUTS} - {"datum"}


@pytest.mark.parametrize("case", ROUNDTRIP_CASES)
def test_every_layout_migrates_to_datums_that_lmdb_dataset_train_reads_as_the_same_samples(tmp_path, rng, case):
    source, options, side, kind = _roundtrip_source(case, tmp_path, rng)
    out = tmp_path / "out.lmdb"
    result = migrate(source, out, workers=0, progress=False, **options)
    # folder2lmdb keeps migration.py's own path for pickle/msgpack records; every other layout, tensorpack's
    # pickle/msgpack datapoints included, goes through layout_migration
    assert isinstance(result, MigrateResult) == (case == "folder2lmdb")
    view, train = LmdbDataset(source), _train(out)
    assert len(train) == len(view) > 0
    texts = read_texts(out)
    classes = sidecar_path(out, "classes.txt")
    assert (texts is not None) == (kind == "texts") and classes.exists() == (kind == "class")
    expected_texts = []
    for index in range(len(view)):
        image, label = train[index]
        images, target = view[index]
        expected = images if side is None else images[side]
        # a gray raw Datum reads back as one channel (mode L); the layout gives its RGB view of the same pixels
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
        if kind == "int":
            assert label == target and type(target) is int
        else:
            assert label == 0
        if kind == "none":
            assert target is None
        expected_texts.append(target)
    if kind == "texts":
        assert texts == expected_texts
    if kind == "class":
        assert classes.read_text().splitlines() == [view.layout.category] == sorted(set(expected_texts))
