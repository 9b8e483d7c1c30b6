"""Writing files that users see: whole or not at all (temporary beside the target, fsync, rename).

Every output caffe-lmdb writes besides an LMDB (keys, class and skipped lists, list files, mean
files, exported images) goes through here. The temporary is a new file, never an existing path
opened for writing, so a symlink planted at the target is replaced, not written through.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

#: Marks the name of a temporary: `.NAME.tmp-PID`, beside the target.
TMP_MARK = ".tmp-"


def temporary_name(path: str | os.PathLike) -> Path:
    """Where `path` is built before it is renamed into place: a hidden name beside it, with our pid."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def write_bytes_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview, *, sync: bool = True) -> Path:
    """Write `data` to `path` by temporary file and rename: readers see the old file or the new one.

    An interrupted or failed write (full disk) leaves `path` as it was and removes the temporary.
    """
    path = Path(path)
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
            exc.filename = str(path)  # name what the caller asked for, not our temporary
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str, *, sync: bool = True) -> Path:
    """`write_bytes_atomic` for text, UTF-8 encoded."""
    return write_bytes_atomic(path, text.encode("utf-8"), sync=sync)
