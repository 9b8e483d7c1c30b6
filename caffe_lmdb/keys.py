"""Record keys: Caffe's `%08d_<relpath>` format, the `.npy` keys file, and the key-only LMDB scan.

Keys live in a separate `.npy` file, never inside the LMDB: Caffe's data layer parses every record
as a Datum, so a metadata record such as a pickled `__keys__` would break Caffe training.
Keys are held as a numpy bytes array (not a list of Python bytes) so that DataLoader workers
forked from the parent share the pages instead of copying them through reference counting.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import lmdb
import numpy as np

from .errors import KeysFileError, LmdbFormatError


def make_key(line_id: int, relpath: str) -> bytes:
    """Caffe's key: zero-padded so that byte order (LMDB's order) equals line order below 10^8.

    Args:
        line_id: the row of the image in the (shuffled) input list, counting skipped rows too.
        relpath: the image path as written in the list, relative to the root folder.
    """
    if line_id < 0:
        raise ValueError(f"line_id must be >= 0, got {line_id}")
    return f"{line_id:08d}_{relpath}".encode()


def keys_to_array(keys: Iterable[bytes | str]) -> np.ndarray:
    """A numpy bytes (`S`) array of the keys; str keys are UTF-8 encoded."""
    encoded = [k.encode("utf-8") if isinstance(k, str) else bytes(k) for k in keys]
    if any(k.endswith(b"\x00") for k in encoded):
        raise KeysFileError("a key ends with a NUL byte, which a numpy bytes array cannot hold")
    if not encoded:
        return np.array([], dtype="S1")
    return np.array(encoded, dtype=bytes)


def save_keys(path: str | os.PathLike, keys: Iterable[bytes | str]) -> Path:
    """Write the keys to `path` as a pickle-free `.npy`, atomically (temp file, then rename).

    Returns:
        The path written.
    """
    path = Path(path)
    array = keys_to_array(keys)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_keys(path: str | os.PathLike) -> np.ndarray:
    """Load a keys file as a numpy bytes array, refusing pickled (object) arrays.

    Accepts bytes (`S`) arrays as written by `save_keys`, and str (`U`) arrays that other tools
    write, which are UTF-8 encoded.

    Raises:
        KeysFileError: the file is missing, not a `.npy`, pickled, or not 1-D bytes/str.
    """
    path = Path(path)
    if not path.is_file():
        raise KeysFileError(f"{path}: keys file not found")
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
    with open_readonly(lmdb_path) as env, env.begin(buffers=False) as txn:
        return txn_keys(txn)


def txn_keys(txn: lmdb.Transaction) -> np.ndarray:
    """`scan_keys` inside a transaction the caller holds: py-lmdb refuses a second open of an LMDB in a process."""
    return keys_to_array(txn.cursor().iternext(keys=True, values=False))


def open_readonly(lmdb_path: str | os.PathLike, **kwargs) -> lmdb.Environment:
    """Open an existing LMDB read-only without creating anything, with a clear error if it is not one.

    Both layouts are accepted: a directory holding `data.mdb` (what Caffe writes) and a single file
    (`subdir=False`).
    """
    path = Path(lmdb_path)
    if path.is_dir():
        if not (path / "data.mdb").is_file():
            raise LmdbFormatError(f"{path}: not an LMDB (no data.mdb in the directory)")
        subdir = True
    elif path.is_file():
        subdir = False
    else:
        raise LmdbFormatError(f"{path}: LMDB not found")
    options = {"readonly": True, "lock": False, "readahead": False, "meminit": False}
    options.update(kwargs)
    try:
        return lmdb.open(str(path), subdir=subdir, create=False, **options)
    except lmdb.Error as exc:
        raise LmdbFormatError(f"{path}: not a readable LMDB ({exc})") from None
