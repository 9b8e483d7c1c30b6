"""`LmdbDataset`: a map-style Dataset over an image LMDB of any known layout, and trees of them.

Caffe Datums, LSUN, the CRNN/OCR family, BasicSR, tensorpack, stylegan2, Caffe2 ... (`reader.LAYOUTS`)
all read the same way: `LmdbDataset(path)` detects the layout, learns the samples once (from the
cached key index when keys must be scanned, so the second open is instant) and gives
`(image, target)` items as torchvision's datasets do. `PairedLmdbDataset(lq, gt)` reads the
LQ/GT pairs of BasicSR's super-resolution LMDBs. `open_tree(folder)` reads every LMDB under a
folder as one dataset, as the OCR trainers read their dozens of LMDBs. For Caffe Datum LMDBs
with their `float_data`, tensor output or Caffe's gray modes, `LmdbDataset_train` is the richer
reader; `CaffeLoader` is the fast training path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .dataset import LmdbConcatDataset
from .errors import LmdbFormatError, LmdbNotFoundError
from .layouts import Layout
from .reader import LayoutReader, checked_index

#: An LMDB's meta page starts 16 bytes into the file with this magic number (little-endian).
_LMDB_MAGIC = (0xBEEFC0DE).to_bytes(4, "little")


class LmdbDataset(Dataset[tuple[Any, Any]]):
    """Samples of an image LMDB of any known layout, for `torch.utils.data.DataLoader`.

    Each item is `(image, target)`: an RGB PIL image (the pixels OpenCV decodes from the stored
    bytes, which is how these LMDBs' own readers decode them) and what the layout stores as the
    target: an int label (Caffe, DIGITS, tensorpack), a str (OCR text, LSUN's category), None
    (no labels). Paired layouts give both images (`describe()` says how). Works with `+`, any
    number of workers under fork or spawn, and any sampler.

    Args:
        lmdb_path: the LMDB: a folder holding `data.mdb`, or a single file.
        layout: None detects it; a name (`"lsun"`, `"crnn"`, ... see `reader.LAYOUTS`) or a
            `layouts.Layout` instance forces it.
        transform: called on each image.
        target_transform: called on each target.

    Raises:
        LmdbFormatError: not an LMDB, or no layout recognises it (the message says what was seen).
        CorruptLmdbError: the LMDB is truncated or damaged.
    """

    def __init__(self, lmdb_path: str | os.PathLike, layout: str | Layout | None = None,
                 transform: Callable[[Any], Any] | None = None,
                 target_transform: Callable[[Any], Any] | None = None) -> None:
        #: The LMDB's reader: its layout, this process's environment, prefetch.
        self.reader = LayoutReader(lmdb_path, layout)
        self.transform = transform
        self.target_transform = target_transform

    @property
    def root(self) -> str:
        """The LMDB's path, as given."""
        return self.reader.root

    @property
    def layout(self) -> Layout:
        """How the LMDB stores its samples."""
        return self.reader.layout

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """Read, decode and transform sample `index` (negative indices count from the end).

        Raises:
            IndexError: `index` is out of range.
            KeysFileError: a key of the sample is not in the LMDB.
            DatumError: a value does not decode, naming the LMDB and the key.
        """
        image, target = self.reader.read(index)
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, Any]]:
        """A whole batch (the DataLoader's fetcher calls this): prefetch every value, then read each."""
        if len(indices) > 1:
            self.reader.prefetch_samples(indices)
        return [self[i] for i in indices]

    def __add__(self, other: Dataset) -> LmdbConcatDataset:
        """`ds1 + ds2`: torch's ConcatDataset semantics, with batch prefetch kept (`LmdbConcatDataset`)."""
        return LmdbConcatDataset([self, other])

    def __repr__(self) -> str:
        body = [f"Number of datapoints: {len(self)}", f"Root location: {self.root}",
                f"Layout: {self.layout.describe()}"]
        for head, transform in (("Transform: ", self.transform), ("Target transform: ", self.target_transform)):
            if transform is not None:
                body.append(head + repr(transform).splitlines()[0] if repr(transform) else head)
        return "\n".join([f"Dataset {type(self).__name__}"] + ["    " + line for line in body])


class PairedLmdbDataset(Dataset[tuple[Any, Any]]):
    """BasicSR's paired super-resolution LMDBs (LQ and GT, the same keys): items `(lq_image, gt_image)`.

    As BasicSR's `paired_paths_from_lmdb` pairs them: by key, in sorted key order, from the two
    LMDBs' meta_info.txt. Each LMDB is read by its own `LayoutReader` (environment per process,
    identity check, prefetch), so the pair works with any number of workers under fork or spawn.

    Args:
        lq_path: the low-quality (input) LMDB.
        gt_path: the ground-truth LMDB.
        transform: called as `transform(lq_image, gt_image)` and returning the item, so that a
            random crop or flip can treat both images alike (a scale-aware crop, say).
        layout: the layout of both LMDBs: `"basicsr"` (default; any layout without targets works).

    Raises:
        LmdbFormatError: either is not such an LMDB, or their key lists differ (naming the first
            key that is not in both the same number of times).
    """

    def __init__(self, lq_path: str | os.PathLike, gt_path: str | os.PathLike,
                 transform: Callable[[Any, Any], Any] | None = None, layout: str | Layout = "basicsr") -> None:
        #: The readers of the LQ and the GT LMDB.
        self.lq, self.gt = LayoutReader(lq_path, layout), LayoutReader(gt_path, layout)
        self.transform = transform
        lq_keys, gt_keys = (np.asarray(reader.layout.keys) for reader in (self.lq, self.gt))
        #: Positions of each LMDB's samples in sorted key order (item i reads sample lq_order[i] and gt_order[i]).
        self.lq_order, self.gt_order = np.argsort(lq_keys, kind="stable"), np.argsort(gt_keys, kind="stable")
        first = first_difference(lq_keys[self.lq_order], gt_keys[self.gt_order])
        if first is not None:
            raise LmdbFormatError(
                f"{self.lq.root} and {self.gt.root} do not hold the same keys (LQ and GT are paired by key): "
                f"{first!r} is listed {int(np.count_nonzero(lq_keys == first))} times in the LQ LMDB "
                f"and {int(np.count_nonzero(gt_keys == first))} in the GT LMDB")

    def __len__(self) -> int:
        return len(self.lq_order)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """Read and decode the pair at `index` (negative indices count from the end), then transform it.

        Raises:
            IndexError: `index` is out of range.
            KeysFileError: a key is not in one of the LMDBs.
            DatumError: a value does not decode, naming the LMDB and the key.
        """
        position = checked_index(self.gt.root, index, len(self))
        lq_image = self.lq.read(int(self.lq_order[position]))[0]
        gt_image = self.gt.read(int(self.gt_order[position]))[0]
        if self.transform is not None:
            return self.transform(lq_image, gt_image)
        return lq_image, gt_image

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, Any]]:
        """A whole batch: prefetch both LMDBs' values, then read each pair."""
        if len(indices) > 1:
            positions = [checked_index(self.gt.root, index, len(self)) for index in indices]
            self.lq.prefetch_samples([int(self.lq_order[p]) for p in positions])
            self.gt.prefetch_samples([int(self.gt_order[p]) for p in positions])
        return [self[i] for i in indices]

    def __repr__(self) -> str:
        return "\n".join([f"Dataset {type(self).__name__}", f"    Number of pairs: {len(self)}",
                          f"    LQ: {self.lq.root}", f"    GT: {self.gt.root}",
                          f"    Layout: {self.gt.layout.describe()}"])


def first_difference(a: np.ndarray, b: np.ndarray) -> bytes | None:
    """The first key at which two sorted key arrays differ (in one more often than in the other); None if equal."""
    common = min(len(a), len(b))
    unequal = np.flatnonzero(a[:common] != b[:common])
    if len(unequal):
        i = int(unequal[0])
        return bytes(min(a[i], b[i]))
    if len(a) != len(b):
        return bytes((a if len(a) > len(b) else b)[common])
    return None


class LmdbTree(LmdbConcatDataset):
    """Every LMDB under a folder as one dataset, in sorted path order (`open_tree`).

    Index i reads the LMDB `source(i)` holds it; `sources` lists them all.
    """

    def __init__(self, datasets: Sequence[LmdbDataset]) -> None:
        super().__init__(datasets)
        self.sources = [dataset.root for dataset in datasets]

    def source(self, index: int) -> str:
        """The path of the LMDB holding item `index`."""
        if index < 0:
            index += len(self)
        return self.sources[self.parts.locate(index)[0]]


def open_tree(root: str | os.PathLike, layout: str | Layout | None = None,
              transform: Callable[[Any], Any] | None = None,
              target_transform: Callable[[Any], Any] | None = None) -> LmdbTree:
    """Every LMDB under `root` (folders holding `data.mdb`, and single-file LMDBs) as one dataset.

    Each LMDB's layout is detected on its own (or `layout` forced for all). An LMDB is one
    leaf: its folder is not searched further.

    Raises:
        LmdbNotFoundError: `root` holds no LMDB.
        LmdbFormatError: one of them is not readable (naming it).
    """
    found = find_lmdbs(root)
    if not found:
        raise LmdbNotFoundError(f"{root}: no LMDB under this folder (no data.mdb, no single-file LMDB)")
    return LmdbTree([LmdbDataset(path, layout, transform, target_transform) for path in found])


def find_lmdbs(root: str | os.PathLike) -> list[Path]:
    """The LMDBs under `root` in sorted path order: folders holding `data.mdb`, and single-file LMDBs.

    Symbolic links to folders are not followed (no cycles); lock files and hidden files are skipped.
    """
    root = Path(root)
    if (root / "data.mdb").is_file() or (root.is_file() and is_lmdb_file(root)):
        return [root]
    found: list[Path] = []
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        if "data.mdb" in files:
            found.append(here)
            subfolders[:] = []
            continue
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found.extend(here / name for name in files
                     if not name.startswith(".") and not name.endswith("-lock") and is_lmdb_file(here / name))
    return sorted(found)


def is_lmdb_file(path: Path) -> bool:
    """Whether a regular file starts with an LMDB meta page (its magic number at byte 16)."""
    try:
        with open(path, "rb") as file:
            head = file.read(20)
    except OSError:
        return False
    return len(head) == 20 and head[16:20] == _LMDB_MAGIC
