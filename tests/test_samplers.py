"""BlockShuffleSampler: a permutation, deterministic per (seed, epoch), disjoint ranks, local reads."""

from __future__ import annotations

import pytest
from torch.utils.data import DistributedSampler

from caffe_lmdb.samplers import BlockShuffleSampler


def ranks_of(size, replicas, **kwargs):
    return [list(BlockShuffleSampler(range(size), num_replicas=replicas, rank=r, **kwargs)) for r in range(replicas)]


@pytest.mark.parametrize("size", [0, 1, 10, 64, 1000, 1003])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_every_index_once_per_epoch_with_distributed_sampler_padding(size, replicas):
    runs = ranks_of(size, replicas, block_size=16, window=2)
    reference = [list(DistributedSampler(range(size), num_replicas=replicas, rank=r, shuffle=False))
                 for r in range(replicas)]
    assert [len(r) for r in runs] == [len(r) for r in reference]
    seen = [i for run in runs for i in run]
    assert set(seen) == set(range(size))
    assert len(seen) - size == sum(map(len, reference)) - size  # the same amount of padding


def test_drop_last_gives_disjoint_equal_runs():
    runs = ranks_of(1003, 4, block_size=10, drop_last=True)
    assert {len(r) for r in runs} == {250}
    seen = [i for run in runs for i in run]
    assert len(seen) == len(set(seen)) == 1000


def test_deterministic_per_seed_and_epoch():
    a = BlockShuffleSampler(range(500), num_replicas=1, rank=0, seed=3, block_size=8)
    b = BlockShuffleSampler(range(500), num_replicas=1, rank=0, seed=3, block_size=8)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == sorted(first)
    c = BlockShuffleSampler(range(500), num_replicas=1, rank=0, seed=4, block_size=8)
    assert list(c) != first


def test_order_is_shuffled_but_reads_stay_within_a_few_blocks():
    sampler = BlockShuffleSampler(range(4096), num_replicas=1, rank=0, block_size=64, window=4)
    order = list(sampler)
    assert order != sorted(order)
    for start in range(0, 4096, 256):  # each window of 4 blocks touches exactly 4 blocks
        assert len({i // 64 for i in order[start:start + 256]}) == 4


def test_no_shuffle_is_sequential_and_split_across_ranks():
    assert ranks_of(10, 2, shuffle=False) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="invalid rank 2"):
        BlockShuffleSampler(range(4), num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="block_size"):
        BlockShuffleSampler(range(4), block_size=0)


def test_each_block_is_read_front_to_back_and_batches_mix_blocks():
    sampler = BlockShuffleSampler(range(1024), num_replicas=1, rank=0, block_size=32, window=4, seed=5)
    order = list(sampler)
    for block in range(32):
        positions = [i for i in order if i // 32 == block]
        assert positions == sorted(positions)
    first_batch = order[:16]
    assert len({i // 32 for i in first_batch}) > 1
