"""JPEG records decoded at a DCT scale (1, 1/2, 1/4 or 1/8), for the resized-crop transforms' fused decode.

Entropy decoding dominates a JPEG decode, but the inverse DCT and the colour conversion do not
have to run at full size: libjpeg can produce the image at 1/2, 1/4 or 1/8 scale directly from
the coefficients, which is both faster and already low-pass filtered. `resized_crop.py` asks for
the smallest such image that still holds its crop box at the output size or more.

Two bindings, the same libjpeg-turbo pixels:

* simplejpeg (the `fast` extra: a wheel bundling libjpeg-turbo 3, no system library): decodes
  straight into an RGB or BGR array, and reads the header without Pillow's parsing.
* Pillow's `Image.draft` (always there): the same scaled decode, through Pillow's RGBX image
  and a copy out of it, so somewhat slower. `decoder="pillow"` forces it.

Only plain JPEGs take this path: YCbCr or gray, upright (no EXIF or XMP orientation other than
1), within Pillow's pixel limit. Anything else (CMYK, a rotated photo, a damaged header, another
format) is decoded whole by the ordinary path (`datum.record_planes`), which applies Caffe's rules.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np
from PIL import Image

from .errors import TransformError

try:  # the optional `fast` extra; Pillow decodes the same pixels without it
    import simplejpeg
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    simplejpeg = None

#: What `decoder=` may say: the best available, or one binding by name.
DECODERS = ("auto", "simplejpeg", "pillow")

#: The DCT scale factors libjpeg decodes at (image side divided by the factor, rounded up).
FACTORS = (8, 4, 2, 1)


def resolve_decoder(decoder: str) -> str:
    """"simplejpeg" or "pillow": the binding `decoder` names ("auto": simplejpeg when it is installed).

    Raises:
        TransformError: an unknown name, or "simplejpeg" where it is not installed.
    """
    if decoder not in DECODERS:
        raise TransformError(f"decoder must be one of {', '.join(map(repr, DECODERS))}, got {decoder!r}")
    if decoder == "auto":
        return "simplejpeg" if simplejpeg is not None else "pillow"
    if decoder == "simplejpeg" and simplejpeg is None:
        raise TransformError("decoder='simplejpeg' but simplejpeg is not installed: pip install 'caffe-lmdb[fast]'")
    return decoder


class JpegRecord:
    """An encoded JPEG record not decoded yet: its bytes and the C x H x W it decodes to.

    Stands in for a record's pixels between reading and cropping (the loader checks its
    `shape` and `dtype` and draws the crop from its height and width), so that the decode can
    wait until the crop box, and with it the DCT scale, is known. `data` may be a view on the
    LMDB's memory map: the record is used inside the read transaction only.
    """

    __slots__ = ("data", "decoder", "shape")
    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, data: Any, shape: tuple[int, int, int], decoder: str) -> None:
        self.data = data
        self.shape = shape
        self.decoder = decoder

    def __repr__(self) -> str:
        return f"JpegRecord({len(self.data)} bytes, {'x'.join(map(str, self.shape))}, {self.decoder})"


def jpeg_record(data: Any, channels: int, decoder: str) -> JpegRecord | None:
    """The record of `data` when the fused path can decode it; None sends it down the ordinary path.

    Args:
        data: an encoded record's payload (bytes or a memoryview).
        channels: 3 (colour) or 1 (gray) planes wanted.
        decoder: "simplejpeg" or "pillow" (`resolve_decoder`).
    """
    view = memoryview(data)
    if len(view) < 4 or view[0] != 0xFF or view[1] != 0xD8 or jpeg_orientation(view) != 1:
        return None
    if decoder == "simplejpeg":
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(view)
        except ValueError:
            return None
        if colorspace not in ("YCbCr", "Gray"):
            return None
    else:
        try:
            with Image.open(io.BytesIO(view)) as image:
                if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                    return None
                width, height = image.size
        except Exception:  # anything Pillow refuses is the ordinary path's to report
            return None
    limit = Image.MAX_IMAGE_PIXELS
    if width < 1 or height < 1 or (limit is not None and width * height > limit):
        return None  # the ordinary path warns or refuses as a decompression bomb, as everywhere else
    return JpegRecord(data, (channels, height, width), decoder)


def decode_scaled(record: JpegRecord, factor: int, colorspace: str) -> np.ndarray:
    """The image at 1/`factor` scale, H x W x C uint8 (C-contiguous), each side ceil(side / factor).

    Args:
        record: from `jpeg_record`.
        factor: 1, 2, 4 or 8.
        colorspace: "RGB", "BGR" or "GRAY" (H x W x 1).

    Raises:
        TransformError: the JPEG data is damaged (the message says so; the caller names the record).
    """
    _, height, width = record.shape
    want = (-(-height // factor), -(-width // factor))
    try:
        if record.decoder == "simplejpeg":
            if factor == 1:
                pixels = simplejpeg.decode_jpeg(record.data, colorspace)
            else:
                pixels = simplejpeg.decode_jpeg(record.data, colorspace, min_height=want[0], min_width=want[1],
                                                min_factor=factor)
        else:
            pixels = _pillow_scaled(record.data, factor, colorspace)
    except (ValueError, OSError) as exc:
        raise TransformError(f"JPEG data does not decode: {exc}") from None
    if pixels.shape[:2] != want:
        raise TransformError(f"JPEG decoded at 1/{factor} scale to {pixels.shape[1]}x{pixels.shape[0]}, "
                             f"not {want[1]}x{want[0]}")
    return pixels


def _pillow_scaled(data: Any, factor: int, colorspace: str) -> np.ndarray:
    """`decode_scaled` through Pillow's draft: the same libjpeg scaled decode, then a copy out of Pillow's image."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        mode = "L" if colorspace == "GRAY" else "RGB"
        image.draft(mode, (max(1, width // factor), max(1, height // factor)))
        image.load()
        if image.mode != mode:
            image = image.convert(mode)
        pixels = np.asarray(image)
    if colorspace == "GRAY":
        return pixels[:, :, np.newaxis]
    return np.ascontiguousarray(pixels[:, :, ::-1]) if colorspace == "BGR" else pixels


# --------------------------------------------------------------------------- orientation, from the header alone

_SOS, _EOI, _APP1 = 0xDA, 0xD9, 0xE1
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length


def jpeg_orientation(data: memoryview) -> int:
    """The EXIF orientation of a JPEG from its header segments: 1 when upright, 0 when it cannot be told.

    Pillow's `getexif` (what the ordinary decode follows) also reads an XMP `tiff:Orientation`,
    so an APP1 segment that mentions an orientation outside EXIF gives 0 too. Reading the few
    segments before the scan here is a small fraction of what a parse through Pillow costs.
    """
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return 0
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (_SOS, _EOI):
            return 1
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > end:
            return 0
        if marker == _APP1:
            segment = bytes(data[pos + 4:pos + 2 + length])
            if segment.startswith(b"Exif\x00\x00"):
                orientation = _exif_orientation(segment[6:])
                if orientation != 1:
                    return orientation
            elif b"Orientation" in segment:
                return 0
        pos += 2 + length
    return 0


def _exif_orientation(tiff: bytes) -> int:
    """The orientation tag (0x0112) of an EXIF block's first IFD: 1 when absent, 0 when the block is unreadable."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for entry in range(count):
            tag, kind, _, value = struct.unpack_from(order + "HHI4s", tiff, ifd + 2 + 12 * entry)
            if tag == 0x0112:
                if kind != 3:  # SHORT
                    return 0
                return struct.unpack_from(order + "H", value)[0]
    except (KeyError, struct.error):
        return 0
    return 1
