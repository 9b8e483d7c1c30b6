"""The recipes' pickle/msgpack values read as data: the value decoded safely, then recognised as a record.

`decode_value` turns one LMDB value into Python objects without running code from the file
(pickles through `safe_unpickle`, msgpack as plain data) and says in one sentence why a value
cannot be read (a refused global, pyarrow's gone format, ...). `to_legacy_record` recognises
the object as one of the records `migrate` and the read-side layouts know: an `(image file
bytes, label)` pair or an `LMDB_Image`. Both sides use these, so the read side never imports the
migration's writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .datum import DatumError, check_datum, parse_datum_view
from .foreign_values import (
    MSGPACK_CONTAINERS,
    OLD_PICKLE_FIRST,
    PYARROW_GONE,
    is_new_pickle,
    is_old_pickle,
    is_pyarrow_serialized,
    unpack_msgpack,
)
from .formats import sniff_image_format
from .labels import short_repr
from .safe_unpickle import LmdbImageRecord, PickleTooComplexError, UnsafePickleError, safe_unpickle

#: Why a value whose objects nest too deeply for Python to walk (`RecursionError`) is refused.
TOO_DEEP = "the value nests objects too deeply to read (RecursionError; no recipe stores more than a few levels)"


class UnreadableValueError(ValueError):
    """A value `decode_value` cannot read: the message says why in one sentence (no LMDB or key).

    `refused`: the value was refused for what it would do to the reader (a global outside the
    allow-list, a claimed size, a nesting depth), rather than being malformed. `datum`: it is a
    Caffe Datum, not a pickle or msgpack value.
    """

    def __init__(self, reason: str, *, refused: bool = False, datum: bool = False) -> None:
        super().__init__(reason)
        self.refused = refused
        self.datum = datum


def decode_value(value: bytes | memoryview) -> tuple[str, Any]:
    """("pickle" | "msgpack", the decoded object) for one value of a recipe's LMDB; nothing in it is run.

    Raises:
        UnreadableValueError: a pickle naming a global outside the allow-list (nothing was called),
            claiming too much memory or nesting too deeply, a malformed pickle or msgpack value, a
            pyarrow-serialized value, a Caffe Datum, or bytes of no known kind.
    """
    value = bytes(value)
    if is_new_pickle(value) or (value[:1] and value[0] in OLD_PICKLE_FIRST and is_old_pickle(value)):
        return "pickle", _unpickled(value)
    if value[:1] and value[0] in MSGPACK_CONTAINERS:
        try:
            return "msgpack", unpack_msgpack(value)
        except Exception as exc:
            raise UnreadableValueError(f"not a valid msgpack value ({type(exc).__name__}: {exc})") from None
    if is_pyarrow_serialized(value):
        raise UnreadableValueError(f"holds pyarrow-serialized data (pyarrow.serialize); {PYARROW_GONE}")
    if _is_datum(value):
        raise UnreadableValueError("holds a Caffe Datum, not a pickle or msgpack value", datum=True)
    raise UnreadableValueError(
        f"{len(value)} bytes that are neither a pickle, msgpack nor a Caffe Datum (starting {value[:8]!r})")


def _unpickled(value: bytes) -> Any:
    try:
        return safe_unpickle(value)
    except UnsafePickleError as exc:
        raise UnreadableValueError(
            f"refused to unpickle global {exc.global_name} (only builtin containers and scalars, "
            "numpy arrays and LMDB_Image records are allowed)", refused=True) from None
    except MemoryError:
        raise UnreadableValueError("the pickle claims an object too large to build (MemoryError)",
                                   refused=True) from None
    except PickleTooComplexError as exc:
        raise UnreadableValueError(str(exc), refused=True) from None
    except RecursionError:
        raise UnreadableValueError(TOO_DEEP, refused=True) from None
    except Exception as exc:  # a corrupt pickle raises many kinds; none of them ran code
        raise UnreadableValueError(f"cannot unpickle the value safely ({type(exc).__name__}: {exc})") from None


def _is_datum(data: bytes) -> bool:
    try:
        check_datum(parse_datum_view(data))
    except DatumError:
        return False
    return True


@dataclass(frozen=True)
class LegacyRecord:
    """One old record, decoded: an image file's bytes or H x W x C RGB pixels, and its label as stored."""

    label: Any
    file_bytes: bytes | None = None
    pixels: np.ndarray | None = None
    wrapped: bool = False  # the file bytes were in a one-element list/tuple (DataLoader collation)


def _file_bytes(part: Any) -> tuple[bytes, bool]:
    """The image file bytes of a record's image part, and whether they were list-wrapped."""
    wrapped = False
    if isinstance(part, list | tuple) and len(part) == 1:
        part, wrapped = part[0], True
    if isinstance(part, dict):
        part = part.get(b"data", part.get("data"))
    if isinstance(part, np.ndarray) and part.dtype == np.uint8 and part.ndim == 1:
        part = part.tobytes()
    if isinstance(part, bytes | bytearray):
        if not part:
            raise ValueError("image bytes are empty")
        return bytes(part), wrapped
    raise ValueError(f"expected image file bytes, got {describe_object(part)}")


def _lmdb_image_pixels(record: LmdbImageRecord) -> np.ndarray:
    """The H x W x C uint8 RGB pixels of an LMDB_Image record, checked against its `size`/`channels`."""
    fields = record.fields
    image, size = fields.get("image"), fields.get("size")
    if image is None or size is None:
        raise ValueError(f"LMDB_Image record lacks image or size (it has: {', '.join(sorted(fields)) or 'nothing'})")
    try:
        dims = [int(d) for d in size]
    except (TypeError, ValueError):
        raise ValueError(f"LMDB_Image size {short_repr(size)} is not (height, width)") from None
    if len(dims) not in (2, 3) or min(dims) <= 0:
        raise ValueError(f"LMDB_Image size {short_repr(size)} is not (height, width)")
    height, width = dims[:2]
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"LMDB_Image image is a {image.dtype} array; only uint8 pixels are supported")
        image = image.tobytes()
    if not isinstance(image, bytes | bytearray):
        raise ValueError(f"LMDB_Image image is {describe_object(image)}, expected pixel bytes")
    channels = fields.get("channels", dims[2] if len(dims) == 3 else len(image) // (height * width))
    channels = int(channels)
    if channels not in (1, 3, 4):
        raise ValueError(f"LMDB_Image has {channels} channels; 1, 3 or 4 are supported")
    expected = height * width * channels
    if len(image) != expected:
        raise ValueError(
            f"LMDB_Image image has {len(image)} bytes, expected height*width*channels = "
            f"{height}*{width}*{channels} = {expected} uint8 pixels (float images are not supported)"
        )
    return np.frombuffer(image, dtype=np.uint8).reshape(height, width, channels)


def to_legacy_record(obj: Any) -> LegacyRecord:
    """Recognise a decoded old value: an `(image, label)` pair (formats 1 and 2) or an LMDB_Image.

    Raises:
        ValueError: the object has neither shape (the message says what it is).
    """
    if isinstance(obj, LmdbImageRecord):
        if "label" not in obj.fields:
            raise ValueError(f"LMDB_Image record has no label (it has: {', '.join(sorted(obj.fields))})")
        return LegacyRecord(label=obj.fields["label"], pixels=_lmdb_image_pixels(obj))
    if isinstance(obj, list | tuple) and len(obj) == 2:
        data, wrapped = _file_bytes(obj[0])
        return LegacyRecord(label=obj[1], file_bytes=data, wrapped=wrapped)
    raise ValueError(f"expected an (image, label) pair or an LMDB_Image, got {describe_object(obj)}")


def describe_object(obj: Any) -> str:
    """What a decoded object is, in a few words for messages (image bytes say their format and size)."""
    if isinstance(obj, bytes | bytearray):
        fmt = sniff_image_format(bytes(obj[:16]))
        return f"{fmt + ' file' if fmt else 'bytes'}, {len(obj)} bytes"
    if isinstance(obj, np.ndarray):
        return f"numpy {obj.dtype} array of shape {obj.shape}"
    if isinstance(obj, np.generic):
        return f"numpy {obj.dtype} scalar {obj.item()!r}"
    if isinstance(obj, list | tuple):
        return f"a {type(obj).__name__} of {len(obj)}"
    if isinstance(obj, LmdbImageRecord):
        return repr(obj)
    return f"{type(obj).__name__} {short_repr(obj)}"

