"""Compute Caffe's mean.binaryproto: `python tools/mean.py train.lmdb -o mean.binaryproto --json stats.json`.

See `python tools/mean.py --help`; the same as `caffe-lmdb mean`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from caffe_lmdb.cli import run

if __name__ == "__main__":
    run(["mean", *sys.argv[1:]])
