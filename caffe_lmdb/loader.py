"""The training path: `CaffeLoader`, Caffe's data-layer batches assembled in worker processes into reused shared memory.

Why not `DataLoader` over `LmdbDataset_train`: per sample, it makes an RGB tensor of the whole
record, a cropped and flipped copy, a float copy and a mean-subtracted copy; per batch, `collate`
copies every sample once more into a fresh tensor in a new shared-memory file, which the main
process maps and page-faults in again. Here:

* One copy per sample. A worker reads the record through LMDB's memory map (`buffers=True`), and
  the transform copies the crop, mirrored if drawn, straight from the map into the batch
  (encoded records are decoded first, in the worker): `transform_into` with the mean and scale
  for `output="float32"`, `crop_into` for `output="uint8"`, which leaves the mean and scale to
  `loader.normalize`, wherever the batch is by then (a GPU: a quarter of the bytes to copy).
* Slots allocated once, as large as the longest batch of an epoch (not `batch_size`, when the
  epoch is shorter), and only if they fit in the memory available. Each worker owns a ring of
  `prefetch_factor + 1` batch slots in one anonymous shared-memory file (`memfd_create`: never a
  name in `/dev/shm`, so nothing can be left there, even when the main process is killed; the
  memory goes with the last process that maps it). The rings are allocated with all their pages on
  first use and kept for the loader's life, so later epochs (and their new workers, unless
  `persistent_workers`) reuse the same memory. The main process maps the same files and hands out
  each slot as a tensor without copying; the slot goes back to its worker only when the next batch
  is asked for. So a batch is valid until the next `next()` on the iterator: `.clone()` it to keep
  it longer.
* Order and randomness. Batch b is made by worker b % N, and a sample's crop and mirror come from
  `transform.params(height, width, seed, epoch, index)`, never from a global RNG, so the batches
  are the same bytes for any number of workers, 0 included.
* Clean failure. The main process waits on each worker's pipe and its process sentinel at once:
  a worker that raises, or dies (SIGKILL, out of memory), ends the loop with one error naming the
  worker, the LMDB and the key, never a hang. Workers ignore Ctrl-C (the main process handles it)
  and exit when their pipe closes, so leaving the loop, an error, or the main process dying
  stops them all.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import mmap
import multiprocessing
import multiprocessing.connection
import os
import signal
import tempfile
import time
import traceback
import warnings
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Sampler

from .dataset import LmdbDataset_train
from .datum import RawRecordLayout, parse_datum_view
from .errors import CaffeLmdbError, DatumError, InputError, KeysFileError, LmdbFormatError, LoaderError
from .keys import get_value
from .tool_reading import keys_file_for
from .transform import CaffeTransform
from .workers import start_processes

Output = Literal["float32", "uint8"]
_OUTPUTS = ("float32", "uint8")


class BatchTransform(Protocol):
    """What `CaffeLoader` needs of a transform; `caffe_lmdb.transform.CaffeTransform` is one.

    `params` draws a sample's crop and mirror from (seed, epoch, index) alone, so that any worker
    makes the same sample; `crop_into` copies the crop into a uint8 batch; `normalize` applies the
    mean and scale to a whole uint8 batch, given each sample's (h_off, w_off, mirror). Optional:
    `transform_into` (the float32 output of one record in one pass, used for `output="float32"`)
    and `record_pixels` (how records are decoded: `force_color`, `force_gray`).
    """

    def output_shape(self, channels: int, height: int, width: int) -> tuple[int, int, int]: ...

    def params(self, height: int, width: int, seed: int, epoch: int, index: int) -> tuple[int, int, bool]: ...

    def crop_into(self, pixels: np.ndarray, out: np.ndarray, h_off: int, w_off: int, do_mirror: bool) -> Any: ...

    def normalize(self, batch: torch.Tensor, offsets: Any) -> torch.Tensor: ...


# --------------------------------------------------------------------------- reading one batch

def _parts(source: Any) -> list[LmdbDataset_train]:
    """The `LmdbDataset_train`s of a source, in index order: `ds1 + ds2` (nested too) is flattened."""
    if isinstance(source, LmdbDataset_train):
        for name in ("transform", "target_transform", "mode"):
            if getattr(source, name) is not None:
                raise InputError(
                    f"{source.root}: CaffeLoader reads the records itself; a dataset with a {name} would be "
                    f"ignored: create it without one (give the crop and mean to CaffeLoader's transform)"
                )
        if source.target != "label":
            raise InputError(f"{source.root}: CaffeLoader gives labels only, not target={source.target!r}")
        return [source]
    if isinstance(source, ConcatDataset):
        return [part for dataset in source.datasets for part in _parts(dataset)]
    if isinstance(source, str | os.PathLike):
        return [LmdbDataset_train(source, keys_path=keys_file_for(source))]
    if isinstance(source, Sequence) and source:
        return [part for item in source for part in _parts(item)]
    raise TypeError(
        "source must be an LMDB path, a list of them, or an LmdbDataset_train (or a sum of them), "
        f"got {type(source).__name__}"
    )


@dataclass(frozen=True)
class _Layout:
    """Where a batch's images, labels and per-sample params lie in a slot; slots are page-aligned.

    `batch_size` is the rows of a slot: the longest batch an epoch makes, which is less than the
    loader's `batch_size` when an epoch has fewer samples (`CaffeLoader._slot_rows`).
    """

    batch_size: int
    sample_shape: tuple[int, int, int]
    dtype: str
    slots: int

    @property
    def image_bytes(self) -> int:
        return self.batch_size * math.prod(self.sample_shape) * np.dtype(self.dtype).itemsize

    @property
    def labels_at(self) -> int:
        return -(-self.image_bytes // 64) * 64

    @property
    def params_at(self) -> int:
        return self.labels_at + -(-self.batch_size * 8 // 64) * 64

    @property
    def slot_bytes(self) -> int:
        end = self.params_at + self.batch_size * 3 * 4
        return -(-end // mmap.PAGESIZE) * mmap.PAGESIZE

    @property
    def total_bytes(self) -> int:
        return self.slot_bytes * self.slots

    def views(self, buffer: Any, slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images B x C x h x w, labels B int64, params B x 3 int32: h_off, w_off, mirror) of `slot` in `buffer`."""
        base = slot * self.slot_bytes
        count = math.prod(self.sample_shape) * self.batch_size
        images = np.frombuffer(buffer, self.dtype, count, base).reshape(self.batch_size, *self.sample_shape)
        labels = np.frombuffer(buffer, np.int64, self.batch_size, base + self.labels_at)
        params = np.frombuffer(buffer, np.int32, self.batch_size * 3, base + self.params_at).reshape(-1, 3)
        return images, labels, params


class _BatchMaker:
    """Fills a batch slot from dataset indices: what the main process (num_workers=0) and every worker run.

    Picklable for spawned workers: the datasets pickle without their environments (each process
    opens its own, see `LmdbDataset_train`), and the transform must pickle too.
    """

    def __init__(self, parts: list[LmdbDataset_train], transform: BatchTransform | None, seed: int,
                 output: Output, sample_shape: tuple[int, int, int]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(part) for part in parts]).tolist()
        self.transform = transform
        self.seed = seed
        self.output = output
        self.sample_shape = sample_shape
        if transform is not None and hasattr(transform, "record_pixels"):
            self._decoder: Any = transform  # decodes as the transform says (force_color, force_gray)
        else:

            self._decoder = CaffeTransform()  # Caffe's own reading: BGR planes, encoded records decoded natively
        self._one_pass = output == "float32" and hasattr(transform, "transform_into")
        self._scratch: np.ndarray | None = None  # the uint8 crops of a float32 batch, before normalize
        # Raw records skip the full parse only where reading them is known to be plain: Caffe's own
        # decoder (a custom one may treat raw records its own way).
        self._raw_fast_path = type(self._decoder) is CaffeTransform
        self._layouts: dict[int, RawRecordLayout] = {}  # per part: the layout of its raw records, once seen

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_scratch": None, "_layouts": {}}

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(part, index within the part) of a dataset index."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        part = bisect.bisect_right(self.starts, index) - 1
        return part, index - self.starts[part]

    def describe(self, index: int) -> str:
        """`LMDB: key b'...' (index i)`: where a dataset index is read from."""
        try:
            part, local = self.locate(index)
        except IndexError as exc:
            return str(exc)
        dataset = self.parts[part]
        return f"{dataset.root}: key {bytes(dataset.keys[local])!r} (index {index})"

    def first_pixels_shape(self) -> tuple[int, int, int]:
        """The C x H x W of the first record (decoded if encoded): what fixes the batch shape."""
        number, dataset = next((i, part) for i, part in enumerate(self.parts) if len(part))
        key = dataset.keys[0]
        env = dataset.environment()
        with env.begin(buffers=True) as txn:
            value = get_value(txn, key, dataset.root)
            if value is None:
                raise KeysFileError(f"{dataset.root}: key {bytes(key)!r} is not in the LMDB")
            try:
                shape = tuple(self._decoder.record_pixels(parse_datum_view(value)).shape)
                if hasattr(self.transform, "check_shape"):  # crop bigger than the record, mean of another size
                    self.transform.check_shape(*shape)
                return shape
            except CaffeLmdbError as exc:
                raise type(exc)(f"{dataset.root}: key {bytes(key)!r} (index {self.starts[number]}): {exc}") from None

    def fill(self, indices: Sequence[int], epoch: int, images: np.ndarray, labels: np.ndarray,
             params: np.ndarray) -> None:
        """Make the batch of `indices` into the first len(indices) rows of a slot's arrays.

        Raises:
            CaffeLmdbError (a subclass): a record cannot be read or transformed; the message names
                the LMDB, the key and the index. Other exceptions of the transform become a
                `LoaderError` with the same names.
        """
        count = len(indices)
        pixels_out = images
        if self.output == "float32" and self.transform is not None and not self._one_pass:
            if self._scratch is None or self._scratch.shape != images.shape:
                self._scratch = np.empty(images.shape, np.uint8)
            pixels_out = self._scratch
        for part, positions, locals_, part_indices in self._by_part(indices):
            dataset = self.parts[part]
            env = dataset.environment()
            if dataset.prefetch and len(locals_) > 1:
                dataset.prefetch_records(locals_)
            with env.begin(buffers=True) as txn:
                records = [self._read(txn, part, dataset, local, index)
                           for local, index in zip(locals_, part_indices, strict=True)]
                draws = self._draws(records, part_indices, epoch, dataset)
                copy = self._copy
                for position, index, (key, _, pixels), draw in zip(positions, part_indices, records, draws,
                                                                   strict=True):
                    try:
                        copy(pixels, pixels_out[position], draw)
                    except Exception as exc:
                        raise _named(exc, dataset, key, index) from _cause(exc)
            labels[positions] = [label for _, label, _ in records]
            params[positions] = draws
        if pixels_out is not images:
            try:
                normalized = self.transform.normalize(torch.from_numpy(pixels_out[:count]),
                                                      torch.from_numpy(params[:count]))
                images[:count] = normalized.numpy() if isinstance(normalized, torch.Tensor) else normalized
            except CaffeLmdbError:
                raise
            except Exception as exc:
                raise LoaderError(f"{self.describe(int(indices[0]))}: normalizing the batch of {count} from it "
                                  f"failed: {type(exc).__name__}: {exc}") from exc

    def _by_part(self, indices: Sequence[int]) -> list[tuple[int, list[int], list[int], list[int]]]:
        """The batch grouped by LMDB: (part, batch positions, indices within the part, dataset indices)."""
        indices = [int(index) for index in indices]
        if len(self.parts) == 1:
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

    def _read(self, txn: Any, part: int, dataset: LmdbDataset_train, local: int,
              index: int) -> tuple[Any, int, np.ndarray]:
        """(key, label, C x H x W pixels) of one record: a view on the memory map, or decoded.

        Raw uint8 records of the shape the part's first one had are read through its
        `RawRecordLayout` (no full parse, no repeated checks); any other record is parsed and
        checked in full.
        """
        key = dataset.keys[local]
        value = get_value(txn, key, dataset.root)  # names the LMDB and the key itself
        if value is None:
            raise KeysFileError(f"{dataset.root}: key {bytes(key)!r} (index {index}) is not in the LMDB")
        layout = self._layouts.get(part)
        if layout is not None:
            hit = layout.read(value)
            if hit is not None:
                return key, hit[1], np.frombuffer(hit[0], np.uint8).reshape(layout.shape)
        try:
            view = parse_datum_view(value)
            pixels = self._decoder.record_pixels(view)
            self._check(pixels)
        except Exception as exc:
            raise _named(exc, dataset, key, index) from _cause(exc)
        if layout is None and self._raw_fast_path and not view.encoded and pixels.dtype == np.uint8:
            self._layouts[part] = RawRecordLayout(*pixels.shape)
        return key, view.label, pixels

    def _check(self, pixels: np.ndarray) -> None:
        channels, height, width = pixels.shape
        transform = self.transform
        shape = (channels, height, width) if transform is None else transform.output_shape(channels, height, width)
        if shape != self.sample_shape:
            raise DatumError(
                f"record is {channels}x{height}x{width}, which makes a {'x'.join(map(str, shape))} sample, but this "
                f"loader's samples are {'x'.join(map(str, self.sample_shape))} (set by the first record)"
            )
        if pixels.dtype != np.uint8 and (self.output == "uint8" or (transform is not None and not self._one_pass)):
            raise DatumError("a float record (float_data) can only be loaded as float32"
                             + ("" if self.output == "float32" else ": use output='float32'"))

    def _draws(self, records: list[tuple[Any, Any, np.ndarray]], indices: list[int], epoch: int,
               dataset: LmdbDataset_train) -> np.ndarray:
        """Each record's (h_off, w_off, mirror): the transform's `params`, drawn for all at once when it can."""
        draws = np.zeros((len(records), 3), np.int64)
        transform = self.transform
        if transform is None or not records:
            return draws
        heights = np.array([pixels.shape[1] for _, _, pixels in records])
        widths = np.array([pixels.shape[2] for _, _, pixels in records])
        if hasattr(transform, "batch_params"):
            with contextlib.suppress(Exception):  # one at a time below, to name the record that fails
                return np.asarray(transform.batch_params(heights, widths, self.seed, epoch, indices), np.int64)
        for row, (height, width, index) in enumerate(zip(heights.tolist(), widths.tolist(), indices, strict=True)):
            try:
                h_off, w_off, mirror = transform.params(height, width, self.seed, epoch, index)
            except Exception as exc:
                raise _named(exc, dataset, records[row][0], index) from _cause(exc)
            draws[row] = (h_off, w_off, int(bool(mirror)))
        return draws

    def _copy(self, pixels: np.ndarray, out: np.ndarray, draw: np.ndarray) -> None:
        """One record into its batch row: whole, or cropped and mirrored (with mean and scale for float32)."""
        if self.transform is None:
            out[...] = pixels
            return
        h_off, w_off, mirror = int(draw[0]), int(draw[1]), bool(draw[2])
        if self._one_pass:
            self.transform.transform_into(pixels, out, h_off, w_off, mirror)
        else:
            self.transform.crop_into(pixels, out, h_off, w_off, mirror)


def _named(exc: BaseException, dataset: LmdbDataset_train, key: Any, index: int) -> CaffeLmdbError:
    """An error met on one record, as one line naming the LMDB, the key and the index."""
    where = f"{dataset.root}: key {bytes(key)!r} (index {index})"
    if isinstance(exc, CaffeLmdbError):
        return type(exc)(f"{where}: {exc}")
    return LoaderError(f"{where}: {type(exc).__name__}: {exc}")


def _cause(exc: BaseException) -> BaseException | None:
    """What `_named`'s error is raised from: nothing for our own errors (the message says it all), else the
    original exception, whose traceback shows the bug in a transform."""
    return None if isinstance(exc, CaffeLmdbError) else exc


# --------------------------------------------------------------------------- shared memory and workers

def _gib(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB"


def _available_memory() -> int | None:
    """Bytes this process can still get: MemAvailable, capped by a cgroup v2 limit; None where neither is known."""
    sizes = []
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            line = next(line for line in f if line.startswith("MemAvailable:"))
        sizes.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                sizes.append(max(0, int(limit) - int(f.read())))
    if not sizes:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sizes.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(sizes) if sizes else None


def _anonymous_file(size: int, name: str) -> int:
    """A descriptor of `size` bytes of shared memory with no name anywhere: nothing to leak, even on SIGKILL."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    else:  # an unlinked temporary: no name left behind either
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryFile(dir=folder) as f:
            fd = os.dup(f.fileno())
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _SharedFd:
    """A descriptor handed to a worker: inherited through fork, duplicated into the child for spawn/forkserver."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        from multiprocessing import reduction

        return _SharedFd._rebuild, (reduction.DupFd(self.fd),)

    @staticmethod
    def _rebuild(dup: Any) -> _SharedFd:
        return _SharedFd(dup.detach())


def _worker_main(worker: int, conn: Any, shared: _SharedFd, layout: _Layout, maker: _BatchMaker,
                 inherited: Sequence[Any]) -> None:
    """A worker: receive (batch, slot, indices, epoch), fill the slot, answer (batch, slot, error or None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    for other in inherited:  # the main process's ends: holding them would keep those pipes open after it dies
        other.close()
    torch.set_num_threads(1)
    buffer = mmap.mmap(shared.fd, layout.total_bytes, flags=mmap.MAP_SHARED | _POPULATE)
    os.close(shared.fd)  # a forked worker's inherited copy, or a spawned one's own
    slots = [layout.views(buffer, slot) for slot in range(layout.slots)]
    try:
        while True:
            task = conn.recv()
            if task is None:
                return
            batch, slot, indices, epoch = task
            images, labels, params = slots[slot]
            try:
                maker.fill(indices, epoch, images, labels, params)
            except BaseException as exc:
                conn.send((batch, slot, _error_message(exc)))
            else:
                conn.send((batch, slot, None))
    except (EOFError, BrokenPipeError, ConnectionResetError, KeyboardInterrupt):
        return  # the main process is gone or stopping us


def _error_message(exc: BaseException) -> tuple[str, str, str, str]:
    """An exception as plain strings for the pipe (module, class, message, traceback): no objects are unpickled."""
    return type(exc).__module__, type(exc).__qualname__, str(exc), traceback.format_exc()


def _rebuild_error(message: tuple[str, str, str, str], worker: int) -> CaffeLmdbError:
    """A worker's error in the main process: the same caffe-lmdb class when it is one, else a LoaderError."""
    module, name, text, worker_traceback = message
    cls: type = LoaderError
    if module.startswith("caffe_lmdb."):
        import importlib

        with contextlib.suppress(ImportError, AttributeError):
            found = getattr(importlib.import_module(module), name)
            if isinstance(found, type) and issubclass(found, CaffeLmdbError):
                cls = found
    if cls is LoaderError and not (module == __name__ and name == "LoaderError"):
        text = f"{name}: {text}"
    try:
        error = cls(f"{text} (in loader worker {worker})")
    except Exception:  # a subclass with another constructor
        error = LoaderError(f"{name}: {text} (in loader worker {worker})")
    error.worker_traceback = worker_traceback  # the worker's own traceback, for debugging a transform
    return error


def _exit_reason(proc: Any) -> str:
    code = proc.exitcode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited (exit code {code})"


#: Map a ring with its pages in place (one call, not a page fault per 4 KiB); 0 where mmap lacks it.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class _Rings:
    """The batch slots of every worker, for the loader's lifetime: one anonymous shared-memory file per worker.

    Created once, with every page allocated up front (`MAP_POPULATE`), and kept from one epoch to
    the next even when the workers are not: a new epoch's workers map the same pages again.
    The files have no name (`memfd_create`), so nothing can be left behind: their memory goes
    with the last process that maps them or holds their descriptor.
    """

    def __init__(self, layout: _Layout, count: int, pin: bool) -> None:
        self.layout = layout
        self.fds: list[int] = []
        self.buffers: list[mmap.mmap] = []
        self.slots: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
        self._pinned: list[int] = []
        self._finalizer = weakref.finalize(self, _close_fds, self.fds)
        try:
            for worker in range(count):
                self.fds.append(_anonymous_file(layout.total_bytes, f"caffe-lmdb-loader-{worker}"))
                buffer = mmap.mmap(self.fds[-1], layout.total_bytes, flags=mmap.MAP_SHARED | _POPULATE)
                self.buffers.append(buffer)
                self.slots.append([layout.views(buffer, slot) for slot in range(layout.slots)])
            if pin:
                for buffer in self.buffers:
                    self._pinned.append(_host_register(buffer))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Unpin and unmap the slots (a slot a caller still holds stays mapped until it goes: safe)."""
        self.slots = []
        for address in self._pinned:
            _host_unregister(address)
        self._pinned = []
        for buffer in self.buffers:
            with contextlib.suppress(BufferError):
                buffer.close()
        self.buffers = []
        self._finalizer()


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


class _WorkerPool:
    """`num_workers` processes, worker k filling the slots of ring k."""

    def __init__(self, maker: _BatchMaker, rings: _Rings, context: Any) -> None:
        self.rings = rings
        self.slots = rings.slots
        self.procs: list[Any] = []
        self.conns: list[Any] = []
        self.free: list[deque[int]] = [deque(range(rings.layout.slots)) for _ in rings.fds]
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.conns)  # at exit, or when dropped
        fork = context.get_start_method() == "fork"

        def worker_args(worker: int, there: Any, inherited: list) -> tuple:
            return (worker, there, _SharedFd(rings.fds[worker]), rings.layout, maker, inherited if fork else [])

        try:
            start_processes(context, len(rings.fds), "caffe-lmdb-loader", _worker_main, worker_args, self.procs,
                            self.conns)
        except BaseException:
            self.close()
            raise

    def submit(self, worker: int, batch: int, indices: Sequence[int], epoch: int) -> int:
        slot = self.free[worker].popleft()
        try:
            self.conns[worker].send((batch, slot, list(indices), epoch))
        except OSError:
            self.free[worker].appendleft(slot)
            raise
        return slot

    def receive(self, worker: int, timeout: float | None) -> tuple[int, int, Any] | str:
        """The worker's next answer; "died" when it exited first, "timeout" when `timeout` passed first."""
        conn, proc = self.conns[worker], self.procs[worker]
        ready = multiprocessing.connection.wait([conn, proc.sentinel], timeout)
        if conn in ready:
            with contextlib.suppress(EOFError, OSError):
                return conn.recv()
            return "died"
        return "died" if ready else "timeout"

    def close(self) -> None:
        """Stop the workers (the rings stay with the loader)."""
        self._finalizer()  # `_stop`, once


def _stop(procs: list[Any], conns: list[Any]) -> None:
    """Ask the workers to exit, then make sure they did: none is left behind, however the loop ended."""
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send(None)
        conn.close()
    deadline = time.monotonic() + 2
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():  # busy on a batch nobody will take: it would exit at its next send anyway
            proc.terminate()
            proc.join(1)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _host_register(buffer: mmap.mmap) -> int:
    """Pin a slot ring for fast, asynchronous copies to the GPU (`cudaHostRegister`); returns its address."""
    address = np.frombuffer(buffer, np.uint8).ctypes.data
    error = torch.cuda.cudart().cudaHostRegister(address, len(buffer), 1)  # 1: cudaHostRegisterPortable
    if int(error) != 0:
        raise LoaderError(f"cudaHostRegister of {len(buffer)} bytes of loader slots failed (CUDA error {int(error)})")
    return address


def _host_unregister(address: int) -> None:
    with contextlib.suppress(Exception):
        torch.cuda.cudart().cudaHostUnregister(address)


# --------------------------------------------------------------------------- the loader

class CaffeLoader:
    """Batches `(images, labels)` from Caffe Datum LMDBs, as Caffe's data layer makes them, for training.

    `images` is B x C x h x w in Datum channel order (BGR for colour, as Caffe's blob; RGB with
    `CaffeTransform(rgb=True)`), `labels` is B int64. With a transform
    (`caffe_lmdb.transform.CaffeTransform`), each sample is cropped and mirrored as its
    `params(height, width, seed, epoch, index)` says; `output="float32"` then applies the mean
    and scale (Caffe's data blob, the same bits as the transform gives each sample),
    `output="uint8"` leaves them to `normalize(batch)`, which gives the same float32 wherever
    the batch is (e.g. on the GPU, where a uint8 batch is a quarter of the bytes to copy).
    Without a transform, whole records (all of one shape) are loaded as uint8 or float32 as
    they are. Encoded records are decoded in the workers.

    Lifetime: the images tensor is a view on a shared-memory slot that is reused. It stays valid
    until the next batch is asked for (the next `next()` on the iterator, the next turn of the
    `for` loop); `.clone()` it to keep it longer. Labels are copies. With a GPU `device`, both are on
    the device and yours to keep. One iteration at a time: a new `iter()` ends the previous one.

    Epochs: every `iter()` is one epoch. The first is epoch 0 and each further `iter()` the next,
    unless `set_epoch(epoch)` says which (as with DistributedSampler; it is passed on to a
    sampler that has `set_epoch`). Crops, mirrors and the `shuffle` order depend on the seed and
    the epoch only.

    Args:
        source: an LMDB path, a list of them, or an `LmdbDataset_train` (or a `+` of them) made
            without a transform.
        batch_size: samples per batch.
        transform: the crop, mirror, mean and scale (see `BatchTransform`); None loads records whole.
        sampler: the indices to load, in order (e.g. `DistributedSampler`, `BlockShuffleSampler`).
        shuffle: without a sampler, a new random order each epoch (from seed and epoch).
        num_workers: processes assembling batches; 0 makes them in this process.
        drop_last: drop the last batch if it is short.
        seed: seed of the crops, mirrors and shuffle order.
        device: where batches are delivered (e.g. "cuda"); None keeps them on the CPU.
        pin_memory: pin the slots (`cudaHostRegister`), so that copies to the GPU run
            asynchronously; with `device` set, a pinned slot returns to its worker only once the
            copy from it finished.
        output: "float32" (Caffe's blob) or "uint8" (crops only; see `normalize`).
        multiprocessing_context: as DataLoader's: a start method name ("fork", "spawn",
            "forkserver") or a context; None uses multiprocessing's default.
        prefetch_factor: batches each worker prepares ahead; it owns this many slots plus one.
        persistent_workers: keep the worker processes from one epoch to the next (the slots are
            kept either way); leaving an epoch early then waits for the batches in flight.
        timeout: seconds to wait for one batch before failing; 0 waits as long as the workers live.

    Raises:
        ValueError: an argument is out of range, or a dataset carries its own transform.
        LmdbFormatError, CorruptLmdbError, KeysFileError, DatumError: as `LmdbDataset_train`, and
            for the first record, which sets the batch shape; during iteration, for any record,
            naming the LMDB and the key (and the worker).
        LoaderError: during iteration, the transform raised on a record, or a worker died; at the
            first batch, the batch slots would not fit in the memory available.
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        *,
        transform: BatchTransform | None = None,
        sampler: Sampler[int] | Sequence[int] | None = None,
        shuffle: bool = False,
        num_workers: int = 0,
        drop_last: bool = False,
        seed: int = 0,
        device: str | torch.device | None = None,
        pin_memory: bool = False,
        output: Output = "float32",
        multiprocessing_context: str | Any | None = None,
        prefetch_factor: int = 2,
        persistent_workers: bool = False,
        timeout: float = 0,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise InputError(f"num_workers must be >= 0, got {num_workers}")
        if prefetch_factor < 1:
            raise InputError(f"prefetch_factor must be >= 1, got {prefetch_factor}")
        if timeout < 0:
            raise InputError(f"timeout must be >= 0, got {timeout}")
        if output not in _OUTPUTS:
            raise InputError(f"output must be one of {', '.join(map(repr, _OUTPUTS))}, got {output!r}")
        if sampler is not None and shuffle:
            raise InputError("sampler and shuffle=True cannot be used together: the sampler decides the order")
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device={device!r} but CUDA is not available here (torch.cuda.is_available() is False)")
        if pin_memory and not torch.cuda.is_available():
            warnings.warn("pin_memory=True but CUDA is not available here: slots are not pinned", stacklevel=2)
            pin_memory = False
        self.parts = _parts(source)
        self.dataset = source if not isinstance(source, str | os.PathLike | Sequence) else (
            self.parts[0] if len(self.parts) == 1 else _concat(self.parts))
        self.batch_size = batch_size
        self.transform = transform
        self.sampler = sampler
        self.shuffle = shuffle
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.seed = seed
        self.pin_memory = pin_memory
        self.output = output
        self.prefetch_factor = prefetch_factor
        self.persistent_workers = persistent_workers
        self.timeout = timeout
        if isinstance(multiprocessing_context, str) or multiprocessing_context is None:
            multiprocessing_context = multiprocessing.get_context(multiprocessing_context)
        self.multiprocessing_context = multiprocessing_context
        maker = _BatchMaker(self.parts, transform, seed, output, (0, 0, 0))
        if not len(maker):
            raise LmdbFormatError(f"{self.parts[0].root}: no records to load")
        first = maker.first_pixels_shape()
        #: C x h x w of every sample: the first record's, cropped by the transform.
        self.sample_shape = first if transform is None else tuple(transform.output_shape(*first))
        maker.sample_shape = self.sample_shape
        self._maker = maker
        #: Rows of each batch slot: what the longest batch so far needs (`_slot_rows`), set by `__iter__`.
        self._rows = 0
        self._epoch = 0
        self._epoch_set = False
        self._pool: _WorkerPool | None = None
        self._rings: _Rings | None = None
        self._local: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._iterator: weakref.ref[_BatchIterator] | None = None
        self._last_offsets: torch.Tensor | None = None

    # ------------------------------------------------------------ epochs and order

    @property
    def epoch(self) -> int:
        """The epoch of the current (or next) iteration."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next `iter()` epoch `epoch` (passed on to the sampler's `set_epoch`, if any)."""
        self._epoch = int(epoch)
        self._epoch_set = True
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self._epoch)

    def _order(self) -> list[int]:
        if self.sampler is not None:
            return [int(i) for i in self.sampler]
        if self.shuffle:
            return np.random.default_rng([self.seed, self._epoch]).permutation(len(self._maker)).tolist()
        return list(range(len(self._maker)))

    def _size(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self._maker)

    def __len__(self) -> int:
        """Batches per epoch."""
        size = self._size()
        return size // self.batch_size if self.drop_last else -(-size // self.batch_size)

    # ------------------------------------------------------------ iterating

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        previous = self._iterator() if self._iterator is not None else None
        if previous is not None:
            previous.close()  # one live iterator: its slots are about to be reused
        if self._epoch_set:
            self._epoch_set = False
        elif self._iterator is not None:
            self._epoch += 1
            if hasattr(self.sampler, "set_epoch"):
                self.sampler.set_epoch(self._epoch)
        order = self._order()
        size = len(self._maker)
        bad = next((i for i in order if not 0 <= i < size), None)
        if bad is not None:
            raise IndexError(f"the sampler gave index {bad}, out of range for the {size} records of "
                             f"{', '.join(part.root for part in self.parts)}")
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        batches = [order[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]
        rows = self._slot_rows(len(batches[0]) if batches else 0)  # the first batch is the longest
        if rows > self._rows:  # only the first epoch, or a sampler that grew: slots are made (again) for it
            self._free_slots()
            self._rows = rows
        iterator = _BatchIterator(self, batches, self._epoch)
        self._iterator = weakref.ref(iterator)
        return iterator

    def _slot_rows(self, samples: int) -> int:
        """Rows a batch slot needs for a batch of `samples` samples (the first batch of an epoch: the longest).

        Batches are consecutive runs of `batch_size` samples of the epoch's order, the last one
        short (no wrap-around into the next epoch), so none is longer than the epoch: a
        `batch_size` of 100,000 over 300 records (or 300 per rank) needs slots of 300 rows, not
        100,000. The batches are the same either way.
        """
        return max(1, min(self.batch_size, samples))

    def _layout(self) -> _Layout:
        dtype = "float32" if self.output == "float32" else "uint8"
        slots = self.prefetch_factor + 1 if self.num_workers else 1
        return _Layout(self._rows, self.sample_shape, dtype, slots)

    def _check_memory(self, layout: _Layout, rings: int) -> None:
        """Refuse, in one line, slots that cannot fit in the memory available (before allocating any).

        Raises:
            LoaderError: `rings` rings of `layout` need more bytes than `_available_memory` gives.
        """
        needed, available = layout.total_bytes * rings, _available_memory()
        if available is None or needed <= available:
            return
        roots = ", ".join(part.root for part in self.parts)
        raise LoaderError(
            f"{roots}: batches of {layout.batch_size} x {'x'.join(map(str, layout.sample_shape))} {layout.dtype} "
            f"samples need {_gib(needed)} of loader slots ({rings} ring(s) of {layout.slots} slot(s) of "
            f"{layout.slot_bytes / 2**10:,.0f} KiB), more than the {_gib(available)} of memory available: "
            "lower batch_size, num_workers or prefetch_factor"
        )

    def _free_slots(self) -> None:
        """Drop every slot (and the workers that map them), so the next batch allocates them anew."""
        self.close()
        self._local = None

    def _workers(self) -> _WorkerPool:
        if self._rings is None:
            self._check_memory(self._layout(), self.num_workers)
            self._rings = _Rings(self._layout(), self.num_workers, self.pin_memory)
        if self._pool is None:
            self._pool = _WorkerPool(self._maker, self._rings, self.multiprocessing_context)
        return self._pool

    def _local_slot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._local is None:
            layout = self._layout()
            self._check_memory(layout, 1)
            if self.pin_memory:
                buffer = torch.empty(layout.slot_bytes, dtype=torch.uint8, pin_memory=True).numpy()
            else:
                buffer = np.empty(layout.slot_bytes, np.uint8)
            self._local = layout.views(buffer, 0)
        return self._local

    def _release_pool(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # ------------------------------------------------------------ normalizing uint8 batches

    @property
    def last_offsets(self) -> torch.Tensor | None:
        """The latest batch's (h_off, w_off, mirror) per sample, B x 3 int32: what `normalize` needs for a mean file."""
        return self._last_offsets

    def normalize(self, batch: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 blob of a uint8 batch from this loader, on the batch's device: mean and scale applied.

        Gives the same values as `output="float32"`. A mean file is cropped and mirrored per sample,
        so the batch's offsets are needed: by default those of the latest batch this loader gave
        (`last_offsets`); pass them explicitly for an older batch.
        """
        offsets = self._last_offsets if offsets is None else offsets
        if self.transform is None:
            return batch.to(torch.float32)
        if offsets is None or len(offsets) != len(batch):
            have = "none" if offsets is None else len(offsets)
            raise ValueError(f"normalize: the batch has {len(batch)} samples but the offsets given are for {have} "
                             "(pass the offsets of this batch: loader.last_offsets right after it arrived)")
        return self.transform.normalize(batch, offsets)

    def close(self) -> None:
        """Stop the workers and free the slots now (also done when the loader is garbage collected).

        A batch still referenced keeps its own slot's memory until it goes; the loader can be
        iterated again afterwards (new workers, new slots).
        """
        previous = self._iterator() if self._iterator is not None else None
        if previous is not None:
            previous.close()
        self._release_pool()
        if self._rings is not None:
            self._rings.close()
            self._rings = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        roots = ", ".join(part.root for part in self.parts)
        lines = [f"Number of datapoints: {len(self._maker)}", f"Root location: {roots}",
                 f"Batch size: {self.batch_size}, batches per epoch: {len(self)}",
                 f"Sample shape: {'x'.join(map(str, self.sample_shape))} ({self.output})",
                 f"Workers: {self.num_workers}"]
        if self.transform is not None:
            lines.append(f"Transform: {self.transform!r}")
        return "\n".join([f"Loader {type(self).__name__}"] + ["    " + line for line in lines])


def _concat(parts: list[LmdbDataset_train]) -> Any:
    from .dataset import LmdbConcatDataset

    return LmdbConcatDataset(parts)


class _BatchIterator:
    """One epoch of a `CaffeLoader`: keeps every worker's ring busy, yields the batches in order."""

    def __init__(self, loader: CaffeLoader, batches: list[list[int]], epoch: int) -> None:
        self.loader = loader
        self.batches = batches
        self.epoch = epoch
        self.next_batch = 0
        self.sent = 0
        self.pool: _WorkerPool | None = None
        self.held: tuple[int, int, Any] | None = None  # (worker, slot, CUDA event) of the batch handed out
        self.inflight: dict[int, tuple[int, int]] = {}
        self.closed = False
        self.device = loader.device
        self.non_blocking = loader.pin_memory and self.device is not None and self.device.type == "cuda"

    def __iter__(self) -> _BatchIterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.closed:
            raise StopIteration
        try:
            self._release_held()
            if self.next_batch >= len(self.batches):
                self._finish()
                raise StopIteration
            batch = self.next_batch
            indices = self.batches[batch]
            if self.loader.num_workers == 0:
                images, labels, params = self.loader._local_slot()
                self.loader._maker.fill(indices, self.epoch, images, labels, params)
                worker = slot = -1
            else:
                worker, slot = self._from_worker(batch)
                images, labels, params = self.pool.slots[worker][slot]
            self.next_batch += 1
            return self._deliver(worker, slot, images, labels, params, len(indices))
        except StopIteration:
            raise
        except BaseException:
            self.close()
            raise

    def _from_worker(self, batch: int) -> tuple[int, int]:
        if self.pool is None:
            self.pool = self.loader._workers()
        pool, workers = self.pool, self.loader.num_workers
        while self.sent < len(self.batches) and pool.free[self.sent % workers]:
            worker = self.sent % workers
            try:
                slot = pool.submit(worker, self.sent, self.batches[self.sent], self.epoch)
            except OSError:  # its end of the pipe is closed: it died
                raise self._died(worker, self.sent) from None
            self.inflight[self.sent] = (worker, slot)
            self.sent += 1
        worker = batch % workers
        timeout = self.loader.timeout or None
        answer = pool.receive(worker, timeout)
        if answer == "timeout":
            proc = pool.procs[worker]
            raise LoaderError(f"loader worker {worker} (pid {proc.pid}) took more than {self.loader.timeout} s "
                              f"on {self._describe(batch)}")
        if answer == "died":
            raise self._died(worker, batch)
        done, slot, error = answer
        del self.inflight[done]
        if done != batch:
            raise LoaderError(f"loader worker {worker} answered batch {done} when batch {batch} was due")
        if error is not None:
            pool.free[worker].append(slot)
            raise _rebuild_error(error, worker)
        return worker, slot

    def _describe(self, batch: int) -> str:
        indices = self.batches[batch]
        return (f"batch {batch} of epoch {self.epoch} ({len(indices)} samples; its first is "
                f"{self.loader._maker.describe(indices[0])})")

    def _died(self, worker: int, batch: int) -> LoaderError:
        proc = self.pool.procs[worker]
        proc.join(1)  # its pipes close as it exits, a moment before it can be reaped
        return LoaderError(f"loader worker {worker} (pid {proc.pid}) {_exit_reason(proc)} while making "
                           f"{self._describe(batch)}")

    def _deliver(self, worker: int, slot: int, images: np.ndarray, labels: np.ndarray, params: np.ndarray,
                 count: int) -> tuple[torch.Tensor, torch.Tensor]:
        images_t = torch.from_numpy(images[:count])
        labels_t = torch.from_numpy(labels[:count].copy())
        self.loader._last_offsets = torch.from_numpy(params[:count].copy())
        event = None
        if self.device is not None and self.device.type != "cpu":
            images_t = images_t.to(self.device, non_blocking=self.non_blocking)
            labels_t = labels_t.to(self.device, non_blocking=self.non_blocking)
            if self.device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
        self.held = (worker, slot, event)
        return images_t, labels_t

    def _release_held(self) -> None:
        """The consumer asked for the next batch: the slot of the previous one may be reused."""
        if self.held is None:
            return
        worker, slot, event = self.held
        self.held = None
        if event is not None:
            event.synchronize()  # a copy to the GPU may still be reading the slot
        if worker >= 0 and self.pool is not None:
            self.pool.free[worker].append(slot)

    def _finish(self) -> None:
        self.closed = True
        if self.pool is not None and not self.loader.persistent_workers:
            self.loader._release_pool()
        self.pool = None

    def close(self) -> None:
        """End the epoch early: stop the workers (a persistent pool is kept when it can be drained)."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self._release_held()
        pool, self.pool = self.pool, None
        if pool is None:
            return
        if self.loader.persistent_workers and self._drain(pool):
            return
        if self.loader._pool is pool:
            self.loader._release_pool()
        else:
            pool.close()

    def _drain(self, pool: _WorkerPool) -> bool:
        """Take the answers of the batches still in flight, so the pool can serve the next epoch."""
        for batch in sorted(self.inflight):
            worker, _ = self.inflight[batch]
            answer = pool.receive(worker, self.loader.timeout or 60)
            if isinstance(answer, str) or answer[2] is not None:
                return False
            pool.free[worker].append(answer[1])
        self.inflight.clear()
        return True

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __len__(self) -> int:
        return len(self.batches)
