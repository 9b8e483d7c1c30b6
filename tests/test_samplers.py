"""BlockShuffleSampler and DistributedShuffleSampler: deterministic per (seed, epoch), disjoint ranks, and resumable.

Resuming is tested against an uninterrupted run in each test: at every position, on another number of
ranks (every record of the epoch once, padding aside), under a plain DataLoader and torchdata's
StatefulDataLoader (0 and 2 workers, over a real LMDB).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from typing import Any

import numpy as np
import pytest
from conftest import caffe_key, caffe_raw_datum, write_lmdb
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from caffe_lmdb.errors import LoaderError
from caffe_lmdb.samplers import BlockShuffleSampler, DistributedShuffleSampler


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


# --------------------------------------------------------------------------- DistributedShuffleSampler

@pytest.mark.parametrize("size", [0, 1, 7, 40, 41])
@pytest.mark.parametrize("replicas", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_shuffle_sampler_is_distributed_sampler_index_for_index(size, replicas, drop_last):
    for shuffle in (True, False):
        for rank in range(replicas):
            theirs = DistributedSampler(range(size), replicas, rank, shuffle=shuffle, seed=5, drop_last=drop_last)
            ours = DistributedShuffleSampler(range(size), replicas, rank, shuffle=shuffle, seed=5, drop_last=drop_last)
            for epoch in (0, 3):
                theirs.set_epoch(epoch)
                ours.set_epoch(epoch)
                assert list(ours) == list(theirs) and len(ours) == len(theirs)


# --------------------------------------------------------------------------- resuming

SAMPLERS = {
    "block": lambda size, world, rank, **kw: BlockShuffleSampler(range(size), 4, world, rank, seed=9, window=2, **kw),
    "distributed": lambda size, world, rank, **kw: DistributedShuffleSampler(range(size), world, rank, seed=9, **kw),
}


def stopped(make, size: int, world: int, rank: int, epoch: int, taken: int, **kw) -> dict:
    """The state of a sampler that yielded `taken` indices of `epoch`."""
    sampler = make(size, world, rank, **kw)
    sampler.set_epoch(epoch)
    iterator = iter(sampler)
    for _ in range(taken):
        next(iterator)
    return sampler.state_dict()


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_resuming_at_any_position_continues_the_uninterrupted_order(kind):
    make = SAMPLERS[kind]
    whole = make(41, 2, 1)
    whole.set_epoch(1)
    first = list(whole)
    whole.set_epoch(2)
    second = list(whole)
    for taken in range(len(first) + 1):
        state = stopped(make, 41, 2, 1, 1, taken)
        assert state["epoch"] == 1 and state["received"] == taken and json.loads(json.dumps(state)) == state
        resumed = make(41, 2, 1)
        resumed.load_state_dict(json.loads(json.dumps(state)))
        assert resumed.epoch == 1  # from the state: no set_epoch needed
        assert resumed.state_dict() == state  # loaded, not started: still the loaded position
        assert list(resumed) == first[taken:]
        resumed.set_epoch(2)
        assert list(resumed) == second


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_the_epoch_rules_of_loading(kind):
    make = SAMPLERS[kind]
    reference = make(30, 1, 0)
    epochs = []
    for epoch in range(3):
        reference.set_epoch(epoch)
        epochs.append(list(reference))
    middle, complete = stopped(make, 30, 1, 0, 1, 10), stopped(make, 30, 1, 0, 1, 30)
    loop_first = make(30, 1, 0)  # StatefulDataLoader's order: the loop's set_epoch, then the state
    loop_first.set_epoch(1)
    loop_first.load_state_dict(middle)
    assert list(loop_first) == epochs[1][10:]
    moved_on = make(30, 1, 0)  # a state saved after the epoch's last index, the loop already at the next
    moved_on.set_epoch(2)
    moved_on.load_state_dict(complete)
    assert list(moved_on) == epochs[2]
    same_epoch = make(30, 1, 0)  # ... or still at that epoch: its rest is empty, not a repeat
    same_epoch.set_epoch(1)
    same_epoch.load_state_dict(complete)
    assert list(same_epoch) == []
    after_load = make(30, 1, 0)
    after_load.load_state_dict(middle)
    after_load.set_epoch(2)  # another epoch chosen after loading: that epoch, whole
    assert list(after_load) == epochs[2]
    made_before = make(30, 1, 0)
    early = iter(made_before)  # made before loading, not started: takes the state
    running = iter(made_before)
    assert next(running) == epochs[0][0]  # started before loading: goes on unchanged
    made_before.load_state_dict(middle)
    assert list(early) == epochs[1][10:]
    assert list(running) == epochs[0][1:]


def deliver(kind: str, size: int, old: int, taken: int, new: int, **kw) -> tuple[list[int], list[list[int]]]:
    """What `old` ranks received (`taken` each) and each of `new` ranks' rest of the epoch after loading."""
    make = SAMPLERS[kind]
    received = []
    for rank in range(old):
        sampler = make(size, old, rank, **kw)
        sampler.set_epoch(4)
        iterator = iter(sampler)
        received += [next(iterator) for _ in range(taken)]
        states = sampler.state_dict()
    rests = []
    for rank in range(new):
        sampler = make(size, new, rank, **kw)
        sampler.load_state_dict(states)
        rests.append(list(sampler))
    return received, rests


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
@pytest.mark.parametrize(("size", "old", "new"), [(40, 2, 1), (40, 1, 2), (40, 3, 2), (41, 3, 2), (41, 2, 3),
                                                  (7, 4, 3), (41, 4, 1)])
def test_another_number_of_ranks_delivers_every_record_of_the_epoch_once(kind, size, old, new):
    per_rank = -(-size // old)
    for taken in sorted({0, 1, per_rank // 2, per_rank - 1, per_rank}):
        received, rests = deliver(kind, size, old, taken, new)
        assert len({len(rest) for rest in rests}) == 1
        counts = Counter(received + [index for rest in rests for index in rest])
        assert set(counts) == set(range(size)), (taken, set(range(size)) - set(counts))
        assert sum(counts.values()) - size <= (old - 1) + (new - 1)  # DistributedSampler-style padding only


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_another_number_of_ranks_with_drop_last_loses_nothing_more(kind):
    size, old, new = 41, 3, 2
    native = set()
    for rank in range(old):
        sampler = SAMPLERS[kind](size, old, rank, drop_last=True)
        sampler.set_epoch(4)
        native |= set(sampler)
    received, rests = deliver(kind, size, old, 5, new, drop_last=True)
    delivered = received + [index for rest in rests for index in rest]
    assert set(delivered) == native and len(delivered) - len(native) <= new - 1


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_the_epoch_after_a_change_of_ranks_is_the_normal_order(kind):
    make = SAMPLERS[kind]
    state = stopped(make, 40, 3, 0, 1, 4)
    for rank in range(2):
        resumed = make(40, 2, rank)
        resumed.load_state_dict(state)
        list(resumed)
        resumed.set_epoch(2)
        fresh = make(40, 2, rank)
        fresh.set_epoch(2)
        assert list(resumed) == list(fresh)


def test_two_changes_of_ranks_in_one_epoch():
    make = SAMPLERS["block"]
    received = []
    for rank in range(2):
        sampler = make(40, 2, rank)
        iterator = iter(sampler)
        received += [next(iterator) for _ in range(5)]
        state = sampler.state_dict()
    for rank in range(3):
        sampler = make(40, 3, rank)
        sampler.load_state_dict(state)
        iterator = iter(sampler)
        received += [next(iterator) for _ in range(4)]
        again = sampler.state_dict()
    assert again["earlier"] == [[2, 5]] and again["received"] == 4 and again["num_replicas"] == 3
    same = make(40, 3, 1)  # the same three ranks: rank 1 goes on exactly
    same.load_state_dict(again)
    third = make(40, 3, 1)
    third.load_state_dict(state)
    assert list(same) == list(third)[4:]
    alone = make(40, 1, 0)
    alone.load_state_dict(again)
    received += list(alone)
    assert sorted(set(received)) == list(range(40)) and len(received) - 40 <= 2 + 0


def test_a_bad_sampler_state_is_refused_in_one_line():
    state = stopped(SAMPLERS["block"], 40, 2, 0, 1, 3)

    def refused(sampler, bad, *words):
        with pytest.raises(LoaderError) as excinfo:
            sampler.load_state_dict(bad)
        assert "\n" not in str(excinfo.value) and all(w in str(excinfo.value) for w in words), str(excinfo.value)

    target = SAMPLERS["block"](40, 2, 0)
    refused(target, "state", "not a sampler state", "str")
    refused(target, {**state, "version": 7}, "version 7")
    refused(SAMPLERS["distributed"](40, 2, 0), state, "sampler 'BlockShuffleSampler'", "'DistributedShuffleSampler'")
    refused(SAMPLERS["block"](39, 2, 0), state, "records 40", "records 39")
    refused(BlockShuffleSampler(range(40), 4, 2, 0, seed=8, window=2), state, "seed 9", "seed 8")
    refused(BlockShuffleSampler(range(40), 4, 2, 0, seed=9, window=3), state, "window 2", "window 3")
    refused(SAMPLERS["block"](40, 2, 0, shuffle=False), state, "shuffle True", "shuffle False")
    refused(SAMPLERS["block"](40, 2, 0, drop_last=True), state, "drop_last False", "drop_last True")
    refused(target, {**state, "epoch": -1}, "'epoch'", "-1")
    refused(target, {**state, "received": 21}, "21 samples received per rank of 2", "only 20")
    refused(target, {**state, "earlier": [[0, 3]]}, "'earlier'")
    refused(target, {**state, "num_replicas": 3, "earlier": [[2, 30]]}, "30 samples received per rank of 2")
    assert target.state_dict()["received"] == 0  # unchanged by the refusals
    with pytest.raises(ValueError, match="received must be an int"):
        target.state_dict(received=-1)


# --------------------------------------------------------------------------- under DataLoader and StatefulDataLoader

@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """An LMDB of 30 tiny records whose label is their index, read as numpy arrays."""
    from caffe_lmdb.dataset import LmdbDataset_train

    path = tmp_path_factory.mktemp("samplers") / "labelled.lmdb"
    rng = np.random.default_rng(0)
    write_lmdb(path, {caffe_key(i, f"c/{i}.png"): caffe_raw_datum(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8), i)
                      .SerializeToString() for i in range(30)})
    return LmdbDataset_train(path, output="numpy")


def labels_of(loader) -> list[list[int]]:
    return [batch[1].tolist() for batch in loader]


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_a_plain_dataloader_resumes_with_what_the_loop_received(labelled, kind):
    make = SAMPLERS[kind]
    sampler = make(30, 1, 0)
    sampler.set_epoch(1)
    want = labels_of(DataLoader(labelled, batch_size=4, sampler=sampler))
    sampler = make(30, 1, 0)
    sampler.set_epoch(1)
    for step, _ in enumerate(DataLoader(labelled, batch_size=4, sampler=sampler, num_workers=2)):
        if step == 2:
            state = sampler.state_dict(received=(step + 1) * 4)  # the one line a plain DataLoader needs
            ahead = sampler.state_dict()
            break
    assert ahead["received"] > state["received"] == 12  # the workers took indices ahead of the loop
    resumed = make(30, 1, 0)
    resumed.load_state_dict(state)
    assert labels_of(DataLoader(labelled, batch_size=4, sampler=resumed)) == want[3:]


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")  # torchdata 0.11 on torch 2.13
@pytest.mark.parametrize("kind", sorted(SAMPLERS))
@pytest.mark.parametrize("workers", [0, 2])
def test_stateful_dataloader_resumes_exactly_with_our_samplers(labelled, kind, workers):
    stateful_dataloader = pytest.importorskip("torchdata.stateful_dataloader")
    make = SAMPLERS[kind]

    def loader() -> tuple[Sampler, Any]:
        sampler = make(30, 1, 0)
        return sampler, stateful_dataloader.StatefulDataLoader(labelled, batch_size=4, sampler=sampler,
                                                               num_workers=workers)

    sampler, whole = loader()
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        epochs.append(labels_of(whole))
    per_epoch = len(epochs[0])
    for taken in (1, 3, per_epoch, "end"):  # first batch, mid-epoch, last batch, after StopIteration
        sampler, interrupted = loader()
        sampler.set_epoch(1)
        iterator = iter(interrupted)
        for _ in range(per_epoch if taken == "end" else taken):
            next(iterator)
        if taken == "end":
            with pytest.raises(StopIteration):
                next(iterator)
        state = interrupted.state_dict()
        del iterator, interrupted
        sampler, resumed = loader()
        resumed.load_state_dict(state)
        if taken == "end":  # the loop goes on with the next epoch
            sampler.set_epoch(2)
            assert labels_of(resumed) == epochs[2]
            continue
        sampler.set_epoch(1)  # the loop's set_epoch, with the epoch it saved
        if taken == per_epoch:  # saved after the last batch: the rest of the epoch is empty, then the next
            assert labels_of(resumed) == []
            sampler.set_epoch(2)
            assert labels_of(resumed) == epochs[2]
            continue
        iterator = iter(resumed)
        assert [batch[1].tolist() for batch in itertools.islice(iterator, 1)] == epochs[1][taken:taken + 1]
        again = resumed.state_dict()  # a second resume in the same epoch
        del iterator, resumed
        sampler, second = loader()
        second.load_state_dict(again)
        sampler.set_epoch(1)
        assert labels_of(second) == epochs[1][taken + 1:]
        sampler.set_epoch(2)
        assert labels_of(second) == epochs[2]
