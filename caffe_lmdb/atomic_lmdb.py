"""The LMDB a tool writes for users: built aside, locked, and published whole or not at all.

Conversion, `write_dataset`, merge and migration all write through `AtomicLmdb`, so they share
its guarantees (the target's checks and its lock: `targets.py`):

* **Nothing half-done is visible.** The LMDB is written under `.NAME.tmp-PID`, the side files under
  temporaries beside their targets; every location is created before the first record, so an
  unwritable `--keys` folder fails before any work. At the end they are renamed into place as
  `publish.Publish` does it: the renames are written down first, so a kill at any step leaves a
  publish the next run on the target finishes. A failure (full disk, Ctrl-C, an exception)
  removes the temporaries and leaves any earlier output as it was; a temporary left by `kill -9`
  is removed by the next run on that target (matched by exact name, never as a pattern).
* LMDB's map starts small and doubles on `MDB_MAP_FULL`, replaying the *whole* uncommitted batch
  (re-putting only the failing record silently loses the rest of the batch).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import lmdb
import numpy as np

from .append_resume import Previous, ResumeJournal
from .errors import InputError, OutputError, describe_os_error
from .files import SIDE_FILES, TMP_MARK, copy_file, default_keys_path, sidecar_path, temporary_name
from .keys import keys_to_array
from .publish import Publish, complete_pending, publish_log_path, removal_step, remove_path, rename_step
from .targets import (
    TargetLock,
    check_not_inside_inputs,
    check_replaceable,
    check_side_files_are_its_own,
    remove_temporaries_of,
    single_file_lock,
)
from .text_targets import texts_file_bytes

log = logging.getLogger(__name__)

#: LMDB's map starts here (default of `initial_map_size`) and doubles whenever it fills up.
INITIAL_MAP_SIZE = 64 << 20

#: Default of `commit_bytes`: a transaction also ends when its records reach this many bytes.
#: 1000 raw 256x256 records are 190 MiB, held twice (values, then LMDB's dirty pages) until the
#: commit, where small transactions stay in the CPU caches (measurements: docs/benchmarks.md).
COMMIT_BYTES = 4 << 20

# --------------------------------------------------------------------------- transactions

class BatchWriter:
    """Puts records into an LMDB in transactions of `commit_every` records or `commit_bytes`, growing the map.

    Each record is put as it arrives, while its bytes are still in the CPU cache, and also kept
    until its transaction commits, for a replay on `MDB_MAP_FULL`; `after_commit(n)` then says
    that the first n records are written, so a caller that lent their memory (a worker's ring)
    can reuse it. Transactions run in the caller's thread: a writer thread competes with the
    decoding processes for the same cores.

    Use as a context manager: leaving the block commits what is left, an exception aborts it::

        with BatchWriter(env, commit_every=1000) as writer:
            for key, value in records:
                writer.put(key, value)

    Args:
        env: an LMDB environment opened for writing.
        commit_every: most records per transaction (Caffe: 1000).
        commit_bytes: a transaction also ends when its records reach this many bytes.
        after_commit: called after each commit with the number of records written so far.
        grow_ahead: grow the map before a transaction that clearly will not fit; False grows only
            on `MDB_MAP_FULL`, replaying the batch each time (what Caffe's `db_lmdb` does).
    """

    def __init__(self, env: lmdb.Environment, commit_every: int = 1000, *, commit_bytes: int = COMMIT_BYTES,
                 after_commit: Callable[[int], None] | None = None, grow_ahead: bool = True) -> None:
        _check_commit_limits(commit_every, commit_bytes)
        self.env = env
        self.commit_every = commit_every
        self.commit_bytes = commit_bytes
        self.after_commit = after_commit
        self.grow_ahead = grow_ahead
        self.batch: list[tuple[bytes, bytes | memoryview]] = []
        self._batch_bytes = 0
        self._written = 0
        self._last_key = b""
        self._sorted = True  # Caffe's zero-padded keys arrive sorted: LMDB's append mode skips the B-tree search
        self._txn: lmdb.Transaction | None = None
        self._cursor: lmdb.Cursor | None = None

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def put(self, key: bytes, value: bytes | memoryview) -> None:
        """Add a record (`value` must stay unchanged until `after_commit` has counted it)."""
        self._sorted = self._sorted and key > self._last_key
        self._last_key = key
        self.batch.append((key, value))
        self._batch_bytes += len(key) + len(value)
        if self._txn is None:
            self._reserve(2 * self.commit_bytes)
            self._txn = self.env.begin(write=True)
            self._cursor = self._txn.cursor()
        try:
            self._cursor.put(key, value, append=self._sorted)
        except lmdb.MapFullError:
            self._replay()
            return
        if len(self.batch) >= self.commit_every or self._batch_bytes >= self.commit_bytes:
            self.commit()

    def commit(self) -> None:
        """Commit everything put so far."""
        if self._txn is None:
            return
        try:
            self._txn.commit()
        except lmdb.MapFullError:  # the commit itself needs pages too (the free list)
            self._txn = self._cursor = None
            self._replay()
            return
        finally:
            self._txn = self._cursor = None  # a failed commit has ended the transaction too
        self._committed()

    def _replay(self) -> None:
        self.abort()
        self._write(self.batch, self._batch_bytes, self._sorted)  # grows the map and replays
        self._committed()

    def abort(self) -> None:
        """Drop the open transaction (its records are still in `batch`)."""
        if self._txn is not None:
            self._txn.abort()
            self._txn = self._cursor = None

    def _committed(self) -> None:
        self._written += len(self.batch)
        self.batch, self._batch_bytes = [], 0
        if self.after_commit is not None:
            self.after_commit(self._written)

    def _write(self, batch: list[tuple[bytes, bytes | memoryview]], batch_bytes: int, append: bool) -> None:
        """One transaction; on MDB_MAP_FULL double the map and replay the *whole* batch.

        The map is also grown ahead of time when the batch clearly will not fit, so that large
        records (a raw 256x256 image is 192 KiB) do not cost a replay per doubling.
        """
        self._reserve(batch_bytes)
        while True:
            try:
                with self.env.begin(write=True) as txn, txn.cursor() as cursor:
                    cursor.putmulti(batch, overwrite=True, append=append)
                return
            except lmdb.MapFullError:
                self._grow(self.env.info()["map_size"] * 2)

    def _reserve(self, batch_bytes: int) -> None:
        if not self.grow_ahead:
            return
        info, stat = self.env.info(), self.env.stat()
        used = (info["last_pgno"] + 1) * stat["psize"]
        needed = used + batch_bytes + batch_bytes // 8 + (1 << 20)  # page headers, B-tree branches
        size = info["map_size"]
        while size < needed:
            size *= 2
        if size != info["map_size"]:
            self._grow(size)

    def _grow(self, new_size: int) -> None:
        log.debug("LMDB map: growing to %d MiB", new_size >> 20)
        self.env.set_mapsize(new_size)


def _check_commit_limits(commit_every: int, commit_bytes: int) -> None:
    if commit_every < 1:
        raise InputError(f"commit_every must be >= 1 (records per transaction), got {commit_every}")
    if commit_bytes < 1:
        raise InputError(f"commit_bytes must be >= 1, got {commit_bytes}")


# --------------------------------------------------------------------------- the atomic output

def _no_space_hint(exc: BaseException, where: Path) -> str:
    """LMDB reports a full disk as EIO (a short pwrite); say which it is when the file system is full."""
    text = str(exc)
    with contextlib.suppress(OSError):
        fs = os.statvfs(where)
        if fs.f_bavail * fs.f_frsize < (16 << 20):
            return f"{text} (no space left on device)"
    return text


class AtomicLmdb:
    """An LMDB built under a temporary name and published, with its side files, only when complete.

    Use as a context manager; `finish()` publishes, leaving the block without it discards::

        with AtomicLmdb("out.lmdb", overwrite=False, inputs=[src]) as out:
            out.put(key, value)
            out.finish(classes=["cat", "dog"])

    `after_commit(n)`, if set, is called after each commit with the number of records written so
    far: a value handed to `put` must stay unchanged until then (a worker's ring is reused after).
    Write failures (full disk, I/O errors) raise `OutputError` naming the file and the cause.
    `commit_every`, `commit_bytes` and `grow_ahead` go to the `BatchWriter`; the map starts at
    `initial_map_size` bytes.

    The temporary starts one of three ways: empty; with `previous` (`append_resume.read_previous`),
    as a copy of that published LMDB (`copy_file_range`, a reflink where the file system has
    them), to append to (the published one is never written in place); or, with a `journal`
    whose `take_over` is set (`--resume`), as the leftover a killed run with the same manifest
    left. A `journal` keeps the manifest and the committed keys in the temporary at each commit,
    so that a killed run can be resumed. After opening, `keys` holds the keys already in the
    LMDB (previous or resumed) and `resumed` the number of records a taken-over leftover held.
    """

    def __init__(
        self,
        output: str | os.PathLike,
        keys_path: str | os.PathLike | None = None,
        *,
        overwrite: bool = False,
        commit_every: int = 1000,
        commit_bytes: int = COMMIT_BYTES,
        initial_map_size: int = INITIAL_MAP_SIZE,
        grow_ahead: bool = True,
        after_commit: Callable[[int], None] | None = None,
        inputs: Iterable[str | os.PathLike] = (),
        scanned_inputs: bool = True,
        previous: Previous | None = None,
        journal: ResumeJournal | None = None,
    ) -> None:
        _check_commit_limits(commit_every, commit_bytes)  # before anything is created
        self.previous, self.journal = previous, journal
        self.resumed = 0
        self._taken: Path | None = None
        self.output = Path(output)
        self.keys_path = Path(keys_path) if keys_path is not None else default_keys_path(self.output)
        self.side_paths = {name: sidecar_path(self.output, name) for name in SIDE_FILES[1:]}
        self.keys: list[bytes] = []
        self.bytes_written = 0
        self.after_commit = after_commit
        self._finished = False
        self._lock: TargetLock | None = None
        self._temporaries: list[Path] = []
        self._data_fd = -1
        self.env: lmdb.Environment | None = None
        self.writer: BatchWriter | None = None
        check_not_inside_inputs(self.output, inputs, scanned=scanned_inputs)
        check_not_inside_inputs(self.keys_path, inputs, scanned=scanned_inputs)
        try:
            self._open(overwrite, initial_map_size)
            self.writer = BatchWriter(self.env, commit_every, commit_bytes=commit_bytes,
                                      after_commit=self._committed, grow_ahead=grow_ahead)
        except BaseException:
            self.discard()
            raise

    def _open(self, overwrite: bool, map_size: int) -> None:
        """Lock and check the target, and make the temporary: empty, a copy of `previous`, or a taken-over leftover."""
        self._lock_target()
        previous, journal = self.previous, self.journal
        if previous is not None:
            if previous.changed():
                raise InputError(f"{self.output}: changed while the append was prepared; run it again")
        else:
            check_replaceable(self.output, [self.keys_path, *self.side_paths.values()], overwrite)
        if journal is not None and journal.take_over:
            self._taken = self._os(journal.take_leftover, self.output, self.output)
        self.tmp = temporary_name(self.output)
        self._remove_leftovers(keep=self._taken)  # taken: our name now
        self._reserve_side_temporaries()
        self._temporaries.append(self.tmp)
        if self._taken is not None:
            self.keys = self._lmdb(journal.committed_keys, self.tmp, self.output)
        elif previous is not None:
            self._os(self.tmp.mkdir, self.output)
            self._os(copy_file, self.output, self.output / "data.mdb", self.tmp / "data.mdb")
            self.keys = list(previous.keys)  # read_previous checked them against the LMDB's record count
        if self._taken is not None or previous is not None:
            map_size = 0  # LMDB then takes the size the file's meta page records: growth goes on as it went
        self._open_env(map_size)
        self._data_fd = os.open(self.tmp / "data.mdb", os.O_RDONLY)
        base = len(previous.keys) if previous is not None else 0
        self.resumed = len(self.keys) - base
        if previous is not None and self.keys[:base] != previous.keys:
            raise InputError(f"{self.output}: its records do not match its keys file {self.keys_path}")
        if journal is not None:
            self._os(lambda: journal.begin(self.tmp, self.keys, fresh=self._taken is None), self.output)

    def _lock_target(self) -> None:
        """Make the folders, take the target's lock, and finish a publish a killed run left half done."""
        for folder in sorted({self.output.parent, self.keys_path.parent}):
            self._os(folder.mkdir, folder, parents=True, exist_ok=True)
        self._lock = self._os(TargetLock, self.output.parent, self.output)
        self._os(complete_pending, self.output, self.output)
        check_side_files_are_its_own(self.output)

    def _remove_leftovers(self, keep: Path | None = None) -> None:
        targets = (self.output, self.keys_path, *self.side_paths.values(), publish_log_path(self.output))
        remove_temporaries_of(*targets, keep=keep)

    def _reserve_side_temporaries(self) -> None:
        """Every side file's temporary is made now: an unwritable location fails before any work."""
        self._keys_tmp = self._reserve_temporary(self.keys_path)
        self._side_tmps = {name: self._reserve_temporary(path) for name, path in self.side_paths.items()}

    def _open_env(self, map_size: int, *, lock: bool = True) -> None:
        """Open the temporary for writing (`map_size` 0: the size its meta page records).

        Not writemap: LMDB then copies records into malloc'd pages (reused, see allocator.py) and
        writes them with pwritev; with writemap every fresh 4 KiB page of the file costs a page fault.
        `lock=False` skips LMDB's reader table, which the first open has created (a published
        LMDB has its `lock.mdb`, as Caffe's do); nothing else opens a temporary (`TargetLock`).
        """
        self.env = self._lmdb(lmdb.open, str(self.tmp), map_size=map_size, subdir=True, sync=False,
                              metasync=False, max_dbs=0, readahead=False, lock=lock)

    def _reserve_temporary(self, target: Path) -> Path:
        tmp = temporary_name(target)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        self._os(lambda: os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)), target)
        self._temporaries.append(tmp)
        return tmp

    def _os(self, call: Callable, where: Path, *args, **kwargs):
        """Run a file operation for `where`; an OSError becomes one line naming `where` and the cause."""
        try:
            return call(*args, **kwargs)
        except OSError as exc:
            if exc.filename is not None and Path(exc.filename).name.startswith(f".{where.name}{TMP_MARK}"):
                exc.filename = None  # our temporary beside `where`: name what the user asked for
            raise OutputError(describe_os_error(exc, where)) from None

    def _lmdb(self, call: Callable, *args, **kwargs):
        try:
            return call(*args, **kwargs)
        except lmdb.Error as exc:
            raise OutputError(f"{self.output}: cannot write the LMDB: {_no_space_hint(exc, self.output.parent)}") \
                from None
        except OSError as exc:
            raise OutputError(describe_os_error(exc, self.output)) from None

    def __enter__(self) -> AtomicLmdb:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finished:
            self.discard()

    def put(self, key: bytes, value: bytes | memoryview) -> None:
        """Add a record (`value` must stay unchanged until `after_commit` has counted it)."""
        self.keys.append(key)
        self.bytes_written += len(value)
        self._lmdb(self.writer.put, key, value)

    def finish(self, classes: Sequence[str] | None = None, skipped: Iterable[tuple[str, str]] = (),
               texts: Sequence[str] | None = None) -> None:
        """Commit, flush everything to disk, and move the side files, the LMDB, then its keys file into place.

        `texts` (record i's text target, `migrate`'s rule) become `<out>_texts.txt`, escaped as
        `text_targets.escape_text` says, one line per record in key order.
        """
        self._lmdb(self.writer.commit)
        self._lmdb(self.env.sync, True)
        self._close()
        skipped = list(skipped)
        contents = {
            "classes.txt": None if classes is None else "".join(f"{name}\n" for name in classes).encode(),
            "skipped.txt": "".join(f"{path}\t{reason}\n" for path, reason in skipped).encode() if skipped else None,
            "texts.txt": None if texts is None else texts_file_bytes(texts),
        }
        keys = keys_to_array(self.keys)
        self._write_temporary(self._keys_tmp, self.keys_path, lambda f: np.save(f, keys, allow_pickle=False))
        for name, data in contents.items():
            if data is not None:
                self._write_temporary(self._side_tmps[name], self.side_paths[name], lambda f, data=data: f.write(data))
            else:  # reserved, not needed: this run has no such list (removed now: a kill after the publish
                self._os(os.unlink, self.side_paths[name], self._side_tmps[name])  # would leave it behind)
        self._os(self._publish, self.output, self.output, contents)
        self._finished = True
        self._release()

    def _write_temporary(self, tmp: Path, target: Path, write: Callable) -> None:
        def run() -> None:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        self._os(run, target)

    def _publish(self, output: Path, contents: dict[str, bytes | None]) -> None:
        """Renames only, logged first (`publish.Publish`): old keys out, sides, the LMDB, new keys last.

        A side file this run has no contents for is removed: an old run's list does not describe
        this LMDB.
        """
        if self.journal is not None:
            self.journal.forget(self.tmp)
        steps = [removal_step(self.keys_path)]
        for name, data in contents.items():
            steps.append(removal_step(self.side_paths[name]) if data is None
                         else rename_step(self._side_tmps[name], self.side_paths[name]))
        lock_file = single_file_lock(output)
        steps.append(rename_step(self.tmp, output, lmdb=True))
        if lock_file is not None and lock_file.is_file() and not lock_file.is_symlink():
            steps.append(removal_step(lock_file))  # the replaced single-file LMDB's lock table
        steps.append(rename_step(self._keys_tmp, self.keys_path))
        Publish(output, steps).run()

    def discard(self) -> None:
        """Drop everything this run made (temporaries), keep everything it did not.

        A leftover taken over by `--resume` is kept: it stays resumable (after a full disk, say).
        """
        if self._taken is not None and self.tmp in self._temporaries:
            self._temporaries.remove(self.tmp)
        self._close()
        for tmp in self._temporaries:
            with contextlib.suppress(OSError):
                remove_path(tmp)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _close(self) -> None:
        if self.env is not None:
            if self.writer is not None:
                with contextlib.suppress(lmdb.Error):
                    self.writer.abort()
            self.env.close()
            self.env = None
        if self._data_fd >= 0:
            os.close(self._data_fd)
            self._data_fd = -1
        if self.journal is not None:
            self.journal.close()

    def _committed(self, written: int) -> None:
        if self.journal is not None:
            self._os(self.journal.committed, self.output, self.keys, written)
        self._start_writeback()
        self._reopen()
        if self.after_commit is not None:
            self.after_commit(written)

    def _reopen(self) -> None:
        """Give the next transaction an environment of its own, so that the file depends only on the records.

        An environment hands a transaction the page buffers of earlier ones without clearing them,
        so the unused bytes of its pages would hold whatever the process wrote before: a resumed
        run would not be byte-identical to an uninterrupted one. A fresh environment's buffers are
        zeroed by LMDB (its cost per commit: docs/benchmarks.md, "Appending and resuming").
        """
        map_size = self.env.info()["map_size"]
        self.env.close()
        self.env = None
        self._open_env(map_size, lock=False)
        self.writer.env = self.env

    def _start_writeback(self) -> None:
        """After a commit, start writing the new pages to disk and let the page cache drop them.

        The disk then works while the next records are decoded, instead of all at the end
        (`sync` before publishing), and the page cache recycles the same memory instead of
        growing into pages the machine has never touched (each costs a fault in a VM).
        """
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._data_fd, 0, 0, os.POSIX_FADV_DONTNEED)
