"""Bringing pickle/msgpack LMDBs over to Caffe Datums, without ever running code from the file.

The PyTorch recipes this toolkit replaces store Python objects in their LMDBs, and reading those
with `pickle.loads` runs whatever the writer of the file put in it (`os.system`, `exec`, ...).
This module reads them with a restricted unpickler instead: `find_class` admits only an explicit
list of globals (builtin containers and scalars, what numpy needs to rebuild arrays and scalars,
and any module's `LMDB_Image`, which becomes an inert record of ours), so anything else is refused
before it can be called. msgpack values cannot name code at all and are read with `msgpack`.

Formats read (as the recipes write them):

1. Efficient-PyTorch `folder2lmdb` (pickle): `pickle.dumps((image, label))`, `image` the image
   file's bytes or a one-element list/tuple of them (DataLoader collation), `label` an int or a
   numpy array (often shape `(1,)`); meta keys `__keys__` (pickled key list) and `__len__`.
2. Its older msgpack variant: `[{b"data": file_bytes}, label]`, `__keys__` msgpack-encoded.
3. The `LMDB_Image` recipe: pickled `LMDB_Image` objects with `channels`, `size` (H, W), `image`
   (H x W x C uint8 bytes, RGB) and `label` (int or numpy array); meta keys as in 1.
4. pyarrow-serialized values (`pyarrow.serialize`, which no longer exists) are recognised and
   refused with a message saying so.

`foreign_values.foreign_value_hint` recognises these formats from a value's bytes
alone (nothing is unpickled), for readers that meet such an LMDB and should point to `migrate`.
"""

from __future__ import annotations

import builtins
import io
import logging
import pickle
import pickletools
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .atomic_lmdb import AtomicLmdb
from .datum import (
    DatumError,
    check_datum,
    encoded_to_datum,
    image_to_datum_bytes,
    parse_datum_view,
    serialize_datum,
)
from .encode import ConvertOptions, encoded_payload
from .errors import CaffeLmdbError, InputError, InputNotFoundError, MigrationError
from .files import default_keys_path
from .foreign_values import (
    MSGPACK_CONTAINERS,
    OLD_PICKLE_FIRST,
    PYARROW_GONE,
    foreign_kind,
    is_new_pickle,
    is_old_pickle,
    is_pyarrow_serialized,
    unpack_msgpack,
)
from .formats import sniff_image_format
from .keys import make_key
from .labels import label_fields, short_repr
from .layout_migration import LayoutMigrateResult, layout_reader, migrate_layout
from .layouts import Layout
from .progress import progress_bar
from .safe_lmdb import begin_read, checked_items, get_value, open_readonly

log = logging.getLogger(__name__)

#: Meta records the recipes keep among the data records; they are dropped (keys go to the .npy file).
META_KEYS = (b"__keys__", b"__len__")

#: The formats `migrate` reads, by the name results and `--dry-run` report.
FORMATS = {
    "folder2lmdb-pickle": "pickled (image file bytes, label) tuples (Efficient-PyTorch folder2lmdb)",
    "folder2lmdb-msgpack": "msgpack [{data: image file bytes}, label] records (Efficient-PyTorch folder2lmdb, "
                           "msgpack version)",
    "lmdb-image": "pickled LMDB_Image objects (H x W x C RGB pixels and a label)",
}

class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside the allow-list; raised before anything is called."""

    def __init__(self, global_name: str) -> None:
        super().__init__(f"refused to unpickle global {global_name}")
        self.global_name = global_name


def _is_datum(data: bytes) -> bool:
    try:
        check_datum(parse_datum_view(data))
    except DatumError:
        return False
    return True


# --------------------------------------------------------------------------- the restricted unpickler

class LmdbImageRecord:
    """What a pickled `LMDB_Image` becomes: its attributes as plain data, and no methods of its own.

    The recipe's class lives in the user's script (`__main__.LMDB_Image`), so it could not be
    imported anyway; and importing it would run that script. Attribute names are in `fields`.
    """

    __slots__ = ("fields",)

    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        fields: dict[str, Any] = {}
        for part in (state, slots):
            if part is None:
                continue
            if not isinstance(part, dict):
                raise pickle.UnpicklingError(f"LMDB_Image state must be a dict, got {type(part).__name__}")
            for name, item in part.items():
                fields[name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)] = item
        self.fields = fields

    def __repr__(self) -> str:
        return f"LMDB_Image({', '.join(sorted(self.fields))})"


_NDARRAY = object()  # numpy.ndarray as unpickled: only a marker for `_reconstruct`, never callable
_NUMPY_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy(._core).multiarray._reconstruct, by a public route
_NUMPY_SCALAR = np.float64(0).__reduce__()[0]  # numpy(._core).multiarray.scalar


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's `_reconstruct(ndarray, (0,), b'b')`: an empty array that BUILD then fills from the state."""
    if subtype is not _NDARRAY or not isinstance(shape, tuple) or 0 not in shape:
        raise pickle.UnpicklingError("numpy _reconstruct called with arguments numpy never pickles")
    return _NUMPY_RECONSTRUCT(np.ndarray, shape, dtype)


def _frombuffer(buffer: Any, dtype: np.dtype, shape: Any, order: str) -> np.ndarray:
    """numpy's protocol-5 array rebuild, restated: the pickled buffer viewed with dtype and shape."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("numpy _frombuffer with an object dtype")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


def _scalar(dtype: np.dtype, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError("numpy scalar without a dtype")
    if dtype.hasobject:
        if dtype != np.dtype(object):
            raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype} holds objects")
        return data
    return _NUMPY_SCALAR(dtype, data)


def _latin1(text: Any, encoding: str = "latin1") -> bytes:
    """`_codecs.encode(text, "latin1")`: how protocols 0-2 store bytes. No other codec is run."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is not allowed")
    return text.encode("latin-1")


def _no_sized_alloc(kind: type) -> Callable[..., Any]:
    """`bytes`/`bytearray` as protocols 0-2 call them, minus `bytes(10**12)`-style allocations."""

    def build(*args: Any) -> Any:
        if args and isinstance(args[0], int):
            raise pickle.UnpicklingError(f"{kind.__name__}(<int>) is not allowed")
        if len(args) == 2:
            return kind(_latin1(*args))
        return kind(*args)

    return build


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor, as protocols 0/1 rebuild plain objects: only for LMDB_Image records."""
    if cls is not LmdbImageRecord or base is not object or state is not None:
        raise pickle.UnpicklingError("copyreg._reconstructor is allowed only for LMDB_Image records")
    return LmdbImageRecord()


_BUILTINS = {
    name: getattr(builtins, name)
    for name in ("list", "dict", "tuple", "set", "frozenset", "str", "int", "float", "complex", "bool", "object")
}
_BUILTINS.update(bytes=_no_sized_alloc(bytes), bytearray=_no_sized_alloc(bytearray))

#: Everything a pickle may name. Python 2 spellings (`__builtin__`, `copy_reg`) appear in
#: protocol 0-2 pickles; numpy < 2 pickles name `numpy.core`, numpy >= 2 `numpy._core`.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **{(module, name): target for module in ("builtins", "__builtin__") for name, target in _BUILTINS.items()},
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _latin1,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _frombuffer for core in ("core", "_core")},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose `find_class` is an allow-list: a pickle can call nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        target = ALLOWED_GLOBALS.get((module, name))
        if target is not None:
            return target
        if name.rpartition(".")[2] == "LMDB_Image":  # any module's: usually __main__, the user's script
            return LmdbImageRecord
        raise UnsafePickleError(f"{module}.{name}")


def safe_unpickle(data: bytes) -> Any:
    """Unpickle `data` allowing only `ALLOWED_GLOBALS` and `LMDB_Image`; never `pickle.loads`.

    Python 2 `str` values come back as bytes (image bytes written by Python 2 stay bytes). The
    opcodes are walked first (parsed, never run, `_screen_pickle`) to refuse what would crash or
    exhaust the interpreter before any object is built.

    Raises:
        UnsafePickleError: the pickle names any other global (nothing of it has been called).
        PickleTooComplexError: the pickle builds more tuples or objects than `MAX_PICKLE_TUPLES`.
        MemoryError: the pickle claims an object too large to build.
        pickle.UnpicklingError, ValueError, TypeError, ...: the data is not a valid pickle (e.g. a
            length that runs past its end).
    """
    _screen_pickle(data)
    return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


#: Most tuples (and objects made by calls) a pickle may build; no recipe's record comes near it.
#: Hashing a tuple recurses in C once per level of nesting, with no recursion check, so a tuple
#: nested ~150,000 deep (two bytes a level in a pickle) used as a dict key or set member kills
#: the interpreter with a segmentation fault. A pickle cannot nest tuples deeper than it builds them.
MAX_PICKLE_TUPLES = 10_000

#: Opcodes that build a tuple, or an object by a call (which may return a tuple, `tuple(x)`).
_TUPLE_OR_CALL = frozenset(b"t\x85\x86\x87)R\x81\x92io")

_LENGTH_PREFIX = {pickletools.TAKEN_FROM_ARGUMENT1: "<B", pickletools.TAKEN_FROM_ARGUMENT4: "<i",
                  pickletools.TAKEN_FROM_ARGUMENT4U: "<I", pickletools.TAKEN_FROM_ARGUMENT8U: "<Q"}

#: Every binary opcode, from pickletools' own table: byte -> (size of its argument, or of the length
#: prefix its argument follows; that prefix's struct format, or None). Text opcodes (protocol 0/1,
#: ended by a newline) are left out: pickles using them are walked by `pickletools.genops`.
_BINARY_OPCODES = {
    ord(op.code): (0, None) if op.arg is None else (op.arg.n, None) if op.arg.n >= 0
    else (struct.calcsize(_LENGTH_PREFIX[op.arg.n]), _LENGTH_PREFIX[op.arg.n])
    for op in pickletools.opcodes if op.arg is None or op.arg.n != pickletools.UP_TO_NEWLINE
}


class PickleTooComplexError(pickle.UnpicklingError):
    """A pickle builds more tuples than `MAX_PICKLE_TUPLES`: refused unread, as they could nest too deeply."""

    def __init__(self) -> None:
        super().__init__(f"the pickle builds more than {MAX_PICKLE_TUPLES} tuples or objects (no recipe's record "
                         "holds that many), which could nest deeper than Python survives unpickling")


def _screen_pickle(data: bytes) -> None:
    """Walk the opcodes (parsed, never run) and refuse what CPython's unpickler would not survive.

    Tuples that could nest deep enough to crash hashing (`MAX_PICKLE_TUPLES`), and lengths that
    claim more bytes than the pickle holds: for BYTEARRAY8 CPython allocates the claim first and,
    when that fails, prints a stray "SystemError: deallocated bytearray object has exported
    buffers" to stderr besides raising MemoryError. Binary pickles (the recipes' protocols 2-5)
    are walked by their opcodes' argument lengths alone, at a few times the speed of
    `pickletools.genops`, which walks the rest.

    Raises:
        PickleTooComplexError, pickle.UnpicklingError: as above, or a malformed opcode.
    """
    if _binary_walk(data):
        return
    built = 0
    try:
        for opcode, _arg, _pos in pickletools.genops(data):
            code = ord(opcode.code)
            if code in _TUPLE_OR_CALL:
                built += 1
                if built > MAX_PICKLE_TUPLES:
                    raise PickleTooComplexError()
            elif code == 0x2E:  # STOP
                return
    except ValueError as exc:  # pickletools' word for a length past the end, or any malformed opcode
        raise pickle.UnpicklingError(str(exc)) from None


def _binary_walk(data: bytes) -> bool:
    """`_screen_pickle` for binary opcodes: True if the pickle reached STOP, False at a text opcode."""
    pos, end, built = 0, len(data), 0
    layout, unpack = _BINARY_OPCODES, struct.unpack_from
    while pos < end:
        start, code = pos, data[pos]
        pos += 1
        if code in _TUPLE_OR_CALL:
            built += 1
            if built > MAX_PICKLE_TUPLES:
                raise PickleTooComplexError()
        elif code == 0x2E:  # STOP
            return True
        entry = layout.get(code)
        if entry is None:
            return False
        size, prefix = entry
        if prefix is not None:
            if pos + size > end:
                break
            (length,) = unpack(prefix, data, pos)
            if length < 0:
                raise pickle.UnpicklingError(f"negative length {length} at byte {start}")
            size += length
        pos += size
        if pos > end:
            raise pickle.UnpicklingError(f"opcode at byte {start} claims {pos - end} bytes more than the pickle holds")
    raise pickle.UnpicklingError("pickle data was truncated (no STOP)")


# --------------------------------------------------------------------------- old records -> Datums

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
    raise ValueError(f"expected image file bytes, got {_describe_object(part)}")


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
        raise ValueError(f"LMDB_Image image is {_describe_object(image)}, expected pixel bytes")
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
    raise ValueError(f"expected an (image, label) pair or an LMDB_Image, got {_describe_object(obj)}")


def record_to_datum(record: LegacyRecord) -> tuple[bytes | bytearray, bool]:
    """The serialized Datum for an old record, and whether its image had to be re-encoded.

    File bytes go through `caffe-lmdb convert --encoded`'s own rule (`encode.encoded_payload`):
    bytes Caffe can decode that pass its integrity check are stored unchanged (the migration runs
    at copy speed); GIFs, which OpenCV and DALI cannot decode, and other formats are decoded and
    re-encoded; bytes that do not decode (a truncated JPEG) are an error naming the key.
    LMDB_Image pixels (RGB) become raw planar BGR Datums through the codec (one-channel images a
    gray plane; RGBA images lose alpha, as `convert` drops it).

    Raises:
        ValueError: a bad label. DatumError: the bytes are not an image Pillow can read.
    """
    label, targets = label_fields(record.label)
    if record.pixels is not None:
        pixels = record.pixels
        image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)  # L, RGB or RGBA
        return image_to_datum_bytes(image, label, gray=pixels.shape[2] == 1, float_data=targets), False
    payload, _, kept = encoded_payload(record.file_bytes, ConvertOptions(encoded=True))  # convert's own rule
    datum = encoded_to_datum(payload, label)
    datum.float_data.extend(targets)
    return serialize_datum(datum), not kept


def _describe_object(obj: Any) -> str:
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


# --------------------------------------------------------------------------- reading values

def _decode(value: bytes, where: str) -> tuple[str, Any]:
    """("pickle" | "msgpack", the decoded object) for one old value; `where` prefixes errors."""
    if is_new_pickle(value) or (value[:1] and value[0] in OLD_PICKLE_FIRST and is_old_pickle(value)):
        try:
            return "pickle", safe_unpickle(value)
        except UnsafePickleError as exc:
            raise MigrationError(
                f"{where}: refused to unpickle global {exc.global_name} (only builtin containers and scalars, "
                "numpy arrays and LMDB_Image records are allowed); nothing was written"
            ) from None
        except MemoryError:
            raise MigrationError(f"{where}: the pickle claims an object too large to build (MemoryError); "
                                 "nothing was written") from None
        except PickleTooComplexError as exc:
            raise MigrationError(f"{where}: {exc}; nothing was written") from None
        except RecursionError:
            raise MigrationError(f"{where}: {_TOO_DEEP}") from None
        except Exception as exc:  # a corrupt pickle raises many kinds; none of them ran code
            raise MigrationError(f"{where}: cannot unpickle the value safely ({type(exc).__name__}: {exc})") from None
    if value[:1] and value[0] in MSGPACK_CONTAINERS:
        try:
            return "msgpack", unpack_msgpack(value)
        except Exception as exc:
            raise MigrationError(f"{where}: not a valid msgpack value ({type(exc).__name__}: {exc})") from None
    if is_pyarrow_serialized(value):
        raise MigrationError(f"{where}: holds pyarrow-serialized data (pyarrow.serialize); {PYARROW_GONE}")
    if _is_datum(value):
        raise InputError(f"{where}: already holds a Caffe Datum; nothing to migrate")
    raise MigrationError(
        f"{where}: {len(value)} bytes that are neither a pickle, msgpack nor a Caffe Datum "
        f"(starting {value[:8]!r})"
    )


#: Why a value whose objects nest too deeply for Python to walk (`RecursionError`) is refused.
_TOO_DEEP = ("the value nests objects too deeply to read (RecursionError; no recipe stores more than a few levels); "
             "nothing was written")


def _decode_keys(value: bytes, where: str) -> list[bytes]:
    _, keys = _decode(value, where)
    if not isinstance(keys, list | tuple) or not all(isinstance(k, bytes | str) for k in keys):
        raise MigrationError(f"{where}: expected a list of keys, got {_describe_object(keys)}")
    return [k.encode("utf-8") if isinstance(k, str) else bytes(k) for k in keys]


def _format_name(serializer: str, record: LegacyRecord) -> str:
    if record.pixels is not None:
        return "lmdb-image"
    return "folder2lmdb-msgpack" if serializer == "msgpack" else "folder2lmdb-pickle"


def _sample_lines(record: LegacyRecord, value: bytes | bytearray, reencoded: bool) -> list[str]:
    if record.pixels is not None:
        height, width, channels = record.pixels.shape
        image = f"{height} x {width} x {channels} uint8 pixels ({'RGB' if channels >= 3 else 'gray'}, LMDB_Image)"
        stored = f"raw {1 if channels == 1 else 3} x {height} x {width} planar {'BGR' if channels >= 3 else 'gray'}"
    else:
        image = _describe_object(record.file_bytes) + (", in a one-element list" if record.wrapped else "")
        fmt = sniff_image_format(record.file_bytes[:16]) or "image"
        stored = "encoded PNG (re-encoded)" if reencoded else f"encoded {fmt}, bytes unchanged"
    label, targets = label_fields(record.label)
    mapped = f"label {label}" + (f", float_data of {len(targets)} values" if targets else "")
    return [
        f"image: {image}",
        f"label: {_describe_object(record.label)} -> {mapped}",
        f"datum: {stored}, {len(value)} bytes",
    ]


# --------------------------------------------------------------------------- migrate

@dataclass
class MigrateResult:
    """What `migrate` found and wrote; `str()` is the summary the CLI prints.

    Attributes:
        source, output, keys_path: the old LMDB, the new one and its keys file.
        format: a key of `FORMATS`.
        records: records to migrate (the old `__keys__`, or every non-meta key).
        keys_origin: "__keys__" or "cursor order".
        meta_keys: the meta records found and dropped.
        unlisted: records in the LMDB that `__keys__` does not list (left out, as the old reader did).
        sample_key, sample: the first record's key and a line per field (what `--dry-run` shows).
        dry_run: nothing was written.
        written, reencoded, bytes_written, seconds: what the migration wrote.
    """

    source: Path
    output: Path
    keys_path: Path
    format: str
    records: int
    keys_origin: str
    meta_keys: list[bytes] = field(default_factory=list)
    unlisted: int = 0
    sample_key: bytes = b""
    sample: list[str] = field(default_factory=list)
    dry_run: bool = False
    written: int = 0
    reencoded: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    @property
    def records_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        if self.dry_run:
            meta = ", ".join(k.decode("ascii", "replace") for k in self.meta_keys) or "none"
            lines = [
                f"{self.source}: {FORMATS[self.format]} [{self.format}]",
                f"  records: {self.records} (order: {self.keys_origin}; meta records dropped: {meta})",
                f"  sample {self.sample_key!r} -> {make_key(0, '') + self.sample_key!r}:",
                *[f"    {line}" for line in self.sample],
                f"  would write {self.output} and {self.keys_path} (dry run: nothing written)",
            ]
            if self.unlisted:
                lines.insert(2, f"  {self.unlisted} records not listed in __keys__ would be left out")
            return "\n".join(lines)
        text = (
            f"{self.output}: {self.written} records migrated from {self.source} ({self.format}), "
            f"{self.reencoded} re-encoded, {self.bytes_written / 2**20:.1f} MiB, {self.seconds:.2f} s, "
            f"{self.records_per_second:.0f} records/s"
        )
        if self.unlisted:
            text += f"; {self.unlisted} records not listed in __keys__ left out"
        return text


def migrate(
    old: str | Path,
    new: str | Path,
    keys_path: str | Path | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool | None = None,
    *,
    layout: str | Layout | None = None,
    targets: str = "auto",
    image: int | None = None,
    workers: int | None = None,
) -> MigrateResult | LayoutMigrateResult:
    """Rewrite a pickle/msgpack LMDB (Efficient-PyTorch `folder2lmdb`, `LMDB_Image`), or any layout, as Datums.

    An LMDB of pickle/msgpack records takes the path described here. Any other LMDB a read
    layout recognises (LSUN, ...: `reader.LAYOUTS`, Caffe's own excepted), or any LMDB given
    `layout`, goes to `layout_migration.migrate_layout`, whose rules say how each image and
    target is kept (`targets`, `image`, `workers` apply there only).

    Record i of the old order (its `__keys__`, or cursor order without one) gets the key
    `"%08d_%s" % (i, old_key)`; meta records are dropped and the keys go to the `.npy` keys file.
    Stored file bytes become encoded Datums with the bytes unchanged (GIF re-encoded as PNG, as
    `convert` does); LMDB_Image pixels become raw planar BGR Datums. See `label_fields` for labels.
    The output is built under a temporary name and appears only when complete (`atomic_lmdb.AtomicLmdb`).

    Nothing from the old LMDB is ever executed: pickles go through a restricted unpickler, and a
    record naming any other global stops the migration before that global is touched, with no
    output left behind.

    Args:
        old: the LMDB to read (never modified).
        new: the Datum LMDB to create.
        keys_path: where to save the keys; default `<new stem>_keys.npy` beside it.
        overwrite: replace an existing output instead of refusing.
        dry_run: only detect the format, count the records and decode a sample; write nothing.
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        What was found (and written).

    Raises:
        InputError: OLD missing, empty, the same as NEW, already Datums, or NEW exists without `overwrite`.
        MigrationError: an unsafe pickle, a pyarrow-serialized or unreadable record, a bad label
            (the message names the key).
    """
    old, new = Path(old), Path(new)
    if not old.exists():
        raise InputNotFoundError(f"{old}: LMDB not found")
    if layout is not None or not _holds_legacy_records(old):
        reader = layout_reader(old, layout)
        if reader is not None:
            return migrate_layout(reader, new, keys_path=keys_path, overwrite=overwrite, dry_run=dry_run,
                                  progress=progress, targets=targets, image=image, workers=workers)
    return _migrate_records(old, new, keys_path, overwrite=overwrite, dry_run=dry_run, progress=progress)


def _migrate_records(old: Path, new: Path, keys_path: str | Path | None, *, overwrite: bool, dry_run: bool,
                     progress: bool | None) -> MigrateResult:
    """`migrate` of pickle/msgpack records (this module's path)."""
    if new.exists() and new.resolve() == old.resolve():
        raise InputError(f"{new}: the output must not be the LMDB being migrated")
    keys_path = Path(keys_path) if keys_path is not None else default_keys_path(new)
    with open_readonly(old) as env, begin_read(env) as txn:
        present: list[bytes] = []
        meta: list[bytes] = []
        for key in checked_items(txn, values=False):
            (meta if key in META_KEYS else present).append(key)
        order, origin = present, "cursor order"
        if b"__keys__" in meta:
            order, origin = _decode_keys(get_value(txn, b"__keys__", old), f"{old}: key b'__keys__'"), "__keys__"
            in_lmdb = set(present)
            missing = next((k for k in order if k not in in_lmdb), None)
            if missing is not None:
                raise MigrationError(f"{old}: key {missing!r} is listed in __keys__ but not in the LMDB")
        if not order:
            raise InputError(f"{old}: no records to migrate")
        unlisted = len(set(present) - set(order))
        if unlisted:
            log.warning("%s: %d records are not listed in __keys__ and are left out, as the old reader did",
                        old, unlisted)
        if b"__len__" in meta:
            _check_len(get_value(txn, b"__len__", old), len(order), old)

        first = order[0]
        where = f"{old}: key {first!r}"
        serializer, obj = _decode(get_value(txn, first, old), where)
        record = _legacy(obj, where)
        value, reencoded = _datum(record, where)
        result = MigrateResult(
            source=old, output=new, keys_path=keys_path, format=_format_name(serializer, record),
            records=len(order), keys_origin=origin, meta_keys=meta, unlisted=unlisted, sample_key=first,
            sample=_sample_lines(record, value, reencoded), dry_run=dry_run,
        )
        if dry_run:
            return result

        start = time.perf_counter()
        created = _missing_parents(new)
        try:
            with AtomicLmdb(new, keys_path, overwrite=overwrite, inputs=[old]) as out, \
                    progress_bar(len(order), new.name, progress) as bar:
                for line_id, old_key in enumerate(order):
                    where = f"{old}: key {old_key!r}"
                    if line_id:  # the first record was converted above
                        _, obj = _decode(get_value(txn, old_key, old), where)
                        value, reencoded = _datum(_legacy(obj, where), where)
                    out.put(make_key(line_id, "") + old_key, value)
                    result.reencoded += reencoded
                    bar.update()
                out.finish()
        except BaseException:
            _remove_empty(created)
            raise
        result.written, result.bytes_written = len(out.keys), out.bytes_written
        result.seconds = time.perf_counter() - start
    return result


def _holds_legacy_records(old: Path) -> bool:
    """Whether `old` has the recipes' meta keys or a pickle/msgpack/pyarrow first value (this module's path)."""
    try:
        with open_readonly(old) as env, begin_read(env, buffers=True) as txn:
            if any(get_value(txn, key, old) is not None for key in META_KEYS):
                return True
            cursor = txn.cursor()
            return bool(cursor.first()) and foreign_kind(cursor.value()) is not None
    except CaffeLmdbError:
        return True  # this module's path says what is wrong with it


def _legacy(obj: Any, where: str) -> LegacyRecord:
    try:
        return to_legacy_record(obj)
    except ValueError as exc:
        raise MigrationError(f"{where}: {exc}") from None
    except RecursionError:  # walking a hostile object (numpy, str(), repr()) deeper than Python can
        raise MigrationError(f"{where}: {_TOO_DEEP}") from None


def _datum(record: LegacyRecord, where: str) -> tuple[bytes | bytearray, bool]:
    try:
        return record_to_datum(record)
    except (ValueError, DatumError) as exc:  # DatumError is a ValueError too; both say what is wrong
        raise MigrationError(f"{where}: {exc}") from None
    except RecursionError:
        raise MigrationError(f"{where}: {_TOO_DEEP}") from None
    except MemoryError:
        raise MigrationError(f"{where}: the record's label or image is too large to convert (MemoryError); "
                             "nothing was written") from None


def _check_len(value: bytes, count: int, old: Path) -> None:
    _, length = _decode(value, f"{old}: key b'__len__'")
    if not isinstance(length, int) or length != count:
        log.warning("%s: __len__ says %s but __keys__ lists %d records; migrating the %d listed",
                    old, short_repr(length), count, count)


def _missing_parents(path: Path) -> list[Path]:
    """The folders above `path` that do not exist yet, deepest first (removed again on failure)."""
    missing = []
    parent = path.absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
