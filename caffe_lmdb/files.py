"""The files beside an LMDB and every file users see: their names, and writing them whole or not at all.

A conversion leaves `NAME_keys.npy`, `NAME_classes.txt` and `NAME_skipped.txt` beside `NAME.lmdb`;
the readers find them by the same names (`sidecar_path`). Every other output caffe-lmdb writes
(keys, class and skipped lists, list files, mean files, exported images) goes through
`write_bytes_atomic`. Its temporary is a new file, never an existing path opened for writing, so a
symlink planted at the target is replaced, not written through.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

#: Marks the name of a temporary: `.NAME.tmp-PID`, beside the target.
TMP_MARK = ".tmp-"

#: The side files a conversion writes beside `NAME.lmdb`, as `NAME_<suffix>`.
SIDE_FILES = ("keys.npy", "classes.txt", "skipped.txt")


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
