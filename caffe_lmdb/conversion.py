"""The conversion pipeline: entries -> Datum records (decoded in worker processes) -> one LMDB.

Why it is shaped this way:

* Decoding is the cost, so it runs in worker processes (`workers.RingPool`), which hand each
  record back through shared memory, in input order; one writer puts them, so the output is
  byte-identical for any number of workers.
* Writing 192 KiB per raw record costs about as much as decoding it on small VMs, so the write
  path avoids fresh memory: worker processes keep their freed heap for reuse (`allocator.py`; so
  does the `caffe-lmdb` command, whose process is its own, but never a library caller's process),
  LMDB writes with pwritev (not writemap), and each commit starts the disk write and lets the
  page cache recycle its pages (`atomic_lmdb.AtomicLmdb`).
* The output goes through `atomic_lmdb.AtomicLmdb`: locked against a second writer, built under a
  temporary name and published with its side files only when complete, so an interrupted or
  failed run (Ctrl-C, a full disk, `kill -9`) never leaves an output that looks complete, and
  `--overwrite` replaces only an LMDB and its side files.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from . import workers as _workers
from .allocator import set_heap_retention
from .append_resume import (
    Previous,
    ResumeJournal,
    already_complete,
    check_append_layout,
    conversion_manifest,
    read_previous,
    relabel_for_append,
)
from .atomic_lmdb import COMMIT_BYTES, INITIAL_MAP_SIZE, AtomicLmdb
from .encode import ConvertOptions, encode_entry
from .errors import ConversionError, InputError
from .files import default_keys_path
from .keys import MAX_KEY_BYTES, make_key
from .progress import progress_bar
from .shards import resolve_shard, shard_name, shard_range
from .sources import Entry, PackedEntries, find_splits, load_entries, shuffle_entries
from .workers import Record, RingPool

log = logging.getLogger(__name__)

#: Default of `ring_bytes`: shared memory per worker process for records on their way to the
#: writer (at least 2 transactions).
RING_BYTES = 32 << 20


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
    resumed: int = 0
    already_complete: bool = False  # `--resume` of a conversion an earlier run had published: nothing done

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        if self.already_complete:
            return (f"{self.output}: already complete ({self.written} records, published by an earlier run with these "
                    "arguments); nothing to do")
        resumed = f" (the first {self.resumed} by the interrupted run)" if self.resumed else ""
        return (
            f"{self.output}: {self.written} records written{resumed}, {self.skipped} skipped, "
            f"{self.bytes_written / 2**20:.1f} MiB, {self.seconds:.2f} s, {self.images_per_second:.0f} images/s"
        )


def default_workers() -> int:
    """One decoding process per CPU; the writer (this process) needs a share of a core too.

    On 2 cores 2 workers beat 1, and 1 beats converting in this process (0 workers); the rates
    are in the docs/benchmarks.md.
    """
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class WriteTuning:
    """Knobs of the write path that change speed and memory, never the output (the tests set them small).

    Attributes:
        commit_every: most records per write transaction (Caffe: 1000). Used by `write_dataset`;
            `write_lmdb` and `convert` take `commit_every` directly and ignore this field.
        commit_bytes: a transaction also ends when its records reach this many bytes, so large
            raw records commit more often than every `commit_every`.
        initial_map_size: the LMDB map's first size in bytes; it doubles whenever it fills up.
        grow_ahead: grow the map before a transaction that clearly will not fit (False: only on
            `MDB_MAP_FULL`, replaying the batch; see `atomic_lmdb.BatchWriter`).
        ring_bytes: shared memory per worker process for records on their way to the writer
            (raised to two transactions' worth, `2 * commit_bytes`, if smaller).
    """

    commit_every: int = 1000
    commit_bytes: int = COMMIT_BYTES
    initial_map_size: int = INITIAL_MAP_SIZE
    grow_ahead: bool = True
    ring_bytes: int = RING_BYTES


@contextmanager
def dispatched(items: Sequence[Any], work: Callable[[Any], Record], workers: int, ring_bytes: int, *,
               pack: Callable[[Sequence[Any]], Sequence[Any]] | None = None,
               needs_fork: bool = False) -> Iterator[RingPool | Iterator[Record]]:
    """`work(item)` for each of `items`, in order: here (0 workers, or a tiny input) or in worker processes.

    The result has a `release()` when its records' memory must be given back after each commit.
    The records are the same for any `workers`, so the output is too.

    Args:
        items: what `work` takes, one per record.
        work: makes one record; it runs after `fork`, so it need not be picklable (but see `needs_fork`).
        workers: worker processes (0: none).
        ring_bytes: shared memory per worker process (`workers.RingPool`).
        pack: `pack(items)` is what the workers read (e.g. `PackedEntries`: reading a list of
            objects would copy it into every worker by copy-on-write); default `items` as they are.
        needs_fork: without the rings (not Linux), only a fork-started pool may run `work`
            (it holds something unpicklable); where there is no fork, work here instead.
    """
    if workers == 0 or len(items) < 4 * workers:  # processes cost more than they save on tiny inputs
        yield map(work, items)
    elif _workers.AVAILABLE:
        with RingPool(items if pack is None else pack(items), work, workers, ring_bytes=ring_bytes) as pool:
            yield pool
    elif needs_fork and "fork" not in multiprocessing.get_all_start_methods():
        log.info("no fork on this platform: working in this process")
        yield map(work, items)
    else:
        chunksize = max(1, min(16, len(items) // (workers * 8)))
        context = multiprocessing.get_context("fork" if needs_fork else None)
        with context.Pool(workers, initializer=set_heap_retention) as pool:
            yield pool.imap(work, items, chunksize=chunksize)


@dataclass(frozen=True)
class Front:
    """What the write loop (`write_records`) needs to know of the function that feeds it.

    Attributes:
        place: `place(i, record)`: record i's (key, value) to put, or the reason to skip it (a str).
        name: `name(i)`: how messages name record i's source, and its name in the skipped list.
        strict_flag: how messages name the strict option ("--strict").
        nothing_stored: the error when every record was skipped ("no image could be converted").
        first_skipped: what precedes the first skipped name in that error ("" or "sample ").
    """

    place: Callable[[int, Record], tuple[bytes, Any] | str]
    name: Callable[[int], tuple[str, str]]
    strict_flag: str = "--strict"
    nothing_stored: str = "no image could be converted"
    first_skipped: str = ""


def write_records(out: AtomicLmdb, records: AbstractContextManager[Any], front: Front, *, strict: bool,
                  skipped: list[tuple[str, str]], classes: Sequence[str] | None, previous: Previous | None,
                  total: int | None, done: int = 0, progress: bool | None = None, unit: str = "img",
                  texts: Sequence[str] | None = None) -> None:
    """Put the records of `records` (a `dispatched` context) into `out` and finish it: the one write loop.

    Record i (counting from `done`, the records a resumed temporary holds) is put under the key
    `front.place` gives, or skipped for the reason it gives: listed in `skipped` and logged, or,
    with `strict`, the end of the run. `out` is finished with `classes` and the skipped list
    (the previous LMDB's first, when appending), and `texts` (`migrate`'s text targets; `classes`
    and `texts` may be lists `front.place` fills as it goes: they are read at the end).

    Raises:
        ConversionError: `strict` and a skipped record, or every record skipped.
    """
    base = len(previous.keys) if previous is not None else 0
    with records as stream, progress_bar(total, out.output.name, progress, unit=unit) as bar:
        bar.update(done)
        out.after_commit = getattr(stream, "release", None)
        for index, record in enumerate(stream, start=done):
            bar.update()
            placed = front.place(index, record)
            if isinstance(placed, str):
                where, name = front.name(index)
                if strict:
                    raise ConversionError(f"{where}: {placed} ({front.strict_flag})")
                log.warning("skipping %s: %s", where, placed)
                skipped.append((name, placed))
                continue
            out.put(*placed)
        if len(out.keys) == base:
            first_name, first_reason = skipped[0]
            raise ConversionError(f"{out.output}: {front.nothing_stored} ({len(skipped)} skipped; the first, "
                                  f"{front.first_skipped}{first_name}: {first_reason})")
        out.finish(classes, [*(previous.skipped if previous is not None else ()), *skipped], texts=texts)


def summarise(result: ConvertResult, out: AtomicLmdb, previous: Previous | None, start: float) -> ConvertResult:
    """`result` with the counts of the finished `out` and the seconds since `start` (`time.perf_counter()`)."""
    result.written = len(out.keys) - (len(previous.keys) if previous is not None else 0)
    result.skipped, result.bytes_written = len(result.skipped_files), out.bytes_written
    result.seconds = time.perf_counter() - start
    return result


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
    resume: bool = False,
    tuning: WriteTuning | None = None,
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
        commit_every: most records per write transaction (Caffe: 1000).
        overwrite: replace an existing output instead of refusing.
        strict: fail on the first unreadable image instead of skipping it.
        progress: show a progress bar (default: when stderr is a terminal).
        resume: continue the temporary a killed run with the same arguments left (`--resume`),
            from its last committed record; without one, start from the beginning.
        tuning: speed and memory knobs that never change the output (default `WriteTuning()`);
            its `commit_every` is not used here: the argument above is.

    Returns:
        The summary of what was written.

    Raises:
        InputError: no entries, or the output exists without `overwrite`.
        ConversionError: `strict` and an unreadable image, or a `check_size` mismatch.
    """
    return _write_entries(entries, output, options=options, keys_path=keys_path, classes=classes, workers=workers,
                         commit_every=commit_every, overwrite=overwrite, strict=strict, progress=progress,
                         resume=resume, tuning=tuning)


def _write_entries(
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
    resume: bool = False,
    tuning: WriteTuning | None = None,
    line_offset: int = 0,
    inputs: Sequence[str | os.PathLike] = (),
    scanned_inputs: bool = True,
    previous: Previous | None = None,
) -> ConvertResult:
    """`write_lmdb`, with what `convert` knows besides the entries (its plumbing; not for users).

    Args:
        line_offset: line id of the first entry (a shard's start in the whole list), so that
            shards get the same global keys as an unsharded conversion.
        inputs: the folders and files the entries come from: an output equal to one, containing
            one or (with `scanned_inputs`, for folders whose files are listed) inside one is refused.
        previous: append after this published LMDB (`append_resume.read_previous`; `convert(append=True)`).
        The others: as in `write_lmdb`.
    """
    options = options or ConvertOptions()
    tuning = tuning or WriteTuning()
    workers = workers if workers is not None else default_workers()
    if workers < 0:
        raise InputError(f"workers must be >= 0 (0 converts in this process), got {workers}")
    if not entries:
        raise InputError("no input images")
    start = time.perf_counter()
    manifest = conversion_manifest(
        entries, options, line_offset=line_offset, classes=classes,
        keys_path=Path(keys_path) if keys_path is not None else default_keys_path(output),
        commit_every=commit_every, commit_bytes=tuning.commit_bytes, previous=previous)
    keys_file = Path(manifest["keys file"])
    if resume:  # a restarted job whose run had finished: nothing to do
        published = already_complete(previous, Path(output), keys_file, [entry.relpath for entry in entries],
                                     line_offset, options)
        if published is not None:
            return ConvertResult(output=Path(output), keys_path=keys_file, written=published, already_complete=True,
                                 seconds=time.perf_counter() - start)
    if previous is not None:
        check_append_layout(previous, options)
    # The output is checked and its temporary created (AtomicLmdb) before any worker is forked.
    with AtomicLmdb(output, keys_path, previous=previous, journal=ResumeJournal(manifest, take_over=resume),
                    overwrite=overwrite, commit_every=commit_every, commit_bytes=tuning.commit_bytes,
                    initial_map_size=tuning.initial_map_size, grow_ahead=tuning.grow_ahead, inputs=inputs,
                    scanned_inputs=scanned_inputs) as out:
        base = len(previous.keys) if previous is not None else 0
        result = ConvertResult(output=out.output, keys_path=out.keys_path, resumed=out.resumed)
        done, first_shape = _resumed_entries(out, entries, options, line_offset, base, result.skipped_files)
        if strict and result.skipped_files:
            path, reason = result.skipped_files[0]
            raise ConversionError(f"{path}: {reason} (--strict)")
        todo = entries[done:]

        def place(position: int, record: Record) -> tuple[bytes, Any] | str:
            nonlocal first_shape
            entry = entries[position]
            key = _key(line_offset + position, entry)
            error = record.error if record.error is not None else _key_error(key)
            if error is not None:
                return error
            if options.check_size:
                first_shape = first_shape or record.shape
                if record.shape != first_shape:
                    raise ConversionError(
                        f"{entry.path}: size {_dims(record.shape)} differs from the first image's "
                        f"{_dims(first_shape)} (--check_size)"
                    )
            return key, record.value

        records = dispatched(todo, partial(encode_entry, options=options), workers,
                             max(2 * tuning.commit_bytes, tuning.ring_bytes), pack=PackedEntries)
        front = Front(place, lambda position: (str(entries[position].path), entries[position].relpath))
        write_records(out, records, front, strict=strict, skipped=result.skipped_files, classes=classes,
                      previous=previous, total=len(entries), done=done, progress=progress, unit="img")
    return summarise(result, out, previous, start)


def _resumed_entries(out: AtomicLmdb, entries: Sequence[Entry], options: ConvertOptions, line_offset: int,
                     base: int, skipped: list[tuple[str, str]]) -> tuple[int, tuple[int, int, int] | None]:
    """How many entries a resumed temporary already holds, and its first record's C x H x W (for check_size).

    Entries among them without a record were skipped by the interrupted run: they are converted
    again here, in this process (they are few and fail fast), for the reason the skipped list gives.

    Raises:
        InputError: the temporary's keys are not those of these entries.
    """
    resumed = out.keys[base:]
    if not resumed:
        return 0, None
    done = int(resumed[-1][:8]) + 1 - line_offset
    present = set(resumed)
    if not 0 < done <= len(entries) or len(present) != len(resumed):
        raise InputError(f"{out.output}: the interrupted run's records do not fit this input; run without --resume")
    matched, first_shape = 0, None
    for position in range(done):
        entry = entries[position]
        if _key(line_offset + position, entry) in present:
            matched += 1
            if options.check_size and first_shape is None:
                first_shape = encode_entry(entry, options).shape
            continue
        reason = encode_entry(entry, options).error or "could not be read by the interrupted run"
        log.warning("skipping %s: %s", entry.path, reason)
        skipped.append((entry.relpath, reason))
    if matched != len(resumed):
        raise InputError(f"{out.output}: the interrupted run's keys are not this input's; run without --resume")
    return done, first_shape


def _key(line_id: int, entry: Entry) -> bytes:
    try:
        return make_key(line_id, entry.relpath)
    except UnicodeEncodeError:
        raise InputError(f"{entry.path}: file name is not valid UTF-8, cannot make a key") from None


def _key_error(key: bytes) -> str | None:
    if len(key) > MAX_KEY_BYTES:
        return f"its key is {len(key)} bytes, over LMDB's limit of {MAX_KEY_BYTES} (the path is too long)"
    return None


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
    append: bool = False,
    extend_classes: bool = False,
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
        append: add the images after the records of the existing LMDB `output` (`--append`):
            line ids go on from its own, so `convert(list1)` then `convert(list2, append=True)`
            gives what `convert(list1 + list2)` gives, keys file and all. It needs the LMDB's
            keys file. A folder's classes are matched by name to the LMDB's `_classes.txt`.
        extend_classes: with `append`, let classes the LMDB lacks join its class list, at the end.
        **kwargs: passed to `write_lmdb` (options, workers, overwrite, strict, resume, tuning, ...).
    """
    entries, classes = load_entries(source, list_file=list_file, root=root)
    if classes is None:  # read as a list file (load_entries alone guesses file or folder for `source`)
        list_file = source if list_file is None else list_file
        # the list's paths are read, not the root's listing: an output inside it is fine
        inputs, scanned = [list_file, root if root is not None else Path(list_file).parent], False
    else:
        inputs, scanned = [source], True
    if shuffle:
        entries = shuffle_entries(entries, seed)
    line_offset, previous = 0, None
    if append:
        if num_shards is not None:
            raise InputError("--append converts into one LMDB: append to the merged LMDB, or to each shard "
                             "with its own list, without --num-shards")
        if kwargs.get("overwrite"):
            raise InputError("--append adds to the existing LMDB; --overwrite would replace it: give one of them")
        previous = read_previous(output, keys_path)
        entries, classes = relabel_for_append(previous, entries, classes, extend=extend_classes)
        line_offset = previous.next_line_id
    if num_shards is not None:
        line_offset, stop = shard_range(len(entries), num_shards, shard_index)
        if stop == line_offset:
            raise InputError(f"shard {shard_index} of {num_shards} is empty: only {len(entries)} input images")
        entries = entries[line_offset:stop]
        keys_path = shard_name(keys_path, shard_index, num_shards) if keys_path is not None else None
        output = shard_name(output, shard_index, num_shards)
    return _write_entries(entries, output, classes=classes, keys_path=keys_path, line_offset=line_offset,
                         inputs=inputs, scanned_inputs=scanned, previous=previous, **kwargs)


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


def convert_paths(
    paths: Sequence[str | os.PathLike],
    *,
    list_file: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    keys_path: str | os.PathLike | None = None,
    num_shards: int | str | None = None,
    shard_index: int | None = None,
    workers: int | None = None,
    **kwargs,
) -> list[ConvertResult]:
    """What `caffe-lmdb convert PATH...` does, for each of its forms.

    * `SRC_DIR OUT.lmdb`: an image folder (one subfolder per class), or `LISTFILE OUT.lmdb`;
    * `ROOTFOLDER/ LISTFILE OUT.lmdb`: Caffe's own form;
    * `OUT.lmdb` with `list_file`;
    * `DATASET_DIR`: every split folder, each to `DATASET_DIR/<split>.lmdb` (`convert_splits`).

    `num_shards` may be "auto" (the shard from torchrun's or Slurm's variables; `workers` then
    defaults to the cores shared among the local ranks). Other keywords go to `write_lmdb`.

    Raises:
        InputError: a form that is none of these, or shard arguments that do not fit.
    """
    shard, workers = resolve_shard(num_shards, shard_index, workers)
    common = dict(workers=workers, **shard, **kwargs)
    if list_file is not None:
        if len(paths) != 1:
            raise InputError("with --list, give exactly one positional argument: the output LMDB")
        return [convert(None, paths[0], list_file=list_file, root=root, keys_path=keys_path, **common)]
    if len(paths) == 3:
        return [convert(None, paths[2], list_file=paths[1], root=paths[0], keys_path=keys_path, **common)]
    if len(paths) == 2:
        return [convert(paths[0], paths[1], root=root, keys_path=keys_path, **common)]
    if len(paths) == 1:
        if keys_path is not None:
            raise InputError("--keys needs an explicit output LMDB (the one-argument form writes one per split)")
        return convert_splits(paths[0], **common)
    raise InputError("give SRC OUT.lmdb, ROOTFOLDER/ LISTFILE OUT.lmdb, --list FILE OUT.lmdb, or a dataset root")
