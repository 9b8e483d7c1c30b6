"""Caffe's own layout: one `Datum` per key (raw planar BGR or encoded), as `convert_imageset` writes it.

Also what caffe-lmdb writes, and what NVIDIA DIGITS writes: DIGITS keys records `'%08d_%d' %
(index, label)` and fills `channels`/`height`/`width` on encoded records too, which Caffe leaves
0; both read as any Datum. The samples are the keys file's keys (`<stem>_keys.npy`, written
beside by the converter) when it matches the LMDB, else every key in LMDB order (key index).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .datum import datum_to_image, parse_datum_view
from .errors import DatumError
from .foreign_values import foreign_kind
from .keys import load_keys
from .layouts import Layout, Probe
from .tool_reading import keys_file_for


class DatumLayout(Layout):
    """Caffe Datum records; the target is the Datum's int `label`."""

    name = "datum"

    def __init__(self) -> None:
        self.keys = np.empty(0, dtype="S1")

    @classmethod
    def detect(cls, probe: Probe) -> DatumLayout | None:
        if not probe.first_keys:
            return cls()  # an empty LMDB: Caffe's tools make these too
        value = probe.value(probe.first_keys[0])
        if value is None or foreign_kind(value) is not None:
            return None
        try:
            view = parse_datum_view(value)
        except DatumError:
            return None
        if not view.encoded and not view.data and not len(view.float_data):
            return None  # a Datum-shaped accident (e.g. a short text value): no pixels
        return cls()

    def open(self, probe: Probe) -> None:
        keys_file = keys_file_for(probe.path)
        if keys_file is not None:
            keys = load_keys(keys_file)
            if len(keys) == probe.entries:
                self.keys = keys
                return
        self.keys = probe.all_keys()

    def __len__(self) -> int:
        return len(self.keys)

    def sample_keys(self, index: int) -> Sequence[bytes]:
        return (self.keys[index],)

    def stored(self, values: Sequence[Any]) -> tuple[tuple[bytes | np.ndarray, ...], Any]:
        view = parse_datum_view(values[0])
        if view.encoded:
            return (bytes(view.data),), view.label
        return (np.asarray(datum_to_image(view, "RGB")),), view.label

    def decode(self, values: Sequence[Any]) -> tuple[Any, Any]:
        view = parse_datum_view(values[0])
        return datum_to_image(view, "RGB"), view.label

    def describe(self) -> str:
        return "datum (Caffe Datum records; target: the int label)"
