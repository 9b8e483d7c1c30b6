"""LMDBs for the tool tests (info, verify, mean, export, grid): converter-made and hand-written Caffe layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import caffe_key, caffe_raw_datum, png_bytes, save_image, write_lmdb
from PIL import Image

from caffe_lmdb import caffe_pb2
from caffe_lmdb.conversion import convert
from caffe_lmdb.encode import ConvertOptions


def same_size_tree(root: Path, rng: np.random.Generator, per_class: int = 3, height: int = 5, width: int = 7) -> Path:
    """Class folders `ant/` and `bee/` of RGB PNGs, all `height` x `width` (a mean needs equal sizes)."""
    for name in ("ant", "bee"):
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            save_image(root / name / f"{i}.png", Image.fromarray(pixels))
    return root


def converted(source: Path, out: Path, **options) -> Path:
    """`source` converted by caffe-lmdb's converter (keys file and class file beside `out`)."""
    convert(source, out, workers=1, options=ConvertOptions(**options), progress=False)
    return out


def encoded_datum(payload: bytes, label: int) -> bytes:
    """An encoded Datum as `convert_imageset --encoded` writes it: data, label, encoded=true, dims 0."""
    return caffe_pb2.Datum(data=payload, label=label, encoded=True).SerializeToString()


def raw_value(pixels: np.ndarray, label: int) -> bytes:
    return caffe_raw_datum(pixels, label).SerializeToString()


def bgr_planes(path: Path) -> np.ndarray:
    """The C x H x W BGR planes Caffe stores for an image file, by plain numpy."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))[:, :, ::-1].transpose(2, 0, 1)


def hand_written(path: Path, records: dict[bytes, bytes]) -> Path:
    """An LMDB written with py-lmdb alone, as Caffe's tools leave it: no keys file, no class file."""
    return write_lmdb(path, records)


def legacy_encoded(path: Path, rng: np.random.Generator) -> tuple[Path, list[np.ndarray]]:
    """Three encoded PNG records (5 high x 7 wide, RGB) with Caffe keys; returns the LMDB and the RGB pixels."""
    images = [rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8) for _ in range(3)]
    records = {caffe_key(i, f"c/{i}.png"): encoded_datum(png_bytes(Image.fromarray(p)), i % 2)
               for i, p in enumerate(images)}
    return hand_written(path, records), images
