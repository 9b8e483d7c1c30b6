"""Merging shards: byte-identical to the unsharded conversion; overlaps and class mismatches refused."""

from __future__ import annotations

import re

import numpy as np
import pytest
from lmdbread import read_all
from test_shards import _make_tree

from caffe_lmdb import load_keys
from caffe_lmdb.cli import main
from caffe_lmdb.conversion import convert
from caffe_lmdb.merging import MergeError, merge


def test_merge_equals_unsharded_conversion(tmp_path):
    src = _make_tree(tmp_path / "src")
    (src / "c1" / "bad.png").write_bytes(b"junk")
    convert(src, tmp_path / "whole.lmdb", shuffle=True, seed=3, workers=1)
    for index in range(3):
        convert(src, tmp_path / "part.lmdb", shuffle=True, seed=3, workers=1, num_shards=3, shard_index=index)
    assert main(["merge", str(tmp_path / "part-*-of-00003.lmdb"), "-o", str(tmp_path / "merged.lmdb"), "-q"]) == 0
    assert read_all(tmp_path / "merged.lmdb") == read_all(tmp_path / "whole.lmdb")
    assert (tmp_path / "merged_keys.npy").read_bytes() == (tmp_path / "whole_keys.npy").read_bytes()
    assert (tmp_path / "merged_classes.txt").read_text() == (tmp_path / "whole_classes.txt").read_text()
    assert (tmp_path / "merged_skipped.txt").read_text() == (tmp_path / "whole_skipped.txt").read_text()


def test_overlapping_shards_are_refused_and_nothing_is_written(tmp_path):
    src = _make_tree(tmp_path / "src", 4)
    convert(src, tmp_path / "a.lmdb", workers=1)
    convert(src, tmp_path / "b.lmdb", workers=1, num_shards=2, shard_index=1)
    with pytest.raises(MergeError, match=r"key b'00000002_c1/01.png' is in both .*a.lmdb and .*b-00001-of-00002.lmdb"):
        merge([tmp_path / "a.lmdb", tmp_path / "b-00001-of-00002.lmdb"], tmp_path / "m.lmdb")
    assert not (tmp_path / "m.lmdb").exists() and not (tmp_path / "m_keys.npy").exists()


def test_different_class_lists_are_refused(tmp_path, capsys):
    src = _make_tree(tmp_path / "src", 4)
    convert(src, tmp_path / "a.lmdb", workers=1, num_shards=2, shard_index=0)
    convert(src, tmp_path / "a.lmdb", workers=1, num_shards=2, shard_index=1)
    (tmp_path / "a-00001-of-00002_classes.txt").write_text("x\ny\nz\n")
    assert main(["merge", str(tmp_path / "a-*.lmdb"), "-o", str(tmp_path / "m.lmdb"), "-q"]) == 1
    assert "have different class lists" in capsys.readouterr().err


def test_merge_output_exists(tmp_path, capsys):
    src = _make_tree(tmp_path / "src", 4)
    convert(src, tmp_path / "a.lmdb", workers=1)
    assert main(["merge", str(tmp_path / "a.lmdb"), "-o", str(tmp_path / "a.lmdb"), "-q"]) == 2
    assert "the output is the input" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "a.lmdb"), "-o", str(tmp_path / "b.lmdb"), "-q"]) == 0
    assert load_keys(tmp_path / "b_keys.npy").tolist() == load_keys(tmp_path / "a_keys.npy").tolist()


@pytest.mark.parametrize("damage", ["zeroed-leaf", "truncated"])
def test_damaged_shard_names_the_shard_and_writes_nothing(tmp_path, damage):
    from conftest import caffe_key, caffe_raw_datum, write_lmdb
    from test_corruption import damage_middle_leaf, many_record_lmdb, truncate

    from caffe_lmdb.errors import CorruptLmdbError

    good = write_lmdb(tmp_path / "a-00000-of-00002.lmdb", {
        caffe_key(1000, "x.png"): caffe_raw_datum(np.zeros((5, 7, 3), np.uint8), 0).SerializeToString()})
    bad = tmp_path / "a-00001-of-00002.lmdb"
    keys = many_record_lmdb(bad)
    if damage == "truncated":
        truncate(bad)
        expected = re.escape(f"{bad}: truncated LMDB")
    else:
        _, first = damage_middle_leaf(bad, keys)
        expected = re.escape(f"{bad}: corrupt LMDB: ") + ".*" + re.escape(f"before it is key {keys[first - 1]!r}")
    with pytest.raises(CorruptLmdbError, match=expected):
        merge([good, bad], tmp_path / "m.lmdb")
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name, bad.name]
