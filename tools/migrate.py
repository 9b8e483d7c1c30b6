"""Rewrite a pickle/msgpack LMDB as a Caffe Datum LMDB: `python tools/migrate.py old.lmdb new.lmdb`.

See `python tools/migrate.py --help`; the same as `caffe-lmdb migrate`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from caffe_lmdb.cli import run

if __name__ == "__main__":
    run(["migrate", *sys.argv[1:]])
