"""Resuming mid-epoch (issue 25): what a resume, a `state_dict()` and the bookkeeping behind them cost.

One LMDB of `records` raw 3 x 64 x 64 records (random pixels), read by `CaffeLoader` (crop 56,
mirror, a mean value, shuffle, `num_workers=0`, batches of records / 400), page cache warm:

* resume at 90%: `load_state_dict(state)` + `iter()` on a new loader, the state saved after 90%
  of an epoch, against reading 1% of the epoch through the loader (the skip reads nothing: it
  slices the epoch's order); and the time to the first batch after that resume against the
  time to the first batch of an epoch from its start (the same, if the skip costs nothing).
* `state_dict()` mid-epoch, in microseconds: without a sampler, and with a `BlockShuffleSampler`.
* steady state: an epoch with `state_dict()` called after every batch over an epoch without it
  (the per-batch bookkeeping, a counter, is always on; this shows it and the calls are noise), and
  one `state_dict()` as a fraction of a batch's time (the bound on what calling it can add).
* the samplers alone at ImageNet scale (`sampler_records`, 1,281,167 by default): a
  `BlockShuffleSampler` resumed at 90% of an epoch on the same 8 ranks, and on 4 ranks (the rest
  of the epoch split anew), `load_state_dict` + first index, in milliseconds.

Alternating passes; every figure is the median of `passes` runs.

    python benchmarks/resume_state.py [--records 20000] [--passes 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/resume_state.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lmdb
import numpy as np

from caffe_lmdb.proto import caffe_pb2


def make_lmdb(path: Path, records: int) -> None:
    """`records` raw 3 x 64 x 64 Datums under Caffe's `%08d_` keys, random pixels, label = index % 1000."""
    rng = np.random.default_rng(0)
    env = lmdb.open(str(path), map_size=1 << 34)
    with env.begin(write=True) as txn:
        for i in range(records):
            datum = caffe_pb2.Datum(channels=3, height=64, width=64, label=i % 1000,
                                    data=rng.integers(0, 256, 3 * 64 * 64, dtype=np.uint8).tobytes())
            txn.put(b"%08d_img%d.png" % (i, i), datum.SerializeToString())
    env.close()


def _loader(path: Path, batch: int, sampler: Any = None) -> Any:
    from caffe_lmdb import CaffeLoader, CaffeTransform

    transform = CaffeTransform(56, mirror=True, mean_value=[104, 117, 123])
    return CaffeLoader(path, batch, transform=transform, shuffle=sampler is None, sampler=sampler, seed=1)


def _seconds(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _median(values: list[float]) -> float:
    return statistics.median(values)


def bench_resume_state(workdir: Path, records: int, passes: int, sampler_records: int = 1_281_167) -> dict[str, Any]:
    from caffe_lmdb.samplers import BlockShuffleSampler

    path = workdir / "resume.lmdb"
    make_lmdb(path, records)
    batch = max(1, records // 400)
    per_epoch = -(-records // batch)
    at = int(per_epoch * 0.9)
    one_percent = max(1, per_epoch // 100)
    source = _loader(path, batch)
    iterator = iter(source)
    for _ in range(at):
        next(iterator)
    state = source.state_dict()
    del iterator
    timings: dict[str, list[float]] = {name: [] for name in (
        "resume s", "read 1% s", "first batch after resume s", "first batch of an epoch s", "epoch s",
        "epoch with state_dict every batch s")}
    for _ in range(passes):
        fresh = _loader(path, batch)
        timings["resume s"].append(_seconds(lambda fresh=fresh: (fresh.load_state_dict(state), iter(fresh))))
        resumed = _loader(path, batch)
        resumed.load_state_dict(state)
        timings["first batch after resume s"].append(_seconds(lambda resumed=resumed: next(iter(resumed))))
        start = _loader(path, batch)
        timings["first batch of an epoch s"].append(_seconds(lambda start=start: next(iter(start))))
        middle = iter(start)
        for _ in range(per_epoch // 2):
            next(middle)
        timings["read 1% s"].append(_seconds(lambda middle=middle: [next(middle) for _ in range(one_percent)]))
        del middle
        timings["epoch s"].append(_seconds(lambda start=start: [None for _ in start]))
        timings["epoch with state_dict every batch s"].append(
            _seconds(lambda start=start: [start.state_dict() for _ in start]))
    results: dict[str, Any] = {"records": records, "batch": batch, "resumed at batch": at,
                               "of batches": per_epoch, "1% of the epoch, batches": one_percent,
                               **{name: values for name, values in timings.items()}}
    results["resume / read 1%"] = _median(timings["resume s"]) / _median(timings["read 1% s"])
    results["first batch: resumed / from the start"] = (_median(timings["first batch after resume s"])
                                                        / _median(timings["first batch of an epoch s"]))
    ratios = [b / a for a, b in zip(timings["epoch s"], timings["epoch with state_dict every batch s"], strict=True)]
    results["epoch with state_dict / without"] = {"median": _median(ratios), "runs": ratios}
    results["state_dict us"] = _state_dict_micros(path, batch, records, BlockShuffleSampler)
    batch_us = _median(timings["epoch s"]) / per_epoch * 1e6
    results["state_dict / a batch"] = results["state_dict us"]["shuffle"] / batch_us  # calling it every batch adds this
    results["sampler"] = _sampler_resume(sampler_records, passes, BlockShuffleSampler)
    return results


def _state_dict_micros(path: Path, batch: int, records: int, sampler_class: Any) -> dict[str, float]:
    """Median microseconds of `state_dict()` mid-epoch, without a sampler and with a BlockShuffleSampler."""
    out = {}
    for name, sampler in (("shuffle", None), ("BlockShuffleSampler", sampler_class(range(records), 64, 1, 0))):
        loader = _loader(path, batch, sampler)
        iterator = iter(loader)
        next(iterator)
        loader.state_dict()  # the LMDB fingerprint, made once per loader
        calls = []
        for _ in range(200):
            started = time.perf_counter()
            loader.state_dict()
            calls.append((time.perf_counter() - started) * 1e6)
        out[name] = _median(calls)
        del iterator
    return out


def _sampler_resume(records: int, passes: int, sampler_class: Any) -> dict[str, Any]:
    """`load_state_dict` + the first index of a BlockShuffleSampler resumed at 90%, on 8 ranks and on 4."""
    dataset = range(records)
    saved = sampler_class(dataset, num_replicas=8, rank=0)
    saved.set_epoch(3)
    iterator = iter(saved)
    for _ in range(int(len(saved) * 0.9)):
        next(iterator)
    state = saved.state_dict()
    out: dict[str, Any] = {"records": records}
    for label, ranks in (("same 8 ranks ms", 8), ("8 -> 4 ranks ms", 4)):
        runs = []
        for _ in range(passes):
            resumed = sampler_class(dataset, num_replicas=ranks, rank=ranks - 1)
            runs.append(_seconds(lambda resumed=resumed: (resumed.load_state_dict(state), next(iter(resumed))))
                        * 1000)
        out[label] = _median(runs)
    whole = sampler_class(dataset, num_replicas=8, rank=7)
    out["a whole epoch's first index ms"] = _median([_seconds(lambda: next(iter(whole))) * 1000
                                                      for _ in range(passes)])
    return out


def format_report(results: dict[str, Any]) -> str:
    ms = {name: _median(values) * 1000 for name, values in results.items() if name.endswith(" s")}
    sampler = results["sampler"]
    whole = sampler["a whole epoch's first index ms"]
    return "\n".join([
        f"resume: {results['records']} records, batches of {results['batch']}, resumed at batch "
        f"{results['resumed at batch']} of {results['of batches']} (90%)",
        f"  load_state_dict + iter() {ms['resume s']:.3f} ms vs reading 1% ({results['1% of the epoch, batches']} "
        f"batches) {ms['read 1% s']:.2f} ms: resume / read 1% {results['resume / read 1%']:.3f} (target < 1)",
        f"  first batch after the resume {ms['first batch after resume s']:.2f} ms vs from the epoch's start "
        f"{ms['first batch of an epoch s']:.2f} ms: {results['first batch: resumed / from the start']:.2f}",
        f"  state_dict(): {results['state_dict us']['shuffle']:.1f} us (shuffle), "
        f"{results['state_dict us']['BlockShuffleSampler']:.1f} us (BlockShuffleSampler)",
        f"  epoch {ms['epoch s']:.0f} ms; with state_dict() after every batch / without: median "
        f"{results['epoch with state_dict / without']['median']:.3f} (runs "
        f"{', '.join(f'{r:.3f}' for r in results['epoch with state_dict / without']['runs'])}); one state_dict() "
        f"is {results['state_dict / a batch']:.5f} of a batch's time",
        f"  BlockShuffleSampler over {sampler['records']} records resumed at 90%: same 8 ranks "
        f"{sampler['same 8 ranks ms']:.1f} ms, 8 -> 4 ranks {sampler['8 -> 4 ranks ms']:.1f} ms (a whole epoch's "
        f"first index {whole:.1f} ms)",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--sampler-records", type=int, default=1_281_167)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        print(format_report(bench_resume_state(Path(work), args.records, args.passes, args.sampler_records)))


if __name__ == "__main__":
    main()
