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
