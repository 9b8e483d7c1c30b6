"""Pickle/msgpack datapoints under numbered keys: tensorpack's `LMDBSerializer` and Efficient-PyTorch's `folder2lmdb`.

Both store Python objects, read here directly and without running code from the file: pickles
through the restricted unpickler (`safe_unpickle`; numpy arrays allowed, any other global refused
before it is touched), msgpack as plain data (`legacy_records.decode_value`, shared with `migrate`).

* tensorpack (`dataflow/serialize.py`, `LMDBSerializer.save`): keys `'{:08}'.format(i)` from 0, and
  `__keys__`, the serialized list of them. Each value is a serialized datapoint `[image, label]`:
  with pickle (the default of recent releases), with msgpack and msgpack-numpy (arrays as maps
  `{nd, type, kind, shape, data}`), or with `pyarrow.serialize` (older releases; gone, so
  refused with one line). The ImageNet recipes store the JPEG file's bytes as a 1-D uint8 array
  (given back as the bytes, unchanged) or an image decoded with `cv2.imread`: an H x W x 3 uint8
  array taken to be BGR, OpenCV's order, and given back reversed to RGB. Often a single-file
  LMDB (`train.lmdb` and `train.lmdb-lock`).
* folder2lmdb (Efficient-PyTorch and its forks): keys `str(i)`, unpadded, so LMDB order is
  0, 1, 10, 100, ...; samples are in numeric order. Meta keys `__keys__` (the key list) and/or
  `__len__` (the count: pickled, msgpack or ASCII). Values are `(image file bytes, label)` pairs
  (the bytes possibly in a one-element list, a DataLoader's collation) or `LMDB_Image` objects
  (H x W x C RGB pixels), as `migrate` reads them (`legacy_records.to_legacy_record`).

Counts and key lists stored in the LMDB are checked against its entries before anything is built
from them; without them the keys come from the cached key index (`Probe.all_keys`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .datum import DatumError
from .errors import LmdbFormatError
from .foreign_values import foreign_kind, is_new_pickle, is_old_pickle, unpack_msgpack
from .labels import label_fields, short_repr
from .layouts import Layout, Probe
from .legacy_records import UnreadableValueError, decode_value, describe_object, to_legacy_record

#: The meta keys both writers keep among the samples (`_` sorts after the digits: they come last).
META_KEYS = (b"__keys__", b"__len__")

_TENSORPACK_KEY = re.compile(rb"[0-9]{8,}")
_NUMBER_KEY = re.compile(rb"0|[1-9][0-9]*")

#: The most dimensions a msgpack-numpy image may declare (an image has 1 to 3).
_MAX_NDIM = 4


def msgpack_numpy_array(obj: dict) -> np.ndarray:
    """A numeric array as msgpack-numpy stores it (`{nd: True, type, kind, shape, data}`), checked before use.

    `kind == b'O'` means the data is a pickle of Python objects (msgpack-numpy's fallback); it is
    refused, never loaded. The declared shape times the item size must equal the data's length,
    so a hostile shape never allocates anything (the array is a view of the data).

    Raises:
        DatumError: an object array, a scalar, a non-numeric dtype or a shape the data does not hold.
    """
    kind = obj.get(b"kind", b"")
    if kind == b"O":
        raise DatumError("msgpack-numpy array of Python objects (kind 'O'): its data is a pickle, which is "
                         "never loaded")
    if obj.get(b"nd") is not True:
        raise DatumError(f"expected a msgpack-numpy array, got a msgpack-numpy scalar {short_repr(obj)}")
    type_name, shape, data = obj.get(b"type"), obj.get(b"shape"), obj.get(b"data")
    try:
        dtype = np.dtype(type_name.decode("ascii") if isinstance(type_name, bytes) else str(type_name))
    except (TypeError, ValueError, UnicodeDecodeError):
        raise DatumError(f"msgpack-numpy array of unknown dtype {short_repr(type_name)}") from None
    if dtype.hasobject or dtype.kind not in "biuf" or kind != b"":
        raise DatumError(f"msgpack-numpy array of dtype {dtype} (kind {kind!r}): only numeric arrays are read")
    if not isinstance(shape, list | tuple) or len(shape) > _MAX_NDIM or \
            not all(type(size) is int and size >= 0 for size in shape):
        raise DatumError(f"msgpack-numpy array shape {short_repr(shape)} is not a list of up to {_MAX_NDIM} sizes")
    if not isinstance(data, bytes):
        raise DatumError(f"msgpack-numpy array data is {describe_object(data)}, not bytes")
    needed = dtype.itemsize
    for size in shape:
        needed *= size
    if needed != len(data):
        raise DatumError(f"msgpack-numpy array declares shape {tuple(shape)} of {dtype} ({needed} bytes) "
                         f"but holds {len(data)} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def datapoint_image(image: Any) -> bytes | np.ndarray:
    """A tensorpack datapoint's image as `Layout.stored` gives it: file bytes, or RGB (or gray) pixels.

    A 1-D uint8 array (or bytes) is an image file's bytes, given back unchanged. An H x W x 3 (or 4)
    uint8 array is pixels decoded by OpenCV, as tensorpack's recipes decode: BGR(A), given back as
    RGB (alpha dropped). H x W (or H x W x 1) is gray.

    Raises:
        DatumError: anything else (the message says what it is).
    """
    if isinstance(image, dict) and b"nd" in image:
        image = msgpack_numpy_array(image)
    if isinstance(image, bytes | bytearray):
        image = np.frombuffer(image, dtype=np.uint8)
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise DatumError(f"expected an image as a uint8 array, got {describe_object(image)}")
    if image.ndim == 1:
        if not image.size:
            raise DatumError("image bytes are empty")
        return image.tobytes()
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return np.array(image.reshape(image.shape[:2]))
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return np.ascontiguousarray(image[:, :, 2::-1])  # OpenCV's BGR(A) -> RGB
    raise DatumError(f"expected image file bytes (1-D) or H x W x 3 pixels, got {describe_object(image)}")


def label_target(label: Any) -> Any:
    """A stored label as an item's target: an int for one whole number, else its values as float32.

    Raises:
        ValueError: the label is empty or not numeric.
    """
    first, values = label_fields(label)
    return first if not values else np.asarray(values, dtype=np.float32)


class TensorpackLayout(Layout):
    """tensorpack's `LMDBSerializer`: `[image, label]` datapoints under `%08d` keys; the target is the label."""

    name = "tensorpack"

    def __init__(self, serializer: str) -> None:
        self.serializer = serializer
        self.keys = np.empty(0, dtype="S8")

    @classmethod
    def detect(cls, probe: Probe) -> TensorpackLayout | None:
        serializer = _first_sample_serializer(probe, _TENSORPACK_KEY, _datapoint,
                                              "a tensorpack [image, label] datapoint")
        return None if serializer is None else cls(serializer)

    def open(self, probe: Probe) -> None:
        value = probe.value(b"__keys__")
        if value is None:
            self.keys = _scanned_keys(probe)
        else:
            self.keys = _listed_keys(probe, value, probe.entries - 1, exact=True)
        bad = _not_matching(self.keys, padded=True)
        if bad is not None:
            raise LmdbFormatError(f"{probe.path}: key {bad!r} is not a tensorpack key ('{{:08}}'.format(i))")

    def __len__(self) -> int:
        return len(self.keys)

    def sample_keys(self, index: int) -> Sequence[bytes]:
        return (self.keys[index],)

    def stored(self, values: Sequence[Any]) -> tuple[tuple[bytes | np.ndarray, ...], Any]:
        return _datapoint(decode_value(values[0])[1])

    def describe(self) -> str:
        return f"tensorpack (LMDBSerializer [image, label] datapoints, {self.serializer}; target: the label)"


class Folder2LmdbLayout(Layout):
    """Efficient-PyTorch's `folder2lmdb`: `(image, label)` records under `str(i)` keys; the target is the label."""

    name = "folder2lmdb"

    def __init__(self, serializer: str) -> None:
        self.serializer = serializer
        self.count = 0
        #: The sample keys in order, or None when they are `str(i)` for i < count (`__len__` alone).
        self.keys: np.ndarray | None = None

    @classmethod
    def detect(cls, probe: Probe) -> Folder2LmdbLayout | None:
        serializer = _first_sample_serializer(probe, _NUMBER_KEY, _record, "a folder2lmdb (image, label) record")
        return None if serializer is None else cls(serializer)

    def open(self, probe: Probe) -> None:
        listed, counted = probe.value(b"__keys__"), probe.value(b"__len__")
        samples = probe.entries - (listed is not None) - (counted is not None)
        count = None if counted is None else _stored_count(probe, counted, samples, self.serializer)
        if listed is not None:
            self.keys = _listed_keys(probe, listed, samples, exact=False)
        elif count is not None:
            self.keys, self.count = None, count
            return
        else:
            keys = _scanned_keys(probe)
            bad = _not_matching(keys, padded=False)
            if bad is not None:
                raise LmdbFormatError(f"{probe.path}: key {bad!r} is not a folder2lmdb key (str(i))")
            self.keys = keys[np.argsort(keys.astype(np.int64), kind="stable")] if len(keys) else keys
        self.count = len(self.keys)

    def __len__(self) -> int:
        return self.count

    def sample_keys(self, index: int) -> Sequence[bytes]:
        return (b"%d" % index if self.keys is None else self.keys[index],)

    def stored(self, values: Sequence[Any]) -> tuple[tuple[bytes | np.ndarray, ...], Any]:
        return _record(decode_value(values[0])[1])

    def describe(self) -> str:
        return f"folder2lmdb ((image, label) records, {self.serializer}; target: the label)"


def _datapoint(obj: Any) -> tuple[tuple[bytes | np.ndarray], Any]:
    if not isinstance(obj, list | tuple) or len(obj) != 2:
        raise DatumError(f"expected a datapoint [image, label], got {describe_object(obj)}")
    return (datapoint_image(obj[0]),), label_target(obj[1])


def _record(obj: Any) -> tuple[tuple[bytes | np.ndarray], Any]:
    record = to_legacy_record(obj)
    if record.pixels is None:
        return (record.file_bytes,), label_target(record.label)
    pixels = record.pixels  # LMDB_Image: RGB(A) or gray
    return (pixels[:, :, 0] if pixels.shape[2] == 1 else pixels[:, :, :3],), label_target(record.label)


def _first_sample_serializer(probe: Probe, scheme: re.Pattern[bytes], parse: Callable[[Any], Any],
                             what: str) -> str | None:
    """The serializer of the first sample, when the first keys follow `scheme` and its value is `what` (`parse`).

    None when the keys do not follow it, or the value is not a pickle, msgpack or pyarrow value (a
    Datum under numbered keys, as Caffe's MNIST example writes). A value that is foreign but cannot
    be read (a refused global, pyarrow) or that `parse` refuses is an error here, naming the key,
    rather than "unknown layout".
    """
    samples = [key for key in probe.first_keys if key not in META_KEYS]
    if not samples or not all(scheme.fullmatch(key) for key in samples):
        return None
    key = samples[0]
    value = probe.value(key)
    if value is None or foreign_kind(value) is None:
        return None
    try:
        serializer, obj = decode_value(value)
    except UnreadableValueError as exc:
        raise LmdbFormatError(f"{probe.path}: key {key!r}: {exc}") from None
    try:
        parse(obj)
    except ValueError as exc:
        raise LmdbFormatError(f"{probe.path}: key {key!r}: not {what}: {exc}") from None
    return serializer


def _listed_keys(probe: Probe, value: Any, samples: int, *, exact: bool) -> np.ndarray:
    """The `__keys__` list, its length checked against the LMDB's other entries before the array is built."""
    where = f"{probe.path}: key b'__keys__'"
    try:
        _, listed = decode_value(value)
    except UnreadableValueError as exc:
        raise LmdbFormatError(f"{where}: {exc}") from None
    if not isinstance(listed, list | tuple):
        raise LmdbFormatError(f"{where}: expected a list of keys, got {describe_object(listed)}")
    if len(listed) > samples or (exact and len(listed) != samples):
        raise LmdbFormatError(f"{where}: lists {len(listed)} keys but the LMDB has {samples} entries besides "
                              "its meta keys")
    kinds = set(map(type, listed))  # C speed: a million keys in milliseconds
    if not kinds <= {bytes, str}:
        odd = next(key for key in listed if type(key) not in (bytes, str))
        raise LmdbFormatError(f"{where}: lists {describe_object(odd)}, not a key")
    if str in kinds:
        listed = [key.encode("utf-8") if isinstance(key, str) else key for key in listed]
    return np.array(listed, dtype=bytes) if listed else np.empty(0, dtype="S1")


def _stored_count(probe: Probe, value: Any, samples: int, serializer: str) -> int:
    """`__len__` (pickled, msgpack or ASCII), checked against the LMDB's other entries before it is used."""
    where = f"{probe.path}: key b'__len__'"
    raw = bytes(value)
    count: Any = None
    if is_new_pickle(raw) or is_old_pickle(raw):
        try:
            count = decode_value(raw)[1]
        except UnreadableValueError as exc:
            raise LmdbFormatError(f"{where}: {exc}") from None
    else:
        if serializer == "msgpack":
            try:
                count = unpack_msgpack(raw)
            except Exception:  # not msgpack: read as ASCII below
                count = None
        if count is None and raw.strip().isdigit() and len(raw) <= 20:
            count = int(raw.decode("ascii"))
    if isinstance(count, np.integer):
        count = int(count)
    if type(count) is not int:
        what = short_repr(raw[:40]) if count is None else describe_object(count)
        raise LmdbFormatError(f"{where}: expected a sample count, got {what}")
    if not 0 <= count <= samples:
        raise LmdbFormatError(f"{where}: claims {count} samples but the LMDB has only {samples} entries besides "
                              "its meta keys")
    return count


def _scanned_keys(probe: Probe) -> np.ndarray:
    """Every key but the meta keys, in LMDB order, from the cached key index."""
    keys = probe.all_keys()
    return keys[~np.isin(keys, META_KEYS)] if len(keys) else keys


def _not_matching(keys: np.ndarray, *, padded: bool) -> bytes | None:
    """A key that is not decimal (`padded`: at least 8 digits; else unpadded, at most 18), or None (vectorised)."""
    if not len(keys):
        return None
    lengths = np.char.str_len(keys)
    bad = ~np.char.isdigit(keys)
    if padded:
        bad |= lengths < 8
    else:
        bad |= (lengths > 18) | (np.char.startswith(keys, b"0") & (lengths > 1))
    where = np.flatnonzero(bad)
    return bytes(keys[where[0]]) if len(where) else None
