"""The PyTorch side: `LmdbDataset_train`, a map-style Dataset over one Caffe Datum LMDB, new or legacy.

Why it is built this way:

* The LMDB environment is opened lazily, once per process, and never pickled. LMDB forbids using
  an environment across `fork()` and py-lmdb cannot pickle one for spawned workers, so the dataset
  keeps only the path and options, opens on the first read, and reopens when `os.getpid()` says
  the object has crossed into a new process.
* It is opened read-only with `lock=False` (no reader table, so no `MDB_READERS_FULL` however many
  workers and ranks read), `meminit=False`, and OS readahead chosen by record size (see the
  `readahead` argument): off for small records read at random, on for large raw records.
* Keys are a numpy bytes array: forked workers share its pages, where a list of Python bytes would
  be copied page by page as reference counts change.
* Values are read with `buffers=True` and parsed by `datum.parse_datum_view`, so the pixels are
  copied once, from the memory map into the image, tensor or array returned.
* py-lmdb refuses to open an LMDB twice in one process (LMDB's locks belong to the process and
  file), so datasets over the same LMDB (`ds + ds`, or a train and a val view of one LMDB) share
  the process's one read-only environment, kept in `_OPEN_ENVS`.
* The dataset remembers which file its keys were read from (device, inode, size, mtime of
  `data.mdb`) and every process checks it when it opens the LMDB: `convert --overwrite`
  publishes a new LMDB under the same path, and the old keys would silently read other records.
"""

from __future__ import annotations

import bisect
import logging
import operator
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lmdb
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .datum import DECODE_MODES, DatumView, datum_to_image, datum_to_image_array, parse_datum_view
from .errors import DatumError, KeysFileError, KeysFileWarning, LmdbFormatError
from .keys import (
    begin_read,
    data_file,
    file_identity,
    get_value,
    load_keys,
    open_readonly,
    opened_identity,
    save_keys,
    txn_keys,
)
from .records import keys_file_for, refuse_foreign_lmdb
from .shards import find_shards

logger = logging.getLogger(__name__)

Target = Literal["label", "float", "both"]
Output = Literal["pil", "tensor", "numpy"]

_TARGETS = ("label", "float", "both")
_OUTPUTS = ("pil", "tensor", "numpy")

#: Records at least this big are read with OS readahead by default: 16 pages and more.
READAHEAD_MIN_BYTES = 64 << 10

#: Prefetched byte ranges closer than this are read as one (the gap is read too).
PREFETCH_MERGE_GAP = 256 << 10
_PAGE = 4096

class _ProcessEnvironments:
    """The read-only LMDB environments open in this process, one per LMDB, shared by its datasets.

    py-lmdb raises "already open in this process" on a second open of the same files, so every
    dataset gets its environment here. Entries are weak: an environment closes when the last
    dataset using it goes. A child made by fork() inherits the parent's handles, which it must
    not use (LMDB's rule) and which block reopening the files; the first call in the child closes
    them, which touches nothing the parent shares because they were opened with `lock=False`.
    The first dataset to open an LMDB in a process chooses `readahead`. There is no `max_readers`:
    with `lock=False` LMDB keeps no reader table, so a reader-table size would have no effect.
    An environment is shared only while the path still names the file it maps: once the LMDB
    was replaced (a new inode under the same name), the next caller gets the new file's own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._envs: weakref.WeakValueDictionary[str, lmdb.Environment] = weakref.WeakValueDictionary()
        if hasattr(os, "register_at_fork"):  # a fork while another thread held the lock must not deadlock the child
            os.register_at_fork(after_in_child=self._new_lock)

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    def get(self, lmdb_path: str, **options: Any) -> lmdb.Environment:
        """This process's environment for `lmdb_path`, opened read-only (see `keys.open_readonly`)."""
        with self._lock:
            if self._pid != os.getpid():
                for env in list(self._envs.values()):
                    env.close()
                self._envs = weakref.WeakValueDictionary()
                self._pid = os.getpid()
            key = os.path.realpath(lmdb_path)
            env = self._envs.get(key)
            if env is not None and _same_file(env, lmdb_path) is False:
                env = None  # replaced: the old environment stays with the datasets that hold it
            if env is None:
                env = open_readonly(lmdb_path, **options)
                self._envs[key] = env
            return env


def _same_file(env: lmdb.Environment, lmdb_path: str) -> bool | None:
    """Whether `lmdb_path` still names the file `env` maps (device and inode); None when unknown."""
    opened = opened_identity(env)
    try:
        current = file_identity(data_file(lmdb_path))
    except OSError:
        return None  # gone: opening it again reports that
    return None if opened is None else opened[:2] == current[:2]


_OPEN_ENVS = _ProcessEnvironments()


class LmdbDataset_train(Dataset[tuple[Any, Any]]):
    """Images and labels from a Caffe Datum LMDB, in key order, for `torch.utils.data.DataLoader`.

    Works on LMDBs written by caffe-lmdb (with a `.npy` keys file) and on legacy LMDBs written by
    Caffe's own `convert_imageset` (no keys file: the keys are scanned from the LMDB, which reads
    keys only). Several LMDBs train as one with `ds1 + ds2 + ...` (torch's `ConcatDataset`).

    Each item is `(image, target)`. Raw records become an RGB image rebuilt from their planar BGR
    channels (an `L` image for one channel), encoded records are decoded with Pillow, and float
    records (pixels in `float_data`) keep their values in the tensor and numpy outputs (the PIL
    output clips them to 0..255).

    Args:
        lmdb_path: the LMDB: a directory holding `data.mdb` (what Caffe writes) or a single file.
        transform: called on each image (a PIL image, tensor or array, as `output` says).
        keys_path: the `.npy` keys file written with the LMDB. None scans the keys from the LMDB
            at construction; `save_keys` writes them out so the next run can skip the scan.
        target: what the second item is: "label", the Datum's int `label`; "float", its
            `float_data` as a 1-D float32 tensor (multi-label or regression targets stored with
            the image); "both", a `(label, float_data)` tuple. A float record's `float_data` is
            its pixels, not targets, so asking it for "float" raises `DatumError`.
        target_transform: called on each target.
        output: "pil" for a PIL image; "tensor" for a C x H x W uint8 `torch.Tensor` in RGB
            order, built straight from the planar record (no PIL, no H x W x C round trip);
            "numpy" for the same as a numpy array.
        mode: a Pillow mode for every image, or Caffe's names "color" / "gray". What each gives
            (`datum.datum_to_image` has the details):
            None: raw records keep their channels (1 -> L, 3 -> RGB); encoded records decode to
            L for gray files (L, LA, 1-bit, 16-bit gray) and RGB for all others (alpha dropped,
            16-bit scaled to 8 bits).
            "color" (= "RGB"): always 3 channels, what Caffe's data layer gives with
            `force_color` (`DecodeDatumToCVMat(datum, true)`); gray records and files become
            three equal channels, so that an LMDB of mixed records collates into one batch.
            "gray" (= "L"): always 1 channel; encoded records decode as OpenCV's
            `IMREAD_GRAYSCALE` (Caffe's `force_gray`); raw colour records use Pillow's L formula
            (Caffe never converts raw records).
        readahead: let the OS read ahead around each record. None (default) decides from the
            first record's size: on for records of `READAHEAD_MIN_BYTES` or more (a cold raw
            256x256 record spans 48 pages, each its own synchronous page fault without
            readahead: far slower on an LMDB bigger than RAM; docs/benchmarks.md), off for small
            records read at random (readahead would read neighbours nobody asked for). Datasets
            over one LMDB share one environment per process, so the first to open it sets this.
            Warm-cache speed is the same either way.
        prefetch: when the DataLoader asks for a whole batch (`__getitems__`), first tell the
            kernel about every record of the batch (`posix_fadvise(WILLNEED)` on their byte
            ranges), so that a cold batch is read with many IOs in flight instead of one page
            fault at a time.

    Raises:
        LmdbFormatError: `lmdb_path` is missing or is not an LMDB; on a later read, the LMDB was
            replaced since the dataset was created.
        CorruptLmdbError: the LMDB is truncated or damaged (here or on a later read), naming the
            LMDB and the key.
        KeysFileError: `keys_path` is missing, pickled or not a 1-D bytes/str array.
        ValueError: `target`, `output` or `mode` is not one of the values above.
    """

    def __init__(
        self,
        lmdb_path: str | os.PathLike,
        transform: Callable[[Any], Any] | None = None,
        keys_path: str | os.PathLike | None = None,
        *,
        target: Target = "label",
        target_transform: Callable[[Any], Any] | None = None,
        output: Output = "pil",
        mode: str | None = None,
        readahead: bool | None = None,
        prefetch: bool = True,
    ) -> None:
        if target not in _TARGETS:
            raise ValueError(f"target must be one of {', '.join(map(repr, _TARGETS))}, got {target!r}")
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(map(repr, _OUTPUTS))}, got {output!r}")
        if mode is not None and mode not in Image.MODES and mode not in DECODE_MODES:
            raise ValueError(
                f"mode must be None or a Pillow mode such as 'RGB' or 'L' (or Caffe's 'color', 'gray'), got {mode!r}"
            )
        self.root = os.fspath(lmdb_path)
        self.keys_path = None if keys_path is None else os.fspath(keys_path)
        self.transform = transform
        self.target_transform = target_transform
        self.target = target
        self.output = output
        self.mode = mode
        self.prefetch = prefetch
        self._env_options = {"readahead": bool(readahead)}
        env = _OPEN_ENVS.get(self.root, **self._env_options)  # a missing or non-LMDB path fails here
        #: The data file the keys belong to; each process checks it on opening (`_open_env`).
        self._identity = _identity(self.root)
        entries = env.stat()["entries"]
        self._keys = load_keys(self.keys_path) if self.keys_path is not None else self._scan_keys(env)
        #: Whether the first record is encoded (None: empty LMDB, or not a Datum), shown by repr.
        self.encoded, first_size = _first_record(env, self._keys, self.root)
        #: Whether the OS reads ahead around each record (see the `readahead` argument).
        self.readahead = first_size >= READAHEAD_MIN_BYTES if readahead is None else readahead
        self._env_options["readahead"] = self.readahead
        del env  # not kept: each process opens its own on first read
        self._data_fd: int | None = None
        if self.keys_path is not None and len(self._keys) != entries:
            warnings.warn(
                f"{self.keys_path}: keys file has {len(self._keys)} keys but the LMDB {self.root} has "
                f"{entries} entries (a stale keys file, or one for another LMDB?)",
                KeysFileWarning,
                stacklevel=2,
            )
        self._env = None
        self._pid: int | None = None

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
        """The record keys in dataset order, a numpy bytes (`S`) array (index i reads key i)."""
        return self._keys

    def save_keys(self, path: str | os.PathLike) -> Path:
        """Write this dataset's keys to a `.npy` keys file, so that the next run skips the scan.

        Use it once on a legacy LMDB, then pass the file as `keys_path`:
        `LmdbDataset_train(lmdb_path, transform, saved_keys)`.

        Returns:
            The path written.
        """
        return save_keys(path, self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """Read, decode and transform record `index` (negative indices count from the end).

        Raises:
            IndexError: `index` is out of range.
            KeysFileError: the key is not in the LMDB.
            DatumError: the value is not a Datum, its data size disagrees with its dims, or its
                encoded payload cannot be decoded.
        """
        key = self._key_at(index)
        with self.environment().begin(buffers=True) as txn:
            value = get_value(txn, key, self.root)
            if value is None:
                raise KeysFileError(f"{self.root}: key {bytes(key)!r} is not in the LMDB ({self._keys_origin()})")
            try:
                view = parse_datum_view(value)
                image = self._image(view)  # copies the pixels out of the memory map
                target = self._target(view)
            except DatumError as exc:
                raise DatumError(f"{self.root}: key {bytes(key)!r}: {exc}") from None
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, Any]]:
        """A whole batch (the DataLoader's fetcher calls this): prefetch every record, then read each."""
        if self.prefetch and len(indices) > 1:
            self.prefetch_records(indices)
        return [self[i] for i in indices]

    def environment(self) -> lmdb.Environment:
        """This process's read-only environment of the LMDB, opened on first use and again after a fork.

        For readers that take records straight from the memory map (`CaffeLoader`'s workers):
        the handle is checked against the keys the dataset was created with, as `__getitem__` does.
        """
        if self._pid != os.getpid():
            self._open_env()
        return self._env

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
            self.prefetch_values([get_value(txn, self._key_at(index), self.root) for index in indices])

    def prefetch_values(self, values: Sequence[Any]) -> None:
        """`prefetch_records` for records already looked up: `buffers=True` views on this process's map (None: absent).

        For a reader that looks a batch's keys up itself (`CaffeLoader`'s workers), so that each
        key is looked up once per batch.
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

    def _key_at(self, index: int) -> np.bytes_:
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(
                f"{self.root}: dataset indices must be integers, not {type(index).__name__}"
            ) from None
        count = len(self._keys)
        if i < 0:
            i += count
        if not 0 <= i < count:
            raise IndexError(f"{self.root}: index {index} out of range for {count} records")
        return self._keys[i]

    def _open_env(self) -> None:
        # First read in this process, or the object crossed a fork(): never use an inherited handle.
        recorded = getattr(self, "_identity", None)  # None: pickled by a version that kept none
        if recorded is not None and _identity(self.root) != recorded:
            raise LmdbFormatError(
                f"{self.root}: the LMDB was replaced or rewritten since this dataset was created (its keys "
                "would read other records); create the dataset again"
            )
        self._env = _OPEN_ENVS.get(self.root, **self._env_options)
        self._pid = os.getpid()
        self._data_fd = None  # an inherited descriptor is shared with the parent: open our own

    def _image(self, view: DatumView) -> Any:
        if self.output == "pil":
            return datum_to_image(view, self.mode)
        array = datum_to_image_array(view, self.mode)
        return torch.from_numpy(array) if self.output == "tensor" else array

    def _target(self, view: DatumView) -> Any:
        if self.target == "label":
            return view.label
        if not view.encoded and not view.data:
            raise DatumError("float_data holds this float datum's pixels, not targets (use target='label')")
        floats = torch.from_numpy(view.float_data)
        return floats if self.target == "float" else (view.label, floats)

    def _keys_origin(self) -> str:
        if self.keys_path is None:
            return "keys scanned at construction: has the LMDB changed since?"
        return f"listed in keys file {self.keys_path}"

    def __add__(self, other: Dataset) -> LmdbConcatDataset:
        """`ds1 + ds2`: torch's ConcatDataset semantics, with batch prefetch kept (`LmdbConcatDataset`)."""
        return LmdbConcatDataset([self, other])

    def __getstate__(self) -> dict[str, Any]:
        """Pickle everything but the environment, which the receiving process opens for itself."""
        state = self.__dict__.copy()
        state["_env"] = None
        state["_pid"] = None
        state["_data_fd"] = None
        return state

    def extra_repr(self) -> str:
        """The lines of `repr` after the location, as torchvision's `VisionDataset.extra_repr`."""
        keys = self.keys_path if self.keys_path is not None else "None (keys scanned from the LMDB)"
        encoded = "unknown" if self.encoded is None else str(self.encoded)
        lines = [f"Keys file: {keys}", f"Encoded: {encoded} (first record)", f"Output: {self.output}"]
        if self.mode is not None:
            lines.append(f"Mode: {self.mode}")
        lines.append(f"Target: {self.target}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        body = [f"Number of datapoints: {len(self)}", f"Root location: {self.root}"]
        body += self.extra_repr().splitlines()
        for head, transform in (("Transform: ", self.transform), ("Target transform: ", self.target_transform)):
            if transform is not None:
                first, *rest = repr(transform).splitlines() or [""]
                body.append(head + first)
                body += [" " * len(head) + line for line in rest]
        return "\n".join([f"Dataset {type(self).__name__}"] + ["    " + line for line in body])


def _identity(lmdb_path: str) -> tuple[int, int, int, int]:
    """`keys.file_identity` of the LMDB's data file; a file gone since is an LmdbFormatError naming it."""
    try:
        return file_identity(data_file(lmdb_path))
    except OSError:
        raise LmdbFormatError(f"{lmdb_path}: LMDB not found (removed since this dataset was created?)") from None


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


def open_shards(
    shards: str | os.PathLike | list[str | os.PathLike],
    transform: Callable[[Any], Any] | None = None,
    **kwargs: Any,
) -> torch.utils.data.ConcatDataset:
    """Open shard LMDBs (a glob such as `"train-*-of-00008.lmdb"`, a folder of them, or a list) as one dataset.

    Each shard's keys file is found beside it (`<shard>_keys.npy`; scanned when absent), and the
    shards are concatenated in name order with `+` (torch's `ConcatDataset`), so index i is the
    i-th record of the unsharded conversion. `kwargs` go to every `LmdbDataset_train`.
    """

    parts = [LmdbDataset_train(path, transform, keys_file_for(path), **kwargs) for path in find_shards(shards)]
    return LmdbConcatDataset(parts)


class LmdbConcatDataset(torch.utils.data.ConcatDataset):
    """torch's `ConcatDataset` (same `len` and indexing) that keeps batch prefetch across LMDBs.

    `ds1 + ds2` builds one of these. The DataLoader hands a whole batch to `__getitems__`; the
    batch is split by part, so each LMDB prefetches its own records, and reassembled in order.
    """

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, Any]]:
        by_part: dict[int, list[tuple[int, int]]] = {}
        for position, index in enumerate(indices):
            if index < 0:
                index += len(self)
            part = bisect.bisect_right(self.cumulative_sizes, index)
            local = index - (self.cumulative_sizes[part - 1] if part else 0)
            by_part.setdefault(part, []).append((position, local))
        out: list[Any] = [None] * len(indices)
        for part, items in by_part.items():
            dataset = self.datasets[part]
            locals_ = [local for _, local in items]
            values = dataset.__getitems__(locals_) if hasattr(dataset, "__getitems__") else \
                [dataset[local] for local in locals_]
            for (position, _), value in zip(items, values, strict=True):
                out[position] = value
        return out

    def __add__(self, other: torch.utils.data.Dataset) -> LmdbConcatDataset:
        return LmdbConcatDataset([self, other])
