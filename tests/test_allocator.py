"""The heap retention the converter sets: 192 KiB blocks stop costing a page fault per 4 KiB."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

from caffe_lmdb import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="needs glibc's mallopt")

# 200 times: allocates four 192 KiB blocks (an image, its planes, a record), touches them, frees
# them; prints the minor page faults that cost.
_CHURN = """
import resource, sys
sys.path.insert(0, {repo!r})
from caffe_lmdb.allocator import retained_heap
def churn():
    for _ in range(20):  # warm up
        bytearray(196608)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(200):
        blocks = [bytearray(196608) for _ in range(4)]
        for block in blocks:
            block[::4096] = b"x" * len(block[::4096])
        del blocks, block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
if {retain}:
    with retained_heap() as applied:
        assert applied
        print(churn())
else:
    print(churn())
"""


def _faults(retain: bool) -> int:
    code = _CHURN.format(repo=str(REPO), retain=retain)
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_retained_heap_reuses_freed_blocks_instead_of_faulting_in_fresh_pages():
    assert _faults(retain=False) >= 200 * 40  # glibc trims the freed heap top: fresh pages each time
    assert _faults(retain=True) < 200


def test_retention_is_kept_after_the_block():
    """Setting glibc's defaults back would switch off its adaptive thresholds and slow the process down."""
    code = _CHURN.format(repo=str(REPO), retain=False).replace(
        "else:\n    print(churn())", "else:\n    with retained_heap():\n        pass\n    print(churn())")
    faults = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert faults < 200


_LIBRARY_CALLS = """
import resource, sys
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from pathlib import Path
import numpy as np
from PIL import Image
from caffe_lmdb import allocator, convert, merge, migrate
from test_migration import folder2lmdb_pickle
tmp = Path({tmp!r})
rng = np.random.default_rng(0)
for i in range(8):
    Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(tmp / "src" / f"c{{i % 2}}" / f"{{i}}.png")
if {retain}:
    allocator.set_heap_retention()
convert(tmp / "src", tmp / "a.lmdb", workers=0, progress=False)
convert(tmp / "src", tmp / "b.lmdb", workers=2, progress=False)
merge([tmp / "a.lmdb"], tmp / "m.lmdb", progress=False)
folder2lmdb_pickle(tmp / "old.lmdb", [(tmp / "src" / "c0" / "0.png").read_bytes()], [0])
migrate(tmp / "old.lmdb", tmp / "new.lmdb", progress=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # 15 MiB of 192 KiB blocks: glibc's own thresholds give the freed heap back, retention keeps it
    blocks = [bytearray(196608) for _ in range(80)]
    for block in blocks:
        block[::4096] = b"x" * len(block[::4096])
    del blocks, block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_after_library_calls(tmp_path, retain: bool) -> int:
    for name in ("c0", "c1"):
        (tmp_path / "src" / name).mkdir(parents=True)
    code = _LIBRARY_CALLS.format(repo=str(REPO), tests=str(REPO / "tests"), tmp=str(tmp_path), retain=retain)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "new.lmdb").is_dir() and (tmp_path / "m.lmdb").is_dir()
    return int(done.stdout.split()[-1])


def test_library_calls_leave_malloc_as_they_found_it(tmp_path):
    """convert (0 and 2 workers), merge and migrate called from a program leave glibc's thresholds its own.

    The same program with the retention set keeps the freed heap; without it the heap is given back
    as glibc decides. Only the worker processes and the `caffe-lmdb` program itself, which are ours,
    retain freed heap.
    """
    untouched = _faults_after_library_calls(tmp_path / "a", retain=False)
    retained = _faults_after_library_calls(tmp_path / "b", retain=True)
    assert untouched > 3 * retained, (untouched, retained)


def test_the_program_itself_retains_freed_heap(tmp_path):
    code = _CHURN.format(repo=str(REPO), retain=False).replace(
        "else:\n    print(churn())", "else:\n    from caffe_lmdb import cli\n    try:\n        cli.run(['--version'])\n"
        "    except SystemExit:\n        pass\n    print(churn())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(done.stdout.split()[-1]) < 200
