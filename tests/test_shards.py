"""Sharded conversion: disjoint shards that together are the unsharded conversion, launcher variables."""

from __future__ import annotations

import itertools

import pytest
from lmdbread import read_all

from caffe_lmdb import load_keys
from caffe_lmdb.cli import main
from caffe_lmdb.conversion import convert
from caffe_lmdb.shards import find_shards, shard_from_environment, shard_name, shard_range
from caffe_lmdb.sources import InputError


def test_shard_ranges_are_contiguous_near_equal_and_cover_everything():
    for total in (0, 1, 7, 10, 1001):
        for count in (1, 2, 3, 8):
            ranges = [shard_range(total, count, i) for i in range(count)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
            sizes = [stop - start for start, stop in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_shard_names():
    assert shard_name("out/train.lmdb", 1, 8).as_posix() == "out/train-00001-of-00008.lmdb"
    assert shard_name("k.npy", 0, 2).as_posix() == "k-00000-of-00002.npy"
    assert shard_name("db", 3, 4).as_posix() == "db-00003-of-00004"


@pytest.mark.parametrize(("environ", "expected"), [
    ({"RANK": "1", "WORLD_SIZE": "4"}, (1, 4)),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8"}, (3, 8)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_MIN": "1"}, (4, 8)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, (0, 2)),
    ({"RANK": "2", "WORLD_SIZE": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "9"}, (2, 3)),
])
def test_shard_from_environment(environ, expected):
    assert shard_from_environment(environ) == expected


@pytest.mark.parametrize(("environ", "message"), [
    ({}, "no launcher environment found"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, r"RANK=4 is not in \[0, WORLD_SIZE=4\)"),
    ({"RANK": "x", "WORLD_SIZE": "4"}, "are not integers"),
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "8"}, "not in"),
])
def test_shard_environment_errors(environ, message):
    with pytest.raises(InputError, match=message):
        shard_from_environment(environ)


def _make_tree(root, count=10):
    from conftest import save_image
    from PIL import Image

    for i in range(count):
        save_image(root / f"c{i % 3}" / f"{i:02d}.png", Image.new("RGB", (3 + i, 2), (i, 2 * i, 3 * i)))
    return root


@pytest.mark.parametrize("shuffle", [False, True])
def test_union_of_shards_is_the_unsharded_conversion(tmp_path, shuffle):
    src = _make_tree(tmp_path / "src")
    whole = convert(src, tmp_path / "whole.lmdb", shuffle=shuffle, seed=7, workers=1)
    union = {}
    for index in range(3):
        result = convert(src, tmp_path / "part.lmdb", shuffle=shuffle, seed=7, workers=1, num_shards=3,
                         shard_index=index)
        assert result.output.name == f"part-{index:05d}-of-00003.lmdb"
        records = read_all(result.output)
        assert load_keys(tmp_path / f"part-{index:05d}-of-00003_keys.npy").tolist() == [k for k, _ in records]
        assert (tmp_path / f"part-{index:05d}-of-00003_classes.txt").read_text() == "c0\nc1\nc2\n"
        assert not set(union) & {k for k, _ in records}
        union.update(records)
    assert whole.written == len(union)
    assert sorted(union.items()) == read_all(tmp_path / "whole.lmdb")


def test_cli_auto_sharding_from_torchrun_and_slurm(tmp_path, monkeypatch, capsys):
    src = _make_tree(tmp_path / "src", 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["convert", str(src), str(tmp_path / "t.lmdb"), "--num-shards", "auto", "-q",
                 "--keys", str(tmp_path / "k.npy")]) == 0
    assert load_keys(tmp_path / "k-00001-of-00002.npy").tolist() == [b"00000002_c1/01.png", b"00000003_c2/02.png"]
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert main(["convert", str(src), str(tmp_path / "s.lmdb"), "--num-shards", "auto", "-q"]) == 0
    assert (tmp_path / "s-00000-of-00002.lmdb").is_dir()


def test_cli_sharding_usage_errors(tmp_path, monkeypatch, capsys):
    src = _make_tree(tmp_path / "src", 4)
    for var in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "JOB_COMPLETION_INDEX"):
        monkeypatch.delenv(var, raising=False)
    cases = [
        (["--num-shards", "auto"], "no launcher environment found"),
        (["--num-shards", "2"], "needs --shard-index"),
        (["--num-shards", "2", "--shard-index", "2"], "must be in [0, 2)"),
        (["--shard-index", "0"], "--shard-index needs --num-shards"),
        (["--num-shards", "x", "--shard-index", "0"], "integer or 'auto'"),
    ]
    for args, message in cases:
        assert main(["convert", str(src), str(tmp_path / "o.lmdb"), "-q", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_find_shards(tmp_path):
    for i in range(3):
        (tmp_path / f"t-{i:05d}-of-00003.lmdb").mkdir()
    pattern = str(tmp_path / "t-*-of-00003.lmdb")
    assert [p.name for p in find_shards(pattern)] == [f"t-{i:05d}-of-00003.lmdb" for i in range(3)]
    with pytest.raises(InputError, match="no shard LMDBs found"):
        find_shards(str(tmp_path / "nothing-*.lmdb"))
