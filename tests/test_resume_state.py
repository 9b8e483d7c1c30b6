"""CaffeLoader.state_dict / load_state_dict: a resumed run's batches are the uninterrupted run's, byte for byte.

Two small real LMDBs (23 + 17 raw 3 x 10 x 12 records; each label is the record's index over both, so
a batch's labels say which records it holds), batches of 6 (7 per epoch, the last of 4), random
crops and mirrors. Every test compares against an uninterrupted run made in the same test; the
kill test saves states in processes that then SIGKILL themselves, and resumes them here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from conftest import REPO, caffe_key, caffe_raw_datum, write_lmdb
from torch.utils.data import DistributedSampler

from caffe_lmdb import CaffeLoader, CaffeTransform, LoaderError, save_keys
from caffe_lmdb.files import default_keys_path
from caffe_lmdb.loader import WorkerOptions
from caffe_lmdb.prototxt import loader_from_prototxt
from caffe_lmdb.samplers import BlockShuffleSampler, DistributedShuffleSampler

SIZES = (23, 17)
COUNT = sum(SIZES)
BATCH = 6
PER_EPOCH = -(-COUNT // BATCH)  # 7


def make_lmdb(path: Path, first: int, count: int, *, seed: int = 0, keys_file: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + first)
    records = {caffe_key(i, f"c/{i}.png"): caffe_raw_datum(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8),
                                                          i).SerializeToString() for i in range(first, first + count)}
    write_lmdb(path, records)
    if keys_file:
        save_keys(default_keys_path(path), sorted(records))
    return path


@pytest.fixture(scope="module")
def lmdbs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("resume")
    return [make_lmdb(root / "a.lmdb", 0, SIZES[0]), make_lmdb(root / "b.lmdb", SIZES[0], SIZES[1])]


def loader(lmdbs, batch_size: int = BATCH, crop: int = 8, **options) -> CaffeLoader:
    options = {"shuffle": True, "seed": 3, **options}
    return CaffeLoader(lmdbs, batch_size, transform=CaffeTransform(crop, mirror=True, mean_value=[10, 20, 30],
                                                                   scale=0.5), **options)


def epoch(iterable) -> list[tuple[bytes, list[int]]]:
    """The batches of one pass: image bytes and labels (the records' indices)."""
    return [(images.numpy().tobytes(), labels.tolist()) for images, labels in iterable]


def take(iterator, count: int) -> list[tuple[bytes, list[int]]]:
    return [(images.numpy().tobytes(), labels.tolist()) for images, labels in (next(iterator) for _ in range(count))]


@pytest.fixture(scope="module")
def reference(lmdbs) -> list[list[tuple[bytes, list[int]]]]:
    """Three epochs of the uninterrupted run (shuffle on)."""
    uninterrupted = loader(lmdbs)
    return [epoch(uninterrupted) for _ in range(3)]


def plain(value) -> bool:
    """Only dicts, lists, str, int, float, bool, None: what torch.save(weights_only) and JSON keep as they are."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


# --------------------------------------------------------------------------- killed, resumed in a new process

KILLED = """
import json, os, signal, sys, torch
from caffe_lmdb import CaffeLoader, CaffeTransform

def run_then_die(lmdbs, out, workers, epoch, batches):
    loader = CaffeLoader(lmdbs, 6, transform=CaffeTransform(8, mirror=True, mean_value=[10, 20, 30], scale=0.5),
                         shuffle=True, seed=3, num_workers=workers)
    for e in range(epoch):
        for _ in loader:
            pass
    iterator = iter(loader)
    if batches == "end":  # exactly at the epoch boundary: after StopIteration
        for _ in iterator:
            pass
    else:
        for _ in range(int(batches)):
            next(iterator)
    torch.save({"model": None, "data": loader.state_dict()}, out + ".tmp")
    os.replace(out + ".tmp", out)
    os.kill(os.getpid(), signal.SIGKILL)

lmdbs, points, statuses = sys.argv[1:3], json.loads(sys.argv[3]), {}
for out, (workers, epoch, batches, _) in points.items():
    pid = os.fork()  # one process per kill point, torch imported once
    if pid == 0:
        try:
            run_then_die(lmdbs, out, workers, epoch, batches)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    statuses[out] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
print(json.dumps(statuses))
"""

#: name: (workers before, epoch, batches received, workers after)
KILL_POINTS = {"first batch": (2, 0, "1", 0), "mid-epoch": (0, 1, "3", 2), "last batch": (2, 0, str(PER_EPOCH), 0),
               "epoch boundary": (0, 0, "end", 2)}


def test_states_saved_before_a_sigkill_resume_byte_for_byte_in_another_process(lmdbs, reference, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED))
    points = {str(tmp_path / f"{name}.pt"): point for name, point in KILL_POINTS.items()}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(script), *map(str, lmdbs), json.dumps(points)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout).values()) == {signal.SIGKILL}, done.stdout
    for out, (_, at_epoch, batches, after) in points.items():
        state = torch.load(out, weights_only=True)["data"]
        assert plain(state)
        resumed = loader(lmdbs, num_workers=after)
        resumed.load_state_dict(state)
        rest, following = epoch(resumed), epoch(resumed)
        if batches == "end":  # the next epoch, whole
            assert (state["epoch"], state["received"]) == (at_epoch + 1, 0)
            assert [rest, following] == reference[at_epoch + 1:at_epoch + 3], out
        else:
            assert (state["epoch"], state["received"]) == (at_epoch, min(COUNT, int(batches) * BATCH))
            assert rest == reference[at_epoch][int(batches):], out
            assert following == reference[at_epoch + 1], out


# --------------------------------------------------------------------------- in one process

def stopped_after(lmdbs, batches: int, epochs_before: int = 0, **options) -> dict:
    """The state of a loader stopped after `batches` batches of epoch `epochs_before`."""
    interrupted = loader(lmdbs, **options)
    for _ in range(epochs_before):
        epoch(interrupted)
    iterator = iter(interrupted)
    take(iterator, batches)
    return interrupted.state_dict()


@pytest.mark.parametrize("shuffle", [True, False])
def test_resume_mid_epoch_with_two_workers_then_none(lmdbs, shuffle):
    uninterrupted = loader(lmdbs, shuffle=shuffle)
    want = [epoch(uninterrupted) for _ in range(2)]
    state = stopped_after(lmdbs, 2, shuffle=shuffle, num_workers=2)
    assert json.loads(json.dumps(state)) == state and plain(state)
    resumed = loader(lmdbs, shuffle=shuffle)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert epoch(resumed) == want[0][2:]
    assert epoch(resumed) == want[1]
    if not shuffle:
        assert [label for _, labels in want[0][2:] for label in labels] == list(range(2 * BATCH, COUNT))


def test_two_resumes_in_one_epoch(lmdbs, reference):
    state = stopped_after(lmdbs, 1, epochs_before=1)
    second = loader(lmdbs, num_workers=2)
    second.load_state_dict(state)
    iterator = iter(second)
    assert take(iterator, 2) == reference[1][1:3]
    again = second.state_dict()
    assert (again["epoch"], again["received"]) == (1, 3 * BATCH)
    del iterator
    third = loader(lmdbs)
    third.load_state_dict(again)
    assert epoch(third) == reference[1][3:]
    assert epoch(third) == reference[2]


def test_the_state_right_after_loading_is_the_loaded_one(lmdbs):
    state = stopped_after(lmdbs, 3)
    resumed = loader(lmdbs)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state


def test_an_iterator_made_before_load_state_dict_never_restarts_the_epoch_silently(lmdbs, reference):
    state = stopped_after(lmdbs, 4)
    resumed = loader(lmdbs, num_workers=2)
    early = iter(resumed)  # as a framework may do before restoring the checkpoint
    resumed.load_state_dict(state)
    with pytest.raises(LoaderError, match="ended by load_state_dict"):
        next(early)
    assert epoch(resumed) == reference[0][4:]
    assert epoch(resumed) == reference[1]


def test_load_state_dict_during_an_iteration_ends_it_and_the_next_iter_resumes(lmdbs, reference):
    state = stopped_after(lmdbs, 2, epochs_before=1)
    running = loader(lmdbs, num_workers=2)
    iterator = iter(running)
    take(iterator, 3)
    running.load_state_dict(state)
    with pytest.raises(LoaderError, match="call iter"):
        next(iterator)
    assert epoch(running) == reference[1][2:]


def test_set_epoch_after_loading_keeps_the_saved_epoch_or_starts_another_whole(lmdbs, reference):
    state = stopped_after(lmdbs, 3, epochs_before=1)
    same = loader(lmdbs)
    same.load_state_dict(state)
    same.set_epoch(1)  # a DDP loop's set_epoch(epoch) with the epoch it saved
    assert epoch(same) == reference[1][3:]
    other = loader(lmdbs)
    other.load_state_dict(state)
    other.set_epoch(2)
    assert epoch(other) == reference[2]


def test_last_batch_and_epoch_boundary_states(lmdbs, reference):
    interrupted = loader(lmdbs)
    iterator = iter(interrupted)
    take(iterator, PER_EPOCH)
    last = interrupted.state_dict()
    assert (last["epoch"], last["received"]) == (0, COUNT)
    with pytest.raises(StopIteration):
        next(iterator)
    boundary = interrupted.state_dict()
    assert (boundary["epoch"], boundary["received"]) == (1, 0)
    interrupted.set_epoch(2)
    assert (interrupted.state_dict()["epoch"], interrupted.state_dict()["received"]) == (2, 0)
    resumed = loader(lmdbs)
    resumed.load_state_dict(last)
    assert epoch(resumed) == []  # the rest of epoch 0 is empty; the loop's next epoch is epoch 1
    assert epoch(resumed) == reference[1]


def test_a_loop_left_with_break_still_saves_its_position(lmdbs, reference):
    interrupted = loader(lmdbs, num_workers=2)
    for step, _ in enumerate(interrupted):
        if step == 2:
            break
    import gc

    gc.collect()  # the iterator is gone; the loader kept its position
    state = interrupted.state_dict()
    assert (state["epoch"], state["received"]) == (0, 3 * BATCH)
    resumed = loader(lmdbs)
    resumed.load_state_dict(state)
    assert epoch(resumed) == reference[0][3:]


def test_skipped_records_are_never_read(tmp_path):
    path = make_lmdb(tmp_path / "keyed.lmdb", 0, 30, keys_file=True)
    options = {"shuffle": False}
    want = epoch(loader([path], **options))
    state = stopped_after([path], 3, **options)  # records 0..17 received
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:  # gone: any read of them fails (record 0 sets the batch shape)
        for i in range(1, 3 * BATCH):
            assert txn.delete(caffe_key(i, f"c/{i}.png"))
    env.close()
    with pytest.warns(UserWarning, match="keys file has 30 keys"):
        resumed = loader([path], **options)
    resumed.load_state_dict(state)
    assert epoch(resumed) == want[3:]


def test_a_sampler_without_state_resumes_with_the_same_ranks(lmdbs):
    def ranked(rank: int, **options) -> CaffeLoader:
        return loader(lmdbs, shuffle=False, sampler=DistributedSampler(range(COUNT), 2, rank, seed=1), **options)

    for rank in range(2):
        uninterrupted = ranked(rank)
        uninterrupted.set_epoch(1)
        want = epoch(uninterrupted)
        interrupted = ranked(rank, num_workers=2)
        interrupted.set_epoch(1)
        take(iter(interrupted), 2)
        state = interrupted.state_dict()
        assert (state["rank"], state["world_size"]) == (rank, 2)
        resumed = ranked(rank)
        resumed.load_state_dict(state)
        assert epoch(resumed) == want[2:]
    alone = loader(lmdbs, shuffle=False, sampler=DistributedSampler(range(COUNT), 1, 0, seed=1))
    with pytest.raises(LoaderError, match="num_replicas 2, .* has num_replicas 1: only caffe-lmdb's samplers"):
        alone.load_state_dict(state)


# --------------------------------------------------------------------------- many ranks

SAMPLERS = {"block": lambda world, rank: BlockShuffleSampler(range(COUNT), 4, world, rank, seed=5, window=2),
            "distributed": lambda world, rank: DistributedShuffleSampler(range(COUNT), world, rank, seed=5)}


def ranks(lmdbs, kind: str, world: int, **options) -> list[CaffeLoader]:
    return [loader(lmdbs, shuffle=False, sampler=SAMPLERS[kind](world, rank), **options) for rank in range(world)]


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
@pytest.mark.parametrize(("old", "new", "batches"), [(2, 1, 2), (1, 2, 3), (3, 2, 1), (3, 2, 3)])
def test_another_number_of_ranks_finishes_the_epoch_with_each_record_once(lmdbs, kind, old, new, batches):
    before = ranks(lmdbs, kind, old)
    received, states = [], []
    for rank_loader in before:
        rank_loader.set_epoch(1)
        iterator = iter(rank_loader)
        received += [label for _, labels in take(iterator, batches) for label in labels]
        states.append(rank_loader.state_dict())
        del iterator
    assert len({json.dumps({**s, "rank": 0, "sampler": {**s["sampler"], "rank": 0}}) for s in states}) == 1  # agree
    after = ranks(lmdbs, kind, new, num_workers=1 if new == 1 else 0)
    rest = []
    for rank_loader in after:
        rank_loader.load_state_dict(states[0])  # rank 0's checkpoint, on every rank
        rest.append([label for _, labels in epoch(rank_loader) for label in labels])
    assert len({len(run) for run in rest}) == 1  # equal lengths: padded where the rest does not divide
    counts = Counter(received + [label for run in rest for label in run])
    assert set(counts) == set(range(COUNT))
    padding = sum(counts.values()) - COUNT
    assert padding <= (old - 1) + (new - 1), counts
    following = [[label for _, labels in epoch(rank_loader) for label in labels] for rank_loader in after]
    fresh = ranks(lmdbs, kind, new)
    for rank_loader in fresh:
        rank_loader.set_epoch(2)
    assert following == [[label for _, labels in epoch(rank_loader) for label in labels] for rank_loader in fresh]


@pytest.mark.parametrize("kind", sorted(SAMPLERS))
def test_the_same_number_of_ranks_continues_each_rank_exactly(lmdbs, kind):
    for rank, (whole, interrupted) in enumerate(zip(ranks(lmdbs, kind, 2), ranks(lmdbs, kind, 2), strict=True)):
        want = epoch(whole)
        take(iter(interrupted), 2)
        state = interrupted.state_dict()
        assert state["sampler"]["received"] == 2 * BATCH and state["rank"] == rank
        resumed = ranks(lmdbs, kind, 2, num_workers=2)[rank]
        resumed.load_state_dict(state)
        assert epoch(resumed) == want[2:]
        assert epoch(resumed) == epoch(whole)


def test_a_second_change_of_ranks_in_the_same_epoch(lmdbs):
    received = []
    for rank_loader in ranks(lmdbs, "block", 2):
        iterator = iter(rank_loader)
        received += [label for _, labels in take(iterator, 1) for label in labels]
        state = rank_loader.state_dict()
    middle = ranks(lmdbs, "block", 3)
    for rank_loader in middle:
        rank_loader.load_state_dict(state)
        iterator = iter(rank_loader)
        received += [label for _, labels in take(iterator, 1) for label in labels]
        again = rank_loader.state_dict()
    assert again["sampler"]["earlier"] == [[2, BATCH]]
    for rank_loader in ranks(lmdbs, "block", 1):
        rank_loader.load_state_dict(again)
        received += [label for _, labels in epoch(rank_loader) for label in labels]
    assert sorted(Counter(received)) == list(range(COUNT)) and len(received) - COUNT <= 2


# --------------------------------------------------------------------------- bad states

def one_line_error(target: CaffeLoader, state, *words) -> str:
    with pytest.raises(LoaderError) as excinfo:
        target.load_state_dict(state)
    message = str(excinfo.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_a_mismatched_or_garbled_state_is_refused_in_one_line(lmdbs, tmp_path):
    state = stopped_after(lmdbs, 2)
    target = loader(lmdbs)
    one_line_error(target, [1, 2], "not a CaffeLoader state", "list")
    one_line_error(target, {**state, "format": "other"}, "not a CaffeLoader state")
    one_line_error(target, {**state, "version": 99}, "version 99")
    one_line_error(target, {**state, "received": -6}, "'received'", "-6")
    one_line_error(target, {**state, "received": 7}, "7 samples received", "batches of 6")
    one_line_error(target, {**state, "lmdbs": "a.lmdb"}, "'lmdbs'")
    one_line_error(loader(lmdbs[:1]), state, "2 LMDB(s)", "a.lmdb, b.lmdb", "reads 1 (a.lmdb)")
    one_line_error(loader(lmdbs, batch_size=8), state, "batch_size 6", "batch_size 8")
    one_line_error(loader(lmdbs, seed=4), state, "seed 3", "seed 4")
    one_line_error(loader(lmdbs, shuffle=False), state, "shuffle True", "shuffle False")
    one_line_error(loader(lmdbs, drop_last=True), state, "drop_last False", "drop_last True")
    one_line_error(loader(lmdbs, crop=6), state, "another transform", "crop_size 8", "crop_size 6")
    one_line_error(CaffeLoader(lmdbs, BATCH, shuffle=True, seed=3), state, "transform 'CaffeTransform'", "none")
    one_line_error(target, {**state, "sampler": {"class": "DistributedSampler"}}, "sampler DistributedSampler",
                   "has none")
    renamed = make_lmdb(tmp_path / "c.lmdb", SIZES[0], SIZES[1])  # the same records under another name
    one_line_error(loader([lmdbs[0], renamed]), state, "LMDB 2 of 2", "name 'b.lmdb'", "'c.lmdb'")
    fewer = make_lmdb(tmp_path / "short" / "b.lmdb", SIZES[0], SIZES[1] - 1)
    one_line_error(loader([lmdbs[0], fewer]), state, "LMDB 2 of 2", "records 17", "16")
    rewritten = tmp_path / "rewritten" / "b.lmdb"  # same name and count, other keys: a rewrite
    rewritten.parent.mkdir()
    write_lmdb(rewritten, {caffe_key(i + 100, f"d/{i}.png"): caffe_raw_datum(np.zeros((10, 12, 3), np.uint8), i)
                           .SerializeToString() for i in range(SIZES[1])})
    one_line_error(loader([lmdbs[0], rewritten]), state, "LMDB 2 of 2", "first_key")
    assert target.state_dict()["epoch"] == 0  # nothing was changed by the refusals
    target.load_state_dict(state)


def test_a_sampler_state_that_does_not_fit_is_refused_in_one_line(lmdbs):
    state = ranks(lmdbs, "block", 2)[0].state_dict()
    one_line_error(ranks(lmdbs, "distributed", 2)[0], state, "sampler BlockShuffleSampler", "DistributedShuffleSampler")
    other = loader(lmdbs, shuffle=False, sampler=BlockShuffleSampler(range(COUNT), 8, 2, 0, seed=5, window=2))
    one_line_error(other, state, "block_size 4", "block_size 8")
    one_line_error(ranks(lmdbs, "block", 2)[0], {**state, "sampler": {**state["sampler"], "received": 3}},
                   "garbled")
    too_far = {**state, "received": 60, "sampler": {**state["sampler"], "received": 60}}
    one_line_error(ranks(lmdbs, "block", 2)[0], too_far, "60 samples received per rank of 2", "only 20")


def test_loader_from_prototxt_saves_and_resumes(lmdbs, tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(textwrap.dedent(f"""
        layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
          transform_param {{ crop_size: 8 mirror: true }}
          data_param {{ source: "{lmdbs[0]}" batch_size: 5 backend: LMDB }} }}
    """))
    whole = loader_from_prototxt(net, shuffle=True, seed=2)
    want = epoch(whole)
    interrupted = loader_from_prototxt(net, shuffle=True, seed=2, num_workers=2,
                                       worker_options=WorkerOptions(persistent_workers=True))
    take(iter(interrupted), 2)
    resumed = loader_from_prototxt(net, shuffle=True, seed=2)
    resumed.load_state_dict(interrupted.state_dict())
    assert epoch(resumed) == want[2:]
