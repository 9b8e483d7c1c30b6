"""Samplers that suit LMDBs bigger than RAM: random enough for SGD, sequential enough for the disk.

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
from 8 random places of the dataset; smaller blocks are more random and slower. Use
DistributedSampler for LMDBs that fit in the page cache, where order costs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

#: Records per block. Each jump to a new block costs a fresh IO stream, so larger blocks read
#: faster when cold; 512 raw 256x256 records are 96 MiB (cold figures per size: docs/benchmarks.md).
DEFAULT_BLOCK_SIZE = 512
#: Blocks shuffled together: enough to break up each block across batches.
DEFAULT_WINDOW = 8


def _world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None:
        num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"invalid rank {rank} for num_replicas={num_replicas}: need 0 <= rank < num_replicas")
    return num_replicas, rank


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


class BlockShuffleSampler(Sampler[int]):
    """A drop-in for `DistributedSampler` that shuffles blocks of consecutive records.

    Every index appears exactly once per epoch across ranks (with `DistributedSampler`'s padding
    rules: without `drop_last` the list is padded with its own first indices to a multiple of
    the rank count, with `drop_last` the tail is dropped), and the order is a deterministic
    function of (`seed`, epoch). Call `set_epoch(epoch)` each epoch, as with DistributedSampler.

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
        self.dataset = dataset
        self.block_size = block_size
        self.window = window
        self.num_replicas, self.rank = _world(num_replicas, rank)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        size = len(dataset)
        if drop_last and size % self.num_replicas:
            self.num_samples = math.ceil((size - self.num_replicas) / self.num_replicas)
        else:
            self.num_samples = math.ceil(size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_order(self) -> np.ndarray:
        """All ranks' indices of this epoch, rank 0's run first (padded or cut to `total_size`)."""
        size = len(self.dataset)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch])
            blocks = rng.permutation(math.ceil(size / self.block_size))
            starts = blocks * self.block_size
            lengths = np.minimum(self.block_size, size - starts)
            order = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)]) \
                if size else np.zeros(0, dtype=np.int64)
        else:
            order = np.arange(size)
        if self.total_size > size:
            order = np.resize(order, self.total_size)  # pads with the order's own first indices
        return order[: self.total_size]

    def __iter__(self) -> Iterator[int]:
        run = self.global_order()[self.rank * self.num_samples:(self.rank + 1) * self.num_samples].copy()
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, 1 + self.rank])
            span = self.block_size * self.window
            for start in range(0, len(run), span):
                run[start:start + span] = _interleave(run[start:start + span], self.block_size, rng)
        return iter(run.tolist())

    def __len__(self) -> int:
        return self.num_samples
