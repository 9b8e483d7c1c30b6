"""Summarise a Datum LMDB without decoding images: `python tools/info.py img/train.lmdb`.

See `python tools/info.py --help`; the same as `caffe-lmdb info`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from caffe_lmdb.cli import run

if __name__ == "__main__":
    run(["info", *sys.argv[1:]])
