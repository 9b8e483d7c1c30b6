"""What an LMDB layout is to the reader: how samples are found (keys) and what a sample's values mean.

Image LMDBs differ in two things only: which keys make up sample i (Caffe: one key per record,
listed in a keys file; CRNN: `image-%09d` and `label-%09d`, computed from i; LSUN: hashes that
must be scanned) and how the values decode into `(image, target)`. A `Layout` says both. The
reader (`reader.LayoutReader`) does everything else once for all of them: the read-only
environment per process, the identity check, prefetch, and naming the LMDB and the key in every
error. `reader.LAYOUTS` lists the layouts in the order detection tries them; a new layout is a
`Layout` subclass added there.

A layout instance is plain data (numbers, strings, a numpy key array), so it pickles to spawned
workers and is shared by forked ones. Decoded images are RGB PIL images with the pixels OpenCV
gives for the same bytes (`image_files.open_image`): the LMDBs' own readers decode with OpenCV.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lmdb
import numpy as np
from PIL import Image

from .errors import DatumError, LmdbFormatError
from .image_files import open_image
from .key_index import cached_keys
from .keys import txn_keys
from .safe_lmdb import get_value, lmdb_errors_named

#: How many keys, in LMDB order, detection looks at.
PROBE_KEYS = 64


@dataclass
class Probe:
    """What detection sees of an LMDB: its path, entry count, first keys, values on demand, side files.

    Valid only while the transaction it was made with is open (during `Layout.detect` and `open`).
    """

    path: str
    txn: lmdb.Transaction
    entries: int
    identity: tuple[int, ...]
    first_keys: list[bytes] = field(default_factory=list)
    #: Whether a key scan's result is kept as the key index (False: nothing is written).
    keep_index: bool = True
    _keys: np.ndarray | None = None

    @classmethod
    def of(cls, path: str, txn: lmdb.Transaction, identity: tuple[int, ...], *, keep_index: bool = True) -> Probe:
        entries = txn.stat()["entries"]
        cursor = txn.cursor()
        first: list[bytes] = []
        with lmdb_errors_named(path, "reading its first keys"):
            if cursor.first():
                for key in cursor.iternext(keys=True, values=False):
                    first.append(bytes(key))
                    if len(first) >= PROBE_KEYS:
                        break
        return cls(path, txn, entries, identity, first, keep_index)

    @property
    def name(self) -> str:
        """The LMDB's own name (`church_outdoor_train_lmdb`, `train.lmdb`)."""
        return Path(os.path.abspath(self.path)).name

    def value(self, key: bytes) -> memoryview | bytes | None:
        """The value of `key`, or None; a view valid while the probe's transaction is open."""
        return get_value(self.txn, key, self.path)

    def side_file(self, name: str) -> Path | None:
        """A regular file `name` that travels with the LMDB: inside its folder, or beside a single-file LMDB."""
        root = Path(self.path)
        candidate = root / name if root.is_dir() else root.parent / name
        return candidate if candidate.is_file() else None

    def all_keys(self) -> np.ndarray:
        """Every key in LMDB order: from the cached key index, else one key-only scan that is then cached
        (unless `keep_index` is False)."""
        if self._keys is None:
            self._keys = cached_keys(self.path, self.identity, self.entries, lambda: txn_keys(self.txn),
                                     keep=self.keep_index)
        return self._keys


class Layout:
    """One way of storing image samples in an LMDB: found by `detect`, sized by `open`, read by `decode`.

    Subclasses set `name` and implement `detect`, `open`, `__len__`, `sample_keys` and `stored`
    (`decode` decodes what `stored` gives; override it when reading can do better). `sample_keys(i)`
    names the values of sample i (one key, or several: an image and its label); the reader looks
    them up and hands the values to `stored`/`decode` (None for a key at a position listed in
    `optional`). A missing required key, or a value that does not decode, is an error
    naming the LMDB and the key (the reader adds both).
    """

    #: The name users pass as `layout=` ("datum", "lsun", ...), also shown by `repr` and `info`.
    name: ClassVar[str] = ""
    #: Keys that may be absent: the reader passes None for them instead of failing.
    optional: ClassVar[frozenset[int]] = frozenset()
    #: Whether a str target names a class (LSUN's category) rather than being free text (an OCR
    #: label): `migrate` maps class names to labels with a classes file, and writes free text to a
    #: texts file (`text_targets`).
    class_targets: ClassVar[bool] = False

    @classmethod
    def detect(cls, probe: Probe) -> Layout | None:
        """An instance for this LMDB when it has this layout, else None (cheap: a few keys and values)."""
        raise NotImplementedError

    def open(self, probe: Probe) -> None:
        """Learn the samples (count, keys) before the first read; may read the key index."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def sample_keys(self, index: int) -> Sequence[bytes]:
        """The keys holding sample `index` (0 <= index < len), in the order `decode` takes their values."""
        raise NotImplementedError

    def stored(self, values: Sequence[Any]) -> tuple[tuple[bytes | np.ndarray, ...], Any]:
        """The sample as the LMDB stores it: its images and its target, copied out of the map.

        Each image is its encoded file bytes (`bytes`, exactly as stored), or, for a layout that
        stores pixels, an H x W x 3 RGB (or H x W gray) uint8 array. `migrate` writes these
        unchanged, so an encoded image is never decoded and encoded again.

        Raises:
            DatumError (or ValueError): a value that is not what the layout stores; the reader
                prefixes the LMDB and the key.
        """
        raise NotImplementedError

    def decode(self, values: Sequence[Any]) -> tuple[Any, Any]:
        """`(image, target)` from the sample's values (views on the memory map, valid during the call).

        By default the `stored` images decoded to RGB PIL images (OpenCV's pixels); a layout
        with several images gives them as a tuple.
        """
        images, target = self.stored(values)
        decoded = tuple(decode_image(image) if isinstance(image, bytes) else array_image(image) for image in images)
        return (decoded[0] if len(decoded) == 1 else decoded), target

    def describe(self) -> str:
        """One line for `repr` and `info`: the layout and what a target is."""
        return self.name


class ValueAtError(DatumError):
    """A value of a sample that does not decode, raised by a layout that knows which: `position` in
    `sample_keys`, so that the reader names that key (an OCR label) instead of the sample's first."""

    def __init__(self, position: int, message: str) -> None:
        super().__init__(message)
        self.position = position


def checked_count(probe: Probe, key: bytes, text: Any, *, per_sample: int = 1) -> int:
    """A sample count stored in the LMDB (ASCII decimal), checked against its entries before it is used.

    Raises:
        LmdbFormatError: not a decimal number, negative, or more samples than the LMDB has room for
            (`per_sample` entries each), naming the LMDB and the key.
    """
    raw = bytes(text) if text is not None else b""
    try:
        count = int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise LmdbFormatError(f"{probe.path}: key {key!r}: sample count {raw[:40]!r} is not a decimal number") from None
    if count < 0 or count * per_sample > probe.entries:
        raise LmdbFormatError(
            f"{probe.path}: key {key!r}: claims {count} samples but the LMDB has only {probe.entries} entries")
    return count


def decode_image(value: Any) -> Image.Image:
    """Encoded image bytes (JPEG, PNG, WebP, ...: found by their magic bytes) as an RGB PIL image."""
    if value is None:
        raise DatumError("no image bytes")
    return open_image(bytes(value), gray=False)


def array_image(pixels: np.ndarray) -> Image.Image:
    """Stored pixels (H x W x 3 RGB or H x W gray, uint8) as an RGB PIL image."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3)):
        raise DatumError(f"stored pixels must be H x W x 3 or H x W uint8, got {pixels.dtype} {pixels.shape}")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")


def text_target(value: Any) -> str:
    """A UTF-8 text value (an OCR label) as str."""
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatumError(f"label is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def layout_named(name: str, layouts: Sequence[type[Layout]]) -> type[Layout]:
    """The layout class called `name`.

    Raises:
        ValueError: no layout has that name (the message lists them).
    """
    for layout in layouts:
        if layout.name == name:
            return layout
    raise ValueError(f"unknown layout {name!r}; known: {', '.join(layout.name for layout in layouts)}")


def detect_layout(probe: Probe, layouts: Sequence[type[Layout]]) -> Layout:
    """The first of `layouts` that recognises the LMDB.

    Raises:
        LmdbFormatError: none does; the message says what was seen (entries, first keys).
    """
    for layout in layouts:
        found = layout.detect(probe)
        if found is not None:
            return found
    seen = ", ".join(repr(key[:40]) for key in probe.first_keys[:4]) or "none"
    raise LmdbFormatError(
        f"{probe.path}: not an image LMDB layout caffe-lmdb knows ({probe.entries} entries, first keys {seen}); "
        f"known layouts: {', '.join(layout.name for layout in layouts)} (force one with layout=...)")


def chosen_layout(probe: Probe, layout: str | Layout | None, layouts: Sequence[type[Layout]]) -> Layout:
    """The layout to read `probe`'s LMDB with: detected (None), by name, or the given instance."""
    if layout is None:
        return detect_layout(probe, layouts)
    if isinstance(layout, str):
        found = layout_named(layout, layouts).detect(probe)
        if found is None:
            raise LmdbFormatError(f"{probe.path}: does not hold the {layout!r} layout "
                                  f"({probe.entries} entries, first keys {probe.first_keys[:3]!r})")
        return found
    if isinstance(layout, Layout):
        return layout
    raise TypeError(f"layout must be None, a layout name or a Layout, got {type(layout).__name__}")

