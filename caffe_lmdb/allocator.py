"""Keep freed memory in the heap while converting: fresh pages cost more than decoding here.

A raw 256x256 record is 192 KiB. glibc serves blocks that size with `mmap` and gives them back
with `munmap` (or trims the heap top after each LMDB commit), so every decoded image and every
LMDB dirty page is first-touched memory again: one page fault per 4 KiB. On virtual machines a
fault is expensive enough to slow a plain Pillow decode loop down by up to half and to make
LMDB's own copies the biggest cost of a conversion (figures: docs/benchmarks.md). Raising
glibc's mmap and trim thresholds lets the same pages be reused.

Only glibc has `mallopt`; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap (glibc's upper limit for the mmap threshold on 64-bit).
MMAP_THRESHOLD = 32 << 20
#: The heap top is given back to the kernel only when this much of it is free (glibc's own
#: adaptive rule would reach 2 x the mmap threshold).
TRIM_THRESHOLD = 64 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def set_heap_retention() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (and children forked later).

    glibc raises them by itself after large frees (up to these values), but only part way and
    only after the first ones; setting them fixes them for the process's life. Not undone:
    setting glibc's defaults back would also switch its adaptation off and leave the process
    slower than before it was raised (figures: docs/benchmarks.md).
    Returns False where there is no glibc `mallopt` (nothing changed).
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


@contextmanager
def retained_heap() -> Iterator[bool]:
    """Within the block freed memory stays in the heap for reuse; at its end it is given back.

    Yields whether the setting is in effect (glibc only).
    """
    applied = set_heap_retention()
    try:
        yield applied
    finally:
        if applied:
            _glibc().malloc_trim(0)
