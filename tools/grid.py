"""Save a contact sheet of random records with labels: `python tools/grid.py img/train.lmdb -o samples.png`.

See `python tools/grid.py --help`; the same as `caffe-lmdb grid`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from caffe_lmdb.cli import run

if __name__ == "__main__":
    run(["grid", *sys.argv[1:]])
