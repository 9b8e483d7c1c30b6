"""The training-path benchmark: `CaffeLoader` against the baselines a training script would use instead.

One run, on data it generates itself (256x256 photos derived from the bundled images, as
`bench.py` does): raw 256x256 records, crop 224, mirror, a mean file, batches of 64, 2 workers.
Every figure is a ratio against a baseline measured in the same process, pass by pass (baseline
and candidate alternate, so a machine that slows down mid-run slows both), and the median of the
per-pass ratios is reported:

* uint8 floor: `CaffeLoader(output="uint8", num_workers=2)` over the one-process floor (read,
  crop and mirror into one reused buffer in the main process, with the same kernels), with
  torch's default threads and with one (the floor's `torch.flip` may use both cores); both
  without the dataset's batch prefetch, which only pays on a cold page cache (its cost on a warm
  one is measured too).
* float32 today: `CaffeLoader(output="float32", num_workers=2)` over today's path:
  `LmdbDataset_train(output="tensor")` with a per-sample random crop, flip and float mean
  subtraction, in `DataLoader(batch_size=64, num_workers=2)`. Workers are persistent on both
  sides (one untimed warm-up epoch each), so the figures are steady-state epochs.
* encoded: the same two on an encoded (JPEG) LMDB: decode and crop in the workers either way.
* memory: peak PSS of the main process and its workers in each of 3 epochs (flat is the target).

Run: `python benchmarks/training.py [--n 2000] [--passes 5]`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/training.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import children, ensure_images, machine, memory_kib, read_all
from caffe_lmdb.atomic_lmdb import default_keys_path
from caffe_lmdb.conversion import convert
from caffe_lmdb.dataset import LmdbDataset_train
from caffe_lmdb.datum import parse_datum_view
from caffe_lmdb.encode import ConvertOptions
from caffe_lmdb.loader import CaffeLoader, WorkerOptions
from caffe_lmdb.mean import save_mean
from caffe_lmdb.safe_lmdb import OPEN_ENVS, open_readonly
from caffe_lmdb.transform import CaffeTransform

CROP, BATCH, WORKERS = 224, 64, 2
SCALE = 0.00390625

#: Samples per timed pass of the uint8 rows (whole epochs): an epoch of 2,000 takes under 0.1 s there.
UINT8_PASS_SAMPLES = 8000

TARGETS = {"uint8 / floor": 1.2, "uint8 / floor, 1 thread": 1.2, "float32 / today": 2.0, "encoded / today": 0.9}


# --------------------------------------------------------------------------- data

def prepare(workdir: Path, n: int, seed: int) -> dict[str, Path]:
    """Images, a raw and an encoded LMDB of them, and the raw LMDB's mean file (reused when present)."""
    workdir.mkdir(parents=True, exist_ok=True)
    files = ensure_images(workdir / "training_src", n, 10, seed)
    raw, encoded = workdir / "training_raw.lmdb", workdir / "training_encoded.lmdb"
    stamp = workdir / ".training-params"
    if not (stamp.is_file() and stamp.read_text() == f"{n} {seed}" and raw.is_dir() and encoded.is_dir()):
        convert(workdir / "training_src", raw, overwrite=True, progress=False)
        convert(workdir / "training_src", encoded, overwrite=True, progress=False, options=ConvertOptions(encoded=True))
        stamp.write_text(f"{n} {seed}")
    mean_file = workdir / "training_mean.binaryproto"
    if not mean_file.is_file() or mean_file.stat().st_mtime < raw.stat().st_mtime:
        save_mean(mean_file, _mean(raw))
    read_all(raw)
    read_all(encoded)
    return {"raw": raw, "encoded": encoded, "mean": mean_file, "n": len(files)}


def _mean(lmdb_path: Path) -> np.ndarray:
    """The per-pixel mean of the raw records (C x H x W, Datum order), summed in float64."""
    env = open_readonly(lmdb_path)
    total = None
    count = 0
    with env.begin(buffers=True) as txn:
        for _, value in txn.cursor():
            view = parse_datum_view(value)
            planes = np.frombuffer(view.data, np.uint8).reshape(view.channels, view.height, view.width)
            total = planes.astype(np.float64) if total is None else total + planes
            count += 1
    env.close()
    return (total / count).astype(np.float32)


# --------------------------------------------------------------------------- today's path

class TodayTransform:
    """Today's per-sample recipe: random crop, random flip, float, mean file subtracted, scaled.

    On the C x H x W uint8 RGB tensor `LmdbDataset_train(output="tensor")` gives; the mean is the
    full-size mean file in RGB order, cropped (and flipped) with the sample, as Caffe does.
    """

    def __init__(self, mean_rgb: torch.Tensor, crop: int, scale: float) -> None:
        self.mean = mean_rgb
        self.crop = crop
        self.scale = scale

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _, height, width = image.shape
        top = int(torch.randint(0, height - self.crop + 1, ()))
        left = int(torch.randint(0, width - self.crop + 1, ()))
        window = image[:, top:top + self.crop, left:left + self.crop]
        mean = self.mean[:, top:top + self.crop, left:left + self.crop]
        if torch.rand(()) < 0.5:
            window, mean = window.flip(2), mean.flip(2)
        return (window.float() - mean) * self.scale


def today_loader(lmdb_path: Path, mean_file: Path, seed: int) -> torch.utils.data.DataLoader:
    from caffe_lmdb.mean import load_mean

    mean_rgb = torch.from_numpy(load_mean(mean_file)[::-1].copy())  # Datum (BGR) planes -> RGB
    dataset = LmdbDataset_train(lmdb_path, TodayTransform(mean_rgb, CROP, SCALE), default_keys_path(lmdb_path),
                                output="tensor")
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=WORKERS,
                                       persistent_workers=True, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the floor

def floor_pass(lmdb_path: Path, transform: CaffeTransform, epoch: int, seed: int) -> int:
    """Read, crop and mirror every record (random order) into one reused batch buffer, in this process."""
    keys = np.load(default_keys_path(lmdb_path), allow_pickle=False)
    order = np.random.default_rng([seed, epoch]).permutation(len(keys))
    buffer = np.empty((BATCH, 3, CROP, CROP), np.uint8)
    env = OPEN_ENVS.get(str(lmdb_path), readahead=True)  # py-lmdb opens an LMDB once per process: share it
    with env.begin(buffers=True) as txn:
        for position, index in enumerate(order.tolist()):
            view = parse_datum_view(txn.get(bytes(keys[index])))
            pixels = np.frombuffer(view.data, np.uint8).reshape(view.channels, view.height, view.width)
            h_off, w_off, mirror = transform.params(view.height, view.width, seed, epoch, index)
            transform.crop_into(pixels, buffer[position % BATCH], h_off, w_off, mirror)
    return len(order)


# --------------------------------------------------------------------------- measuring

def consume(loader: Any) -> int:
    """Samples of one epoch, each batch touched as training would hand it on (one sum of a row)."""
    seen = 0
    for images, labels in loader:
        images[0, 0, 0, 0].item()
        seen += len(labels)
    return seen


def paired(baseline: Callable[[], int], candidate: Callable[[], int], passes: int, repeat: int = 1) -> dict[str, Any]:
    """Samples/s of both, alternating pass by pass, and the median of the per-pass ratios.

    Each timed pass runs its side `repeat` times (epochs), so that a pass lasts long enough for
    a scheduler hiccup of this shared VM not to decide its ratio.
    """
    rates: dict[str, list[float]] = {"baseline": [], "candidate": []}
    ratios = []
    for _ in range(passes):
        for name, run in (("baseline", baseline), ("candidate", candidate)):
            start = time.perf_counter()
            count = sum(run() for _ in range(repeat))
            rates[name].append(count / (time.perf_counter() - start))
        ratios.append(rates["candidate"][-1] / rates["baseline"][-1])
    return {"baseline_samples_per_s": statistics.median(rates["baseline"]),
            "candidate_samples_per_s": statistics.median(rates["candidate"]),
            "ratio": statistics.median(ratios), "ratios": ratios}


def epoch_memory(loader: Any, epochs: int = 3) -> list[dict[str, float]]:
    """Peak PSS, RSS and anonymous memory (MiB) of this process and its children in each epoch."""
    rows = []
    for epoch in range(epochs):
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        peak = [0, 0, 0]
        for step, _ in enumerate(loader):
            if step % 4 == 1:
                pids = [os.getpid(), *children(os.getpid())]
                sample = [sum(column) for column in zip(*(memory_kib(pid) for pid in pids), strict=True)]
                peak = [max(a, b) for a, b in zip(peak, sample, strict=True)]
        rows.append({"epoch": epoch, "peak_rss_mib": peak[0] / 1024, "peak_pss_mib": peak[1] / 1024,
                     "peak_anonymous_mib": peak[2] / 1024})
    return rows


def bench_training(workdir: Path, n: int = 2000, passes: int = 5, seed: int = 0,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every measurement of the module docstring; returns the results (JSON-ready)."""
    log(f"preparing {n} images and LMDBs in {workdir} ...")
    data = prepare(workdir, n, seed)
    transform = CaffeTransform(CROP, mirror=True, mean_file=data["mean"], scale=SCALE)
    results: dict[str, Any] = {"n": data["n"], "machine": machine(), "passes": passes,
                               "torch_threads": torch.get_num_threads()}
    epochs = iter(range(1 << 30))

    def loader(path: Path, output: str, prefetch: bool = True) -> CaffeLoader:
        source = LmdbDataset_train(path, keys_path=default_keys_path(path), prefetch=prefetch)
        return CaffeLoader(source, BATCH, transform=transform, shuffle=True, num_workers=WORKERS, output=output,
                           seed=seed, worker_options=WorkerOptions(persistent_workers=True))

    log("uint8 CaffeLoader vs the one-process floor ...")
    uint8 = loader(data["raw"], "uint8", prefetch=False)  # as the floor: no batch prefetch (a warm page cache)
    consume(uint8)  # warm-up, untimed: the persistent workers start and touch their slots once
    repeat = results["epochs_per_pass"] = min(8, max(1, math.ceil(UINT8_PASS_SAMPLES / data["n"])))
    results["uint8 / floor"] = paired(lambda: floor_pass(data["raw"], transform, next(epochs), seed),
                                      lambda: consume(uint8), passes, repeat)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the floor's mirror (torch.flip) on one core, as in each worker
    results["uint8 / floor, 1 thread"] = paired(lambda: floor_pass(data["raw"], transform, next(epochs), seed),
                                                lambda: consume(uint8), passes, repeat)
    torch.set_num_threads(torch_threads)
    prefetching = loader(data["raw"], "uint8")
    consume(prefetching)
    results["uint8, prefetch on / off"] = paired(lambda: consume(uint8), lambda: consume(prefetching), passes,
                                                 repeat)
    uint8.close()
    prefetching.close()
    log("float32 CaffeLoader vs today's DataLoader path ...")
    float32, today = loader(data["raw"], "float32"), today_loader(data["raw"], data["mean"], seed)
    consume(float32), consume(today)
    results["float32 / today"] = paired(lambda: consume(today), lambda: consume(float32), passes)
    float32.close()
    today = None  # its workers exit with it
    log("encoded LMDB: CaffeLoader vs the same decode + crop through DataLoader ...")
    encoded, today_encoded = loader(data["encoded"], "float32"), today_loader(data["encoded"], data["mean"], seed)
    consume(encoded), consume(today_encoded)
    results["encoded / today"] = paired(lambda: consume(today_encoded), lambda: consume(encoded),
                                        max(3, passes // 2))
    encoded.close()
    today_encoded = None
    log("memory over 3 epochs ...")
    results["memory"] = {}
    for name, make in (("CaffeLoader float32", lambda: loader(data["raw"], "float32")),
                       ("CaffeLoader uint8", lambda: loader(data["raw"], "uint8")),
                       ("today's DataLoader", lambda: today_loader(data["raw"], data["mean"], seed))):
        measured = make()
        results["memory"][name] = epoch_memory(measured)
        if hasattr(measured, "close"):
            measured.close()
        del measured
    return results


def format_report(results: dict[str, Any]) -> str:
    lines = [f"training path: N={results['n']} raw 256x256 records, crop {CROP}, mirror, mean file, batch {BATCH}, "
             f"{WORKERS} workers; {results['machine']}; median of {results['passes']} paired passes "
             f"(uint8 rows: {results.get('epochs_per_pass', 1)} epochs a pass)", ""]
    lines.append(f"  {'ratio':<24} {'baseline/s':>11} {'candidate/s':>12} {'ratio':>7} {'passes':>11}   target")
    for name, target in TARGETS.items():
        row = results[name]
        verdict = "ok" if row["ratio"] >= target else f"MISSED by {100 * (1 - row['ratio'] / target):.0f}%"
        spread = f"{min(row['ratios']):.2f}-{max(row['ratios']):.2f}"
        lines.append(f"  {name:<24} {row['baseline_samples_per_s']:>11.0f} {row['candidate_samples_per_s']:>12.0f} "
                     f"{row['ratio']:>7.2f} {spread:>11}   >= {target}  {verdict}")
    row = results["uint8, prefetch on / off"]
    lines.append(f"  {'uint8, prefetch on / off':<24} {row['baseline_samples_per_s']:>11.0f} "
                 f"{row['candidate_samples_per_s']:>12.0f} {row['ratio']:>7.2f}   (the cost of batch prefetch when "
                 "the LMDB is in the page cache)")
    lines.append("")
    lines.append("  peak memory of main + workers per epoch (MiB): PSS / RSS / anonymous")
    for name, rows in results["memory"].items():
        cells = "   ".join(f"e{r['epoch']}: {r['peak_pss_mib']:.0f} / {r['peak_rss_mib']:.0f} / "
                           f"{r['peak_anonymous_mib']:.0f}" for r in rows)
        lines.append(f"    {name:<20} {cells}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """`python benchmarks/training.py`: run, print the table, write the JSON."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="training.py",
        description="Measure CaffeLoader against a one-process floor and today's DataLoader path. "
        "Example: python benchmarks/training.py --n 2000",
    )
    parser.add_argument("--n", type=int, default=2000, help="raw 256x256 records to generate (default 2000)")
    parser.add_argument("--passes", type=int, default=5, help="paired passes per ratio (median; default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images, orders and crops")
    parser.add_argument("--workdir", type=Path, default=Path("bench-data"), help="where data and LMDBs go")
    parser.add_argument("--out", type=Path, default=Path("bench-training.json"), help="results file (JSON)")
    parser.add_argument("--clean", action="store_true", help="remove the generated data afterwards")
    args = parser.parse_args(argv)
    results = bench_training(args.workdir, args.n, args.passes, args.seed)
    print(format_report(results))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if args.clean:
        for name in ("training_src", "training_raw.lmdb", "training_encoded.lmdb"):
            shutil.rmtree(args.workdir / name, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
