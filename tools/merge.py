"""Merge shard LMDBs into one: `python tools/merge.py 'train-*-of-00008.lmdb' -o train.lmdb`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from caffe_lmdb.cli import run

if __name__ == "__main__":
    run(["merge", *sys.argv[1:]])
