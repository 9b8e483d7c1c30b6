"""The cached key index: an LMDB's keys scanned once, then opened in milliseconds.

Readers of layouts whose keys cannot be computed (LSUN's hashes, a Datum LMDB without its keys
file, Caffe2's `str(i)` keys) need every key before the first read. A key-only cursor scan reads
every leaf page of the B-tree: seconds on a warm million-record LMDB, minutes to hours on a cold
one (torchvision's LSUN reader pickles the list into the current directory; tensorpack's ImageNet
scan took more than half an hour). The scan runs once; its result is kept as a `.npy` file whose
name carries the data file's identity (device, inode, size, mtime), so a replaced or rewritten
LMDB never reads another LMDB's keys, and is memory-mapped on the next open (no copy, pages
shared by forked workers).

Where it is kept: beside the LMDB (`.<name>.keys-<identity>.npy` in the folder that holds it) when
that folder is writable, else under the user's cache directory (`$XDG_CACHE_HOME/caffe-lmdb/`,
default `~/.cache/caffe-lmdb/`), named by a hash of the LMDB's real path; never in the current
directory. Only files this module created are replaced, and a cache file that cannot be read or
written is ignored: the keys are then scanned again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .files import write_bytes_atomic
from .keys import keys_to_array

logger = logging.getLogger(__name__)

_PREFIX_MARK = ".keys-"
_IDENTITY_TAIL = re.compile(r"\d+(-\d+)*\.npy")


def cache_home() -> Path:
    """The user cache directory for key indexes of LMDBs in folders this user cannot write."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "caffe-lmdb"


def index_paths(lmdb_path: str | os.PathLike, identity: tuple[int, ...]) -> list[Path]:
    """Where the key index of this LMDB (at this identity) may be: beside it, then in the user cache."""
    path = Path(os.path.abspath(lmdb_path))
    tag = "-".join(str(part) for part in identity)
    real = os.path.realpath(path)
    digest = hashlib.sha1(real.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return [path.parent / f".{path.name}{_PREFIX_MARK}{tag}.npy",
            cache_home() / f"{path.name}-{digest}{_PREFIX_MARK}{tag}.npy"]


def kept_index(lmdb_path: str | os.PathLike, identity: tuple[int, ...]) -> Path | None:
    """The key index file kept for this LMDB at this identity, if there is one (not yet validated).

    One exists only once a whole key scan of the file at this identity ended, and that scan
    checked every page it read (`safe_lmdb.checked_items`): so its presence also tells
    `safe_lmdb.open_readonly` that the file's pages were checked at this identity.
    """
    for candidate in index_paths(lmdb_path, identity):
        if candidate.is_file():
            return candidate
    return None


def load_index(lmdb_path: str | os.PathLike, identity: tuple[int, ...], entries: int) -> np.ndarray | None:
    """The cached keys of this LMDB at this identity, memory-mapped, or None when there are none usable.

    A file that is not a 1-D bytes array of `entries` keys (damaged, or not ours) is ignored.
    """
    for candidate in index_paths(lmdb_path, identity):
        try:
            keys = np.load(candidate, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            continue
        if keys.ndim == 1 and keys.dtype.kind == "S" and len(keys) == entries:
            return keys
        logger.warning("%s: ignoring a key index that does not match the LMDB", candidate)
    return None


def save_index(lmdb_path: str | os.PathLike, identity: tuple[int, ...], keys: np.ndarray) -> Path | None:
    """Keep `keys` as this LMDB's key index; older indexes of the same LMDB in that place are removed.

    Returns the file written, or None when neither place is writable (nothing is kept then).
    """
    data = _npy_bytes(keys)
    for candidate in index_paths(lmdb_path, identity):
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(candidate, data, sync=False)
        except OSError:
            continue
        _remove_older(candidate)
        return candidate
    return None


def cached_keys(lmdb_path: str | os.PathLike, identity: tuple[int, ...], entries: int,
                scan: Callable[[], np.ndarray], *, keep: bool = True) -> np.ndarray:
    """The LMDB's keys in LMDB order: from its key index, else `scan()`, whose result is then kept.

    With `keep=False` a scan's result is not kept (a reader that promises to write nothing: `serve`).
    """
    keys = load_index(lmdb_path, identity, entries)
    if keys is not None:
        return keys
    started = time.perf_counter()
    keys = keys_to_array(scan())
    saved = save_index(lmdb_path, identity, keys) if keep else None
    logger.info("%s: scanned %d keys in %.2fs%s", lmdb_path, len(keys), time.perf_counter() - started,
                f"; kept in {saved}" if saved is not None else "; no writable place to keep them")
    return keys


def _npy_bytes(keys: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(keys), allow_pickle=False)
    return buffer.getvalue()


def _remove_older(current: Path) -> None:
    """Remove this LMDB's earlier key indexes in `current`'s folder (other identities), ours by name."""
    stem = current.name.rsplit(_PREFIX_MARK, 1)[0] + _PREFIX_MARK
    for other in current.parent.glob("*.npy"):
        if other == current or not other.name.startswith(stem) or not _IDENTITY_TAIL.fullmatch(other.name[len(stem):]):
            continue
        if other.is_file() and not other.is_symlink():
            with contextlib.suppress(OSError):
                other.unlink()
