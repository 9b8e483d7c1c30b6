"""One LMDB as `caffe-lmdb serve` shows it: records by index, pictures and thumbnails, the overview and the check.

Nothing here writes. The LMDB is read through `reader.LayoutReader` (this process's read-only
environment, opened without a lock file), so every layout it knows is served; Caffe Datum LMDBs
get more: the `info` overview with its label histogram, the `verify` check, the class filter and
the search by key.

A page costs what its records cost, not what the LMDB holds: a record is found by its index in
the key list (the keys file, or the cached key index), so a page of a million-record LMDB reads
the same 100 records as a page of a small one. What needs every record (the overview's
histograms, the labels the class filter pages through, the check) is a `Job`: run once in a
background thread when first asked for, its progress polled by the page, its result kept.

Pictures are bounded: an image whose size (from its header, or a raw Datum's dims) is over
`max_pixels` is never decoded, so a decompression bomb becomes a placeholder tile with its reason,
as does any record that does not decode; at most `DECODERS` images decode at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .datum import DatumView, check_datum, datum_to_image, image_planes, parse_datum_view, read_encoded_header
from .errors import CaffeLmdbError, DatumError, LmdbFormatError
from .formats import sniff_image_format, suffix_for
from .inspection import LmdbInfo, VerifyReport, txn_info, txn_verify
from .keys import load_keys
from .layout_datum import DatumLayout
from .layouts import array_image, decode_image
from .reader import LayoutReader
from .safe_lmdb import begin_read, data_file, file_identity, get_value
from .serve_images import THUMB_SIDE, ByteCache, fit, placeholder, png_bytes
from .tool_reading import class_names, disk_bytes, format_key, format_shape, keys_file_for, label_name

logger = logging.getLogger(__name__)

#: Images over this many pixels are not decoded (`--max-pixels`): a placeholder says so.
MAX_PIXELS = 40_000_000
#: Images decoded at once, all requests together: bounds the memory a burst of requests takes.
DECODERS = max(2, min(8, os.cpu_count() or 2))
#: The label of an index the overview found no Datum for.
NO_LABEL = np.iinfo(np.int64).min
#: Class filters whose index lists are kept.
_LABEL_LISTS = 256

_decoding = threading.BoundedSemaphore(DECODERS)


@dataclass(frozen=True)
class FloatSummary:
    """A record's `float_data` in a few numbers: how many, their range and mean, and the first ones."""

    count: int
    minimum: float
    maximum: float
    mean: float
    first: tuple[float, ...]


@dataclass(frozen=True)
class RecordView:
    """What the pages say about one sample, read without decoding its image.

    Attributes:
        index: its position in the key list.
        keys: the LMDB keys holding it (one for a Datum).
        value_bytes: the bytes of its values in the LMDB.
        kind: "raw", "encoded", "float", or the layout's name for other layouts.
        shape: channels x height x width its image decodes to (None: unknown).
        image_format: the encoded payload's format (JPEG, PNG, ...), None for raw pixels.
        label, class_name: a Datum's label and its class name (from `<stem>_classes.txt`).
        target: another layout's target, as text.
        floats: a Datum's `float_data` in brief.
        parts: images in the sample (2 for a paired layout).
        problem: why its image is not shown (it does not parse, is damaged or too large), or None.
    """

    index: int
    keys: tuple[bytes, ...]
    value_bytes: int = 0
    kind: str = ""
    shape: tuple[int, int, int] | None = None
    image_format: str | None = None
    label: int | None = None
    class_name: str | None = None
    target: str | None = None
    floats: FloatSummary | None = None
    parts: int = 1
    problem: str | None = None


@dataclass(frozen=True)
class Page:
    """One gallery page: the indices shown, where they start in the listing, and the listing's length."""

    indices: list[int]
    start: int
    size: int
    total: int
    label: int | None = None


@dataclass
class Overview:
    """A Datum LMDB's overview: `info`'s summary of every record, and the label of each index."""

    info: LmdbInfo
    labels: np.ndarray


@dataclass(frozen=True)
class Problem:
    """One finding of the check: its index (None when no record of the key list has it), key and message."""

    index: int | None
    key: bytes | None
    message: str


@dataclass
class CheckResult:
    """The check of a whole LMDB: records checked, and each problem found."""

    records: int
    problems: list[Problem] = field(default_factory=list)
    summary: str = ""


class Job:
    """Work over a whole LMDB, run once in a background thread; pages poll `status()` and show `result`."""

    def __init__(self, total: int, work: Callable[[Job], Any]) -> None:
        self.total = total
        self.done = 0
        self.result: Any = None
        self.error: str | None = None
        self.seconds: float | None = None
        self._started = time.monotonic()
        self._work = work
        threading.Thread(target=self._run, daemon=True, name="caffe-lmdb serve job").start()

    def _run(self) -> None:
        try:
            self.result = self._work(self)
        except CaffeLmdbError as exc:
            self.error = str(exc)
        except Exception as exc:  # a bug must not leave the page polling for ever: it shows the error
            logger.exception("serve: background job failed")
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.seconds = time.monotonic() - self._started

    @property
    def finished(self) -> bool:
        return self.seconds is not None

    def tick(self, *_: Any) -> None:
        """One more record done (a progress callback)."""
        self.done += 1

    def status(self) -> dict[str, Any]:
        """Progress as the pages poll it (JSON)."""
        return {"done": self.done, "total": self.total, "finished": self.finished, "error": self.error}


class KeyLookup:
    """Key -> index in a key list (a numpy `S` array) by binary search.

    On the list itself when it is sorted (LMDB order: scanned keys, or a converter's keys file),
    else on a sorted copy made on first use.
    """

    def __init__(self, keys: np.ndarray) -> None:
        self.keys = keys
        self._lock = threading.Lock()
        self._sorted: tuple[np.ndarray, np.ndarray | None] | None = None

    def _search_space(self) -> tuple[np.ndarray, np.ndarray | None]:
        with self._lock:
            if self._sorted is None:
                keys = self.keys
                if len(keys) < 2 or bool(np.all(keys[:-1] <= keys[1:])):
                    self._sorted = (keys, None)
                else:
                    order = np.argsort(keys, kind="stable")
                    self._sorted = (keys[order], order)
            return self._sorted

    @property
    def in_order(self) -> bool:
        """Whether the key list is in LMDB (byte) order."""
        return self._search_space()[1] is None

    def index_of(self, key: bytes) -> int | None:
        """The index of `key` in the list, or None."""
        ordered, order = self._search_space()
        position = int(np.searchsorted(ordered, key))
        if position < len(ordered) and bytes(ordered[position]) == key:
            return position if order is None else int(order[position])
        return None


class ServedLmdb:
    """One LMDB as the pages read it (see the module docstring).

    Args:
        path: the LMDB.
        number: its place in the server's list (its URLs are `/db/<number>/...`).
        thumbnails: the thumbnail cache, shared by the server's LMDBs.
        max_pixels: images over this many pixels are not decoded.

    Raises:
        LmdbFormatError: the path is missing or not an LMDB of a known layout.
        CorruptLmdbError: the LMDB is truncated or damaged.
    """

    def __init__(self, path: str | os.PathLike, number: int, thumbnails: ByteCache,
                 max_pixels: int = MAX_PIXELS) -> None:
        self.path = Path(path)
        self.number = number
        self.name = Path(os.path.abspath(path)).name
        #: Said on the overview: why the LMDB is shown as Datum records though no layout recognised it.
        self.note = ""
        try:
            self.reader = LayoutReader(path, keep_key_index=False)
        except LmdbFormatError as exc:
            # No layout recognised it (its first record may be the damaged one): look inside it as
            # Datum records, each shown or named as broken. A path that is no LMDB fails again here.
            try:
                self.reader = LayoutReader(path, DatumLayout(), keep_key_index=False)
            except CaffeLmdbError:
                raise exc from None
            self.note = f"{str(exc).removeprefix(f'{path}: ')}; shown as Caffe Datum records"
        self.layout = self.reader.layout
        #: The data file's (device, inode, size, mtime): part of the thumbnails' ETags.
        self.identity = file_identity(data_file(path))
        #: Whether records are Caffe Datums (the richer pages: overview, check, class filter, key search).
        self.datum = isinstance(self.layout, DatumLayout)
        self.keys: np.ndarray | None = self.layout.keys if isinstance(self.layout, DatumLayout) else None
        self.lookup = KeyLookup(self.keys) if self.keys is not None else None
        self.classes = class_names(path) if self.datum else None
        self.keys_file = keys_file_for(path) if self.datum else None
        self.entries = self.reader.environment().stat()["entries"]
        self.disk_bytes = disk_bytes(path)
        self.max_pixels = max_pixels
        self._thumbnails = thumbnails
        self._lock = threading.Lock()
        self._overview: Job | None = None
        self._check: Job | None = None
        self._label_lists: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.reader)

    # ------------------------------------------------------------------ one record

    def record_key(self, index: int) -> bytes:
        """The first key of sample `index` (IndexError out of range)."""
        return bytes(self.reader.sample_keys(index)[0])

    def record(self, index: int) -> RecordView:
        """What the pages say about sample `index`, without decoding its image.

        Raises:
            IndexError: `index` is out of range.
        """
        keys = tuple(bytes(key) for key in self.reader.sample_keys(index))
        try:
            record = self._datum_record(index, keys) if self.datum else self._layout_record(index, keys)
        except CaffeLmdbError as exc:
            return RecordView(index, keys, kind=self.layout.name, problem=str(exc))
        if record.problem is None:  # a failure only decoding finds: known once its thumbnail was made
            thumbnail = self._thumbnails.get((self.number, index))
            if thumbnail is not None and thumbnail[1] is not None:
                record = replace(record, problem=thumbnail[1])
        return record

    def _datum_record(self, index: int, keys: tuple[bytes, ...]) -> RecordView:
        with begin_read(self.reader.environment(), buffers=True) as txn:
            value = self._value(txn, keys[0])
            try:
                view = parse_datum_view(value)
            except DatumError as exc:
                return RecordView(index, keys, len(value), "not a Datum", problem=str(exc))
            floats = _float_summary(view.float_data)
            fields = {"index": index, "keys": keys, "value_bytes": len(value), "label": view.label,
                      "class_name": label_name(view.label, self.classes), "floats": floats}
            problem = None
            if view.encoded:
                kind, image_format, shape = "encoded", None, None
                try:
                    header = read_encoded_header(view.data)
                    image_format, shape = header.format, (header.channels, header.height, header.width)
                    self._check_pixels(header.width, header.height)
                except DatumError as exc:
                    problem = str(exc)
            else:
                kind = "raw" if view.data else "float"
                image_format, shape = None, (view.channels, view.height, view.width)
                try:
                    check_datum(view)
                    self._check_pixels(view.width, view.height)
                except DatumError as exc:
                    problem = str(exc)
        return RecordView(kind=kind, shape=shape, image_format=image_format, problem=problem, **fields)

    def _layout_record(self, index: int, keys: tuple[bytes, ...]) -> RecordView:
        values, images, target = self._stored(keys)
        first = images[0] if images else None
        shape, image_format, problem = None, None, None
        try:
            if isinstance(first, bytes):
                header = read_encoded_header(first)
                shape, image_format = (header.channels, header.height, header.width), header.format
                self._check_pixels(header.width, header.height)
            elif first is not None:
                height, width = first.shape[:2]
                shape = (1 if first.ndim == 2 else first.shape[2], height, width)
                self._check_pixels(width, height)
        except DatumError as exc:
            problem = str(exc)
        text = None if target is None else _short(repr(target) if not isinstance(target, str) else target)
        return RecordView(index, keys, sum(len(v) for v in values if v is not None), self.layout.name, shape,
                          image_format, target=text, parts=len(images), problem=problem)

    def _value(self, txn: Any, key: bytes) -> Any:
        value = get_value(txn, key, self.path)
        if value is None:
            raise DatumError(f"{format_key(key)} is not in the LMDB")
        return value

    def _stored(self, keys: tuple[bytes, ...]) -> tuple[list[bytes | None], tuple[Any, ...], Any]:
        """The sample's values (copied) and the layout's `stored` images and target."""
        with self.reader.environment().begin(buffers=True) as txn:
            values = [get_value(txn, key, self.path) for key in keys]
            values = [None if value is None else bytes(value) for value in values]
        for position, (key, value) in enumerate(zip(keys, values, strict=True)):
            if value is None and position not in self.layout.optional:
                raise DatumError(f"{format_key(key)} is not in the LMDB")
        try:
            images, target = self.layout.stored(values)
        except (DatumError, ValueError) as exc:
            raise DatumError(str(exc)) from None
        return values, tuple(images), target

    def _check_pixels(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise DatumError(f"a {width}x{height} image ({width * height} pixels) is over the {self.max_pixels} "
                             "pixels serve decodes (--max-pixels): not shown")

    # ------------------------------------------------------------------ pictures

    def picture(self, index: int, part: int = 0, *, bounded: bool = True) -> Image.Image:
        """Image `part` of sample `index`, decoded as the datasets decode it (RGB, the photo it was).

        Raises:
            IndexError: `index` is out of range, or the sample has no image `part`.
            CaffeLmdbError: the record does not parse or decode, or is over `max_pixels` (when `bounded`).
        """
        keys = tuple(bytes(key) for key in self.reader.sample_keys(index))
        if self.datum:
            if part != 0:
                raise IndexError(f"a Datum holds one image, not image {part}")
            with begin_read(self.reader.environment(), buffers=True) as txn:
                view = parse_datum_view(self._value(txn, keys[0]))
                if view.encoded:
                    header = read_encoded_header(view.data)
                    width, height = header.width, header.height
                else:
                    check_datum(view)
                    width, height = view.width, view.height
                if bounded:
                    self._check_pixels(width, height)
                with _decoding:
                    return datum_to_image(view, "RGB")
        _, images, _ = self._stored(keys)
        if not 0 <= part < len(images):
            raise IndexError(f"sample {index} has {len(images)} images, not image {part}")
        image = images[part]
        if isinstance(image, bytes):
            header = read_encoded_header(image)
            width, height = header.width, header.height
        else:
            height, width = image.shape[:2]
        if bounded:
            self._check_pixels(width, height)
        with _decoding:
            return decode_image(image) if isinstance(image, bytes) else array_image(image)

    def thumbnail(self, index: int) -> tuple[bytes, str | None]:
        """The PNG thumbnail of sample `index` (cached), and why it is a placeholder (None: it is the image).

        Never raises for a bad record: a record that cannot be shown gives a placeholder naming why.

        Raises:
            IndexError: `index` is out of range.
        """
        self.reader.sample_keys(index)  # an index out of range is the caller's 404, not a placeholder
        cached = self._thumbnails.get((self.number, index))
        if cached is not None:
            return cached
        try:
            item = (png_bytes(fit(self.picture(index), THUMB_SIDE)), None)
        except CaffeLmdbError as exc:
            item = (png_bytes(placeholder(str(exc), THUMB_SIDE)), str(exc))
        self._thumbnails.put((self.number, index), item)
        return item

    def original(self, index: int, part: int = 0) -> tuple[bytes, str]:
        """The stored image bytes of sample `index` and their suffix (`.jpg`); raw pixels as PNG.

        Raises:
            IndexError, CaffeLmdbError: as `picture`.
        """
        keys = tuple(bytes(key) for key in self.reader.sample_keys(index))
        if self.datum:
            with begin_read(self.reader.environment(), buffers=True) as txn:
                view = parse_datum_view(self._value(txn, keys[0]))
                if view.encoded:
                    return bytes(view.data), _suffix(view.data)
        else:
            _, images, _ = self._stored(keys)
            if 0 <= part < len(images) and isinstance(images[part], bytes):
                return images[part], _suffix(images[part])
        return png_bytes(self.picture(index, part, bounded=False), compress_level=1), ".png"

    def values(self, index: int) -> bytes:
        """The LMDB value of sample `index`'s first key, as stored (a serialized Datum for Datum LMDBs).

        Raises:
            IndexError, CaffeLmdbError: out of range, or the key is missing or unreadable.
        """
        key = bytes(self.reader.sample_keys(index)[0])
        with self.reader.environment().begin(buffers=True) as txn:
            return bytes(self._value(txn, key))

    def pixels(self, index: int, record_pixels: Callable[[Any], np.ndarray]) -> np.ndarray:
        """Sample `index` as C x H x W planes in Datum order, as a `CaffeTransform` reads it.

        `record_pixels` is the transform's own reader of a Datum (`CaffeTransform.record_pixels`);
        other layouts give their decoded image's planes.

        Raises:
            IndexError, CaffeLmdbError: as `picture`.
        """
        if not self.datum:
            return image_planes(self.picture(index))
        key = bytes(self.reader.sample_keys(index)[0])
        with begin_read(self.reader.environment(), buffers=True) as txn:
            view = parse_datum_view(self._value(txn, key))
            if view.encoded:
                header = read_encoded_header(view.data)
                self._check_pixels(header.width, header.height)
            else:
                self._check_pixels(view.width, view.height)
            with _decoding:
                return np.array(record_pixels(view))  # a copy: the view ends with the transaction

    # ------------------------------------------------------------------ listing, search

    def page(self, start: int, size: int, label: int | None = None) -> Page | None:
        """The indices of one gallery page: all records, or those of class `label` (None until the overview is done).

        `start` is a position in the listing, clamped to it.
        """
        if label is None:
            total = len(self)
            start = max(0, min(start, max(total - 1, 0)))
            return Page(list(range(start, min(start + size, total))), start, size, total)
        listing = self.label_indices(label)
        if listing is None:
            return None
        total = len(listing)
        start = max(0, min(start, max(total - 1, 0)))
        return Page(listing[start:start + size].tolist(), start, size, total, label)

    def label_indices(self, label: int) -> np.ndarray | None:
        """The indices of records labelled `label`, in order; None until the overview is done."""
        job = self._overview
        if job is None or not job.finished or job.result is None:
            return None
        with self._lock:
            found = self._label_lists.get(label)
            if found is None:
                found = np.flatnonzero(job.result.labels == label)
                self._label_lists[label] = found
                while len(self._label_lists) > _LABEL_LISTS:
                    self._label_lists.popitem(last=False)
            return found

    def position_of(self, index: int, label: int | None) -> int:
        """Where record `index` is (or would be) in the listing of `label` (all records: itself)."""
        if label is None:
            return index
        listing = self.label_indices(label)
        return index if listing is None else int(np.searchsorted(listing, index))

    def find(self, text: str) -> tuple[int | None, bytes | None]:
        """The record whose key is `text`, else the first whose key starts with it (LMDB's `set_range`).

        Returns (its index, its key): (None, key) when the LMDB has the key but the key list lacks
        it, (None, None) when no key starts with `text`. Only for Datum LMDBs.
        """
        if self.lookup is None:
            return None, None
        wanted = text.encode("utf-8", "surrogateescape")
        exact = self.lookup.index_of(wanted) if wanted else None
        if exact is not None:
            return exact, wanted
        with self.reader.environment().begin(buffers=True) as txn:
            cursor = txn.cursor()
            found = bytes(cursor.key()) if cursor.set_range(wanted) else None
        if found is None or not found.startswith(wanted):
            return None, None
        return self.lookup.index_of(found), found

    # ------------------------------------------------------------------ whole-LMDB work

    def overview(self) -> Job | None:
        """The overview job (started on the first call, kept); None for layouts other than Datum."""
        if not self.datum:
            return None
        with self._lock:
            if self._overview is None:
                self._overview = Job(self.entries, self._compute_overview)
            return self._overview

    def _compute_overview(self, job: Job) -> Overview:
        keys = self.keys
        count = len(keys)
        labels = np.full(count, NO_LABEL, np.int64)
        elsewhere: list[tuple[bytes, int]] = []  # walked records not at their walk position in the key list
        position = 0

        def seen(key: bytes, datum: DatumView | None) -> None:
            nonlocal position
            job.done += 1
            if datum is not None:
                if position < count and keys[position] == key:
                    labels[position] = datum.label
                else:
                    elsewhere.append((key, datum.label))
            position += 1

        with begin_read(self.reader.environment(), buffers=True) as txn:
            info = txn_info(txn, self.path, on_record=seen)
        for key, label in elsewhere:  # a keys file in another order than the LMDB's
            index = self.lookup.index_of(key)
            if index is not None:
                labels[index] = label
        return Overview(info, labels)

    def check(self, start: bool = False) -> Job | None:
        """The check job: None until started; `start` starts it (again, once the last one finished)."""
        with self._lock:
            if start and (self._check is None or self._check.finished):
                total = self.entries if self.datum else len(self)
                self._check = Job(total, self._datum_check if self.datum else self._layout_check)
            return self._check

    def _datum_check(self, job: Job) -> CheckResult:
        file_keys = load_keys(self.keys_file) if self.keys_file is not None else None
        report = VerifyReport(path=self.path, keys_path=self.keys_file)
        with begin_read(self.reader.environment(), buffers=True) as txn:
            txn_verify(txn, report, file_keys, decode=True, on_record=job.tick)
        problems = [Problem(None if key is None else self.lookup.index_of(key), key, message)
                    for key, message in report.problems]
        return CheckResult(report.records, problems, str(report))

    def _layout_check(self, job: Job) -> CheckResult:
        problems = []
        for index in range(len(self)):
            keys = self.reader.sample_keys(index)
            try:
                for part in range(self.record(index).parts):
                    self.picture(index, part, bounded=False)
            except CaffeLmdbError as exc:
                problems.append(Problem(index, bytes(keys[0]), str(exc)))
            job.tick()
        verdict = "OK" if not problems else f"{len(problems)} problems"
        return CheckResult(len(self), problems, f"{self.path}: {len(self)} samples decoded: {verdict}")

    def target_kinds(self, count: int = 16) -> list[str]:
        """For layouts other than Datum: the target types of the first `count` samples, with an example each."""
        kinds: dict[str, str] = {}
        for index in range(min(count, len(self))):
            try:
                _, _, target = self._stored(tuple(bytes(k) for k in self.reader.sample_keys(index)))
            except CaffeLmdbError:
                continue
            kinds.setdefault(type(target).__name__, _short(repr(target), 60))
        return [f"{kind} (e.g. {example})" for kind, example in kinds.items()]


def _float_summary(values: np.ndarray) -> FloatSummary | None:
    if not len(values):
        return None
    return FloatSummary(len(values), float(values.min()), float(values.max()), float(values.mean(dtype=np.float64)),
                        tuple(float(v) for v in values[:16]))


def _suffix(data: bytes | memoryview) -> str:
    """The file name suffix of encoded image bytes, by their magic number (`.bin` when unknown)."""
    found = sniff_image_format(data)
    return suffix_for(found) if found is not None else ".bin"


def _short(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def describe_shape(record: RecordView) -> str:
    """`3x256x256 JPEG` for a record's caption."""
    shape = format_shape(record.shape) if record.shape is not None else ""
    return " ".join(part for part in (shape, record.image_format or "") if part)
