"""Reading a whole Datum LMDB for the tools: record iteration, sampling, and the converter's sidecar files.

The tools (`info`, `verify`, `mean`, `export`, `grid`) each read every record, or a sample, of one
LMDB once. They walk it with a cursor, in LMDB (key) order, which reads the file front to back,
instead of looking each key up; values are read with `buffers=True` and parsed with
`parse_datum_view`, so nothing is copied out of the memory map unless a tool needs the pixels.
The converter leaves `<stem>_keys.npy` and `<stem>_classes.txt` beside `<stem>.lmdb`; these
helpers find them, and work without them on LMDBs made by Caffe's own tools.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lmdb
import numpy as np

from .errors import LmdbFormatError
from .files import default_keys_path, sidecar_path
from .foreign_values import foreign_value_hint
from .keys import load_keys, txn_keys
from .safe_lmdb import begin_read, checked_items, lmdb_errors_named, shared_readonly


def format_key(key: bytes) -> str:
    """How messages show a key: `key b'00000042_cat/7.jpg'`, the form the dataset's errors use."""
    return f"key {bytes(key)!r}"


def format_shape(shape: tuple[int, ...] | None) -> str:
    """`3x256x256` for a C x H x W shape; `unknown` for None (an encoded record whose header is unreadable)."""
    return "unknown" if shape is None else "x".join(map(str, shape))


def keys_file_for(lmdb_path: str | os.PathLike, keys_path: str | os.PathLike | None = None) -> Path | None:
    """The keys file to use: `keys_path` when given, else the converter's `<stem>_keys.npy` if it exists.

    An explicit `keys_path` is returned even when missing, so that loading it fails with its name.
    """
    if keys_path is not None:
        return Path(keys_path)
    default = default_keys_path(lmdb_path)
    return default if default.is_file() else None


def sidecar_lines(lmdb_path: str | os.PathLike, name: str) -> list[str] | None:
    """The lines of a converter side file beside an LMDB (`<stem>_classes.txt`, ...), or None if absent."""
    path = sidecar_path(lmdb_path, name)
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise LmdbFormatError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def class_names(lmdb_path: str | os.PathLike) -> list[str] | None:
    """The converter's class names for this LMDB (`<stem>_classes.txt`, line i = label i), if present."""
    return sidecar_lines(lmdb_path, "classes.txt")


def label_name(label: int, classes: list[str] | None) -> str | None:
    """The class name of `label`, or None when there is no class file or the label is outside it."""
    if classes is not None and 0 <= label < len(classes):
        return classes[label]
    return None


def disk_bytes(lmdb_path: str | os.PathLike) -> int:
    """Bytes the LMDB's files take on disk (allocated blocks, so sparse maps count what they use)."""
    path = Path(lmdb_path)
    files = [p for p in path.iterdir() if p.is_file()] if path.is_dir() else [path]
    total = 0
    for file in files:
        stat = file.stat()
        total += stat.st_blocks * 512 if hasattr(stat, "st_blocks") else stat.st_size
    return total


@contextmanager
def read_txn(lmdb_path: str | os.PathLike, *, readahead: bool = False) -> Iterator[lmdb.Transaction]:
    """A zero-copy read transaction (`buffers=True`) on the LMDB (this process's shared environment).

    Values read in it are memoryviews on the memory map, valid until the block ends. Pass
    `readahead=True` to read every value in order (mean, export): a freshly converted LMDB is
    not in the page cache, and without readahead each 4 KiB page is its own disk read.

    Raises:
        LmdbFormatError: the path is missing or not an LMDB, or it holds pickled/msgpack records
            (then the message says to run `caffe-lmdb migrate`; nothing is unpickled).
        CorruptLmdbError: the LMDB is truncated or its B-tree damaged (see `safe_lmdb.open_readonly`).
    """
    with shared_readonly(lmdb_path, readahead=readahead) as env, begin_read(env, buffers=True) as txn:
        refuse_foreign_lmdb(lmdb_path, txn)
        yield txn


def refuse_foreign_lmdb(lmdb_path: str | os.PathLike, txn: lmdb.Transaction) -> None:
    """Fail with one line if the LMDB's first record is a pickle/msgpack/pyarrow value, not a Datum.

    LMDBs from the popular PyTorch recipes hold pickled records; reading them needs
    `caffe-lmdb migrate`, and every reader says so up front instead of once per record.
    """
    cursor = txn.cursor()
    with lmdb_errors_named(lmdb_path, "reading its first record"):
        found = cursor.first()
    if found:
        hint = foreign_value_hint(cursor.value(), lmdb_path)
        if hint is not None:
            raise LmdbFormatError(f"{lmdb_path}: key {bytes(cursor.key())!r}: {hint}")


def iter_values(txn: lmdb.Transaction) -> Iterator[tuple[bytes, memoryview]]:
    """Every (key, value) of the LMDB in key order; keys as bytes, values as views valid in `txn`.

    The walk is `safe_lmdb.checked_items`: on a transaction from `read_txn` each page is checked before
    LMDB reads it, so a damaged LMDB stops the walk with one line instead of crashing the process.

    Raises:
        CorruptLmdbError: a damaged page, naming the LMDB and the last good key.
    """
    for key, value in checked_items(txn):
        yield bytes(key), value


def known_keys(txn: lmdb.Transaction, keys_file: Path | None) -> np.ndarray:
    """The keys file's keys when there is one, else every key of the LMDB from a key-only scan."""
    return load_keys(keys_file) if keys_file is not None else txn_keys(txn)


def random_subset(keys: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` distinct keys drawn at random (seeded), kept in their given order; all keys if fewer.

    Keeping the order (key order for Caffe keys) makes the reads they cause walk the file forwards.
    """
    if count >= len(keys):
        return keys
    chosen = np.random.default_rng(seed).choice(len(keys), size=count, replace=False)
    return keys[np.sort(chosen)]


