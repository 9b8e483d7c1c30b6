"""Keep freed memory in the heap while converting: fresh pages cost more than decoding here.

A raw 256x256 record is 192 KiB. glibc serves blocks that size with `mmap` and gives them back
with `munmap` (or trims the heap top after each LMDB commit), so every decoded image and every
LMDB dirty page is first-touched memory again: one page fault per 4 KiB. On virtual machines a
fault costs microseconds, and measured on the 2-core benchmark machine this doubled the time of
a plain Pillow decode loop (2.2k vs 3.9k images/s) and made LMDB's own copies the biggest cost of
a conversion. Raising glibc's mmap and trim thresholds lets the same pages be reused.

Only glibc has `mallopt`; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap (glibc's upper limit for the mmap threshold on 64-bit).
MMAP_THRESHOLD = 32 << 20
#: The heap top is given back to the kernel only when this much of it is free.
TRIM_THRESHOLD = 256 << 20
# glibc's defaults, restored afterwards (once set, glibc stops adapting them by itself).
_DEFAULT_THRESHOLD = 128 << 10


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def set_heap_retention(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds for this process (and children forked later).

    Returns False where there is no glibc `mallopt` (nothing changed).
    """
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    )


_depth = 0  # nested blocks: only the outermost one sets and restores


@contextmanager
def retained_heap() -> Iterator[bool]:
    """Within the block, freed memory stays in the heap for reuse; afterwards it is given back.

    Blocks nest (a benchmark around conversions): only the outermost one changes the setting.
    Yields whether the setting is in effect (glibc only).
    """
    global _depth
    applied = set_heap_retention() if _depth == 0 else _glibc() is not None
    _depth += 1
    try:
        yield applied
    finally:
        _depth -= 1
        if applied and _depth == 0:
            set_heap_retention(_DEFAULT_THRESHOLD, _DEFAULT_THRESHOLD)
            _glibc().malloc_trim(0)
