"""Damaged LMDB files on the read side: every command gives one line naming the LMDB, never a crash.

The LMDBs are real (several hundred records over many leaf pages under a branch page); the
damage is real bytes written into `data.mdb`: a leaf page in the middle zeroed or overwritten
with random bytes, the branch page zeroed, or the file cut short. Without the checks in
`keys.open_readonly` and `keys.checked_items`, a zeroed leaf met by a cursor walk aborts the
process inside LMDB (an assertion, SIGABRT) and a short file kills it with SIGBUS.
"""

from __future__ import annotations

import os
import re
import shutil
import struct

import lmdb
import numpy as np
import pytest
from conftest import assert_one_line_error, caffe_key, caffe_raw_datum, run_cli

from caffe_lmdb import LmdbDataset_train, LmdbFormatError, save_keys, scan_keys
from caffe_lmdb.errors import CorruptLmdbError
from caffe_lmdb.grid_sheet import make_grid
from caffe_lmdb.inspection import info, verify
from caffe_lmdb.safe_lmdb import begin_read, checked_items, open_readonly
from caffe_lmdb.tool_reading import iter_values, read_txn

RECORDS = 400
_P_LEAF = 0x02


# ---------------------------------------------------------------- real LMDBs, really damaged

def many_record_lmdb(path, count: int = RECORDS, *, subdir: bool = True, key_padding: int = 0,
                     big_every: int = 0) -> list[bytes]:
    """`count` raw 5x7 RGB Datums (about 130 bytes each: some 25 per leaf page), written with py-lmdb.

    `key_padding` lengthens the keys (fewer per branch page: a deeper tree); every `big_every`-th
    record gets a 64x64 image, stored on overflow pages. Returns the keys in LMDB order.
    """
    rng = np.random.default_rng(7)
    keys = [caffe_key(i, "c/" + "p" * key_padding + f"{i}.png") for i in range(count)]
    env = lmdb.open(str(path), map_size=1 << 26, subdir=subdir)
    with env.begin(write=True) as txn:
        for i, key in enumerate(keys):
            side = 64 if big_every and i % big_every == 0 else None
            pixels = rng.integers(0, 256, size=(side or 5, side or 7, 3), dtype=np.uint8)
            txn.put(key, caffe_raw_datum(pixels, i % 3).SerializeToString())
    env.close()
    return keys


def data_file(path):
    return path / "data.mdb" if path.is_dir() else path


def page_size(path) -> int:
    env = lmdb.open(str(path), readonly=True, lock=False, subdir=path.is_dir())
    try:
        return env.stat()["psize"]
    finally:
        env.close()


def leaf_pages(path) -> dict[bytes, int]:
    """Key -> the leaf page holding it, read from the pages' own record pointers.

    Searching the file for the key's bytes is not enough: keys also sit in branch pages (as
    separators), and stale copies stay in the free space of pages that were split.
    """
    data, psize = data_file(path).read_bytes(), page_size(path)
    where = {}
    for pgno in range(2, len(data) // psize):
        page = data[pgno * psize:(pgno + 1) * psize]
        _, _, flags, lower, _ = struct.unpack_from("<QHHHH", page)
        if flags != _P_LEAF:
            continue
        for offset in struct.unpack_from(f"<{(lower - 16) // 2}H", page, 16):
            ksize = struct.unpack_from("<H", page, offset + 6)[0]
            where[page[offset + 8:offset + 8 + ksize]] = pgno
    return where


def leaf_page_of(path, key: bytes) -> int:
    return leaf_pages(path)[key]


def first_key_on(path, pgno: int, keys: list[bytes]) -> int:
    """Index of the first key stored on leaf page `pgno`."""
    where = leaf_pages(path)
    return next(i for i, key in enumerate(keys) if where[key] == pgno)


def damage_page(path, pgno: int, how: str = "zero") -> None:
    """Overwrite page `pgno` of the data file: all zeros, seeded random bytes, or random bytes after the header."""
    psize = page_size(path)
    rng = np.random.default_rng(pgno)
    with open(data_file(path), "r+b") as f:
        if how == "zero":
            f.seek(pgno * psize)
            f.write(bytes(psize))
        elif how == "random":
            f.seek(pgno * psize)
            f.write(rng.bytes(psize))
        elif how == "body":  # the header intact, the record pointers and records scribbled
            f.seek(pgno * psize + 16)
            f.write(rng.bytes(psize - 16))
        else:
            raise ValueError(how)


def damage_middle_leaf(path, keys: list[bytes], how: str = "zero") -> tuple[int, int]:
    """Damage the leaf page holding the middle record; returns (page, index of its first key)."""
    pgno = leaf_page_of(path, keys[len(keys) // 2])
    first = first_key_on(path, pgno, keys)
    damage_page(path, pgno, how)
    return pgno, first


def branch_pages(path) -> list[int]:
    data, psize = data_file(path).read_bytes(), page_size(path)
    return [p for p in range(2, len(data) // psize) if struct.unpack_from("<H", data, p * psize + 10)[0] == 0x01]


def truncate(path) -> int:
    """Cut the data file to half its size, as an interrupted copy leaves it; returns the old size."""
    size = data_file(path).stat().st_size
    os.truncate(data_file(path), size // 2)
    return size


@pytest.fixture
def damaged(tmp_path):
    """A 400-record LMDB with a zeroed leaf page in the middle, and a keys file saved before the damage.

    Returns (path, keys, damaged page, index of the first key on it).
    """
    path = tmp_path / "damaged.lmdb"
    keys = many_record_lmdb(path)
    save_keys(tmp_path / "damaged_keys.npy", keys)
    pgno, first = damage_middle_leaf(path, keys)
    return path, keys, pgno, first


# ---------------------------------------------------------------- the recipe itself

def test_the_damage_is_in_the_middle_of_a_multi_page_tree(tmp_path):
    path = tmp_path / "db.lmdb"
    keys = many_record_lmdb(path)
    env = lmdb.open(str(path), readonly=True, lock=False)
    stat = env.stat()
    env.close()
    assert stat["depth"] == 2 and stat["leaf_pages"] >= 10 and stat["entries"] == RECORDS
    pgno, first = damage_middle_leaf(path, keys)
    assert 0 < first < RECORDS // 2 <= first + 40 and pgno not in branch_pages(path)


# ---------------------------------------------------------------- in-process: the error names LMDB, page, key

@pytest.mark.parametrize("how", ["zero", "random", "body"])
@pytest.mark.parametrize("subdir", [True, False], ids=["dir", "single-file"])
def test_scan_stops_at_the_damaged_leaf_naming_the_last_good_key(tmp_path, how, subdir):
    path = tmp_path / ("db.lmdb" if subdir else "db.mdb")
    keys = many_record_lmdb(path, subdir=subdir)
    pgno, first = damage_middle_leaf(path, keys, how)
    with pytest.raises(CorruptLmdbError) as caught:
        scan_keys(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: corrupt LMDB: page {pgno}") and "\n" not in message
    assert f"the last readable record before it is key {keys[first - 1]!r}" in message
    seen = []
    with pytest.raises(CorruptLmdbError, match=f"page {pgno}"), read_txn(path) as txn:
        for key, _ in iter_values(txn):
            seen.append(key)
    assert seen == keys[:first]  # every record before the damaged page was read, none after


def test_zeroed_branch_page_is_found_when_opening(tmp_path):
    path = tmp_path / "db.lmdb"
    many_record_lmdb(path)
    [root] = branch_pages(path)
    damage_page(path, root, "zero")
    with pytest.raises(CorruptLmdbError, match=rf"{path}: corrupt LMDB: page {root} of .*data.mdb is all zeros"):
        open_readonly(path)


def test_damaged_first_and_last_leaves_are_found_when_opening(tmp_path):
    """`cursor.first()`/`last()` (every reader's first look, and `info`'s last key) never meet them."""
    path = tmp_path / "db.lmdb"
    keys = many_record_lmdb(path)
    first_leaf, last_leaf = leaf_page_of(path, keys[0]), leaf_page_of(path, keys[-1])
    shutil.copytree(path, tmp_path / "copy.lmdb")
    damage_page(path, first_leaf, "body")
    with pytest.raises(CorruptLmdbError, match=f"page {first_leaf} .*damaged record pointers"):
        open_readonly(path)
    starts_at = keys[first_key_on(tmp_path / "copy.lmdb", last_leaf, keys)]
    damage_page(tmp_path / "copy.lmdb", last_leaf, "zero")
    with pytest.raises(CorruptLmdbError) as caught:
        info(tmp_path / "copy.lmdb")
    assert f"page {last_leaf} of" in str(caught.value) and "is all zeros" in str(caught.value)
    assert str(caught.value).endswith(f"it should hold the records from key {starts_at!r} on")


def test_intact_deep_tree_with_overflow_values_passes_the_checks(tmp_path):
    """No false alarm: a 3-level tree (long keys) with overflow values reads exactly as LMDB's own walk."""
    path = tmp_path / "deep.lmdb"
    keys = many_record_lmdb(path, 600, key_padding=200, big_every=7)
    env = lmdb.open(str(path), readonly=True, lock=False)
    stat = env.stat()
    with env.begin() as txn:
        plain = list(txn.cursor())
    env.close()
    assert stat["depth"] >= 3 and stat["overflow_pages"] > 0
    assert scan_keys(path).tolist() == keys == [key for key, _ in plain]
    with read_txn(path) as txn:
        assert [(key, bytes(value)) for key, value in iter_values(txn)] == plain
    report = verify(path)
    assert report.ok and report.records == 600 and not report.damaged


def test_checked_items_counts_records_against_the_meta_page(tmp_path):
    """A transaction not from `begin_read` is refused: it would be walked with no page checked."""
    path = tmp_path / "db.lmdb"
    keys = many_record_lmdb(path, 50)
    with open_readonly(path) as env:
        with begin_read(env) as txn:
            assert [bytes(k) for k in checked_items(txn, values=False)] == keys
        with env.begin() as txn, pytest.raises(TypeError, match="needs a transaction from safe_lmdb.begin_read"):
            next(iter(checked_items(txn, values=False)))


def test_truncated_lmdb_is_refused_before_any_read(tmp_path):
    for name, subdir in (("dir.lmdb", True), ("file.mdb", False)):
        path = tmp_path / name
        many_record_lmdb(path, subdir=subdir)
        size = truncate(path)
        with pytest.raises(CorruptLmdbError) as caught:
            open_readonly(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: truncated LMDB: ") and f"is {size // 2} bytes" in message
        assert f"its meta page says {size}" in message
        assert ("data.mdb" in message) == subdir


def test_info_and_verify_in_process(damaged):
    path, keys, pgno, first = damaged
    with pytest.raises(CorruptLmdbError, match=f"{path}: corrupt LMDB: page {pgno}"):
        info(path)
    report = verify(path)
    assert report.damaged and not report.ok and report.records == first
    [(key, message)] = report.problems  # the keys file is not compared past the damage
    assert key is None and f"page {pgno}" in message and repr(keys[first - 1]) in message
    [line] = report.problem_lines()
    assert line.startswith(f"{path}: corrupt LMDB: page {pgno}")
    assert str(report) == f"{path}: {first} records checked before the damage: 1 problems"


def test_verify_reports_a_truncated_lmdb_as_a_problem(tmp_path):
    path = tmp_path / "db.lmdb"
    many_record_lmdb(path)
    truncate(path)
    report = verify(path)
    assert report.damaged and report.records == 0
    assert "truncated LMDB" in report.problem_lines()[0]


def test_grid_from_a_keys_file_names_the_key_it_could_not_read(damaged, tmp_path):
    path, keys, _, first = damaged
    with pytest.raises(CorruptLmdbError, match=rf"{path}: corrupt LMDB reading key b'{keys[first].decode()}'"):
        make_grid(path, n=RECORDS, keys_path=tmp_path / "damaged_keys.npy", tile=16)


# ---------------------------------------------------------------- LmdbDataset_train

def test_dataset_without_keys_file_names_lmdb_and_last_good_key(damaged):
    path, keys, pgno, first = damaged
    with pytest.raises(CorruptLmdbError) as caught:
        LmdbDataset_train(path)
    assert str(caught.value).startswith(f"{path}: corrupt LMDB: page {pgno}")
    assert repr(keys[first - 1]) in str(caught.value)


def test_dataset_read_of_a_damaged_record_names_lmdb_and_key(damaged, tmp_path):
    path, keys, _, first = damaged
    dataset = LmdbDataset_train(path, keys_path=tmp_path / "damaged_keys.npy", output="numpy")
    assert dataset[0][0].shape == (3, 5, 7) and dataset[first - 1][1] == (first - 1) % 3
    with pytest.raises(CorruptLmdbError) as caught:
        dataset[first]
    assert str(caught.value).startswith(f"{path}: corrupt LMDB reading key {keys[first]!r}")
    with pytest.raises(CorruptLmdbError, match=re.escape(repr(keys[first + 1]))):
        dataset.__getitems__([0, first + 1])  # the batch path (prefetch first) too


def test_dataset_on_truncated_lmdb(tmp_path):
    path = tmp_path / "db.lmdb"
    keys = many_record_lmdb(path)
    save_keys(tmp_path / "keys.npy", keys)
    truncate(path)
    with pytest.raises(CorruptLmdbError, match=f"{path}: truncated LMDB"):
        LmdbDataset_train(path, keys_path=tmp_path / "keys.npy")


def test_dataset_truncated_after_creation_fails_on_the_next_open(tmp_path):
    """A process opening the LMDB later (a worker, or this one on its first read) checks it too."""
    path = tmp_path / "db.lmdb"
    many_record_lmdb(path)
    dataset = LmdbDataset_train(path)
    truncate(path)
    with pytest.raises(LmdbFormatError, match=f"{path}: the LMDB was replaced or rewritten since this dataset"):
        dataset[0]


# ---------------------------------------------------------------- every command, as a user runs it

def _command(name: str, path, tmp_path) -> list:
    out = tmp_path / "out"
    return {
        "info": ["info", path],
        "mean": ["mean", path, "-o", out / "mean.binaryproto", "-q"],
        "export": ["export", path, out, "-q"],
        "grid": ["grid", path, "-o", out / "grid.png", "--n", "400", "--tile", "16"],
        "merge": ["merge", path, "-o", out / "merged.lmdb", "-q"],
        "loader": ["loader", path, "--keys", tmp_path / "damaged_keys.npy", "--workers", "1", "--size", "8",
                   "--batch-size", "50"],
    }[name]


COMMANDS = ["info", "mean", "export", "grid", "merge", "loader"]


@pytest.mark.parametrize("command", COMMANDS)
def test_command_on_damaged_lmdb_prints_one_line(damaged, tmp_path, command):
    path, keys, pgno, first = damaged
    (tmp_path / "out").mkdir()
    (tmp_path / "tmp").mkdir()
    result = run_cli(*_command(command, path, tmp_path), env={"TMPDIR": str(tmp_path / "tmp")})
    stderr = assert_one_line_error(result, 1, path)
    assert not list((tmp_path / "tmp").iterdir())  # the loader's DataLoader workers left their pymp-* there
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "corrupt LMDB" in stderr
    if command in ("grid", "loader"):  # they read by key (the keys file beside it): the key they could not read
        assert repr(keys[first]) in stderr
    else:  # a scan: the damaged page and the last good key before it
        assert f"page {pgno}" in stderr and repr(keys[first - 1]) in stderr
    leftovers = {p.name for p in (tmp_path / "out").iterdir()} - {"c0", "c1", "c2", "0", "1", "2"}
    assert not leftovers, leftovers  # no mean file, grid, merged LMDB or export list.txt


@pytest.mark.parametrize("command", COMMANDS)
def test_command_on_truncated_lmdb_has_no_sigbus(tmp_path, command):
    path = tmp_path / "damaged.lmdb"
    keys = many_record_lmdb(path)
    save_keys(tmp_path / "damaged_keys.npy", keys)
    truncate(path)
    (tmp_path / "out").mkdir()
    result = run_cli(*_command(command, path, tmp_path))
    assert result.returncode >= 0, f"killed by signal {-result.returncode}"
    stderr = assert_one_line_error(result, 1, path, "truncated LMDB")
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("damage", ["zero", "truncate"])
def test_verify_cli_reports_the_damage_as_a_problem(tmp_path, damage):
    path = tmp_path / "db.lmdb"
    keys = many_record_lmdb(path)
    save_keys(tmp_path / "db_keys.npy", keys)
    if damage == "zero":
        _, first = damage_middle_leaf(path, keys)
    else:
        truncate(path)
    result = run_cli("verify", path, "-q")
    assert "Traceback" not in result.stdout + result.stderr and result.returncode == 1, result
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and not result.stderr, result  # one problem line, then the summary
    assert lines[0].startswith(f"{path}: ") and ("corrupt LMDB" in lines[0] or "truncated LMDB" in lines[0])
    assert lines[1].startswith(f"{path}: ") and lines[1].endswith(": 1 problems")
    if damage == "zero":
        assert repr(keys[first - 1]) in lines[0] and f"{first} records checked before the damage" in lines[1]
