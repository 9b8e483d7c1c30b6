"""The conversion pipeline: entries -> Datum records (decoded in worker processes) -> one LMDB.

Why it is shaped this way:

* Decoding is the cost, so it runs in worker processes (`workers.RingPool`), which hand each
  record back through shared memory, in input order; one writer puts them, so the output is
  byte-identical for any number of workers.
* Writing 192 KiB per raw record costs about as much as decoding it on small VMs, so the write
  path avoids fresh memory: freed heap is kept for reuse (`allocator.py`), LMDB writes with
  pwritev (not writemap), and each commit starts the disk write and lets the page cache recycle
  its pages (`AtomicLmdb._start_writeback`).
* The output goes through `output.AtomicLmdb`: locked against a second writer, built under a
  temporary name and published with its side files only when complete, so an interrupted or
  failed run (Ctrl-C, a full disk, `kill -9`) never leaves an output that looks complete, and
  `--overwrite` replaces only an LMDB and its side files.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from . import output as _output
from . import workers as _workers
from .datum import (
    Datum,
    DatumError,
    encode_image,
    encoded_to_datum,
    is_passthrough_format,
    normalize_image,
    open_image,
    pil_format,
    raw_datum_parts,
    serialize_datum,
)
from .errors import CaffeLmdbError, os_error_reason
from .files import write_text_atomic  # noqa: F401  (still imported from here by export)
from .keys import make_key
from .output import AtomicLmdb, default_keys_path, sidecar_path  # noqa: F401  (and by records, merge, migrate)
from .sources import (
    Entry,
    FileInput,
    InputError,
    PackedEntries,
    find_splits,
    load_entries,
    read_image_file,
    shuffle_entries,
)
from .workers import Record, RingPool

log = logging.getLogger(__name__)

#: Shared memory per worker process for records on their way to the writer (at least 2 transactions).
RING_BYTES = 32 << 20


class ConversionError(CaffeLmdbError, RuntimeError):
    """The conversion stopped (`--strict` on a bad image, `--check_size` mismatch, write failure)."""


@dataclass(frozen=True)
class ConvertOptions:
    """What each record looks like: Caffe's `convert_imageset` flags, with the same meaning.

    Attributes:
        gray: store one-channel (L) images.
        resize_height, resize_width: resize to this size when both are > 0 (aspect ratio not kept).
        resize_backend: "pillow" (bilinear with antialiasing) or "opencv" (`cv2.resize` with
            `INTER_LINEAR`, Caffe's own call: pixel parity with Caffe built on the same OpenCV;
            needs `opencv-python-headless`, which caffe-lmdb does not install).
        encoded: store image file bytes instead of raw planar pixels.
        encode_type: the file format of encoded records (jpg, png, ...); "" keeps each file's own
            bytes when nothing would change them. A non-empty value implies `encoded`.
        check_size: require every record to have the same channels x height x width.
    """

    gray: bool = False
    resize_height: int = 0
    resize_width: int = 0
    resize_backend: str = "pillow"
    encoded: bool = False
    encode_type: str = ""
    check_size: bool = False

    def __post_init__(self) -> None:
        if (self.resize_height > 0) != (self.resize_width > 0):
            raise InputError(
                f"resize needs both sides > 0, got resize_height={self.resize_height} "
                f"resize_width={self.resize_width}"
            )
        if self.resize_height < 0 or self.resize_width < 0:
            raise InputError("resize sizes must be >= 0")
        if self.resize_backend not in ("pillow", "opencv"):
            raise InputError(f"resize backend must be 'pillow' or 'opencv', got {self.resize_backend!r}")
        if self.resize_backend == "opencv":
            try:
                import cv2  # noqa: F401
            except ImportError:
                raise InputError(
                    "--resize-backend opencv needs OpenCV's Python package: pip install opencv-python-headless"
                ) from None
        if self.encode_type:
            try:
                pil_format(self.encode_type)
            except ValueError as exc:
                raise InputError(str(exc)) from None

    @property
    def resize(self) -> tuple[int, int] | None:
        """(width, height) to resize to, or None."""
        return (self.resize_width, self.resize_height) if self.resize_height > 0 else None

    @property
    def stores_encoded(self) -> bool:
        return self.encoded or bool(self.encode_type)


@dataclass
class ConvertResult:
    """What a conversion wrote; `str()` is the final summary line."""

    output: Path
    keys_path: Path
    written: int = 0
    skipped: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    skipped_files: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"{self.output}: {self.written} records written, {self.skipped} skipped, "
            f"{self.bytes_written / 2**20:.1f} MiB, {self.seconds:.2f} s, {self.images_per_second:.0f} images/s"
        )


# --------------------------------------------------------------------------- one record (runs in workers)

def _check_structure(image: Image.Image, data: bytes) -> None:
    """Cheap integrity checks for bytes stored unchanged: a truncated file must not pass.

    A full decode would make encoded conversion as slow as raw, so JPEGs are checked for their
    end-of-image marker (decoded in full only if it is missing), PNGs by their chunk CRCs, and
    other formats decoded.
    """
    if image.format == "JPEG" and data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return
    if image.format == "PNG":
        with Image.open(io.BytesIO(data)) as fresh:  # verify() must directly follow open()
            fresh.verify()
        return
    image.load()


def resize_image(image: Image.Image, options: ConvertOptions) -> Image.Image:
    """Resize to `options.resize` as Caffe's `convert_imageset` would (see `resize_backend`).

    Pillow's bilinear filter low-passes when shrinking (antialiasing); OpenCV's INTER_LINEAR,
    which Caffe calls, samples the 2x2 nearest source pixels only. Downscaled pixels therefore
    differ by a few levels between the two; "opencv" calls `cv2.resize` itself for parity.
    """
    if options.resize_backend == "opencv":
        import cv2

        resized = cv2.resize(np.asarray(image), options.resize, interpolation=cv2.INTER_LINEAR)
        return Image.fromarray(resized, mode=image.mode)
    return image.resize(options.resize, Image.BILINEAR)


def build_record(data: bytes, label: int, targets: Sequence[float], options: ConvertOptions) -> Record:
    """Turn one image file's bytes into a serialized Datum, as `convert_imageset` would.

    Raises:
        DatumError: the bytes are not an image that can be converted (the message says why).
    """
    if not data:
        raise DatumError("file is empty")
    if options.stores_encoded:
        datum, shape = _encoded_datum(data, label, options)
    else:
        image = open_image(data, gray=options.gray)
        if options.resize:
            image = resize_image(image, options)
        width, height = image.size
        parts = raw_datum_parts(image, label, gray=options.gray, float_data=targets)
        return Record(parts, (1 if options.gray else 3, height, width))
    if targets:
        datum.float_data.extend(targets)
    return Record((serialize_datum(datum),), shape)


def _encoded_datum(data: bytes, label: int, options: ConvertOptions) -> tuple[Datum, tuple[int, int, int]]:
    channels = 1 if options.gray else 3
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height), mode = image.format, image.size, image.mode
            wanted = pil_format(options.encode_type) if options.encode_type else fmt
            keep_bytes = (
                options.resize is None
                and is_passthrough_format(fmt)
                and wanted == fmt
                and (not options.gray or mode == "L")
            )
            if keep_bytes:
                _check_structure(image, data)
                # OpenCV decodes with the EXIF orientation applied: rotated files have swapped dims.
                # Only --check_size needs the dims, so only then is the EXIF block parsed.
                if options.check_size and image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                    width, height = height, width
                return encoded_to_datum(data, label), (channels, height, width)
            image.load()
            decoded = normalize_image(image, gray=options.gray)
    except DatumError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatumError(f"cannot decode image: {exc}") from None
    if options.resize:
        decoded = resize_image(decoded, options)
    target_type = options.encode_type or ("png" if not is_passthrough_format(wanted) else wanted.lower())
    payload = encode_image(decoded, target_type)
    width, height = decoded.size
    return encoded_to_datum(payload, label), (channels, height, width)


def encode_entry(entry: Entry | FileInput, options: ConvertOptions) -> Record:
    """Read and convert one entry; unreadable images come back as a `Record` with `error` set.

    Only regular files of bounded size are read (`sources.read_image_file`): a FIFO, a device
    such as a link to /dev/zero, or a folder (the scan lists unreadable folders as entries, so
    they are reported like unreadable files) is skipped with the reason, never converted.
    """
    try:
        data = read_image_file(entry.path)
        return build_record(data, entry.label, entry.targets, options)
    except DatumError as exc:
        return Record(error=str(exc))
    except OSError as exc:
        return Record(error=os_error_reason(exc))


# --------------------------------------------------------------------------- the LMDB

def default_workers() -> int:
    """One decoding process per CPU; the writer (this process) needs a share of a core too.

    Measured on 2 cores (256x256 JPEGs, raw; medians of 11 runs): 2 workers 4.5k images/s,
    1 worker 3.4k, everything in this process (0 workers) 2.4k.
    """
    return max(1, os.cpu_count() or 1)


def progress_bar(total: int, desc: str, progress: bool | None, unit: str = "rec"):
    """A tqdm bar on stderr, shown only on a terminal unless `progress` says otherwise."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, desc=desc,
                disable=not (sys.stderr.isatty() if progress is None else progress))


@contextmanager
def _converted(
    entries: Sequence[Entry], options: ConvertOptions, workers: int
) -> Iterator[RingPool | Iterator[Record]]:
    """The records of `entries`, in order: converted here (0 workers) or in worker processes.

    The result has a `release()` when its records' memory must be given back after each commit.
    """
    work = partial(encode_entry, options=options)
    if workers == 0 or len(entries) < 4 * workers:  # processes cost more than they save on tiny inputs
        yield map(work, entries)
    elif _workers.AVAILABLE:
        # Packed: reading a list of Entry objects would copy it into every worker (copy-on-write).
        ring_bytes = max(2 * _output.COMMIT_BYTES, RING_BYTES)
        with RingPool(PackedEntries(entries), work, workers, ring_bytes=ring_bytes) as pool:
            yield pool
    else:
        chunksize = max(1, min(16, len(entries) // (workers * 8)))
        with multiprocessing.get_context().Pool(workers) as pool:
            yield pool.imap(work, entries, chunksize=chunksize)


def write_lmdb(
    entries: Sequence[Entry],
    output: str | os.PathLike,
    *,
    options: ConvertOptions | None = None,
    keys_path: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    workers: int | None = None,
    commit_every: int = 1000,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool | None = None,
    line_offset: int = 0,
    on_record: Callable[[int], None] | None = None,
    inputs: Sequence[str | os.PathLike] = (),
    scanned_inputs: bool = True,
) -> ConvertResult:
    """Convert `entries` (in this order; line ids are their positions) into a Datum LMDB.

    Args:
        entries: the images, already shuffled if wanted; entry i gets key `%08d_<relpath>` % i.
        output: the LMDB directory to create.
        options: record layout (Caffe's flags).
        keys_path: where to save the keys (`.npy`); default `<output stem>_keys.npy` beside it.
        classes: class names, saved as `<output stem>_classes.txt` beside the output.
        workers: decoding processes beside this one, which writes (default: `default_workers()`);
            0 converts everything in this process. The output is identical for any value.
        commit_every: records per write transaction (Caffe: 1000).
        overwrite: replace an existing output instead of refusing.
        strict: fail on the first unreadable image instead of skipping it.
        progress: show a progress bar (default: when stderr is a terminal).
        line_offset: line id of the first entry (a shard's start in the whole list), so that
            shards get the same global keys as an unsharded conversion.
        on_record: called with the running count after each record (tests use it to interrupt).
        inputs: the folders and files the entries come from: an output equal to one, containing
            one or (with `scanned_inputs`, for folders whose files are listed) inside one is refused.

    Returns:
        The summary of what was written.

    Raises:
        InputError: no entries, or the output exists without `overwrite`.
        ConversionError: `strict` and an unreadable image, or a `check_size` mismatch.
    """
    options = options or ConvertOptions()
    workers = workers if workers is not None else default_workers()
    if workers < 0:
        raise InputError(f"workers must be >= 0 (0 converts in this process), got {workers}")
    if not entries:
        raise InputError("no input images")
    start = time.perf_counter()
    first_shape: tuple[int, int, int] | None = None
    # The output is checked, its temporary created and the heap retention set (AtomicLmdb) before
    # any worker is forked, so the workers inherit the retention; with 0 workers everything runs
    # in this thread.
    with AtomicLmdb(output, keys_path, overwrite=overwrite, commit_every=commit_every, inputs=inputs,
                    scanned_inputs=scanned_inputs) as out, \
            _converted(entries, options, workers) as records, \
            progress_bar(len(entries), out.output.name, progress, unit="img") as bar:
        out.after_commit = getattr(records, "release", None)
        result = ConvertResult(output=out.output, keys_path=out.keys_path)
        for position, (entry, record) in enumerate(zip(entries, records, strict=True)):
            bar.update()
            if on_record is not None:
                on_record(position + 1)
            if record.error is not None:
                if strict:
                    raise ConversionError(f"{entry.path}: {record.error} (--strict)")
                log.warning("skipping %s: %s", entry.path, record.error)
                result.skipped_files.append((entry.relpath, record.error))
                continue
            if options.check_size:
                first_shape = first_shape or record.shape
                if record.shape != first_shape:
                    raise ConversionError(
                        f"{entry.path}: size {_dims(record.shape)} differs from the first image's "
                        f"{_dims(first_shape)} (--check_size)"
                    )
            out.put(_key(line_offset + position, entry), record.value)
        if not out.keys:
            first_path, first_reason = result.skipped_files[0]
            raise ConversionError(f"{out.output}: no image could be converted ({len(result.skipped_files)} skipped; "
                                  f"the first, {first_path}: {first_reason})")
        out.finish(classes, result.skipped_files)
    result.written, result.skipped, result.bytes_written = len(out.keys), len(result.skipped_files), out.bytes_written
    result.seconds = time.perf_counter() - start
    return result


def _key(line_id: int, entry: Entry) -> bytes:
    try:
        return make_key(line_id, entry.relpath)
    except UnicodeEncodeError:
        raise InputError(f"{entry.path}: file name is not valid UTF-8, cannot make a key") from None


def _dims(shape: tuple[int, int, int] | None) -> str:
    return "x".join(map(str, shape)) if shape else "?"


def convert(
    source: str | os.PathLike | None,
    output: str | os.PathLike,
    *,
    list_file: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    shuffle: bool = False,
    seed: int = 0,
    num_shards: int | None = None,
    shard_index: int = 0,
    keys_path: str | os.PathLike | None = None,
    **kwargs,
) -> ConvertResult:
    """Convert an image folder or a Caffe list file into a Datum LMDB (`convert_imageset`'s job).

    Args:
        source: an image folder (one subfolder per class), or a list file.
        output: the LMDB to create.
        list_file, root: a Caffe list file and the folder its paths are relative to.
        shuffle, seed: shuffle the input order (line ids follow the shuffled order) with this seed.
        num_shards, shard_index: convert only shard `shard_index` of `num_shards` contiguous
            ranges of the (shuffled) input, to `<out>-IIIII-of-NNNNN.lmdb` with global keys.
        keys_path: the keys file (default `<out>_keys.npy`; a shard gets the shard suffix).
        **kwargs: passed to `write_lmdb` (options, workers, overwrite, strict, ...).
    """
    from .shards import shard_name, shard_range

    entries, classes = load_entries(source, list_file=list_file, root=root)
    if list_file is None and source is not None and Path(source).is_file():
        list_file, source = source, None
    if list_file is not None:  # the list's paths are read, not the root's listing: an output inside it is fine
        inputs, scanned = [list_file, root if root is not None else Path(list_file).parent], False
    else:
        inputs, scanned = [source], True
    if shuffle:
        entries = shuffle_entries(entries, seed)
    line_offset = 0
    if num_shards is not None:
        line_offset, stop = shard_range(len(entries), num_shards, shard_index)
        if stop == line_offset:
            raise InputError(f"shard {shard_index} of {num_shards} is empty: only {len(entries)} input images")
        entries = entries[line_offset:stop]
        keys_path = shard_name(keys_path, shard_index, num_shards) if keys_path is not None else None
        output = shard_name(output, shard_index, num_shards)
    return write_lmdb(entries, output, classes=classes, keys_path=keys_path, line_offset=line_offset,
                      inputs=inputs, scanned_inputs=scanned, **kwargs)


def convert_splits(root: str | os.PathLike, **kwargs) -> list[ConvertResult]:
    """Convert every split folder of `root` (`root/train`, `root/val`, ...) to `root/<split>.lmdb`.

    Each split gets `root/<split>_keys.npy` and `root/<split>_classes.txt` beside its LMDB.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory")
    splits = find_splits(root)
    if not splits:
        raise InputError(f"{root}: no split folders found (expected e.g. {root}/train/<class>/<image>)")
    return [convert(split, root / f"{split.name}.lmdb", **kwargs) for split in splits]
