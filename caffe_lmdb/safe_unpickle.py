"""The restricted unpickler: pickles from LMDB files read without ever running code named in them.

The PyTorch recipes (Efficient-PyTorch `folder2lmdb`, the `LMDB_Image` recipe, tensorpack's
`LMDBSerializer`) store pickled Python objects, and `pickle.loads` on them runs whatever the
writer of the file put in (`os.system`, `exec`, ...). `safe_unpickle` admits only an explicit list
of globals (builtin containers and scalars, what numpy needs to rebuild arrays and scalars, and
any module's `LMDB_Image`, which becomes an inert `LmdbImageRecord`), so anything else is refused
before it can be called; the opcodes are screened first for what would crash the interpreter.
Read side and write side (`migrate`) share it; it imports nothing of the package.
"""

from __future__ import annotations

import builtins
import io
import pickle
import pickletools
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside the allow-list; raised before anything is called."""

    def __init__(self, global_name: str) -> None:
        super().__init__(f"refused to unpickle global {global_name}")
        self.global_name = global_name



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

#: SHORT_BINBYTES, SHORT_BINUNICODE: a one-byte length, then that many bytes (walked first: a list
#: of 1.28 million keys is screened in a fraction of a second).
_SHORT_COUNTED = frozenset(b"C\x8c")

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
        if code == 0x94:  # MEMOIZE, after each object at protocols 4-5: a key list is mostly these
            pos += 1
            continue
        if code in _SHORT_COUNTED and pos + 1 < end and pos + 2 + data[pos + 1] <= end:  # a key (bytes or text)
            pos += 2 + data[pos + 1]
            continue
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

