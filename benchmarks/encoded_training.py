"""The encoded training path (issue 26): RandomResizedCrop(224) + flip through `CaffeLoader` on an encoded LMDB.

One run, on ImageNet-like JPEGs it makes itself (quality 90, half 500x375, half 1000x750), from
the photos in `../shared/images` when the checkout has them, else from smooth generated images.
Every ratio is per round, candidate and baseline alternating in the same process (a machine that
slows down mid-run slows both); the medians and the spread of the rounds are reported, with the
load average, since the 2-core machines these run on are shared:

* train, one process: `CaffeLoader(num_workers=0, output="uint8")` with `RandomResizedCrop(224)`
  over the baseline a torchvision user has: Pillow's full decode, the crop of the same box,
  Pillow's antialiased bilinear resize to 224, the flip (records read from the same LMDB).
* train, 2 workers: the same loader with 2 persistent workers over its own one-process figure.
* eval: `ResizeCenterCrop(256, 224)` over Pillow's decode + Resize(256) + CenterCrop(224), and
  its 2-worker figure over its one-process one.
* pixels: every record's sample against the baseline's pixels for the same box: the mean
  absolute difference (levels), the largest per-sample mean and the largest pixel difference.
* `--fast-resize`: converting camera-sized JPEGs (1600x1200) with a 256x256 resize, in-process,
  fast over plain, and the pixels' difference.

Run: `python benchmarks/encoded_training.py [--n 2000] [--passes 3]`.
"""

from __future__ import annotations

import io
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/encoded_training.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lmdb
import numpy as np
import torch
from PIL import Image

from benchmarks.common import machine, read_all
from caffe_lmdb.conversion import convert
from caffe_lmdb.dataset import LmdbDataset_train
from caffe_lmdb.encode import ConvertOptions
from caffe_lmdb.jpeg_scaled import simplejpeg
from caffe_lmdb.loader import CaffeLoader, WorkerOptions
from caffe_lmdb.proto import caffe_pb2
from caffe_lmdb.resized_crop import RandomResizedCrop, ResizeCenterCrop, box_factor

SIZE, RESIZE, BATCH = 224, 256, 64
SHARED_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "images"
SIZES = ((500, 375), (1000, 750))  # (width, height): ImageNet's typical photos, half each

TARGETS = {"train 1 process / Pillow": 1.6, "train 2 workers / 1 process": 1.7, "eval 1 process / Pillow": 1.6,
           "eval 2 workers / 1 process": 1.7, "pixels mean abs": 0.35}


# --------------------------------------------------------------------------- data

def photo_sources() -> tuple[list[Image.Image], str]:
    """The shared photos (real content), or smooth generated images where the checkout has none."""
    if SHARED_PHOTOS.is_dir():
        paths = sorted(p for p in SHARED_PHOTOS.iterdir() if p.suffix in (".png", ".jpg"))
        photos = [Image.open(p).convert("RGB") for p in paths]
        photos = [photo for photo, path in zip(photos, paths, strict=True) if "logo" not in path.name]
        if photos:
            return photos, f"{len(photos)} photos of {SHARED_PHOTOS}"
    rng = np.random.default_rng(0)
    fields = [Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((800, 600), Image.BICUBIC)
              for _ in range(8)]
    return fields, "smooth generated images (no ../shared/images)"


def make_jpegs(root: Path, n: int, seed: int = 0) -> str:
    """`n` JPEGs (quality 90) in 10 class folders, alternately 500x375 and 1000x750: random crops of
    the sources at 4:3 (some flipped), resized with Pillow's bicubic filter. Returns where they came from."""
    photos, origin = photo_sources()
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)]
        width, height = SIZES[i % 2]
        w, h = photo.size
        crop_w = int(rng.integers(min(w, h * 4 // 3) * 6 // 10, min(w, h * 4 // 3) + 1))
        crop_h = crop_w * 3 // 4
        x, y = int(rng.integers(0, w - crop_w + 1)), int(rng.integers(0, h - crop_h + 1))
        image = photo.crop((x, y, x + crop_w, y + crop_h)).resize((width, height), Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        path = root / f"class{i % 10:02d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
    return origin


def prepare(workdir: Path, n: int, seed: int) -> dict[str, Any]:
    """The JPEGs and their encoded LMDB (reused when made with the same parameters), warm in the page cache."""
    source, lmdb_path = workdir / "encoded_training_src", workdir / "encoded_training.lmdb"
    stamp = workdir / ".encoded-training-params"
    params = f"{n} {seed} {SHARED_PHOTOS.is_dir()}"
    if not (stamp.is_file() and stamp.read_text().split("\n")[0] == params and lmdb_path.is_dir()):
        shutil.rmtree(source, ignore_errors=True)
        origin = make_jpegs(source, n, seed)
        convert(source, lmdb_path, overwrite=True, progress=False, options=ConvertOptions(encoded=True))
        stamp.write_text(f"{params}\n{origin}")
    read_all(lmdb_path)
    return {"lmdb": lmdb_path, "origin": stamp.read_text().split("\n")[1]}


def _datums(lmdb_path: Path) -> list[caffe_pb2.Datum]:
    """Every record, parsed, in key (dataset index) order."""
    env = lmdb.open(str(lmdb_path), readonly=True, lock=False)
    out = []
    with env.begin() as txn:
        for _, value in txn.cursor():
            datum = caffe_pb2.Datum()
            datum.ParseFromString(value)
            out.append(datum)
    env.close()
    return out


def records(lmdb_path: Path) -> list[bytes]:
    """Every record's JPEG bytes, in key (dataset index) order."""
    return [datum.data for datum in _datums(lmdb_path)]


# --------------------------------------------------------------------------- the Pillow baselines

def pillow_train(data: bytes, box: list[int], mirror: bool) -> np.ndarray:
    """torchvision on a PIL image: full decode, crop the box, antialiased bilinear resize to 224, flip."""
    top, left, height, width = box
    with Image.open(io.BytesIO(data)) as image:
        crop = image.convert("RGB").crop((left, top, left + width, top + height)).resize((SIZE, SIZE), Image.BILINEAR)
    if mirror:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(crop)


def pillow_eval(data: bytes) -> np.ndarray:
    """torchvision's Resize(256) + CenterCrop(224) on Pillow's full decode."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        width, height = image.size
        if height <= width:
            new_h, new_w = RESIZE, int(RESIZE * width / height)
        else:
            new_h, new_w = int(RESIZE * height / width), RESIZE
        resized = image.resize((new_w, new_h), Image.BILINEAR)
    top, left = round((new_h - SIZE) / 2.0), round((new_w - SIZE) / 2.0)
    return np.asarray(resized.crop((left, top, left + SIZE, top + SIZE)))


def baseline_pass(lmdb_path: Path, draws: np.ndarray | None) -> int:
    """One pass of the Pillow baseline over every record (read from the LMDB), each sample into a batch buffer."""
    env = LmdbDataset_train(lmdb_path).environment()  # the process's one environment of it, which the loader shares
    batch = np.empty((BATCH, SIZE, SIZE, 3), np.uint8)
    count = 0
    with env.begin(buffers=True) as txn:
        for _, value in txn.cursor():
            datum = caffe_pb2.Datum()
            datum.ParseFromString(value)
            if draws is None:
                batch[count % BATCH] = pillow_eval(datum.data)
            else:
                row = draws[count].tolist()
                batch[count % BATCH] = pillow_train(datum.data, row[:4], bool(row[4]))
            count += 1
    return count


# --------------------------------------------------------------------------- the loader

def loader_pass(loader: CaffeLoader) -> int:
    """One epoch of the loader (its batches are consumed, not kept)."""
    count = 0
    for images, _ in loader:
        count += len(images)
    return count


def timed(run: Callable[[], int]) -> float:
    start = time.perf_counter()
    count = run()
    return count / (time.perf_counter() - start)


def compare(name: str, transform: Any, lmdb_path: Path, draws: np.ndarray | None, passes: int) -> dict[str, Any]:
    """Interleaved rounds of: the Pillow baseline, the loader in one process, the loader with 2 workers."""
    one = CaffeLoader(lmdb_path, BATCH, transform=transform, output="uint8")
    two = CaffeLoader(lmdb_path, BATCH, transform=transform, output="uint8", num_workers=2,
                      worker_options=WorkerOptions(persistent_workers=True))
    loader_pass(one)  # untimed: slots allocated, the workers started
    loader_pass(two)
    rates: dict[str, list[float]] = {"pillow": [], "1 process": [], "2 workers": []}
    for _ in range(passes):
        rates["pillow"].append(timed(lambda: baseline_pass(lmdb_path, draws)))
        one.set_epoch(0)  # the same boxes as the baseline's
        rates["1 process"].append(timed(lambda: loader_pass(one)))
        two.set_epoch(0)
        rates["2 workers"].append(timed(lambda: loader_pass(two)))
    one.close()
    two.close()
    ratios = {f"{name} 1 process / Pillow": [a / b for a, b in zip(rates["1 process"], rates["pillow"], strict=True)],
              f"{name} 2 workers / 1 process": [a / b for a, b in zip(rates["2 workers"], rates["1 process"],
                                                                       strict=True)]}
    return {"samples/s": {k: {"median": statistics.median(v), "runs": v} for k, v in rates.items()},
            "ratios": {k: {"median": statistics.median(v), "runs": v} for k, v in ratios.items()}}


def pixel_differences(lmdb_path: Path, files: list[bytes], transform: Any, reference: Callable) -> dict[str, Any]:
    """Each sample of epoch 0 against the baseline's pixels for its box: mean abs difference, largest ones."""
    loader = CaffeLoader(lmdb_path, BATCH, transform=transform, output="uint8")
    means, largest, index = [], 0, 0
    for images, _ in loader:
        params = loader.last_offsets.numpy()
        for row in range(len(images)):
            expected = reference(files[index], params[row]).transpose(2, 0, 1).astype(np.int16)
            difference = np.abs(images[row].numpy().astype(np.int16) - expected)
            means.append(float(difference.mean()))
            largest = max(largest, int(difference.max()))
            index += 1
    loader.close()
    return {"records": len(means), "mean abs": float(np.mean(means)), "largest sample mean": max(means),
            "largest pixel": largest}


# --------------------------------------------------------------------------- --fast-resize

def bench_fast_resize(workdir: Path, n: int, passes: int) -> dict[str, Any]:
    """`convert --resize 256x256` of `n` 1600x1200 JPEGs in-process: fast / plain time per round, and the pixels."""
    photos, _ = photo_sources()
    source = workdir / "fast_resize_src"
    if len(list(source.glob("*/*.jpg"))) != n:
        shutil.rmtree(source, ignore_errors=True)
        for i in range(n):
            photo = photos[i % len(photos)].resize((1600, 1200), Image.BICUBIC)
            path = source / f"class{i % 2}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            photo.save(path, quality=90)
    outputs = {"plain": workdir / "fast_resize_plain.lmdb", "fast": workdir / "fast_resize_fast.lmdb"}
    times: dict[str, list[float]] = {"plain": [], "fast": []}
    for _ in range(passes):
        for name, out in outputs.items():
            options = ConvertOptions(resize_height=RESIZE, resize_width=RESIZE, fast_resize=name == "fast")
            start = time.perf_counter()
            convert(source, out, overwrite=True, progress=False, workers=0, options=options)
            times[name].append(time.perf_counter() - start)
    plain, fast = (_planes(outputs[name]) for name in ("plain", "fast"))
    differences = [np.abs(a.astype(np.int16) - b) for a, b in zip(plain, fast, strict=True)]
    ratios = [p / f for p, f in zip(times["plain"], times["fast"], strict=True)]
    return {"images": n, "plain s": times["plain"], "fast s": times["fast"],
            "plain / fast": {"median": statistics.median(ratios), "runs": ratios},
            "mean abs": float(np.mean([d.mean() for d in differences])),
            "largest pixel": int(max(d.max() for d in differences))}


def _planes(lmdb_path: Path) -> list[np.ndarray]:
    return [np.frombuffer(datum.data, np.uint8).reshape(datum.channels, datum.height, datum.width)
            for datum in _datums(lmdb_path)]


# --------------------------------------------------------------------------- the section

def bench_encoded_training(workdir: Path, n: int, passes: int, seed: int = 0,
                           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything above; returns the results dict (JSON-ready)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each loader worker; the baseline and the one-process loader alike
    try:
        load_before = os.getloadavg()
        log(f"encoded training path ({n} JPEGs) ...")
        data = prepare(workdir, n, seed)
        files = records(data["lmdb"])
        train = RandomResizedCrop(SIZE)
        evaluate = ResizeCenterCrop(RESIZE, SIZE)
        shapes = [_shape(data) for data in files]
        draws = train.batch_params([h for _, h, _ in shapes], [w for _, _, w in shapes], 0, 0, range(len(files)))
        results: dict[str, Any] = {"n": len(files), "images": data["origin"], "passes": passes, "machine": machine(),
                                   "decoder": train.decoder, "simplejpeg": getattr(simplejpeg, "__version__", None)}
        factors = [box_factor(*row[:4], shape, SIZE) for row, shape in zip(draws.tolist(), shapes, strict=True)]
        results["dct scales"] = {f"1/{f}": factors.count(f) / len(factors) for f in (1, 2, 4, 8)}
        results["train"] = compare("train", train, data["lmdb"], draws, passes)
        results["eval"] = compare("eval", evaluate, data["lmdb"], None, passes)
        log("encoded training path: pixels ...")
        results["pixels train"] = pixel_differences(data["lmdb"], files, train,
                                                    lambda f, p: pillow_train(f, p[:4].tolist(), bool(p[4])))
        results["pixels eval"] = pixel_differences(data["lmdb"], files, evaluate, lambda f, p: pillow_eval(f))
        log("encoded training path: --fast-resize ...")
        results["fast resize"] = bench_fast_resize(workdir, max(4, min(n // 10, 200)), passes)
        results["load average"] = {"before": load_before, "after": os.getloadavg()}
    finally:
        torch.set_num_threads(threads)
    return results


def _shape(data: bytes) -> tuple[int, int, int]:
    """A JPEG's C x H x W from its header."""
    with Image.open(io.BytesIO(data)) as image:
        return 3, image.height, image.width


def format_report(results: dict[str, Any]) -> str:
    """The section of `make bench`'s table."""
    lines = [f"encoded training path: N={results['n']} JPEGs (q90, half 500x375, half 1000x750, from "
             f"{results['images']}), batches of {BATCH}, decoder {results['decoder']}, {results['passes']} rounds; "
             f"load average {results['load average']['before'][0]:.2f} before, "
             f"{results['load average']['after'][0]:.2f} after"]
    for part in ("train", "eval"):
        rates = results[part]["samples/s"]
        lines.append(f"  {part}: " + ", ".join(f"{name} {value['median']:,.0f}/s" for name, value in rates.items()))
        for name, value in results[part]["ratios"].items():
            target = TARGETS.get(name)
            runs = value["runs"]
            verdict = "" if target is None else f"  >= {target}  " + ("ok" if value["median"] >= target else "MISSED")
            lines.append(f"    {name:<30} {value['median']:>5.2f} ({min(runs):.2f}-{max(runs):.2f}){verdict}")
    scales = ", ".join(f"{k} {v:.0%}" for k, v in results["dct scales"].items())
    lines.append(f"  boxes decoded at DCT scale: {scales}")
    for part in ("pixels train", "pixels eval"):
        pixels = results[part]
        verdict = "ok" if pixels["mean abs"] <= TARGETS["pixels mean abs"] else "MISSED"
        lines.append(f"  {part}: mean abs difference from Pillow {pixels['mean abs']:.3f} levels over "
                     f"{pixels['records']} records (<= 0.35 {verdict}), largest sample mean "
                     f"{pixels['largest sample mean']:.2f}, largest pixel {pixels['largest pixel']}")
    fast = results["fast resize"]
    runs = fast["plain / fast"]["runs"]
    lines.append(f"  convert --fast-resize (256x256, {fast['images']} 1600x1200 JPEGs, in-process): plain / fast "
                 f"{fast['plain / fast']['median']:.2f} ({min(runs):.2f}-{max(runs):.2f}); pixels mean abs "
                 f"{fast['mean abs']:.2f}, largest {fast['largest pixel']}")
    return "\n".join(lines)


def main() -> None:
    import argparse
    import json
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where data goes (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        results = bench_encoded_training(args.workdir or Path(scratch), args.n, args.passes)
    print(format_report(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
