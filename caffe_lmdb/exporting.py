"""LMDB -> image files: every record written back as a file in a class folder, plus a Caffe list file.

The export is the converter run backwards, so that `caffe-lmdb convert --list OUT/list.txt NEW.lmdb`
rebuilds the same Datums (same pixels or bytes, label, dims, in the same order):

* raw records become lossless PNGs (their exact pixels), encoded records their stored bytes
  unchanged, which the converter's `--encoded` mode stores unchanged again;
* the list file has one `class/file label` line per record, in key order, with any
  `float_data` targets as the extra numeric columns the converter reads them from.

Records the converter cannot rebuild exactly (4-channel or float pixels, GIF payloads, rotated
JPEGs, targets a list cannot express) are still exported, and reported with their keys.
File names come from the keys, which are not to be trusted: a key such as `00000001_../../x.jpg`
must not write outside the output folder, so names keep only the key's line id and last path
component, with separators and control characters replaced.

Nothing already in the output folder is written through or changed unasked: every file is a new
file renamed into place (a symlink planted at its name is replaced, never followed), a class
folder that is a symlink stops the export, and only `--overwrite` replaces a file that differs
(a FIFO or character device at a file's name is written into then, never replaced; a folder or
other special file there stops the export: see `files.write_bytes_atomic`).
The list file is written last, after the images are on disk, so its presence means the export
is complete; a run that stopped before it (a full disk, Ctrl-C, `kill -9`) is continued by
running the same command again: files that already hold what the export writes are kept.

An LMDB of another layout (LSUN, CRNN, ...: `reader.LAYOUTS`, detected as `info` detects it, or
`layout=`) is exported sample by sample, in the layout's order, by the same rules: each sample's
stored image (`Layout.stored`) as its bytes unchanged (the extension from its format) or, for
stored pixels, a PNG; names from the sample's first key as `migrate` names records
(`keys.sample_key`); targets by `migrate`'s rule, as list labels: an int (or numbers) is the
label, None label 0, a class name (LSUN's category) the class's number in order of first
appearance and its folder, and free text (OCR) label 0 with the text in `texts.txt`, line i for
list line i (`text_targets` escaping). A pair (low/high quality) needs `image` to pick a side.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .datum import (
    DatumView,
    check_datum,
    datum_to_image,
    is_passthrough_format,
    parse_datum_view,
    read_encoded_header,
)
from .errors import DatumError, ExportError, InputError, KeysFileError, describe_os_error
from .files import TMP_MARK, output_target_kind, write_bytes_atomic, write_text_atomic
from .formats import ENCODE_FORMATS, suffix_for
from .inspection import tool_layout
from .keys import sample_key
from .labels import sample_targets, short_repr
from .layouts import Layout
from .progress import progress_bar
from .reader import LayoutReader, open_layout_reader
from .text_targets import texts_file_bytes
from .tool_reading import class_names, format_key, iter_values, label_name, read_txn

#: The list file `export` writes in OUT_DIR.
LIST_NAME = "list.txt"

#: The text targets (OCR labels) an export of such a layout writes in OUT_DIR, line i for list line i.
TEXTS_NAME = "texts.txt"

#: Characters never put in a file name: path separators, controls, and what Windows refuses.
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')

_SEPARATORS = re.compile(r"[/\\]")

#: Longest file name written, in UTF-8 bytes (file systems allow 255; room is left for a `_N` suffix).
_MAX_NAME_BYTES = 200


#: zlib level of the PNGs: level 1 writes photos several times faster than Pillow's default 6, for
#: slightly larger files (figures: docs/benchmarks.md).
_PNG_LEVEL = 1

#: The name of a temporary `files.write_bytes_atomic` left behind when killed: `.NAME.tmp-PID`.
_STALE_TEMPORARY = re.compile(rf"^\.(.+){re.escape(TMP_MARK)}\d+$")


@dataclass
class ExportResult:
    """What an export wrote; `str()` is the summary `caffe-lmdb export` prints.

    Attributes:
        out_dir: the output folder.
        list_path: the Caffe list file written in it.
        written: files written, `raw` of them PNGs of raw records, `encoded` stored payloads.
        bytes_written: their total size.
        kept: of the files written, those already there with the same bytes (an earlier export's,
            e.g. one that was interrupted), left as they were.
        problems: (key, why) for records that could not be exported at all.
        inexact: (key or None, why) for exported records `convert` will not rebuild identically.
        convert_flags: the `convert` flags that rebuild the LMDB from the list (`--encoded`,
            `--gray`), or None when the records are too mixed for any one conversion, or of a
            kind `convert` does not write (float pixels, 4 channels).
        kinds: the kinds of record exported, sorted: "encoded", "float", "raw<C>" (C channels).
        layout: for an LMDB of another layout than Caffe's Datums, its description (`Layout.describe`).
        texts_path: the texts file written (text targets), else None.
    """

    out_dir: Path
    list_path: Path
    written: int = 0
    raw: int = 0
    encoded: int = 0
    bytes_written: int = 0
    kept: int = 0
    problems: list[tuple[bytes, str]] = field(default_factory=list)
    inexact: list[tuple[bytes | None, str]] = field(default_factory=list)
    convert_flags: list[str] | None = None
    kinds: tuple[str, ...] = ()
    layout: str | None = None
    texts_path: Path | None = None

    def report_lines(self, lmdb_path: str | os.PathLike) -> list[str]:
        """One line per record not exported, then one per record that will not convert back identically."""
        lines = [f"{lmdb_path}: {format_key(key)}: not exported: {why}" for key, why in self.problems]
        lines += [f"{lmdb_path}: {format_key(key) + ': ' if key is not None else ''}will not convert back "
                  f"identically: {why}" for key, why in self.inexact]
        return lines

    def convert_command(self, output: str = "NEW.lmdb") -> str | None:
        """The command that rebuilds the LMDB from this export, or None if no one command can."""
        if self.convert_flags is None:
            return None
        return " ".join(["caffe-lmdb convert", *self.convert_flags, "--list", str(self.list_path), output])

    def __str__(self) -> str:
        if self.layout is not None:
            return self._layout_summary()
        lines = [
            f"{self.out_dir}: {self.written} records exported ({self.raw} raw as PNG, {self.encoded} encoded "
            f"as stored), {self.bytes_written / 2**20:.1f} MiB; list file {self.list_path}"
        ]
        command = self.convert_command()
        if self.kept:
            lines.append(f"  {self.kept} files were already there with the same bytes (an earlier export's) and kept")
        if command is not None:
            lines.append(f"  rebuild with: {command}")
        elif self.written:
            lines.append(f"  {_kinds_summary(self.kinds)}")
        if self.inexact:
            lines.append(f"  {len(self.inexact)} records will not convert back identically (listed above)")
        if self.problems:
            lines.append(f"  {len(self.problems)} records could not be exported (listed above)")
        return "\n".join(lines)

    def _layout_summary(self) -> str:
        """A layout export's summary: samples, where their texts went, the `convert` making Datums of them."""
        lines = [
            f"{self.out_dir}: {self.written} samples exported from {self.layout.split(' ')[0]} layout ({self.raw} "
            f"stored pixels as PNG, {self.encoded} encoded as stored), {self.bytes_written / 2**20:.1f} MiB; "
            f"list file {self.list_path}"
        ]
        if self.texts_path is not None:
            lines.append(f"  text targets: {self.texts_path} (line i for list line i; the list's labels are 0)")
        if self.kept:
            lines.append(f"  {self.kept} files were already there with the same bytes (an earlier export's) and kept")
        command = self.convert_command()
        if command is not None:
            lines.append(f"  a Datum LMDB of them: {command} (or migrate the LMDB itself)")
        if self.inexact:
            lines.append(f"  {len(self.inexact)} samples will not convert back identically (listed above)")
        if self.problems:
            lines.append(f"  {len(self.problems)} samples could not be exported (listed above)")
        return "\n".join(lines)


#: How the summary names each kind of record (`_record_file`).
_KIND_NAMES = {"encoded": "encoded", "float": "float (float_data pixels)", "raw1": "raw 1-channel",
               "raw3": "raw 3-channel"}


def _kinds_summary(kinds: Iterable[str]) -> str:
    """Why no single `convert` rebuilds records of these kinds: what they are, one kind or a mix."""
    names = [_KIND_NAMES.get(kind, f"raw {kind.removeprefix('raw')}-channel") for kind in sorted(kinds)]
    if len(names) == 1:
        return f"the records are all {names[0]}, which convert does not write: no convert rebuilds them"
    return f"the records mix {', '.join(names[:-1])} and {names[-1]} kinds: no single convert rebuilds them"


def safe_name(text: str, fallback: str) -> str:
    """`text` as one harmless file name component: no separators or controls, no leading dots or spaces.

    Leading dots would make `..` or hidden files, a leading space breaks Caffe's list format, and
    names are cut to `_MAX_NAME_BYTES`. An empty result becomes `fallback`.
    """
    name = _UNSAFE.sub("_", text).strip(" ").lstrip(".").rstrip(". ")
    encoded = name.encode("utf-8")
    if len(encoded) > _MAX_NAME_BYTES:
        name = encoded[:_MAX_NAME_BYTES].decode("utf-8", "ignore").rstrip(". ")
    return name or fallback


def key_file_stem(key: bytes) -> str:
    """A file name (without directories) for a record: the key's line id and the last part of its path.

    `00000007_cat/deep/a.jpg` -> `00000007_a.jpg`; `00000001_../../x.jpg` -> `00000001_x.jpg`;
    keys not in Caffe's `%08d_<path>` form keep their last path component.
    """
    text = key.decode("utf-8", "backslashreplace")
    line_id, sep, relpath = text.partition("_")
    caffe_key = sep and line_id.isdigit()
    last = _SEPARATORS.split(relpath if caffe_key else text)[-1]
    return safe_name(f"{line_id}_{last}" if caffe_key else last, fallback="record")


def _with_suffix(name: str, suffix: str) -> str:
    stem, current = os.path.splitext(name)
    return (stem or name) + suffix if current else name + suffix


def _encoded_suffix(name: str, fmt: str) -> str:
    """Keep the key's extension when it names the payload's format (`.JPG`, `.jpeg`), else the format's own."""
    current = os.path.splitext(name)[1]
    if current and ENCODE_FORMATS.get(current.lower().lstrip(".")) == fmt:
        return name
    return _with_suffix(name, suffix_for(fmt))


def _target_columns(datum: DatumView) -> tuple[list[str], str | None]:
    """The list columns after the path (label, then targets) and, if they lose something, why."""
    if not datum.encoded and not datum.data:  # float pixels: float_data is the image, not targets
        return [str(datum.label)], None
    return _number_columns(datum.label, datum.float_data)


def _number_columns(label: int, floats: np.ndarray) -> tuple[list[str], str | None]:
    """A label and its float targets (float32) as list columns and, if a list cannot hold them, why."""
    if not len(floats):
        return [str(label)], None
    if len(floats) < 2 or floats[0] != label or not np.all(np.isfinite(floats)):
        return [str(label)], (
            f"float_data {floats.tolist()[:4]} cannot be list columns (convert writes all of a line's numbers, "
            "the first being the integer label)"
        )
    return [str(label), *(str(value) for value in floats[1:])], None


class _Names:
    """Hands out unique file names per folder (case-insensitively, for macOS and Windows file systems)."""

    def __init__(self) -> None:
        self._used: set[str] = set()

    def claim(self, folder: str, name: str) -> str:
        stem, suffix = os.path.splitext(name)
        candidate, n = name, 0
        while f"{folder}/{candidate}".casefold() in self._used:
            n += 1
            candidate = f"{stem}_{n}{suffix}"
        self._used.add(f"{folder}/{candidate}".casefold())
        return candidate


def export(
    lmdb_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    layout: str | Layout | None = None,
    image: int | None = None,
) -> ExportResult:
    """Write every record of an LMDB to `out_dir/<class>/<name>` and a Caffe list file `out_dir/list.txt`.

    Class folders are the converter's class names (`<stem>_classes.txt` beside the LMDB) or the
    label numbers. Records that are not valid Datums are skipped and reported in
    `result.problems`. The list file is written last, once the files are on disk, so its presence
    means the export finished; with `overwrite` an existing one is removed before anything else
    is replaced, so a run that fails leaves none.

    Re-running an export that stopped before its list file continues it: a file that already
    holds exactly what this export writes is kept (`result.kept`), so only a file with other
    content needs `overwrite`. Files are written as a new file renamed into place, so a symlink
    planted at a file's name is replaced, not written through (and is never read: without
    `overwrite` it is refused). A class folder that is itself a symlink is refused, wherever it
    points: the export writes only into folders that are what they seem.

    Args:
        lmdb_path: the LMDB.
        out_dir: the folder to write into (created if needed).
        overwrite: replace existing files; without it an existing file that differs stops the export.
        progress: show a progress bar (default: when stderr is a terminal).
        layout: read the LMDB as this layout (default: detected, as `info` does). Any layout but
            Caffe's Datums goes to `export_layout`.
        image: for a layout holding several images per sample (a pair), which one to export.

    Returns:
        What was written, what could not be, and the `convert` flags that rebuild the LMDB.

    Raises:
        LmdbFormatError: the path is not an LMDB, or not of the given layout.
        InputError: the list file, or a file to write with other content, exists and `overwrite`
            is False; an unknown layout name; `image` missing for pairs, or given for single images.
        ExportError: a class folder is a symlink, or a file cannot be written (the message names
            it, e.g. on a full disk; re-running the command continues the export).
    """
    other = tool_layout(lmdb_path, layout)
    if other is not None:
        return export_layout(open_layout_reader(lmdb_path, other), out_dir, overwrite=overwrite, progress=progress,
                             image=image)
    if image is not None:
        raise InputError(f"{lmdb_path}: --image picks one image of a pair; Caffe Datums hold one image each")
    lmdb_path, out_dir = Path(lmdb_path), Path(out_dir)
    result = ExportResult(out_dir=out_dir, list_path=out_dir / LIST_NAME)
    output = _Output(result, overwrite)
    classes = class_names(lmdb_path)
    target_counts: set[int] = set()
    with read_txn(lmdb_path, readahead=True) as txn, \
            progress_bar(txn.stat()["entries"], lmdb_path.name, progress) as bar:
        output.create()
        for key, value in iter_values(txn):
            bar.update()
            try:
                datum = parse_datum_view(value)
                payload, name, kind, inexact = _record_file(datum, key_file_stem(key))
            except DatumError as exc:
                result.problems.append((key, str(exc)))
                continue
            folder = safe_name(label_name(datum.label, classes) or str(datum.label), fallback=f"label_{datum.label}")
            columns, target_loss = _target_columns(datum)
            output.put(key, folder, name, payload, kind, columns)
            inexact = inexact or target_loss
            if inexact is not None:
                result.inexact.append((key, inexact))
            target_counts.add(len(columns) - 1)
    if len(target_counts) > 1:
        result.inexact.append((None, "records carry different numbers of float_data targets; convert keeps "
                                     "the smallest count on every line"))
    output.finish()
    return result


class _Output:
    """The files of one export: unique names, checked class folders, files written or kept, the list last.

    Both exports (a Datum LMDB's records, another layout's samples) write through it, so both
    keep the guarantees of the module docstring.
    """

    def __init__(self, result: ExportResult, overwrite: bool) -> None:
        self.result, self.overwrite, self.out_dir = result, overwrite, result.out_dir
        #: A folder or a refused special file at the list's name fails here, before any work.
        self.list_kind = output_target_kind(result.list_path)
        if self.list_kind is not None and not overwrite:
            raise InputError(f"{result.list_path}: already exists (pass --overwrite to replace it)")
        self.lines: list[str] = []
        self.kinds: set[str] = set()
        self._names = _Names()
        self._folders: dict[str, dict[str, list[Path]]] = {}  # checked class folders -> their stale temporaries
        self._root = self.out_dir

    def create(self) -> None:
        """Make the output folder; with `overwrite`, remove the old list first, so no list outlives its files."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.list_kind == "replace":  # (a FIFO or device is written through at the end, never removed)
                self.result.list_path.unlink()
        except OSError as exc:
            raise ExportError(describe_os_error(exc, self.out_dir)) from None
        self._root = self.out_dir.resolve()

    def put(self, key: bytes, folder: str, name: str, payload: bytes, kind: str, columns: list[str]) -> None:
        """Write one file to `folder/name` (made unique) and note its list line."""
        name = self._names.claim(folder, name)
        target = self.out_dir / folder / name
        if folder not in self._folders:
            self._folders[folder] = _checked_folder(target.parent, self._root, self.out_dir, key)
        self.put_file(target, payload, self._folders[folder].pop(name, ()))
        self.kinds.add(kind)
        self.lines.append(f"{folder}/{name} {' '.join(columns)}\n")
        result = self.result
        result.written += 1
        result.bytes_written += len(payload)
        result.raw += kind != "encoded"
        result.encoded += kind == "encoded"

    def put_file(self, target: Path, payload: bytes, stale: Iterable[Path]) -> None:
        """`payload` at `target` (kept when already there), then the temporaries a killed run left for it removed."""
        try:
            self.result.kept += _write(target, payload, self.overwrite)
        except OSError as exc:
            raise ExportError(_incomplete(exc, target, self.out_dir)) from None
        _remove_stale(stale)

    def finish(self) -> None:
        """The kinds and `convert` flags of what was written, then the list file, last."""
        result = self.result
        result.kinds = tuple(sorted(self.kinds))
        result.convert_flags = {frozenset({"raw3"}): [], frozenset({"raw1"}): ["--gray"],
                                frozenset({"encoded"}): ["--encoded"]}.get(frozenset(self.kinds))
        _write_list(result.list_path, self.lines, self.out_dir)


def export_layout(
    reader: LayoutReader,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool | None = None,
    image: int | None = None,
) -> ExportResult:
    """`export` of an LMDB of another layout: every sample's stored image as a file, the list, the texts.

    The rules are in the module docstring. A sample that cannot be read (a key the layout names is
    missing, bytes that are not an image, a target of another kind than the first sample's) is
    reported in `result.problems` with its first key, and the rest exported.

    Raises:
        InputError: as `export`; the first sample holds several images and `image` is None, or
            holds no image `image`.
        ExportError: as `export`.
    """
    out_dir = Path(out_dir)
    result = ExportResult(out_dir=out_dir, list_path=out_dir / LIST_NAME, layout=reader.layout.describe())
    output = _Output(result, overwrite)
    texts_path = out_dir / TEXTS_NAME
    output_target_kind(texts_path)  # a folder there fails before any work
    _check_image_choice(reader, image)
    targets = _LayoutTargets(reader.layout.class_targets, class_names(reader.root))
    with progress_bar(len(reader), Path(reader.root).name, progress) as bar:
        output.create()
        for index in range(len(reader)):
            bar.update()
            key = bytes(reader.sample_keys(index)[0])
            try:
                images, target = reader.stored(index)
                payload, name, kind, inexact = _stored_file(_one_image(images, image),
                                                            key_file_stem(sample_key(index, key)))
                folder, columns, target_loss = targets.place(target)
            except (KeysFileError, DatumError, ValueError) as exc:
                why = str(exc).removeprefix(f"{reader.root}: ").removeprefix(f"key {key!r}: ")
                result.problems.append((key, why))
                continue
            output.put(key, folder, name, payload, kind, columns)
            if inexact or target_loss:
                result.inexact.append((key, inexact or target_loss))
    if targets.mode == "texts":
        result.texts_path = texts_path
        output.put_file(texts_path, texts_file_bytes(targets.texts),
                        _stale_temporaries(out_dir).get(TEXTS_NAME, ()))
    output.finish()
    return result


def _check_image_choice(reader: LayoutReader, image: int | None) -> None:
    """Refuse, before anything is written, a pair without `image` (or an `image` the first sample lacks).

    Raises:
        InputError: naming the LMDB and the choices.
    """
    if not len(reader):
        return
    try:
        images, _ = reader.stored(0)
    except (KeysFileError, DatumError):
        return  # sample 0 is reported as a problem with the others
    if image is None and len(images) > 1:
        raise InputError(
            f"{reader.root}: the {reader.layout.name} layout holds {len(images)} images per sample (a pair such as "
            f"low and high quality); export one side with --image 0, --image 1{', ...' if len(images) > 2 else ''} "
            "(each to a folder of its own)")
    if image is not None and not 0 <= image < len(images):
        raise InputError(f"{reader.root}: --image {image}: the samples of the {reader.layout.name} layout hold "
                         f"{len(images)} image{'s' if len(images) > 1 else ''} (0..{len(images) - 1})")


def _one_image(images: tuple[bytes | np.ndarray, ...], image: int | None) -> bytes | np.ndarray:
    """The image of a sample to export: its only one, or image `image`.

    Raises:
        DatumError: the sample holds another number of images than the first.
    """
    if image is None and len(images) != 1:
        raise DatumError(f"holds {len(images)} images, the first sample one")
    position = image or 0
    if not 0 <= position < len(images):
        raise DatumError(f"holds {len(images)} images, so there is no image {position}")
    return images[position]


class _LayoutTargets:
    """A layout's targets as list columns and class folders, by `migrate`'s rule (the module docstring).

    The kind of the first sample's target (text naming a class, free text, numbers or None) decides
    for all; a sample whose target is of another kind is a problem.
    """

    def __init__(self, class_targets: bool, classes: list[str] | None) -> None:
        self.class_targets, self.classes = class_targets, classes
        #: "labels", "classes" or "texts"; None until the first sample is placed.
        self.mode: str | None = None
        self.class_of: dict[str, int] = {}
        self.texts: list[str] = []

    def place(self, target: Any) -> tuple[str, list[str], str | None]:
        """The folder, the list columns and any reason the list loses part of the target.

        Raises:
            ValueError: a target of another kind than the first sample's, or numbers a label cannot hold.
        """
        text = isinstance(target, str)
        mode = self.mode or ("labels" if not text else "classes" if self.class_targets else "texts")
        if mode == "labels":
            if text:
                raise ValueError(f"its target {short_repr(target)} is text, the first sample's is not")
            label, floats = (0, ()) if target is None else sample_targets(target)
            self.mode = mode
            columns, loss = _number_columns(label, np.asarray(floats, dtype=np.float32))
            return safe_name(label_name(label, self.classes) or str(label), fallback=f"label_{label}"), columns, loss
        if not text and (mode == "classes" or target is not None):
            raise ValueError(f"its target {short_repr(target)} is not text, as the first sample's is")
        self.mode = mode
        if mode == "texts":
            self.texts.append(target or "")
            return "0", ["0"], None
        label = self.class_of.setdefault(target, len(self.class_of))
        return safe_name(target, fallback=f"label_{label}"), [str(label)], None


def _write_list(list_path: Path, lines: list[str], out_dir: Path) -> None:
    """The list file, last: the images reach the disk before the list that says they are complete."""
    try:
        if hasattr(os, "sync"):
            os.sync()
        write_text_atomic(list_path, "".join(lines))
    except OSError as exc:
        raise ExportError(_incomplete(exc, list_path, out_dir)) from None
    _remove_stale(_stale_temporaries(out_dir).get(LIST_NAME, ()))


def _checked_folder(folder: Path, root: Path, out_dir: Path, key: bytes) -> dict[str, list[Path]]:
    """Refuse a class folder that is a symlink; return the temporaries a killed export left in it.

    Names cannot climb out of `out_dir`, but a symlink planted as a class folder could send every
    file of the class elsewhere, or into another class; it is refused rather than replaced, as it
    is not the export's to remove.

    Raises:
        ExportError: `folder` is a symlink (the message says where it points).
    """
    if folder.is_symlink():
        where = "resolves outside" if not folder.resolve().is_relative_to(root) else "points within"
        raise ExportError(
            f"{folder}: is a symbolic link (to {os.readlink(folder)}) and {where} {out_dir}; refusing to write "
            f"through it ({format_key(key)}): remove it or export to a new folder"
        )
    return _stale_temporaries(folder)


def _stale_temporaries(folder: Path) -> dict[str, list[Path]]:
    """The temporaries (`.NAME.tmp-PID`) an export killed mid-write left in `folder`, by the NAME they were for.

    Each is removed once this export has written its NAME: it is a left-over of the same file.
    """
    stale: dict[str, list[Path]] = {}
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                match = _STALE_TEMPORARY.match(entry.name)
                if match and entry.is_file(follow_symlinks=False):
                    stale.setdefault(match.group(1), []).append(Path(entry.path))
    except (FileNotFoundError, NotADirectoryError):
        pass
    return stale


def _remove_stale(paths: Iterable[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _incomplete(exc: OSError, target: Path, out_dir: Path) -> str:
    """The error for a file that could not be written: it names the file, and says how to go on."""
    if exc.filename is not None and TMP_MARK in os.fsdecode(exc.filename):  # name the file, not our temporary
        exc = OSError(exc.errno, exc.strerror)
    return (f"{describe_os_error(exc, target)} (the export in {out_dir} is incomplete, with no {LIST_NAME}; "
            "run the same command again to continue it)")


def _record_file(datum: DatumView, stem: str) -> tuple[bytes, str, str, str | None]:
    """The file bytes, name, kind (encoded, float, raw<C>) and any reason a rebuild would differ.

    Raises:
        DatumError: the record cannot be written as an image file.
    """
    check_datum(datum)
    if datum.encoded:
        return _encoded_file(bytes(datum.data), stem)
    image = datum_to_image(datum)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=_PNG_LEVEL)
    kind, inexact = f"raw{datum.channels}", None
    if not datum.data:
        kind, inexact = "float", "float pixels: the PNG holds them clipped to 0..255 as 8 bits"
    elif datum.channels not in (1, 3):
        inexact = f"{datum.channels} channels: convert stores 3 (alpha dropped)"
    return buffer.getvalue(), _with_suffix(stem, ".png"), kind, inexact


def _encoded_file(data: bytes, stem: str) -> tuple[bytes, str, str, str | None]:
    """Encoded image bytes as a file: the bytes unchanged, named for their format, and any reason convert changes them.

    Raises:
        DatumError: the bytes are not an image file whose header can be read.
    """
    header = read_encoded_header(data)
    inexact = None
    if not is_passthrough_format(header.format):
        inexact = f"{header.format} payload: convert re-encodes it (Caffe cannot decode {header.format})"
    elif header.orientation != 1:
        inexact = f"EXIF orientation {header.orientation}: convert re-encodes it upright"
    return data, _encoded_suffix(stem, header.format), "encoded", inexact


def _stored_file(image: bytes | np.ndarray, stem: str) -> tuple[bytes, str, str, str | None]:
    """A layout's stored image as a file: encoded bytes unchanged (`_encoded_file`), stored pixels as a PNG.

    Raises:
        DatumError: bytes that are not an image, or pixels that are not H x W x 3 (or H x W) uint8.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        return _encoded_file(bytes(image), stem)
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3)):
        raise DatumError(f"stored pixels must be H x W x 3 or H x W uint8, got {pixels.dtype} {pixels.shape}")
    if not pixels.size:
        raise DatumError(f"stored pixels are {' x '.join(map(str, pixels.shape))}: an image needs at least 1x1")
    gray = pixels.ndim == 2 or pixels.shape[2] == 1
    picture = Image.fromarray(np.ascontiguousarray(pixels.reshape(pixels.shape[:2]) if gray else pixels))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=_PNG_LEVEL)
    return buffer.getvalue(), _with_suffix(stem, ".png"), "raw1" if gray else "raw3", None


def _write(target: Path, payload: bytes, overwrite: bool) -> bool:
    """Put `payload` at `target` as a new file renamed into place; True if `target` already held it.

    An existing path is never opened for writing: a file that already holds exactly `payload`
    (an interrupted export's) is kept, anything else is refused without `overwrite` and replaced
    by the rename with it, so a symlink at `target` is replaced, not written through (a FIFO or
    character device is written into with `overwrite`, as `files.write_bytes_atomic` does).

    Raises:
        InputError: `target` exists with other content (or is a symlink, FIFO or device) and `overwrite`
            is False.
        OutputPathError: `target` is a folder or a special file `files.write_bytes_atomic` refuses.
        OSError: the file cannot be written (e.g. no space left).
    """
    kind = output_target_kind(target)
    if kind is not None:
        if _holds(target, payload):
            return True
        if not overwrite:
            what = ("is a symbolic link" if target.is_symlink() else "is a FIFO or device" if kind == "write through"
                    else "already exists with other content")
            raise InputError(f"{target}: {what} (pass --overwrite to replace it)")
    target.parent.mkdir(exist_ok=True)
    # Not synced one by one (a sync per image would dominate the export): `export` syncs once
    # before writing the list file.
    write_bytes_atomic(target, payload, sync=False)
    return False


def _holds(path: Path, payload: bytes) -> bool:
    """Whether `path` is a regular file (not a symlink: it is not followed) whose bytes are `payload`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size != len(payload):
            return False
        try:
            return f.read(len(payload) + 1) == payload
        except OSError:
            return False
