"""Conversion inputs: image folders (one subfolder per class) and Caffe list files, as entry lists.

Pure functions, no LMDB: they decide which files are converted, in which order, with which
labels, and so which keys (`%08d_<relpath>`) the records get.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import CaffeLmdbError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_INTEGER = re.compile(r"[-+]?\d+")


class InputError(CaffeLmdbError, ValueError):
    """The conversion input (folder, list file, flags) is unusable; the message says how."""


@dataclass(frozen=True)
class Entry:
    """One image to convert.

    Attributes:
        relpath: the path as it goes into the key: relative to the root folder, `/`-separated.
        path: where the file is on this machine.
        label: the Datum's `label`.
        targets: extra numeric columns of a list file (all of them, first included), stored in
            `float_data`; empty for single-label inputs.
    """

    relpath: str
    path: Path
    label: int
    targets: tuple[float, ...] = field(default=())


class FileInput(NamedTuple):
    """What a worker process needs to convert one entry (the key is made by the writer)."""

    path: str
    label: int
    targets: tuple[float, ...]


class PackedEntries(Sequence[FileInput]):
    """Entries packed into a few numpy arrays, for worker processes to share after `fork`.

    A list of `Entry` objects is a million Python objects for ImageNet. A worker that reads one
    bumps reference counts (the entry's, its `Path`'s and the interned path parts'), which copies
    the memory page each lives on, so every worker ends up with a private copy of most of the
    list: measured at 300k entries, 97 MiB per worker (about 400 MiB each for ImageNet). Arrays
    have no per-entry objects: `packed[i]` builds a small `FileInput` when it is needed (3 MiB
    per worker at 300k entries).
    """

    def __init__(self, entries: Sequence[Entry]) -> None:
        self._paths, self._path_ends = _pack([os.fsencode(entry.path) for entry in entries])
        self._labels = np.array([entry.label for entry in entries], dtype=np.int64)
        self._targets = np.array([t for entry in entries for t in entry.targets], dtype=np.float64)
        self._target_ends = np.cumsum([len(entry.targets) for entry in entries], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> FileInput:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        start, stop = _bounds(self._path_ends, index)
        path = os.fsdecode(self._paths[start:stop].tobytes())
        start, stop = _bounds(self._target_ends, index)
        return FileInput(path, int(self._labels[index]), tuple(self._targets[start:stop].tolist()))


def _pack(items: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    return np.frombuffer(b"".join(items), dtype=np.uint8), np.cumsum([len(item) for item in items], dtype=np.int64)


def _bounds(ends: np.ndarray, index: int) -> tuple[int, int]:
    return (int(ends[index - 1]) if index else 0), int(ends[index])


def has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def find_classes(directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
    """The class folders of `directory`, sorted, and their label indices (torchvision's ImageFolder rule)."""
    directory = Path(directory)
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise InputError(f"{directory}: no class folders found (expected one subfolder per class)")
    return classes, {name: index for index, name in enumerate(classes)}


def scan_folder(directory: str | os.PathLike) -> tuple[list[Entry], list[str]]:
    """All images below each class folder of `directory` (recursively), sorted by class then path.

    Returns:
        The entries and the sorted class names (label i is `classes[i]`).

    Raises:
        InputError: no class folders, a class folder without images, or no images at all.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory")
    classes, class_to_idx = find_classes(directory)
    entries: list[Entry] = []
    for name in classes:
        found = sorted(
            Path(root, file).relative_to(directory).as_posix()
            for root, dirs, files in os.walk(directory / name, followlinks=True)
            for file in files
            if has_image_extension(file) and not file.startswith(".")
        )
        if not found:
            raise InputError(
                f"{directory / name}: class folder has no images (extensions: {' '.join(IMAGE_EXTENSIONS)})"
            )
        entries.extend(Entry(relpath, directory / relpath, class_to_idx[name]) for relpath in found)
    return entries, classes


def _trailing_numbers(tokens: Sequence[str]) -> int:
    count = 0
    for token in reversed(tokens[1:]):  # the first token always belongs to the path
        if not _NUMBER.fullmatch(token):
            break
        count += 1
    return count


def parse_list_file(list_file: str | os.PathLike, root: str | os.PathLike) -> list[Entry]:
    """Parse a Caffe list file: `relative/path label` lines, split at the last space as Caffe does.

    Paths may contain spaces. Extra numeric columns (`path l1 l2 ...`, multi-label or regression
    targets) are allowed: the number of label columns is the smallest number of trailing numeric
    fields found on any line, so a path ending in a number is still read correctly when other
    lines show the column count. All label columns go into `Entry.targets` (-> `float_data`), and
    the first, which must then be an integer, also into `label`. Blank lines are ignored.

    Raises:
        InputError: the file is missing or a line is malformed (the message names its number).
    """
    list_file, root = Path(list_file), Path(root)
    if not list_file.is_file():
        raise InputError(f"{list_file}: list file not found")
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{list_file}: not UTF-8 text ({exc})") from None
    rows: list[tuple[int, list[str]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        tokens = line.split(" ")
        if len(tokens) < 2 or not tokens[0] or not _trailing_numbers(tokens):
            raise InputError(f"{list_file}:{number}: expected 'relative/path label', got {line!r}")
        rows.append((number, tokens))
    if not rows:
        raise InputError(f"{list_file}: list file has no entries")
    columns = min(_trailing_numbers(tokens) for _, tokens in rows)
    entries = []
    for number, tokens in rows:
        relpath, values = " ".join(tokens[:-columns]), tokens[-columns:]
        if not _INTEGER.fullmatch(values[0]):
            raise InputError(f"{list_file}:{number}: label {values[0]!r} is not an integer")
        label = int(values[0])
        if not -(2**31) <= label < 2**31:
            raise InputError(f"{list_file}:{number}: label {label} does not fit Datum's int32")
        targets = tuple(float(v) for v in values) if columns > 1 else ()
        entries.append(Entry(relpath, root / relpath, label, targets))
    return entries


def shuffle_entries(entries: Sequence[Entry], seed: int) -> list[Entry]:
    """A deterministic shuffle: the same seed gives the same order on every machine and Python run."""
    shuffled = list(entries)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def find_splits(directory: str | os.PathLike) -> list[Path]:
    """The split folders (`train`, `val`, ...) of a dataset root: subfolders whose subfolders hold images."""
    directory = Path(directory)
    splits = []
    for child in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if child.suffix == ".lmdb":
            continue
        class_dirs = [p for p in child.iterdir() if p.is_dir()]
        if any(has_image_extension(f) for d in class_dirs for _, _, files in os.walk(d) for f in files):
            splits.append(child)
    return splits


def load_entries(
    source: str | os.PathLike | None = None,
    *,
    list_file: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
) -> tuple[list[Entry], list[str] | None]:
    """Entries from an image folder (`source`) or a Caffe list file (`list_file`, paths under `root`).

    A `source` that is a file is taken as a list file whose paths are relative to `root`, or to
    the list file's own folder. Returns the entries and the class names (None for list files).
    """
    if list_file is None and source is not None and Path(source).is_file():
        list_file, source = source, None
    if list_file is not None:
        root = Path(root) if root is not None else Path(list_file).parent
        if not root.is_dir():
            raise InputError(f"{root}: root folder not found")
        return parse_list_file(list_file, root), None
    if source is None:
        raise InputError("no input: give an image folder or a list file")
    if not Path(source).exists():
        raise InputError(f"{source}: input folder not found")
    return scan_folder(source)
