"""The cached key index: scanned once, kept by identity beside the LMDB or in the user cache, never in the cwd."""

from __future__ import annotations

import lmdb
import numpy as np

from caffe_lmdb.key_index import cached_keys, index_paths, load_index, save_index
from caffe_lmdb.safe_lmdb import data_file, file_identity


def _lmdb(path, count: int) -> tuple[str, tuple[int, ...]]:
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(count):
            txn.put(b"k%05d" % i, b"v")
    env.close()
    return str(path), file_identity(data_file(path))


def test_the_first_call_scans_and_keeps_the_keys_and_the_second_reads_them(tmp_path):
    path, identity = _lmdb(tmp_path / "a.lmdb", 50)
    scans = []

    def scan():
        scans.append(1)
        return [b"k%05d" % i for i in range(50)]

    first = cached_keys(path, identity, 50, scan)
    second = cached_keys(path, identity, 50, scan)
    assert len(scans) == 1
    assert first.tolist() == second.tolist() == [b"k%05d" % i for i in range(50)]
    beside = index_paths(path, identity)[0]
    assert beside.parent == tmp_path and beside.name.startswith(".a.lmdb.keys-") and beside.is_file()
    assert isinstance(second, np.memmap)  # memory-mapped: no copy, pages shared by forked workers


def test_a_changed_lmdb_is_scanned_again_and_the_old_index_removed(tmp_path):
    path, identity = _lmdb(tmp_path / "a.lmdb", 5)
    save_index(path, identity, np.array([b"k%05d" % i for i in range(5)]))
    env = lmdb.open(path, map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"new", b"v")
    env.close()
    changed = file_identity(data_file(path))
    assert changed != identity
    assert load_index(path, changed, 6) is None
    keys = cached_keys(path, changed, 6, lambda: [b"k%05d" % i for i in range(5)] + [b"new"])
    assert len(keys) == 6
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".npy"] == [index_paths(path, changed)[0].name]


def test_an_index_of_another_length_is_ignored(tmp_path):
    path, identity = _lmdb(tmp_path / "a.lmdb", 5)
    save_index(path, identity, np.array([b"x"] * 3))
    assert load_index(path, identity, 5) is None


def test_an_unwritable_folder_keeps_the_index_in_the_user_cache_not_the_cwd(tmp_path, monkeypatch, read_only_folder):
    folder, freeze = read_only_folder
    path, identity = _lmdb(folder / "a.lmdb", 5)
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    freeze()
    saved = save_index(path, identity, np.array([b"k%05d" % i for i in range(5)]))
    assert saved is not None and saved.parent == cache / "caffe-lmdb"
    assert load_index(path, identity, 5).tolist()[0] == b"k00000"
    assert sorted(p.name for p in folder.iterdir()) == ["a.lmdb"]
    assert list(cwd.iterdir()) == []


def test_nothing_writable_still_reads(tmp_path, monkeypatch, read_only_folder):
    folder, freeze = read_only_folder
    path, identity = _lmdb(folder / "a.lmdb", 3)
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder / "cache"))  # inside the read-only folder: unwritable too
    freeze()
    assert cached_keys(path, identity, 3, lambda: [b"a", b"b", b"c"]).tolist() == [b"a", b"b", b"c"]


def test_keep_false_reads_a_kept_index_but_keeps_none(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path, identity = _lmdb(tmp_path / "a.lmdb", 5)
    keys = [b"k%05d" % i for i in range(5)]
    assert cached_keys(path, identity, 5, lambda: keys, keep=False).tolist() == keys
    assert all(not candidate.exists() for candidate in index_paths(path, identity))
    cached_keys(path, identity, 5, lambda: keys)
    assert cached_keys(path, identity, 5, lambda: [], keep=False).tolist() == keys  # the kept one is read
