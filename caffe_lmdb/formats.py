"""The image formats caffe-lmdb knows, in one table: extensions, magic numbers, and what Caffe decodes.

Every other list of formats is read from `IMAGE_FORMATS`: the extensions `convert` scans
(`IMAGE_EXTENSIONS`), the `--encode_type` names (`ENCODE_FORMATS`), the formats whose file bytes
may be stored unchanged (`CAFFE_FORMATS`), the suffix `export` gives a payload (`suffix_for`) and
the sniffing of bare file bytes in foreign LMDBs (`sniff_image_format`).
"""

from __future__ import annotations

import re
from typing import NamedTuple


class ImageFormat(NamedTuple):
    """One image format.

    Attributes:
        name: Pillow's name for it (`Image.format`).
        extensions: file name extensions, lower case; the first is the one written.
        magic: what its files start with, or None where the format is never sniffed.
        caffe: OpenCV (so Caffe's `DecodeDatum*` and DALI's decoder) decodes it, so a file's bytes
            may be stored unchanged as an encoded Datum. OpenCV cannot decode GIF.
        scanned: `convert` reads files with these extensions from image folders.
    """

    name: str
    extensions: tuple[str, ...]
    magic: re.Pattern[bytes] | None
    caffe: bool
    scanned: bool = True


#: In the order messages list them.
IMAGE_FORMATS = (
    ImageFormat("JPEG", (".jpg", ".jpeg"), re.compile(rb"\xff\xd8\xff"), caffe=True),
    ImageFormat("PNG", (".png",), re.compile(rb"\x89PNG\r\n\x1a\n"), caffe=True),
    ImageFormat("BMP", (".bmp",), re.compile(rb"BM"), caffe=True),
    ImageFormat("PPM", (".ppm", ".pgm"), re.compile(rb"P[1-6]\s"), caffe=True),  # Netpbm, ASCII or binary
    ImageFormat("TIFF", (".tif", ".tiff"), re.compile(rb"II\*\x00|MM\x00\*"), caffe=True),
    ImageFormat("WEBP", (".webp",), re.compile(rb"RIFF....WEBP", re.DOTALL), caffe=True),
    ImageFormat("GIF", (".gif",), re.compile(rb"GIF8[79]a"), caffe=False),
    # Not in every OpenCV build; a Caffe LMDB may hold such payloads (`--encoded` keeps any file's bytes).
    ImageFormat("JPEG2000", (".jp2",), None, caffe=False, scanned=False),
)

#: The file name extensions `convert` reads from image folders.
IMAGE_EXTENSIONS = tuple(ext for fmt in IMAGE_FORMATS if fmt.scanned for ext in fmt.extensions)

#: Caffe `--encode_type` names (file extensions without the dot) -> Pillow format names.
ENCODE_FORMATS = {ext[1:]: fmt.name for fmt in IMAGE_FORMATS if fmt.caffe for ext in fmt.extensions}

#: Pillow formats whose file bytes Caffe can store unchanged as an encoded Datum.
CAFFE_FORMATS = frozenset(fmt.name for fmt in IMAGE_FORMATS if fmt.caffe)

_SUFFIXES = {fmt.name: fmt.extensions[0] for fmt in IMAGE_FORMATS}


def suffix_for(pil_format: str) -> str:
    """The file name extension for a Pillow format: the table's first, else `.<name in lower case>`."""
    return _SUFFIXES.get(pil_format, "." + pil_format.lower())


def sniff_image_format(data: bytes | memoryview) -> str | None:
    """The Pillow format of file bytes by their magic number (a format of `IMAGE_FORMATS`), or None."""
    head = bytes(data[:16])
    for fmt in IMAGE_FORMATS:
        if fmt.magic is not None and fmt.magic.match(head):
            return fmt.name
    return None
