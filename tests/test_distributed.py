"""Sharded LMDBs read as one dataset, and a real torchrun job reading them from two ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO, save_image
from PIL import Image

from caffe_lmdb import open_shards
from caffe_lmdb.conversion import convert

SIZE = 22  # even, so DistributedSampler needs no padding


def _shards(tmp_path, count=3):
    root = tmp_path / "src"
    lines = []
    for i in range(SIZE):
        save_image(root / f"{i:02d}.png", Image.new("RGB", (4, 3), (i, 0, 0)))
        lines.append(f"{i:02d}.png {i}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    for index in range(count):
        convert(None, tmp_path / "train.lmdb", list_file=tmp_path / "list.txt", root=root, workers=1,
                num_shards=count, shard_index=index)
    return str(tmp_path / "train-*-of-00003.lmdb")


def test_open_shards_is_the_unsharded_dataset(tmp_path):
    dataset = open_shards(_shards(tmp_path))
    assert len(dataset) == SIZE
    assert [dataset[i][1] for i in range(SIZE)] == list(range(SIZE))
    assert dataset[-1][0].getpixel((0, 0)) == (SIZE - 1, 0, 0)
    assert all(part.keys_path is not None for part in dataset.datasets)


def test_torchrun_two_ranks_read_every_index_once_per_epoch(tmp_path):
    pattern = _shards(tmp_path)
    out = tmp_path / "seen.json"
    (tmp_path / "tmp").mkdir()  # torchrun's own log folder (torchelastic_*) goes there, not into /tmp
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path / "tmp")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "dist_reader.py"), pattern, str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["size"] == SIZE
    for name in ("distributed", "block"):
        epochs = []
        for epoch in (0, 1):
            ranks = report["seen"][f"{name}/{epoch}"]
            assert len(ranks) == 2 and not set(ranks[0]) & set(ranks[1])
            everything = ranks[0] + ranks[1]
            assert sorted(everything) == list(range(SIZE)), name
            epochs.append(everything)
        assert epochs[0] != epochs[1], f"{name}: epoch 1 has the order of epoch 0"
