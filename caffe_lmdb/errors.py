"""The exception types of caffe-lmdb, all in one place: one base, each subclass also the matching built-in.

Every error caffe-lmdb raises on purpose is a `CaffeLmdbError`; the CLI prints its message as one
line (exit 1), `InputError` as a usage error (exit 2).
"""

from __future__ import annotations

import os


class CaffeLmdbError(Exception):
    """Base of every error caffe-lmdb raises on purpose, so callers can catch ours alone."""


class DatumError(CaffeLmdbError, ValueError):
    """A record is not a valid Caffe Datum (bad dims, wrong data size, undecodable payload)."""


class LmdbFormatError(CaffeLmdbError, ValueError):
    """A path is not an LMDB, or an LMDB does not hold what the caller expects."""


class KeysFileError(CaffeLmdbError, ValueError):
    """A `.npy` keys file is unreadable, pickled, or disagrees with its LMDB."""


class KeysFileWarning(UserWarning):
    """A keys file that loads but disagrees with its LMDB (e.g. a different number of entries)."""


class LmdbNotFoundError(LmdbFormatError, FileNotFoundError):
    """No LMDB at the path: also a FileNotFoundError, so `except FileNotFoundError` catches it."""


class KeysFileNotFoundError(KeysFileError, FileNotFoundError):
    """No keys file at the path: also a FileNotFoundError, so `except FileNotFoundError` catches it."""


class CorruptLmdbError(LmdbFormatError):
    """An LMDB's files are damaged: a bad B-tree page, or a `data.mdb` shorter than its meta page says."""


class InputError(CaffeLmdbError, ValueError):
    """The conversion input (folder, list file, flags) is unusable; the message says how."""


class InputNotFoundError(InputError, FileNotFoundError):
    """An input folder, list file or LMDB to read is missing: also a FileNotFoundError (the CLI still exits 2)."""


class ConversionError(CaffeLmdbError, RuntimeError):
    """The conversion stopped (`--strict` on a bad image, `--check_size` mismatch, nothing convertible)."""


class OutputError(CaffeLmdbError, RuntimeError):
    """Writing the output failed (full disk, I/O error, permission): the message names the file and the cause."""


class OutputPathError(CaffeLmdbError, OSError):
    """An output path that cannot take a file: a folder, a block device, a socket, a symlink to a special file, a
    FIFO that no process reads (or whose reader left).

    Also an OSError (errno, strerror, filename), so code that handles a failed write handles this
    too; `str()` is the one line `PATH: why`.
    """

    def __str__(self) -> str:
        return describe_os_error(self)


class WorkerError(CaffeLmdbError, RuntimeError):
    """A worker process died or raised something other than a per-entry error."""


class MergeError(LmdbFormatError):
    """The shards cannot be merged: the same key in two shards, or different class lists."""


class MigrationError(CaffeLmdbError, RuntimeError):
    """An old LMDB cannot be migrated: an unsafe or unreadable record, an unsupported format."""


class MeanError(CaffeLmdbError, ValueError):
    """The mean cannot be computed (records of differing sizes, an empty LMDB) or a mean file is unreadable."""


class ExportError(CaffeLmdbError, RuntimeError):
    """The export cannot continue: a symlinked class folder, or a file that cannot be written (full disk)."""


class TransformError(CaffeLmdbError, ValueError):
    """A transform or a record breaks one of Caffe's DataTransformer CHECKs (named in the message)."""


class LoaderError(CaffeLmdbError, RuntimeError):
    """A batch could not be made: the transform raised on a record, or a loader worker died or timed out."""


class PrototxtError(InputError):
    """A net or solver prototxt that cannot feed a loader: the message names the file and the layer."""


class ServeError(CaffeLmdbError, RuntimeError):
    """`caffe-lmdb serve` could not start: its address is taken or cannot be listened on."""



def os_error_reason(exc: OSError) -> str:
    """`permission denied`: an OSError's reason alone, for messages that name the file themselves."""
    reason = (exc.strerror or os.strerror(exc.errno)) if exc.errno else str(exc)
    return reason[:1].lower() + reason[1:] if reason else type(exc).__name__


def describe_os_error(exc: OSError, path: object = None) -> str:
    """One line for a failed file operation: `PATH: no space left on device`, naming the file involved.

    `path` is used when the error itself names no file (LMDB's errors and some writes carry none).
    """
    where = exc.filename if exc.filename is not None else path
    reason = os_error_reason(exc)
    if where is None:
        return reason
    if exc.filename2 is not None and os.fsdecode(exc.filename2) != os.fsdecode(where):  # `a -> a` says it twice
        return f"{where} -> {exc.filename2}: {reason}"
    return f"{where}: {reason}"
