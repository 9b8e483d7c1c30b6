"""BasicSR / mmagic super-resolution LMDBs (`meta_info.txt`) and the legacy EDVR ones (`meta_info.pkl`).

BasicSR's `make_lmdb_from_imgs` (and mmagic's copy of it) stores each image as PNG bytes from
`cv2.imencode('.png', img)` under the file name without its extension, and writes the list of
samples to `meta_info.txt` in the LMDB's folder, one line per image: `0001_s001.png (480,480,3) 1`
(name, shape, PNG compression level). Its readers take the key as `line.split('.')[0]` (cut at the
FIRST dot: `0001.x2.png` has the key `0001`) and read the samples in the file's order, so nothing
is scanned. Super-resolution trains from two such LMDBs with the same keys (LQ and GT):
`lmdb_dataset.PairedLmdbDataset` reads the pair.

The older EDVR / mmsr scripts stored raw pixels instead: each value is the `cv2.imread` array's
bytes (H x W x C, BGR, uint8, no header), and a pickled `meta_info.pkl` holds
`{'name': ..., 'resolution': 'C_H_W' or a list of them, 'keys': [...]}`. The pickle is read with
the restricted unpickler (`safe_unpickle`), never `pickle.loads`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatumError, LmdbFormatError
from .layouts import Layout, Probe
from .safe_unpickle import UnsafePickleError, safe_unpickle

#: The largest side file (`meta_info.txt`, `meta_info.pkl`) read: 256 MiB holds millions of lines.
MAX_META_BYTES = 256 << 20

#: A BasicSR meta_info line: `name.png (H,W,C)` and the PNG compression level (older files omit it).
_META_LINE = re.compile(r"(?P<name>.+?) \((?P<h>\d+), ?(?P<w>\d+), ?(?P<c>\d+)\)(?: (?P<level>\d+))?")
#: Every line of a meta_info.txt at once: the key (up to the first dot) of a good line, b"" for a blank one.
_META_LINES = re.compile(rb"^(?:([^.\n]+)\.[^\n]*? \(\d+, ?\d+, ?\d+\)(?: \d+)?|)[^\S\n]*$", re.MULTILINE)
#: EDVR's resolution string, `C_H_W`.
_RESOLUTION = re.compile(r"(\d+)_(\d+)_(\d+)")
#: A line end in meta_info.txt (bytes: the file is matched undecoded).
_NEWLINE = b"\n"
#: How much of meta_info.txt detection reads to find its first line.
_FIRST_LINE_BYTES = 64 << 10


def basicsr_key(line: str) -> bytes | None:
    """The LMDB key of one meta_info.txt line as BasicSR's readers take it (`line.split('.')[0]`); None if bad.

    A line is good when it reads `name.ext (H,W,C)` with an optional compression level and the
    name has an extension, so that the cut at the first dot leaves a non-empty key.
    """
    match = _META_LINE.fullmatch(line)
    if match is None:
        return None
    name = match["name"]
    key = name.split(".")[0]
    return key.encode("utf-8") if "." in name and key else None


def _bounded_bytes(path: Path, hint: str = "") -> bytes:
    """A meta_info file's bytes, its size checked against `MAX_META_BYTES` before anything is read."""
    size = path.stat().st_size
    if size > MAX_META_BYTES:
        raise LmdbFormatError(f"{path}: {size} bytes is more than a {path.name} may hold "
                              f"({MAX_META_BYTES >> 20} MiB){hint}")
    return path.read_bytes()


def read_meta_info(path: Path) -> np.ndarray:
    """The keys listed by a BasicSR meta_info.txt, in file order, as a numpy bytes array.

    Blank lines are skipped (a trailing newline, an editor's last empty line). The whole file is
    matched by one regular expression (200,000 lines in a fraction of a second); only a file with
    a bad line is walked line by line, to name it.

    Raises:
        LmdbFormatError: the file is larger than `MAX_META_BYTES`, holds no line, or a line is
            not UTF-8 or not `name.ext (H,W,C) level` (naming the file and the line number).
    """
    data = _bounded_bytes(path, "; is it the file BasicSR wrote?")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LmdbFormatError(f"{path}: line {data.count(_NEWLINE, 0, exc.start) + 1}: not UTF-8 text") from None
    found = _META_LINES.findall(data)
    if len(found) != data.count(_NEWLINE) + 1:  # a line neither matched nor blank: walk them, to name it
        found = [_line_key(path, number, raw) for number, raw in enumerate(data.split(_NEWLINE), 1)]
    keys = [key for key in found if key]
    if not keys:
        raise LmdbFormatError(f"{path}: lists no images")
    return np.array(keys, dtype=bytes)


def _line_key(path: Path, number: int, raw: bytes) -> bytes:
    """The key of line `number` of a meta_info.txt (b"" for a blank line).

    Raises:
        LmdbFormatError: the line is not `name.ext (H,W,C) level`, naming the file and the line.
    """
    line = raw.decode("utf-8").rstrip()
    if not line:
        return b""
    key = basicsr_key(line)
    if key is None:
        raise LmdbFormatError(f"{path}: line {number}: {line[:80]!r} is not a BasicSR meta_info line "
                              "(`name.png (H,W,C) level`)")
    return key


def _first_line(path: Path) -> str | None:
    """The first non-blank line of a text file (from its first 64 KiB), or None."""
    with open(path, "rb") as file:
        head = file.read(_FIRST_LINE_BYTES)
    for raw in head.split(b"\n"):
        try:
            line = raw.decode("utf-8").rstrip()
        except UnicodeDecodeError:
            return None
        if line:
            return line
    return None


class BasicSRLayout(Layout):
    """BasicSR's layout: encoded images (PNG) keyed by file name, listed in meta_info.txt; no target (None)."""

    name = "basicsr"

    def __init__(self, meta_info: str) -> None:
        #: The meta_info.txt the samples are listed in.
        self.meta_info = meta_info
        self.keys = np.empty(0, dtype="S1")

    @classmethod
    def detect(cls, probe: Probe) -> BasicSRLayout | None:
        meta = probe.side_file("meta_info.txt")
        if meta is None:
            return None
        line = _first_line(meta)
        key = None if line is None else basicsr_key(line)
        if key is None or probe.value(key) is None:
            return None
        return cls(os.fspath(meta))

    def open(self, probe: Probe) -> None:
        self.keys = read_meta_info(Path(self.meta_info))

    def __len__(self) -> int:
        return len(self.keys)

    def sample_keys(self, index: int) -> Sequence[bytes]:
        return (self.keys[index],)

    def stored(self, values: Sequence[Any]) -> tuple[tuple[bytes, ...], Any]:
        return (bytes(values[0]),), None

    def describe(self) -> str:
        return f"basicsr (encoded images listed in {self.meta_info}; target: None)"


def read_edvr_meta(path: Path) -> dict[str, Any] | None:
    """EDVR's meta_info.pkl through the restricted unpickler; None when it is not an EDVR meta dict.

    Raises:
        LmdbFormatError: the file is larger than `MAX_META_BYTES`, or the pickle names a global
            outside the allow-list (nothing of it has run), or it cannot be unpickled.
    """
    data = _bounded_bytes(path)
    try:
        meta = safe_unpickle(data)
    except UnsafePickleError as exc:
        raise LmdbFormatError(f"{path}: refused to unpickle global {exc.global_name} (an EDVR meta_info.pkl "
                              "holds only a dict of strings; nothing of the file was run)") from None
    except MemoryError:
        raise LmdbFormatError(f"{path}: the pickle claims an object too large to build") from None
    except Exception as exc:  # a corrupt pickle raises many kinds; none of them ran code
        raise LmdbFormatError(f"{path}: cannot unpickle it safely ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict):
        return None
    meta = {key.decode("utf-8", "replace") if isinstance(key, bytes) else key: value for key, value in meta.items()}
    keys, resolution = meta.get("keys"), meta.get("resolution")
    if not isinstance(keys, list | tuple) or not keys or resolution is None:
        return None
    return meta


def _text(item: Any) -> str | None:
    """A str, or bytes (Python 2 pickles' str) as UTF-8 text; None for anything else."""
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return item if isinstance(item, str) else None


def edvr_resolutions(path: Path, resolution: Any, count: int) -> np.ndarray:
    """EDVR's `resolution` entry as an (n, 3) int64 array of (C, H, W): one row for all, or one per key.

    Raises:
        LmdbFormatError: not a `C_H_W` string or a list of them (one, or one per key).
    """
    items = [resolution] if not isinstance(resolution, list | tuple) else list(resolution)
    if len(items) not in (1, count):
        raise LmdbFormatError(f"{path}: 'resolution' lists {len(items)} entries for {count} keys (one, or one per key)")
    rows = []
    for item in items:
        text = _text(item)
        match = None if text is None else _RESOLUTION.fullmatch(text)
        if match is None:
            raise LmdbFormatError(f"{path}: resolution {item!r:.60} is not 'C_H_W'")
        rows.append([int(part) for part in match.groups()])
    return np.array(rows, dtype=np.int64)


def edvr_pixels(value: Any, shapes: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """An EDVR raw value (H x W x C BGR uint8 bytes) as RGB pixels (H x W x 3, or H x W for one channel).

    The shape is the one of meta_info.pkl's resolutions whose byte count is the value's size.

    Raises:
        DatumError: no resolution has the value's size, or it has a channel count other than 1, 3 or 4.
    """
    size = len(value)
    shape = shapes.get(size)
    if shape is None:
        known = ", ".join(f"{c}_{h}_{w} ({c * h * w} bytes)" for c, h, w in list(shapes.values())[:4])
        raise DatumError(f"raw value of {size} bytes does not match meta_info.pkl's resolution: {known}")
    channels, height, width = shape
    if channels not in (1, 3, 4):
        raise DatumError(f"resolution {channels}_{height}_{width}: {channels} channels (only 1, 3 or 4 are images)")
    pixels = np.frombuffer(value, dtype=np.uint8).reshape(height, width, channels)
    if channels == 1:
        return pixels[:, :, 0].copy()
    return np.ascontiguousarray(pixels[:, :, 2::-1])  # BGR(A) to RGB; OpenCV's colour read drops alpha too


class EdvrLayout(Layout):
    """EDVR's legacy layout: raw H x W x C BGR pixels keyed as meta_info.pkl lists; no target (None).

    The reader hands a layout the values only, so a value's shape is found by its size among the
    pkl's resolutions; two resolutions of equal byte count (3_480_400 and 3_400_480) cannot be told
    apart and are refused when the LMDB is opened.
    """

    name = "edvr"

    def __init__(self, meta_info: str, keys: np.ndarray, resolutions: np.ndarray) -> None:
        #: The meta_info.pkl the samples are listed in.
        self.meta_info = meta_info
        self.keys = keys
        #: Image shape (C, H, W) by value size in bytes.
        self.shapes: dict[int, tuple[int, int, int]] = {}
        for channels, height, width in {tuple(int(x) for x in row) for row in resolutions}:
            size = channels * height * width
            other = self.shapes.setdefault(size, (channels, height, width))
            if other != (channels, height, width):
                raise LmdbFormatError(
                    f"{meta_info}: resolutions {'_'.join(map(str, other))} and {channels}_{height}_{width} hold "
                    f"the same number of bytes, so their values cannot be told apart")

    @classmethod
    def detect(cls, probe: Probe) -> EdvrLayout | None:
        path = probe.side_file("meta_info.pkl")
        if path is None:
            return None
        meta = read_edvr_meta(path)
        if meta is None:
            return None
        keys = [_text(key) for key in meta["keys"]]
        if any(key is None or not key for key in keys):
            return None
        found = cls(os.fspath(path), np.array([key.encode("utf-8") for key in keys], dtype=bytes),
                    edvr_resolutions(path, meta["resolution"], len(keys)))
        value = probe.value(found.keys[0])
        if value is None or len(value) not in found.shapes:
            return None
        return found

    def open(self, probe: Probe) -> None:
        """The keys and resolutions were read with meta_info.pkl by `detect`: nothing is scanned."""

    def __len__(self) -> int:
        return len(self.keys)

    def sample_keys(self, index: int) -> Sequence[bytes]:
        return (self.keys[index],)

    def stored(self, values: Sequence[Any]) -> tuple[tuple[np.ndarray, ...], Any]:
        return (edvr_pixels(values[0], self.shapes),), None

    def describe(self) -> str:
        return f"edvr (raw BGR pixels listed in {self.meta_info}; target: None)"
