"""Round-trip a folder of images through the Datum codec: `python tools/selftest.py img/train`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from caffe_lmdb.cli import run

if __name__ == "__main__":
    run(["selftest", *sys.argv[1:]])
