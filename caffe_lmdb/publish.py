"""Putting a finished LMDB and its side files in place: renames written down first, so a kill at any step is finished.

An output is several files (the LMDB folder, `NAME_keys.npy`, `NAME_classes.txt`,
`NAME_skipped.txt`) and no file system renames several files in one step. So before the first
rename a run writes its plan, the *publish log* `.NAME.publish` beside the LMDB: every rename
(temporary -> target, with the temporary's inode, which the rename keeps) and every removal, in
order. Only then does it rename, in that order:

1. the old keys file is removed (never an old keys file beside a new LMDB);
2. the side files are renamed in, or removed when this run has none (an old list does not
   describe a new LMDB);
3. the LMDB is swapped in (`renameat2(RENAME_EXCHANGE)`, so that the path always holds an LMDB;
   elsewhere the old one is renamed aside to `.NAME.tmp-PID.old` and the new one renamed in);
4. the new keys file is renamed in: its presence means complete.

A kill before the log is in place leaves only temporaries: the old output is untouched. A kill
after it leaves a *pending* publish, which the next run that writes the same output completes
(`complete_pending`) before it does anything else, since every temporary it names is complete;
`verify` reports it. Whether a step is done is read off the file system (does the target carry
the temporary's inode?), so finishing is idempotent, and a log describing files that were
changed since (a *stale* log) is not followed. The log is removed once the publish is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import aside_name, is_temporary_of, write_bytes_atomic

log = logging.getLogger(__name__)

_FORMAT = "caffe-lmdb publish log 1"


def publish_log_path(output: str | os.PathLike) -> Path:
    """`train.lmdb` -> `.train.lmdb.publish` beside it."""
    output = Path(output)
    return output.with_name(f".{output.name}.publish")


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class Step:
    """One step of a publish: rename `source` (a temporary of `target`) to `target`, or remove `target`.

    `identity` is the source's (st_dev, st_ino), which a rename keeps: the step is done when the
    target carries it. A removal (`source` None) removes whatever is at `target` unless a later
    step of the same publish has already put its file there.
    """

    target: Path
    source: Path | None = None
    identity: tuple[int, int] | None = None
    lmdb: bool = False  # the LMDB folder: swapped with the one it replaces

    def done(self) -> bool:
        return self.source is not None and _identity(self.target) == self.identity

    def to_json(self) -> dict[str, Any]:
        # absolute: the next run that finishes it may start in another folder
        return {"target": os.path.abspath(self.target),
                "source": None if self.source is None else os.path.abspath(self.source),
                "identity": None if self.identity is None else list(self.identity), "lmdb": self.lmdb}

    @classmethod
    def from_json(cls, item: Any) -> Step:
        target, source, identity = Path(item["target"]), item["source"], item["identity"]
        if source is not None:
            source = Path(source)
            if not is_temporary_of(source, target):  # a log names our temporaries only: nothing else is moved
                raise ValueError(f"{source} is not a temporary of {target}")
            identity = (int(identity[0]), int(identity[1]))
        return cls(target=target, source=source, identity=identity, lmdb=bool(item["lmdb"]))


def rename_step(source: Path, target: Path, *, lmdb: bool = False) -> Step:
    """The step that renames the finished temporary `source` to `target`."""
    identity = _identity(source)
    if identity is None:
        raise FileNotFoundError(errno.ENOENT, "the finished temporary is missing", os.fsdecode(source))
    return Step(target=target, source=source, identity=identity, lmdb=lmdb)


def removal_step(target: Path) -> Step:
    return Step(target=target)


class Publish:
    """A publish: its steps, in order."""

    def __init__(self, output: Path, steps: Iterable[Step]) -> None:
        self.output = Path(output)
        self.steps = list(steps)

    def run(self) -> None:
        """Write the log, take every step, remove the log; the caller holds the output's lock."""
        body = {"format": _FORMAT, "steps": [step.to_json() for step in self.steps]}
        write_bytes_atomic(publish_log_path(self.output), json.dumps(body).encode())
        fsync_folder(self.output.parent)  # the log's name is durable before the first rename
        self.finish()
        os.unlink(publish_log_path(self.output))

    def finish(self) -> None:
        """Take the steps that are not done yet, then make the renames durable and drop the replaced LMDB."""
        placed = {step.target: step.identity for step in self.steps if step.source is not None}
        for step in self.steps:
            if step.source is None:
                if os.path.lexists(step.target) and _identity(step.target) != placed.get(step.target):
                    os.unlink(step.target)
            elif not step.done():
                if _identity(step.source) != step.identity:
                    raise StalePublishError(f"{step.source} is gone")
                if step.lmdb and os.path.lexists(step.target):
                    swap_in(step.source, step.target)  # the old LMDB: at the source's name, or aside
                else:
                    os.replace(step.source, step.target)
        for folder in sorted({step.target.parent for step in self.steps}):
            fsync_folder(folder)
        for step in self.steps:  # the replaced LMDB, left by this swap or by an earlier run killed after its swap
            if step.lmdb:
                for old in (aside_name(step.source), step.source):
                    if os.path.lexists(old) and _identity(old) != step.identity:
                        remove_path(old)

    def state(self) -> str:
        """'complete', 'pending' (a kill stopped it; `finish` completes it) or 'stale' (its files changed since)."""
        moves = [step for step in self.steps if step.source is not None]
        waiting = [step for step in moves if not step.done()]
        if not waiting:
            return "complete"
        return "pending" if all(_identity(step.source) == step.identity for step in waiting) else "stale"


class StalePublishError(Exception):
    """A publish log's files changed since it was written: it is not ours to finish."""


def read_publish(output: str | os.PathLike) -> Publish | None:
    """The publish log of `output`, or None: none there, or one that is not ours (unreadable, not a regular file
    of this user, not naming temporaries of their targets)."""
    path = publish_log_path(output)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size > (1 << 20):
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            body = json.loads(f.read())
        if not isinstance(body, dict) or body.get("format") != _FORMAT:
            return None
        return Publish(Path(output), [Step.from_json(item) for item in body["steps"]])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    finally:
        os.close(fd)


def pending_publish(output: str | os.PathLike) -> Publish | None:
    """The publish a killed run left half done at `output`, or None."""
    publish = read_publish(output)
    return publish if publish is not None and publish.state() == "pending" else None


def complete_pending(output: str | os.PathLike) -> bool:
    """Finish the publish a killed run left half done at `output` (the caller holds its lock); True if there was one.

    A log whose renames are all done (killed before it was removed) gets its cleanup finished;
    a stale one is only removed.
    """
    publish = read_publish(output)
    if publish is None:
        return False
    finished = False
    state = publish.state()
    if state != "stale":  # complete: killed after its renames, the replaced LMDB may still be there
        with contextlib.suppress(StalePublishError):
            publish.finish()
            finished = state == "pending"
    if finished:
        log.warning("%s: finished the publish an interrupted run had started", output)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(publish_log_path(output))
    return finished


# --------------------------------------------------------------------------- renames

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux `renameat2(RENAME_EXCHANGE)`); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this file system cannot: fall back
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(new: Path, target: Path) -> Path:
    """Put `new` at `target`, which exists; returns where the old one now is, for the caller to remove.

    One `exchange_paths` where the file system has it, so that `target` is never missing;
    elsewhere the old one is renamed aside first (`aside_name(new)`; if a kill leaves nothing at
    `target`, the publish log's next run renames `new` in).
    """
    if exchange_paths(new, target):
        return new
    aside = aside_name(new)
    os.replace(target, aside)
    os.replace(new, target)
    return aside


def fsync_folder(folder: Path) -> None:
    """Make the renames durable (a crash right after publishing must not bring the old names back)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def remove_path(path: Path) -> None:
    """Remove a file, a link or a folder tree we made (never follows a link into a folder)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
