"""Bringing pickle/msgpack LMDBs over to Caffe Datums, without ever running code from the file.

The PyTorch recipes this toolkit replaces store Python objects in their LMDBs, and reading those
with `pickle.loads` runs whatever the writer of the file put in it (`os.system`, `exec`, ...).
This module reads them with a restricted unpickler instead (`safe_unpickle`): `find_class` admits
only an explicit list of globals (builtin containers and scalars, what numpy needs to rebuild
arrays and scalars, and any module's `LMDB_Image`, which becomes an inert record of ours), so
anything else is refused before it can be called. msgpack values cannot name code at all and are
read with `msgpack`. Values are decoded and recognised by `legacy_records`, which the read side's
layouts share; this module adds the Datums and the writing.

Formats read (as the recipes write them):

1. Efficient-PyTorch `folder2lmdb` (pickle): `pickle.dumps((image, label))`, `image` the image
   file's bytes or a one-element list/tuple of them (DataLoader collation), `label` an int or a
   numpy array (often shape `(1,)`); meta keys `__keys__` (pickled key list) and `__len__`.
2. Its older msgpack variant: `[{b"data": file_bytes}, label]`, `__keys__` msgpack-encoded.
3. The `LMDB_Image` recipe: pickled `LMDB_Image` objects with `channels`, `size` (H, W), `image`
   (H x W x C uint8 bytes, RGB) and `label` (int or numpy array); meta keys as in 1.
4. pyarrow-serialized values (`pyarrow.serialize`, which no longer exists) are recognised and
   refused with a message saying so.

`foreign_values.foreign_value_hint` recognises these formats from a value's bytes
alone (nothing is unpickled), for readers that meet such an LMDB and should point to `migrate`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .atomic_lmdb import AtomicLmdb
from .datum import DatumError, encoded_to_datum, image_to_datum_bytes, serialize_datum
from .encode import ConvertOptions, encoded_payload
from .errors import CaffeLmdbError, InputError, InputNotFoundError, MigrationError
from .files import default_keys_path
from .foreign_values import foreign_kind
from .formats import sniff_image_format
from .keys import make_key
from .labels import label_fields, short_repr
from .layout_migration import LayoutMigrateResult, layout_reader, migrate_layout
from .layouts import Layout
from .legacy_records import (
    TOO_DEEP,
    LegacyRecord,
    UnreadableValueError,
    decode_value,
    describe_object,
    to_legacy_record,
)
from .progress import progress_bar
from .reader import detected_layout
from .safe_lmdb import begin_read, checked_items, get_value, shared_readonly

log = logging.getLogger(__name__)

#: Meta records the recipes keep among the data records; they are dropped (keys go to the .npy file).
META_KEYS = (b"__keys__", b"__len__")

#: The formats `migrate` reads, by the name results and `--dry-run` report.
FORMATS = {
    "folder2lmdb-pickle": "pickled (image file bytes, label) tuples (Efficient-PyTorch folder2lmdb)",
    "folder2lmdb-msgpack": "msgpack [{data: image file bytes}, label] records (Efficient-PyTorch folder2lmdb, "
                           "msgpack version)",
    "lmdb-image": "pickled LMDB_Image objects (H x W x C RGB pixels and a label)",
}


# --------------------------------------------------------------------------- old records -> Datums

def record_to_datum(record: LegacyRecord) -> tuple[bytes | bytearray, bool]:
    """The serialized Datum for an old record, and whether its image had to be re-encoded.

    File bytes go through `caffe-lmdb convert --encoded`'s own rule (`encode.encoded_payload`):
    bytes Caffe can decode that pass its integrity check are stored unchanged (the migration runs
    at copy speed); GIFs, which OpenCV and DALI cannot decode, and other formats are decoded and
    re-encoded; bytes that do not decode (a truncated JPEG) are an error naming the key.
    LMDB_Image pixels (RGB) become raw planar BGR Datums through the codec (one-channel images a
    gray plane; RGBA images lose alpha, as `convert` drops it).

    Raises:
        ValueError: a bad label. DatumError: the bytes are not an image Pillow can read.
    """
    label, targets = label_fields(record.label)
    if record.pixels is not None:
        pixels = record.pixels
        image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)  # L, RGB or RGBA
        return image_to_datum_bytes(image, label, gray=pixels.shape[2] == 1, float_data=targets), False
    payload, _, kept = encoded_payload(record.file_bytes, ConvertOptions(encoded=True))  # convert's own rule
    datum = encoded_to_datum(payload, label)
    datum.float_data.extend(targets)
    return serialize_datum(datum), not kept


# --------------------------------------------------------------------------- reading values

def _decode(value: bytes, where: str) -> tuple[str, Any]:
    """("pickle" | "msgpack", the decoded object) for one old value; `where` prefixes errors."""
    try:
        return decode_value(value)
    except UnreadableValueError as exc:
        if exc.datum:
            raise InputError(f"{where}: already holds a Caffe Datum; nothing to migrate") from None
        raise MigrationError(f"{where}: {exc}{'; nothing was written' if exc.refused else ''}") from None


#: Why a value whose objects nest too deeply for Python to walk (`RecursionError`) is refused.
_TOO_DEEP = f"{TOO_DEEP}; nothing was written"


def _decode_keys(value: bytes, where: str) -> list[bytes]:
    _, keys = _decode(value, where)
    if not isinstance(keys, list | tuple) or not all(isinstance(k, bytes | str) for k in keys):
        raise MigrationError(f"{where}: expected a list of keys, got {describe_object(keys)}")
    return [k.encode("utf-8") if isinstance(k, str) else bytes(k) for k in keys]


def _format_name(serializer: str, record: LegacyRecord) -> str:
    if record.pixels is not None:
        return "lmdb-image"
    return "folder2lmdb-msgpack" if serializer == "msgpack" else "folder2lmdb-pickle"


def _sample_lines(record: LegacyRecord, value: bytes | bytearray, reencoded: bool) -> list[str]:
    if record.pixels is not None:
        height, width, channels = record.pixels.shape
        image = f"{height} x {width} x {channels} uint8 pixels ({'RGB' if channels >= 3 else 'gray'}, LMDB_Image)"
        stored = f"raw {1 if channels == 1 else 3} x {height} x {width} planar {'BGR' if channels >= 3 else 'gray'}"
    else:
        image = describe_object(record.file_bytes) + (", in a one-element list" if record.wrapped else "")
        fmt = sniff_image_format(record.file_bytes[:16]) or "image"
        stored = "encoded PNG (re-encoded)" if reencoded else f"encoded {fmt}, bytes unchanged"
    label, targets = label_fields(record.label)
    mapped = f"label {label}" + (f", float_data of {len(targets)} values" if targets else "")
    return [
        f"image: {image}",
        f"label: {describe_object(record.label)} -> {mapped}",
        f"datum: {stored}, {len(value)} bytes",
    ]


# --------------------------------------------------------------------------- migrate

@dataclass
class MigrateResult:
    """What `migrate` found and wrote; `str()` is the summary the CLI prints.

    Attributes:
        source, output, keys_path: the old LMDB, the new one and its keys file.
        format: a key of `FORMATS`.
        records: records to migrate (the old `__keys__`, or every non-meta key).
        keys_origin: "__keys__" or "cursor order".
        meta_keys: the meta records found and dropped.
        unlisted: records in the LMDB that `__keys__` does not list (left out, as the old reader did).
        sample_key, sample: the first record's key and a line per field (what `--dry-run` shows).
        dry_run: nothing was written.
        written, reencoded, bytes_written, seconds: what the migration wrote.
    """

    source: Path
    output: Path
    keys_path: Path
    format: str
    records: int
    keys_origin: str
    meta_keys: list[bytes] = field(default_factory=list)
    unlisted: int = 0
    sample_key: bytes = b""
    sample: list[str] = field(default_factory=list)
    dry_run: bool = False
    written: int = 0
    reencoded: int = 0
    bytes_written: int = 0
    seconds: float = 0.0

    @property
    def records_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        if self.dry_run:
            meta = ", ".join(k.decode("ascii", "replace") for k in self.meta_keys) or "none"
            lines = [
                f"{self.source}: {FORMATS[self.format]} [{self.format}]",
                f"  records: {self.records} (order: {self.keys_origin}; meta records dropped: {meta})",
                f"  sample {self.sample_key!r} -> {make_key(0, '') + self.sample_key!r}:",
                *[f"    {line}" for line in self.sample],
                f"  would write {self.output} and {self.keys_path} (dry run: nothing written)",
            ]
            if self.unlisted:
                lines.insert(2, f"  {self.unlisted} records not listed in __keys__ would be left out")
            return "\n".join(lines)
        text = (
            f"{self.output}: {self.written} records migrated from {self.source} ({self.format}), "
            f"{self.reencoded} re-encoded, {self.bytes_written / 2**20:.1f} MiB, {self.seconds:.2f} s, "
            f"{self.records_per_second:.0f} records/s"
        )
        if self.unlisted:
            text += f"; {self.unlisted} records not listed in __keys__ left out"
        return text


def migrate(
    old: str | Path,
    new: str | Path,
    keys_path: str | Path | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    progress: bool | None = None,
    *,
    layout: str | Layout | None = None,
    targets: str = "auto",
    image: int | None = None,
    workers: int | None = None,
) -> MigrateResult | LayoutMigrateResult:
    """Rewrite a pickle/msgpack LMDB (Efficient-PyTorch `folder2lmdb`, `LMDB_Image`), or any layout, as Datums.

    An LMDB of pickle/msgpack records takes the path described here, tensorpack's excepted. Any
    other LMDB a read layout recognises (LSUN, tensorpack, ...: `reader.LAYOUTS`, Caffe's own
    excepted), or any LMDB given `layout`, goes to `layout_migration.migrate_layout`, whose rules
    say how each image and target is kept (`targets`, `image`, `workers` apply there only).

    Record i of the old order (its `__keys__`, or cursor order without one) gets the key
    `"%08d_%s" % (i, old_key)`; meta records are dropped and the keys go to the `.npy` keys file.
    Stored file bytes become encoded Datums with the bytes unchanged (GIF re-encoded as PNG, as
    `convert` does); LMDB_Image pixels become raw planar BGR Datums. See `label_fields` for labels.
    The output is built under a temporary name and appears only when complete (`atomic_lmdb.AtomicLmdb`).

    Nothing from the old LMDB is ever executed: pickles go through a restricted unpickler, and a
    record naming any other global stops the migration before that global is touched, with no
    output left behind.

    Args:
        old: the LMDB to read (never modified).
        new: the Datum LMDB to create.
        keys_path: where to save the keys; default `<new stem>_keys.npy` beside it.
        overwrite: replace an existing output instead of refusing.
        dry_run: only detect the format, count the records and decode a sample; write nothing.
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        What was found (and written).

    Raises:
        InputError: OLD missing, empty, the same as NEW, already Datums, or NEW exists without `overwrite`.
        MigrationError: an unsafe pickle, a pyarrow-serialized or unreadable record, a bad label
            (the message names the key).
    """
    old, new = Path(old), Path(new)
    if not old.exists():
        raise InputNotFoundError(f"{old}: LMDB not found")
    if layout is not None or not _holds_legacy_records(old) or _tensorpack(old):
        reader = layout_reader(old, layout)
        if reader is not None:
            return migrate_layout(reader, new, keys_path=keys_path, overwrite=overwrite, dry_run=dry_run,
                                  progress=progress, targets=targets, image=image, workers=workers)
    return _migrate_records(old, new, keys_path, overwrite=overwrite, dry_run=dry_run, progress=progress)


def _migrate_records(old: Path, new: Path, keys_path: str | Path | None, *, overwrite: bool, dry_run: bool,
                     progress: bool | None) -> MigrateResult:
    """`migrate` of pickle/msgpack records (this module's path)."""
    if new.exists() and new.resolve() == old.resolve():
        raise InputError(f"{new}: the output must not be the LMDB being migrated")
    keys_path = Path(keys_path) if keys_path is not None else default_keys_path(new)
    with shared_readonly(old) as env, begin_read(env) as txn:
        present: list[bytes] = []
        meta: list[bytes] = []
        for key in checked_items(txn, values=False):
            (meta if key in META_KEYS else present).append(key)
        order, origin = present, "cursor order"
        if b"__keys__" in meta:
            order, origin = _decode_keys(get_value(txn, b"__keys__", old), f"{old}: key b'__keys__'"), "__keys__"
            in_lmdb = set(present)
            missing = next((k for k in order if k not in in_lmdb), None)
            if missing is not None:
                raise MigrationError(f"{old}: key {missing!r} is listed in __keys__ but not in the LMDB")
        if not order:
            raise InputError(f"{old}: no records to migrate")
        unlisted = len(set(present) - set(order))
        if unlisted:
            log.warning("%s: %d records are not listed in __keys__ and are left out, as the old reader did",
                        old, unlisted)
        if b"__len__" in meta:
            _check_len(get_value(txn, b"__len__", old), len(order), old)

        first = order[0]
        where = f"{old}: key {first!r}"
        serializer, obj = _decode(get_value(txn, first, old), where)
        record = _legacy(obj, where)
        value, reencoded = _datum(record, where)
        result = MigrateResult(
            source=old, output=new, keys_path=keys_path, format=_format_name(serializer, record),
            records=len(order), keys_origin=origin, meta_keys=meta, unlisted=unlisted, sample_key=first,
            sample=_sample_lines(record, value, reencoded), dry_run=dry_run,
        )
        if dry_run:
            return result

        start = time.perf_counter()
        created = _missing_parents(new)
        try:
            with AtomicLmdb(new, keys_path, overwrite=overwrite, inputs=[old]) as out, \
                    progress_bar(len(order), new.name, progress) as bar:
                for line_id, old_key in enumerate(order):
                    where = f"{old}: key {old_key!r}"
                    if line_id:  # the first record was converted above
                        _, obj = _decode(get_value(txn, old_key, old), where)
                        value, reencoded = _datum(_legacy(obj, where), where)
                    out.put(make_key(line_id, "") + old_key, value)
                    result.reencoded += reencoded
                    bar.update()
                out.finish()
        except BaseException:
            _remove_empty(created)
            raise
        result.written, result.bytes_written = len(out.keys), out.bytes_written
        result.seconds = time.perf_counter() - start
    return result


def _holds_legacy_records(old: Path) -> bool:
    """Whether `old` has the recipes' meta keys or a pickle/msgpack/pyarrow first value (this module's path)."""
    try:
        with shared_readonly(old) as env, begin_read(env, buffers=True) as txn:
            if any(get_value(txn, key, old) is not None for key in META_KEYS):
                return True
            cursor = txn.cursor()
            return bool(cursor.first()) and foreign_kind(cursor.value()) is not None
    except CaffeLmdbError:
        return True  # this module's path says what is wrong with it


def _tensorpack(old: Path) -> bool:
    """Whether `old` is a tensorpack LMDB: pickle/msgpack values, but datapoints only its layout reads in full.

    Its `__keys__` and serialized values look like the recipes' records, yet a datapoint may hold a
    decoded BGR array (or, with msgpack, msgpack-numpy's map of one), which this module's path
    refuses or mistakes for file bytes; the layout path keeps every datapoint the layout reads.
    """
    try:
        return detected_layout(old).name == "tensorpack"
    except CaffeLmdbError:
        return False  # this module's path says what is wrong with it


def _legacy(obj: Any, where: str) -> LegacyRecord:
    try:
        return to_legacy_record(obj)
    except ValueError as exc:
        raise MigrationError(f"{where}: {exc}") from None
    except RecursionError:  # walking a hostile object (numpy, str(), repr()) deeper than Python can
        raise MigrationError(f"{where}: {_TOO_DEEP}") from None


def _datum(record: LegacyRecord, where: str) -> tuple[bytes | bytearray, bool]:
    try:
        return record_to_datum(record)
    except (ValueError, DatumError) as exc:  # DatumError is a ValueError too; both say what is wrong
        raise MigrationError(f"{where}: {exc}") from None
    except RecursionError:
        raise MigrationError(f"{where}: {_TOO_DEEP}") from None
    except MemoryError:
        raise MigrationError(f"{where}: the record's label or image is too large to convert (MemoryError); "
                             "nothing was written") from None


def _check_len(value: bytes, count: int, old: Path) -> None:
    _, length = _decode(value, f"{old}: key b'__len__'")
    if not isinstance(length, int) or length != count:
        log.warning("%s: __len__ says %s but __keys__ lists %d records; migrating the %d listed",
                    old, short_repr(length), count, count)


def _missing_parents(path: Path) -> list[Path]:
    """The folders above `path` that do not exist yet, deepest first (removed again on failure)."""
    missing = []
    parent = path.absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
