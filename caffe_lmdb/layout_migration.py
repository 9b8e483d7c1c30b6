"""`migrate` for every read layout (`reader.LAYOUTS`): an LMDB of any layout to Caffe Datums, nothing dropped.

`migration.migrate` sends here every LMDB that holds no pickle/msgpack records (those keep their
own path) and that a layout other than Caffe's own recognises, or any LMDB given `layout=`.
Sample i of the layout (`reader.LayoutReader`) becomes record i, key `make_key(i, name)`, name
the sample's first source key as text when it is printable UTF-8, else its hex digits.

The image: a layout's encoded bytes (`Layout.stored`) go through `convert --encoded`'s one
pass-through rule (`encode.encoded_payload`): bytes Caffe decodes (JPEG, PNG, WebP, ... the
`formats.CAFFE_FORMATS`; OpenCV, so Caffe, decodes WebP) that pass the integrity check are stored
unchanged, never decoded and encoded again; a GIF is re-encoded as PNG (lossless), as `convert`
does; bytes that do not decode end the run naming the key. Stored pixels become raw planar BGR
Datums (gray: one plane), as Caffe stores them. A layout with several images per sample (a
low/high-quality pair) is refused with one line unless `image` picks one: each side then goes
to an LMDB of its own (`--image 0`, `--image 1`), so no image is dropped unasked.

The target, by one rule (`targets`):

* an int (or numbers: `labels.sample_targets`, the list-file rule) is the Datum's label (and
  `float_data`); None is label 0;
* text: with `targets="classes"` each distinct text is a class, numbered in order of first
  appearance, the label its number and the names in `<out>_classes.txt` (LSUN's category);
  with `targets="texts"` (OCR labels) the label is 0 and the text goes to `<out>_texts.txt`,
  line i for record i (`text_targets`: UTF-8, newlines and backslashes escaped; None an empty
  line). `auto` (the default) takes `classes` when the layout says its texts name classes
  (`Layout.class_targets`), else `texts`, when sample 0's target is text.

Records are made by `conversion.dispatched` (in worker processes, which read the LMDB through
their own environment) and written by the one write loop, `conversion.write_records`, into an
`AtomicLmdb`: locked, built aside, published with its keys and side files only when complete;
the first sample that cannot be stored ends the run and nothing is published.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .atomic_lmdb import AtomicLmdb
from .conversion import Front, WriteTuning, default_workers, dispatched, write_records
from .datum import DatumError, encode_varint, raw_datum_parts
from .encode import ConvertOptions, encoded_payload
from .errors import CaffeLmdbError, InputError
from .files import default_keys_path, sidecar_path
from .formats import sniff_image_format
from .keys import MAX_KEY_BYTES, sample_key
from .labels import sample_targets, short_repr
from .layouts import Layout
from .reader import LayoutReader, open_layout_reader
from .workers import Record

#: `targets` values: how text targets are kept (see the module docstring).
TARGET_RULES = ("auto", "classes", "texts")

#: A record from a worker starts with: what the target is, encoded?, re-encoded?, length of the text.
_HEAD = struct.Struct("<BBBI")
_FULL, _TEXT, _NONE = 0, 1, 2  # a whole Datum follows; a text then the Datum's body; no target, the body

_STOPS = "migrate stops at the first sample it cannot store; nothing was written"


@dataclass
class LayoutMigrateResult:
    """What `migrate` of a layout found and wrote; `str()` is the summary the CLI prints.

    Attributes:
        source, output, keys_path: the LMDB read, the Datum LMDB written and its keys file.
        layout: the source's layout (`Layout.describe()`).
        records: samples in the source.
        targets: "labels" (int targets), "classes" or "texts" (see the module docstring).
        image: which image of each sample was stored (None: samples hold one).
        sample: lines describing sample 0 and its record (what `--dry-run` shows).
        classes: the class names written (`targets == "classes"`).
        dry_run, written, reencoded, bytes_written, seconds: as `migration.MigrateResult`.
    """

    source: Path
    output: Path
    keys_path: Path
    layout: str
    records: int
    targets: str
    image: int | None = None
    sample: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    dry_run: bool = False
    written: int = 0
    reencoded: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    def side_file(self) -> str:
        """Where the text targets went, in words."""
        if self.targets == "classes":
            return f"class names -> {sidecar_path(self.output, 'classes.txt')}"
        if self.targets == "texts":
            return f"text targets -> {sidecar_path(self.output, 'texts.txt')} (label 0)"
        return "targets -> Datum labels"

    def __str__(self) -> str:
        if self.dry_run:
            return "\n".join([
                f"{self.source}: {self.layout}",
                f"  samples: {self.records}" + (f" (image {self.image} of each)" if self.image is not None else ""),
                "  sample 0:", *[f"    {line}" for line in self.sample],
                f"  {self.side_file()}",
                f"  would write {self.output} and {self.keys_path} (dry run: nothing written)",
            ])
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        classes = f" ({len(self.classes)} classes)" if self.targets == "classes" else ""
        return (f"{self.output}: {self.written} records migrated from {self.source} ({self.layout.split(' ')[0]} "
                f"layout), {self.reencoded} re-encoded, {self.bytes_written / 2**20:.1f} MiB, {self.seconds:.2f} s, "
                f"{rate:.0f} records/s; {self.side_file()}{classes}")


def layout_reader(old: str | Path, layout: str | Layout | None) -> LayoutReader | None:
    """The reader `migrate` brings `old` over with: of `layout`, or of the layout detected unless that is Datum.

    None when no layout but Caffe's own recognises it (then `migration.migrate`'s own path says
    what it holds). A given `layout` that does not fit is its one-line error.
    """
    if layout is not None:
        return open_layout_reader(old, layout)
    try:
        reader = LayoutReader(old)
    except CaffeLmdbError:
        return None
    return None if reader.layout.name == "datum" else reader


def migrate_layout(
    reader: LayoutReader,
    new: str | Path,
    *,
    keys_path: str | Path | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool | None = None,
    targets: str = "auto",
    image: int | None = None,
    workers: int | None = None,
    tuning: WriteTuning | None = None,
) -> LayoutMigrateResult:
    """Write every sample of `reader`'s LMDB to the Datum LMDB `new` (the rules: the module docstring).

    Args:
        reader: the source (`layout_reader`).
        new: the Datum LMDB to create; keys_path: its keys file (default `<new stem>_keys.npy`).
        overwrite, dry_run, progress: as `migration.migrate`.
        targets: "auto", "classes" or "texts": how text targets are kept.
        image: which image of each sample to store, for layouts holding several (a pair).
        workers: processes making records (default one per CPU; 0: this process). Same output for any.
        tuning: write-path knobs that never change the output.

    Raises:
        InputError: bad arguments, the output is the source or exists without `overwrite`, an empty
            source, several images per sample without `image`.
        ConversionError: a sample that cannot be stored (missing key, undecodable bytes, a target
            of another kind), naming the LMDB and the key; nothing is published.
    """
    old, new = Path(reader.root), Path(new)
    if targets not in TARGET_RULES:
        raise InputError(f"targets must be one of {', '.join(TARGET_RULES)}, got {targets!r}")
    if new.exists() and new.resolve() == old.resolve():
        raise InputError(f"{new}: the output must not be the LMDB being migrated")
    if not len(reader):
        raise InputError(f"{old}: no samples to migrate ({reader.layout.describe()})")
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise InputError(f"workers must be >= 0 (0 works in this process), got {workers}")
    first_images, first_target = reader.stored(0)
    mode = _mode(reader.layout, targets, first_target)
    if len(first_images) > 1 and image is None:
        raise InputError(
            f"{old}: the {reader.layout.name} layout holds {len(first_images)} images per sample (a pair such as "
            "low and high quality); a Datum holds one: migrate each to an LMDB of its own with --image 0, "
            f"--image 1{', ...' if len(first_images) > 2 else ''}")
    keys_file = Path(keys_path) if keys_path is not None else default_keys_path(new)
    result = LayoutMigrateResult(source=old, output=new, keys_path=keys_file,
                                 layout=reader.layout.describe(), records=len(reader), targets=mode, image=image,
                                 dry_run=dry_run)
    first = _sample_record(0, reader, image)
    if first.error is not None:
        raise InputError(f"sample 0: {first.error}")
    result.sample = _sample_lines(first_images[image or 0], first_target, mode, first)
    if dry_run:
        return result
    return _write(reader, result, overwrite=overwrite, progress=progress, workers=workers,
                  tuning=tuning or WriteTuning())


def _mode(layout: Layout, targets: str, first_target: Any) -> str:
    if targets != "auto":
        return targets
    if isinstance(first_target, str):
        return "classes" if layout.class_targets else "texts"
    return "labels"


def _write(reader: LayoutReader, result: LayoutMigrateResult, *, overwrite: bool, progress: bool | None,
           workers: int, tuning: WriteTuning) -> LayoutMigrateResult:
    start = time.perf_counter()
    mode = result.targets
    texts: list[str] | None = [] if mode == "texts" else None
    classes: list[str] | None = [] if mode == "classes" else None  # in label order, filled as samples are placed
    class_of: dict[str, int] = {}
    with AtomicLmdb(result.output, result.keys_path, overwrite=overwrite, commit_bytes=tuning.commit_bytes,
                    initial_map_size=tuning.initial_map_size, grow_ahead=tuning.grow_ahead,
                    inputs=[reader.root]) as out:

        def place(index: int, record: Record) -> tuple[bytes, Any] | str:
            if record.error is not None:
                return record.error
            key = sample_key(index, reader.sample_keys(index)[0])
            if len(key) > MAX_KEY_BYTES:
                return f"its key would be {len(key)} bytes, over LMDB's limit of {MAX_KEY_BYTES}"
            value = memoryview(record.value)
            kind, encoded, reencoded, length = _HEAD.unpack_from(value)
            result.reencoded += reencoded
            body = value[_HEAD.size + length:]
            if kind == _FULL:
                if mode != "labels":
                    return f"its target is not text, as the first sample's is (--targets {mode})"
                return key, body
            if mode == "labels":
                if kind == _NONE:
                    return key, b"".join((body, _tail(0, (), encoded)))
                return "its target is text, the first sample's is not: pass --targets texts (or classes)"
            text = bytes(value[_HEAD.size:_HEAD.size + length]).decode("utf-8") if kind == _TEXT else None
            if mode == "classes":
                if text is None:
                    return "it has no target, and --targets classes needs a class name for every sample"
                label = class_of.get(text)
                if label is None:
                    label = class_of[text] = len(classes)
                    classes.append(text)
            else:
                texts.append(text or "")
                label = 0
            return key, b"".join((body, _tail(label, (), encoded)))

        def name(index: int) -> tuple[str, str]:
            key = bytes(reader.sample_keys(index)[0])
            return f"{reader.root}: sample {index} (key {key!r})", str(index)

        records = dispatched(range(len(reader)), partial(_sample_record, reader=reader, image=result.image), workers,
                             max(2 * tuning.commit_bytes, tuning.ring_bytes), needs_fork=True)
        front = Front(place, name, strict_flag=_STOPS, nothing_stored="no sample could be stored")
        write_records(out, records, front, strict=True, skipped=[], classes=classes, previous=None,
                      total=len(reader), progress=progress, unit="sample", texts=texts)
    result.classes = classes or []
    result.written, result.bytes_written = len(out.keys), out.bytes_written
    result.seconds = time.perf_counter() - start
    return result


def _sample_record(index: int, reader: LayoutReader, image: int | None) -> Record:
    """Sample `index` as a worker's record: `_HEAD`, the text (if any), then the Datum (whole, or without its tail)."""
    try:
        images, target = reader.stored(index)
        if image is None and len(images) != 1:
            raise DatumError(f"holds {len(images)} images, the first sample one")
        position = image or 0
        if not 0 <= position < len(images):
            raise DatumError(f"holds {len(images)} images, so there is no image {position}")
        parts, encoded, reencoded = _datum_body(images[position])
        if target is None:
            return Record((_HEAD.pack(_NONE, encoded, reencoded, 0), *parts))
        if isinstance(target, str):
            text = target.encode("utf-8")
            return Record((_HEAD.pack(_TEXT, encoded, reencoded, len(text)), text, *parts))
        label, floats = sample_targets(target)
        return Record((_HEAD.pack(_FULL, encoded, reencoded, 0), *parts, _tail(label, floats, encoded)))
    except (CaffeLmdbError, ValueError, UnicodeError) as exc:  # KeysFileError, DatumError, a bad label
        return Record(error=str(exc))


def _datum_body(image: bytes | np.ndarray) -> tuple[list[bytes], bool, bool]:
    """A Datum's fields up to its label, for an image as a layout stores it; whether encoded and re-encoded.

    Raises:
        DatumError: encoded bytes that do not decode, or pixels of another shape or type.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        payload, _, kept = encoded_payload(bytes(image), ConvertOptions(encoded=True))  # convert's own rule
        return [b"\x22", encode_varint(len(payload)), payload], True, not kept
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3)):
        raise DatumError(f"stored pixels must be H x W x 3 or H x W uint8, got {pixels.dtype} {pixels.shape}")
    gray = pixels.ndim == 2 or pixels.shape[2] == 1
    picture = Image.fromarray(np.ascontiguousarray(pixels.reshape(pixels.shape[:2]) if gray else pixels))
    if not picture.width or not picture.height:
        raise DatumError(f"image is {picture.width}x{picture.height} pixels: a record needs at least 1x1")
    return raw_datum_parts(picture, 0, gray=gray)[:-1], False, False


def _tail(label: int, floats: tuple[float, ...], encoded: bool) -> bytes:
    """A Datum's last fields, as Caffe's serializer writes them: label, float_data, encoded."""
    return b"".join((b"\x28", encode_varint(int(label)), *(b"\x35" + struct.pack("<f", value) for value in floats),
                     b"\x38\x01" if encoded else b"\x38\x00"))


def _sample_lines(image: bytes | np.ndarray, target: Any, mode: str, record: Record) -> list[str]:
    """What `--dry-run` shows of sample 0: its image, its target and how it is kept, its record."""
    value = memoryview(record.value)
    kind, encoded, reencoded, length = _HEAD.unpack_from(value)
    if isinstance(image, bytes | bytearray | memoryview):
        fmt = sniff_image_format(image) or "image"
        shown = f"{fmt} file, {len(image)} bytes"
        stored = "encoded PNG (re-encoded)" if reencoded else f"encoded {fmt}, bytes unchanged"
    else:
        shown = f"{' x '.join(map(str, np.shape(image)))} uint8 pixels"
        stored = "raw planar BGR" if np.ndim(image) == 3 and np.shape(image)[2] == 3 else "raw gray"
    kept = {"labels": "the Datum label", "classes": "class 0, its name in the classes file",
            "texts": "label 0, the text in the texts file"}[mode]
    size = len(value) - _HEAD.size - length + (0 if kind == _FULL else len(_tail(0, (), bool(encoded))))
    return [f"image: {shown}", f"target: {short_repr(target)} -> {kept}", f"datum: {stored}, {size} bytes"]
