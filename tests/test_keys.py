"""Keys: Caffe's key format, pickle-free `.npy` keys files, and the key-only LMDB scan."""

from __future__ import annotations

import lmdb
import numpy as np
import pytest

from caffe_lmdb import KeysFileError, LmdbFormatError, load_keys, make_key, save_keys, scan_keys


def test_make_key_is_caffe_format():
    assert make_key(0, "cat/1.jpg") == b"00000000_cat/1.jpg"
    assert make_key(123456789, "x y.png") == b"123456789_x y.png"
    assert make_key(3, "façade.jpg") == "00000003_façade.jpg".encode()


def test_save_and_load_keys_roundtrip_without_pickle(tmp_path):
    keys = [b"00000000_a.jpg", b"00000002_b/c d.jpg", "00000003_é.png".encode()]
    path = save_keys(tmp_path / "k.npy", keys)
    raw = np.load(path, allow_pickle=False)
    assert raw.dtype.kind == "S"
    assert load_keys(path).tolist() == keys


def test_load_str_keys(tmp_path):
    np.save(tmp_path / "k.npy", np.array(["00000000_a.jpg", "00000001_é.jpg"]))
    assert load_keys(tmp_path / "k.npy").tolist() == [b"00000000_a.jpg", "00000001_é.jpg".encode()]


def test_pickled_keys_file_is_refused(tmp_path):
    np.save(tmp_path / "k.npy", np.array([b"a", None], dtype=object), allow_pickle=True)
    with pytest.raises(KeysFileError, match="k.npy: not a pickle-free .npy"):
        load_keys(tmp_path / "k.npy")


def test_missing_and_bad_keys_files(tmp_path):
    with pytest.raises(KeysFileError, match="nope.npy: keys file not found"):
        load_keys(tmp_path / "nope.npy")
    np.save(tmp_path / "f.npy", np.zeros((2, 2)))
    with pytest.raises(KeysFileError, match="1-D"):
        load_keys(tmp_path / "f.npy")
    np.save(tmp_path / "g.npy", np.zeros(3))
    with pytest.raises(KeysFileError, match="dtype float64"):
        load_keys(tmp_path / "g.npy")


def test_scan_keys_reads_lmdb_order(tmp_path):
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        for key in (b"00000002_b", b"00000000_a", b"00000005_c"):
            txn.put(key, b"v")
    env.close()
    assert scan_keys(tmp_path / "db").tolist() == [b"00000000_a", b"00000002_b", b"00000005_c"]


def test_scan_keys_of_non_lmdb(tmp_path):
    with pytest.raises(LmdbFormatError, match="LMDB not found"):
        scan_keys(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmdbFormatError, match="no data.mdb"):
        scan_keys(tmp_path / "empty")
    (tmp_path / "file.lmdb").write_bytes(b"not an lmdb at all" * 100)
    with pytest.raises(LmdbFormatError, match="file.lmdb: not a readable LMDB"):
        scan_keys(tmp_path / "file.lmdb")
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "data.mdb").write_bytes(b"")
    with pytest.raises(LmdbFormatError, match=r"zero: not an LMDB: .*zero/data.mdb is empty \(0 bytes"):
        scan_keys(tmp_path / "zero")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "data.mdb").mkdir()
    with pytest.raises(LmdbFormatError, match="dir: not an LMDB"):
        scan_keys(tmp_path / "dir")


def test_a_garbage_lock_file_is_never_read(tmp_path):
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"00000000_a", b"v")
    env.close()
    (tmp_path / "db" / "lock.mdb").write_bytes(b"\xff" * 100)
    assert scan_keys(tmp_path / "db").tolist() == [b"00000000_a"]


def test_a_key_ending_in_nul_is_named_with_its_lmdb(tmp_path):
    with pytest.raises(KeysFileError, match=r"^key b'ab\\x00' ends with a NUL byte"):
        save_keys(tmp_path / "k.npy", [b"a", b"ab\x00"])
    assert not (tmp_path / "k.npy").exists()
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"00000000_a", b"v")
        txn.put(b"00000001_b\x00", b"v")
    env.close()
    with pytest.raises(KeysFileError) as excinfo:
        scan_keys(tmp_path / "db")
    assert str(excinfo.value).startswith(f"{tmp_path / 'db'}: key b'00000001_b\\x00' ends with a NUL byte")


def test_save_keys_never_writes_through_a_planted_link(tmp_path):
    """The temporary is created new (O_EXCL|O_NOFOLLOW): a symlink at its name is not followed."""
    import os

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / f".k.npy.tmp-{os.getpid()}").symlink_to(victim)
    (tmp_path / "k.npy").symlink_to(victim)
    save_keys(tmp_path / "k.npy", [b"00000000_a"])
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "k.npy").is_symlink() and load_keys(tmp_path / "k.npy").tolist() == [b"00000000_a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.npy", "victim.txt"]
