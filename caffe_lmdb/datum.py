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
are RGB (or L), rebuilt from the planar BGR channels with `Image.merge`, and `datum_to_image_array`
gives the same image as a C x H x W array in RGB order, for tensors. `parse_datum_view` reads the
wire format without copying the pixels, for readers that parse every record of an LMDB.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from google.protobuf.message import DecodeError
from PIL import Image, UnidentifiedImageError

from .errors import DatumError
from .foreign_values import foreign_value_hint
from .formats import CAFFE_FORMATS, ENCODE_FORMATS
from .image_files import (
    DECODE_ERRORS,
    DECOMPRESSION_BOMBS,
    GRAY_MODES,
    bomb_message,
    decode_failure,
    exif_orientation,
    normalize_image,
    open_image,
)
from .proto import caffe_pb2

Datum = caffe_pb2.Datum


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
        raise DatumError(_not_a_datum(buf, f"{len(buf)} bytes that do not parse as protobuf: {exc}")) from None
    if _has_unknown_fields(datum):
        raise DatumError(_not_a_datum(buf, f"{len(buf)} bytes with fields a Datum does not have"))
    return datum


def _not_a_datum(buf: bytes | bytearray | memoryview, detail: str) -> str:
    """The "not a Datum" message; for a pickle/msgpack/pyarrow value, what it is and what to do instead.

    Nothing is unpickled: the value is recognised from its bytes (`foreign_values.foreign_value_hint`).
    """

    hint = foreign_value_hint(buf)
    return f"not a Datum: {hint}" if hint is not None else f"not a Datum ({detail})"


def _has_unknown_fields(message) -> bool:
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet
    except ImportError:  # protobuf < 4.21: fall back to the older API
        return len(message.UnknownFields()) > 0
    return len(UnknownFieldSet(message)) > 0


def serialize_datum(datum: Datum) -> bytes:
    """The Datum's wire bytes, as stored in the LMDB (fields in number order, as Caffe writes them)."""
    return datum.SerializeToString()


# --------------------------------------------------------------------------- zero-copy bytes -> Datum

class DatumView(NamedTuple):
    """A parsed Datum whose `data` is a view on the bytes it was parsed from, not a copy.

    It has a Datum's field names, so `check_datum`, `datum_to_image`, `datum_to_array` and
    `datum_to_image_array` accept it in place of a Datum. `data` stays valid only as long as
    the parsed buffer does: with an LMDB `buffers=True` read, until the transaction ends, so
    copy the pixels out (any of those functions except `datum_to_array` does) before that.
    `float_data` is always a fresh float32 array.
    """

    channels: int
    height: int
    width: int
    data: memoryview
    label: int
    float_data: np.ndarray
    encoded: bool


_MASK64 = (1 << 64) - 1
_FLOAT_TAG = (6 << 3) | 5  # float_data, one unpacked float: the tag byte 0x35 then 4 bytes


class _WireError(Exception):
    """Internal: why `parse_datum_view` refused the bytes (turned into a DatumError)."""


def parse_datum_view(buf: bytes | bytearray | memoryview) -> DatumView:
    """Parse a serialized Datum without copying its `data` bytes: the fast path for reading LMDBs.

    `parse_datum` (protobuf) copies the LMDB value into the message and `datum.data` copies it
    again into a new `bytes`; for a 256x256x3 raw record that is two 192 KiB copies before any
    pixel is used. This reads the wire format directly, so `data` is a `memoryview` slice of
    `buf` (an LMDB `buffers=True` value is a view on the memory map itself). It accepts exactly
    the bytes `parse_datum` accepts and gives the same field values: unknown fields, wrong wire
    types and corrupt or truncated input raise `DatumError`, int32 fields keep the low 32 bits
    of their varint as protobuf does, the last occurrence of a repeated scalar wins, and
    `float_data` may be packed, unpacked, or both.

    Args:
        buf: the serialized Datum (e.g. an LMDB value read with `buffers=True`).

    Returns:
        A `DatumView`; its `data` shares memory with `buf`.

    Raises:
        DatumError: the bytes are not a Datum (the message gives the offset and the reason).
    """
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    size = len(view)
    channels = height = width = label = 0
    encoded = False
    data = view[0:0]
    floats: list[np.ndarray] = []
    pos = 0
    try:
        while pos < size:
            start = pos
            key = view[pos]
            pos += 1
            if key >= 0x80:
                key, pos = _read_varint(view, start, 5)
                if key > 0xFFFFFFFF:
                    raise _WireError(f"corrupt field tag at byte {start}")
            field, wire = key >> 3, key & 7
            if wire == 0:  # varint: channels, height, width, label, encoded
                value = view[pos]
                if value < 0x80:
                    pos += 1
                elif view[pos + 1] < 0x80:  # two bytes: dims up to 16383, the common case
                    value = (value & 0x7F) | (view[pos + 1] << 7)
                    pos += 2
                else:
                    value, pos = _read_varint(view, pos, 10)
                if field == 7:
                    encoded = value != 0
                    continue
                if value > 0x7FFFFFFF:
                    value = _int32(value)
                if field == 1:
                    channels = value
                elif field == 2:
                    height = value
                elif field == 3:
                    width = value
                elif field == 5:
                    label = value
                else:
                    raise _WireError(_bad_field(field, wire, start))
            elif wire == 2:  # length-delimited: data, or packed float_data
                length = view[pos]
                pos += 1
                if length >= 0x80:
                    length, pos = _read_varint(view, pos - 1, 5)
                end = pos + length
                if end > size:
                    raise _WireError(f"field {field} at byte {start} runs {end - size} bytes past the end")
                if field == 4:
                    data = view[pos:end]
                elif field == 6:
                    if length % 4:
                        raise _WireError(f"packed float_data at byte {start} has {length} bytes, not a multiple of 4")
                    floats.append(np.frombuffer(view[pos:end], dtype="<f4"))
                else:
                    raise _WireError(_bad_field(field, wire, start))
                pos = end
            elif wire == 5 and field == 6:  # unpacked float_data, as Caffe writes it
                if key == _FLOAT_TAG and pos == start + 1:
                    run, pos = _unpacked_float_run(view, start)
                    floats.append(run)
                else:  # a tag in a non-minimal encoding: one value
                    if pos + 4 > size:
                        raise _WireError(f"float at byte {start} runs past the end")
                    floats.append(np.frombuffer(view[pos:pos + 4], dtype="<f4"))
                    pos += 4
            else:
                raise _WireError(_bad_field(field, wire, start))
    except IndexError:
        raise DatumError(_not_a_datum(view, f"{size} bytes, truncated at byte {pos}")) from None
    except _WireError as exc:
        raise DatumError(_not_a_datum(view, f"{size} bytes: {exc}")) from None
    # concatenate copies, so float_data never shares memory with buf
    float_data = np.concatenate(floats).astype(np.float32, copy=False) if floats else np.empty(0, np.float32)
    return DatumView(channels, height, width, data, label, float_data, encoded)


def _read_varint(view: memoryview, pos: int, max_bytes: int) -> tuple[int, int]:
    """Decode the varint at `pos` as protobuf does: at most `max_bytes`, bits past 64 dropped."""
    result = 0
    for i in range(max_bytes):
        byte = view[pos + i]
        result |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return result & _MASK64, pos + i + 1
    raise _WireError(f"varint at byte {pos} is longer than {max_bytes} bytes")


def _int32(value: int) -> int:
    """protobuf's int32 from a decoded varint: the low 32 bits, two's complement."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 0x80000000 else value


def _bad_field(field: int, wire: int, start: int) -> str:
    return f"field {field} with wire type {wire} at byte {start} is not a Datum field"


def _unpacked_float_run(view: memoryview, start: int) -> tuple[np.ndarray, int]:
    """Read consecutive unpacked float_data entries (0x35 + 4 bytes each) at once, vectorised.

    A float datum of 3x256x256 has 196,608 such entries; a Python loop would take a second.
    """
    count = (len(view) - start) // 5
    if count == 0:
        raise _WireError(f"float at byte {start} runs past the end")
    rows = np.frombuffer(view[start:start + 5 * count], dtype=np.uint8).reshape(count, 5)
    other = np.flatnonzero(rows[:, 0] != _FLOAT_TAG)
    run = int(other[0]) if len(other) else count
    return rows[:run, 1:].view("<f4").reshape(run), start + 5 * run


class RawRecordLayout:
    """Reads raw uint8 records of one C x H x W without parsing each: the loader's per-sample fast path.

    Caffe's writers (and ours) serialize a raw record as channels, height, width, then `data`,
    then `label` (and `encoded: false`): for records of one shape the bytes up to the pixels are
    the same. `read` compares them with this shape's header and takes the label from the few
    bytes after the pixels. It answers only for bytes `parse_datum_view` would read to the same
    dims, data and label; anything else (another shape, float_data, fields in another order or
    repeated) gives None, and the caller parses the record in full.
    """

    def __init__(self, channels: int, height: int, width: int) -> None:
        self.shape = (channels, height, width)
        self.size = channels * height * width
        self.header = raw_datum_header(channels, height, width)

    def read(self, value: bytes | memoryview) -> tuple[memoryview, int] | None:
        """(the pixel bytes, a view on `value`; the label) of a record of this shape, or None."""
        view = memoryview(value)
        start = len(self.header)
        pos = start + self.size
        size = len(view)
        if size < pos or view[:start] != self.header:
            return None
        label = 0
        try:
            if pos < size and view[pos] == 0x28:  # label
                label, pos = _read_varint(view, pos + 1, 10)
                if label > 0x7FFFFFFF:
                    label = _int32(label)
            if pos + 1 < size and view[pos] == 0x38 and view[pos + 1] == 0:  # encoded: false
                pos += 2
        except (IndexError, _WireError):
            return None
        if pos != size:
            return None
        return view[start:start + self.size], label


# --------------------------------------------------------------------------- validation

def check_datum(datum: Datum | DatumView) -> None:
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

def checked_label(label: object) -> int:
    """`label` as the int32 a Datum's `label` holds; anything else is a `DatumError`, never truncated.

    Integers of any kind (Python, numpy, a whole-valued 0-d integer array) are accepted;
    floats are refused even when whole (2.0), as protobuf itself refuses them, so that a
    regression target passed by mistake (2.5) is not silently stored as 2.
    """
    if isinstance(label, bool | np.bool_) or not isinstance(label, int | np.integer):
        raise DatumError(f"label must be an integer, got {label!r} ({type(label).__name__})")
    value = int(label)
    if not -(1 << 31) <= value < (1 << 31):
        raise DatumError(f"label {value} does not fit a Datum's int32 label")
    return value


def array_to_datum(arr: np.ndarray, label: int | None = None) -> Datum:
    """A raw Datum from a C x H x W array in Datum channel order (BGR for colour), as pycaffe's does.

    pycaffe's `caffe.io.array_to_datum` conventions: uint8 arrays go to `data`; any other
    numeric dtype goes to `float_data` through float64 (`arr.astype(float)`, then protobuf's
    float32), so int64 values above 2**53 round exactly as pycaffe rounds them. `label=None`
    leaves the label out of the record (pycaffe's `test_label_none_size`: the record is
    smaller), and it reads back as 0. Unlike pycaffe, `encoded=False` is written explicitly
    (Caffe's convert_imageset does; DALI needs it), a float label is an error instead of being
    truncated, and bool arrays are stored as uint8 0/1 pixels in `data` (pycaffe would write
    0.0/1.0 floats).

    Raises:
        DatumError: not 3-D, an empty dimension, a non-numeric dtype, or a label that is not an
            integer.
    """
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise DatumError(f"array must be C x H x W (3-D), got shape {arr.shape}")
    c, h, w = arr.shape
    if c <= 0 or h <= 0 or w <= 0:
        raise DatumError(f"array has an empty dimension, shape {arr.shape}")
    datum = Datum(channels=c, height=h, width=w, encoded=False)
    if label is not None:
        datum.label = checked_label(label)
    if arr.dtype == np.uint8 or arr.dtype == np.bool_:
        datum.data = np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    elif arr.dtype.kind in "iuf":
        # pycaffe's arr.astype(float) stored into the float32 field, merged from packed wire bytes
        # (parsed in C) instead of one Python float per value
        floats = arr.astype(np.float64).astype("<f4")
        datum.MergeFromString(b"\x32" + encode_varint(4 * floats.size) + floats.tobytes())
    else:
        raise DatumError(f"array dtype must be uint8, bool or numeric, got {arr.dtype}")
    return datum


def datum_to_array(datum: Datum | DatumView, *, copy: bool = True) -> np.ndarray:
    """The C x H x W array of a Datum in Datum channel order (BGR for colour), as pycaffe's.

    pycaffe's `caffe.io.datum_to_array` conventions: raw records give a new, writable uint8
    array (so `arr -= mean` works), float records a float64 array (`float_data` holds float32
    values, so the float64 values are exactly those). Encoded records, which pycaffe cannot
    read, are decoded as Caffe's `DecodeDatumToCVMat` does without forcing a colour: BGR planes
    for colour files, one plane for gray ones.

    Args:
        datum: a raw, float or encoded Datum (or `DatumView`).
        copy: False gives raw uint8 pixels as a read-only view on the Datum's bytes (no copy;
            with a `DatumView` from an LMDB read, valid only while the transaction is), and
            float records as float32 without conversion. Encoded records are always fresh.
    """
    if datum.encoded:
        image = datum_to_image(datum)
        hwc = np.asarray(image)
        if hwc.ndim == 2:
            return hwc[np.newaxis].copy()
        return np.ascontiguousarray(hwc[:, :, ::-1].transpose(2, 0, 1))
    check_datum(datum)
    shape = (datum.channels, datum.height, datum.width)
    if datum.data:
        planes = np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)
        return planes.copy() if copy else planes
    if not copy:
        return np.asarray(datum.float_data, dtype=np.float32).reshape(shape)
    return np.asarray(datum.float_data, dtype=np.float64).reshape(shape)


# --------------------------------------------------------------------------- PIL <-> Datum

def image_to_datum(image: Image.Image, label: int = 0, gray: bool = False) -> Datum:
    """A raw Datum (planar BGR uint8) from a PIL image.

    The pixels are stored as given; only the mode is normalised (to L with `gray`, else RGB).
    Use `open_image` to read files with Caffe's rules (EXIF orientation, 16-bit scaling).
    """
    target = "L" if gray else "RGB"
    if image.mode != target:
        image = normalize_image(image, gray=gray)
    width, height = image.size
    if target == "L":
        data, channels = image.tobytes(), 1
    else:
        # HWC RGB -> CHW BGR in one strided copy (the layout Caffe's CVMatToDatum writes).
        data, channels = np.asarray(image)[:, :, ::-1].transpose(2, 0, 1).tobytes(), 3
    return Datum(channels=channels, height=height, width=width, data=data, label=checked_label(label), encoded=False)


#: Caffe's names for the decodes `DecodeDatumToCVMat` offers, as `mode` values: "color" is
#: `force_color` (`imdecode(IMREAD_COLOR)`: always 3 channels), "gray" is `force_gray`
#: (`imdecode(IMREAD_GRAYSCALE)`: 1 channel). They are the Pillow modes RGB and L.
DECODE_MODES = {"color": "RGB", "gray": "L"}


def decode_mode(mode: str | None) -> str | None:
    """The Pillow mode for a `mode` argument: "color" and "gray" are Caffe's names for RGB and L."""
    return DECODE_MODES.get(mode, mode) if mode is not None else None


def datum_to_image(datum: Datum | DatumView, mode: str | None = None) -> Image.Image:
    """The PIL image of a Datum: RGB rebuilt from the planar BGR channels, or L for one channel.

    Encoded records decode as OpenCV decodes them for Caffe's `DecodeDatumToCVMat`:

    * `mode=None`: L for files whose pixels are gray (L, LA, 1-bit, 16-bit gray), RGB for
      everything else, alpha dropped and 16-bit samples scaled to 8 bits. (Caffe's native
      decode, `imdecode(IMREAD_UNCHANGED)`, would keep 4 channels for RGBA files and 16 bits
      for 16-bit PNGs; Caffe's data layer cannot use those, so they are not offered.)
    * `mode="RGB"` or "color" (Caffe's `force_color`): always RGB, gray files as 3 equal channels.
    * `mode="L"` or "gray" (Caffe's `force_gray`): `imdecode(IMREAD_GRAYSCALE)`'s pixels
      (`open_image(data, gray=True)`: libjpeg's Y plane, OpenCV's fixed-point formulas).

    Raw records are not converted by Caffe; here "L" turns a colour record gray with Pillow's
    own formula, and "RGB" gives a one-channel record 3 equal channels.

    Args:
        datum: a raw, float or encoded Datum (or `DatumView`).
        mode: convert the result to this Pillow mode, or "color" / "gray" (above); None keeps
            RGB for colour and L for one-channel records.

    Raises:
        DatumError: the Datum is malformed or its encoded payload cannot be decoded.
    """
    mode = decode_mode(mode)
    if datum.encoded:
        check_datum(datum)
        image = open_image(datum.data, gray=True if mode == "L" else False if mode == "RGB" else None)
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


_NATURAL_MODE = {1: "L", 3: "RGB", 4: "RGBA"}


def datum_to_image_array(datum: Datum | DatumView, mode: str | None = None) -> np.ndarray:
    """The C x H x W array of the image `datum_to_image` gives: RGB plane order, a fresh array.

    This is the tensor-friendly counterpart of `datum_to_image`: raw records go from their
    planar BGR bytes to planar RGB with a single copy (no PIL image, no H x W x C round trip),
    and the result owns its memory, so it outlives a zero-copy `DatumView` and can be handed to
    `torch.from_numpy`. Unlike `datum_to_array` (Caffe's own BGR order) the planes are in the
    order PIL and torchvision use.

    Args:
        datum: a raw, float or encoded Datum (or `DatumView`).
        mode: as in `datum_to_image`: None keeps 1 plane for one-channel records and RGB(A)
            for colour; "RGB" ("color") makes one-channel records three equal planes; "L"
            ("gray") decodes encoded records as OpenCV's IMREAD_GRAYSCALE; any other
            conversion goes through Pillow.

    Returns:
        uint8 C x H x W for raw and encoded records; float32 for float records (their values
        kept, not clipped, unless `mode` asks for a Pillow conversion). Raw records with a
        channel count other than 1, 3 or 4 keep their stored plane order when `mode` is None.

    Raises:
        DatumError: the Datum is malformed or its encoded payload cannot be decoded.
    """
    mode = decode_mode(mode)
    if not datum.encoded:
        check_datum(datum)
        channels = datum.channels
        natural = _NATURAL_MODE.get(channels)
        if mode is None or mode == natural or (channels == 1 and mode == "RGB"):
            shape = (channels, datum.height, datum.width)
            if datum.data:
                planes = np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)
            else:
                planes = np.asarray(datum.float_data, dtype=np.float32).reshape(shape)
            if channels == 1 and mode == "RGB":
                return np.repeat(planes, 3, axis=0)
            if channels == 3:  # Caffe stores colour planes as BGR(A): reverse them while copying
                return planes[::-1].copy()
            if channels == 4:
                return planes[[2, 1, 0, 3]]  # fancy indexing copies
            return planes.copy()
    hwc = np.asarray(datum_to_image(datum, mode))
    if hwc.ndim == 2:
        return hwc[np.newaxis].copy()
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


def _float_datum_to_image(datum: Datum) -> Image.Image:
    chw = np.clip(np.asarray(datum.float_data, dtype=np.float32), 0, 255).astype(np.uint8)
    return planes_to_image(chw.tobytes(), datum.channels, datum.height, datum.width)


# --------------------------------------------------------------------------- encoded bytes <-> Datum

def encoded_to_datum(data: bytes, label: int = 0) -> Datum:
    """An encoded Datum holding an image file's bytes unchanged; dims stay 0 as in Caffe."""
    if not data:
        raise DatumError("encoded image bytes are empty")
    return Datum(data=bytes(data), label=checked_label(label), encoded=True)


def pil_format(encode_type: str) -> str:
    """The Pillow format for a Caffe `--encode_type` (jpg and jpeg are the same format)."""
    fmt = ENCODE_FORMATS.get(encode_type.lower().lstrip("."))
    if fmt is None:
        raise ValueError(f"unsupported encode_type {encode_type!r} (use one of: {', '.join(ENCODE_FORMATS)})")
    return fmt


def encode_image(image: Image.Image, encode_type: str = "png") -> bytes:
    """Encode a PIL image to file bytes (`encode_type` as Caffe's `--encode_type`: jpg, png, bmp...).

    JPEG uses quality 95, OpenCV's `imencode` default and so what Caffe's re-encoding writes.
    """
    fmt = pil_format(encode_type)
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
    return pil_format in CAFFE_FORMATS  # not GIF: those are always re-encoded


# --------------------------------------------------------------------------- fast raw serialization

def encode_varint(value: int) -> bytes:
    """A protobuf varint, as the serializer writes it (negative int32 values take 10 bytes)."""
    if value < 0:  # int32 negatives are sign-extended to 64 bits on the wire
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def raw_datum_header(channels: int, height: int, width: int) -> bytes:
    """The bytes a raw record starts with, up to its pixels: channels, height, width, then `data`'s tag and length."""
    return b"".join((b"\x08", encode_varint(channels), b"\x10", encode_varint(height), b"\x18", encode_varint(width),
                     b"\x22", encode_varint(channels * height * width)))


def raw_datum_parts(
    image: Image.Image, label: int = 0, gray: bool = False, float_data: Sequence[float] = ()
) -> list[bytes]:
    """The serialized raw Datum of a PIL image as a few pieces whose concatenation is the record.

    The converter's hot path: the pieces are the wire header, one plane per channel (B, G, R, as
    Caffe stores them) and the label tail, so the 192 KiB of a 256x256 record are copied only
    once more, by whoever joins them (`b"".join`, or straight into a worker's shared buffer).
    Pillow packs each plane out of its own pixel buffer in C (`tobytes("raw", "B")`), faster than
    a numpy transpose of the HxWx3 array (figures: docs/benchmarks.md).
    Byte for byte what `serialize_datum(image_to_datum(image, label, gray))` (plus `float_data`) gives.
    """
    target = "L" if gray else "RGB"
    if image.mode != target:
        image = normalize_image(image, gray=gray)
    width, height = image.size
    channels = 1 if gray else 3
    head = raw_datum_header(channels, height, width)
    floats = b"".join(b"\x35" + struct.pack("<f", value) for value in float_data)
    tail = b"\x28" + encode_varint(int(label)) + floats + b"\x38\x00"
    planes = [image.tobytes()] if gray else [image.tobytes("raw", band) for band in "BGR"]
    return [head, *planes, tail]


def image_to_datum_bytes(
    image: Image.Image, label: int = 0, gray: bool = False, float_data: Sequence[float] = ()
) -> bytes:
    """The serialized raw Datum of a PIL image (`raw_datum_parts`, joined)."""
    return b"".join(raw_datum_parts(image, label, gray, float_data))


# --------------------------------------------------------------------------- inspection without decoding

class EncodedHeader(NamedTuple):
    """What an encoded payload's header says: its Pillow format, the dims it decodes to, its EXIF orientation."""

    format: str
    channels: int
    height: int
    width: int
    orientation: int = 1


#: EXIF orientations that turn the image a quarter, so the decoded image has width and height swapped.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def read_encoded_header(data: bytes | memoryview) -> EncodedHeader:
    """The format and decoded C x H x W of an encoded Datum's payload, read from its header alone.

    Tools that describe big LMDBs (`caffe-lmdb info`) cannot afford a decode per record; Pillow's
    `Image.open` parses only the header. The dims are those `datum_to_image` will give: EXIF
    orientation applied (a quarter turn swaps width and height), one channel for grayscale
    modes and three for everything else (alpha is dropped, palettes expanded).

    Raises:
        DatumError: the header is not one of an image format Pillow recognises.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            # A PNG with no eXIf chunk before the pixels (where Pillow writes it): its getexif() would
            # decode the whole image to look for one after them, which a header read must not.
            png_without_exif = image.format == "PNG" and "exif" not in image.info
            orientation = 1 if png_without_exif else exif_orientation(image)
            if orientation in _TRANSPOSING_ORIENTATIONS:
                width, height = height, width
            channels = 1 if image.mode in GRAY_MODES else 3
            return EncodedHeader(image.format or "unknown", channels, height, width, orientation)
    except UnidentifiedImageError:
        raise DatumError(f"encoded data ({len(data)} bytes) is not an image format Pillow recognises") from None
    except DECOMPRESSION_BOMBS as exc:
        raise DatumError(f"encoded data ({len(data)} bytes): {bomb_message(data, exc)}") from None
    except DECODE_ERRORS as exc:
        raise DatumError(f"encoded data ({len(data)} bytes) has a bad image header: {decode_failure(exc)}") from None


def image_plane_order(channels: int) -> list[int]:
    """Indices that put a raw Datum's planes, or per-plane values, in image order (RGB, RGBA).

    Caffe stores colour planes as BGR(A), so values computed per Datum plane (a mean, a std)
    must be reordered before they meet RGB tensors, e.g. in `torchvision.transforms.Normalize`.
    """
    if channels == 3:
        return [2, 1, 0]
    if channels == 4:
        return [2, 1, 0, 3]
    return list(range(channels))


# --------------------------------------------------------------------------- records as Caffe's data layer reads them

def record_planes(record: Datum | DatumView | bytes | bytearray | memoryview, *,
                  gray: bool | None = None) -> np.ndarray:
    """A record's pixels, C x H x W in Datum order, as Caffe's data layer (`Transform`) reads them.

    Raw records give a read-only uint8 view on their `data` (no copy) or, with `data` empty,
    float32 `float_data` (`datum_to_array(copy=False)`'s arrays); encoded ones are decoded
    (`gray=True`: 1 channel, Caffe's `force_gray`; False: 3, `force_color`; None: the file's
    own), colour as BGR planes.

    Raises:
        DatumError: the record is not a valid Datum, or its image does not decode.
    """
    if isinstance(record, bytes | bytearray | memoryview):
        record = parse_datum_view(record)
    if record.encoded:
        check_datum(record)
        return image_planes(open_image(record.data, gray=gray))
    check_datum(record)
    shape = (record.channels, record.height, record.width)
    if record.data:
        return np.frombuffer(record.data, dtype=np.uint8).reshape(shape)
    return np.asarray(record.float_data, dtype=np.float32).reshape(shape)


def image_planes(image: Image.Image) -> np.ndarray:
    """A PIL image (RGB, RGBA or L, as the Datum codec gives) as C x H x W planes in Datum order (BGR)."""
    if image.mode not in ("L", "RGB", "RGBA"):
        image = normalize_image(image, gray=None)
    hwc = np.asarray(image)
    if hwc.ndim == 2:
        return hwc[np.newaxis]
    chw = hwc.transpose(2, 0, 1)
    return chw[::-1] if chw.shape[0] == 3 else chw[image_plane_order(chw.shape[0])]
