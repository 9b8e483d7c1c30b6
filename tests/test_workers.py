"""RingPool on real processes: order, ring reuse, records too big for the ring, errors, crashes, no leftovers."""

from __future__ import annotations

import os
import time

import pytest

from caffe_lmdb import workers
from caffe_lmdb.workers import Record, RingPool, WorkerError

pytestmark = pytest.mark.skipif(not workers.AVAILABLE, reason="RingPool needs fork (Linux)")


def make(item: int) -> Record:
    """Item i -> a record of pieces whose bytes say i; every 7th is a per-item error."""
    if item % 7 == 3:
        return Record(error=f"bad item {item}")
    size = 100 + (item * 997) % 3000
    body = (b"%06d" % item) * (size // 6)
    return Record(parts=(b"<", body, b">"), shape=(1, 1, size))


def expected(item: int) -> Record:
    record = make(item)
    return Record(parts=(record.value,), shape=record.shape) if record.error is None else record


def _take_all(pool: RingPool, release_every: int) -> list[tuple[bytes | None, tuple | None, str | None]]:
    out = []
    for count, record in enumerate(pool, start=1):
        out.append((bytes(record.value) if record.error is None else None, record.shape, record.error))
        if count % release_every == 0:
            pool.release(count)
    return out


@pytest.mark.parametrize("n_workers", [1, 2, 3])
@pytest.mark.parametrize("release_every", [1, 5])
def test_results_come_back_in_order_through_a_small_ring(n_workers, release_every):
    """A 16 KiB ring holds only a few records: workers wrap around and wait for released space;
    records over ring/8 (2 KiB) go through the pipe instead. Everything arrives in input order."""
    items = list(range(200))
    with RingPool(items, make, n_workers, ring_bytes=16 << 10) as pool:
        got = _take_all(pool, release_every)
    want = [(e.value if e.error is None else None, e.shape, e.error) for e in map(expected, items)]
    assert got == want


def test_values_stay_valid_until_released():
    items = list(range(60))
    with RingPool(items, make, 2, ring_bytes=64 << 10) as pool:
        held = []
        for record in pool:
            held.append(record)
            if len(held) == 10:  # the ring has room for at least 10 records of these sizes
                assert [bytes(r.value) for r in held if r.error is None] == [
                    expected(i).value for i in items[:10] if expected(i).error is None]
                pool.release(len(held))
        assert len(held) == len(items)


def crash_on_five(item: int) -> Record:
    if item == 5:
        raise ZeroDivisionError("boom")
    return make(item)


def die_on_five(item: int) -> Record:
    if item == 5:
        os._exit(3)
    return make(item)


def test_an_exception_in_a_worker_names_the_item():
    with pytest.raises(WorkerError, match=r"failed on 5: ZeroDivisionError: boom"), \
            RingPool(list(range(20)), crash_on_five, 2, ring_bytes=64 << 10) as pool:
        for count, _ in enumerate(pool, start=1):
            pool.release(count)


def test_a_worker_that_dies_is_reported_not_waited_for():
    with pytest.raises(WorkerError, match=r"died \(exit code 3\) before returning [135]$"), \
            RingPool(list(range(20)), die_on_five, 2, ring_bytes=64 << 10) as pool:
        for count, _ in enumerate(pool, start=1):
            pool.release(count)


def slow(item: int) -> Record:
    time.sleep(0.01)
    return make(item)


def test_leaving_early_stops_the_workers():
    pool = RingPool(list(range(10_000)), slow, 2, ring_bytes=64 << 10)
    procs = list(pool.procs)
    with pool:
        for count, _ in enumerate(pool, start=1):
            if count == 3:
                break
    for proc in procs:
        assert not proc.is_alive()


def test_workers_must_be_positive():
    with pytest.raises(ValueError, match="workers must be >= 1"):
        RingPool([1], make, 0, ring_bytes=1 << 16)


def _private_dirty_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:"))


_calls = [0]


def report_memory(item) -> Record:
    """Every 5000th result carries the worker's private (copied-on-write) memory so far, in KiB."""
    _calls[0] += 1
    kib = _private_dirty_kib(os.getpid()) if _calls[0] % 5000 == 1 else 0
    return Record(parts=(os.fsencode(item.path),), shape=(kib, 0, 0))


def test_packed_entries_are_not_copied_into_every_worker():
    """Reading a list of Entry objects from a forked worker copies most of the list into it
    (reference counts live in the objects' pages); packed entries stay shared."""
    from pathlib import Path

    from caffe_lmdb.sources import Entry, PackedEntries

    n = 100_000
    entries = [Entry(f"c{i % 100}/img_{i:08d}.jpg", Path(f"/data/train/c{i % 100}/img_{i:08d}.jpg"), i % 100)
               for i in range(n)]
    growth = {}
    for name, items in (("list", entries), ("packed", PackedEntries(entries))):
        with RingPool(items, report_memory, 2, ring_bytes=1 << 20) as pool:
            first = last = None
            for count, record in enumerate(pool, start=1):
                if record.shape[0]:
                    first = first or record.shape[0]
                    last = record.shape[0]
                if count % 1000 == 0:
                    pool.release(count)
        growth[name] = last - first
    assert growth["list"] > 8 * 1024  # about 30 MiB per worker at 100k entries
    assert growth["packed"] < growth["list"] / 4
