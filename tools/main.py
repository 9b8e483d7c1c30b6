"""The loader check: an LMDB through LmdbDataset_train and a DataLoader: `python tools/main.py img/train.lmdb`.

See `python tools/main.py --help`; the same as `caffe-lmdb loader`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from caffe_lmdb.cli import run

if __name__ == "__main__":
    run(["loader", *sys.argv[1:]])
