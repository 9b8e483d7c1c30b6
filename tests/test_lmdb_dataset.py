"""LmdbDataset over any layout: detection, Datum and LSUN read back exactly, trees, workers, instant start."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import subprocess
import sys

import cv2
import lmdb
import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from caffe_lmdb import LmdbDataset, LmdbDataset_train, open_tree, write_dataset
from caffe_lmdb.errors import CorruptLmdbError, DatumError, KeysFileError, LmdbFormatError, LmdbNotFoundError
from caffe_lmdb.lmdb_dataset import find_lmdbs


def _encoded(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def _opencv_rgb(data: bytes) -> np.ndarray:
    """What the LMDB's own readers see: OpenCV's decode of the stored bytes, as RGB."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def make_lsun(path, count: int, rng, fmt: str = "JPEG", subdir: bool = True) -> dict[bytes, bytes]:
    """An LMDB as fyu/lsun writes one: SHA-1 hex keys, file bytes as values, no meta keys."""
    values = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 26, subdir=subdir)
    with env.begin(write=True) as txn:
        for i in range(count):
            pixels = rng.integers(0, 256, size=(6 + i % 3, 9, 3), dtype=np.uint8)
            data = _encoded(pixels, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
            key = hashlib.sha1(data).hexdigest().encode()
            txn.put(key, data)
            values[key] = data
    env.close()
    return values


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lsun_reads_back_opencvs_pixels_and_the_category(tmp_path, rng, fmt):
    values = make_lsun(tmp_path / "church_outdoor_train_lmdb", 12, rng, fmt)
    dataset = LmdbDataset(tmp_path / "church_outdoor_train_lmdb")
    assert dataset.layout.name == "lsun" and len(dataset) == 12
    for index, key in enumerate(sorted(values)):
        image, target = dataset[index]
        assert image.mode == "RGB" and target == "church_outdoor"
        np.testing.assert_array_equal(np.asarray(image), _opencv_rgb(values[key]))


def test_a_datum_lmdb_reads_as_lmdb_dataset_train_reads_it(tmp_path, rng):
    samples = [(rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8), i % 3) for i in range(9)]
    write_dataset(samples, tmp_path / "d.lmdb", workers=0)
    dataset = LmdbDataset(tmp_path / "d.lmdb")
    reference = LmdbDataset_train(tmp_path / "d.lmdb", keys_path=tmp_path / "d_keys.npy")
    assert dataset.layout.name == "datum" and len(dataset) == len(reference) == 9
    for index in range(9):
        image, label = dataset[index]
        expected, expected_label = reference[index]
        assert label == expected_label == samples[index][1]
        np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))


def test_a_layout_can_be_forced_by_name_and_a_wrong_one_is_one_line(tmp_path, rng):
    make_lsun(tmp_path / "bedroom_val_lmdb", 3, rng)
    assert LmdbDataset(tmp_path / "bedroom_val_lmdb", layout="lsun").layout.category == "bedroom"
    with pytest.raises(LmdbFormatError, match="does not hold the 'datum' layout"):
        LmdbDataset(tmp_path / "bedroom_val_lmdb", layout="datum")
    with pytest.raises(ValueError, match="unknown layout 'nope'; known: .*datum"):
        LmdbDataset(tmp_path / "bedroom_val_lmdb", layout="nope")


def test_an_unknown_layout_names_what_was_seen(tmp_path):
    env = lmdb.open(str(tmp_path / "odd.lmdb"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"hello", b"world")
    env.close()
    with pytest.raises(LmdbFormatError, match=r"odd.lmdb: not an image LMDB layout .*1 entries, first keys b'hello'"):
        LmdbDataset(tmp_path / "odd.lmdb")


def test_an_undecodable_value_and_a_rewritten_lmdb_are_one_line(tmp_path, rng):
    values = make_lsun(tmp_path / "x_train_lmdb", 3, rng)
    keys = sorted(values)
    env = lmdb.open(str(tmp_path / "x_train_lmdb"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(keys[1], b"not an image")
    env.close()
    dataset = LmdbDataset(tmp_path / "x_train_lmdb")
    with pytest.raises(DatumError, match=f"x_train_lmdb: key {keys[1]!r}: cannot decode"):
        dataset[1]
    # rewritten by another process while the dataset is open: its keys could read other records
    subprocess.run([sys.executable, "-c", "import lmdb, sys; env = lmdb.open(sys.argv[1]); "
                    "txn = env.begin(write=True); txn.delete(bytes.fromhex(sys.argv[2])); txn.commit()",
                    str(tmp_path / "x_train_lmdb"), keys[2].hex()], check=True)
    fresh = pickle.loads(pickle.dumps(dataset))  # a worker opening the LMDB anew
    with pytest.raises(LmdbFormatError, match="replaced or rewritten"):
        fresh[0]


def test_a_key_gone_from_the_lmdb_is_one_line(tmp_path, rng):
    values = make_lsun(tmp_path / "y_train_lmdb", 3, rng)
    dataset = LmdbDataset(tmp_path / "y_train_lmdb")
    dataset.reader.layout.keys = np.array([*sorted(values), b"f" * 40])  # a key index that lists a key too many
    with pytest.raises(KeysFileError, match="y_train_lmdb: key b'ffff.*' is not in the LMDB"):
        dataset[3]


def test_the_second_open_reads_the_key_index_instead_of_scanning(tmp_path, rng, caplog):
    make_lsun(tmp_path / "tower_train_lmdb", 5, rng)
    with caplog.at_level("INFO", logger="caffe_lmdb.key_index"):
        first = LmdbDataset(tmp_path / "tower_train_lmdb")
        assert "scanned 5 keys" in caplog.text
        caplog.clear()
        second = LmdbDataset(tmp_path / "tower_train_lmdb")
        assert "scanned" not in caplog.text
    assert first.layout.keys.tolist() == second.layout.keys.tolist()
    hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(hidden) == 1 and hidden[0].startswith(".tower_train_lmdb.keys-")


def test_a_tree_of_lmdbs_reads_as_one_in_sorted_order_with_each_source(tmp_path, rng):
    root = tmp_path / "tree"
    make_lsun(root / "b" / "cat_train_lmdb", 2, rng)
    make_lsun(root / "a" / "dog_train_lmdb", 3, rng)
    make_lsun(root / "a" / "single.mdb", 1, rng, subdir=False)
    write_dataset([(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), 7)], root / "c" / "d.lmdb", workers=0)
    (root / "notes.txt").write_text("not an LMDB")
    found = find_lmdbs(root)
    assert [p.relative_to(root).as_posix() for p in found] == [
        "a/dog_train_lmdb", "a/single.mdb", "b/cat_train_lmdb", "c/d.lmdb"]
    tree = open_tree(root)
    assert len(tree) == 7
    assert [tree[i][1] for i in range(7)][:3] == ["dog"] * 3 and tree[6][1] == 7
    assert tree.source(3).endswith("single.mdb") and tree.source(-1).endswith("d.lmdb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmdbNotFoundError, match="empty: no LMDB under this folder"):
        open_tree(tmp_path / "empty")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).copy()


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_workers_read_the_same_items(tmp_path, rng, start_method):
    make_lsun(tmp_path / "k_train_lmdb", 6, rng)
    dataset = LmdbDataset(tmp_path / "k_train_lmdb", transform=_pixels)
    here = [dataset[i] for i in range(6)]
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context=start_method)
    there = list(loader)
    for (a, ta), (b, tb) in zip(here, there, strict=True):
        assert ta == tb
        np.testing.assert_array_equal(a, np.asarray(b))
    assert pickle.loads(pickle.dumps(dataset)).layout.keys.tolist() == dataset.layout.keys.tolist()


def test_the_kept_index_skips_the_page_walk_only_while_the_file_is_unchanged(tmp_path, rng):
    path = tmp_path / "big_train_lmdb"
    make_lsun(path, 200, rng)
    LmdbDataset(path)  # scans, keeps the key index (and so vouches for the pages at this identity)
    data = bytearray((path / "data.mdb").read_bytes())
    metas = [struct.unpack_from("<QQ", data, page * 4096 + 128) for page in (0, 1)]  # (root, last_pgno)
    txnids = [struct.unpack_from("<Q", data, page * 4096 + 144)[0] for page in (0, 1)]
    root = metas[txnids.index(max(txnids))][0]
    assert struct.unpack_from("<H", data, root * 4096 + 10)[0] & 0x01, "the root should be a branch page"
    data[root * 4096 + 16:root * 4096 + 24] = bytes(8)  # its first node pointers now point into the header
    (path / "data.mdb").write_bytes(data)  # a write: a new modification time, so the walk runs again
    with pytest.raises(CorruptLmdbError, match="big_train_lmdb: corrupt LMDB: page"):
        LmdbDataset(path)


def test_a_sum_of_layouts_reads_batches_in_order_under_the_samplers(tmp_path, rng):
    from torch.utils.data import DistributedSampler

    from caffe_lmdb import BlockShuffleSampler

    make_lsun(tmp_path / "a_train_lmdb", 5, rng)
    samples = [(rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8), i) for i in range(4)]
    write_dataset(samples, tmp_path / "d.lmdb", workers=0)
    both = LmdbDataset(tmp_path / "a_train_lmdb", transform=_pixels) + LmdbDataset(tmp_path / "d.lmdb",
                                                                                    transform=_pixels)
    assert len(both) == 9
    expected = [both[i] for i in range(9)]
    batch = both.__getitems__([8, 0, 5, -1, 3])  # parts interleaved, a negative index: each part prefetches its own
    for got, index in zip(batch, [8, 0, 5, 8, 3], strict=True):
        assert got[1] == expected[index][1]
        np.testing.assert_array_equal(got[0], expected[index][0])
    for sampler in (DistributedSampler(both, num_replicas=2, rank=1, shuffle=True, seed=3),
                    BlockShuffleSampler(both, block_size=2, num_replicas=2, rank=1, seed=3)):
        order = list(sampler)
        loader = DataLoader(both, batch_size=2, sampler=sampler, num_workers=1, collate_fn=list)
        delivered = [item for batch in loader for item in batch]
        assert [target for _, target in delivered] == [expected[i][1] for i in order]
