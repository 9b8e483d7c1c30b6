"""Instant start (issue 24): the second open of an LMDB whose keys must be scanned, against the first.

An LSUN-layout LMDB (SHA-1 hex keys, small JPEG values) of `keys` records is opened with
`LmdbDataset`: the first open scans every key (key-only cursor walk) and keeps the key index;
the second reads the kept index. Both in this process, page cache warm (the scan's best case),
alternating over `passes` rounds; the figure is the median of second / first.

    python benchmarks/instant_start.py [--keys 200000] [--passes 5] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import io
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
from PIL import Image


def make_lsun_like(path: Path, keys: int) -> None:
    """`keys` records under SHA-1 hex keys, each a small JPEG (the same bytes: only the keys matter)."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, "JPEG")
    value = buffer.getvalue()
    env = lmdb.open(str(path), map_size=1 << 34)
    with env.begin(write=True) as txn:
        for i in range(keys):
            txn.put(hashlib.sha1(b"%d" % i).hexdigest().encode(), value)
    env.close()


def _open_seconds(path: Path) -> float:
    from caffe_lmdb.lmdb_dataset import LmdbDataset

    gc.collect()  # the previous dataset's environment closes with it
    started = time.perf_counter()
    dataset = LmdbDataset(path)
    elapsed = time.perf_counter() - started
    assert len(dataset) > 0
    del dataset
    return elapsed


def bench_instant_start(workdir: Path, keys: int, passes: int) -> dict[str, Any]:
    path = workdir / "scene_train_lmdb"
    make_lsun_like(path, keys)
    first, second = [], []
    for _ in range(passes):
        for index in workdir.glob(".scene_train_lmdb.keys-*.npy"):
            index.unlink()
        first.append(_open_seconds(path))
        second.append(_open_seconds(path))
    ratios = [b / a for a, b in zip(first, second, strict=True)]
    return {"keys": keys, "first open s": first, "second open s": second,
            "second / first": {"median": statistics.median(ratios), "runs": ratios}}


def format_report(results: dict[str, Any]) -> str:
    ratio = results["second / first"]
    return (f"instant start: {results['keys']} keys, first open (scan) median "
            f"{statistics.median(results['first open s']) * 1000:.1f} ms, second open (key index) median "
            f"{statistics.median(results['second open s']) * 1000:.2f} ms; second / first median "
            f"{ratio['median']:.4f} (runs {', '.join(f'{r:.4f}' for r in ratio['runs'])})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=200_000)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as work:
        print(format_report(bench_instant_start(Path(work), args.keys, args.passes)))


if __name__ == "__main__":
    main()
