"""Benchmarks: `python tools/bench.py --quick` (~1 minute) or the full run (`make bench`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.bench import main

if __name__ == "__main__":
    sys.exit(main())
