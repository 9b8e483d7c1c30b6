"""The Datum codec: the one place that knows how Caffe lays out an image inside a `caffe.Datum`.

Caffe's conventions, which every other module reaches only through these functions:

* **raw** records: `data` holds uint8 pixels planar C x H x W with the colour planes in **BGR**
  order (OpenCV's order, which Caffe inherited); `channels`, `height`, `width` are set and
  `label` and `encoded=False` are written explicitly (NVIDIA DALI treats a Datum without an
  explicit `encoded` field as encoded). Grayscale is one plane.
* **encoded** records: `data` holds an image file's bytes (JPEG, PNG, ...), `encoded=True`, and
  `channels/height/width` stay unset (0), as Caffe's `convert_imageset --encoded` writes them.
* **float** records: `data` is empty and `float_data` carries C x H x W floats, as pycaffe's
  `caffe.io.array_to_datum` writes non-uint8 arrays. When `data` is not empty, `float_data` is
  extra per-record data (multi-label or regression targets), not pixels.

Arrays are C x H x W in the Datum's own channel order (BGR for colour), as in pycaffe; PIL images
are RGB (or L), rebuilt from the planar BGR channels with `Image.merge`.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

import numpy as np
from google.protobuf.message import DecodeError
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DatumError
from .proto import caffe_pb2

Datum = caffe_pb2.Datum

#: Pillow formats whose file bytes Caffe can store unchanged as an encoded Datum. OpenCV (and so
#: Caffe, and DALI's decoder) cannot decode GIF, so GIF images are always re-encoded.
_PASSTHROUGH_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM"}


# --------------------------------------------------------------------------- bytes <-> Datum

def parse_datum(buf: bytes | bytearray | memoryview) -> Datum:
    """Parse serialized bytes (an LMDB value) into a Datum, refusing anything that is not one.

    Raises:
        DatumError: the bytes are not a protobuf message, or carry fields a Datum does not have.
    """
    datum = Datum()
    try:
        datum.ParseFromString(bytes(buf) if isinstance(buf, memoryview) else buf)
    except DecodeError as exc:
        raise DatumError(f"not a Datum ({len(buf)} bytes that do not parse as protobuf: {exc})") from None
    if _has_unknown_fields(datum):
        raise DatumError(f"not a Datum ({len(buf)} bytes with fields a Datum does not have)")
    return datum


def _has_unknown_fields(message) -> bool:
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet
    except ImportError:  # protobuf < 4.21: fall back to the older API
        return len(message.UnknownFields()) > 0
    return len(UnknownFieldSet(message)) > 0


def serialize_datum(datum: Datum) -> bytes:
    """The Datum's wire bytes, as stored in the LMDB (fields in number order, as Caffe writes them)."""
    return datum.SerializeToString()


# --------------------------------------------------------------------------- validation

def check_datum(datum: Datum) -> None:
    """Raise a `DatumError` that says what is wrong if the Datum cannot hold an image.

    The rules: an encoded Datum needs non-empty `data`; a raw one needs positive dims and either
    `data` of exactly C*H*W bytes, or (with `data` empty) `float_data` of exactly C*H*W floats.
    """
    if datum.encoded:
        if not datum.data:
            raise DatumError("encoded datum has empty data")
        return
    c, h, w = datum.channels, datum.height, datum.width
    if not datum.data and not len(datum.float_data):
        raise DatumError(f"raw datum has neither data nor float_data (channels={c}, height={h}, width={w})")
    if c <= 0 or h <= 0 or w <= 0:
        raise DatumError(f"raw datum has invalid dims channels={c}, height={h}, width={w} (all must be > 0)")
    expected = c * h * w
    if datum.data:
        if len(datum.data) != expected:
            raise DatumError(
                f"raw datum data has {len(datum.data)} bytes, channels*height*width = {c}*{h}*{w} = {expected}"
            )
    elif len(datum.float_data) != expected:
        raise DatumError(
            f"float datum has {len(datum.float_data)} float_data values, "
            f"channels*height*width = {c}*{h}*{w} = {expected}"
        )


# --------------------------------------------------------------------------- numpy (CHW) <-> Datum

def array_to_datum(arr: np.ndarray, label: int = 0) -> Datum:
    """A raw Datum from a C x H x W array in Datum channel order (BGR for colour), as pycaffe does.

    uint8 arrays go to `data`; any other numeric dtype goes to `float_data` as float32.
    """
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise DatumError(f"array must be C x H x W (3-D), got shape {arr.shape}")
    c, h, w = arr.shape
    if c <= 0 or h <= 0 or w <= 0:
        raise DatumError(f"array has an empty dimension, shape {arr.shape}")
    datum = Datum(channels=c, height=h, width=w, label=int(label), encoded=False)
    if arr.dtype == np.uint8:
        datum.data = np.ascontiguousarray(arr).tobytes()
    elif arr.dtype.kind in "iuf":
        datum.float_data.extend(arr.astype(np.float32, copy=False).ravel().tolist())
    else:
        raise DatumError(f"array dtype must be uint8 or numeric, got {arr.dtype}")
    return datum


def datum_to_array(datum: Datum) -> np.ndarray:
    """The C x H x W array of a Datum in Datum channel order (BGR for colour).

    Raw records give uint8 (a read-only view on the Datum's bytes, no copy), float records
    float32, and encoded records are decoded (colour as BGR, as Caffe's `DecodeDatumToCVMat`).
    """
    if datum.encoded:
        image = datum_to_image(datum)
        hwc = np.asarray(image)
        if hwc.ndim == 2:
            return hwc[np.newaxis]
        return np.ascontiguousarray(hwc[:, :, ::-1].transpose(2, 0, 1))
    check_datum(datum)
    shape = (datum.channels, datum.height, datum.width)
    if datum.data:
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)
    return np.asarray(datum.float_data, dtype=np.float32).reshape(shape)


# --------------------------------------------------------------------------- PIL <-> Datum

_EXIF_ORIENTATION = 0x0112
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def normalize_image(image: Image.Image, gray: bool | None = False) -> Image.Image:
    """Give `image` the pixels OpenCV's `imread` would give Caffe: an 8-bit RGB (or L) image.

    EXIF orientation is applied, palettes expanded, alpha dropped (not composited, as OpenCV's
    IMREAD_COLOR does), 16-bit samples scaled to 8 bits by dropping the low byte (not clipped),
    and only the first frame of a multi-frame file is used.

    Args:
        image: an opened Pillow image.
        gray: True for a one-channel `L` image (Caffe's `--gray`), False for RGB (Caffe's
            default, which expands grayscale files to three equal planes), None to keep
            grayscale sources as `L` and make everything else RGB.
    """
    if gray is None:
        gray = image.mode in _GRAY_MODES
    if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:  # exif_transpose would copy even when upright
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        samples = np.asarray(image, dtype=np.uint32 if image.mode == "I" else np.uint16)
        image = Image.fromarray((np.clip(samples, 0, 65535) >> 8).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    target = "L" if gray else "RGB"
    if image.mode != target:
        if image.mode in ("P", "PA", "LA", "RGBA", "1") and gray:
            image = image.convert("RGB")
        image = image.convert(target)
    return image


def open_image(source: str | os.PathLike | bytes | BinaryIO, gray: bool | None = False) -> Image.Image:
    """Open and fully decode an image file (path, bytes or file object), normalised for Caffe.

    Raises:
        DatumError: the bytes are not an image Pillow can decode (the message says why).
    """
    what = "image"
    if isinstance(source, bytes | bytearray | memoryview):
        what = f"image bytes ({len(source)} bytes)"
        source = io.BytesIO(source)
    try:
        with Image.open(source) as image:
            image.load()
            return normalize_image(image, gray=gray)
    except UnidentifiedImageError:
        raise DatumError(f"cannot decode {what}: not an image format Pillow recognises") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatumError(f"cannot decode {what}: {exc}") from None


def image_to_datum(image: Image.Image, label: int = 0, gray: bool = False) -> Datum:
    """A raw Datum (planar BGR uint8) from a PIL image, normalised as `normalize_image` does."""
    image = normalize_image(image, gray=gray)
    width, height = image.size
    if image.mode == "L":
        data = image.tobytes()
        channels = 1
    else:
        red, green, blue = image.split()
        data = b"".join((blue.tobytes(), green.tobytes(), red.tobytes()))
        channels = 3
    return Datum(channels=channels, height=height, width=width, data=data, label=int(label), encoded=False)


def datum_to_image(datum: Datum, mode: str | None = None) -> Image.Image:
    """The PIL image of a Datum: RGB rebuilt from the planar BGR channels, or L for one channel.

    Args:
        datum: a raw, float or encoded Datum.
        mode: convert the result to this Pillow mode (e.g. "RGB" to get 3 channels from
            grayscale records); None keeps RGB for colour and L for one-channel records.

    Raises:
        DatumError: the Datum is malformed or its encoded payload cannot be decoded.
    """
    if datum.encoded:
        check_datum(datum)
        image = open_image(datum.data, gray=None)
    else:
        check_datum(datum)
        image = planes_to_image(datum.data, datum.channels, datum.height, datum.width) if datum.data \
            else _float_datum_to_image(datum)
    if mode is not None and image.mode != mode:
        image = image.convert(mode)
    return image


def planes_to_image(data: bytes | memoryview, channels: int, height: int, width: int) -> Image.Image:
    """Rebuild a PIL image from planar Datum bytes: L for 1 plane, RGB from BGR for 3, RGBA from BGRA for 4."""
    plane = height * width
    if len(data) != channels * plane:
        raise DatumError(
            f"raw datum data has {len(data)} bytes, channels*height*width = "
            f"{channels}*{height}*{width} = {channels * plane}"
        )
    view = memoryview(data)
    planes = [
        Image.frombuffer("L", (width, height), view[i * plane:(i + 1) * plane], "raw", "L", 0, 1)
        for i in range(channels)
    ]
    if channels == 1:
        return planes[0].copy()
    if channels == 3:
        return Image.merge("RGB", (planes[2], planes[1], planes[0]))
    if channels == 4:
        return Image.merge("RGBA", (planes[2], planes[1], planes[0], planes[3]))
    raise DatumError(f"raw datum has {channels} channels; only 1, 3 or 4 make an image")


def _float_datum_to_image(datum: Datum) -> Image.Image:
    chw = np.clip(np.asarray(datum.float_data, dtype=np.float32), 0, 255).astype(np.uint8)
    return planes_to_image(chw.tobytes(), datum.channels, datum.height, datum.width)


# --------------------------------------------------------------------------- encoded bytes <-> Datum

def encoded_to_datum(data: bytes, label: int = 0) -> Datum:
    """An encoded Datum holding an image file's bytes unchanged; dims stay 0 as in Caffe."""
    if not data:
        raise DatumError("encoded image bytes are empty")
    return Datum(data=bytes(data), label=int(label), encoded=True)


def encode_image(image: Image.Image, encode_type: str = "png") -> bytes:
    """Encode a PIL image to file bytes (`encode_type` as Caffe's `--encode_type`: jpg, png, bmp...)."""
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF",
           "webp": "WEBP", "ppm": "PPM", "pgm": "PPM"}.get(encode_type.lower().lstrip("."))
    if fmt is None:
        raise ValueError(f"unsupported encode_type {encode_type!r} (use jpg, png, bmp, tiff, webp or ppm)")
    buf = io.BytesIO()
    options = {"quality": 95} if fmt == "JPEG" else {}
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def datum_to_encoded(datum: Datum, encode_type: str = "png") -> bytes:
    """Image file bytes for a Datum: the stored bytes of an encoded one, a fresh file for a raw one."""
    if datum.encoded:
        check_datum(datum)
        return bytes(datum.data)
    return encode_image(datum_to_image(datum), encode_type)


def is_passthrough_format(pil_format: str | None) -> bool:
    """Whether Caffe (OpenCV) can decode files of this Pillow format, so their bytes may be stored as-is."""
    return pil_format in _PASSTHROUGH_FORMATS
