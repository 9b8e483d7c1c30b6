"""A check of `CaffeLoader`'s CUDA path, for a machine with a GPU: `python benchmarks/cuda_check.py`.

What it checks, on a small raw LMDB it generates (crop 224, mirror, a mean file, batches of 64):

1. pinned slots: with `device="cuda", pin_memory=True` the workers' shared-memory slots are
   page-locked (`cudaHostRegister`), so the copies to the GPU are asynchronous;
2. slot lifetime under asynchronous copies: while the GPU is kept busy after every batch, the
   batches that arrive still equal the CPU loader's, byte for byte (a slot handed back to its
   worker before its copy finished would show up here as a corrupted batch);
3. `loader.normalize` on the GPU gives the same float32 bits as the CPU path (`output="float32"`
   without a device), and so does `output="float32"` delivered to the GPU;
4. samples/s of: uint8 to the GPU + normalize there, float32 to the GPU, and the CPU loader alone.

Exits 0 when every check passes, 1 when one fails, 2 when there is no CUDA device (nothing run).
`--device cpu` runs the same comparisons without a GPU (no pinning): a dry run of the script.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/cuda_check.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.training import BATCH, CROP, SCALE, prepare
from caffe_lmdb.loader import CaffeLoader, WorkerOptions
from caffe_lmdb.transform import CaffeTransform


def _rate(loader: CaffeLoader, device: torch.device, normalize: bool, epochs: int = 3) -> float:
    """Samples/s over `epochs` epochs (after one warm-up), each batch on `device` and, if asked, normalized there."""
    seen = 0
    for epoch in range(epochs + 1):
        if epoch == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, seen = time.perf_counter(), 0
        for images, labels in loader:
            blob = loader.normalize(images) if normalize else images
            blob.view(-1)[:1].sum()  # use the batch, as a training step would
            seen += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def _busy(device: torch.device, work: torch.Tensor | None) -> None:
    """Keep the GPU busy for a few milliseconds, so that the next copy queues behind it."""
    if work is not None:
        for _ in range(4):
            work = work @ work
            work /= work.norm()


def run_checks(workdir: Path, n: int, device_name: str, workers: int) -> dict[str, Any]:
    data = prepare(workdir, n, 0)
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    transform = CaffeTransform(CROP, mirror=True, mean_file=data["mean"], scale=SCALE)
    results: dict[str, Any] = {"n": data["n"], "device": str(device), "workers": workers, "checks": {}}
    checks = results["checks"]

    def loader(**kwargs: Any) -> CaffeLoader:
        return CaffeLoader(data["raw"], BATCH, transform=transform, shuffle=True, seed=5, **kwargs)

    reference = [images.clone() for images, _ in loader(num_workers=0)]  # float32 on the CPU

    # 1 + 2 + 3: uint8 slots pinned, copied asynchronously while the GPU is busy, normalized on the GPU
    on_device = loader(num_workers=workers, output="uint8", device=device if cuda else None, pin_memory=cuda)
    work = torch.randn(1024, 1024, device=device) if cuda else None
    equal, pinned, worst = True, None, 0.0
    for step, (images, labels) in enumerate(on_device):
        if step == 0 and cuda:
            slot = on_device._rings.slots[0][0][0]  # worker 0's first slot
            pinned = bool(torch.from_numpy(slot).is_pinned())
        assert images.device.type == device.type and labels.device.type == device.type
        blob = on_device.normalize(images)
        _busy(device, work)  # the next batch's copy (and the slot's reuse) must wait for this
        same = torch.equal(blob.cpu(), reference[step])
        if not same:
            worst = max(worst, float((blob.cpu() - reference[step]).abs().max()))
        equal &= same
    checks["slots pinned"] = pinned if cuda else "n/a (cpu)"
    checks["uint8 + normalize on device == CPU float32 (bit for bit), GPU kept busy"] = equal
    if not equal:
        results["max_abs_difference"] = worst
    on_device.close()

    float_device = loader(num_workers=workers, device=device if cuda else None, pin_memory=cuda)
    checks["float32 delivered to the device == CPU float32"] = all(
        torch.equal(images.cpu(), want) for (images, _), want in zip(float_device, reference, strict=True))
    float_device.close()

    # 4: speed
    rates = {}
    for name, kwargs, normalize in (
        ("uint8 to device + normalize there", {"output": "uint8"}, True),
        ("float32 to device", {}, False),
    ):
        timed = loader(num_workers=workers, device=device if cuda else None, pin_memory=cuda,
                       worker_options=WorkerOptions(persistent_workers=True), **kwargs)
        rates[name] = _rate(timed, device, normalize)
        timed.close()
    cpu = loader(num_workers=workers, worker_options=WorkerOptions(persistent_workers=True))
    rates["float32 on the CPU only"] = _rate(cpu, torch.device("cpu"), False)
    cpu.close()
    results["samples_per_s"] = rates
    results["ok"] = all(value is True or value == "n/a (cpu)" for value in checks.values())
    return results


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="cuda_check.py", description="Check CaffeLoader's CUDA path. "
                                     "Example: python benchmarks/cuda_check.py --n 1024")
    parser.add_argument("--n", type=int, default=1024, help="raw 256x256 records to generate (default 1024)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run without a GPU")
    parser.add_argument("--workdir", type=Path, default=Path("bench-data"), help="where data and LMDBs go")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("cuda_check: no CUDA device here (torch.cuda.is_available() is False); nothing checked")
        return 2
    results = run_checks(args.workdir, args.n, args.device, args.workers)
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(results, indent=2))
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
