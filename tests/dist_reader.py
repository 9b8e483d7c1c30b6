"""Run under torchrun by test_dataset_distributed: each rank reads its share of a sharded LMDB.

Usage: torchrun --standalone --nproc_per_node=2 tests/dist_reader.py 'SHARD_GLOB' OUT.json
Every record's label is its global index, so each rank checks what it read against the sampler.
"""

import json
import sys

import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from caffe_lmdb import BlockShuffleSampler, open_shards


def main(pattern: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    dataset = open_shards(pattern, output="tensor")
    samplers = {
        "distributed": DistributedSampler(dataset, shuffle=True, seed=1),
        "block": BlockShuffleSampler(dataset, block_size=4, window=2, seed=1),
    }
    seen = {}
    for name, sampler in samplers.items():
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            order = list(sampler)
            loader = DataLoader(dataset, batch_size=3, sampler=order, num_workers=0)
            labels = [int(label) for _, batch in loader for label in batch]
            if labels != order:
                raise SystemExit(f"rank {dist.get_rank()}: read labels {labels} for indices {order}")
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, order)
            seen[f"{name}/{epoch}"] = gathered
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"size": len(dataset), "seen": seen}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
