"""What an append costs, three ways (docs/benchmarks.md): records are prebuilt, so only writing is timed.

    python benchmarks/append_designs.py [--old 2000] [--new 2000] [--dir /tmp]

* copy: what `convert --append` does: copy data.mdb aside (copy_file_range), append there in 4 MiB
  transactions, publish by rename;
* one-txn: put every new record into the published LMDB in one write transaction;
* small-txns: in place in 4 MiB transactions (not atomic: a reference for the cost of writing only).
Each runs in a fresh process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np

RECORD = 256 * 256 * 3


def records(start: int, count: int):
    value = np.random.default_rng(0).integers(0, 256, RECORD, dtype=np.uint8).tobytes()
    for i in range(start, start + count):
        yield f"{i:08d}_x.jpg".encode(), value


def build(path: Path, count: int) -> None:
    from caffe_lmdb.atomic_lmdb import AtomicLmdb

    with AtomicLmdb(path) as out:
        for key, value in records(0, count):
            out.put(key, value)
        out.finish()


def run(design: str, path: Path, old: int, new: int) -> dict:
    from caffe_lmdb.append_resume import read_previous
    from caffe_lmdb.atomic_lmdb import AtomicLmdb

    start = time.perf_counter()
    if design == "copy":
        with AtomicLmdb(path, previous=read_previous(path)) as out:
            for key, value in records(old, new):
                out.put(key, value)
            out.finish()
    else:
        env = lmdb.open(str(path), map_size=1 << 40, sync=False, metasync=False, readahead=False)
        if design == "one-txn":
            with env.begin(write=True) as txn, txn.cursor() as cursor:
                cursor.putmulti(records(old, new), append=True)
        else:
            batch, size = [], 0
            for key, value in records(old, new):
                batch.append((key, value))
                size += len(value)
                if size >= 4 << 20:
                    with env.begin(write=True) as txn:
                        txn.cursor().putmulti(batch, append=True)
                    batch, size = [], 0
            with env.begin(write=True) as txn:
                txn.cursor().putmulti(batch, append=True)
        env.sync(True)
        env.close()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=int, default=2000)
    parser.add_argument("--new", type=int, default=2000)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--child", nargs=2, metavar=("DESIGN", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run(args.child[0], Path(args.child[1]), args.old, args.new)))
        return
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        base = work / "base.lmdb"
        build(base, args.old)
        for design in ("copy", "one-txn", "small-txns"):
            target = work / f"{design}.lmdb"
            shutil.copytree(base, target)
            shutil.copy(work / "base_keys.npy", work / f"{design}_keys.npy")
            os.sync()
            out = subprocess.run([sys.executable, __file__, "--old", str(args.old), "--new", str(args.new),
                                  "--child", design, str(target)], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout)
            print(f"{design:10s} {result['seconds']:6.2f} s  peak RSS {result['peak_rss_mib']:5d} MiB")
            shutil.rmtree(target)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
