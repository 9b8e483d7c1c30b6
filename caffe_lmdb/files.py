"""The files beside an LMDB and every file users see: their names, and writing them whole or not at all.

A conversion leaves `NAME_keys.npy`, `NAME_classes.txt` and `NAME_skipped.txt` beside `NAME.lmdb`
(`migrate` of text targets also `NAME_texts.txt`, `text_targets.py`);
the readers find them by the same names (`sidecar_path`). Every other output caffe-lmdb writes
(keys, class and skipped lists, list files, mean files, exported images) goes through
`write_bytes_atomic`. Its temporary is a new file, never an existing path opened for writing, so a
symlink planted at the target is replaced, not written through. The one exception is a target
that is a FIFO or a character device (`-o /dev/null`, a named pipe a consumer reads): renaming
over it would replace the node itself (as root, the system's `/dev/null`), so the bytes are
written into it instead; other special files and folders are refused.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from pathlib import Path

from .errors import OutputPathError

#: Marks the name of a temporary: `.NAME.tmp-PID`, beside the target.
TMP_MARK = ".tmp-"

#: The side files a conversion writes beside `NAME.lmdb`, as `NAME_<suffix>`.
SIDE_FILES = ("keys.npy", "classes.txt", "skipped.txt", "texts.txt")

#: Opens a FIFO or device to write through it: never creates or truncates, never follows a link,
#: never waits for a FIFO's reader (no reader is an error), never makes a terminal ours.
_WRITE_THROUGH_FLAGS = (os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_NOCTTY", 0)
                        | getattr(os, "O_CLOEXEC", 0))

_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def default_keys_path(output: str | os.PathLike) -> Path:
    """`train.lmdb` -> `train_keys.npy` beside it."""
    return sidecar_path(output, "keys.npy")


def sidecar_path(output: str | os.PathLike, name: str) -> Path:
    """`train.lmdb`, "classes.txt" -> `train_classes.txt` beside it (the converter's side files)."""
    output = Path(output)
    stem = output.name[: -len(".lmdb")] if output.name.endswith(".lmdb") else output.name
    return output.with_name(f"{stem}_{name}")


def temporary_name(path: str | os.PathLike) -> Path:
    """Where `path` is built before it is renamed into place: a hidden name beside it, with our pid."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def aside_name(temporary: str | os.PathLike) -> Path:
    """Where a publish without `RENAME_EXCHANGE` moves the LMDB it replaces: `.NAME.tmp-PID.old`."""
    temporary = Path(temporary)
    return temporary.with_name(f"{temporary.name}.old")


#: `.NAME.tmp-PID` and `.NAME.tmp-PID.old`: NAME is what precedes the last `.tmp-PID`.
_TEMPORARY = re.compile(rf"\.(?P<target>.+){re.escape(TMP_MARK)}\d+(?:\.old)?", re.DOTALL)


def is_temporary_of(path: str | os.PathLike, target: str | os.PathLike) -> bool:
    """True when `path` is a temporary name of `target` (beside it), compared as strings, never as a pattern."""
    path, target = Path(path), Path(target)
    match = _TEMPORARY.fullmatch(path.name)
    return match is not None and match["target"] == target.name and path.parent == target.parent


def temporaries_of(*targets: str | os.PathLike) -> list[Path]:
    """The temporaries (`.NAME.tmp-PID`, `.NAME.tmp-PID.old`) any run left for these targets.

    Names are matched exactly: an output named `o[ab].lmdb` or `*.lmdb` is a name, not a pattern,
    and never matches another output's temporaries.
    """
    found = []
    for folder in sorted({Path(t).parent for t in targets}):
        names = {Path(t).name for t in targets if Path(t).parent == folder}
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            match = _TEMPORARY.fullmatch(entry)
            if match is not None and match["target"] in names:
                found.append(folder / entry)
    return sorted(found)


def write_bytes_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview, *, sync: bool = True) -> Path:
    """Write `data` to `path` by temporary file and rename: readers see the old file or the new one.

    An interrupted or failed write (full disk) leaves `path` as it was and removes the temporary.
    A FIFO or character device at `path` is written through instead (see the module docstring);
    a folder, a block device, a socket, or a symlink to any special file is refused.

    Raises:
        OutputPathError: `path` is refused (also an OSError).
        OSError: the file cannot be written; it names `path`, never the temporary.
    """
    path = Path(path)
    fd = _open_special_target(path)
    if fd is not None:
        _write_through(fd, path, data)
        return path
    tmp = temporary_name(path)
    try:
        with contextlib.suppress(FileNotFoundError):  # left by a killed run that had our pid
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and (exc.filename is None or exc.filename == str(tmp)):
            exc.filename, exc.filename2 = str(path), None  # name what the caller asked for, once, not our temporary
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str, *, sync: bool = True) -> Path:
    """`write_bytes_atomic` for text, UTF-8 encoded."""
    return write_bytes_atomic(path, text.encode("utf-8"), sync=sync)


def output_target_kind(path: str | os.PathLike) -> str | None:
    """What `write_bytes_atomic` will do at `path`: None (nothing there), "replace" or "write through".

    For checking an output before any work, so that a refused path fails at once.

    Raises:
        OutputPathError: `path` is a folder, a block device, a socket or a symlink to a special file.
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return _target_kind(Path(path), mode)


def _target_kind(path: Path, mode: int) -> str:
    """"replace" (a regular file, or a symlink to one or to nothing) or "write through" (a FIFO or character device).

    Raises:
        OutputPathError: anything else (the message says what is there).
    """
    if stat.S_ISREG(mode):
        return "replace"
    if stat.S_ISLNK(mode):
        try:
            kind = _special_kind(os.stat(path).st_mode)
        except OSError:
            return "replace"  # a dangling link is replaced, as a link to a regular file is
        if kind is None or kind == "a directory":
            return "replace"
        raise OutputPathError(errno.EEXIST, f"is a symbolic link to {kind} ({os.readlink(path)}); give that "
                              "path itself, or remove the link", str(path))
    if stat.S_ISDIR(mode):
        raise OutputPathError(errno.EISDIR, "is a directory, not a file", str(path))
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return "write through"
    raise OutputPathError(errno.EEXIST, f"is {_special_kind(mode) or 'a special file'}, not a file; refusing to "
                          "replace it", str(path))


def _special_kind(mode: int) -> str | None:
    """"a FIFO", "a directory", ... for anything that is not a regular file or a symlink; else None."""
    return next((name for test, name in _SPECIAL_KINDS if test(mode)), None)


def _open_special_target(path: Path) -> int | None:
    """A descriptor to write `path` through when it is a FIFO or character device; None when it is to be replaced.

    None for a missing path, a regular file and a symlink to one (or to nothing), which the
    rename replaces as before. The node is opened, then the opened descriptor is checked, so a
    node swapped for a regular file in between is replaced, not truncated.

    Raises:
        OutputPathError: `path` is refused (`_target_kind`), or is a FIFO no process is reading.
        OSError: the node cannot be opened (e.g. permission denied).
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None  # missing (or unreadable: the write itself then says why)
    if _target_kind(path, mode) == "replace":
        return None
    try:
        fd = os.open(path, _WRITE_THROUGH_FLAGS)
    except FileNotFoundError:
        return None  # removed meanwhile: written as a new file
    except OSError as exc:
        if exc.errno == errno.ENXIO and stat.S_ISFIFO(mode):
            raise OutputPathError(errno.ENXIO, "is a FIFO that no process is reading", str(path)) from None
        exc.filename, exc.filename2 = str(path), None
        raise
    opened = os.fstat(fd).st_mode
    if not (stat.S_ISFIFO(opened) or stat.S_ISCHR(opened)):
        os.close(fd)  # replaced by a regular file meanwhile: opened without O_TRUNC, so untouched
        return None
    return fd


def _write_through(fd: int, path: Path, data: bytes | bytearray | memoryview) -> None:
    """Write all of `data` into the FIFO or device `fd` (blocking: a FIFO's reader sets the pace), then close it.

    Not synced: a FIFO or device has nothing to sync (fsync fails on them). A reader that leaves
    early is an error, not the quiet `BrokenPipeError` the CLI takes for `| head`.
    """
    view = memoryview(data).cast("B")
    try:
        os.set_blocking(fd, True)
        while view:
            view = view[os.write(fd, view):]
    except BrokenPipeError:
        raise OutputPathError(errno.EPIPE, "the FIFO's reader closed it before every byte was written",
                              str(path)) from None
    except OSError as exc:
        exc.filename, exc.filename2 = str(path), None
        raise
    finally:
        os.close(fd)


def copy_file(source: Path, target: Path) -> None:
    """Copy in the kernel (`copy_file_range`: a reflink on file systems that have them)."""
    with open(source, "rb") as src, open(target, "xb") as dst:
        size = os.fstat(src.fileno()).st_size
        copied = 0
        if hasattr(os, "copy_file_range"):
            with contextlib.suppress(OSError):
                while copied < size:
                    done = os.copy_file_range(src.fileno(), dst.fileno(), size - copied, copied, copied)
                    if done == 0:
                        break
                    copied += done
        if copied < size:
            src.seek(copied)
            dst.seek(copied)
            while chunk := src.read(16 << 20):
                dst.write(chunk)
