"""Write the records of an LMDB back as image files plus a list file: `python tools/export.py img/train.lmdb out/`.

See `python tools/export.py --help`; the same as `caffe-lmdb export`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from caffe_lmdb.cli import run

if __name__ == "__main__":
    run(["export", *sys.argv[1:]])
