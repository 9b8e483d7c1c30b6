"""Benchmarks behind `make bench`: reading and conversion speed as ratios against baselines run in
the same process, on data the benchmark generates itself.

Absolute samples/s depend on the machine; the ratios (our path over a baseline measured seconds
apart on the same files) are what the targets are about, and what `bench-results.json` records.
Every figure is the median of several passes over a warm page cache unless it says otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
from PIL import Image

from benchmarks.common import children, ensure_images, machine, memory_kib, read_all
from caffe_lmdb.allocator import retained_heap
from caffe_lmdb.conversion import convert
from caffe_lmdb.encode import ConvertOptions
from caffe_lmdb.proto import caffe_pb2


@dataclass
class BenchConfig:
    """What to run. `quick` is the ~1 minute smoke-sized run; the full run takes a few minutes."""

    workdir: Path
    n: int = 5000
    passes: int = 3
    scale_sizes: Sequence[int] = (1000, 5000, 20000)
    classes: int = 10
    seed: int = 0
    sections: Sequence[str] = ("reading", "conversion", "scale", "training", "continuing", "instant", "resume",
                               "encoded")
    training_n: int = 2000  # records of the training-path section (raw 256x256, as CaffeNet's LMDBs)
    continuing_n: int = 12000  # list-file lines of the write_dataset / --resume section
    cold_n: int = 11000  # 11000 raw 256x256 records: 2.1 GB
    cold_count: int = 4000
    instant_keys: int = 200_000  # keys of the instant-start section's LSUN-layout LMDB
    resume_records: int = 20_000  # records of the resume section's LMDB
    resume_sampler_records: int = 1_281_167  # the resume section's samplers alone: ImageNet's train set
    encoded_n: int = 2000  # ImageNet-like JPEGs of the encoded training path section
    results: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls, workdir: Path, n: int = 500) -> BenchConfig:
        return cls(workdir=workdir, n=n, passes=3, scale_sizes=(max(n // 5, 10), max(n // 2, 20), n),
                   training_n=n, continuing_n=max(n, 40), instant_keys=max(4 * n, 100),
                   resume_records=max(4 * n, 200), resume_sampler_records=max(100 * n, 10_000), encoded_n=n)


# --------------------------------------------------------------------------- timing

def median_rate(run: Callable[[], int], setup: Callable[[], None] | None = None, *, passes: int) -> float:
    """Items per second: the median over `passes` runs of `run()`, which returns its item count.

    `setup`, when given, runs before each pass, untimed.
    """
    rates = []
    for _ in range(passes):
        if setup is not None:
            setup()
        start = time.perf_counter()
        count = run()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def pil_to_tensor(image: Image.Image):
    """A picklable transform for DataLoader workers: PIL image -> C x H x W uint8 tensor."""
    import torch

    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


# --------------------------------------------------------------------------- reading

def bench_reading(files: Sequence[Path], raw: Path, encoded: Path, passes: int, seed: int = 0) -> dict[str, Any]:
    """Samples/s of A..G (see the table in docs/benchmarks.md) over one fixed random order."""
    import torch

    from caffe_lmdb.dataset import LmdbDataset_train
    from caffe_lmdb.files import default_keys_path

    order = np.random.default_rng(seed).permutation(len(files))
    files = [files[i] for i in order]
    keys = np.load(default_keys_path(raw), allow_pickle=False)[order].tolist()
    read_all(raw)
    read_all(encoded)

    def a_imagefolder() -> int:
        for path in files:
            with Image.open(path) as image:
                image.convert("RGB")
        return len(files)

    env = lmdb.open(str(raw), readonly=True, lock=False, readahead=False)

    def b_floor() -> int:
        with env.begin() as txn:
            for key in keys:
                datum = caffe_pb2.Datum()
                datum.ParseFromString(txn.get(key))
                np.frombuffer(datum.data, np.uint8).reshape(datum.channels, datum.height, datum.width)
        return len(keys)

    def c_seed_recipe() -> int:
        with env.begin() as txn:
            for key in keys:
                datum = caffe_pb2.Datum()
                datum.ParseFromString(txn.get(key))
                size, plane = (datum.width, datum.height), datum.height * datum.width
                b, g, r = (Image.frombytes("L", size, datum.data[i * plane:(i + 1) * plane]) for i in range(3))
                Image.merge("RGB", (r, g, b))
        return len(keys)

    results: dict[str, Any] = {}
    results["A_imagefolder"] = median_rate(a_imagefolder, passes=passes)
    results["B_floor"] = median_rate(b_floor, passes=passes)
    results["C_seed_recipe"] = median_rate(c_seed_recipe, passes=passes)
    env.close()

    datasets = {
        "D_dataset_pil": LmdbDataset_train(raw, None, default_keys_path(raw)),
        "E_dataset_tensor": LmdbDataset_train(raw, None, default_keys_path(raw), output="tensor"),
        "F_dataset_encoded": LmdbDataset_train(encoded, None, default_keys_path(encoded)),
    }
    indices = order.tolist()
    for name, dataset in datasets.items():
        def read(dataset=dataset) -> int:
            for i in indices:
                dataset[i]
            return len(indices)
        results[name] = median_rate(read, passes=passes)

    loaders = {
        "G_loader_pil": LmdbDataset_train(raw, pil_to_tensor, default_keys_path(raw)),
        "G_loader_tensor": datasets["E_dataset_tensor"],
    }
    for name, dataset in loaders.items():
        def load(dataset=dataset) -> int:
            loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=2, sampler=indices)
            return sum(len(labels) for _, labels in loader)
        results[name] = median_rate(load, passes=passes)

    results["ratios"] = {
        "D/C": results["D_dataset_pil"] / results["C_seed_recipe"],
        "E/B": results["E_dataset_tensor"] / results["B_floor"],
        "D/A": results["D_dataset_pil"] / results["A_imagefolder"],
        "E/A": results["E_dataset_tensor"] / results["A_imagefolder"],
        "F/A": results["F_dataset_encoded"] / results["A_imagefolder"],
    }
    return results


# --------------------------------------------------------------------------- conversion

def bench_conversion(src: Path, workdir: Path, files: Sequence[Path], passes: int) -> dict[str, Any]:
    """Images/s of decode-only, raw conversion in this process and with 1 and 2 worker
    processes, and encoded conversion (1 worker).

    All under the converter's allocator setting (`retained_heap`), so that the decode-only
    baseline gets the same reuse of freed memory as the conversions (it is 1.1-1.8x faster with it).
    """
    with retained_heap():
        return _bench_conversion(src, workdir, files, passes)


def _bench_conversion(src: Path, workdir: Path, files: Sequence[Path], passes: int) -> dict[str, Any]:
    from caffe_lmdb.files import SIDE_FILES, sidecar_path

    def decode_only() -> int:
        for path in files:
            with Image.open(path) as image:
                image.convert("RGB")
        return len(files)

    def converter(name: str, **kwargs) -> tuple[Callable[[], int], Callable[[], None]]:
        out = workdir / f"{name}.lmdb"

        def remove_previous() -> None:  # not timed: deleting a 1 GB LMDB is not converting
            shutil.rmtree(out, ignore_errors=True)
            for name in SIDE_FILES:  # a side file left beside no LMDB is refused, as a user's file would be
                sidecar_path(out, name).unlink(missing_ok=True)

        def run() -> int:
            return convert(src, out, progress=False, **kwargs).written

        return run, remove_previous

    results: dict[str, Any] = {
        "decode_only": median_rate(decode_only, passes=passes),
        "raw_in_process": median_rate(*converter("conv_w0", workers=0), passes=passes),
        "raw_workers1": median_rate(*converter("conv_w1", workers=1), passes=passes),
        "raw_workers2": median_rate(*converter("conv_w2", workers=2), passes=passes),
        "encoded_workers1": median_rate(*converter("conv_enc", workers=1, options=ConvertOptions(encoded=True)),
                                        passes=passes),
    }
    results["ratios"] = {
        "raw w2/w1": results["raw_workers2"] / results["raw_workers1"],
        "raw w1/decode": results["raw_workers1"] / results["decode_only"],
        "encoded/raw w1": results["encoded_workers1"] / results["raw_workers1"],
    }
    return results


# --------------------------------------------------------------------------- scale

def bench_scale(files: Sequence[Path], workdir: Path, sizes: Sequence[int], seed: int) -> dict[str, Any]:
    """Conversion time and size by N; dataset construction with/without keys; DataLoader memory by epoch."""
    import torch

    from caffe_lmdb.dataset import LmdbDataset_train
    from caffe_lmdb.files import default_keys_path

    results: dict[str, Any] = {"conversion": []}
    biggest = None
    for size in sizes:
        src = workdir / f"scale_src_{size}"
        shutil.rmtree(src, ignore_errors=True)
        for path in files[:size]:
            target = src / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
        out = workdir / f"scale_{size}.lmdb"
        result = convert(src, out, overwrite=True, progress=False)
        results["conversion"].append({
            "n": result.written, "seconds": result.seconds, "images_per_s": result.images_per_second,
            "lmdb_mib": (out / "data.mdb").stat().st_size / 2**20,
        })
        shutil.rmtree(src)
        biggest = out

    def construct(keys: bool) -> float:
        import gc

        times = []
        for _ in range(3):
            gc.collect()
            start = time.perf_counter()
            LmdbDataset_train(biggest, None, default_keys_path(biggest) if keys else None)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    results["construct_seconds"] = {"n": sizes[-1], "keys_file": construct(True), "scan": construct(False)}

    dataset = LmdbDataset_train(biggest, None, default_keys_path(biggest), output="tensor")
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=2, shuffle=True,
                                         persistent_workers=True, generator=torch.Generator().manual_seed(seed))
    epochs = []
    for epoch in range(3):
        peak = [0, 0, 0]
        for step, _ in enumerate(loader):
            if step % 4 == 0:
                pids = [os.getpid(), *children(os.getpid())]
                sample = [sum(column) for column in zip(*(memory_kib(pid) for pid in pids), strict=True)]
                peak = [max(a, b) for a, b in zip(peak, sample, strict=True)]
        epochs.append({"epoch": epoch, "peak_rss_mib": peak[0] / 1024, "peak_pss_mib": peak[1] / 1024,
                       "peak_anonymous_mib": peak[2] / 1024})
    del loader
    results["loader_memory"] = epochs
    return results


# --------------------------------------------------------------------------- cold reads (bigger than RAM)

def evict_from_page_cache(path: Path) -> None:
    """Drop a file's pages from the page cache; only pages no process has mapped can go."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold_pass(spec: dict[str, Any]) -> dict[str, Any]:
    """One cold pass, run in a fresh process (`python -c`): evict, then read `count` samples.

    spec: lmdb, keys, order ("sequential", "random", "block", or "disk" for plain 1 MiB reads of
    data.mdb), count, workers, readahead, prefetch, seed.
    """
    import torch

    data = Path(spec["lmdb"]) / "data.mdb"
    evict_from_page_cache(data)
    if spec["order"] == "disk":
        record = spec["record_bytes"]
        start = time.perf_counter()
        read = 0
        with open(data, "rb", buffering=0) as f:
            while read < spec["count"] * record and (chunk := f.read(1 << 20)):
                read += len(chunk)
        seconds = time.perf_counter() - start
        return {"samples_per_s": read / record / seconds, "mib_per_s": read / 2**20 / seconds}

    from caffe_lmdb.dataset import LmdbDataset_train
    from caffe_lmdb.samplers import BlockShuffleSampler

    dataset = LmdbDataset_train(spec["lmdb"], None, spec["keys"], output="tensor",
                                readahead=spec["readahead"], prefetch=spec["prefetch"])
    size, count = len(dataset), spec["count"]
    if spec["order"] == "sequential":
        order = list(range(count))
    elif spec["order"] == "random":
        order = np.random.default_rng(spec["seed"]).permutation(size)[:count].tolist()
    else:
        order = list(BlockShuffleSampler(dataset, num_replicas=1, rank=0, seed=spec["seed"]))[:count]
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, sampler=order, num_workers=spec["workers"])
    start = time.perf_counter()
    seen = sum(len(labels) for _, labels in loader)
    seconds = time.perf_counter() - start
    return {"samples_per_s": seen / seconds}


def _run_cold_pass(spec: dict[str, Any]) -> dict[str, Any]:
    import subprocess
    import sys

    code = f"import json; from benchmarks.bench import cold_pass; print(json.dumps(cold_pass({spec!r})))"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_cold(files: Sequence[Path], workdir: Path, n: int, count: int, seed: int = 0) -> dict[str, Any]:
    """Cold-cache reading by order and reader settings, beside the disk's own sequential speed;
    and sharded conversion and merge against an unsharded run and a plain copy."""
    import subprocess
    import sys

    from caffe_lmdb.files import default_keys_path

    src = workdir / f"cold_src_{n}"
    if not src.is_dir() or len(list(src.glob("class*/*.jpg"))) != n:
        shutil.rmtree(src, ignore_errors=True)
        for path in files[:n]:
            target = src / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    results: dict[str, Any] = {"n": n, "count": count}

    out = workdir / "cold.lmdb"
    start = time.perf_counter()
    written = convert(src, out, overwrite=True, progress=False).written
    results["convert_unsharded_s"] = time.perf_counter() - start
    results["lmdb_gib"] = (out / "data.mdb").stat().st_size / 2**30
    record_bytes = (out / "data.mdb").stat().st_size / written

    tool = Path(__file__).resolve().parents[1] / "tools" / "convert.py"
    for old in workdir.glob("cold_shard*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(tool), str(src), str(workdir / "cold_shard.lmdb"), "-q",
                               "--num-shards", "2", "--shard-index", str(i), "--workers", "1"],
                              stdout=subprocess.DEVNULL) for i in range(2)]
    if any(p.wait() for p in procs):
        raise RuntimeError("a shard conversion failed")
    results["convert_2_shards_parallel_s"] = time.perf_counter() - start
    from caffe_lmdb.merging import merge

    start = time.perf_counter()
    merge(sorted(workdir.glob("cold_shard-*.lmdb")), workdir / "cold_merged.lmdb", overwrite=True,
                progress=False)
    results["merge_s"] = time.perf_counter() - start
    start = time.perf_counter()
    shutil.copyfile(out / "data.mdb", workdir / "cold_copy.mdb")
    os.sync()
    results["plain_copy_s"] = time.perf_counter() - start
    for old in [*workdir.glob("cold_shard*"), workdir / "cold_merged.lmdb", workdir / "cold_copy.mdb"]:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)

    base = {"lmdb": str(out), "keys": str(default_keys_path(out)), "count": count, "seed": seed,
            "record_bytes": record_bytes, "readahead": None, "prefetch": True, "workers": 0}
    passes = {"disk limit (1 MiB reads)": {"order": "disk"}}
    for workers in (0, 2):
        for order in ("sequential", "random", "block"):
            passes[f"{order}, workers={workers}"] = {"order": order, "workers": workers}
    passes["random, no readahead, no prefetch (common recipe)"] = {
        "order": "random", "readahead": False, "prefetch": False, "count": max(count // 8, 64)}
    passes["block, no readahead, no prefetch"] = {"order": "block", "readahead": False, "prefetch": False}
    passes["random, readahead, no prefetch"] = {"order": "random", "readahead": True, "prefetch": False}
    results["passes"] = {name: _run_cold_pass({**base, **spec}) for name, spec in passes.items()}
    disk = results["passes"]["disk limit (1 MiB reads)"]["samples_per_s"]
    rates = {name: value["samples_per_s"] for name, value in results["passes"].items()}
    results["ratios"] = {
        "block/sequential": rates["block, workers=0"] / rates["sequential, workers=0"],
        "block/disk": rates["block, workers=0"] / disk,
        "sequential/disk": rates["sequential, workers=0"] / disk,
    }
    return results


# --------------------------------------------------------------------------- report

TARGETS = {
    "D/C": 1.0, "E/B": 0.9, "D/A": 5.0, "F/A": 0.9,
    "raw w2/w1": 1.6, "raw w1/decode": 0.7, "encoded/raw w1": 5.0,
    "block/sequential": 0.8, "block/disk": 0.5, "sequential/disk": 0.7,
}


def format_report(results: dict[str, Any]) -> str:
    """The table `make bench` prints (and docs/benchmarks.md shows)."""
    lines = [f"caffe-lmdb benchmark: N={results['n']} 256x256 JPEGs, {results['machine']}", ""]
    ratios = {}
    for section in ("reading", "conversion"):
        if section not in results:
            continue
        unit = "samples/s" if section == "reading" else "images/s"
        lines.append(f"{section} ({unit}, median of {results['passes']} passes)")
        for name, value in results[section].items():
            if name != "ratios":
                lines.append(f"  {name:<22} {value:>10.0f}")
        ratios.update(results[section]["ratios"])
        lines.append("")
    if ratios:
        lines.append("ratios              measured   target")
        for name, value in ratios.items():
            target = TARGETS.get(name)
            if target is None:
                lines.append(f"  {name:<16} {value:>9.2f}")
                continue
            verdict = "ok" if value >= target else f"MISSED by {100 * (1 - value / target):.0f}%"
            lines.append(f"  {name:<16} {value:>9.2f}   >= {target:<4}  {verdict}")
        lines.append("")
    if "scale" in results:
        scale = results["scale"]
        lines.append("scale: conversion by N")
        for row in scale["conversion"]:
            lines.append(f"  N={row['n']:<6} {row['seconds']:7.2f} s  {row['images_per_s']:7.0f} images/s"
                         f"  {row['lmdb_mib']:8.1f} MiB")
        construct = scale["construct_seconds"]
        lines.append(f"  dataset construction at N={construct['n']}: keys file {construct['keys_file'] * 1e3:.1f} ms,"
                     f" key scan {construct['scan'] * 1e3:.1f} ms")
        lines.append("  DataLoader(num_workers=2), peak memory of main + workers per epoch:")
        for row in scale["loader_memory"]:
            lines.append(
                f"    epoch {row['epoch']}: RSS {row['peak_rss_mib']:.0f} MiB, PSS {row['peak_pss_mib']:.0f} MiB, "
                f"anonymous {row['peak_anonymous_mib']:.0f} MiB"
            )
    if "cold" in results:
        cold = results["cold"]
        lines.append("")
        lines.append(f"cold reads: {cold['lmdb_gib']:.2f} GiB LMDB of {cold['n']} raw 256x256 records, evicted "
                     f"from the page cache before each pass (fresh process), {cold['count']} samples per pass")
        for name, value in cold["passes"].items():
            extra = f"  ({value['mib_per_s']:.0f} MiB/s)" if "mib_per_s" in value else ""
            lines.append(f"  {name:<52} {value['samples_per_s']:>8.0f} samples/s{extra}")
        for name, value in cold["ratios"].items():
            target = TARGETS[name]
            verdict = "ok" if value >= target else f"MISSED by {100 * (1 - value / target):.0f}%"
            lines.append(f"  {name:<16} {value:>9.2f}   >= {target:<4}  {verdict}")
        lines.append(f"  conversion of {cold['n']} images: unsharded {cold['convert_unsharded_s']:.1f} s, 2 shards in "
                     f"parallel {cold['convert_2_shards_parallel_s']:.1f} s; merge {cold['merge_s']:.1f} s vs plain "
                     f"copy {cold['plain_copy_s']:.1f} s")
    if "training" in results:
        from benchmarks.training import format_report as training_report

        lines += ["", training_report(results["training"])]
    if "continuing" in results:
        from benchmarks.continuing import format_report as continuing_report

        lines += ["", continuing_report(results["continuing"])]
    if "instant" in results:
        from benchmarks.instant_start import format_report as instant_report

        lines += ["", instant_report(results["instant"])]
    if "resume" in results:
        from benchmarks.resume_state import format_report as resume_report

        lines += ["", resume_report(results["resume"])]
    if "encoded" in results:
        from benchmarks.encoded_training import format_report as encoded_report

        lines += ["", encoded_report(results["encoded"])]
    return "\n".join(lines)


def run_benchmarks(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Generate the data, convert it, run the sections; returns the results dict (JSON-ready)."""
    workdir = config.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    n_images = max(config.n, *(config.scale_sizes if "scale" in config.sections else ()),
                   config.cold_n if "cold" in config.sections else 0)
    log(f"generating {n_images} images in {workdir / 'src'} ...")
    all_files = ensure_images(workdir / "src", n_images, config.classes, config.seed)
    files = all_files[: config.n]
    src = workdir / "bench_src"
    if not src.is_dir() or len(list(src.glob("class*/*.jpg"))) != len(files):
        shutil.rmtree(src, ignore_errors=True)
        for path in files:
            target = src / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    files = sorted(src.glob("class*/*.jpg"))
    results: dict[str, Any] = {"n": len(files), "machine": machine(), "passes": config.passes}
    raw, encoded = workdir / "raw.lmdb", workdir / "encoded.lmdb"
    log("converting (raw and encoded) ...")
    convert(src, raw, overwrite=True, progress=False)
    convert(src, encoded, overwrite=True, progress=False, options=ConvertOptions(encoded=True))
    if "reading" in config.sections:
        log("reading ...")
        results["reading"] = bench_reading(files, raw, encoded, config.passes, config.seed)
    if "conversion" in config.sections:
        log("conversion ...")
        results["conversion"] = bench_conversion(src, workdir, files, config.passes)
    if "scale" in config.sections:
        log(f"scale (N = {', '.join(map(str, config.scale_sizes))}) ...")
        results["scale"] = bench_scale(all_files, workdir, config.scale_sizes, config.seed)
    if "cold" in config.sections:
        log(f"cold reads ({config.cold_n} records) ...")
        results["cold"] = bench_cold(all_files, workdir, config.cold_n, config.cold_count, config.seed)
    if "training" in config.sections:
        from benchmarks.training import bench_training  # it imports torch: only when the section runs

        results["training"] = bench_training(workdir, config.training_n, max(config.passes, 3), config.seed, log=log)
    if "continuing" in config.sections:
        from benchmarks.continuing import bench_continuing

        log(f"write_dataset and --resume ({config.continuing_n} images) ...")
        results["continuing"] = bench_continuing(workdir, config.continuing_n, config.passes)
    if "instant" in config.sections:
        from benchmarks.instant_start import bench_instant_start

        log(f"instant start ({config.instant_keys} keys) ...")
        instant = workdir / "instant"
        shutil.rmtree(instant, ignore_errors=True)
        instant.mkdir()
        results["instant"] = bench_instant_start(instant, config.instant_keys, max(config.passes, 3))
        shutil.rmtree(instant, ignore_errors=True)
    if "resume" in config.sections:
        from benchmarks.resume_state import bench_resume_state  # it imports torch: only when the section runs

        log(f"resume ({config.resume_records} records) ...")
        resume = workdir / "resume"
        shutil.rmtree(resume, ignore_errors=True)
        resume.mkdir()
        results["resume"] = bench_resume_state(resume, config.resume_records, max(config.passes, 3),
                                               config.resume_sampler_records)
        shutil.rmtree(resume, ignore_errors=True)
    if "encoded" in config.sections:
        from benchmarks.encoded_training import bench_encoded_training  # torch, simplejpeg: only when it runs

        results["encoded"] = bench_encoded_training(workdir, config.encoded_n, config.passes, config.seed, log=log)
    return results


def write_results(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """`python tools/bench.py [--quick]`: run, print the table, write the JSON."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="Measure reading and conversion against baselines in one run. "
        "Example: python tools/bench.py --quick",
    )
    parser.add_argument("--quick", action="store_true", help="~1 minute run (N=500) instead of the full one")
    parser.add_argument("--n", type=int, help="images to generate (default 5000, --quick 500)")
    parser.add_argument("--passes", type=int, help="passes per measurement (median; default 3)")
    parser.add_argument("--sections", default="reading,conversion,scale,training,continuing,instant,resume,encoded",
                        help="comma-separated: reading, conversion, scale, training, continuing, instant, resume, "
                        "encoded, cold")
    parser.add_argument("--cold", action="store_true",
                        help="add the cold-read section: a >= 2 GB LMDB evicted from the page cache before each pass")
    parser.add_argument("--cold-n", type=int, default=11000,
                        help="records in the cold-read LMDB (default 11000: 2.1 GB)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-data"), help="where data and LMDBs go")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"), help="results file (JSON)")
    args = parser.parse_args(argv)
    if args.quick:
        config = BenchConfig.quick(args.workdir, n=args.n or 500)
    else:
        n = args.n or 5000
        sizes = (1000, 5000, 20000) if args.n is None else tuple(sorted({max(n // 5, 10), max(n // 2, 20), n}))
        config = BenchConfig(workdir=args.workdir, n=n, scale_sizes=sizes)
    if args.passes:
        config.passes = args.passes
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    config.sections = sections + (("cold",) if args.cold and "cold" not in sections else ())
    config.cold_n = args.cold_n
    config.cold_count = min(config.cold_count, args.cold_n)
    if args.n is not None:
        config.training_n = min(args.n, config.training_n)
        config.continuing_n = args.n
        config.encoded_n = min(args.n, config.encoded_n)
    unknown = set(config.sections) - {"reading", "conversion", "scale", "training", "continuing", "instant", "resume",
                                      "encoded", "cold"}
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    results = run_benchmarks(config)
    print(format_report(results))
    write_results(results, args.out)
    print(f"\nwrote {args.out}")
    return 0
