"""Round-trip a folder of images through the Datum codec: `python tools/selftest.py img/train`."""

import sys

from caffe_lmdb.cli import main

if __name__ == "__main__":
    sys.exit(main(["selftest", *sys.argv[1:]]))
