"""Record keys: Caffe's `%08d_<relpath>` format, the `.npy` keys file, and the key-only LMDB scan.

Keys live in a separate `.npy` file, never inside the LMDB: Caffe's data layer parses every record
as a Datum, so a metadata record such as a pickled `__keys__` would break Caffe training.
Keys are held as a numpy bytes array (not a list of Python bytes) so that DataLoader workers
forked from the parent share the pages instead of copying them through reference counting.

LMDBs are opened and walked through `safe_lmdb` (a checked open and cursor walk).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import lmdb
import numpy as np

from .errors import (
    KeysFileError,
    KeysFileNotFoundError,
)
from .files import write_bytes_atomic
from .safe_lmdb import begin_read, checked_items, shared_readonly, transaction_path

#: LMDB refuses longer keys (MDB_MAXKEYSIZE).
MAX_KEY_BYTES = 511


def make_key(line_id: int, relpath: str) -> bytes:
    """Caffe's key: zero-padded so that byte order (LMDB's order) equals line order below 10^8.

    Args:
        line_id: the row of the image in the (shuffled) input list, counting skipped rows too.
        relpath: the image path as written in the list, relative to the root folder.
    """
    if line_id < 0:
        raise ValueError(f"line_id must be >= 0, got {line_id}")
    return f"{line_id:08d}_{relpath}".encode()


def sample_key(index: int, source_key: bytes) -> bytes:
    """The key `migrate` gives sample `index` of another layout (and the name `export` gives its file).

    `make_key(index, name)`, name the sample's source key as text when printable UTF-8, else its hex
    digits: a key is shown in list files and messages, so it must not hold control characters.
    """
    raw = bytes(source_key)
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        name = None
    if name is None or not name.isprintable():
        name = raw.hex()
    return make_key(index, name)


def keys_to_array(keys: Iterable[bytes | str]) -> np.ndarray:
    """A numpy bytes (`S`) array of the keys; str keys are UTF-8 encoded.

    Raises:
        KeysFileError: a key ends with a NUL byte (numpy would drop it silently), naming that key.
    """
    encoded = [k.encode("utf-8") if isinstance(k, str) else bytes(k) for k in keys]
    bad = next((k for k in encoded if k.endswith(b"\x00")), None)
    if bad is not None:
        raise KeysFileError(f"key {bad!r} ends with a NUL byte, which a numpy bytes array cannot hold "
                            "(numpy would cut it off, and the cut key would read another record or none)")
    if not encoded:
        return np.array([], dtype="S1")
    return np.array(encoded, dtype=bytes)


def save_keys(path: str | os.PathLike, keys: Iterable[bytes | str]) -> Path:
    """Write the keys to `path` as a pickle-free `.npy`, atomically (`files.write_bytes_atomic`).

    Returns:
        The path written.
    """
    buffer = io.BytesIO()
    np.save(buffer, keys_to_array(keys), allow_pickle=False)
    return write_bytes_atomic(path, buffer.getbuffer())


def load_keys(path: str | os.PathLike) -> np.ndarray:
    """Load a keys file as a numpy bytes array, refusing pickled (object) arrays.

    Accepts bytes (`S`) arrays as written by `save_keys`, and str (`U`) arrays that other tools
    write, which are UTF-8 encoded.

    Raises:
        KeysFileError: the file is missing, not a `.npy`, pickled, or not 1-D bytes/str.
    """
    path = Path(path)
    if not path.is_file():
        raise KeysFileNotFoundError(f"{path}: keys file not found")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise KeysFileError(f"{path}: not a pickle-free .npy keys file ({exc})") from None
    except OSError as exc:
        raise KeysFileError(f"{path}: cannot read keys file ({exc})") from None
    if not isinstance(array, np.ndarray) or array.ndim != 1:
        raise KeysFileError(f"{path}: keys file must hold a 1-D array, got shape {np.shape(array)}")
    if array.dtype.kind == "U":
        return keys_to_array(array.tolist())
    if array.dtype.kind != "S":
        raise KeysFileError(f"{path}: keys file must hold bytes or str keys, got dtype {array.dtype}")
    return array


def scan_keys(lmdb_path: str | os.PathLike) -> np.ndarray:
    """Every key of the LMDB, in LMDB order, read by a key-only cursor scan (values never touched).

    This is how legacy LMDBs written by Caffe's own tools, which have no keys file, get keys.
    """
    with shared_readonly(lmdb_path) as env, begin_read(env) as txn:
        return txn_keys(txn)


def txn_keys(txn: lmdb.Transaction) -> np.ndarray:
    """`scan_keys` inside a transaction the caller holds: py-lmdb refuses a second open of an LMDB in a process.

    Raises:
        CorruptLmdbError: a damaged page (see `checked_items`).
        KeysFileError: a key ends with a NUL byte; the message names the LMDB and the key.
    """
    try:
        return keys_to_array(checked_items(txn, values=False))
    except KeysFileError as exc:
        path = transaction_path(txn)
        raise KeysFileError(f"{path}: {exc}" if path is not None else str(exc)) from None
