"""Reading an LMDB without trusting its file: a checked read-only open, checked cursor walks, page checks.

Every LMDB the tools, the reader and the dataset read is opened here (`open_readonly`), and its
B-tree is checked before LMDB follows it. LMDB trusts its file: a `data.mdb` shorter than its
meta page says kills the process with SIGBUS on the first read past the end, and a zeroed leaf
page met by a cursor walk fails an assertion inside LMDB that aborts the process; neither can be
caught from Python. So the file size is compared with the meta page at open, the branch pages
(few: about one per hundred leaves) are checked at open, and `checked_items` checks each leaf page
just before the cursor steps onto it. Pages are read with `pread`, never through the memory map.
"""

from __future__ import annotations

import os
import struct
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

import lmdb

from .errors import CorruptLmdbError, LmdbFormatError, LmdbNotFoundError, describe_os_error


def data_file(lmdb_path: str | os.PathLike) -> Path:
    """The file holding an LMDB's pages: `data.mdb` in a directory LMDB, else the single file itself."""
    path = Path(lmdb_path)
    return path / "data.mdb" if path.is_dir() else path


def file_identity(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime in ns) of a file: changes when the file is replaced or rewritten."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def opened_identity(env: lmdb.Environment) -> tuple[int, int, int, int] | None:
    """`file_identity` of the data file an environment from `open_readonly` maps, taken when it opened."""
    opened = _OPENED.get(env)
    return None if opened is None else opened.identity


def open_readonly(lmdb_path: str | os.PathLike, *, checked_identity: tuple[int, ...] | None = None,
                  **kwargs) -> lmdb.Environment:
    """Open an existing LMDB read-only without creating anything, with a clear error if it is not one.

    Both layouts are accepted: a directory holding `data.mdb` (what Caffe writes) and a single file
    (`subdir=False`). Before anything is read, the file's size is compared with what its meta page
    says (a shorter file would crash the process with SIGBUS) and the B-tree's branch pages are
    checked (see the module docstring), unless `checked_identity` says they were: it is the
    `file_identity` the data file had when a whole checked scan of it ended (`key_index` keeps
    one per key index), and the walk is skipped only while the file still has exactly that
    identity (same inode, size and modification time: no write since).

    Raises:
        LmdbFormatError: the path is missing, unreadable or not an LMDB.
        CorruptLmdbError: the LMDB is truncated or a branch page is damaged.
    """
    path = Path(lmdb_path)
    if path.is_dir():
        if not (path / "data.mdb").is_file():
            raise LmdbFormatError(f"{path}: not an LMDB (no data.mdb in the directory)")
        subdir = True
    elif path.is_file():
        subdir = False
    else:
        raise LmdbNotFoundError(f"{path}: LMDB not found")
    file = data_file(path)
    try:
        fd = os.open(file, os.O_RDONLY)
    except OSError as exc:
        raise LmdbFormatError(f"{path}: cannot read the LMDB: {describe_os_error(exc, file)}") from None
    try:
        stat = os.fstat(fd)
        if stat.st_size == 0:
            raise LmdbFormatError(f"{path}: not an LMDB: {file} is empty (0 bytes; an interrupted write or copy?)")
        options = {"readonly": True, "lock": False, "readahead": False, "meminit": False}
        options.update(kwargs)
        try:
            env = lmdb.open(str(path), subdir=subdir, create=False, **options)
        except lmdb.InvalidError as exc:
            reason = str(exc).removeprefix(f"{path}: ")
            raise LmdbFormatError(f"{path}: not a readable LMDB: not an LMDB file, or its meta pages (the "
                                  f"first two) are damaged ({reason})") from None
        except lmdb.Error as exc:
            raise LmdbFormatError(f"{path}: not a readable LMDB ({str(exc).removeprefix(f'{path}: ')})") from None
        try:
            identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if file_identity(file) != identity:
                raise LmdbFormatError(f"{path}: the LMDB was replaced while it was being opened; try again")
            opened = _Opened(path, file, env.stat()["psize"], identity)
            _OPENED[env] = _check_opened(env, opened, fd, walk=checked_identity != identity)
        except BaseException:
            env.close()
            raise
        return env
    except OSError as exc:
        raise LmdbFormatError(f"{path}: cannot read the LMDB: {describe_os_error(exc, file)}") from None
    finally:
        os.close(fd)


class ProcessEnvironments:
    """The read-only LMDB environments open in this process, one per LMDB, shared by its datasets.

    py-lmdb raises "already open in this process" on a second open of the same files, so every
    dataset gets its environment here. Entries are weak: an environment closes when the last
    dataset using it goes. A child made by fork() inherits the parent's handles, which it must
    not use (LMDB's rule) and which block reopening the files; the first call in the child closes
    them, which touches nothing the parent shares because they were opened with `lock=False`.
    The first reader to open an LMDB in a process chooses `readahead`. The tools (`info`, `verify`,
    `export`, ...) take their environments here too, so they work in a process that holds a dataset
    of the same LMDB. There is no `max_readers`:
    with `lock=False` LMDB keeps no reader table, so a reader-table size would have no effect.
    An environment is shared only while the path still names the file it maps: once the LMDB
    was replaced (a new inode under the same name), the next caller gets the new file's own.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._envs: weakref.WeakValueDictionary[str, lmdb.Environment] = weakref.WeakValueDictionary()
        if hasattr(os, "register_at_fork"):  # a fork while another thread held the lock must not deadlock the child
            os.register_at_fork(after_in_child=self._new_lock)

    def _new_lock(self) -> None:
        self._lock = threading.Lock()

    def get(self, lmdb_path: str, **options: Any) -> lmdb.Environment:
        """This process's environment for `lmdb_path`, opened read-only (see `safe_lmdb.open_readonly`)."""
        with self._lock:
            if self._pid != os.getpid():
                for env in list(self._envs.values()):
                    env.close()
                self._envs = weakref.WeakValueDictionary()
                self._pid = os.getpid()
            key = os.path.realpath(lmdb_path)
            env = self._envs.get(key)
            if env is not None and same_file(env, lmdb_path) is False:
                env = None  # replaced: the old environment stays with the datasets that hold it
            if env is None:
                env = open_readonly(lmdb_path, **options)
                self._envs[key] = env
            return env


def same_file(env: lmdb.Environment, lmdb_path: str) -> bool | None:
    """Whether `lmdb_path` still names the file `env` maps (device and inode); None when unknown."""
    opened = opened_identity(env)
    try:
        current = file_identity(data_file(lmdb_path))
    except OSError:
        return None  # gone: opening it again reports that
    return None if opened is None else opened[:2] == current[:2]


OPEN_ENVS = ProcessEnvironments()


@contextmanager
def shared_readonly(lmdb_path: str | os.PathLike, **options: Any) -> Iterator[lmdb.Environment]:
    """This process's read-only environment of an LMDB (`OPEN_ENVS`), for the length of a block.

    Unlike `with open_readonly(...)`, the block's end does not close it: a dataset of the same LMDB
    in this process (py-lmdb allows one environment per LMDB and process) keeps reading, and the
    environment closes when its last user lets go of it.
    """
    yield OPEN_ENVS.get(os.fspath(lmdb_path), **options)


def transaction_path(txn: lmdb.Transaction) -> Path | None:
    """The LMDB a transaction of `begin_read` reads, for messages (None for another transaction)."""
    opened = _TXNS.get(txn)
    return None if opened is None else Path(opened.path)


def begin_read(env: lmdb.Environment, *, buffers: bool = False) -> lmdb.Transaction:
    """A read transaction on an environment from `open_readonly`, which `checked_items` can check and name.

    Use it as `env.begin`, as a context manager or not.
    """
    txn = env.begin(buffers=buffers)
    opened = _OPENED.get(env)
    if opened is not None:
        _TXNS[txn] = opened
    return txn


def get_value(txn: lmdb.Transaction, key: bytes, lmdb_path: str | os.PathLike) -> Any:
    """`txn.get(key)`, with LMDB's errors turned into one line naming the LMDB and the key.

    A key LMDB cannot hold at all (empty, or longer than its 511-byte limit), as a bad keys file
    may list, is simply absent (None), as it is for LMDB's own `mdb_get` on an intact file.

    Raises:
        CorruptLmdbError: LMDB met a damaged page looking the key up.
    """
    try:
        return txn.get(key)
    except lmdb.BadValsizeError:
        return None
    except lmdb.Error as exc:
        raise CorruptLmdbError(f"{lmdb_path}: corrupt LMDB reading key {bytes(key)!r} ({exc})") from None


@contextmanager
def lmdb_errors_named(lmdb_path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn LMDB's errors in the block (which name no file) into `CorruptLmdbError` naming the LMDB and `what`."""
    try:
        yield
    except lmdb.Error as exc:
        raise CorruptLmdbError(f"{lmdb_path}: corrupt LMDB {what} ({exc})") from None


def checked_items(txn: lmdb.Transaction, *, values: bool = True) -> Iterator[Any]:
    """Every record of the LMDB in key order, as `txn.cursor().iternext(values=values)` gives them.

    The transaction must come from `begin_read` (on an environment from `open_readonly`): each
    leaf page is then checked before the cursor steps onto it, and the records seen are counted
    against the meta page; LMDB's own errors are raised with the LMDB and the last good key. A
    plain `env.begin()` transaction is refused (`TypeError`) rather than walked unchecked.

    Raises:
        CorruptLmdbError: a damaged page or a record count that disagrees with the meta page, naming
            the LMDB, the page, and the last record read before the damage.
    """
    opened = _TXNS.get(txn)
    if opened is None:
        raise TypeError("checked_items needs a transaction from safe_lmdb.begin_read (on an environment from "
                        "open_readonly), not env.begin(): its pages could not be checked")
    items = txn.cursor().iternext(keys=True, values=values)
    last: list[bytes] = []  # the last key yielded, for the messages
    try:
        if not opened.checkable:
            for item in items:
                last[:] = [bytes(item[0] if values else item)]
                yield item
            return
        fd = os.open(opened.data_file, os.O_RDONLY)
        try:
            tree = _read_tree(opened, fd, txn.id())
            if tree is None or tree.dupsort:  # another layout, or several values per node: unchecked
                for item in items:
                    last[:] = [bytes(item[0] if values else item)]
                    yield item
                return
            count = 0
            for pgno, _ in _leaf_pages(tree, fd, last):
                numkeys, first = _check_leaf(tree, fd, pgno, last)
                for i, item in enumerate(islice(items, numkeys)):
                    key = bytes(item[0] if values else item)
                    if i == 0 and key != first:
                        raise _corrupt(tree, pgno, f"holds key {first!r} but LMDB read {key!r} there", last)
                    last[:] = [key]
                    yield item
                    count += 1
            if count != tree.entries:
                raise CorruptLmdbError(f"{opened.path}: corrupt LMDB: its pages hold {count} records but its meta "
                                       f"page says {tree.entries}")
        finally:
            os.close(fd)
    except lmdb.Error as exc:
        where = "" if opened is None else f"{opened.path}: "
        after = f"after key {last[0]!r}" if last else "before its first record"
        raise CorruptLmdbError(f"{where}corrupt LMDB {after} ({exc})") from None
    except OSError as exc:  # reading the pages to check them (only with a file: `opened` is set)
        raise LmdbFormatError(f"{opened.path}: cannot read the LMDB: {describe_os_error(exc, opened.data_file)}") \
            from None


# --------------------------------------------------------------------------- LMDB's page layout
# LMDB 0.9's on-disk format (mdb.c), 64-bit: what is needed to check pages before LMDB uses them.

_PAGE_HEADER = 16  # pgno u64, pad u16, flags u16, lower u16, upper u16
_NODE_HEADER = 8  # lo u16, hi u16, flags u16, ksize u16
_P_BRANCH, _P_LEAF, _P_OVERFLOW, _P_META, _P_LEAF2 = 0x01, 0x02, 0x04, 0x08, 0x20
_F_BIGDATA = 0x01
_MDB_DUPSORT = 0x04
#: The magic number at byte 16 of an LMDB's meta pages, after the page header.
LMDB_MAGIC, _DATA_VERSION = 0xBEEFC0DE, 1
_P_INVALID = 2**64 - 1


@dataclass(frozen=True)
class _Opened:
    """What `open_readonly` learned about an LMDB, kept per environment (and per `begin_read` transaction)."""

    path: Path
    data_file: Path
    psize: int
    identity: tuple[int, int, int, int]
    checkable: bool = False  # the file has the layout below, and the branch pages were checked


@dataclass(frozen=True)
class _Tree:
    """The main database's B-tree as a meta page describes it."""

    opened: _Opened
    root: int
    depth: int
    entries: int
    last_pgno: int
    dupsort: bool


_OPENED: weakref.WeakKeyDictionary[lmdb.Environment, _Opened] = weakref.WeakKeyDictionary()
_TXNS: weakref.WeakKeyDictionary[lmdb.Transaction, _Opened] = weakref.WeakKeyDictionary()


def _check_opened(env: lmdb.Environment, opened: _Opened, fd: int, *, walk: bool = True) -> _Opened:
    """The checks `open_readonly` makes: the file's size, the branch pages, the first and last leaves.

    The first and last leaves are where `cursor.first()` and `cursor.last()` land (every tool
    reads the first record to refuse pickled LMDBs, `info` the last key); the other leaves are
    checked as a scan reaches them (`checked_items`). Without `walk` (the pages were checked at
    this file identity before) only the size and the meta pages are.
    """
    last_pgno = env.info()["last_pgno"]
    expected = (last_pgno + 1) * opened.psize
    size = opened.identity[2]
    if size < expected:
        file = "the file" if opened.data_file == opened.path else opened.data_file
        raise CorruptLmdbError(
            f"{opened.path}: truncated LMDB: {file} is {size} bytes but its meta page says {expected} "
            f"({last_pgno + 1} pages of {opened.psize}); an interrupted copy or download? Reading it would crash"
        )
    tree = _read_tree(opened, fd)
    if tree is None or tree.last_pgno != last_pgno:  # not a layout these checks know: leave it to LMDB
        return opened
    if not walk:
        return replace(opened, checkable=True)
    first = last = None
    for leaf in _leaf_pages(tree, fd):  # reads the branch pages only
        first, last = first or leaf, leaf
    for pgno, separator in {first, last} - {None}:
        _check_leaf(tree, fd, pgno, [], separator)
    return replace(opened, checkable=True)


def _read_page(opened: _Opened, fd: int, pgno: int) -> bytes:
    return os.pread(fd, opened.psize, pgno * opened.psize)


def _read_tree(opened: _Opened, fd: int, txnid: int | None = None) -> _Tree | None:
    """The tree of the meta page LMDB reads (`txnid`'s, else the newest); None if the layout is not LMDB 0.9's."""
    metas = []
    for pgno in (0, 1):
        page = _read_page(opened, fd, pgno)
        if len(page) < 152:
            return None
        flags = struct.unpack_from("<H", page, 10)[0]
        magic, version = struct.unpack_from("<II", page, 16)
        if not flags & _P_META or magic != LMDB_MAGIC or version != _DATA_VERSION:
            return None
        db_flags, depth = struct.unpack_from("<HH", page, 92)
        entries, root = struct.unpack_from("<QQ", page, 120)
        last_pgno, meta_txnid = struct.unpack_from("<QQ", page, 136)
        metas.append((meta_txnid, root, depth, entries, last_pgno, db_flags))
    chosen = [m for m in metas if m[0] == txnid] if txnid is not None else []
    meta_txnid, root, depth, entries, last_pgno, db_flags = chosen[0] if chosen else max(metas)
    if struct.unpack_from("<I", _read_page(opened, fd, 0), 40)[0] != opened.psize:
        return None
    return _Tree(opened, root, depth, entries, last_pgno, bool(db_flags & _MDB_DUPSORT))


def _corrupt(
    tree: _Tree, pgno: int, what: str, last: list[bytes] | None, leads_to: bytes | None = None
) -> CorruptLmdbError:
    """The one line for a damaged page: the LMDB, the page and its file, and the last key read before it."""
    opened = tree.opened
    file = "" if opened.data_file == opened.path else f" of {opened.data_file}"
    message = f"{opened.path}: corrupt LMDB: page {pgno}{file} {what}"
    if last:
        message += f"; the last readable record before it is key {last[0]!r}"
    elif leads_to:
        message += f"; it should hold the records from key {leads_to!r} on"
    return CorruptLmdbError(message)


def _page_problem(page: bytes, pgno: int, kind: int, psize: int) -> str | None:
    """What is wrong with the header of a page that should be a branch or leaf page, or None."""
    name = "branch" if kind == _P_BRANCH else "leaf"
    if len(page) < psize:
        return f"is cut short ({len(page)} of {psize} bytes)"
    stored, _, flags, lower, upper = struct.unpack_from("<QHHHH", page, 0)
    if stored != pgno:  # page numbers start at 2 here, so a zeroed page lands here too
        if page.count(0) == psize:
            return f"is all zeros (expected a B-tree {name} page)"
        return f"is not the B-tree {name} page it should be (its header says page {stored})"
    if flags & (_P_BRANCH | _P_LEAF | _P_OVERFLOW | _P_META | _P_LEAF2) != kind:
        return f"is not a B-tree {name} page (flags {flags:#x})"
    if not _PAGE_HEADER + 2 <= lower <= upper <= psize:
        return f"has a damaged {name} page header (lower {lower}, upper {upper})"
    return None


_NODE = struct.Struct("<4H")
_PGNO = struct.Struct("<Q")


def _nodes(page: bytes, psize: int) -> list[tuple[int, int, int, int]] | None:
    """(offset, size or low page bits, flags, key size) of each node of a branch/leaf page; None if a pointer is bad.

    Plain struct reads: pages hold a few to a few hundred nodes, too few for numpy to pay off.
    """
    lower, upper = struct.unpack_from("<HH", page, 12)
    count = (lower - _PAGE_HEADER) // 2
    limit = psize - _NODE_HEADER
    nodes = []
    for offset in struct.unpack_from(f"<{count}H", page, _PAGE_HEADER):
        if offset < upper or offset > limit or offset & 1:
            return None
        low, high, flags, ksize = _NODE.unpack_from(page, offset)
        nodes.append((offset, low | high << 16, flags, ksize))
    return nodes


def _leaf_pages(tree: _Tree, fd: int, last: list[bytes] | None = None) -> Iterator[tuple[int, bytes]]:
    """(page number, separator key) of every leaf in key order, each branch page checked on the way down."""
    if tree.depth == 0 or tree.root == _P_INVALID:
        if tree.entries:
            raise CorruptLmdbError(f"{tree.opened.path}: corrupt LMDB: its meta page says {tree.entries} records "
                                   "but no B-tree")
        return
    if not 2 <= tree.root <= tree.last_pgno or tree.depth > 64:
        raise _corrupt(tree, tree.root, f"cannot be the B-tree's root (depth {tree.depth}, last page "
                                        f"{tree.last_pgno})", last)
    yield from _descend(tree, fd, tree.root, b"", 1, last)


def _checked_nodes(tree: _Tree, fd: int, pgno: int, kind: int, last: list[bytes] | None,
                   separator: bytes | None) -> tuple[bytes, list[tuple[int, int, int, int]]]:
    """A branch or leaf page and its node headers, or the CorruptLmdbError naming what is wrong with it."""
    page = _read_page(tree.opened, fd, pgno)
    problem = _page_problem(page, pgno, kind, tree.opened.psize)
    nodes = _nodes(page, tree.opened.psize) if problem is None else None
    if problem is None and nodes is None:
        problem = f"has damaged record pointers ({'branch' if kind == _P_BRANCH else 'leaf'} page)"
    if problem is not None:
        raise _corrupt(tree, pgno, problem, last, separator)
    return page, nodes


def _descend(tree: _Tree, fd: int, pgno: int, separator: bytes, level: int,
             last: list[bytes] | None) -> Iterator[tuple[int, bytes]]:
    if level == tree.depth:
        yield pgno, separator
        return
    psize = tree.opened.psize
    page, nodes = _checked_nodes(tree, fd, pgno, _P_BRANCH, last, separator)
    leaves_next = level + 1 == tree.depth  # children yielded here: no generator per leaf
    for offset, low, flags, ksize in nodes:
        child = low | flags << 32
        start = offset + _NODE_HEADER
        if start + ksize > psize or not 2 <= child <= tree.last_pgno:
            raise _corrupt(tree, pgno, "has damaged entries (branch page)", last, separator)
        if leaves_next:
            yield child, page[start:start + ksize] or separator
        else:
            yield from _descend(tree, fd, child, page[start:start + ksize] or separator, level + 1, last)


def _check_leaf(
    tree: _Tree, fd: int, pgno: int, last: list[bytes], separator: bytes | None = None
) -> tuple[int, bytes]:
    """Check a leaf page before LMDB reads it; returns its record count and first key."""
    opened = tree.opened
    psize = opened.psize
    page, nodes = _checked_nodes(tree, fd, pgno, _P_LEAF, last, separator)
    for offset, size, flags, ksize in nodes:
        end = offset + _NODE_HEADER + ksize
        if not ksize or end + (8 if flags & _F_BIGDATA else size) > psize:
            raise _corrupt(tree, pgno, "has damaged records (leaf page)", last, separator)
        if flags & _F_BIGDATA:
            first_page = _PGNO.unpack_from(page, end)[0]
            if not 2 <= first_page <= tree.last_pgno - (_PAGE_HEADER + size - 1) // psize:
                raise _corrupt(tree, pgno, "points to overflow pages past the end of the file (leaf page)", last,
                               separator)
    offset, _, _, ksize = nodes[0]
    return len(nodes), page[offset + _NODE_HEADER:offset + _NODE_HEADER + ksize]
