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
* Resuming. `state_dict()` is the epoch and the samples of it handed to the user (counted as each
  batch is delivered, never what the workers made ahead), with what a resume must match (the
  LMDBs' identities, batch size, seed, transform); `load_state_dict` makes the next `iter()` go on
  from there, slicing the epoch's order, so no skipped record is read (`loader_state.py`).
* Clean failure. The main process waits on each worker's pipe and its process sentinel at once:
  a worker that raises, or dies (SIGKILL, out of memory), ends the loop with one error naming the
  worker, the LMDB and the key, never a hang. Workers ignore Ctrl-C (the main process handles it)
  and exit when their pipe closes, so leaving the loop, an error, or the main process dying
  stops them all.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Sampler

from .batch_workers import (
    BatchMaker,
    BatchTransform,
    Output,
    Rings,
    SlotLayout,
    WorkerOptions,
    WorkerPool,
    available_memory,
    exit_reason,
    gib,
    missing_methods,
    rebuild_error,
)
from .dataset import LmdbDataset_train
from .errors import CaffeLmdbError, InputError, LmdbFormatError, LoaderError
from .layouts import Layout
from .lmdb_dataset import LmdbDataset
from .loader_state import (
    STATE_FORMAT,
    STATE_VERSION,
    EpochProgress,
    check_position,
    check_state,
    lmdb_identity,
    sampler_identity,
    sampler_name,
    transform_identity,
)
from .reader import detected_layout
from .samplers import ResumableSampler
from .tool_reading import keys_file_for

_OUTPUTS = ("float32", "uint8")


# --------------------------------------------------------------------------- reading one batch

def _parts(source: Any) -> list[LmdbDataset_train | LmdbDataset]:
    """The datasets of a source, in index order: `ds1 + ds2` and `open_tree`'s trees (nested too) are flattened.

    `LmdbDataset_train`s are read as Caffe Datums; `LmdbDataset`s through their layout (int
    labels only: `BatchMaker.check_targets`).
    """
    if isinstance(source, LmdbDataset):
        for name in ("transform", "target_transform"):
            if getattr(source, name) is not None:
                raise InputError(
                    f"{source.root}: CaffeLoader reads the records itself; a dataset with a {name} would be "
                    f"ignored: create it without one (give the crop and mean to CaffeLoader's transform)"
                )
        return [source]
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
        layout = _other_layout(source)
        if layout is not None:
            return [LmdbDataset(source, layout)]  # detected once: the instance is used as it is
        return [LmdbDataset_train(source, keys_path=keys_file_for(source))]
    if isinstance(source, Sequence) and source:
        return [part for item in source for part in _parts(item)]
    raise TypeError(
        "source must be an LMDB path, a list of them, or an LmdbDataset_train or LmdbDataset (or a sum of them), "
        f"got {type(source).__name__}"
    )


def _other_layout(path: str | os.PathLike) -> Layout | None:
    """The layout of a path's LMDB when it is not Caffe's Datums (LSUN, tensorpack, ...), else None.

    Anything that fails detection is read as Datums, so that `LmdbDataset_train` says what is wrong.
    """
    try:
        layout = detected_layout(path)
    except CaffeLmdbError:
        return None
    return None if layout.name == "datum" else layout


# --------------------------------------------------------------------------- the loader

class CaffeLoader:
    """Batches `(images, labels)` from Caffe Datum (or other int-labelled image) LMDBs, as Caffe's data layer does.

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
    the epoch only, so `state_dict()` (the epoch, the samples received) and `load_state_dict`
    resume mid-epoch with the same batches, byte for byte, by slicing the epoch's order.

    Args:
        source: an LMDB path (Caffe Datums, or any layout `LmdbDataset` detects), a list of them,
            an `LmdbDataset_train`, an `LmdbDataset` of any layout whose targets are int labels
            (the image is read as a Datum holding it would be: the same batches), a `+` of these,
            or an `open_tree`; each made without a transform.
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
        worker_options: the start method, prefetch factor, persistent workers and timeout of the
            worker processes (`WorkerOptions`; None: its defaults, DataLoader's).

    Raises:
        ValueError: an argument is out of range, or a dataset carries its own transform.
        TypeError: the transform lacks a `BatchTransform` method, or `worker_options` is not a `WorkerOptions`.
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
        worker_options: WorkerOptions | None = None,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise InputError(f"num_workers must be >= 0, got {num_workers}")
        if worker_options is None:
            worker_options = WorkerOptions()
        elif not isinstance(worker_options, WorkerOptions):
            raise TypeError(f"worker_options must be a WorkerOptions, got {type(worker_options).__name__}")
        if output not in _OUTPUTS:
            raise InputError(f"output must be one of {', '.join(map(repr, _OUTPUTS))}, got {output!r}")
        if sampler is not None and shuffle:
            raise InputError("sampler and shuffle=True cannot be used together: the sampler decides the order")
        missing = [] if transform is None else missing_methods(transform)
        if missing:
            raise TypeError(f"transform: a {type(transform).__name__} has no {', '.join(missing)}; CaffeLoader "
                            "needs every BatchTransform method (caffe_lmdb.transform.CaffeTransform has them all)")
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
        self.worker_options = worker_options
        self.prefetch_factor = worker_options.prefetch_factor
        self.persistent_workers = worker_options.persistent_workers
        self.timeout = worker_options.timeout
        context = worker_options.multiprocessing_context
        if isinstance(context, str) or context is None:
            context = multiprocessing.get_context(context)
        self.multiprocessing_context = context
        maker = BatchMaker(self.parts, transform, seed, output, (0, 0, 0))
        if not len(maker):
            raise LmdbFormatError(f"{self.parts[0].root}: no records to load")
        maker.check_targets()  # a layout of text (or no) targets: one line now, not at the first batch
        first = maker.first_pixels_shape()
        #: C x h x w of every sample: the first record's, cropped by the transform.
        self.sample_shape = first if transform is None else tuple(transform.output_shape(*first))
        maker.sample_shape = self.sample_shape
        self._maker = maker
        #: Rows of each batch slot: what the longest batch so far needs (`_slot_rows`), set by `__iter__`.
        self._rows = 0
        self._epoch = 0
        self._epoch_set = False
        self._pool: WorkerPool | None = None
        self._rings: Rings | None = None
        self._local: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._iterator: weakref.ref[_BatchIterator] | None = None
        self._last_offsets: torch.Tensor | None = None
        self._progress: EpochProgress | None = None  # the latest iteration's position, kept after it ends
        self._resume: tuple[int, int] | None = None  # (epoch, received) loaded, for the next iter()
        self._identity: dict[str, Any] | None = None  # what a state is checked against, made once

    # ------------------------------------------------------------ epochs and order

    @property
    def epoch(self) -> int:
        """The epoch of the current (or next) iteration."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next `iter()` epoch `epoch` (passed on to the sampler's `set_epoch`, if any).

        After `load_state_dict`, the saved epoch keeps its saved position; another epoch starts whole.
        """
        self._epoch = int(epoch)
        self._epoch_set = True
        if self._resume is not None and self._resume[0] != self._epoch:
            self._resume = None
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

    # ------------------------------------------------------------ resuming

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the data, as plain Python values: save it with the model, resume with `load_state_dict`.

        The epoch and the samples of it the user has received (batches handed out, never what
        workers made ahead), the sampler's own state when it is a caffe-lmdb sampler, the rank and
        rank count, and what `load_state_dict` checks (each LMDB's name, record count and key
        fingerprint, batch size, drop_last, shuffle, seed, the transform's parameters). After the
        last batch of an epoch the state is that epoch with every sample received (resuming gives
        an empty rest of it); once the iteration has ended (StopIteration), it is the start of the
        next epoch, or of the one `set_epoch` chose. Costs microseconds (the LMDB fingerprints are
        made once per loader); nothing is read.
        """
        sampler = self.sampler
        sampler_state: dict[str, Any] | None = None
        if self._resume is not None:  # loaded, not started: the loaded position
            epoch, received = self._resume
            if isinstance(sampler, ResumableSampler):
                sampler_state = sampler.state_dict()
        else:
            progress = self._progress
            if progress is None or self._epoch_set:
                epoch, received, delivered = self._epoch, 0, None
            elif progress.finished:
                epoch, received, delivered = progress.epoch + 1, 0, None
            else:
                epoch, received, delivered = progress.epoch, progress.start + progress.delivered, progress.delivered
            if isinstance(sampler, ResumableSampler):
                if delivered is None:  # the start of `epoch`
                    sampler_state = {**sampler.state_dict(), "epoch": epoch, "received": 0, "earlier": []}
                else:
                    sampler_state = sampler.state_dict(received=delivered)
        if sampler_state is not None:
            received = sampler_state["received"]  # its position in the current layout of ranks
        elif sampler is not None:
            sampler_state = sampler_identity(sampler)
        identity = self._checked_identity()
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch, "received": received,
                **identity, "lmdbs": [dict(entry) for entry in identity["lmdbs"]],
                "transform": None if identity["transform"] is None else dict(identity["transform"]),
                "rank": int(getattr(sampler, "rank", 0)), "world_size": int(getattr(sampler, "num_replicas", 1)),
                "sampler": sampler_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Make the next `iter()` continue where `state` (from `state_dict`) was: the same batches, byte for byte.

        The next `iter()` is the saved epoch from the saved sample on (the skipped samples are
        never read: the epoch's order is sliced), whatever `num_workers` was and is; the `iter()`s
        after it are the following epochs, as in the uninterrupted run. The state applies to the
        next `iter()` after loading, always: an iterator made before (say by a framework) does not
        restart the epoch at 0 silently: an iteration still live is ended, and asking it for
        another batch raises `LoaderError`. `set_epoch` with another epoch afterwards drops the
        saved position (that epoch starts whole).

        With a caffe-lmdb sampler (`BlockShuffleSampler`, `DistributedShuffleSampler`) the state may
        come from another number of ranks: the rest of the epoch is split among this run's ranks
        (`ResumableSampler`); any rank's state does for every rank, as they agree. Other samplers
        must have the same rank count, rank and length, and give the same order for the same
        `set_epoch` (DistributedSampler does).

        Raises:
            LoaderError: the state is not a loader state, or differs from this loader in an LMDB
                (name, record count, keys), the record count, batch size, drop_last, shuffle,
                seed, transform or sampler; one line says what differs.
        """
        check_state(state, self._checked_identity())
        epoch, received = state["epoch"], state["received"]
        saved = state.get("sampler")
        if isinstance(self.sampler, ResumableSampler):
            name = type(self.sampler).__name__
            if sampler_name(saved) != name:
                raise LoaderError(f"load_state_dict: the state was saved with sampler {sampler_name(saved)}, this "
                                  f"loader has {name}")
            if saved.get("epoch") != epoch or saved.get("received") != received:
                raise LoaderError(f"load_state_dict: the state's {name} state is at epoch {saved.get('epoch')!r}, "
                                  f"received {saved.get('received')!r}, the loader's at epoch {epoch}, received "
                                  f"{received}: a garbled state")
            self.sampler.load_state_dict(saved)
        else:
            check_position(saved, None if self.sampler is None else sampler_identity(self.sampler), received,
                           self._size(), self.batch_size, self.drop_last)
        live = self._iterator() if self._iterator is not None else None
        if live is not None:
            live.end_for_load()
        self._progress = None
        self.set_epoch(epoch)
        self._resume = (epoch, received)

    def _checked_identity(self) -> dict[str, Any]:
        """What decides the bytes of the batches, besides the position: made once (the LMDB keys are read once)."""
        if self._identity is None:
            lmdbs = [lmdb_identity(part) for part in self.parts]
            self._identity = {"records": sum(entry["records"] for entry in lmdbs), "lmdbs": lmdbs,
                              "batch_size": self.batch_size, "drop_last": self.drop_last, "shuffle": self.shuffle,
                              "seed": self.seed, "transform": transform_identity(self.transform)}
        return self._identity

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
        resume, self._resume = self._resume, None
        order = self._order()  # a ResumableSampler gives only the rest of a resumed epoch
        size = len(self._maker)
        bad = next((i for i in order if not 0 <= i < size), None)
        if bad is not None:
            raise IndexError(f"the sampler gave index {bad}, out of range for the {size} records of "
                             f"{', '.join(part.root for part in self.parts)}")
        start = 0
        if resume is not None and resume[0] == self._epoch and not isinstance(self.sampler, ResumableSampler):
            start = resume[1]  # index arithmetic: the skipped samples are never read
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        batches = [order[i:i + self.batch_size] for i in range(start, stop, self.batch_size)]
        longest = len(batches[0]) if batches else 0  # the first batch is the longest
        if resume is not None:  # slots as the uninterrupted run makes them, not as short as the rest's
            longest = max(longest, min(self.batch_size, self._size()))
        rows = self._slot_rows(longest)
        if rows > self._rows:  # only the first epoch, or a sampler that grew: slots are made (again) for it
            self._free_slots()
            self._rows = rows
        self._progress = EpochProgress(self._epoch, start)
        iterator = _BatchIterator(self, batches, self._epoch, self._progress)
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

    def _layout(self) -> SlotLayout:
        dtype = "float32" if self.output == "float32" else "uint8"
        slots = self.prefetch_factor + 1 if self.num_workers else 1
        return SlotLayout(self._rows, self.sample_shape, dtype, slots, self._maker.params_width)

    def _check_memory(self, layout: SlotLayout, rings: int) -> None:
        """Refuse, in one line, slots that cannot fit in the memory available (before allocating any).

        Raises:
            LoaderError: `rings` rings of `layout` need more bytes than `available_memory` gives.
        """
        needed, available = layout.total_bytes * rings, available_memory()
        if available is None or needed <= available:
            return
        roots = ", ".join(part.root for part in self.parts)
        raise LoaderError(
            f"{roots}: batches of {layout.batch_size} x {'x'.join(map(str, layout.sample_shape))} {layout.dtype} "
            f"samples need {gib(needed)} of loader slots ({rings} ring(s) of {layout.slots} slot(s) of "
            f"{layout.slot_bytes / 2**10:,.0f} KiB), more than the {gib(available)} of memory available: "
            "lower batch_size, num_workers or prefetch_factor"
        )

    def _free_slots(self) -> None:
        """Drop every slot (and the workers that map them), so the next batch allocates them anew."""
        self.close()
        self._local = None

    def _workers(self) -> WorkerPool:
        if self._rings is None:
            self._check_memory(self._layout(), self.num_workers)
            self._rings = Rings(self._layout(), self.num_workers, self.pin_memory)
        if self._pool is None:
            self._pool = WorkerPool(self._maker, self._rings, self.multiprocessing_context)
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
        """The latest batch's params per sample, B x 3 int32 (h_off, w_off, mirror; B x 5 for a resized crop's box)."""
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


def _concat(parts: list[LmdbDataset_train | LmdbDataset]) -> Any:
    from .dataset import LmdbConcatDataset

    return LmdbConcatDataset(parts)


class _BatchIterator:
    """One epoch of a `CaffeLoader`: keeps every worker's ring busy, yields the batches in order."""

    def __init__(self, loader: CaffeLoader, batches: list[list[int]], epoch: int, progress: EpochProgress) -> None:
        self.loader = loader
        self.batches = batches
        self.epoch = epoch
        self.progress = progress  # counts what is handed to the user: the loader's state
        self.ended_by_load = False
        self.next_batch = 0
        self.sent = 0
        self.pool: WorkerPool | None = None
        self.held: tuple[int, int, Any] | None = None  # (worker, slot, CUDA event) of the batch handed out
        self.inflight: dict[int, tuple[int, int]] = {}
        self.closed = False
        self.device = loader.device
        self.non_blocking = loader.pin_memory and self.device is not None and self.device.type == "cuda"

    def __iter__(self) -> _BatchIterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.closed:
            if self.ended_by_load:
                raise LoaderError("this iteration was ended by load_state_dict(); call iter(loader) again to "
                                  "continue from the loaded state")
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
            delivered = self._deliver(worker, slot, images, labels, params, len(indices))
            self.progress.delivered += len(indices)
            return delivered
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
            raise rebuild_error(error, worker)
        return worker, slot

    def _describe(self, batch: int) -> str:
        indices = self.batches[batch]
        return (f"batch {batch} of epoch {self.epoch} ({len(indices)} samples; its first is "
                f"{self.loader._maker.describe(indices[0])})")

    def _died(self, worker: int, batch: int) -> LoaderError:
        proc = self.pool.procs[worker]
        proc.join(1)  # its pipes close as it exits, a moment before it can be reaped
        return LoaderError(f"loader worker {worker} (pid {proc.pid}) {exit_reason(proc)} while making "
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
        self.progress.finished = True
        if self.pool is not None and not self.loader.persistent_workers:
            self.loader._release_pool()
        self.pool = None

    def end_for_load(self) -> None:
        """`load_state_dict` was called: end this iteration, and make asking it for more a `LoaderError`."""
        if not self.closed:
            self.close()
            self.ended_by_load = True

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

    def _drain(self, pool: WorkerPool) -> bool:
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

