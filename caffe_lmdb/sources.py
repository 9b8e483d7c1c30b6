"""Conversion inputs: image folders (one subfolder per class) and Caffe list files, as entry lists.

Pure functions, no LMDB: they decide which files are converted, in which order, with which
labels, and so which keys (`%08d_<relpath>`) the records get; and how one input file is read
(`read_image_file`: regular files only, of bounded size).
"""

from __future__ import annotations

import os
import random
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import DatumError, InputError, InputNotFoundError, os_error_reason
from .formats import IMAGE_EXTENSIONS
from .labels import list_columns

#: Larger input files are skipped unread: no image format Caffe reads needs this much, and a
#: file this large (or one that never ends, such as a link to /dev/zero) would exhaust memory.
MAX_IMAGE_BYTES = 1 << 30

_READ_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_BINARY", 0))

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


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
    list. Arrays have no per-entry objects: `packed[i]` builds a small `FileInput` when it is
    needed, and a worker copies a few pages instead of most of the list (figures:
    docs/benchmarks.md).
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


def folder_error(path: str | os.PathLike) -> str:
    """Why the folder `path` was not converted: the error listing it gives now, else that it is a folder.

    Workers get only an entry's path, so this is how the reason of an unreadable folder that the
    scan listed (see `scan_folder`) is found again when the entry is converted.
    """
    try:
        with os.scandir(path):
            pass
    except OSError as exc:
        return f"cannot list folder: {os_error_reason(exc)}"
    return "is a folder, not an image file"


def read_image_file(path: str | os.PathLike) -> bytes:
    """The bytes of the regular file `path`, at most `MAX_IMAGE_BYTES` of them.

    The file is opened, then the opened descriptor is checked, so what is checked is what is
    read (no race with a file replaced in between). Non-blocking, because opening a FIFO for
    reading otherwise waits for a writer forever; anything but a regular file (FIFO, device,
    socket, folder) is refused before a byte is read.

    Raises:
        DatumError: `path` is not a regular file, or is too large (the message says which).
        OSError: it cannot be opened or read.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        reason = _not_a_file(path)  # a folder without read permission; a socket (ENXIO)
        if reason is None:
            raise
        raise DatumError(reason) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DatumError(_not_a_file(path, info.st_mode))
        if info.st_size > MAX_IMAGE_BYTES:
            raise DatumError(f"file is larger than {MAX_IMAGE_BYTES} bytes ({info.st_size} bytes)")
        os.set_blocking(fd, True)  # meaningless for regular files on Linux; cleared so no filesystem sees it
        parts, total = [], 0
        while True:  # one read for the whole file, one more to see its end (the file may grow meanwhile)
            part = os.read(fd, min(max(info.st_size + 1 - total, 1 << 16), MAX_IMAGE_BYTES + 1 - total))
            if not part:
                break
            parts.append(part)
            total += len(part)
            if total > MAX_IMAGE_BYTES:
                raise DatumError(f"file is larger than {MAX_IMAGE_BYTES} bytes (it grew while read)")
    finally:
        os.close(fd)
    return parts[0] if len(parts) == 1 else b"".join(parts)


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def special_kind(mode: int) -> str | None:
    """"a FIFO", "a character device", "a block device" or "a socket" for such a mode; None for anything else.

    For the refusals of files that must be regular (images, list files, prototxts): reading a
    FIFO waits for a writer forever, and a device such as /dev/zero never ends.
    """
    return next((name for test, name in _FILE_KINDS if test(mode)), None)


def _not_a_file(path: str | os.PathLike, mode: int | None = None) -> str | None:
    """Why `path` is not an image file (a folder, a FIFO, ...), or None if it is a regular file or unknown."""
    if mode is None:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return None
    if stat.S_ISDIR(mode):
        return folder_error(path)
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file ({special_kind(mode) or 'a special file'})"


def _list_folder(folder: Path) -> list[os.DirEntry]:
    """The entries of a folder the user named (or its direct subfolders): unlistable is an InputError."""
    try:
        with os.scandir(folder) as items:
            return sorted(items, key=lambda item: item.name)
    except OSError as exc:
        raise InputError(f"{folder}: cannot list folder: {os_error_reason(exc)}") from None


def _may_be_dir(item: os.DirEntry) -> bool:
    """`DirEntry.is_dir()` (links followed), and True where a link cannot be followed (a loop, no permission).

    Such an entry is then treated as a folder that cannot be listed (reported, or an InputError)
    instead of being left out silently; a dangling link is not a folder (`is_dir()` is False).
    """
    try:
        return item.is_dir()
    except OSError:
        return True


def _is_listed_file(item: os.DirEntry) -> bool:
    """Whether a non-folder entry is listed as an image: regular files, and links that cannot be followed.

    FIFOs, sockets and devices (also through a link, such as `x.jpg -> /dev/zero`) are not images
    and are left out, as files without an image extension are. A link that cannot be followed
    (dangling, a loop, no permission) is listed, so that the conversion reports it as skipped
    instead of losing it silently.
    """
    try:
        if item.is_file():
            return True
        if not item.is_symlink():
            return False
        os.stat(item.path)  # a link to a special file
        return False
    except OSError:
        return True


def _walk(top: Path, base: Path) -> Iterator[tuple[str, str | None]]:
    """Everything to convert below the folder `top`, as (path relative to `base`, None or an error).

    Yields each image file with None, and each folder that cannot be listed with why (`os.walk`
    skips those silently). Links to folders are followed, as torchvision's ImageFolder does, but
    each real folder (st_dev, st_ino) is visited once, so a link back up (`ln -s . cat/self`)
    neither repeats images nor loops forever. Breadth first, real folders before links at each
    depth: a folder reached both directly and through a link keeps its real, shortest path.
    """
    def relative(path: str | os.PathLike) -> str:
        return Path(path).relative_to(base).as_posix()

    try:
        top_stat = os.stat(top)
    except OSError as exc:
        yield relative(top), f"cannot list folder: {os_error_reason(exc)}"
        return
    visited = {(top_stat.st_dev, top_stat.st_ino)}
    level = [top]
    while level:
        subfolders: list[os.DirEntry] = []
        for folder in level:
            try:
                with os.scandir(folder) as listing:
                    items = sorted(listing, key=lambda item: item.name)
            except OSError as exc:
                yield relative(folder), f"cannot list folder: {os_error_reason(exc)}"
                continue
            for item in items:
                if _may_be_dir(item):
                    subfolders.append(item)
                elif has_image_extension(item.name) and not item.name.startswith(".") and _is_listed_file(item):
                    yield relative(item.path), None
        level = []
        for item in sorted(subfolders, key=lambda item: (item.is_symlink(), item.path)):
            try:
                info = item.stat()
            except OSError as exc:
                yield relative(item.path), f"cannot list folder: {os_error_reason(exc)}"
                continue
            if (info.st_dev, info.st_ino) not in visited:
                visited.add((info.st_dev, info.st_ino))
                level.append(Path(item.path))


def find_classes(directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
    """The class folders of `directory`, sorted, and their label indices (torchvision's ImageFolder rule).

    A class folder that cannot be listed (or a link to one that cannot be followed) is still a
    class, so that the others' label indices do not shift; `scan_folder` reports it as skipped.

    Raises:
        InputError: `directory` cannot be listed, or has no class folders.
    """
    directory = Path(directory)
    classes = [item.name for item in _list_folder(directory) if not item.name.startswith(".") and _may_be_dir(item)]
    if not classes:
        raise InputError(f"{directory}: no class folders found (expected one subfolder per class)")
    return classes, {name: index for index, name in enumerate(classes)}


def scan_folder(directory: str | os.PathLike) -> tuple[list[Entry], list[str]]:
    """All images below each class folder of `directory` (recursively), sorted by class then path.

    A folder below that cannot be listed (no permission) becomes an entry of its own, whose
    conversion fails with the reason (`encode.encode_entry`), so that it is in the skipped list
    and fails `--strict`, like an unreadable image; a folder is never converted. FIFOs, devices
    and sockets are left out (see `_is_listed_file`).

    Returns:
        The entries and the sorted class names (label i is `classes[i]`).

    Raises:
        InputError: `directory` cannot be listed, has no class folders, or a class folder has no images.
    """
    directory = Path(directory)
    if _file_type(directory) != "dir":
        raise InputError(f"{directory}: not a directory")
    classes, class_to_idx = find_classes(directory)
    entries: list[Entry] = []
    for name in classes:
        found = sorted(relpath for relpath, _ in _walk(directory / name, directory))
        if not found:
            raise InputError(
                f"{directory / name}: class folder has no images (extensions: {' '.join(IMAGE_EXTENSIONS)})"
            )
        entries.extend(Entry(relpath, directory / relpath, class_to_idx[name]) for relpath in found)
    return entries, classes


def _file_type(path: str | os.PathLike) -> str | None:
    """"dir", "file" (regular), "other" or None (missing), links followed; failing to tell is an InputError.

    `Path.is_dir()` raises PermissionError (a traceback) where the parent folder is not searchable.
    """
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise InputError(f"{path}: {os_error_reason(exc)}") from None
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


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
    the first, which must then be an integer, also into `label`. Blank lines are ignored, and so
    is a UTF-8 byte order mark (Windows editors write one; it would otherwise join the first path).

    Every number is checked here, naming the line, rather than failing later in a worker: the
    label must fit Datum's int32, and each column (`float_data` is `repeated float`) a finite
    32-bit float.

    Raises:
        InputError: the file is missing or a line is malformed (the message names its number).
    """
    list_file, root = Path(list_file), Path(root)
    kind = _file_type(list_file)
    if kind == "other":
        raise InputError(f"{list_file}: list file is not a regular file "
                         f"({special_kind(os.stat(list_file).st_mode) or 'a special file'})")
    if kind is None:
        raise InputNotFoundError(f"{list_file}: list file not found")
    if kind != "file":
        raise InputError(f"{list_file}: is a folder, not a list file")
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{list_file}: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise InputError(f"{list_file}: {os_error_reason(exc)}") from None
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
        label, targets = list_columns(values, f"{list_file}:{number}")
        entries.append(Entry(relpath, root / relpath, label, targets))
    return entries


def shuffle_entries(entries: Sequence[Entry], seed: int) -> list[Entry]:
    """A deterministic shuffle: the same seed gives the same order on every machine and Python run."""
    shuffled = list(entries)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def find_splits(directory: str | os.PathLike) -> list[Path]:
    """The split folders (`train`, `val`, ...) of a dataset root: subfolders whose class folders hold images.

    A class folder that cannot be listed counts as holding images (`scan_folder` then lists it
    as skipped), so an unreadable class does not make its split vanish.

    Raises:
        InputError: the root, or a subfolder of it, cannot be listed: whether it is a split
            cannot be told, and leaving it out silently would lose a split.
    """
    directory = Path(directory)
    splits = []
    for child in _list_folder(directory):
        if child.name.startswith(".") or child.name.endswith(".lmdb") or not _may_be_dir(child):
            continue
        path = Path(child.path)
        try:
            class_dirs = [item for item in _list_folder(path) if not item.name.startswith(".") and _may_be_dir(item)]
        except InputError as exc:
            raise InputError(f"{exc} (convert the other splits one by one, as SPLIT_DIR OUT.lmdb)") from None
        if any(True for item in class_dirs for _ in _walk(Path(item.path), directory)):
            splits.append(path)
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
    if list_file is None and source is not None and _file_type(source) == "file":
        list_file, source = source, None
    if list_file is not None:
        root = Path(root) if root is not None else Path(list_file).parent
        if _file_type(root) != "dir":
            raise InputNotFoundError(f"{root}: root folder not found")
        return parse_list_file(list_file, root), None
    if source is None:
        raise InputError("no input: give an image folder or a list file")
    if _file_type(source) is None:
        raise InputNotFoundError(f"{source}: input folder not found")
    return scan_folder(source)
