"""Image files as OpenCV's `imread` decodes them for Caffe: open, orient, normalise, convert to gray.

Caffe reads every image through OpenCV; this module gives Pillow's decode the same pixels (EXIF
orientation applied, palettes expanded, alpha dropped, 16-bit samples scaled by `>> 8`, CMYK and
gray converted with OpenCV's formulas), and turns any decoder failure into a `DatumError` that
says what is wrong with the file. `datum.py` stores the result; the tests compare it with OpenCV
(`tests/test_parity.py`).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DatumError

_EXIF_ORIENTATION = 0x0112
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def normalize_image(image: Image.Image, gray: bool | None = False) -> Image.Image:
    """Give `image` the pixels OpenCV's `imread` would give Caffe: an 8-bit RGB (or L) image.

    EXIF orientation is applied, palettes expanded, alpha dropped (not composited, as OpenCV's
    IMREAD_COLOR does), 16-bit samples scaled to 8 bits by dropping the low byte (not clipped),
    CMYK JPEGs converted with OpenCV's integer formula, and only the first frame of a
    multi-frame file is used. Colour to gray follows `imread(IMREAD_GRAYSCALE)` for the file's
    format (`gray_like_opencv`); for a JPEG that is libjpeg's own Y plane, which only a decode
    that has not happened yet can give: open files with `open_image` (or call `draft_gray`
    before loading) for exact JPEG gray pixels.

    Args:
        image: an opened Pillow image.
        gray: True for a one-channel `L` image (Caffe's `--gray`), False for RGB (Caffe's
            default, which expands grayscale files to three equal planes), None to keep
            grayscale sources as `L` and make everything else RGB.
    """
    if gray is None:
        gray = image.mode in GRAY_MODES
    fmt = image.format
    image = upright(image, exif_orientation(image))
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        samples = np.asarray(image, dtype=np.uint32 if image.mode == "I" else np.uint16)
        image = Image.fromarray((np.clip(samples, 0, 65535) >> 8).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "CMYK" and fmt == "JPEG":
        image = Image.fromarray(_cmyk_to_rgb_like_opencv(np.asarray(image)), mode="RGB")
    if gray:
        return image if image.mode == "L" else gray_like_opencv(image, fmt)
    return image if image.mode == "RGB" else image.convert("RGB")


#: Pillow modes whose conversion to gray is a plain copy (or drop) of their one gray band.
_ONE_BAND_GRAY = ("1", "L", "LA", "La")


def gray_like_opencv(image: Image.Image, fmt: str | None = None) -> Image.Image:
    """The `L` image OpenCV's `imread(IMREAD_GRAYSCALE)` makes of a decoded colour image.

    OpenCV converts colour to gray in the decoder, and the formula depends on the format:

    * PNG: libpng's `png_set_rgb_to_gray(0.299, 0.587)`, in 15-bit fixed point (9797 R +
      19234 G + 3737 B) >> 15, rounded down; palettes are expanded and alpha dropped first.
      A 16-bit colour PNG is converted at 16 bits, (... + 16384) >> 15, then >> 8; Pillow's
      RGB image holds only the high bytes, so `load_image` decodes the file's 16-bit samples
      for that (`_deep_png_gray`).
    * WebP: OpenCV's WebP decoder calls `cvtColor(BGR2GRAY)`, whose 8-bit kernel (OpenCV 4 and
      later) works in 15-bit fixed point: (9798 R + 19235 G + 3735 B + 16384) >> 15.
    * everything else (BMP, TIFF, PPM, CMYK JPEG, ...): imgcodecs' own `icvCvt_BGR2Gray`, the
      14-bit fixed point of OpenCV 2 and 3: (4899 R + 9617 G + 1868 B + 8192) >> 14.
    * JPEG (YCbCr): libjpeg's Y plane, which no formula on RGB reproduces; it takes a
      gray decode (`draft_gray` before loading). Given decoded RGB, the `cvtColor` formula is
      used, which is the closest.

    Args:
        image: a decoded Pillow image in any mode.
        fmt: the file format it was decoded from (Pillow's name, e.g. "PNG"); default
            `image.format`.
    """
    fmt = image.format if fmt is None else fmt
    if image.mode in _ONE_BAND_GRAY:
        return image.convert("L")
    if image.mode == "CMYK":
        rgb = _cmyk_to_rgb_like_opencv(np.asarray(image))
    else:
        rgb = np.asarray(image if image.mode in ("RGB", "RGBA", "RGBX") else image.convert("RGB"))
    r, g, b = (rgb[:, :, i].astype(np.uint32) for i in range(3))
    if fmt == "PNG":
        gray = (r * 9797 + g * 19234 + b * 3737) >> 15
    elif fmt == "WEBP":
        gray = (r * 9798 + g * 19235 + b * 3735 + 16384) >> 15
    else:
        gray = (r * 4899 + g * 9617 + b * 1868 + 8192) >> 14
    return Image.fromarray(gray.astype(np.uint8), mode="L")


def _cmyk_to_rgb_like_opencv(cmyk: np.ndarray) -> np.ndarray:
    """OpenCV's CMYK to RGB (`icvCvt_CMYK2BGR`): R = (255 - K) - (C * (255 - K) >> 8), per channel.

    Pillow's own conversion divides by 255 and rounds, which lands 1 level off OpenCV's >> 8.
    `cmyk` is H x W x 4 as Pillow decodes a JPEG (Adobe's inverted samples already undone).
    """
    values = cmyk.astype(np.uint32)
    rest = 255 - values[:, :, 3:4]
    return (rest - ((values[:, :, :3] * rest) >> 8)).astype(np.uint8)


def draft_gray(image: Image.Image) -> Image.Image:
    """Ask libjpeg for its grayscale output (the Y plane) before `image` is loaded, as OpenCV does.

    `imread(IMREAD_GRAYSCALE)` sets libjpeg's output colour space to gray, which returns the
    luma plane as stored; converting the decoded RGB back to gray differs by up to 13 levels.
    Pillow's `draft("L", size)` makes the same libjpeg request. Asked for the image's own size,
    draft keeps the full resolution (it would otherwise pick a DCT downscale). Other formats,
    CMYK and already-gray JPEGs are left as they are. Returns `image`, changed in place.
    """
    if image.format == "JPEG" and image.mode in ("RGB", "YCbCr"):  # a loaded image ignores draft
        size = image.size
        image.draft("L", size)
        if image.size != size:  # a scale of 1 always fits its own size; checked, never assumed
            raise DatumError(f"JPEG gray decode changed the size from {size} to {image.size}")
    return image


def draft_scaled(image: Image.Image, at_least: tuple[int, int], gray: bool | None) -> Image.Image:
    """Ask libjpeg for a JPEG at the smallest DCT scale that is at least `at_least` (width, height) upright.

    The entropy decoding is the same, but the inverse DCT and colour conversion run on 1/4, 1/16
    or 1/64 of the pixels, and the scaled IDCT already averages what a downscale would. For
    `convert --fast-resize`, which asks for twice the resize target so the final resize still
    filters (docs/converting.md gives the pixel difference from a full decode). The gray output
    is requested at the same time (`draft_gray` cannot follow a draft). Other formats are left
    as they are. Returns `image`, changed in place.
    """
    if image.format != "JPEG":
        return image
    width, height = at_least
    if exif_orientation(image) in (5, 6, 7, 8):  # the target is upright; the draft works on the stored image
        width, height = height, width
    mode = "L" if gray and image.mode in ("RGB", "YCbCr") else None
    image.draft(mode, (max(1, width), max(1, height)))
    return image


def load_image(image: Image.Image, gray: bool | None = False,
               at_least: tuple[int, int] | None = None) -> Image.Image:
    """Decode an opened (not yet loaded) image and normalise it as `open_image` does.

    `at_least` (width, height, upright): a JPEG is decoded at the smallest DCT scale (1, 1/2,
    1/4, 1/8) that still covers it (`draft_scaled`), for a resize to a size smaller than that.
    """
    if at_least is not None:
        draft_scaled(image, at_least, gray)
    if gray:
        draft_gray(image)
        if image.format == "PNG" and image.tile and all(tile.args in _DEEP_PNG for tile in image.tile):
            return _deep_png_gray(image)
    image.load()
    return normalize_image(image, gray=gray)


#: Pillow's raw modes for 16-bit colour PNGs, big-endian as stored, and the ones that read the low bytes.
_DEEP_PNG = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}

#: EXIF orientation -> the transpose that undoes it (what `ImageOps.exif_transpose` applies).
_ORIENTATION_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                          4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                          6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}

#: `info` entries Pillow's `getexif()` reads an orientation from; dropped from an image once turned upright.
_ORIENTATION_INFO = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")

#: What Pillow raises on hostile bytes. Its decoders and its EXIF/TIFF parser do not keep to
#: OSError: a PNG without an IDAT chunk gives IndexError, a damaged EXIF tag struct.error,
#: TypeError or AttributeError (when the block is written back out), a bad length
#: ZeroDivisionError or OverflowError. At the decode boundary each one means "this file cannot
#: be decoded", so it becomes a `DatumError` naming what failed, never a traceback.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, AttributeError,
                 ZeroDivisionError, OverflowError, RuntimeError, struct.error)


def decode_failure(exc: BaseException) -> str:
    """The reason a decode failed, for a message: Pillow's own words, with the error's kind when they are not enough.

    OSError, SyntaxError and ValueError carry Pillow's explanation ("image file is truncated"),
    except `UnidentifiedImageError`, whose message names only the file object Pillow was given
    (`<_io.BytesIO object at 0x...>`); the others are internal errors of a decoder that met
    damaged data ("list index out of range"), which say nothing on their own.
    """
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format Pillow recognises"
    if isinstance(exc, OSError | SyntaxError | ValueError) and str(exc):
        return str(exc)
    return f"damaged image data (the decoder failed with {type(exc).__name__}: {exc})"


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 to 8) OpenCV applies when it decodes `image`; 1 when there is none or it is unreadable.

    OpenCV's EXIF reader gives up on a block it cannot parse and decodes the image as stored,
    so a damaged EXIF block (a tag pointing past the end, a truncated IFD) must not make an
    otherwise decodable image fail. Pillow raises many kinds of errors while parsing one, and
    warns about the tags it skips; here any failure, and any value that is not an orientation,
    means 1. The header read (`read_encoded_header`) and the pixels (`normalize_image`) both
    ask this function, so their dims always agree.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data": the outcome is decided here
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except DECODE_ERRORS:
        return 1
    return orientation if type(orientation) is int and orientation in _ORIENTATION_TRANSPOSE else 1


def upright(image: Image.Image, orientation: int) -> Image.Image:
    """`image` turned as EXIF `orientation` says, as OpenCV's `imread` turns it; `image` itself when 1.

    `ImageOps.exif_transpose` would also write the EXIF block back out without its orientation
    tag, which raises on a damaged tag; the pixels need only the transpose. The turned image
    drops the entries its orientation was read from, so normalising it again leaves it as is.
    """
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    if method is None:
        return image
    turned = image.transpose(method)
    for key in _ORIENTATION_INFO:
        turned.info.pop(key, None)
    return turned


def _deep_png_gray(image: Image.Image) -> Image.Image:
    """libpng's gray of a 16-bit colour PNG, computed on the 16-bit samples as OpenCV's decode does.

    Pillow decodes 16-bit colour to 8-bit RGB(A) by keeping each sample's high byte; decoding the
    same data again with the little-endian raw mode keeps the other byte, the low one, so the two
    decodes give the exact 16-bit samples. Then (9797 R + 19234 G + 3737 B + 16384) >> 15 at
    16 bits and `png_set_strip_16`'s >> 8, as libpng does.
    """
    position = image.fp.tell()
    image.fp.seek(0)
    data = image.fp.read()
    image.fp.seek(position)
    with Image.open(io.BytesIO(data)) as low:
        low.tile = [tile._replace(args=_DEEP_PNG[tile.args]) for tile in low.tile]
        low.load()
        low_bytes = np.asarray(low)
    image.load()
    samples = (np.asarray(image).astype(np.uint32) << 8) | low_bytes
    r, g, b = samples[:, :, 0], samples[:, :, 1], samples[:, :, 2]
    gray = Image.fromarray((((r * 9797 + g * 19234 + b * 3737 + 16384) >> 15) >> 8).astype(np.uint8), mode="L")
    return upright(gray, exif_orientation(image))


def require_image_data(image: Image.Image) -> None:
    """Refuse a freshly opened PNG whose header is followed by no IDAT chunk: it has no pixels.

    Pillow opens one (a 45-byte file), then says only "cannot load this image" when asked for
    the pixels, and fails with an IndexError in `verify()`. Other formats are left to their
    decoder (a WebP has no tiles until it is loaded).

    Raises:
        DatumError: the PNG has no image data.
    """
    if image.format == "PNG" and not image.tile:
        raise DatumError("PNG has no image data (no IDAT chunk)")


def open_image(source: str | os.PathLike | bytes | BinaryIO, gray: bool | None = False,
               at_least: tuple[int, int] | None = None) -> Image.Image:
    """Open and fully decode an image file (path, bytes or file object), normalised for Caffe.

    With `gray=True` the pixels are `cv::imread(path, IMREAD_GRAYSCALE)`'s: libjpeg's gray
    output for JPEGs, OpenCV's per-format fixed-point formula for others (`gray_like_opencv`).
    `at_least` (width, height): decode a JPEG at a DCT scale no smaller than that (`draft_scaled`).

    Raises:
        DatumError: the bytes are not an image Pillow can decode (the message says why).
    """
    what = "image"
    if isinstance(source, bytes | bytearray | memoryview):
        what = f"image bytes ({len(source)} bytes)"
        source = io.BytesIO(source)
    try:
        with Image.open(source) as image:
            require_image_data(image)
            return load_image(image, gray=gray, at_least=at_least)
    except DatumError as exc:
        raise DatumError(f"cannot decode {what}: {exc}") from None
    except UnidentifiedImageError:
        raise DatumError(f"cannot decode {what}: not an image format Pillow recognises") from None
    except DECOMPRESSION_BOMBS as exc:
        data = source.getvalue() if isinstance(source, io.BytesIO) else None
        raise DatumError(f"cannot decode {what}: {bomb_message(data, exc)}") from None
    except DECODE_ERRORS as exc:
        raise DatumError(f"cannot decode {what}: {decode_failure(exc)}") from None


#: What Pillow raises for an image whose header claims more pixels than `Image.MAX_IMAGE_PIXELS`
#: allows (the warning only where warnings are turned into errors). A 69-byte PNG can claim
#: 30000 x 30000; decoding it would allocate 2.7 GB, so these are refused like undecodable data.
DECOMPRESSION_BOMBS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def bomb_message(data: bytes | memoryview | None, exc: Exception) -> str:
    """Why a decompression-bomb image is refused, naming the size its header claims when it can be read."""
    size = _claimed_size(data) if data is not None else None
    if size is None:
        return f"refused as a decompression bomb: {exc}"
    width, height = size
    limit = Image.MAX_IMAGE_PIXELS
    over = "" if limit is None else f", over Pillow's limit of {limit} pixels"
    return (f"its header claims a {width}x{height} (width x height) image, {width * height} pixels{over}; "
            "refused as a decompression bomb")


def _claimed_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """The (width, height) an image header claims, read by the format's Pillow plugin, or None.

    `Image.open` refuses such a header before handing the image over, so the size it claims is
    read here by the plugin directly (header only, nothing decoded), as `Image.open` finds it.
    """
    prefix = bytes(data[:16])
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        accepted = not accept or accept(prefix)
        if not accepted or isinstance(accepted, str):  # a str is Pillow's "recognised but refused"
            continue
        try:
            with factory(io.BytesIO(data), "") as image:
                return image.size
        except Exception:  # only the message depends on this: any failure means "size unknown"
            continue
    return None
