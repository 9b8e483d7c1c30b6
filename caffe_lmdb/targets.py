"""An output path: what may be replaced there, and the lock that lets one run write it.

Every writer (`atomic_lmdb.AtomicLmdb`, and `read_previous` when it finishes a killed run's publish)
checks and locks its target here:

* **`overwrite` replaces only what this tool makes**: an LMDB (a folder holding `data.mdb` and at
  most `lock.mdb`, or a single-file LMDB) and its side files (`_keys.npy`, `_classes.txt`,
  `_skipped.txt`). Any other file or folder at the target is refused, never deleted; so is an
  output inside, equal to or containing an input, and one whose side files are another LMDB's.
* **One writer per target.** An exclusive `flock` on `.NAME.lock` beside the target is held for
  the whole run; the kernel drops it when the process dies, so `kill -9` leaves no stale lock.
  A second run on the same target fails at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import InputError
from .files import sidecar_path, temporaries_of
from .publish import remove_path
from .safe_lmdb import LMDB_MAGIC

#: The files LMDB itself keeps in an LMDB folder: a folder holding anything else is not only an LMDB.
LMDB_FILES = frozenset({"data.mdb", "lock.mdb"})

_NPY_MAGIC = b"\x93NUMPY"


# --------------------------------------------------------------------------- what may be replaced

def _has_lmdb_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return False
    return len(head) == 20 and int.from_bytes(head[16:20], "little") == LMDB_MAGIC


def is_lmdb(path: str | os.PathLike) -> bool:
    """True for an LMDB as LMDB makes it: a folder of `data.mdb` (+ `lock.mdb`) only, or an LMDB file."""
    path = Path(path)
    if path.is_symlink():
        return False
    if path.is_dir():
        names = set(os.listdir(path))
        return "data.mdb" in names and names <= LMDB_FILES and _has_lmdb_magic(path / "data.mdb")
    return path.is_file() and _has_lmdb_magic(path)


def _what_is_there(path: Path) -> str:
    if path.is_symlink():
        return "a symbolic link"
    if path.is_dir():
        names = sorted(os.listdir(path))
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return f"a folder holding {shown}" if names else "an empty folder"
    return "a file that is not an LMDB" if path.is_file() else "something that is not a regular file"


def check_replaceable(output: Path, side_files: Iterable[Path], overwrite: bool) -> None:
    """Refuse an existing output (without `overwrite`), or one that `overwrite` must not replace.

    Raises:
        InputError: the target exists without `overwrite`, or holds something that is not this
            tool's output (a folder of other files, a file that is not an LMDB or keys file).
    """
    for path in (output, *side_files):
        if not os.path.lexists(path):
            continue
        if not overwrite:
            raise InputError(f"{path}: already exists (pass --overwrite to replace it)")
        if path == output:
            if not (is_lmdb(path) or (path.is_dir() and not path.is_symlink() and not os.listdir(path))):
                raise InputError(f"{path}: is {_what_is_there(path)}, not an LMDB; --overwrite replaces only "
                                 "an LMDB (data.mdb and lock.mdb), refusing to delete it")
        elif path.is_symlink() or not path.is_file():
            raise InputError(f"{path}: is {_what_is_there(path)}; --overwrite replaces only the side files "
                             "this tool wrote, refusing to delete it")
        elif path.name.endswith(".npy") and not _starts_with(path, _NPY_MAGIC):
            raise InputError(f"{path}: is not a .npy keys file; refusing to overwrite it")


def check_side_files_are_its_own(output: Path) -> None:
    """Refuse an output whose side files would be another LMDB's: `train` and `train.lmdb` share `train_keys.npy`.

    Raises:
        InputError: naming the LMDB that owns them.
    """
    name = output.name
    other = output.with_name(name[:-len(".lmdb")] if name.endswith(".lmdb") else f"{name}.lmdb")
    if other.name and is_lmdb(other):
        keys = sidecar_path(output, "keys.npy").name
        raise InputError(f"{output}: its side files ({keys}, ...) are also those of the LMDB {other}, which is "
                         "there; choose an output name of its own")


def single_file_lock(output: Path) -> Path | None:
    """The `NAME-lock` file LMDB keeps beside a single-file LMDB (None for a folder)."""
    return output.with_name(f"{output.name}-lock") if output.is_file() and not output.is_symlink() else None


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def check_not_inside_inputs(output: Path, inputs: Iterable[str | os.PathLike], *, scanned: bool = True) -> None:
    """Refuse an output that is an input, contains one, or (for scanned folders) lies inside one.

    Raises:
        InputError: naming both paths.
    """
    out = Path(os.path.realpath(output))
    for given in inputs:
        source = Path(os.path.realpath(given))
        if out == source:
            raise InputError(f"{output}: the output is the input {given}; choose another output path")
        if out in source.parents:
            raise InputError(f"{output}: the output contains the input {given}; choose another output path")
        if scanned and source.is_dir() and source in out.parents:
            raise InputError(f"{output}: the output is inside the input folder {given}, whose files are read; "
                             "choose a path outside it")


# --------------------------------------------------------------------------- one writer per target

class TargetLock:
    """An exclusive `flock` on `.NAME.lock` beside a target, held until `release()`.

    The lock file is removed on release; a run that opened it just before then finds, once it
    holds the lock, that the path no longer names its file, and starts over with a fresh one.
    """

    def __init__(self, target: Path) -> None:
        self.path = target.with_name(f".{target.name}.lock")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise InputError(f"{target}: another caffe-lmdb run is writing it"
                                 + (f" (pid {holder})" if holder.isdigit() else "")
                                 + "; wait for it to finish") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                mine = os.fstat(fd)
                if stat.S_ISREG(mine.st_mode) and mine.st_nlink == 1:
                    break
                os.close(fd)  # a hard link to another file (or not a file): writing our pid would change it
                raise InputError(f"{self.path}: is not a lock file caffe-lmdb made (a hard link to another file, "
                                 "or not a regular file); remove it, then run again")
            os.close(fd)
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self._fd)  # closing drops the lock
            self._fd = -1


def remove_temporaries_of(*targets: Path, keep: Path | None = None) -> None:
    """Remove temporaries earlier runs on these targets left (`kill -9`): under the target's lock, none is live."""
    for candidate in temporaries_of(*targets):
        if candidate != keep:
            with contextlib.suppress(OSError):
                remove_path(candidate)
