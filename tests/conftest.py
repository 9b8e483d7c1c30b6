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
