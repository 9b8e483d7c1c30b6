"""Converting entries in worker processes and handing the records back through shared memory.

Why not `multiprocessing.Pool`: a raw 256x256 record is 192 KiB, and a pool pickles each one
through a pipe (copied four times, into fresh memory on both sides). On 2 cores that cost more
than the second decoding process gained: 2 pool workers converted slower than 1 (figures:
docs/benchmarks.md). Here each worker writes its records into its own ring buffer of
anonymous shared memory and sends only (offset, length) through its pipe; the writer puts them
into LMDB straight from the ring.

* Order: worker k converts entries k, k+N, k+2N, ...; record i is taken from worker i % N, so
  records arrive in input order whatever the timing, and the output does not depend on N.
* Flow control: ring space comes back only when the writer calls `release()` (after a commit),
  so a transaction replayed on `MDB_MAP_FULL` can still read its records. A ring holds at least
  twice the bytes of a transaction, and a worker sends what it holds before it waits for space,
  so it can always go on while the writer waits for it. Records over 1/8 of the ring (a 4 MiB,
  1200x1200 raw image with the default ring) go through the pipe instead.
* Nothing leaks and nothing hangs: the rings are anonymous (inherited through `fork`, freed with
  the last process), a worker exits when its pipe closes (the writer finished, failed or was
  killed), and workers ignore Ctrl-C, which the writer handles.

`fork` is needed to share anonymous memory; where it is not available (or not safe: macOS,
Windows) the caller falls back to a `multiprocessing.Pool`.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import multiprocessing
import signal
import sys
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .allocator import set_heap_retention
from .errors import WorkerError

#: Whether `RingPool` can run here (anonymous shared memory inherited through fork).
AVAILABLE = sys.platform.startswith("linux")


@dataclass(frozen=True)
class Record:
    """One entry converted: the serialized record in pieces, its C x H x W, or why it was skipped.

    Pieces, so that 192 KiB of pixels are copied once: joined by `value`, or into a ring.
    """

    parts: Sequence[bytes | memoryview] = ()
    shape: tuple[int, int, int] | None = None
    error: str | None = None

    @property
    def value(self) -> bytes | memoryview:
        return self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)


#: A worker sends its (offset, length, ...) messages in groups: one wakeup of the writer per group.
SEND_EVERY = 8


def _worker_main(index: int, count: int, items: Sequence[Any], convert: Callable[[Any], Record],
                 conn, ring: mmap.mmap, inherited: Sequence) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the writer's to handle
    set_heap_retention()  # our own process: decoding reuses its freed heap instead of fresh pages
    for other in inherited:  # the writer's ends: holding them would keep our pipe open after it dies
        other.close()
    view, size = memoryview(ring), len(ring)
    largest = size // 8
    head = released = 0  # bytes handed out / given back so far (both only grow)
    pending: list[tuple] = []
    try:
        for position in range(index, len(items), count):
            result = convert(items[position])
            length = sum(len(part) for part in result.parts)
            if result.error is not None or length > largest:  # errors, and rare huge records, go by pipe
                pending.append((None, 0, result.shape, result.error, head, b"".join(result.parts) or None))
            else:
                offset = head % size
                if offset + length > size:  # no room before the end: start again at the beginning
                    head += size - offset
                    offset = 0
                if head + length - released > size:
                    if pending:  # the writer may be waiting for these before it can give space back
                        conn.send(pending)
                        pending = []
                    while head + length - released > size:
                        released = conn.recv()
                for part in result.parts:
                    view[offset:offset + len(part)] = part
                    offset += len(part)
                head += length
                pending.append((offset - length, length, result.shape, None, head, None))
            if len(pending) >= SEND_EVERY:
                conn.send(pending)
                pending = []
        if pending:
            conn.send(pending)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the writer is gone
    except BaseException as exc:
        with contextlib.suppress(OSError):
            if pending:
                conn.send(pending)
            conn.send([("crash", f"{type(exc).__name__}: {exc}", traceback.format_exc())])
        raise SystemExit(1) from None


def start_processes(context: Any, count: int, name: str, target: Callable[..., None],
                    args_for: Callable[[int, Any, list], tuple], procs: list, conns: list) -> None:
    """Start `count` daemon processes `target(*args_for(index, their_pipe_end, our_ends))`, one duplex pipe each.

    `our_ends` are the parent's pipe ends so far, this one's included: a forked child should close
    them, or it keeps its siblings' pipes (and its own) open after the parent dies. `procs` and
    `conns` are filled as processes start, so a caller's cleanup after a failure stops those
    already running. Under fork, the parent's objects are frozen out of the garbage collector while
    the children start, so that a child's collector does not touch (and so copy) them; a caller
    that froze objects itself keeps its own arrangement.
    """
    freeze = context.get_start_method() == "fork" and gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        for index in range(count):
            here, there = context.Pipe(duplex=True)
            proc = context.Process(target=target, name=f"{name}-{index}", daemon=True,
                                   args=args_for(index, there, [*conns, here]))
            proc.start()
            there.close()
            conns.append(here)
            procs.append(proc)
    finally:
        if freeze:
            gc.unfreeze()


class RingPool:
    """Converts `items` with `convert` in `workers` processes; iterate for the results in order.

    Each result's single part is a memoryview into shared memory, valid until `release()`.
    Use as a context manager, so the workers are stopped however the caller leaves.
    """

    def __init__(self, items: Sequence[Any], convert: Callable[[Any], Record], workers: int,
                 ring_bytes: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        context = multiprocessing.get_context("fork")
        self.items = items
        self.conns: list = []
        self.views: list[memoryview] = []
        self.procs: list = []
        self._taken: deque[tuple[int, int]] = deque()  # (worker, ring end) of each result not given back yet
        self._given = 0  # results given back so far

        def worker_args(index: int, there: Any, inherited: list) -> tuple:
            ring = mmap.mmap(-1, ring_bytes)
            self.views.append(memoryview(ring))
            return (index, workers, items, convert, there, ring, inherited)

        try:
            start_processes(context, workers, "caffe-lmdb-worker", _worker_main, worker_args, self.procs, self.conns)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> RingPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __iter__(self) -> Iterator[Record]:
        workers = len(self.conns)
        inbox: list[deque] = [deque() for _ in range(workers)]
        for position in range(len(self.items)):
            index = position % workers
            try:
                if not inbox[index]:
                    inbox[index].extend(self.conns[index].recv())
                message = inbox[index].popleft()
            except (EOFError, OSError):
                self.procs[index].join(1)
                raise WorkerError(
                    f"worker {index} died (exit code {self.procs[index].exitcode}) "
                    f"before returning {_describe(self.items[position])}"
                ) from None
            if message[0] == "crash":
                raise WorkerError(
                    f"worker {index} failed on {_describe(self.items[position])}: {message[1]}\n{message[2]}"
                )
            offset, length, shape, error, end, payload = message
            self._taken.append((index, end))
            if error is not None:
                yield Record(error=error)
            elif payload is not None:
                yield Record(parts=(payload,), shape=shape)
            else:
                yield Record(parts=(self.views[index][offset:offset + length],), shape=shape)

    def release(self, count: int) -> None:
        """The first `count` results are written (committed): their ring space may be reused."""
        ends: dict[int, int] = {}
        while self._given < count and self._taken:
            index, end = self._taken.popleft()
            ends[index] = end
            self._given += 1
        for index, end in ends.items():
            with contextlib.suppress(OSError):  # a worker that has sent its last result has exited
                self.conns[index].send(end)

    def close(self) -> None:
        """Stop the workers (they have exited already when every result was taken)."""
        for conn in self.conns:
            conn.close()
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        self.conns, self.procs = [], []


def _describe(item: Any) -> str:
    return str(getattr(item, "path", item))
