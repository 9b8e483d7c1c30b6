"""Shared fixtures: small generated images (non-square, so swapped H/W fails) and the shared photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_IMAGES = REPO.parent / "shared" / "images"
SAMPLE_TRAIN = REPO / "img" / "train"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def rgb_image(rng) -> Image.Image:
    """A 7 wide x 5 high RGB image with distinct values in every channel."""
    return Image.fromarray(rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8), mode="RGB")


@pytest.fixture
def gray_image(rng) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(5, 7), dtype=np.uint8), mode="L")


@pytest.fixture
def shared_images() -> Path:
    """The real photos in ../shared/images; tests using them skip cleanly where it is absent."""
    if not SHARED_IMAGES.is_dir():
        pytest.skip("../shared/images not present")
    return SHARED_IMAGES


def png_bytes(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_image(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


@pytest.fixture
def image_tree(tmp_path, rng) -> Path:
    """A class-folder tree: cat/ (two non-square PNGs, one in a subfolder), dog/ (a JPEG, a gray PNG), notes."""
    root = tmp_path / "src"

    def noise(h, w, c=3):
        shape = (h, w, c) if c > 1 else (h, w)
        return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8))

    save_image(root / "cat" / "a.png", noise(5, 7))
    save_image(root / "cat" / "deep" / "b c.png", noise(6, 4))
    save_image(root / "dog" / "x.JPG", noise(16, 24), quality=90)
    save_image(root / "dog" / "g.png", noise(5, 7, 1))
    (root / "dog" / "readme.txt").write_text("not an image")
    return root


# ---------------------------------------------------------------- LMDBs written as Caffe writes them

def caffe_raw_datum(pixels: np.ndarray, label: int, explicit_encoded: bool = True):
    """A raw Datum built as Caffe's `CVMatToDatum` does, without caffe_lmdb's codec.

    `pixels` is H x W x 3 RGB (stored as planar BGR, OpenCV's order) or H x W gray (one plane).
    MNIST's converter never sets `encoded`; pass `explicit_encoded=False` for such records.
    """
    from caffe_lmdb import caffe_pb2

    planes = pixels[np.newaxis] if pixels.ndim == 2 else pixels[:, :, ::-1].transpose(2, 0, 1)
    channels, height, width = planes.shape
    datum = caffe_pb2.Datum(channels=channels, height=height, width=width, data=planes.tobytes(), label=label)
    if explicit_encoded:
        datum.encoded = False
    return datum


def write_lmdb(path: Path, records: dict[bytes, bytes]) -> Path:
    """Write `records` (key -> value) to a new LMDB directory with py-lmdb alone, in one commit."""
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in records.items():
            txn.put(key, value)
    env.close()
    return path


def caffe_key(line_id: int, relpath: str) -> bytes:
    """`convert_imageset`'s key, spelled out here rather than taken from caffe_lmdb.keys."""
    return b"%08d_%s" % (line_id, relpath.encode())


@pytest.fixture
def legacy_rgb_lmdb(tmp_path, rng):
    """An LMDB as `convert_imageset` writes it: 7 wide x 5 high RGB raw records, no keys file.

    Line ids 2, 5 and 6 are missing (images Caffe failed to read), so the keys have gaps.
    Returns (path, keys in LMDB order, RGB H x W x 3 arrays, labels), all in key order.
    """
    line_ids = [0, 1, 3, 4, 7, 8]
    labels = [0, 1, 2, 0, 1, 2]
    images = [rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8) for _ in line_ids]
    keys = [caffe_key(i, f"class{label}/img{i}.jpg") for i, label in zip(line_ids, labels, strict=True)]
    records = {
        key: caffe_raw_datum(pixels, label).SerializeToString()
        for key, pixels, label in zip(keys, images, labels, strict=True)
    }
    return write_lmdb(tmp_path / "legacy_rgb_lmdb", records), keys, images, labels
