"""A codec self-check on real files: image -> raw and encoded Datums -> bytes -> Datum -> image."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .datum import datum_to_image, encoded_to_datum, image_to_datum, parse_datum, serialize_datum
from .image_files import open_image


@dataclass(frozen=True)
class RoundtripReport:
    mode: str
    size: tuple[int, int]
    raw_bytes: int
    encoded_bytes: int
    raw_exact: bool
    encoded_exact: bool

    @property
    def ok(self) -> bool:
        return self.raw_exact and self.encoded_exact

    def __str__(self) -> str:
        w, h = self.size
        status = "pixel-exact" if self.ok else f"MISMATCH (raw {self.raw_exact}, encoded {self.encoded_exact})"
        return f"{self.mode} {w}x{h}, raw Datum {self.raw_bytes} B, encoded Datum {self.encoded_bytes} B: {status}"


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def codec_roundtrip(path: str | os.PathLike) -> RoundtripReport:
    """Check that a file's pixels survive both Datum layouts unchanged."""
    with open(path, "rb") as f:
        file_bytes = f.read()
    image = open_image(file_bytes)
    raw = serialize_datum(image_to_datum(image, label=0))
    encoded = serialize_datum(encoded_to_datum(file_bytes, label=0))
    return RoundtripReport(
        mode=image.mode,
        size=image.size,
        raw_bytes=len(raw),
        encoded_bytes=len(encoded),
        raw_exact=_same_pixels(image, datum_to_image(parse_datum(raw))),
        encoded_exact=_same_pixels(image, datum_to_image(parse_datum(encoded), mode=image.mode)),
    )
