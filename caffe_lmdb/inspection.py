"""What an LMDB holds (`info`) and whether every record of it is sound (`verify`), without training on it.

`info` answers "what did I inherit?": record count, raw vs encoded, the sizes and labels present,
disk use and key range. It never decodes an image (encoded dims come from the file header), so it
runs at cursor speed on big LMDBs, and `sample` bounds the work further. `verify` answers "is it
intact?" after a copy or a conversion: every record parsed and checked against its own dims, the
keys file compared with the LMDB, and, on request, every encoded image decoded. Every problem is
reported with the key it concerns.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from .datum import DatumView, check_datum, datum_to_image, parse_datum_view, read_encoded_header
from .errors import CaffeLmdbError, CorruptLmdbError, DatumError, InputError, KeysFileError
from .keys import load_keys, txn_keys
from .layouts import Layout
from .progress import progress_bar
from .publish import pending_publish
from .reader import detected_layout, open_layout_reader
from .safe_lmdb import get_value, lmdb_errors_named, shared_readonly
from .tool_reading import (
    class_names,
    disk_bytes,
    format_key,
    format_shape,
    iter_values,
    keys_file_for,
    label_name,
    random_subset,
    read_txn,
)

# --------------------------------------------------------------------------- info

@dataclass
class LmdbInfo:
    """The summary `info` prints. Counts cover `scanned` records: all of them, or a sample.

    Attributes:
        path: the LMDB.
        records: entries in the LMDB (always exact).
        scanned: records read to build the counts below (`records` unless sampled).
        raw, encoded, float_records: records by kind (float: pixels in `float_data`).
        invalid: records that are not Datums, and the first such key.
        shapes: channels x height x width -> count (encoded dims from the header; None: unknown).
        formats: encoded payload format (JPEG, PNG, ...) -> count.
        labels: label -> count.
        classes: the converter's class names, when its class file is beside the LMDB.
        payload_bytes: bytes of the scanned values.
        disk_bytes: bytes the LMDB's files take on disk.
        first_key, last_key: the LMDB's first and last keys (key order).
        keys_path, keys_count: the keys file found and how many keys it holds.
    """

    path: Path
    records: int
    scanned: int = 0
    raw: int = 0
    encoded: int = 0
    float_records: int = 0
    invalid: int = 0
    first_invalid_key: bytes | None = None
    shapes: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    classes: list[str] | None = None
    payload_bytes: int = 0
    disk_bytes: int = 0
    first_key: bytes | None = None
    last_key: bytes | None = None
    keys_path: Path | None = None
    keys_count: int | None = None

    @property
    def sampled(self) -> bool:
        return self.scanned < self.records

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (keys decoded as UTF-8 with backslash escapes, histograms as lists)."""
        def text(key: bytes | None) -> str | None:
            return None if key is None else key.decode("utf-8", "backslashreplace")

        return {
            "path": str(self.path),
            "records": self.records,
            "scanned": self.scanned,
            "sampled": self.sampled,
            "raw": self.raw,
            "encoded": self.encoded,
            "float": self.float_records,
            "invalid": self.invalid,
            "first_invalid_key": text(self.first_invalid_key),
            "shapes": [{"shape": format_shape(shape), "count": count} for shape, count in self._shapes()],
            "formats": dict(sorted(self.formats.items())),
            "labels": [
                {"label": label, "name": label_name(label, self.classes), "count": count}
                for label, count in sorted(self.labels.items())
            ],
            "payload_bytes": self.payload_bytes,
            "disk_bytes": self.disk_bytes,
            "first_key": text(self.first_key),
            "last_key": text(self.last_key),
            "keys_file": None if self.keys_path is None else str(self.keys_path),
            "keys_file_count": self.keys_count,
        }

    def _shapes(self) -> list[tuple[tuple[int, int, int] | None, int]]:
        return sorted(self.shapes.items(), key=lambda item: (-item[1], format_shape(item[0])))

    def __str__(self) -> str:
        sample = f" (counts from a sample of {self.scanned})" if self.sampled else ""
        kinds = f"{self.raw} raw, {self.encoded} encoded"
        if self.float_records:
            kinds += f", {self.float_records} float"
        lines = [
            f"{self.path}: {self.records} records{sample}: {kinds}",
            f"  disk: {_mib(self.disk_bytes)}, record values: {_mib(self.payload_bytes)}"
            + (" (in the sample)" if self.sampled else ""),
            f"  first {format_key(self.first_key)}" if self.first_key is not None else "  empty LMDB",
        ]
        if self.last_key is not None:
            lines.append(f"  last  {format_key(self.last_key)}")
        if self.keys_path is not None:
            agree = "" if self.keys_count == self.records else f", but the LMDB has {self.records} records"
            lines.append(f"  keys file: {self.keys_path} ({self.keys_count} keys{agree})")
        else:
            lines.append("  keys file: none (keys are scanned from the LMDB)")
        if self.invalid:
            lines.append(f"  NOT DATUMS: {self.invalid} records, first {format_key(self.first_invalid_key)}")
        if self.shapes:
            shapes = self._shapes()
            lines.append("  channels x height x width:")
            lines += [f"    {format_shape(shape):<16} {count}" for shape, count in shapes[:_TEXT_ROWS]]
            if len(shapes) > _TEXT_ROWS:
                more = len(shapes) - _TEXT_ROWS
                lines.append(f"    ... {more} more sizes ({_size_range(self.shapes)}; --json lists all)")
        if self.formats:
            lines.append("  encoded formats: " + ", ".join(f"{fmt} {n}" for fmt, n in sorted(self.formats.items())))
        if self.labels:
            named = "" if self.classes is None else " (names from the class file)"
            lines.append(f"  labels{named}:")
            labels = sorted(self.labels.items())
            for label, count in labels[:_TEXT_ROWS]:
                name = label_name(label, self.classes)
                lines.append(f"    {label:>6} {name or '':<20} {count}")
            if len(labels) > _TEXT_ROWS:
                more = len(labels) - _TEXT_ROWS
                lines.append(f"    ... {more} more labels, up to {labels[-1][0]} (--json lists all)")
        return "\n".join(lines)


#: Histogram rows the text summary shows (sizes by frequency, labels in order); `--json` has them all.
_TEXT_ROWS = 20


def _size_range(shapes: Counter) -> str:
    known = [shape for shape in shapes if shape is not None]
    if not known:
        return "all unknown"
    heights, widths = [s[1] for s in known], [s[2] for s in known]
    return f"height {min(heights)}..{max(heights)}, width {min(widths)}..{max(widths)}"


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def info(
    lmdb_path: str | os.PathLike,
    keys_path: str | os.PathLike | None = None,
    sample: int | None = None,
    seed: int = 0,
    layout: str | Layout | None = None,
) -> LmdbInfo | LayoutInfo:
    """Describe an LMDB: kinds of record, sizes, labels, disk use, key range. Decodes no image.

    Args:
        lmdb_path: the LMDB (a directory with `data.mdb`, or a single file).
        keys_path: its keys file; default the converter's `<stem>_keys.npy` when present.
        sample: count only this many records, drawn at random (seeded) from the keys; None reads all.
        seed: the seed of the sample.
        layout: read the LMDB as this layout (default: detected). Any layout but Caffe's Datums
            gets `layout_info` (a `LayoutInfo`: the layout, the sample count, a sample's kinds).

    Returns:
        The summary; `str()` gives the text `caffe-lmdb info` prints, `to_dict()` its JSON.

    Raises:
        LmdbFormatError: the path is not an LMDB.
        CorruptLmdbError: the LMDB is truncated or damaged (names the LMDB, and the last good key).
        KeysFileError: the keys file cannot be read, or a sampled key is not in the LMDB.
        InputError: `sample` is below 1.
    """
    if sample is not None and sample < 1:
        raise InputError(f"--sample must be at least 1, got {sample}")
    other = tool_layout(lmdb_path, layout)
    if other is not None:
        return layout_info(lmdb_path, other, sample, seed)
    path = Path(lmdb_path)
    with read_txn(path) as txn:
        return txn_info(txn, path, keys_path, sample=sample, seed=seed)


def txn_info(
    txn: lmdb.Transaction,
    lmdb_path: str | os.PathLike,
    keys_path: str | os.PathLike | None = None,
    *,
    sample: int | None = None,
    seed: int = 0,
    on_record: Callable[[bytes, DatumView | None], object] | None = None,
) -> LmdbInfo:
    """`info` in a read transaction already open on the LMDB, for a caller that keeps it open (`serve`).

    py-lmdb opens an LMDB once per process, so a server that holds it open cannot call `info`.

    Args:
        txn: a `buffers=True` transaction from `safe_lmdb.begin_read` (its walk is checked).
        lmdb_path, keys_path, sample, seed: as `info`.
        on_record: called with each record's key and parsed Datum (None: not a Datum), after it
            is counted: progress, or more from the same walk.

    Raises:
        As `info`.
    """
    path = Path(lmdb_path)
    resolved_keys = keys_file_for(path, keys_path)
    result = LmdbInfo(path=path, records=txn.stat()["entries"], classes=class_names(path),
                      disk_bytes=disk_bytes(path), keys_path=resolved_keys)
    file_keys = load_keys(resolved_keys) if resolved_keys is not None else None
    if file_keys is not None:
        result.keys_count = len(file_keys)
    cursor = txn.cursor()
    with lmdb_errors_named(path, "reading its first and last keys"):
        if cursor.first():
            result.first_key = bytes(cursor.key())
            cursor.last()
            result.last_key = bytes(cursor.key())
    if sample is None or sample >= result.records:
        pairs = iter_values(txn)
    else:
        keys = file_keys if file_keys is not None else txn_keys(txn)
        pairs = _sampled_values(txn, path, random_subset(keys, sample, seed), resolved_keys)
    for key, value in pairs:
        datum = _count(result, key, value)
        if on_record is not None:
            on_record(key, datum)
    return result


def _sampled_values(
    txn: lmdb.Transaction, path: Path, keys: np.ndarray, keys_path: Path | None
) -> Iterator[tuple[bytes, memoryview]]:
    for key in keys:
        value = get_value(txn, bytes(key), path)
        if value is None:
            raise KeysFileError(f"{keys_path}: {format_key(key)} is not in the LMDB")
        yield bytes(key), value


def _count(result: LmdbInfo, key: bytes, value: memoryview) -> DatumView | None:
    """Count one record into `result`; returns its parsed Datum (None: not a Datum)."""
    result.scanned += 1
    result.payload_bytes += len(value)
    try:
        datum = parse_datum_view(value)
    except DatumError:
        result.invalid += 1
        if result.first_invalid_key is None:
            result.first_invalid_key = key
        return None
    result.labels[datum.label] += 1
    if datum.encoded:
        result.encoded += 1
        try:
            header = read_encoded_header(datum.data)
        except DatumError:
            result.formats["unknown"] += 1
            result.shapes[None] += 1
            return datum
        result.formats[header.format] += 1
        result.shapes[(header.channels, header.height, header.width)] += 1
        return datum
    if datum.data:
        result.raw += 1
    else:
        result.float_records += 1
    result.shapes[(datum.channels, datum.height, datum.width)] += 1
    return datum


# --------------------------------------------------------------------------- verify

@dataclass
class VerifyReport:
    """What `verify` found: one (key, message) per problem; no problems means the LMDB is sound.

    Attributes:
        path: the LMDB.
        records: records checked.
        decoded: encoded records decoded (with `decode=True`).
        keys_path: the keys file compared with the LMDB, if any.
        problems: (key or None, what is wrong), in the order found.
        damaged: the LMDB itself is damaged (truncated, or a bad B-tree page): the check stopped
            there, after `records` records, and the keys file was not compared.
    """

    path: Path
    records: int = 0
    decoded: int = 0
    keys_path: Path | None = None
    problems: list[tuple[bytes | None, str]] = field(default_factory=list)
    damaged: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem_lines(self) -> list[str]:
        """One line per problem, each naming its key."""
        return [f"{self.path}: {format_key(key) + ': ' if key is not None else ''}{message}"
                for key, message in self.problems]

    def __str__(self) -> str:
        checked = f"{self.records} records checked"
        if self.damaged:
            checked += " before the damage"
        if self.decoded:
            checked += f", {self.decoded} encoded images decoded"
        if self.keys_path is not None and not self.damaged:
            checked += f", keys file {self.keys_path} compared"
        verdict = "OK" if self.ok else f"{len(self.problems)} problems"
        return f"{self.path}: {checked}: {verdict}"


def verify(
    lmdb_path: str | os.PathLike,
    keys_path: str | os.PathLike | None = None,
    decode: bool = False,
    progress: bool | None = None,
    layout: str | Layout | None = None,
) -> VerifyReport:
    """Check every record of an LMDB, and its keys file, and collect each problem with its key.

    Checks: each value parses as a Datum; raw data is exactly channels*height*width bytes (or
    float_data values); encoded data is not empty and, with `decode`, decodes as an image; the
    keys file (given, or the converter's `<stem>_keys.npy` if present) lists each LMDB key once
    and nothing else. Problems are collected rather than raised so that one pass names them all.
    A damaged LMDB (truncated file, bad B-tree page) is a problem too: the check stops there, since
    nothing past a bad page can be reached, and says after which key.

    Args:
        lmdb_path: the LMDB.
        keys_path: the keys file to compare; default the converter's, when present.
        decode: also decode every encoded image (slower: a full image decode per record).
        progress: show a progress bar (default: when stderr is a terminal).
        layout: read the LMDB as this layout (default: detected). Any layout but Caffe's Datums
            gets `layout_verify`: every sample read and decoded, each failure with its key.

    Returns:
        The report; `report.ok` says whether nothing was found.

    Raises:
        LmdbFormatError: the path is not an LMDB.
        KeysFileError: the keys file cannot be read at all.
    """
    other = tool_layout(lmdb_path, layout)
    if other is not None:
        return layout_verify(lmdb_path, other, progress)
    path = Path(lmdb_path)
    report = VerifyReport(path=path, keys_path=keys_file_for(path, keys_path))
    if pending_publish(path) is not None:
        report.problems.append((None, "a run was killed while publishing it: the LMDB and its side files may be from "
                                      "different runs; the next caffe-lmdb run writing it finishes the publish (e.g. "
                                      "the same command with --resume)"))
        if not os.path.lexists(path):  # killed before the LMDB itself was renamed in
            return report
    file_keys = load_keys(report.keys_path) if report.keys_path is not None else None
    try:
        with read_txn(path) as txn, progress_bar(txn.stat()["entries"], path.name, progress) as bar:
            return txn_verify(txn, report, file_keys, decode=decode, on_record=bar.update)
    except CorruptLmdbError as exc:  # truncated, or a damaged branch page: found on opening
        return _stopped_by_damage(report, exc)


def txn_verify(
    txn: lmdb.Transaction,
    report: VerifyReport,
    file_keys: np.ndarray | None = None,
    *,
    decode: bool = False,
    on_record: Callable[[], object] | None = None,
) -> VerifyReport:
    """`verify`'s checks of every record and of the keys file, in a read transaction already open on `report.path`.

    For a caller that keeps the LMDB open (`serve`): py-lmdb opens an LMDB once per process.

    Args:
        txn: a `buffers=True` transaction from `safe_lmdb.begin_read` (its walk is checked).
        report: the report to add to (its `path` and `keys_path` say what is checked).
        file_keys: the keys file's keys (`keys.load_keys(report.keys_path)`); None: not compared.
        decode: as `verify`.
        on_record: called once per record checked (progress).

    Returns:
        `report`, with the problems found.
    """
    path = report.path
    classes = class_names(path)
    lmdb_keys: list[bytes] = []
    try:
        for key, value in iter_values(txn):
            lmdb_keys.append(key)
            report.records += 1
            try:
                datum = parse_datum_view(value)
                check_datum(datum)
                if classes is not None and not 0 <= datum.label < len(classes):
                    raise DatumError(f"label {datum.label} has no class in the class file "
                                     f"({len(classes)} classes)")
                if decode and datum.encoded:
                    datum_to_image(datum)
                    report.decoded += 1
            except DatumError as exc:
                report.problems.append((key, str(exc)))
            if on_record is not None:
                on_record()
    except CorruptLmdbError as exc:
        return _stopped_by_damage(report, exc)
    if not lmdb_keys:
        report.problems.append((None, "the LMDB has no records"))
    if file_keys is not None:
        report.problems += _compare_keys(report.keys_path, file_keys.tolist(), lmdb_keys)
    return report


def _stopped_by_damage(report: VerifyReport, exc: CorruptLmdbError) -> VerifyReport:
    """The report of a check that stopped at a damaged LMDB: nothing past a bad page can be reached."""
    report.damaged = True
    report.problems.append((None, str(exc).removeprefix(f"{report.path}: ")))
    return report


def _compare_keys(keys_path: Path, file_keys: list[bytes], lmdb_keys: list[bytes]) -> list[tuple[bytes, str]]:
    """Keys the file lists that the LMDB lacks, keys it lists twice, and LMDB keys it does not list."""
    problems: list[tuple[bytes, str]] = []
    in_lmdb = set(lmdb_keys)
    seen: set[bytes] = set()
    for key in file_keys:
        if key in seen:
            problems.append((key, f"listed twice in keys file {keys_path}"))
        elif key not in in_lmdb:
            problems.append((key, f"listed in keys file {keys_path} but missing from the LMDB"))
        seen.add(key)
    problems += [(key, f"in the LMDB but not in keys file {keys_path}") for key in lmdb_keys if key not in seen]
    return problems


# --------------------------------------------------------------------------- other layouts (LSUN, ...)

def tool_layout(lmdb_path: str | os.PathLike, layout: str | Layout | None = None) -> Layout | str | None:
    """The layout `info`/`verify` read `lmdb_path` with when it is not Caffe's Datums, else None (the Datum path).

    Detection looks at the first keys and a value only (nothing is scanned or written). Datum
    LMDBs and LMDBs no layout recognises keep the Datum path and its messages (pickle/msgpack
    records no layout reads are pointed to `migrate` there); `layout` forces one.
    """
    if layout is not None:
        return None if layout == "datum" or getattr(layout, "name", None) == "datum" else layout
    path = Path(lmdb_path)
    if not os.path.lexists(path):
        return None
    try:
        found = detected_layout(path)
    except (CaffeLmdbError, OSError):
        return None
    return None if found.name == "datum" else found


@dataclass
class LayoutInfo:
    """What `info` says of an LMDB of another layout: the layout, the sample count, and a sample's kinds.

    Attributes:
        path, layout: the LMDB and its layout (`Layout.describe()`).
        samples: samples in it (exact); entries: its LMDB entries.
        scanned: samples read for the counts below (a random sample, seeded).
        images_per_sample: images a sample holds (1; 2 for a pair).
        formats: stored image format (JPEG, WEBP, "pixels") -> count.
        shapes: channels x height x width -> count (encoded dims from the file header).
        targets: target kind (int, str, None, ...) -> count; examples: a few targets.
        invalid: sampled samples that could not be read; problems: (key, message) of each.
        disk_bytes: bytes the LMDB's files take on disk.
    """

    path: Path
    layout: str
    samples: int
    entries: int
    scanned: int = 0
    images_per_sample: int = 1
    formats: Counter = field(default_factory=Counter)
    shapes: Counter = field(default_factory=Counter)
    targets: Counter = field(default_factory=Counter)
    examples: list[Any] = field(default_factory=list)
    invalid: int = 0
    problems: list[str] = field(default_factory=list)
    disk_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "path": str(self.path), "layout": self.layout, "samples": self.samples, "entries": self.entries,
            "scanned": self.scanned, "images_per_sample": self.images_per_sample,
            "formats": dict(sorted(self.formats.items())),
            "shapes": [{"shape": format_shape(shape), "count": count} for shape, count in self.shapes.most_common()],
            "targets": dict(sorted(self.targets.items())), "examples": [repr(example) for example in self.examples],
            "invalid": self.invalid, "problems": self.problems, "disk_bytes": self.disk_bytes,
        }

    def __str__(self) -> str:
        lines = [f"{self.path}: {self.samples} samples ({self.entries} LMDB entries), layout {self.layout}",
                 f"  disk: {_mib(self.disk_bytes)}; kinds below from {self.scanned} samples"
                 + (f", {self.images_per_sample} images each" if self.images_per_sample != 1 else "")]
        if self.formats:
            lines.append("  image formats: " + ", ".join(f"{fmt} {n}" for fmt, n in sorted(self.formats.items())))
        if self.shapes:
            lines.append("  channels x height x width:")
            lines += [f"    {format_shape(shape):<16} {count}" for shape, count in self.shapes.most_common(_TEXT_ROWS)]
        if self.targets:
            lines.append("  targets: " + ", ".join(f"{kind} {n}" for kind, n in sorted(self.targets.items()))
                         + (f" (e.g. {', '.join(repr(example)[:40] for example in self.examples)})"
                            if self.examples else ""))
        lines += [f"  UNREADABLE: {problem}" for problem in self.problems[:_TEXT_ROWS]]
        return "\n".join(lines)


#: Samples `info` reads of a layout LMDB when no `sample` is given (it reads values, unlike the Datum scan).
LAYOUT_INFO_SAMPLES = 64


def layout_info(lmdb_path: str | os.PathLike, layout: str | Layout, sample: int | None = None,
                seed: int = 0) -> LayoutInfo:
    """`info` of a non-Datum layout: layout, sample count, and the formats, sizes and targets of a random sample.

    Images are not decoded: sizes come from the file headers (`read_encoded_header`), pixels' own shape.
    """
    reader = open_layout_reader(lmdb_path, layout)
    path = Path(lmdb_path)
    with shared_readonly(path) as env:
        entries = env.stat()["entries"]
    result = LayoutInfo(path=path, layout=reader.layout.describe(), samples=len(reader), entries=entries,
                        disk_bytes=disk_bytes(path))
    count = min(len(reader), sample or LAYOUT_INFO_SAMPLES)
    chosen = np.sort(np.random.default_rng(seed).choice(len(reader), size=count, replace=False)) if count else []
    for index in chosen:
        result.scanned += 1
        try:
            images, target = reader.stored(int(index))
        except (KeysFileError, DatumError) as exc:
            result.invalid += 1
            result.problems.append(str(exc).removeprefix(f"{reader.root}: "))
            continue
        result.images_per_sample = len(images)
        for image in images:
            _count_image(result, image)
        kind = "None" if target is None else type(target).__name__
        result.targets[kind] += 1
        if len(result.examples) < 3 and target not in result.examples:
            result.examples.append(target)
    return result


def _count_image(result: LayoutInfo, image: bytes | np.ndarray) -> None:
    if isinstance(image, bytes):
        try:
            header = read_encoded_header(image)
        except DatumError:
            result.formats["unknown"] += 1
            result.shapes[None] += 1
            return
        result.formats[header.format] += 1
        result.shapes[(header.channels, header.height, header.width)] += 1
        return
    result.formats["pixels"] += 1
    height, width = image.shape[:2]
    result.shapes[(1 if image.ndim == 2 else image.shape[2], height, width)] += 1


def layout_verify(lmdb_path: str | os.PathLike, layout: str | Layout, progress: bool | None = None) -> VerifyReport:
    """`verify` of a non-Datum layout: every sample read and decoded through `LayoutReader.read`.

    Each failure (a key the layout names that the LMDB lacks, e.g. a count or meta file pointing
    at absent keys; a value that does not decode) is a problem naming the key.
    """
    reader = open_layout_reader(lmdb_path, layout)
    path = Path(lmdb_path)
    report = VerifyReport(path=path)
    with progress_bar(len(reader), path.name, progress) as bar:
        for index in range(len(reader)):
            report.records += 1
            try:
                reader.read(index)
                report.decoded += 1
            except (KeysFileError, DatumError) as exc:
                report.problems.append((None, str(exc).removeprefix(f"{reader.root}: ")))
            bar.update()
    if not len(reader):
        report.problems.append((None, f"the LMDB has no samples ({reader.layout.describe()})"))
    return report
