"""Look inside LMDBs in a web browser, read-only: `python tools/serve.py img/train.lmdb img/val.lmdb`.

See `python tools/serve.py --help`; the same as `caffe-lmdb serve`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from caffe_lmdb.cli import run

if __name__ == "__main__":
    run(["serve", *sys.argv[1:]])
