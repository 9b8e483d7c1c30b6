"""Merging shard LMDBs into one: the records of the unsharded conversion, byte for byte.

Shards hold disjoint, sorted key ranges, so a k-way merge of their cursors yields every record
in key order, which is the unsharded conversion's write order; values are copied as stored
(never parsed) and written with LMDB's append mode.
"""

from __future__ import annotations

import heapq
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from .atomic_lmdb import AtomicLmdb
from .conversion import ConvertResult
from .errors import InputError, MergeError
from .files import sidecar_path
from .progress import progress_bar
from .safe_lmdb import OPEN_ENVS, begin_read
from .tool_reading import class_names, iter_values, sidecar_lines


def _records(shard_index: int, txn) -> Iterator[tuple[bytes, int, bytes]]:
    # iter_values checks each page before LMDB reads it: a damaged shard stops the merge with one
    # line naming the shard and its last good key (and AtomicLmdb leaves no output behind).
    for key, value in iter_values(txn):
        yield key, shard_index, value


def merge(
    shards: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    keys_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    commit_every: int = 1000,
    progress: bool | None = None,
) -> ConvertResult:
    """Merge shard LMDBs into one LMDB (+ keys file, class list and skipped list).

    Raises:
        InputError: fewer than one shard, or a shard that does not exist.
        MergeError: two shards hold the same key, or their class lists differ (both named).
        LmdbFormatError, CorruptLmdbError: a shard is not an LMDB, or is truncated or damaged
            (the shard named, and the last good key).
    """
    shards = [Path(s) for s in shards]
    if not shards:
        raise InputError("merge needs at least one shard LMDB")
    classes = [class_names(s) for s in shards]
    for shard, shard_classes in zip(shards[1:], classes[1:], strict=True):
        if shard_classes != classes[0]:
            raise MergeError(
                f"{shards[0]} and {shard} have different class lists ({sidecar_path(shard, 'classes.txt').name})"
            )
    skipped = [
        tuple(line.split("\t", 1)) if "\t" in line else (line, "")
        for shard in shards for line in (sidecar_lines(shard, "skipped.txt") or [])
    ]
    start = time.perf_counter()
    envs = []
    try:
        for shard in shards:
            envs.append(OPEN_ENVS.get(os.fspath(shard), readahead=True))  # one pass in order: read ahead
        txns = [begin_read(env) for env in envs]
        total = sum(txn.stat()["entries"] for txn in txns)
        with AtomicLmdb(output, keys_path, overwrite=overwrite, commit_every=commit_every, inputs=shards) as out, \
                progress_bar(total, Path(output).name, progress) as bar:
            previous: tuple[bytes, int] | None = None
            for key, index, value in heapq.merge(*(_records(i, txn) for i, txn in enumerate(txns))):
                if previous is not None and previous[0] == key:
                    raise MergeError(f"key {key!r} is in both {shards[previous[1]]} and {shards[index]}")
                out.put(key, value)
                previous = (key, index)
                bar.update()
            out.finish(classes[0], skipped)
        for txn in txns:
            txn.abort()
    finally:
        del envs  # this process's shared environments: they close with their last user
    result = ConvertResult(output=out.output, keys_path=out.keys_path, written=len(out.keys),
                           skipped=len(skipped), bytes_written=out.bytes_written)
    result.seconds = time.perf_counter() - start
    return result
