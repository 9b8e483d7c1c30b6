"""A record's label and float targets (a Datum's `label` and `float_data`), by each input's rule.

* a list file's numeric columns (`list_columns`): the first is the label, an integer; with more
  than one column, all of them go into `float_data`;
* a Python dataset's target (`sample_targets`, for `write_dataset`): an int, numbers (the
  list-file rule), or `(label, numbers)`;
* an old LMDB's stored label (`label_fields`, for `migrate`): lenient, whatever a training
  script pickled.

A label is a whole number within int32 (`fits_int32`) in all three; each rule keeps its own
messages, which name the input (file and line, sample, or the stored value).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from .datum import DatumError, checked_label
from .errors import InputError

_INTEGER = re.compile(r"[-+]?\d+")


def fits_int32(value: int) -> bool:
    """Whether a Datum's int32 `label` holds `value`."""
    return -(2**31) <= value < 2**31


# --------------------------------------------------------------------------- list files

def list_columns(values: Sequence[str], where: str) -> tuple[int, tuple[float, ...]]:
    """(label, float_data) of a list-file line's numeric columns (`where` is `file:line`, for messages).

    Raises:
        InputError: the first column is not an integer within int32, or a value does not fit a
            finite 32-bit float.
    """
    if not _INTEGER.fullmatch(values[0]):
        raise InputError(f"{where}: label {values[0]!r} is not an integer")
    label = int(values[0])
    if not fits_int32(label):
        raise InputError(f"{where}: label {label} does not fit Datum's int32")
    return label, tuple(_float32(where, v) for v in values) if len(values) > 1 else ()


def _float32(where: str, text: str) -> float:
    """A list column as the float it will be stored as, refusing what a 32-bit float cannot hold."""
    value = float(text)
    try:
        struct.pack("<f", value)  # how raw records pack float_data; OverflowError beyond float32
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise InputError(f"{where}: value {text!r} does not fit a 32-bit float")
    return value


# --------------------------------------------------------------------------- Python datasets

def sample_targets(target: Any) -> tuple[int, tuple[float, ...]]:
    """(label, float_data) of a sample's target: the list-file rule for numeric columns.

    * an int (or a 0-d array/tensor of one): the label, no `float_data`;
    * a sequence, array or tensor of numbers: all of them in `float_data`, and the first, which
      must then be a whole number, as the label (one number alone is just the label), exactly as
      a list file's `path l1 l2 ...` columns;
    * `(label, floats)`: that label, and those floats (any first value).

    Raises:
        ValueError: a target of another kind, a label that is not a whole number or does not fit
            Datum's int32, or a value that does not fit a finite 32-bit float.
    """
    if isinstance(target, tuple) and len(target) == 2 and _is_scalar(target[0]) and not _is_scalar(target[1]):
        label, floats = _whole(target[0], "label"), _floats(target[1])
        return label, floats
    if _is_scalar(target):
        return _whole(target, "target"), ()
    values = _floats(target)
    if not values:
        raise ValueError("target is an empty sequence")
    label = _whole(values[0], "target[0] (the label, by the list-file rule; pass (label, floats) otherwise)")
    return label, values if len(values) > 1 else ()


def _is_scalar(value: Any) -> bool:
    if isinstance(value, (bool, int, float, np.integer, np.floating)):
        return True
    return getattr(value, "ndim", None) == 0 and hasattr(value, "item")


def _whole(value: Any, what: str) -> int:
    if isinstance(value, bool) or not _is_scalar(value):
        raise ValueError(f"{what} must be an integer, got {type(value).__name__}")
    number = value.item() if hasattr(value, "item") else value
    if isinstance(number, float):
        if not number.is_integer():
            raise ValueError(f"{what} {number!r} is not a whole number")
        number = int(number)
    try:
        return checked_label(number)
    except (DatumError, ValueError, TypeError) as exc:
        raise ValueError(f"{what}: {exc}") from None


def _floats(values: Any) -> tuple[float, ...]:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    if isinstance(values, (str, bytes)):
        raise ValueError(f"target must be numbers, got {type(values).__name__}")
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"target must be an int, numbers, or (label, numbers); got {type(values).__name__}") from None
    if array.ndim != 1:
        raise ValueError(f"target numbers must be one-dimensional, got shape {tuple(array.shape)}")
    stored = array.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(stored))
    if bad.size:
        raise ValueError(f"target value {array[bad[0]]!r} (at {bad[0]}) does not fit a finite 32-bit float")
    return tuple(stored.astype(np.float64).tolist())


# --------------------------------------------------------------------------- old LMDBs (migrate)

def whole_int32(value: float) -> int | None:
    """The value as a Datum label if it is a whole number that fits int32, else None."""
    if not np.isfinite(value) or not float(value).is_integer():
        return None
    value = int(value)
    return value if fits_int32(value) else None


def _msgpack_numpy(obj: dict) -> Any:
    """A numpy array or scalar as msgpack-numpy stores it ({nd, type, kind, shape, data}), numeric only."""
    kind = obj.get(b"type")
    dtype = np.dtype(kind.decode("ascii") if isinstance(kind, bytes) else kind)
    if dtype.kind not in "biuf":
        raise ValueError(f"msgpack-numpy value of dtype {dtype} is not numeric")
    values = np.frombuffer(obj[b"data"], dtype=dtype)
    return values.reshape(obj[b"shape"]) if obj.get(b"nd") else values[0]


def label_fields(label: Any) -> tuple[int, tuple[float, ...]]:
    """Datum `label` and `float_data` for a stored label.

    A label with one whole-number value (an int, a numpy scalar, a shape `(1,)` array) becomes
    `label` alone. Anything else (a multi-label vector such as COCO's 80-way multi-hot, a
    regression target) goes whole into `float_data`, as the converter does with several list-file
    columns, and `label` gets its first value when that is a whole number (else 0).

    Raises:
        ValueError: the label is empty, not numeric, or a single whole number outside int32.
    """
    if isinstance(label, dict) and b"nd" in label:
        label = _msgpack_numpy(label)
    try:
        values = np.asarray(label)
    except (TypeError, ValueError):
        values = np.asarray(None)
    if values.dtype.kind not in "biuf":
        raise ValueError(f"label {short_repr(label)} is not numeric")
    values = values.astype(np.float64).ravel()
    if values.size == 0:
        raise ValueError("label is empty")
    first = whole_int32(values[0])
    if values.size == 1:
        if first is not None:
            return first, ()
        if float(values[0]).is_integer():
            raise ValueError(f"label {int(values[0])} does not fit Datum's int32")
    return first or 0, tuple(values.astype(np.float32).tolist())


def short_repr(obj: Any) -> str:
    """`repr(obj)`, cut to 60 characters, for messages."""
    try:
        text = repr(obj)
    except RecursionError:  # a pickle can nest lists 200,000 deep at a few bytes a level
        return f"<a {type(obj).__name__} nested too deeply to show>"
    return text if len(text) <= 60 else text[:57] + "..."
