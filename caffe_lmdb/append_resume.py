"""Continuing an LMDB: what an append reads from the published one, and a conversion's resume journal.

Both are started by `atomic_lmdb.AtomicLmdb` (`previous=`, `journal=`), which keeps its promises (one
writer, built aside, published whole); this module holds what is particular to each:

* **Append** copies the published `data.mdb` into the temporary (`copy_file_range`: in the kernel,
  and a reflink where the file system has them), appends there in ordinary small transactions,
  and publishes as every output does (`publish.Publish`: logged renames, the LMDB swapped in by
  `renameat2(RENAME_EXCHANGE)`), so a kill at any step is finished by the next run. The published
  LMDB is never written in place, so readers that have it open (with `lock=False`, as
  `LmdbDataset_train` opens it) keep reading valid pages. Why not one big write transaction in
  place: docs/benchmarks.md, "Appending and resuming".
* **Resume**: every conversion writes `resume.json` (what it converts, how, which shard) into its
  temporary before the first record (`ResumeJournal`). A run killed by `SIGKILL`, the OOM killer or
  preemption leaves that temporary behind; `convert --resume` with the same arguments takes it over, reads its
  committed keys (from the journal each commit appends to, checked against the LMDB), and converts
  only the entries after the last committed one. Commits fall where they would have fallen (a
  transaction always ends at a commit), and each transaction gets a fresh environment
  (`AtomicLmdb._reopen`), so the file is byte for byte an uninterrupted run's. Different
  arguments are refused in one line naming what differs; a job that had finished is reported
  `already_complete`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import stat
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import lmdb

from .datum import DatumError, parse_datum
from .encode import ConvertOptions
from .errors import InputError, KeysFileError, OutputError, describe_os_error
from .files import default_keys_path, sidecar_path, temporaries_of, temporary_name
from .keys import load_keys, make_key
from .publish import complete_pending
from .safe_lmdb import file_identity
from .sources import Entry
from .targets import TargetLock, is_lmdb

log = logging.getLogger(__name__)

#: The manifest a conversion keeps in its temporary LMDB folder until it publishes.
MANIFEST = "resume.json"
#: Beside it, the keys committed so far, appended after each commit (a length and the key's bytes each):
#: a resume reads them sequentially instead of walking the B-tree's leaf pages, which the writer's
#: writeback has dropped from the page cache and would come back as random reads.
JOURNAL = "committed-keys"
_LENGTH = struct.Struct("<I")


# --------------------------------------------------------------------------- append

@dataclass
class Previous:
    """A published LMDB that an append continues: its keys, skipped list and classes, and the next line id."""

    output: Path
    keys_path: Path
    keys: list[bytes]
    skipped: list[tuple[str, str]]
    classes: list[str] | None
    next_line_id: int
    identity: tuple = field(default=(), repr=False)

    def changed(self) -> bool:
        """True when the LMDB or its keys file is no longer what `read_previous` read."""
        return _identity(self.output, self.keys_path) != self.identity


def _line_id(key: bytes, where: Path) -> int:
    head = key[:9]
    if len(head) < 9 or not head[:8].isdigit() or head[8:9] != b"_":
        raise InputError(f"{where}: key {key!r} is not a %08d_<name> key; append continues convert's line ids only")
    return int(head[:8])


def _read_lines(path: Path) -> list[str] | None:
    if not path.exists():
        return None
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None


def read_previous(output: str | os.PathLike, keys_path: str | os.PathLike | None = None) -> Previous:
    """What `--append` needs from the published LMDB `output`.

    The next line id is the number of lines the earlier conversions read: every line became a
    record (a key) or a skipped entry (a line of `<out>_skipped.txt`), so `convert(list1)` and then
    an append of `list2` give the keys `convert(list1 + list2)` gives, gaps and all.

    Raises:
        InputError: no LMDB there, no keys file (with how to make one), or keys that do not match.
    """
    output = Path(output)
    keys_path = Path(keys_path) if keys_path is not None else default_keys_path(output)
    finish_interrupted_publish(output)
    if output.is_symlink():
        raise InputError(f"{output}: is a symbolic link (to {os.readlink(output)}); --append writes a new LMDB in "
                         f"its place, so give the LMDB itself: {os.path.realpath(output)}")
    if output.is_file() and is_lmdb(output):
        raise InputError(f"{output}: is a single-file LMDB; --append continues an LMDB folder (data.mdb), as "
                         "convert writes it")
    if not is_lmdb(output):
        raise InputError(f"{output}: no LMDB to append to" + (" (it is not an LMDB)" if os.path.lexists(output) else
                                                             "; convert without --append first"))
    if not keys_path.exists():
        raise InputError(f"{output}: no keys file {keys_path}; appending needs it to continue the line ids. Save it "
                         f"first: python -c \"import caffe_lmdb as c; c.save_keys('{keys_path}', "
                         f"c.scan_keys('{output}'))\"")
    try:
        keys = load_keys(keys_path).tolist()
    except KeysFileError as exc:
        raise InputError(str(exc)) from None
    with lmdb.open(str(output), readonly=True, lock=False) as env:
        entries = env.stat()["entries"]
    if entries != len(keys):
        raise InputError(f"{keys_path}: lists {len(keys)} keys but {output} holds {entries} records; save the keys "
                         "again (caffe_lmdb.save_keys with scan_keys) before appending")
    skipped_rows = _read_lines(sidecar_path(output, "skipped.txt")) or []
    skipped = [tuple(row.split("\t", 1)) if "\t" in row else (row, "") for row in skipped_rows]
    classes = _read_lines(sidecar_path(output, "classes.txt"))
    last = _line_id(keys[-1], keys_path) if keys else -1
    return Previous(output=output, keys_path=keys_path, keys=keys, skipped=skipped, classes=classes,
                    next_line_id=max(last + 1, len(keys) + len(skipped)), identity=_identity(output, keys_path))


def finish_interrupted_publish(output: Path) -> None:
    """Finish what a killed run left at `output` (a publish half done, its log, its lock file) before reading it.

    Taken under the output's lock, so a run that is writing it now is reported, not raced.
    """
    if not output.parent.is_dir():
        return
    try:
        lock = TargetLock(output)
        try:
            complete_pending(output)
        finally:
            lock.release()
    except OSError as exc:
        raise OutputError(describe_os_error(exc, output)) from None


def _identity(output: Path, keys_path: Path) -> tuple:
    data = output / "data.mdb" if output.is_dir() else output
    return file_identity(data), file_identity(keys_path)


def merged_classes(previous: Previous, classes: Sequence[str] | None, *, extend: bool) -> list[str] | None:
    """The class list after appending samples labelled by `classes` (None: labels are plain numbers).

    `classes` must keep the LMDB's names at their indices; names after them are new classes, an
    error naming the first unless `extend`.

    Raises:
        InputError: a new class without `extend`, or a class list that renumbers the LMDB's.
    """
    if classes is None:
        return previous.classes
    old = previous.classes or []
    for index, (was, now) in enumerate(zip(old, classes, strict=False)):
        if was != now:
            raise InputError(f"{previous.output}: class {index} is {was!r} there but {now!r} in the new "
                             "samples; their labels would mean other classes")
    return _with_new(previous, old, list(classes[len(old):]), extend) or list(classes)


def _with_new(previous: Previous, old: list[str], new: list[str], extend: bool) -> list[str] | None:
    if new and not extend:
        where = sidecar_path(previous.output, "classes.txt")
        raise InputError(f"{previous.output}: new class {new[0]!r} is not in {where} "
                         f"({len(old)} classes); pass --extend-classes to add it")
    return old + new if new else None


def relabel_for_append(previous: Previous, entries: Sequence[Entry], classes: Sequence[str] | None,
                       *, extend: bool) -> tuple[list[Entry], list[str] | None]:
    """Entries of an image folder relabelled by the LMDB's class list (a folder's labels are its sorted names).

    A folder that lacks some of the LMDB's classes would otherwise number its own classes from 0.
    """
    if classes is None:
        return list(entries), previous.classes
    old = list(previous.classes or [])
    new = [name for name in classes if name not in old]
    merged = _with_new(previous, old, new, extend) or old
    index = {name: i for i, name in enumerate(merged)}
    mapping = [index[name] for name in classes]
    return [replace(entry, label=mapping[entry.label]) for entry in entries], merged


# --------------------------------------------------------------------------- resume

def conversion_manifest(entries: Sequence[Entry], options: ConvertOptions, *, line_offset: int,
                        classes: Sequence[str] | None, keys_path: Path, commit_every: int, commit_bytes: int,
                        previous: Previous | None = None) -> dict[str, Any]:
    """What a conversion's output depends on, by the name a mismatch is reported under."""
    digest, files = hashlib.sha256(), hashlib.sha256()
    for entry in entries:
        digest.update(f"{entry.relpath}\0{os.fspath(entry.path)}\0{entry.label}\0{entry.targets!r}\n"
                      .encode("utf-8", "surrogateescape"))
        try:
            st = os.stat(entry.path)
            files.update(f"{st.st_size} {st.st_mtime_ns}\n".encode())
        except OSError:
            files.update(b"-\n")
    return {
        "input list": [len(entries), digest.hexdigest()],
        "input files": files.hexdigest(),
        "flags": repr(options),
        "shard": line_offset,
        "classes": list(classes) if classes is not None else None,
        "keys file": str(keys_path),
        "commit settings": [commit_every, commit_bytes],
        "append": None if previous is None else [str(previous.output), len(previous.keys)],
    }


_DIFFERS = {"input list": "the input list differs",
            "input files": "input files changed (size or modification time) since the interrupted run",
            "flags": "the flags differ", "shard": "the shard differs",
            "classes": "the classes differ", "keys file": "the keys file differs",
            "commit settings": "the commit settings differ", "append": "the LMDB appended to differs"}


def _journal_bytes(keys: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(key)) + key for key in keys)


def _read_journal(path: Path) -> list[bytes]:
    """The keys of a journal, up to a last entry a kill cut short (none: no journal)."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    keys, at = [], 0
    while at + _LENGTH.size <= len(data):
        (length,), start = _LENGTH.unpack_from(data, at), at + _LENGTH.size
        if start + length > len(data):
            break
        keys.append(data[start:start + length])
        at = start + length
    return keys


def _differs(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    for name, value in new.items():
        if json.loads(json.dumps(value)) != old.get(name):
            return name
    return None


#: What a conversion's temporary holds: LMDB's two files, the manifest and the key journal.
_LEFTOVER_FILES = frozenset({"data.mdb", "lock.mdb", MANIFEST, JOURNAL})


def _leftovers(output: Path) -> list[Path]:
    """Temporaries of `output` that killed runs left (by exact name; links too, which are refused), newest first."""
    found = []
    for candidate in temporaries_of(output):
        with contextlib.suppress(OSError):
            if not candidate.name.endswith(".old"):
                found.append((os.lstat(candidate).st_mtime_ns, candidate))
    return [candidate for _, candidate in sorted(found, reverse=True)]


def _foreign_part(leftover: Path) -> str | None:
    """What in a leftover caffe-lmdb did not make, or None: it is taken over only if it is a folder of this user,
    not writable by other users, holding only regular files of its own (no link, planted or hard, to write through)."""
    st = os.lstat(leftover)
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & stat.S_IWOTH:
        return "it is not a folder of this user that other users cannot write"  # (group-writable: umask 002)
    for name in sorted(os.listdir(leftover)):
        entry = os.lstat(leftover / name)
        if name not in _LEFTOVER_FILES:
            return f"it holds {name!r}, which caffe-lmdb does not write there"
        if stat.S_ISLNK(entry.st_mode):
            return f"its {name} is a symbolic link"
        if not stat.S_ISREG(entry.st_mode) or entry.st_nlink != 1 or entry.st_uid != os.getuid():
            return f"its {name} is not a regular file of its own (a hard link, or another user's)"
    return None


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        with open(folder / MANIFEST, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _open_nofollow(path: Path, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def _layout(encoded: bool, channels: int, height: int, width: int) -> tuple[bool, int, int, int]:
    return (True, 0, 0, 0) if encoded else (False, channels, height, width)


def _describe(layout: tuple[bool, int, int, int]) -> str:
    encoded, channels, height, width = layout
    if encoded:
        return "encoded (image file bytes)"
    kind = "gray" if channels == 1 else f"{channels}-channel"
    return f"raw {kind} {height}x{width}" if height else f"raw {kind}"


# --------------------------------------------------------------------------- the journal, and checks before writing


class ResumeJournal:
    """A conversion's resume state, kept in its temporary until it is published; `AtomicLmdb` calls it.

    The manifest (`resume.json`: what the run converts) is written before the first record, and
    each commit appends its keys to the journal (`committed-keys`). A run killed by `SIGKILL`, the
    OOM killer or a preemption leaves both behind; a later run with `take_over` (`--resume`) and an
    equal manifest renames that temporary to its own name and goes on after its committed keys.

    Args:
        manifest: what this conversion converts (`conversion_manifest`).
        take_over: resume a killed run's temporary with an equal manifest (none: start afresh).
    """

    def __init__(self, manifest: dict[str, Any], *, take_over: bool = False) -> None:
        self.manifest, self.take_over = manifest, take_over
        self._file: BinaryIO | None = None
        self._base = self._journaled = 0

    def take_leftover(self, output: Path) -> Path | None:
        """Rename the newest leftover temporary of `output` with this manifest to this run's temporary name.

        Raises:
            InputError: a leftover caffe-lmdb did not make (links, another user's), or one whose
                manifest differs (naming what differs): it is kept for a correct resume.
        """
        for leftover in _leftovers(output):
            foreign = _foreign_part(leftover)
            if foreign is not None:
                raise InputError(f"{output}: cannot resume {leftover.name}: {foreign}; caffe-lmdb did not make "
                                 "it, so it is left alone (remove it, or run without --resume)")
            manifest = _read_manifest(leftover)
            if manifest is None:
                continue
            different = _differs(manifest, self.manifest)
            if different is not None:
                raise InputError(f"{output}: cannot resume {leftover.name}: {_DIFFERS[different]} from the "
                                 "interrupted run's (run with the same arguments, or without --resume to start over)")
            mine = temporary_name(output)
            if leftover != mine:
                os.replace(leftover, mine)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(mine / "lock.mdb")  # the killed writer's lock table
            log.info("%s: resuming %s", output, leftover.name)
            return mine
        log.info("%s: no interrupted conversion to resume; starting from the beginning", output)
        return None

    def committed_keys(self, tmp: Path, output: Path) -> list[bytes]:
        """The keys a taken-over temporary holds: its journal, checked against the LMDB and completed from it.

        The journal is a prefix of the LMDB's keys (it is written after each commit; a kill can
        cut its last entry or miss the last commit). Its last key is looked up, the keys after it
        are read from the LMDB, and the total must be the LMDB's entry count; otherwise (no
        journal, a damaged one) all keys are read from the LMDB. The map is closed again before
        writing: mapped pages cannot be dropped from the page cache, so each commit's
        `posix_fadvise(DONTNEED)` would walk all of them.
        """
        journal = _read_journal(tmp / JOURNAL)
        with lmdb.open(str(tmp), readonly=True, lock=False, readahead=False) as env, env.begin() as txn:
            entries, cursor = txn.stat()["entries"], txn.cursor()
            if journal and len(journal) <= entries and cursor.set_key(journal[-1]):
                keys = journal + list(cursor.iternext(values=False))[1:]  # iternext starts at journal[-1]
                if len(keys) == entries and all(a < b for a, b in itertools.pairwise(journal)):
                    return keys
                log.info("%s: the interrupted run's key journal does not match its LMDB; reading the keys "
                         "from the LMDB", output)
            return list(cursor.iternext(values=False)) if cursor.first() else []

    def begin(self, tmp: Path, keys: Sequence[bytes], *, fresh: bool) -> None:
        """Write the manifest into a fresh temporary, and (re)write the journal with the keys already in it."""
        if fresh:
            with os.fdopen(_open_nofollow(tmp / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "w",
                           encoding="utf-8") as f:
                json.dump(self.manifest, f)
                f.flush()
                os.fsync(f.fileno())
        journal = os.fdopen(_open_nofollow(tmp / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb")
        try:
            journal.write(_journal_bytes(keys))
            journal.flush()
        except BaseException:
            journal.close()
            raise
        self._file = journal
        self._base = self._journaled = len(keys)

    def committed(self, keys: Sequence[bytes], written: int) -> None:
        """After a commit: `written` records of this run are in the LMDB; journal the keys not journaled yet."""
        committed = self._base + written
        if self._file is not None and committed > self._journaled:
            self._file.write(_journal_bytes(keys[self._journaled:committed]))
            self._file.flush()  # in the kernel now: a kill -9 after this keeps it
            self._journaled = committed

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @staticmethod
    def forget(tmp: Path) -> None:
        """Before publishing: a published LMDB is not resumable."""
        for name in (MANIFEST, JOURNAL):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp / name)


def already_complete(previous: Previous | None, output: Path, keys_path: Path, planned: Sequence[str],
                     line_offset: int, options: ConvertOptions) -> int | None:
    """For `--resume`: the records of `output` an earlier run already published from this input, or None.

    A restarted job whose run had finished must not convert again. Finished means the LMDB's
    last lines are this run's: its keys (line ids and paths, from where the run started) and
    skipped list end with exactly this input's, in records laid out as these flags lay them
    out. An append started `len(planned)` lines before the LMDB's next line id (`previous` is the
    LMDB after it); a fresh conversion at `line_offset`.
    """
    if previous is None:
        finish_interrupted_publish(output)
        if not (output.is_dir() and is_lmdb(output) and keys_path.is_file()):
            return None
        try:
            keys = load_keys(keys_path).tolist()
        except KeysFileError:
            return None
        rows = _read_lines(sidecar_path(output, "skipped.txt")) or []
        skipped, start = [row.split("\t", 1)[0] for row in rows], line_offset
    else:
        keys, skipped = previous.keys, [path for path, _ in previous.skipped]
        start = previous.next_line_id - len(planned)
    if start < 0 or not keys or not planned:
        return None
    expected = [make_key(start + i, relpath) for i, relpath in enumerate(planned)]
    tail = [key for key in keys[-len(planned):] if key[:8].isdigit() and int(key[:8]) >= start]
    present = set(tail)
    missing = [relpath for key, relpath in zip(expected, planned, strict=True) if key not in present]
    skipped_here = skipped[-len(missing):] if missing else []
    if (tail != [key for key in expected if key in present] or len(tail) + len(missing) != len(planned)
            or skipped_here != missing or layout_mismatch(output, keys[0], options) is not None):
        return None
    return len(tail)


def check_append_layout(previous: Previous, options: ConvertOptions) -> None:
    """Refuse an append whose records would be laid out unlike the LMDB's (another --gray, --resize, --encoded).

    Raises:
        InputError: naming both layouts.
    """
    if previous.keys:
        mismatch = layout_mismatch(previous.output, previous.keys[0], options)
        if mismatch is not None:
            raise InputError(f"{previous.output}: {mismatch}; append with the flags it was converted with")


def layout_mismatch(output: Path, key: bytes, options: ConvertOptions) -> str | None:
    """How the record `key` of the published LMDB `output` is laid out unlike `options`' records, or None."""
    with lmdb.open(str(output), readonly=True, lock=False) as env, env.begin() as txn:
        value = txn.get(key)
    try:
        datum = parse_datum(value) if value is not None else None
    except DatumError:
        return None
    if datum is None:
        return None
    found = _layout(datum.encoded, datum.channels, datum.height, datum.width)
    wanted = _layout(options.encoded or bool(options.encode_type), 1 if options.gray else 3,
                     options.resize_height, options.resize_width)
    if found[0] or wanted[0]:
        differs = found[0] != wanted[0]
    else:  # raw: the channels, and the size where the flags fix one
        differs = found[1] != wanted[1] or (wanted[2] > 0 and found[2:] != wanted[2:])
    return f"its records are {_describe(found)}, but these flags make {_describe(wanted)}" if differs else None
