"""Caffe parity (#17), each item against an independent reference.

Pixels are compared with OpenCV's own `imdecode`, the decoder Caffe calls (`cv::imread` in
`ReadImageToCVMat`, `cv::imdecode` in `DecodeDatumToCVMat`); OpenCV is a dev/test dependency, so
these tests never skip where the dev extras are installed. pycaffe's io conventions are compared
with a transcription of BVLC Caffe's `python/caffe/io.py` running on the same protobuf classes.
The photos in ../shared/images are used when present; every format variant is generated here.
"""

from __future__ import annotations

import io

import cv2
import lmdb
import numpy as np
import pytest
from conftest import SHARED_IMAGES, caffe_key, jpeg_with_damaged_exif, unreadable_exif, write_lmdb
from PIL import Image

from caffe_lmdb import DatumError, LmdbDataset_train, array_to_datum, caffe_pb2, datum_to_array, open_image
from caffe_lmdb.cli import main
from caffe_lmdb.datum import datum_to_image
from caffe_lmdb.mean import MeanError, _mean_to_blob, blob_to_array

# ---------------------------------------------------------------- references

def cv_gray(data: bytes) -> np.ndarray:
    """`cv::imdecode(IMREAD_GRAYSCALE)`: Caffe's `--gray` read and `force_gray` decode."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)


def cv_color_rgb(data: bytes) -> np.ndarray:
    """`cv::imdecode(IMREAD_COLOR)` (BGR), turned to RGB H x W x 3 to compare with PIL images."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def cv_png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    assert ok
    return buf.tobytes()


def synthetic_rgb(height: int = 61, width: int = 97) -> np.ndarray:
    """A deterministic photo-like image: smooth colour gradients plus noise, non-square."""
    rng = np.random.default_rng(17)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height) + 60], axis=-1)
    return np.clip(smooth + rng.normal(0, 24, smooth.shape), 0, 255).astype(np.uint8)


def variants() -> dict[str, bytes]:
    """Every kind of file Caffe reads, generated: colour, gray, alpha, palette, 16-bit, CMYK, other formats."""
    rgb = synthetic_rgb()
    image = Image.fromarray(rgb)
    gray16 = (rgb[:, :, 1].astype(np.uint16) * 257) ^ np.uint16(0x5A)
    rotated_exif = Image.Exif()
    rotated_exif[0x0112] = 6
    palette = image.convert("P")
    return {
        "rgb.jpg": encode(image, "JPEG", quality=90),
        "progressive.jpg": encode(image, "JPEG", quality=80, progressive=True),
        "subsampled-444.jpg": encode(image, "JPEG", quality=95, subsampling=0),
        "gray.jpg": encode(image.convert("L"), "JPEG"),
        "cmyk.jpg": encode(image.convert("CMYK"), "JPEG", quality=90),
        "exif-rotated.jpg": encode(image, "JPEG", quality=90, exif=rotated_exif),
        "damaged-exif.jpg": jpeg_with_damaged_exif(image),  # orientation 6 beside a mistyped tag: turned
        "unreadable-exif.jpg": unreadable_exif(jpeg_with_damaged_exif(image)),  # no IFD to read: as stored
        "rgb.png": encode(image, "PNG"),
        "gray.png": encode(image.convert("L"), "PNG"),
        "rgba.png": encode(image.convert("RGBA"), "PNG"),
        "gray-alpha.png": encode(image.convert("LA"), "PNG"),
        "palette.png": encode(palette, "PNG"),
        "palette-transparent.png": encode(palette, "PNG", transparency=0),
        "gray16.png": cv_png(gray16),
        "rgb16-from-8bit.png": cv_png(rgb[:, :, ::-1].astype(np.uint16) * 257),
        "rgb.bmp": encode(image, "BMP"),
        "rgb.tif": encode(image, "TIFF"),
        "rgb.webp": encode(image, "WEBP", lossless=True),
        "rgb.ppm": encode(image, "PPM"),
    }


VARIANTS = variants()
SHARED = sorted(p.name for p in SHARED_IMAGES.glob("*")) if SHARED_IMAGES.is_dir() else []


def file_bytes(name: str) -> bytes:
    return VARIANTS[name] if name in VARIANTS else (SHARED_IMAGES / name).read_bytes()


ALL_FILES = [*VARIANTS, *SHARED]


# ---------------------------------------------------------------- 1. --gray pixels = imread(IMREAD_GRAYSCALE)

@pytest.mark.parametrize("name", ALL_FILES)
def test_gray_pixels_are_opencvs(name):
    data = file_bytes(name)
    expected = cv_gray(data)
    ours = np.asarray(open_image(data, gray=True))
    assert ours.shape == expected.shape  # JPEG gray drafts keep the full size
    assert np.array_equal(ours, expected)


@pytest.mark.parametrize("name", ALL_FILES)
def test_colour_pixels_are_opencvs(name):
    data = file_bytes(name)
    assert np.array_equal(np.asarray(open_image(data)), cv_color_rgb(data))


def test_the_reference_tells_pillows_gray_apart():
    # Pillow's RGB -> L differs from OpenCV's on colour JPEGs (Y plane) and PNGs (libpng's rounding):
    # the comparisons above would fail on the old conversion.
    for name in ("rgb.jpg", "rgb.png", "rgba.png"):
        data = VARIANTS[name]
        pillow = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").convert("L"))
        assert not np.array_equal(pillow, cv_gray(data)), name
    # the per-format formulas differ on this image, so each format's comparison checks its own formula
    r, g, b = (synthetic_rgb()[:, :, i].astype(np.int64) for i in range(3))
    assert not np.array_equal((r * 4899 + g * 9617 + b * 1868 + 8192) >> 14, (r * 9798 + g * 19235 + b * 3735 + 16384) >> 15)
    assert not np.array_equal((r * 4899 + g * 9617 + b * 1868 + 8192) >> 14, (r * 9797 + g * 19234 + b * 3737) >> 15)
    cmyk = VARIANTS["cmyk.jpg"]
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(cmyk)).convert("RGB")), cv_color_rgb(cmyk))


@pytest.mark.parametrize("channels", [3, 4])
def test_sixteen_bit_colour_png_gray_uses_all_sixteen_bits(channels):
    # libpng converts at 16 bits, then strips to 8: the low bytes change the result
    rng = np.random.default_rng(3)
    samples = rng.integers(0, 65536, (61, 97, channels)).astype(np.uint16)
    data = cv_png(samples)
    ours = np.asarray(open_image(data, gray=True))
    assert np.array_equal(ours, cv_gray(data))
    high_only = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int64)
    r, g, b = high_only[:, :, 0], high_only[:, :, 1], high_only[:, :, 2]
    assert not np.array_equal((r * 9797 + g * 19234 + b * 3737) >> 15, ours)  # 8-bit samples would not do


@pytest.mark.parametrize("gray", [False, True])
def test_raw_conversion_stores_imreads_pixels(tmp_path, gray):
    # convert_imageset: ReadImageToCVMat (imread, colour or gray) then CVMatToDatum's planar copy
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    for name in VARIANTS:
        (src / name).write_bytes(VARIANTS[name])
    out = tmp_path / "raw.lmdb"
    assert main(["convert", str(src.parent), str(out), "--workers", "0", "-q", *(["--gray"] if gray else [])]) == 0
    records = read_records(out)
    assert sorted(records) == sorted(VARIANTS)
    for name, datum in records.items():
        if gray:
            expected = cv_gray(VARIANTS[name])[np.newaxis]
        else:
            expected = cv2.imdecode(np.frombuffer(VARIANTS[name], np.uint8), cv2.IMREAD_COLOR).transpose(2, 0, 1)
        assert (datum.channels, datum.height, datum.width) == expected.shape, name
        assert datum.data == expected.tobytes(), name


@pytest.mark.parametrize("gray", [True, False])
def test_resize_after_imread_in_caffes_order(tmp_path, gray):
    # ReadImageToCVMat: cv::imread (IMREAD_GRAYSCALE with --gray), then cv::resize(INTER_LINEAR)
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    names = ["rgb.jpg", "rgba.png", "cmyk.jpg", "rgb.webp"]
    for name in names:
        (src / name).write_bytes(VARIANTS[name])
    out = tmp_path / "resized.lmdb"
    assert main(["convert", str(src.parent), str(out), "--resize_height", "23", "--resize_width", "41",
                 "--resize-backend", "opencv", "--workers", "0", "-q", *(["--gray"] if gray else [])]) == 0
    with lmdb.open(str(out), readonly=True, lock=False) as env, env.begin() as txn:
        for i, name in enumerate(sorted(names)):
            datum = caffe_pb2.Datum.FromString(txn.get(caffe_key(i, f"a/{name}")))
            if gray:
                expected = cv2.resize(cv_gray(VARIANTS[name]), (41, 23), interpolation=cv2.INTER_LINEAR)[np.newaxis]
            else:
                bgr = cv2.imdecode(np.frombuffer(VARIANTS[name], np.uint8), cv2.IMREAD_COLOR)
                expected = cv2.resize(bgr, (41, 23), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
            assert (datum.channels, datum.height, datum.width) == expected.shape
            assert datum.data == expected.tobytes(), name


# ---------------------------------------------------------------- 2. --encoded --gray keeps the bytes

ENCODED_NAMES = ["rgb.jpg", "gray.png", "rgba.png", "rgb16-from-8bit.png", "cmyk.jpg"]


def encoded_tree(tmp_path):
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    for name in ENCODED_NAMES:
        (src / name).write_bytes(VARIANTS[name])
    return src.parent


def read_records(path) -> dict[str, caffe_pb2.Datum]:
    with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
        return {key.decode().split("/", 1)[1]: caffe_pb2.Datum.FromString(value) for key, value in txn.cursor()}


def test_encoded_gray_keeps_every_files_bytes_as_convert_imageset(tmp_path):
    out = tmp_path / "e.lmdb"
    assert main(["convert", str(encoded_tree(tmp_path)), str(out), "--encoded", "--gray", "--workers", "0", "-q"]) == 0
    records = read_records(out)
    assert sorted(records) == sorted(ENCODED_NAMES)
    for name, datum in records.items():
        assert datum.encoded and datum.data == VARIANTS[name], name  # 16-bit stays 16-bit, colour stays colour
        # and Caffe's data layer (force_gray) reads OpenCV's gray pixels from them
        assert np.array_equal(np.asarray(datum_to_image(datum, "gray")), cv_gray(VARIANTS[name])), name


def test_reencode_gray_stores_colour_files_as_gray_images(tmp_path):
    out = tmp_path / "r.lmdb"
    assert main(["convert", str(encoded_tree(tmp_path)), str(out), "--encoded", "--gray", "--reencode-gray",
                 "--workers", "0", "-q"]) == 0
    records = read_records(out)
    assert records["gray.png"].data == VARIANTS["gray.png"]  # already gray: kept
    for name in ("rgba.png", "rgb16-from-8bit.png"):  # lossless re-encodes: exactly OpenCV's gray pixels
        payload = records[name].data
        assert payload != VARIANTS[name] and Image.open(io.BytesIO(payload)).mode == "L"
        assert np.array_equal(cv_gray(payload), cv_gray(VARIANTS[name])), name
    assert Image.open(io.BytesIO(records["rgb.jpg"].data)).mode == "L"


def test_reencode_gray_alone_is_a_usage_error(tmp_path, capsys):
    code = main(["convert", str(encoded_tree(tmp_path)), str(tmp_path / "x.lmdb"), "--reencode-gray", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--reencode-gray needs --gray and --encoded" in err[0]


# ---------------------------------------------------------------- 3. decoded channel counts in LmdbDataset_train

READER_NAMES = ["rgb.jpg", "gray.jpg", "cmyk.jpg", "exif-rotated.jpg", "damaged-exif.jpg", "rgb.png", "gray.png",
                "rgba.png", "gray-alpha.png", "palette-transparent.png", "gray16.png", "rgb16-from-8bit.png",
                "rgb.webp"]
GRAY_FILES = {"gray.jpg", "gray.png", "gray-alpha.png", "gray16.png"}


@pytest.fixture(scope="module")
def encoded_lmdb(tmp_path_factory):
    path = tmp_path_factory.mktemp("reader") / "enc.lmdb"
    records = {caffe_key(i, name): caffe_pb2.Datum(data=VARIANTS[name], label=i, encoded=True).SerializeToString()
               for i, name in enumerate(READER_NAMES)}
    return write_lmdb(path, records)


def test_mode_color_is_caffes_force_color(encoded_lmdb):
    ds = LmdbDataset_train(encoded_lmdb, output="numpy", mode="color")
    for i, name in enumerate(READER_NAMES):
        image, _ = ds[i]
        assert image.shape[0] == 3, name  # DecodeDatumToCVMat(datum, true): always 3 channels
        assert np.array_equal(image, cv_color_rgb(VARIANTS[name]).transpose(2, 0, 1)), name


def test_mode_gray_is_caffes_force_gray(encoded_lmdb):
    ds = LmdbDataset_train(encoded_lmdb, output="numpy", mode="gray")
    for i, name in enumerate(READER_NAMES):
        image, _ = ds[i]
        assert np.array_equal(image, cv_gray(VARIANTS[name])[np.newaxis]), name
    assert np.array_equal(np.asarray(LmdbDataset_train(encoded_lmdb, mode="L")[0][0]), cv_gray(VARIANTS["rgb.jpg"]))


def test_mode_none_gives_one_channel_for_gray_files_and_three_otherwise(encoded_lmdb):
    ds = LmdbDataset_train(encoded_lmdb, output="numpy")
    for i, name in enumerate(READER_NAMES):
        image, _ = ds[i]
        if name in GRAY_FILES:
            assert np.array_equal(image, cv_gray(VARIANTS[name])[np.newaxis]), name
        else:  # RGBA and palette-with-alpha lose alpha; 16-bit is scaled to 8 bits, as IMREAD_COLOR
            assert np.array_equal(image, cv_color_rgb(VARIANTS[name]).transpose(2, 0, 1)), name
    # datum_to_array: Caffe's BGR planes
    datum = caffe_pb2.Datum(data=VARIANTS["cmyk.jpg"], encoded=True)
    bgr = cv2.imdecode(np.frombuffer(VARIANTS["cmyk.jpg"], np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(datum_to_array(datum), bgr.transpose(2, 0, 1))


# ---------------------------------------------------------------- 4. pycaffe's io conventions
# A transcription of BVLC Caffe master's python/caffe/io.py, on the same caffe_pb2 classes.

def pycaffe_array_to_datum(arr, label=None):
    if arr.ndim != 3:
        raise ValueError("Incorrect array shape.")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = arr.shape
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(float).flat)
    if label is not None:
        datum.label = label
    return datum


def pycaffe_datum_to_array(datum):
    if len(datum.data):
        return np.frombuffer(datum.data, dtype=np.uint8).copy().reshape(datum.channels, datum.height, datum.width)
    return np.array(datum.float_data).astype(float).reshape(datum.channels, datum.height, datum.width)


def pycaffe_blobproto_to_array(blob, return_diff=False):
    data = np.array(blob.diff) if return_diff else np.array(blob.data)
    if blob.HasField("num") or blob.HasField("channels") or blob.HasField("height") or blob.HasField("width"):
        return data.reshape(blob.num, blob.channels, blob.height, blob.width)
    return data.reshape(blob.shape.dim)


def test_label_none_size():
    # pycaffe's test_label_none_size: leaving the label out makes the record smaller
    ours_with, ours_without = array_to_datum(np.ones((10, 10, 3)), label=1), array_to_datum(np.ones((10, 10, 3)))
    ref_with, ref_without = pycaffe_array_to_datum(np.ones((10, 10, 3)), 1), pycaffe_array_to_datum(np.ones((10, 10, 3)))
    assert len(ours_with.SerializeToString()) > len(ours_without.SerializeToString())
    assert not ours_without.HasField("label") and ours_without.label == 0
    for ours, ref in ((ours_with, ref_with), (ours_without, ref_without)):
        ref.encoded = False  # the one field caffe-lmdb adds: written explicitly, as convert_imageset does
        assert ours.SerializeToString() == ref.SerializeToString()


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64", "int16", "int64", "uint16"])
def test_arrays_round_trip_as_pycaffes(dtype):
    rng = np.random.default_rng(5)
    arr = (rng.normal(0, 1000, (3, 4, 5)) if dtype.startswith("float") else rng.integers(0, 255, (3, 4, 5))).astype(dtype)
    ours, ref = array_to_datum(arr, label=3), pycaffe_array_to_datum(arr, 3)
    ref.encoded = False
    assert ours.SerializeToString() == ref.SerializeToString()
    back, expected = datum_to_array(ours), pycaffe_datum_to_array(ref)
    assert back.dtype == expected.dtype and np.array_equal(back, expected)  # uint8, or float64 as pycaffe
    back -= 1  # a new, writable array (pycaffe's np.fromstring copies)


def test_int64_above_2_53_rounds_as_pycaffe():
    # pycaffe goes int64 -> float64 -> float32; a direct int64 -> float32 cast rounds some values differently
    values = np.array([2**53 + 1, 2**60 + 2**36 + 1, -(2**62) - 2**38 - 1, 2**24 + 1, 2**63 - 1], dtype=np.int64)
    arr = values.reshape(1, 1, 5)
    ours, ref = list(array_to_datum(arr).float_data), list(pycaffe_array_to_datum(arr).float_data)
    assert ours == ref
    assert ours != values.astype(np.float32).tolist()  # the single rounding would differ: the test can fail


def test_float_label_is_an_error_not_truncated():
    with pytest.raises(TypeError):  # pycaffe: protobuf refuses it
        pycaffe_array_to_datum(np.ones((1, 2, 2), np.uint8), 2.5)
    for label in (2.5, 2.0, "2", True):
        with pytest.raises(DatumError, match="label must be an integer"):
            array_to_datum(np.ones((1, 2, 2), np.uint8), label=label)
    assert array_to_datum(np.ones((1, 2, 2), np.uint8), label=np.int64(7)).label == 7
    with pytest.raises(DatumError, match="int32"):
        array_to_datum(np.ones((1, 2, 2), np.uint8), label=2**31)


def test_bool_arrays_become_uint8_zero_one_pixels():
    mask = np.random.default_rng(1).random((1, 3, 4)) > 0.5
    datum = array_to_datum(mask)
    assert datum.data == mask.astype(np.uint8).tobytes() and len(datum.float_data) == 0
    # pycaffe stores 0.0/1.0 floats instead; the values read back are the same
    assert np.array_equal(datum_to_array(datum), pycaffe_datum_to_array(pycaffe_array_to_datum(mask)))


def test_bad_arrays_raise_value_errors_like_pycaffe():
    for arr in (np.ones((3, 4)), np.ones((1, 3, 4, 5))):
        with pytest.raises(ValueError, match="Incorrect array shape"):
            pycaffe_array_to_datum(arr)
        with pytest.raises(ValueError, match="C x H x W"):
            array_to_datum(arr)


def blob_with(values, legacy=None, dims=None) -> caffe_pb2.BlobProto:
    blob = caffe_pb2.BlobProto()
    blob.data.extend(list(np.asarray(values, float).flatten()))
    if legacy is not None:
        blob.num, blob.channels, blob.height, blob.width = legacy
    if dims is not None:
        blob.shape.dim.extend(dims)
    return blob


def test_blob_old_format():
    blob = blob_with(np.zeros((10, 10)), legacy=(1, 1, 10, 10))
    assert blob_to_array(blob).shape == pycaffe_blobproto_to_array(blob).shape == (1, 1, 10, 10)


def test_blob_new_format():
    blob = blob_with(np.arange(100.0).reshape(10, 10), dims=(10, 10))
    assert np.array_equal(blob_to_array(blob), pycaffe_blobproto_to_array(blob))
    assert blob_to_array(blob).shape == (10, 10)


def test_blob_without_shape_is_an_error():
    blob = blob_with(np.zeros((10, 10)))
    with pytest.raises(ValueError):
        pycaffe_blobproto_to_array(blob)
    with pytest.raises(MeanError):  # a ValueError too
        blob_to_array(blob)


def test_scalar_blob():
    blob = blob_with(np.ones(1) * 123)
    ours, ref = blob_to_array(blob), pycaffe_blobproto_to_array(blob)
    assert ours.shape == ref.shape == () and ours == ref == 123


def test_mean_file_blob_reads_as_pycaffe_reads_it():
    mean = np.random.default_rng(2).random((3, 5, 7)) * 255
    blob = _mean_to_blob(mean)
    ours, ref = blob_to_array(blob), pycaffe_blobproto_to_array(blob)
    assert ours.shape == ref.shape == (1, 3, 5, 7) and np.array_equal(ours, ref)
    assert np.array_equal(ours[0], mean.astype(np.float32))
