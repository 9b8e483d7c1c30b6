"""The batch workers of `CaffeLoader`: a batch made into a reused shared-memory slot, in this process or a worker.

`BatchMaker.fill` reads a batch's records through LMDB's memory map and copies each sample's crop,
mirrored if drawn, straight into a slot (one copy per sample). `Rings` holds each worker's ring
of `prefetch_factor + 1` slots in one anonymous shared-memory file (`memfd_create`: never a name
in `/dev/shm`, so nothing is left behind, even on SIGKILL), allocated once with all its pages and
kept for the loader's life. `WorkerPool` runs the worker processes: each receives (batch, slot,
indices, epoch), fills the slot, and answers with the slot or its error as plain strings, which
`rebuild_error` turns back into the same caffe-lmdb error class in the main process. Workers
ignore Ctrl-C and exit when their pipe closes.
"""

from __future__ import annotations

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
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from .batch_sources import LayoutSource, Record, error_cause, named_error, record_source
from .datum import DatumView, record_planes
from .errors import CaffeLmdbError, DatumError, InputError, LoaderError, TransformError
from .reader import PartIndex
from .resized_crop import RandomResizedCrop, ResizeCenterCrop
from .transform import CaffeTransform
from .workers import start_processes

Output = Literal["float32", "uint8"]


class BatchTransform(Protocol):
    """What `CaffeLoader` needs of a transform; `caffe_lmdb.transform.CaffeTransform` is one.

    `params` draws a sample's crop and mirror from (seed, epoch, index) alone, so that any worker
    makes the same sample, and `batch_params` draws a whole batch's at once (raising
    `TransformError` for a record smaller than the crop); `check_shape` refuses the first record
    (what fixes the batch shape) as Caffe would; `record_pixels` decodes a record (`force_color`,
    `force_gray`); `crop_into` copies the crop into a uint8 batch; `transform_into` makes a
    record's float32 output in one pass (`output="float32"`); `normalize` applies the mean and scale
    to a whole uint8 batch, given each sample's (h_off, w_off, mirror). `CaffeLoader` checks once,
    when it is made, that its transform has every one of these (`missing_methods`).

    A transform with a `params_width` attribute (`resized_crop.RandomResizedCrop`: 5, its box and
    mirror) draws that many values per sample instead of three; its `crop_into` and
    `transform_into` take them all after `out`, and `record_pixels` may return a stand-in with
    `shape` and `dtype` (`jpeg_scaled.JpegRecord`) that only `crop_into` decodes.
    """

    def output_shape(self, channels: int, height: int, width: int) -> tuple[int, int, int]: ...

    def check_shape(self, channels: int, height: int, width: int) -> None: ...

    def params(self, height: int, width: int, seed: int, epoch: int, index: int) -> tuple[int, int, bool]: ...

    def batch_params(self, height: Any, width: Any, seed: int, epoch: int, indices: Any) -> np.ndarray: ...

    def record_pixels(self, record: Any) -> np.ndarray: ...

    def crop_into(self, pixels: np.ndarray, out: np.ndarray, h_off: int, w_off: int, do_mirror: bool) -> Any: ...

    def transform_into(self, record: Any, out: Any, h_off: int, w_off: int, do_mirror: bool) -> Any: ...

    def normalize(self, batch: torch.Tensor, offsets: Any) -> torch.Tensor: ...


#: The methods of `BatchTransform`, which a loader's transform must all have.
_METHODS = ("output_shape", "check_shape", "params", "batch_params", "record_pixels", "crop_into",
            "transform_into", "normalize")


def missing_methods(transform: Any) -> list[str]:
    """The `BatchTransform` methods `transform` lacks (none for a `CaffeTransform`)."""
    return [name for name in _METHODS if not callable(getattr(transform, name, None))]


# --------------------------------------------------------------------------- reading one batch

@dataclass(frozen=True)
class SlotLayout:
    """Where a batch's images, labels and per-sample params lie in a slot; slots are page-aligned.

    `batch_size` is the rows of a slot: the longest batch an epoch makes, which is less than the
    loader's `batch_size` when an epoch has fewer samples (`CaffeLoader._slot_rows`).
    """

    batch_size: int
    sample_shape: tuple[int, int, int]
    dtype: str
    slots: int
    #: int32 values per sample's params: 3 for Caffe's (h_off, w_off, mirror), 5 for a resized crop's box.
    params_width: int = 3

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
        end = self.params_at + self.batch_size * self.params_width * 4
        return -(-end // mmap.PAGESIZE) * mmap.PAGESIZE

    @property
    def total_bytes(self) -> int:
        return self.slot_bytes * self.slots

    def views(self, buffer: Any, slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images B x C x h x w, labels B int64, params B x `params_width` int32) of `slot` in `buffer`."""
        base = slot * self.slot_bytes
        count = math.prod(self.sample_shape) * self.batch_size
        images = np.frombuffer(buffer, self.dtype, count, base).reshape(self.batch_size, *self.sample_shape)
        labels = np.frombuffer(buffer, np.int64, self.batch_size, base + self.labels_at)
        width = self.params_width
        params = np.frombuffer(buffer, np.int32, self.batch_size * width, base + self.params_at).reshape(-1, width)
        return images, labels, params


class BatchMaker:
    """Fills a batch slot from dataset indices: what the main process (num_workers=0) and every worker run.

    Each part reads its samples through its record source (`batch_sources`: Caffe Datums with the
    raw fast path, or another layout with int labels); the crop, mirror and mean are the same for
    all. Picklable for spawned workers: the datasets pickle without their environments (each
    process opens its own, see `LmdbDataset_train`), and the transform must pickle too.
    """

    def __init__(self, parts: list[Any], transform: BatchTransform | None, seed: int,
                 output: Output, sample_shape: tuple[int, int, int]) -> None:
        self.parts = parts
        #: Per part: how its samples are read (`batch_sources.record_source`).
        self.sources = [record_source(part) for part in parts]
        self.index = PartIndex([len(part) for part in parts])  # where a dataset index lies among the parts
        self.transform = transform
        self.seed = seed
        self.output = output
        self.sample_shape = sample_shape
        self._one_pass = output == "float32" and transform is not None
        self._scratch: np.ndarray | None = None  # the uint8 crops of a float32 batch, before normalize
        #: Raw records skip the full parse only where reading them is known to be plain: Caffe's own
        #: decoding and the resized crops' (a custom transform may treat raw records its own way).
        self.raw_fast_path = transform is None or type(transform) in (CaffeTransform, RandomResizedCrop,
                                                                      ResizeCenterCrop)
        #: Values per sample's params: (h_off, w_off, mirror), or what the transform's `params_width` says.
        self.params_width = int(getattr(transform, "params_width", 3))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_scratch": None}

    def __len__(self) -> int:
        return len(self.index)

    def check_targets(self) -> None:
        """Refuse, in one line, a layout part whose targets are not int labels (its first sample's, read now).

        Raises:
            InputError: naming the LMDB and what its targets are ("crnn targets are text: ...").
        """
        for source in self.sources:
            if isinstance(source, LayoutSource):
                source.check_target()

    def describe(self, index: int) -> str:
        """`LMDB: key b'...' (index i)`: where a dataset index is read from."""
        try:
            part, local = self.index.locate(index)
        except IndexError as exc:
            return str(exc)
        return f"{self.parts[part].root}: key {self.sources[part].key(local)!r} (index {index})"

    def first_pixels_shape(self) -> tuple[int, int, int]:
        """The C x H x W of the first record (decoded if encoded): what fixes the batch shape."""
        number, source = next((i, source) for i, source in enumerate(self.sources) if len(source))
        dataset = source.dataset
        with dataset.reader.environment().begin(buffers=True) as txn:
            key, pixels = source.first_pixels(txn, self)  # a missing key: KeysFileError naming the LMDB and key
            try:
                shape = tuple(pixels().shape)
                if self.transform is not None:  # crop bigger than the record, mean of another size
                    self.transform.check_shape(*shape)
                return shape
            except CaffeLmdbError as exc:
                where = f"{dataset.root}: key {bytes(key)!r} (index {self.index.starts[number]})"
                raise type(exc)(f"{where}: {exc}") from None

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
        for part, positions, locals_, part_indices in self.index.group(indices):
            dataset = self.parts[part]
            with dataset.reader.environment().begin(buffers=True) as txn:
                records = self.sources[part].records(txn, locals_, part_indices, self)
                draws = self._draws(records, part_indices, epoch, dataset)
                copy = self._copy
                for position, index, (key, _, pixels), draw in zip(positions, part_indices, records, draws,
                                                                   strict=True):
                    try:
                        copy(pixels, pixels_out[position], draw)
                    except Exception as exc:
                        raise named_error(exc, dataset, key, index) from error_cause(exc)
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

    def decode(self, view: DatumView) -> np.ndarray:
        """A record's C x H x W pixels: as the transform decodes them (force_color, force_gray), or as Caffe does."""
        return record_planes(view) if self.transform is None else self.transform.record_pixels(view)

    def check(self, pixels: np.ndarray) -> None:
        """Refuse pixels that do not make a sample of this loader's shape and output (a DatumError)."""
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

    def _draws(self, records: list[Record], indices: list[int], epoch: int, dataset: Any) -> np.ndarray:
        """Each record's params ((h_off, w_off, mirror) or wider), drawn for all at once when the transform can."""
        draws = np.zeros((len(records), self.params_width), np.int64)
        transform = self.transform
        if transform is None or not records:
            return draws
        heights = np.array([pixels.shape[1] for _, _, pixels in records])
        widths = np.array([pixels.shape[2] for _, _, pixels in records])
        try:
            return np.asarray(transform.batch_params(heights, widths, self.seed, epoch, indices), np.int64)
        except TransformError:
            pass  # a record smaller than the crop: drawn one at a time below, to name it
        except Exception as exc:
            raise named_error(exc, dataset, records[0][0], indices[0], f"drawing the crops of the batch of "
                                                                  f"{len(records)} from it") from error_cause(exc)
        for row, (height, width, index) in enumerate(zip(heights.tolist(), widths.tolist(), indices, strict=True)):
            try:
                drawn = transform.params(height, width, self.seed, epoch, index)
            except Exception as exc:
                raise named_error(exc, dataset, records[row][0], index) from error_cause(exc)
            draws[row] = [*drawn[:-1], int(bool(drawn[-1]))]
        return draws

    def _copy(self, pixels: np.ndarray, out: np.ndarray, draw: np.ndarray) -> None:
        """One record into its batch row: whole, or cropped and mirrored (with mean and scale for float32)."""
        if self.transform is None:
            out[...] = pixels
            return
        if self.params_width != 3:  # a resized crop's (top, left, height, width, mirror)
            kernel = self.transform.transform_into if self._one_pass else self.transform.crop_into
            kernel(pixels, out, *draw.tolist())
            return
        h_off, w_off, mirror = int(draw[0]), int(draw[1]), bool(draw[2])
        if self._one_pass:
            self.transform.transform_into(pixels, out, h_off, w_off, mirror)
        else:
            self.transform.crop_into(pixels, out, h_off, w_off, mirror)


# --------------------------------------------------------------------------- shared memory and workers

def gib(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB"


def available_memory() -> int | None:
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


def _worker_main(worker: int, conn: Any, shared: _SharedFd, layout: SlotLayout, maker: BatchMaker,
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


def rebuild_error(message: tuple[str, str, str, str], worker: int) -> CaffeLmdbError:
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


def exit_reason(proc: Any) -> str:
    code = proc.exitcode
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited (exit code {code})"


#: Map a ring with its pages in place (one call, not a page fault per 4 KiB); 0 where mmap lacks it.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


class Rings:
    """The batch slots of every worker, for the loader's lifetime: one anonymous shared-memory file per worker.

    Created once, with every page allocated up front (`MAP_POPULATE`), and kept from one epoch to
    the next even when the workers are not: a new epoch's workers map the same pages again.
    The files have no name (`memfd_create`), so nothing can be left behind: their memory goes
    with the last process that maps them or holds their descriptor.
    """

    def __init__(self, layout: SlotLayout, count: int, pin: bool) -> None:
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


@dataclass(frozen=True)
class WorkerOptions:
    """How `CaffeLoader` runs its worker processes (with `num_workers` > 0); the defaults are DataLoader's.

    Attributes:
        multiprocessing_context: as DataLoader's: a start method name ("fork", "spawn",
            "forkserver") or a context; None uses multiprocessing's default.
        prefetch_factor: batches each worker prepares ahead; it owns this many slots plus one.
        persistent_workers: keep the worker processes from one epoch to the next (the slots are
            kept either way); leaving an epoch early then waits for the batches in flight.
        timeout: seconds to wait for one batch before failing; 0 waits as long as the workers live.

    Raises:
        InputError: `prefetch_factor` < 1 or `timeout` < 0.
    """

    multiprocessing_context: str | Any | None = None
    prefetch_factor: int = 2
    persistent_workers: bool = False
    timeout: float = 0

    def __post_init__(self) -> None:
        if self.prefetch_factor < 1:
            raise InputError(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.timeout < 0:
            raise InputError(f"timeout must be >= 0, got {self.timeout}")


class WorkerPool:
    """`num_workers` processes, worker k filling the slots of ring k."""

    def __init__(self, maker: BatchMaker, rings: Rings, context: Any) -> None:
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

