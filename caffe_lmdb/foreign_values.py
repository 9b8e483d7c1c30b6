"""Recognising values that are not Datums: pickles, msgpack and pyarrow buffers, from their bytes alone.

LMDBs from the popular PyTorch recipes hold pickled or msgpack records. Every reader (the codec's
errors, the tools, the dataset) says up front what such an LMDB holds and to run `caffe-lmdb
migrate`, instead of failing once per record. Nothing here unpickles or imports anything of the
package: a value is recognised by its header, or by walking its pickle opcodes (parsed, never run).
"""

from __future__ import annotations

import pickletools
import struct
from pathlib import Path
from typing import Any

PYARROW_GONE = (
    "pyarrow.serialize no longer exists (deprecated in pyarrow 2.0, since removed), so neither pyarrow nor "
    "caffe-lmdb can read it: rebuild the LMDB from the source images with `caffe-lmdb convert`"
)


def is_new_pickle(data: bytes | memoryview) -> bool:
    """Protocol 2-5 pickles open with PROTO (0x80, version) and end with STOP."""
    return len(data) >= 3 and data[0] == 0x80 and 2 <= data[1] <= 5 and data[-1] == 0x2E


#: Opcodes a protocol 0/1 pickle starts with: MARK, empty list/dict/tuple, GLOBAL, INST, ints,
#: strings, NONE, floats, PERSID ... Only `(` is also a Datum field tag (label, which Caffe writes
#: after data, never first), and such values must also walk as opcodes (parsed, never run) to a
#: final STOP. (No Datum parse here: `parse_datum_view`'s error path calls this detection.)
OLD_PICKLE_FIRST = frozenset(b"(])}cijIJKLMNSVXUTBCFGP")


def is_old_pickle(data: bytes | memoryview) -> bool:
    if len(data) < 2 or data[0] not in OLD_PICKLE_FIRST or data[-1] != 0x2E:
        return False
    try:
        for count, (opcode, _arg, pos) in enumerate(pickletools.genops(bytes(data))):
            if opcode.proto >= 2:
                return False
            if opcode.name == "STOP":
                return pos == len(data) - 1
            if count >= 256:  # long enough a run of valid opcodes; do not walk a huge key list
                return True
    except Exception:  # pickletools raises ValueError and friends on anything that is not a pickle
        return False
    return False


MSGPACK_CONTAINERS = frozenset([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])  # fixmap, fixarray, 16/32


def unpack_msgpack(data: bytes | memoryview) -> Any:
    """A msgpack value as old msgpack (< 1.0) read it: raw (str-typed) bytes stay bytes, map keys too.

    Writers before msgpack 1.0 stored bytes with the str type (`use_bin_type=False`), which
    msgpack 1.0's default `raw=False` would try to decode as UTF-8; `raw=True` reads both kinds.
    """
    import msgpack

    return msgpack.unpackb(data, raw=True, strict_map_key=False)


def _is_msgpack(data: bytes | memoryview) -> bool:
    if not data or data[0] not in MSGPACK_CONTAINERS:
        return False
    try:
        unpack_msgpack(data)  # data only: msgpack has no way to name code
    except Exception:
        return False
    return True


_ARROW_LIST_FIELD = b"\x04\x00\x00\x00list\x00"  # the flatbuffer string of the batch's one field, "list"


def is_pyarrow_serialized(data: bytes | memoryview) -> bool:
    """`pyarrow.serialize(obj).to_buffer()`, per arrow's python/serialize.cc `SerializedPyObject::WriteTo`.

    Layout: int32 counts (num_tensors, [num_sparse_tensors,] num_ndarrays, num_buffers), padded to
    8 bytes, then an Arrow IPC stream (an optional 0xFFFFFFFF continuation marker and an int32
    metadata length) whose schema message has one field named "list".
    """
    if len(data) < 32:
        return False
    if not all(0 <= count < 1 << 20 for count in struct.unpack_from("<4i", data)):
        return False
    pos = 16
    (length,) = struct.unpack_from("<i", data, pos)
    if length == -1:
        (length,) = struct.unpack_from("<i", data, pos + 4)
        pos += 4
    pos += 4
    return 0 < length <= len(data) - pos and _ARROW_LIST_FIELD in bytes(data[pos:pos + length])


def foreign_kind(value: bytes | bytearray | memoryview) -> tuple[str, str] | None:
    """("pickle" | "msgpack" | "pyarrow", what the value is in words), or None.

    Called on every record that fails to parse as a Datum (by the readers' error paths), so the
    value is looked at in place: only a msgpack or protocol 0/1 candidate is read further.
    """
    data = value if isinstance(value, bytes) else memoryview(value).cast("B")
    if is_new_pickle(data):
        return "pickle", f"pickled Python objects (pickle protocol {data[1]})"
    if is_pyarrow_serialized(data):
        return "pyarrow", "pyarrow-serialized data (pyarrow.serialize)"
    if _is_msgpack(data):
        return "msgpack", "msgpack-encoded records"
    if is_old_pickle(data):
        return "pickle", "pickled Python objects (pickle protocol 0 or 1)"
    return None


def foreign_value_hint(value: bytes | bytearray | memoryview, lmdb_path: str | Path | None = None) -> str | None:
    """One sentence for readers that met a foreign value: what the LMDB holds and what to do, or None.

    For pickle and msgpack values it points to `caffe-lmdb migrate`; for pyarrow-serialized ones
    it says that `pyarrow.serialize` is gone. Used by `datum.parse_datum` and `parse_datum_view`
    in their "not a Datum" errors, so the dataset and the inspection tools say it too.

    Args:
        value: an LMDB value that did not parse as a Datum (nothing of it is unpickled).
        lmdb_path: the LMDB, to name it in the suggested command (default: `OLD.lmdb`).
    """
    kind = foreign_kind(value)
    if kind is None:
        return None
    if kind[0] == "pyarrow":
        return f"the LMDB holds {kind[1]}, not Caffe Datums; {PYARROW_GONE}"
    old = lmdb_path if lmdb_path is not None else "OLD.lmdb"
    return (f"the LMDB holds {kind[1]}, not Caffe Datums; convert it once with `caffe-lmdb migrate {old} NEW.lmdb` "
            "(which reads them without running code from the file)")
