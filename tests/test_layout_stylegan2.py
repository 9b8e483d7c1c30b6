"""stylegan2-pytorch's layout: every resolution in one LMDB, `<size>-<index>` keys, `length`; one resolution read."""

from __future__ import annotations

import io
import pickle

import cv2
import lmdb
import numpy as np
import pytest
from PIL import Image

from caffe_lmdb import LmdbDataset, Stylegan2Layout
from caffe_lmdb.errors import KeysFileError, LmdbFormatError

SIZES = (16, 32, 128)  # "128-" sorts before "16-": the largest is not the first key's


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=100)
    return buffer.getvalue()


def _opencv_rgb(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def make_stylegan2(path, count: int, rng, sizes=SIZES, length: bytes | None = None) -> dict[int, list[bytes]]:
    """An LMDB as prepare_data.py writes one: each image at every size under f"{size}-{str(i).zfill(5)}", and `length`."""
    stored: dict[int, list[bytes]] = {size: [] for size in sizes}
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in range(count):
            full = rng.integers(0, 256, size=(max(sizes), max(sizes), 3), dtype=np.uint8)
            for size in sizes:
                data = _jpeg(np.asarray(Image.fromarray(full).resize((size, size), Image.LANCZOS)))
                stored[size].append(data)
                txn.put(f"{size}-{str(i).zfill(5)}".encode(), data)
        txn.put(b"length", length if length is not None else str(count).encode())
    env.close()
    return stored


def test_detection_reads_the_largest_resolution_and_each_one_can_be_chosen(tmp_path, rng):
    stored = make_stylegan2(tmp_path / "ffhq", 5, rng)
    dataset = LmdbDataset(tmp_path / "ffhq")
    assert dataset.layout.name == "stylegan2" and dataset.layout.resolution == 128 and len(dataset) == 5
    assert dataset.layout.resolutions == SIZES and "sizes 16, 32, 128; reading 128" in dataset.layout.describe()
    for size in SIZES:
        chosen = LmdbDataset(tmp_path / "ffhq", layout=Stylegan2Layout(resolution=size))
        assert len(chosen) == 5
        for index in range(5):
            image, target = chosen[index]
            assert target is None and image.mode == "RGB" and image.size == (size, size)
            np.testing.assert_array_equal(np.asarray(image), _opencv_rgb(stored[size][index]))
    by_name = pickle.loads(pickle.dumps(LmdbDataset(tmp_path / "ffhq", layout="stylegan2")))
    np.testing.assert_array_equal(np.asarray(by_name[4][0]), _opencv_rgb(stored[128][4]))


def test_keys_follow_zfill_past_five_digits():
    layout = Stylegan2Layout(resolution=256)
    assert layout.sample_keys(42) == (b"256-00042",)
    assert layout.sample_keys(99999) == (b"256-99999",)
    assert layout.sample_keys(123456) == (b"256-123456",)


def test_a_missing_resolution_is_one_line_listing_those_present(tmp_path, rng):
    make_stylegan2(tmp_path / "church", 2, rng)
    with pytest.raises(LmdbFormatError, match=r"church: no images at resolution 64; the LMDB holds 16, 32, 128$"):
        LmdbDataset(tmp_path / "church", layout=Stylegan2Layout(resolution=64))


@pytest.mark.parametrize("length", [b"1000000000000000000", b"6", b"five"])
def test_a_length_beyond_the_entries_is_one_line(tmp_path, rng, length):
    make_stylegan2(tmp_path / "bad", 5, rng, length=length)  # 16 entries: room for 5 images at 3 sizes
    with pytest.raises(LmdbFormatError, match=r"bad: key b'length': ") as raised:
        LmdbDataset(tmp_path / "bad")
    assert "\n" not in str(raised.value)


def test_a_length_within_the_entries_but_beyond_the_images_is_a_missing_key(tmp_path, rng):
    make_stylegan2(tmp_path / "one_size", 3, rng, sizes=(64,), length=b"4")  # 4 entries: length 4 fits
    dataset = LmdbDataset(tmp_path / "one_size")
    assert dataset.layout.resolutions == (64,) and len(dataset) == 4
    with pytest.raises(KeysFileError, match=r"one_size: key b'64-00003' is not in the LMDB"):
        dataset[3]


def test_other_lmdbs_are_not_taken_for_stylegan2(tmp_path):
    env = lmdb.open(str(tmp_path / "odd"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"256-00000", b"x")  # the scheme's first key, but no `length`
        txn.put(b"hello", b"world")
    env.close()
    with pytest.raises(LmdbFormatError, match="not an image LMDB layout"):
        LmdbDataset(tmp_path / "odd")
