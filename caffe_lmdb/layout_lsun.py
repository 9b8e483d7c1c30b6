"""LSUN (fyu/lsun): one encoded image per key, keys the 40 hex digits of a SHA-1, no labels.

The scene categories hold JPEG bytes, the objects release WebP: the format is read from the
magic bytes, never assumed. The class is the LMDB's folder name, `<category>_<split>_lmdb`
(`church_outdoor_train_lmdb`); there are no meta keys, so the keys come from the key index.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from .formats import sniff_image_format
from .layouts import Layout, Probe

_HASH_KEY = re.compile(rb"[0-9a-f]{40}")
_FOLDER = re.compile(r"(?P<category>.+?)_(?P<split>train|val|test)_lmdb")


def lsun_category(lmdb_name: str) -> str:
    """`church_outdoor` for `church_outdoor_train_lmdb`; the name itself when it is not LSUN's pattern."""
    match = _FOLDER.fullmatch(lmdb_name)
    return match["category"] if match else lmdb_name


class LsunLayout(Layout):
    """LSUN's layout; the target is the category (the folder name without `_<split>_lmdb`), a str."""

    name = "lsun"
    class_targets = True

    def __init__(self, category: str) -> None:
        self.category = category
        self.keys = np.empty(0, dtype="S40")

    @classmethod
    def detect(cls, probe: Probe) -> LsunLayout | None:
        if not probe.first_keys or not all(_HASH_KEY.fullmatch(key) for key in probe.first_keys):
            return None
        value = probe.value(probe.first_keys[0])
        if value is None or sniff_image_format(value) is None:
            return None
        return cls(lsun_category(probe.name))

    def open(self, probe: Probe) -> None:
        self.keys = probe.all_keys()

    def __len__(self) -> int:
        return len(self.keys)

    def sample_keys(self, index: int) -> Sequence[bytes]:
        return (self.keys[index],)

    def stored(self, values: Sequence[Any]) -> tuple[tuple[bytes, ...], Any]:
        return (bytes(values[0]),), self.category

    def describe(self) -> str:
        return f"lsun (encoded images under SHA-1 keys; target: the category {self.category!r})"
