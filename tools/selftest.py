"""Round-trip a folder of images through the Datum codec: `python tools/selftest.py img/train`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from caffe_lmdb.cli import main

if __name__ == "__main__":
    sys.exit(main(["selftest", *sys.argv[1:]]))
