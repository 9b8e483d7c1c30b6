"""Sharded datasets: which slice of the input a shard converts, how shards are named, and where
a launcher (torchrun, Slurm) says which shard this process is.

Every process computes the same entry list (same sort, same `--seed`) and takes one contiguous
range of it, so shards are disjoint, together hold exactly the unsharded conversion's records, and
keep its global `%08d_<path>` keys. No coordination between processes is needed: the launcher
that starts them (torchrun, a Slurm job array, a Kubernetes indexed job) is the cluster.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .errors import InputError


def shard_range(total: int, num_shards: int, index: int) -> tuple[int, int]:
    """The `[start, stop)` slice of `total` items that shard `index` of `num_shards` takes.

    Contiguous and near-equal (sizes differ by at most one), in shard order.
    """
    if num_shards < 1:
        raise InputError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= index < num_shards:
        raise InputError(f"--shard-index must be in [0, {num_shards}), got {index}")
    return total * index // num_shards, total * (index + 1) // num_shards


def shard_name(path: str | os.PathLike, index: int, num_shards: int) -> Path:
    """Insert `-IIIII-of-NNNNN` before the extension: `train.lmdb` -> `train-00001-of-00008.lmdb`.

    The same insertion applies to an explicit keys path (`k.npy` -> `k-00001-of-00008.npy`).
    """
    path = Path(path)
    suffix = path.suffix if path.suffix in (".lmdb", ".npy") else ""
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return path.with_name(f"{stem}-{index:05d}-of-{num_shards:05d}{suffix}")


def shard_from_environment(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(index, num_shards) from the launcher's variables, for `--num-shards auto`.

    Looked up in this order: torchrun's `RANK`/`WORLD_SIZE`; a Slurm job array's
    `SLURM_ARRAY_TASK_ID` (minus `SLURM_ARRAY_TASK_MIN`, so `--array=1-8` works) with
    `SLURM_ARRAY_TASK_COUNT`; Slurm tasks' `SLURM_PROCID`/`SLURM_NTASKS`; Kubernetes indexed
    jobs' `JOB_COMPLETION_INDEX` with `NUM_SHARDS` set by the job spec.

    Raises:
        InputError: none of these is set, a value is not an integer, or index >= count.
    """
    env = os.environ if environ is None else environ
    pairs = [
        ("RANK", "WORLD_SIZE", None),
        ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"),
        ("SLURM_PROCID", "SLURM_NTASKS", None),
        ("JOB_COMPLETION_INDEX", "NUM_SHARDS", None),
    ]
    for index_var, count_var, base_var in pairs:
        if index_var in env and count_var in env:
            try:
                index, count = int(env[index_var]), int(env[count_var])
                index -= int(env.get(base_var, "0")) if base_var else 0
            except ValueError:
                raise InputError(
                    f"--num-shards auto: {index_var}={env[index_var]!r} / {count_var}={env[count_var]!r} "
                    "are not integers"
                ) from None
            if count < 1 or not 0 <= index < count:
                raise InputError(f"--num-shards auto: {index_var}={env[index_var]} is not in [0, {count_var}={count})")
            return index, count
    raise InputError(
        "--num-shards auto: no launcher environment found (set RANK and WORLD_SIZE as torchrun does, "
        "or run under a Slurm job array / srun)"
    )


def local_world_size(environ: Mapping[str, str] | None = None) -> int:
    """How many shard processes share this machine (torchrun's LOCAL_WORLD_SIZE, Slurm's tasks per node)."""
    env = os.environ if environ is None else environ
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = env.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def find_shards(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Shard LMDBs from a glob pattern, a directory of shards, or an explicit list, in shard order."""
    if isinstance(paths, str | os.PathLike):
        text = os.fspath(paths)
        if glob.has_magic(text):
            found = [Path(p) for p in glob.glob(text)]
        elif Path(text).is_dir() and not (Path(text) / "data.mdb").exists():
            found = [p for p in Path(text).iterdir() if p.suffix == ".lmdb"]
        else:
            found = [Path(text)]
        found = sorted(found, key=lambda p: p.name)
    else:
        found = [Path(p) for p in paths]
    if not found:
        raise InputError(f"{paths}: no shard LMDBs found")
    return found


def resolve_shard(num_shards: int | str | None, shard_index: int | None,
                  workers: int | None = None) -> tuple[dict, int | None]:
    """`--num-shards N --shard-index I`, or `--num-shards auto` from torchrun's or Slurm's variables.

    Returns the `num_shards`/`shard_index` keywords for `convert` (empty without sharding) and the
    worker count: under a launcher (`auto`) every local rank converts, so an unset count shares
    the cores among them.

    Raises:
        InputError: an index without a count, a count without an index, or a pair out of range.
    """
    if num_shards is None:
        if shard_index is not None:
            raise InputError("--shard-index needs --num-shards")
        return {}, workers
    if num_shards == "auto":
        if shard_index is not None:
            raise InputError("--shard-index cannot be combined with --num-shards auto")
        index, count = shard_from_environment()
        if workers is None:
            workers = max(1, (os.cpu_count() or 1) // local_world_size())
        return {"num_shards": count, "shard_index": index}, workers
    try:
        count = int(num_shards)
    except ValueError:
        raise InputError(f"--num-shards must be an integer or 'auto', got {num_shards!r}") from None
    if shard_index is None:
        raise InputError("--num-shards N needs --shard-index I (or use --num-shards auto under a launcher)")
    shard_range(0, count, shard_index)  # validates the pair
    return {"num_shards": count, "shard_index": shard_index}, workers
