"""Issue 15's two speed checks, for `make bench` to run (docs/benchmarks.md):

* `write_dataset` over a torch `Dataset` returning paths, against `convert` of the same list (target >= 0.9x);
* a conversion killed (SIGKILL) at ~60% of its output and finished with `--resume`, against a full run
  (target <= 0.5x). Dirty pages are written out (`os.sync`) after the kill; the writer's
  `DONTNEED` writeback has already dropped most of the leftover's pages from the page cache, so
  the resume finds them mostly on disk, as after a preempted machine restarts.

    python benchmarks/continuing.py [--images 12000] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


class PathDataset:
    """A map-style dataset of (path, label), as a torch Dataset over a list file would be."""

    def __init__(self, lines: list[str], root: Path) -> None:
        self.lines, self.root = lines, root

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, index: int) -> tuple[str, int]:
        path, label = self.lines[index].rsplit(" ", 1)
        return str(self.root / path), int(label)


def make_input(work: Path, images: int) -> Path:
    rng = np.random.default_rng(1)
    (work / "src").mkdir()
    for i in range(200):
        Image.fromarray(rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)).save(work / "src" / f"{i}.jpg",
                                                                                        quality=90)
    listing = work / "list.txt"
    listing.write_text("".join(f"{i % 200}.jpg {i % 7}\n" for i in range(images)))
    return listing


def resume_ratio(work: Path, listing: Path) -> tuple[float, float]:
    cmd = [sys.executable, str(REPO / "tools" / "convert.py"), "--list", str(listing), "--root", str(work / "src"),
           "-q"]
    os.sync()
    start = time.perf_counter()
    subprocess.run([*cmd, str(work / "full.lmdb")], check=True, capture_output=True)
    full = time.perf_counter() - start
    size = (work / "full.lmdb" / "data.mdb").stat().st_size
    proc = subprocess.Popen([*cmd, str(work / "cut.lmdb")], stdout=subprocess.DEVNULL)
    while proc.poll() is None:
        partial = list(work.glob(".cut.lmdb.tmp-*/data.mdb"))
        if partial and partial[0].stat().st_size >= 0.6 * size:
            break
        time.sleep(0.002)
    if proc.returncode is None:  # a tiny run may finish first: then the "resume" is a whole run
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    os.sync()
    start = time.perf_counter()
    subprocess.run([*cmd, str(work / "cut.lmdb"), "--resume"], check=True, capture_output=True)
    return full, time.perf_counter() - start


def dataset_ratio(work: Path, listing: Path) -> tuple[float, float]:
    from caffe_lmdb import convert, write_dataset

    lines = listing.read_text().splitlines()
    start = time.perf_counter()
    convert(listing, work / "c.lmdb", root=work / "src", progress=False)
    converted = time.perf_counter() - start
    start = time.perf_counter()
    write_dataset(PathDataset(lines, work / "src"), work / "w.lmdb", progress=False)
    return converted, time.perf_counter() - start


def bench_continuing(workdir: Path, images: int, passes: int = 3) -> dict[str, Any]:
    """Both checks, `passes` times each on the same input; medians of the per-pass ratios (for `make bench`)."""
    work = Path(tempfile.mkdtemp(dir=workdir, prefix="continuing-"))
    try:
        listing = make_input(work, images)
        dataset, resume = [], []
        for _ in range(passes):
            for name in ("c.lmdb", "w.lmdb", "full.lmdb", "cut.lmdb"):
                shutil.rmtree(work / name, ignore_errors=True)
                for side in work.glob(f"{name.removesuffix('.lmdb')}_*"):
                    side.unlink()
            converted, written = dataset_ratio(work, listing)
            dataset.append(converted / written)
            full, resumed = resume_ratio(work, listing)
            resume.append(resumed / full)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"images": images, "passes": passes,
            "write_dataset / convert": {"median": statistics.median(dataset), "runs": dataset},
            "resume / full run": {"median": statistics.median(resume), "runs": resume}}


def format_report(results: dict[str, Any]) -> str:
    dataset, resume = results["write_dataset / convert"], results["resume / full run"]
    return "\n".join([
        f"continuing: {results['images']} 256x256 JPEGs by list file, median of {results['passes']} runs",
        f"  write_dataset over paths / convert   {dataset['median']:5.2f}  (runs "
        f"{', '.join(f'{r:.2f}' for r in dataset['runs'])})   target >= 0.9",
        f"  killed at 60% + --resume / full run  {resume['median']:5.2f}  (runs "
        f"{', '.join(f'{r:.2f}' for r in resume['runs'])})   target <= 0.5 (time, lower is better)",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12000)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        listing = make_input(work, args.images)
        converted, written = dataset_ratio(work, listing)
        print(f"write_dataset over paths: {args.images / written:.0f} images/s, convert {args.images / converted:.0f}: "
              f"{converted / written:.2f}x (target >= 0.9x)")
        full, resumed = resume_ratio(work, listing)
        print(f"killed at 60% and resumed: {resumed:.2f} s against a full run's {full:.2f} s: {resumed / full:.2f}x "
              "(target <= 0.5x)")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
