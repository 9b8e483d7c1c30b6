"""Check every record of a Datum LMDB and its keys file: `python tools/verify.py img/train.lmdb --decode`.

See `python tools/verify.py --help`; the same as `caffe-lmdb verify`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from caffe_lmdb.cli import run

if __name__ == "__main__":
    run(["verify", *sys.argv[1:]])
