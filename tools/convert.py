"""Convert images to a Caffe Datum LMDB: `python tools/convert.py img/train train.lmdb --keys train_keys.npy`.

See `python tools/convert.py --help`; the same as `caffe-lmdb convert`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from caffe_lmdb.cli import run

if __name__ == "__main__":
    run(["convert", *sys.argv[1:]])
