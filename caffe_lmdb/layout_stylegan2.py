"""stylegan2-pytorch's layout (`prepare_data.py`): every resolution of every image in one LMDB, no labels.

Image i at resolution s is the JPEG under `f"{s}-{str(i).zfill(5)}"` (`256-00042`; from 100000 on
the number simply has more digits), and `length` holds the images per resolution (ASCII
decimal). A dataset reads one resolution: the largest by default, or the one a
`Stylegan2Layout(resolution=...)` asks for. The resolutions present are found by seeking, not
scanning: the keys of one resolution are contiguous in LMDB order (they share the prefix `s-`),
so one cursor seek past `s.` (`.` sorts right after `-`) lands on the next resolution's first key.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from typing import Any

from .errors import LmdbFormatError
from .layouts import Layout, Probe, checked_count
from .safe_lmdb import lmdb_errors_named

_IMAGE_KEY = re.compile(rb"([1-9][0-9]*)-[0-9]{5,}")
_COUNT_KEY = b"length"
#: Keys outside the scheme the resolution walk steps over one by one before it gives up
#: (`prepare_data.py` writes one: `length`).
MAX_OTHER_KEYS = 1024


class Stylegan2Layout(Layout):
    """stylegan2-pytorch's LMDB read at one resolution; the item is `(image, None)`.

    Args:
        resolution: the image size to read (one of those stored); None reads the largest.
    """

    name = "stylegan2"

    def __init__(self, resolution: int | None = None) -> None:
        self.resolution = None if resolution is None else operator.index(resolution)
        #: The resolutions the LMDB holds, ascending (known once opened).
        self.resolutions: tuple[int, ...] = ()
        self.count = 0

    @classmethod
    def detect(cls, probe: Probe) -> Stylegan2Layout | None:
        first = _IMAGE_KEY.fullmatch(probe.first_keys[0]) if probe.first_keys else None
        if first is None or probe.value(_COUNT_KEY) is None:
            return None
        if probe.value(first[1] + b"-00000") is None:
            return None
        try:
            resolutions = stored_resolutions(probe)
        except LmdbFormatError:
            return None
        return cls(resolutions[-1])

    def open(self, probe: Probe) -> None:
        self.resolutions = stored_resolutions(probe)
        if self.resolution is None:
            self.resolution = self.resolutions[-1]
        elif self.resolution not in self.resolutions:
            raise LmdbFormatError(f"{probe.path}: no images at resolution {self.resolution}; the LMDB holds "
                                  f"{', '.join(map(str, self.resolutions))}")
        self.count = checked_count(probe, _COUNT_KEY, probe.value(_COUNT_KEY), per_sample=len(self.resolutions))

    def __len__(self) -> int:
        return self.count

    def sample_keys(self, index: int) -> Sequence[bytes]:
        return (f"{self.resolution}-{str(index).zfill(5)}".encode(),)

    def stored(self, values: Sequence[Any]) -> tuple[tuple[bytes, ...], None]:
        return (bytes(values[0]),), None

    def describe(self) -> str:
        held = ", ".join(map(str, self.resolutions)) or "not yet opened"
        return f"stylegan2 (JPEGs under '<size>-<index>' keys, sizes {held}; reading {self.resolution}; target: None)"


def stored_resolutions(probe: Probe) -> tuple[int, ...]:
    """The resolutions of a stylegan2 LMDB, ascending: one cursor seek per resolution, no key scan.

    Raises:
        LmdbFormatError: no key of the `<size>-<index>` scheme, or more than `MAX_OTHER_KEYS`
            keys outside it (not this layout), naming the LMDB.
    """
    found: set[int] = set()
    others = 0
    cursor = probe.txn.cursor()
    with lmdb_errors_named(probe.path, "listing its resolutions"):
        present = cursor.first()
        while present:
            match = _IMAGE_KEY.fullmatch(bytes(cursor.key()))
            if match is not None:
                found.add(int(match[1]))
                present = cursor.set_range(match[1] + b".")  # past every key of this resolution
                continue
            others += 1
            if others > MAX_OTHER_KEYS:
                raise LmdbFormatError(f"{probe.path}: more than {MAX_OTHER_KEYS} keys outside stylegan2's "
                                      "'<size>-<index>' scheme: not a stylegan2-pytorch LMDB")
            present = cursor.next()
    if not found:
        raise LmdbFormatError(f"{probe.path}: no '<size>-<index>' keys: not a stylegan2-pytorch LMDB")
    return tuple(sorted(found))
