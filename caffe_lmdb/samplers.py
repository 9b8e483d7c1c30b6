"""Samplers that suit LMDBs bigger than RAM, and samplers that resume mid-epoch on any number of ranks.

A uniformly random permutation of a 100+ GB LMDB on disk or network storage turns every sample
into a seek (and a cold 192 KiB raw record into dozens of page faults). `BlockShuffleSampler`
keeps most of the randomness at a fraction of the IO cost, the idea behind webdataset's shard
shuffle + buffer, DALI's `initial_fill` and FFCV's quasi-random order:

1. cut the index range into blocks of `block_size` consecutive records (consecutive on disk too:
   the converter writes records in key order);
2. shuffle the order of the blocks (per epoch, from `seed`);
3. give each rank one contiguous run of the shuffled blocks (so a rank reads whole blocks);
4. within each window of `window` blocks, shuffle which block every position draws from, while
   each block is read front to back: every batch mixes the window's blocks in random
   proportions, and the disk sees `window` sequential streams (which the dataset's batch
   prefetch turns into a few large reads) instead of random seeks.

The trade-off: samples from the same block still meet within a window (at most `block_size *
window` apart) and keep their relative order, so batches are less independent than under a full
permutation; convert with `--shuffle` so that a block is a random sample of the dataset rather
than a run of one class. Blocks of 512 raw 256x256 records (96 MiB) read cold at well over half
of sequential speed (figures: docs/benchmarks.md), and a window of 8 blocks mixes 4096 records
from 8 random places of the dataset; smaller blocks are more random and slower.
`DistributedShuffleSampler` is torch's `DistributedSampler` (the same indices for the same seed
and epoch), for LMDBs that fit in the page cache, where order costs nothing.

Resuming (`ResumableSampler`, the base of both): a rank's indices are a pure function of (seed,
epoch, rank count, rank), so a state is a handful of numbers, the epoch and the samples received,
and resuming skips by slicing the order, reading nothing. A state loaded on another number of
ranks splits what the old ranks had not received yet among the new ones (each index once, padded
to equal lengths), so a job that lost half its GPUs finishes the epoch without repeating or
dropping a record; the next epoch is the new rank count's normal order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .errors import LoaderError

#: Records per block. Each jump to a new block costs a fresh IO stream, so larger blocks read
#: faster when cold; 512 raw 256x256 records are 96 MiB (cold figures per size: docs/benchmarks.md).
DEFAULT_BLOCK_SIZE = 512
#: Blocks shuffled together: enough to break up each block across batches.
DEFAULT_WINDOW = 8

#: The `format` and `version` of a sampler state (`ResumableSampler.state_dict`).
STATE_FORMAT = "caffe_lmdb.sampler"
STATE_VERSION = 1


def _world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None:
        num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"invalid rank {rank} for num_replicas={num_replicas}: need 0 <= rank < num_replicas")
    return num_replicas, rank


def _rank_length(size: int, world: int, drop_last: bool) -> int:
    """Indices per rank, as DistributedSampler counts them: padded up, or with `drop_last` cut down."""
    if drop_last and size % world:
        return math.ceil((size - world) / world)
    return math.ceil(size / world)


def _split(rest: np.ndarray, world: int) -> list[np.ndarray]:
    """`rest` in `world` contiguous runs of equal length, padded with its own first indices (as DistributedSampler)."""
    length = math.ceil(len(rest) / world)
    padded = np.resize(rest, length * world) if len(rest) else rest
    return [padded[r * length:(r + 1) * length] for r in range(world)]


def _interleave(window: np.ndarray, block_size: int, rng: np.random.Generator) -> np.ndarray:
    """Shuffle which block each position of the window draws from, keeping each block's own order.

    Every batch mixes records of all the window's blocks in random proportions, while each
    block is still read front to back: `window` sequential streams instead of random seeks,
    which is what lets the dataset's batch prefetch merge neighbouring records into one read.
    """
    blocks = window // block_size
    slots = rng.permutation(blocks)  # positions: which block each sample comes from
    out = np.empty_like(window)
    for block in np.unique(blocks):
        out[slots == block] = np.sort(window[blocks == block])
    return out


class _Pass:
    """One pass of a rank over its indices: the epoch, the rank layouts before it, where it began, how far it got."""

    __slots__ = ("earlier", "epoch", "length", "run", "start", "yielded")

    def __init__(self, epoch: int, earlier: list[list[int]], start: int, run: np.ndarray | None) -> None:
        self.epoch = epoch
        self.earlier = earlier  # [[ranks, received per rank], ...]: the layouts this epoch ran under before
        self.start = start  # the position in this rank's indices where the pass began
        self.run = run  # this rank's indices in the current layout (a loaded state's, made once when loading)
        self.length = 0 if run is None else len(run)  # the pass yields length - start
        self.yielded = 0


class ResumableSampler(Sampler[int]):
    """The base of caffe-lmdb's samplers: an order per (seed, epoch) split across ranks, that resumes anywhere.

    A subclass says how an epoch's indices are split among `world` ranks (`_native_run`); this
    class counts what each pass yields, saves and checks states, and resumes. Every index appears
    once per epoch across the ranks, with `DistributedSampler`'s padding rules: without
    `drop_last` the order is padded with its own first indices to a multiple of the rank count,
    with `drop_last` the tail is dropped. Call `set_epoch(epoch)` each epoch, as with
    DistributedSampler; `len()` is a rank's indices in a whole epoch.

    Resuming:

    * `state_dict(received=None)` gives the epoch, the rank count, this rank and its position
      (plain Python values, for `torch.save` or JSON). By default the position is what the
      current pass has yielded: right under `torchdata`'s `StatefulDataLoader`, which saves the
      sampler's state as it takes each batch's indices, and under `CaffeLoader`, which passes
      what it delivered. Under a plain `DataLoader` the main process takes indices ahead of what
      the training loop received, so pass `received=` (samples the loop took from this pass,
      e.g. `(step + 1) * batch_size` with `step` counted from the pass's first batch).
    * `load_state_dict(state)` checks the state was saved by the same kind of sampler over as many
      records with the same seed and settings (`LoaderError`, one line, otherwise) and makes the
      next pass that starts continue it: the rest of the saved epoch, by index arithmetic. The
      pass after that is the next epoch's whole order. A pass already running is not changed.
    * Epochs: loading sets the sampler's epoch to the saved one, unless `set_epoch` was called
      since the last pass started (StatefulDataLoader loads the state inside `iter()`, after the
      training loop's `set_epoch`): then that epoch stands, and the saved position applies only
      if it is the same epoch. So a loop that calls `set_epoch(epoch)` with the epoch it saved
      continues it, a loop that moved on to the next epoch starts that one whole, and a state
      saved after an epoch's last batch gives an empty rest of that epoch, not a repeat of it.
    * Ranks: all ranks checkpoint at the same step, so their states agree but for `rank`; any
      rank's state (rank 0's, usually the one checkpointed) resumes every rank. With as many
      ranks, each continues its own indices exactly. With another number, the indices the old
      ranks had not received are split among the new ranks in contiguous runs, each index once
      (indices already delivered and duplicates from the old padding are left out), padded with
      the run's own first indices to equal lengths (never cut, even with `drop_last`, so no
      record of the epoch is lost); the state then records the old layout in `earlier`, so that
      it can be saved and resumed again, on yet another rank count, within the same epoch.
    """

    def __init__(self, dataset: Sized, num_replicas: int | None, rank: int | None, shuffle: bool, seed: int,
                 drop_last: bool) -> None:
        self.dataset = dataset
        self.num_replicas, self.rank = _world(num_replicas, rank)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.num_samples = _rank_length(len(dataset), self.num_replicas, drop_last)
        self.total_size = self.num_samples * self.num_replicas
        self._pending: _Pass | None = None  # a loaded state, for the next pass that starts
        self._current: _Pass | None = None  # the latest pass that started
        self._epoch_chosen = False  # set_epoch was called since the latest pass started

    # ------------------------------------------------------------ what a subclass defines

    def _native_run(self, epoch: int, world: int, rank: int) -> np.ndarray:
        """Rank `rank`'s indices of `epoch` split among `world` ranks, `_rank_length` of them."""
        raise NotImplementedError

    def _native_runs(self, epoch: int, world: int) -> list[np.ndarray]:
        """Every rank's `_native_run` (a subclass may share the work)."""
        return [self._native_run(epoch, world, rank) for rank in range(world)]

    def _settings(self) -> dict[str, Any]:
        """The subclass's own parameters of the order, saved in the state and checked on loading."""
        return {}

    # ------------------------------------------------------------ epochs and passes

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch `epoch` (a loaded state applies to it only if it is the saved epoch)."""
        self.epoch = int(epoch)
        self._epoch_chosen = True

    def __iter__(self) -> Iterator[int]:
        return self._run()

    def _run(self) -> Iterator[int]:
        # A generator: the pass (and which state it resumes) is fixed when the first index is asked
        # for, so an iterator made before load_state_dict and never started does not take the state.
        resumed, self._pending = self._pending, None
        self._epoch_chosen = False
        if resumed is not None and resumed.epoch == self.epoch:
            current = resumed
        else:
            current = _Pass(self.epoch, [], 0, self._native_run(self.epoch, self.num_replicas, self.rank))
        run, current.run = current.run, None  # not kept: a pass needs only its counts afterwards
        self._current = current
        for index in run[current.start:].tolist():
            current.yielded += 1  # before the yield: a snapshot taken with this index counts it
            yield index

    def __len__(self) -> int:
        return self.num_samples

    def _rest(self, epoch: int, layouts: list[list[int]], name: str) -> np.ndarray | None:
        """The indices of `epoch` not delivered under `layouts`, each once, in rank order (None: no layouts).

        Raises:
            LoaderError: a layout says more samples received per rank than its ranks have.
        """
        delivered = np.zeros(len(self.dataset), dtype=bool)
        rest = None
        for world, received in layouts:
            runs = self._native_runs(epoch, world) if rest is None else _split(rest, world)
            _check_received(name, epoch, world, received, len(runs[0]))
            for run in runs:
                delivered[run[:received]] = True
            rest = np.concatenate([run[received:] for run in runs]).astype(np.int64, copy=False)
            rest = rest[~delivered[rest]]
            rest = rest[np.sort(np.unique(rest, return_index=True)[1])]  # padding's duplicates: once
        return rest

    # ------------------------------------------------------------ states

    def state_dict(self, received: int | None = None) -> dict[str, Any]:
        """Where this rank is: the next pass continues from here after `load_state_dict` (see the class).

        Args:
            received: samples the training loop received from the current pass; None: what the
                pass has yielded (right for StatefulDataLoader and single-process loading).
        """
        if received is not None and (not isinstance(received, int) or received < 0):
            raise ValueError(f"received must be an int >= 0, got {received!r}")
        pending, current = self._pending, self._current
        earlier: list[list[int]] = []
        position = 0
        if pending is not None and pending.epoch == self.epoch:
            earlier, position = pending.earlier, pending.start
        elif pending is None and current is not None and current.epoch == self.epoch and not self._epoch_chosen:
            taken = current.yielded if received is None else min(received, current.length - current.start)
            earlier, position = current.earlier, current.start + taken
        return {"format": STATE_FORMAT, "version": STATE_VERSION, **self._identity(), "epoch": self.epoch,
                "num_replicas": self.num_replicas, "rank": self.rank, "received": position,
                "earlier": [list(layout) for layout in earlier]}

    def _identity(self) -> dict[str, Any]:
        return {"sampler": type(self).__name__, "records": len(self.dataset), "seed": int(self.seed),
                "shuffle": bool(self.shuffle), "drop_last": bool(self.drop_last), **self._settings()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state` (from `state_dict`, on this or another number of ranks) at the next pass.

        Raises:
            LoaderError: the state is not a sampler state, or was saved by another kind of sampler,
                over another number of records, or with another seed, shuffle, drop_last or
                setting; the message says what differs.
        """
        epoch, world, received, earlier = self._checked(state)
        name = type(self).__name__
        rest = self._rest(epoch, earlier, name)
        if rest is None:
            _check_received(name, epoch, world, received, _rank_length(len(self.dataset), world, self.drop_last))
        else:
            _check_received(name, epoch, world, received, math.ceil(len(rest) / world))
        start = received
        if world != self.num_replicas:  # the old ranks' unreceived indices, split among this many
            start = 0
            if received:
                earlier = [*earlier, [world, received]]
                rest = self._rest(epoch, earlier, name)
        if rest is None:
            run = self._native_run(epoch, self.num_replicas, self.rank)
        else:
            run = _split(rest, self.num_replicas)[self.rank]
        self._pending = _Pass(epoch, earlier, start, run)
        if not self._epoch_chosen:
            self.epoch = epoch

    def _checked(self, state: Any) -> tuple[int, int, int, list[list[int]]]:
        """(epoch, ranks, received, earlier layouts) of a sampler state, each checked against this sampler."""
        name = type(self).__name__
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise LoaderError(f"{name}.load_state_dict: not a sampler state (a dict from state_dict() with format "
                              f"{STATE_FORMAT!r}), got {_kind(state)}")
        if state.get("version") != STATE_VERSION:
            raise LoaderError(f"{name}.load_state_dict: sampler state version {state.get('version')!r}; this "
                              f"caffe-lmdb reads version {STATE_VERSION}")
        for key, mine in self._identity().items():
            if state.get(key) != mine:
                raise LoaderError(f"{name}.load_state_dict: the state was saved with {key} "
                                  f"{state.get(key)!r}, this sampler has {key} {mine!r}")
        epoch, world, received = (_whole(state, key, low) for key, low in (("epoch", 0), ("num_replicas", 1),
                                                                              ("received", 0)))
        earlier = state.get("earlier")
        if not isinstance(earlier, list) or not all(
                isinstance(layout, list | tuple) and len(layout) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in layout)
                and layout[0] >= 1 and layout[1] >= 0 for layout in earlier):
            raise LoaderError(f"{name}.load_state_dict: 'earlier' must be a list of [ranks, received] pairs, "
                              f"got {earlier!r}")
        return epoch, world, received, [list(layout) for layout in earlier]


def _check_received(name: str, epoch: int, world: int, received: int, length: int) -> None:
    if received > length:
        raise LoaderError(f"{name}.load_state_dict: the state says {received} samples received per rank of "
                          f"{world}, but a rank has only {length} in epoch {epoch}")


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a dict with format {value.get('format')!r}"
    return f"a {type(value).__name__}"


def _whole(state: Mapping[str, Any], key: str, low: int) -> int:
    value = state.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise LoaderError(f"load_state_dict: the state's {key!r} must be an int >= {low}, got {value!r}")
    return value


class BlockShuffleSampler(ResumableSampler):
    """A drop-in for `DistributedSampler` that shuffles blocks of consecutive records, and resumes mid-epoch.

    Every index appears exactly once per epoch across ranks (with `DistributedSampler`'s padding
    rules: without `drop_last` the list is padded with its own first indices to a multiple of
    the rank count, with `drop_last` the tail is dropped), and the order is a deterministic
    function of (`seed`, epoch). Call `set_epoch(epoch)` each epoch, as with DistributedSampler.
    `state_dict` / `load_state_dict` resume it, on any number of ranks (`ResumableSampler`).

    Args:
        dataset: anything with `len()`; indices are `range(len(dataset))`.
        block_size: consecutive records per block (the unit of disk locality).
        num_replicas, rank: default from `torch.distributed` when initialised, else 1 and 0.
        shuffle: False gives the plain sequential order, split across ranks.
        seed: the same on every rank.
        drop_last: drop the tail instead of padding, as DistributedSampler.
        window: blocks shuffled together within a rank's run.
    """

    def __init__(
        self,
        dataset: Sized,
        block_size: int = DEFAULT_BLOCK_SIZE,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        if block_size < 1 or window < 1:
            raise ValueError(f"block_size and window must be >= 1, got {block_size} and {window}")
        super().__init__(dataset, num_replicas, rank, shuffle, seed, drop_last)
        self.block_size = block_size
        self.window = window

    def _settings(self) -> dict[str, Any]:
        return {"block_size": int(self.block_size), "window": int(self.window)}

    def global_order(self) -> np.ndarray:
        """All ranks' indices of this epoch, rank 0's run first (padded or cut to `total_size`)."""
        return self._global(self.epoch, self.num_replicas)

    def _global(self, epoch: int, world: int) -> np.ndarray:
        size = len(self.dataset)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            blocks = rng.permutation(math.ceil(size / self.block_size))
            starts = blocks * self.block_size
            lengths = np.minimum(self.block_size, size - starts)
            order = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)]) \
                if size else np.zeros(0, dtype=np.int64)
        else:
            order = np.arange(size)
        total = _rank_length(size, world, self.drop_last) * world
        if total > size:
            order = np.resize(order, total)  # pads with the order's own first indices
        return order[:total]

    def _native_runs(self, epoch: int, world: int) -> list[np.ndarray]:
        order = self._global(epoch, world)
        return [self._mixed(order, epoch, world, rank) for rank in range(world)]

    def _native_run(self, epoch: int, world: int, rank: int) -> np.ndarray:
        return self._mixed(self._global(epoch, world), epoch, world, rank)

    def _mixed(self, order: np.ndarray, epoch: int, world: int, rank: int) -> np.ndarray:
        """Rank `rank`'s contiguous run of the global order, each window of blocks interleaved."""
        length = len(order) // world
        run = order[rank * length:(rank + 1) * length].copy()
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, 1 + rank])
            span = self.block_size * self.window
            for start in range(0, len(run), span):
                run[start:start + span] = _interleave(run[start:start + span], self.block_size, rng)
        return run


class DistributedShuffleSampler(ResumableSampler):
    """torch's `DistributedSampler`, index for index, that resumes mid-epoch (on any number of ranks).

    The same lists as `DistributedSampler(dataset, num_replicas, rank, shuffle, seed, drop_last)`
    after the same `set_epoch`: a permutation of every index from (`seed` + epoch) with torch's
    own generator (a local one: the global random state is never touched), padded with its own
    first indices to a multiple of the rank count (or cut, with `drop_last`), rank r taking every
    `num_replicas`-th index from position r. So swapping it in changes no order, and adds
    `state_dict` / `load_state_dict` (`ResumableSampler`). For LMDBs that fit in the page cache;
    `BlockShuffleSampler` for those read from disk.

    Args:
        dataset: anything with `len()`; indices are `range(len(dataset))`.
        num_replicas, rank: default from `torch.distributed` when initialised, else 1 and 0.
        shuffle: False gives the plain sequential order, dealt across ranks.
        seed: the same on every rank.
        drop_last: drop the tail instead of padding.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas, rank, shuffle, seed, drop_last)

    def _global(self, epoch: int, world: int) -> np.ndarray:
        size = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            order = torch.randperm(size, generator=generator).numpy()
        else:
            order = np.arange(size)
        total = _rank_length(size, world, self.drop_last) * world
        if total > size:
            order = np.resize(order, total)  # DistributedSampler's padding: the order repeated
        return order[:total]

    def _native_runs(self, epoch: int, world: int) -> list[np.ndarray]:
        order = self._global(epoch, world)
        return [order[rank::world] for rank in range(world)]

    def _native_run(self, epoch: int, world: int, rank: int) -> np.ndarray:
        return self._global(epoch, world)[rank::world]
