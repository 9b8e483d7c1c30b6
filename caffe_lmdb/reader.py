"""The read side's one reader of an LMDB: keys, identity check, per-process environment, prefetch.

`LmdbReader` is what `LmdbDataset_train` (and, through it, `CaffeLoader`) reads an LMDB through;
`PartIndex` locates an index among several LMDBs (`ds1 + ds2`, a loader over a list of them). A
new LMDB layout plugs in here.

Why it is built this way:

* The LMDB environment is opened lazily, once per process, and never pickled. LMDB forbids using
  an environment across `fork()` and py-lmdb cannot pickle one for spawned workers, so the reader
  keeps only the path and options, opens on the first read, and reopens when `os.getpid()` says
  the object has crossed into a new process.
* It is opened read-only with `lock=False` (no reader table, so no `MDB_READERS_FULL` however many
  workers and ranks read), `meminit=False`, and OS readahead chosen by record size: off for small
  records read at random, on for large raw records.
* Keys are a numpy bytes array: forked workers share its pages, where a list of Python bytes would
  be copied page by page as reference counts change.
* py-lmdb refuses to open an LMDB twice in one process (LMDB's locks belong to the process and
  file), so readers of the same LMDB (`ds + ds`, or a train and a val view of one LMDB) share
  the process's one read-only environment, kept in `safe_lmdb.OPEN_ENVS` (the tools use it too).
* The reader remembers which file its keys were read from (device, inode, size, mtime of
  `data.mdb`) and every process checks it when it opens the LMDB: `convert --overwrite`
  publishes a new LMDB under the same path, and the old keys would silently read other records.
"""

from __future__ import annotations

import bisect
import logging
import operator
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from .datum import parse_datum_view
from .errors import CaffeLmdbError, DatumError, InputError, KeysFileError, KeysFileWarning, LmdbFormatError
from .key_index import kept_index
from .keys import load_keys, txn_keys
from .layout_basicsr import BasicSRLayout, EdvrLayout
from .layout_caffe2 import Caffe2Layout
from .layout_crnn import CrnnLayout, CrnnSrLayout
from .layout_datum import DatumLayout
from .layout_lsun import LsunLayout
from .layout_stylegan2 import Stylegan2Layout
from .layout_tensorpack import Folder2LmdbLayout, TensorpackLayout
from .layouts import Layout, Probe, ValueAtError, chosen_layout, detect_layout
from .safe_lmdb import OPEN_ENVS, begin_read, data_file, file_identity, get_value, shared_readonly
from .tool_reading import refuse_foreign_lmdb

logger = logging.getLogger(__name__)

#: Records at least this big are read with OS readahead by default: 16 pages and more.
READAHEAD_MIN_BYTES = 64 << 10

#: Prefetched byte ranges closer than this are read as one (the gap is read too).
PREFETCH_MERGE_GAP = 256 << 10
_PAGE = 4096



#: The layouts `LayoutReader` knows, in the order detection tries them: those recognised by a key
#: scheme or a side file first (tensorpack and folder2lmdb: numbered keys holding a pickle or
#: msgpack value, so a Datum under numbered keys still reads as a Datum), then those recognised by
#: strictly parsing a value: Caffe2's TensorProtos before Caffe's Datum (neither parses as the
#: other), then the layouts recognised by their keys' shape alone. A new layout is a
#: `layouts.Layout` added here.
LAYOUTS: tuple[type[Layout], ...] = (CrnnLayout, CrnnSrLayout, Stylegan2Layout, BasicSRLayout, EdvrLayout,
                                     TensorpackLayout, Folder2LmdbLayout, Caffe2Layout, DatumLayout, LsunLayout)


class LmdbHandle:
    """An LMDB path and this process's read-only environment of it: opened on first use, again after a fork.

    The base of the readers: the environment is never pickled (`__getstate__`), and every
    process checks on opening that the data file is still the one the reader was made for.
    """

    def __init__(self, lmdb_path: str | os.PathLike, *, readahead: bool = False) -> None:
        self.root = os.fspath(lmdb_path)
        self._env_options = {"readahead": bool(readahead)}
        #: The data file the reader's keys belong to; each process checks it on opening (`_open_env`).
        self._identity = _identity(self.root)
        self._data_fd: int | None = None
        self._env = None
        self._pid: int | None = None

    def environment(self) -> lmdb.Environment:
        """This process's read-only environment of the LMDB, opened on first use and again after a fork.

        Checked against the data file the keys were read from (`LmdbFormatError` if replaced).
        """
        if self._pid != os.getpid():
            self._open_env()
        return self._env

    def prefetch_values(self, values: Sequence[Any]) -> None:
        """`prefetch_records` for records already looked up: `buffers=True` views on this process's map (None: absent).

        For a reader of a batch that looks its keys up itself (`CaffeLoader`'s workers), so that
        each key is looked up once per batch.
        """
        if not hasattr(os, "posix_fadvise"):
            return
        env = self.environment()
        if self._data_fd is None:
            path = Path(self.root)
            self._data_fd = os.open(path / "data.mdb" if path.is_dir() else path, os.O_RDONLY)
        base = env.info()["map_addr"]
        ranges = []
        for value in values:
            if value is not None and len(value) >= 2 * _PAGE:
                offset = np.frombuffer(value, dtype=np.uint8).ctypes.data - base
                ranges.append((offset - offset % _PAGE, offset + len(value)))
        for start, stop in _merge_ranges(ranges, PREFETCH_MERGE_GAP):
            os.posix_fadvise(self._data_fd, start, stop - start, os.POSIX_FADV_WILLNEED)

    def __del__(self) -> None:
        if getattr(self, "_data_fd", None) is not None and self._pid == os.getpid():
            os.close(self._data_fd)
            self._data_fd = None

    def _open_env(self) -> None:
        # First read in this process, or the object crossed a fork(): never use an inherited handle.
        recorded = getattr(self, "_identity", None)  # None: pickled by a version that kept none
        if recorded is not None and _identity(self.root) != recorded:
            raise LmdbFormatError(
                f"{self.root}: the LMDB was replaced or rewritten since this dataset was created (its keys "
                "would read other records); create the dataset again"
            )
        self._env = OPEN_ENVS.get(self.root, **self._env_options)
        self._pid = os.getpid()
        self._data_fd = None  # an inherited descriptor is shared with the parent: open our own

    def __getstate__(self) -> dict[str, Any]:
        """Pickle everything but the environment, which the receiving process opens for itself."""
        state = self.__dict__.copy()
        state["_env"] = None
        state["_pid"] = None
        state["_data_fd"] = None
        return state


class LmdbReader(LmdbHandle):
    """One LMDB as the read side reads it: its keys, and this process's environment, checked and prefetched.

    Args:
        lmdb_path: the LMDB: a directory holding `data.mdb` (what Caffe writes) or a single file.
        keys_path: the `.npy` keys file written with the LMDB; None scans the keys from the LMDB.
        readahead: OS readahead around each record; None decides from the first record's size
            (on from `READAHEAD_MIN_BYTES`). Readers of one LMDB share one environment per
            process, so the first to open it sets this.
        stacklevel: of the `KeysFileWarning` for a keys file of another length than the LMDB.

    Raises:
        LmdbFormatError: `lmdb_path` is missing, is not an LMDB or holds pickled/msgpack records;
            on a later read, the LMDB was replaced since the reader was created.
        CorruptLmdbError: the LMDB is truncated or damaged.
        KeysFileError: `keys_path` is missing, pickled or not a 1-D bytes/str array.
    """

    def __init__(self, lmdb_path: str | os.PathLike, keys_path: str | os.PathLike | None = None, *,
                 readahead: bool | None = None, stacklevel: int = 2) -> None:
        self.keys_path = None if keys_path is None else os.fspath(keys_path)
        env = OPEN_ENVS.get(os.fspath(lmdb_path), readahead=bool(readahead))  # a missing or non-LMDB path fails here
        super().__init__(lmdb_path, readahead=bool(readahead))
        entries = env.stat()["entries"]
        self._keys = load_keys(self.keys_path) if self.keys_path is not None else self._scan_keys(env)
        #: Whether the first record is encoded (None: empty LMDB, or not a Datum).
        self.encoded, first_size = _first_record(env, self._keys, self.root)
        #: Whether the OS reads ahead around each record (see the `readahead` argument).
        self.readahead = first_size >= READAHEAD_MIN_BYTES if readahead is None else readahead
        self._env_options["readahead"] = self.readahead
        del env  # not kept: each process opens its own on first read
        if self.keys_path is not None and len(self._keys) != entries:
            warnings.warn(
                f"{self.keys_path}: keys file has {len(self._keys)} keys but the LMDB {self.root} has "
                f"{entries} entries (a stale keys file, or one for another LMDB?)",
                KeysFileWarning,
                stacklevel=stacklevel + 1,
            )

    def _scan_keys(self, env: lmdb.Environment) -> np.ndarray:
        # keys.scan_keys opens the LMDB itself, which py-lmdb refuses while this process has it open
        started = time.perf_counter()
        with begin_read(env) as txn:
            keys = txn_keys(txn)
        logger.info(
            "%s: no keys file, scanned %d keys in %.2fs; save them with save_keys() to skip this next time",
            self.root, len(keys), time.perf_counter() - started,
        )
        return keys

    @property
    def keys(self) -> np.ndarray:
        """The record keys in order, a numpy bytes (`S`) array (index i reads key i)."""
        return self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def key_at(self, index: int) -> np.bytes_:
        """The key of record `index` (negative indices count from the end).

        Raises:
            TypeError: `index` is not an integer.
            IndexError: `index` is out of range.
        """
        return self._keys[checked_index(self.root, index, len(self._keys))]

    def keys_origin(self) -> str:
        """Where the keys came from, for an error about a key the LMDB lacks."""
        if self.keys_path is None:
            return "keys scanned at construction: has the LMDB changed since?"
        return f"listed in keys file {self.keys_path}"

    def prefetch_records(self, indices: Sequence[int]) -> None:
        """Ask the kernel to read the byte ranges of these records now, all at once.

        A record's offset in `data.mdb` is its address in LMDB's memory map minus the map's
        start; `posix_fadvise(WILLNEED)` queues the reads without waiting, so a cold batch costs
        about one IO round trip instead of one synchronous page fault per 4 KiB page. Ranges
        closer than `PREFETCH_MERGE_GAP` are merged into one request: records of a block (see
        `BlockShuffleSampler`) then arrive as one sequential read.
        """
        if not hasattr(os, "posix_fadvise"):
            return
        with self.environment().begin(buffers=True) as txn:
            self.prefetch_values([get_value(txn, self.key_at(index), self.root) for index in indices])

class LayoutReader(LmdbHandle):
    """One LMDB of any known layout (`LAYOUTS`): its samples, read through this process's environment.

    The layout is detected from the first keys, a value and the side files (or given by name or as
    a `Layout`), then opened: it learns the sample count and keys, from the cached key index when
    they must be scanned (`keep_key_index=False`: a scan is not kept, nothing is written). Everything
    a layout does not say is done here once: the environment per process, the identity check,
    prefetch, and the LMDB and key named in every error.

    Raises:
        LmdbFormatError: the path is missing or not an LMDB, or no layout recognises it (the
            message says what was seen), or a count or side file it holds is inconsistent.
        CorruptLmdbError: the LMDB is truncated or damaged.
    """

    def __init__(self, lmdb_path: str | os.PathLike, layout: str | Layout | None = None, *,
                 keep_key_index: bool = True) -> None:
        root = os.fspath(lmdb_path)
        identity = _existing_identity(root)
        checked = identity if identity is not None and kept_index(root, identity) is not None else None
        env = OPEN_ENVS.get(root, readahead=False, checked_identity=checked)  # a non-LMDB path fails here
        super().__init__(lmdb_path)
        with begin_read(env, buffers=True) as txn:
            probe = Probe.of(self.root, txn, self._identity, keep_index=keep_key_index)
            #: How the LMDB stores its samples (`layouts.Layout`).
            self.layout = chosen_layout(probe, layout, LAYOUTS)
            self.layout.open(probe)
        del env, probe

    def __len__(self) -> int:
        return len(self.layout)

    def sample_keys(self, index: int) -> Sequence[bytes]:
        """The keys of sample `index` (negative indices count from the end).

        Raises:
            TypeError, IndexError: `index` is not an integer, or out of range.
        """
        return self.layout.sample_keys(checked_index(self.root, index, len(self.layout)))

    def read(self, index: int) -> tuple[Any, Any]:
        """`(image, target)` of sample `index`, decoded by the layout (images copied out of the map).

        Raises:
            KeysFileError: a key of the sample is not in the LMDB.
            DatumError: a value does not decode as the layout says, naming the LMDB and the key.
        """
        return self._through(self.layout.decode, index)

    def stored(self, index: int) -> tuple[tuple[bytes | np.ndarray, ...], Any]:
        """Sample `index` as the LMDB stores it (`Layout.stored`: encoded bytes or pixels, and the target).

        Raises:
            KeysFileError, DatumError: as `read`.
        """
        return self._through(self.layout.stored, index)

    def _through(self, call: Callable[[Sequence[Any]], Any], index: int) -> Any:
        """`call(values)` on sample `index`'s values, with missing keys and bad values named."""
        keys = self.sample_keys(index)
        with self.environment().begin(buffers=True) as txn:
            values = [get_value(txn, key, self.root) for key in keys]
            for position, (key, value) in enumerate(zip(keys, values, strict=True)):
                if value is None and position not in self.layout.optional:
                    raise KeysFileError(f"{self.root}: key {bytes(key)!r} is not in the LMDB "
                                        f"(sample {index} of the {self.layout.name} layout)")
            try:
                return call(values)
            except (DatumError, ValueError) as exc:
                key = keys[exc.position] if isinstance(exc, ValueAtError) else keys[0]
                raise DatumError(f"{self.root}: key {bytes(key)!r}: {exc}") from None

    def prefetch_samples(self, indices: Sequence[int]) -> None:
        """Ask the kernel to read these samples' values now, all at once (see `LmdbReader.prefetch_records`)."""
        if not hasattr(os, "posix_fadvise"):
            return
        with self.environment().begin(buffers=True) as txn:
            self.prefetch_values([get_value(txn, key, self.root) for index in indices
                                  for key in self.sample_keys(index)])


def detected_layout(lmdb_path: str | os.PathLike) -> Layout:
    """The layout `LayoutReader` would detect for an LMDB, from a probe alone: nothing is scanned or written.

    For callers that choose a reader by layout (the tools, `CaffeLoader` given a path).

    Raises:
        LmdbFormatError: not an LMDB, or no layout recognises it (saying what was seen).
        CorruptLmdbError: the LMDB is truncated or damaged.
    """
    path = os.fspath(lmdb_path)
    with shared_readonly(path) as env, begin_read(env, buffers=True) as txn:
        return detect_layout(Probe.of(path, txn, file_identity(data_file(path))), LAYOUTS)


def open_layout_reader(lmdb_path: str | os.PathLike, layout: str | Layout) -> LayoutReader:
    """`LayoutReader(lmdb_path, layout)` for the tools and `migrate`: an unknown name is an InputError naming the LMDB.

    A usage error (exit 2), not a failure: the name comes from `--layout`.
    """
    try:
        return LayoutReader(lmdb_path, layout)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, CaffeLmdbError):
            raise
        raise InputError(f"{lmdb_path}: {exc}") from None


def checked_index(root: str, index: Any, count: int) -> int:
    """`index` as a position in 0..count-1 (negative ones count from the end).

    Raises:
        TypeError: `index` is not an integer.
        IndexError: `index` is out of range.
    """
    try:
        i = operator.index(index)
    except TypeError:
        raise TypeError(f"{root}: dataset indices must be integers, not {type(index).__name__}") from None
    if i < 0:
        i += count
    if not 0 <= i < count:
        raise IndexError(f"{root}: index {index} out of range for {count} records")
    return i


class PartIndex:
    """Where an index of several LMDBs read as one lies: (part, index within the part), by their sizes."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.starts = np.cumsum([0, *sizes]).tolist()

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(part, index within the part) of an index.

        Raises:
            IndexError: `index` is out of range (negative ones included).
        """
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        part = bisect.bisect_right(self.starts, index) - 1
        return part, index - self.starts[part]

    def group(self, indices: Sequence[int]) -> list[tuple[int, list[int], list[int], list[int]]]:
        """The indices grouped by part, in order of first appearance.

        Each group is (part, positions in `indices`, indices within the part, the indices).

        Raises:
            IndexError: an index is out of range.
        """
        indices = [int(index) for index in indices]
        if len(self.starts) == 2:
            if indices and not (min(indices) >= 0 and max(indices) < len(self)):
                bad = next(index for index in indices if not 0 <= index < len(self))
                raise IndexError(f"index {bad} out of range for {len(self)} records")
            return [(0, list(range(len(indices))), indices, indices)]
        grouped: dict[int, tuple[list[int], list[int], list[int]]] = {}
        for position, index in enumerate(indices):
            part, local = self.locate(index)
            positions, locals_, part_indices = grouped.setdefault(part, ([], [], []))
            positions.append(position)
            locals_.append(local)
            part_indices.append(index)
        return [(part, *group) for part, group in grouped.items()]


def _identity(lmdb_path: str) -> tuple[int, int, int, int]:
    """`safe_lmdb.file_identity` of the LMDB's data file; a file gone since is an LmdbFormatError naming it."""
    try:
        return file_identity(data_file(lmdb_path))
    except OSError:
        raise LmdbFormatError(f"{lmdb_path}: LMDB not found (removed since this dataset was created?)") from None


def _existing_identity(lmdb_path: str) -> tuple[int, int, int, int] | None:
    """`safe_lmdb.file_identity` of the LMDB's data file, or None when there is none (opening says why)."""
    try:
        return file_identity(data_file(lmdb_path))
    except OSError:
        return None


def _merge_ranges(ranges: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Sort `[start, stop)` ranges and merge those that overlap or lie within `gap` bytes."""
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        if merged and start - merged[-1][1] <= gap:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def _first_record(env: lmdb.Environment, keys: np.ndarray, root: str) -> tuple[bool | None, int]:
    """Whether the first record is encoded (None when there is none or it is not a Datum), and its size.

    Raises:
        LmdbFormatError: the LMDB holds pickled/msgpack records (from the popular PyTorch recipes),
            with the `caffe-lmdb migrate` command to convert it; nothing is unpickled.
    """

    with env.begin(buffers=True) as txn:
        refuse_foreign_lmdb(root, txn)
        if not len(keys):
            return None, 0
        value = get_value(txn, keys[0], root)
        if value is None:
            return None, 0
        try:
            return parse_datum_view(value).encoded, len(value)
        except DatumError:
            return None, len(value)

