"""CaffeLoader: batches made in worker processes into reused shared-memory slots, same bytes for any worker count.

Tiny real LMDBs (40 records, 3 x 20 x 24) converted from generated PNGs; the failure tests kill real
workers and interrupt real loops, then look for leftover processes and shared memory.
"""

from __future__ import annotations

import gc
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from conftest import REPO, caffe_key, caffe_raw_datum, save_image, write_lmdb
from PIL import Image
from toollmdbs import converted
from torch.utils.data import DistributedSampler
from wire import field_bytes, field_float, field_varint

import caffe_lmdb
from caffe_lmdb import caffe_pb2
from caffe_lmdb.dataset import LmdbDataset_train
from caffe_lmdb.datum import datum_to_array, parse_datum
from caffe_lmdb.errors import CaffeLmdbError, DatumError, InputError
from caffe_lmdb.loader import CaffeLoader, LoaderError, WorkerOptions
from caffe_lmdb.samplers import BlockShuffleSampler
from caffe_lmdb.transform import CaffeTransform, TransformError

COUNT, HEIGHT, WIDTH, CROP = 40, 20, 24, 16
BATCH = 6  # 40 = 6 x 6 + 4: a short last batch


# --------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A raw and an encoded (PNG) LMDB of the same 40 images, a mean file, and each record's BGR planes and label."""
    root = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(7)
    for i in range(COUNT):
        pixels = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
        save_image(root / "src" / f"class{i % 3}" / f"{i:03d}.png", Image.fromarray(pixels))
    raw = converted(root / "src", root / "raw.lmdb")
    encoded = converted(root / "src", root / "encoded.lmdb", encoded=True)
    mean = rng.uniform(0, 255, size=(3, HEIGHT, WIDTH)).astype(np.float32)
    blob = caffe_pb2.BlobProto(num=1, channels=3, height=HEIGHT, width=WIDTH)
    blob.data.extend(mean.ravel().tolist())
    mean_file = root / "mean.binaryproto"
    mean_file.write_bytes(blob.SerializeToString())
    dataset = LmdbDataset_train(raw)
    env = lmdb.open(str(raw), readonly=True, lock=False)
    with env.begin() as txn:
        datums = [parse_datum(txn.get(bytes(key))) for key in dataset.keys]
    env.close()
    planes = [datum_to_array(d).copy() for d in datums]
    return {"raw": raw, "encoded": encoded, "mean_file": mean_file, "planes": planes,
            "labels": [d.label for d in datums], "root": root}


def transform(data, **kwargs) -> CaffeTransform:
    return CaffeTransform(CROP, mirror=True, mean_file=data["mean_file"], scale=0.5, **kwargs)


def run(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every batch of one epoch, cloned (a batch is valid only until the next one is asked for)."""
    return [(images.clone(), labels.clone()) for images, labels in loader]


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and torch.equal(x, y) and torch.equal(p, q) for (x, p), (y, q) in zip(a, b, strict=True)
    )


def index_of(data) -> dict[bytes, int]:
    """Record bytes (BGR planes) -> index: identifies the samples of a transform-less batch."""
    return {planes.tobytes(): i for i, planes in enumerate(data["planes"])}


def indices_in(batches, lookup) -> list[int]:
    return [lookup[sample.numpy().tobytes()] for images, _ in batches for sample in images]


def children() -> set[int]:
    """Our child processes, less multiprocessing's resource tracker (started once per process by spawn, not ours)."""
    pids = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with open(task / "children") as f:
            pids |= {int(pid) for pid in f.read().split()}
    return {pid for pid in pids if "resource_tracker" not in _cmdline(pid)}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def our_shared_memory() -> list[str]:
    """Shared-memory mappings and descriptors of this process: /dev/shm files and the loader's memfds."""
    with open(f"/proc/{os.getpid()}/maps") as f:
        found = [line.strip() for line in f if "/dev/shm" in line or "caffe-lmdb-loader" in line]
    for fd in os.listdir(f"/proc/{os.getpid()}/fd"):
        with_target = os.path.join(f"/proc/{os.getpid()}/fd", fd)
        try:
            target = os.readlink(with_target)
        except OSError:
            continue
        if target.startswith("/dev/shm") or "caffe-lmdb-loader" in target:
            found.append(target)
    return found


def assert_clean(before_children: set[int], before_shm: set[str], before_mapped: list[str] = ()) -> None:
    """No worker left, no new shared memory mapped or open here, and no new file in /dev/shm from us."""
    gc.collect()
    deadline = time.monotonic() + 10
    while children() - before_children and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not children() - before_children
    assert [entry for entry in our_shared_memory() if entry not in before_mapped] == []
    assert not {name for name in os.listdir("/dev/shm") if "caffe" in name or "loader" in name} - before_shm


@pytest.fixture
def clean():
    """Check after the test that it left no process and no shared memory."""
    before_children = children()
    before_shm = set(os.listdir("/dev/shm"))
    before_mapped = our_shared_memory()
    yield
    assert_clean(before_children, before_shm, before_mapped)


# --------------------------------------------------------------------------- the same bytes, whoever makes them

def test_batches_identical_for_0_1_2_workers_and_equal_per_sample_transform(data, clean):
    caffe = transform(data)
    order = np.random.default_rng(3).permutation(COUNT).tolist()
    results = {workers: run(CaffeLoader(data["raw"], BATCH, transform=caffe, sampler=order, num_workers=workers,
                                        seed=11))
               for workers in (0, 1, 2)}
    assert same(results[0], results[1]) and same(results[0], results[2])
    images = torch.cat([b[0] for b in results[0]])
    labels = torch.cat([b[1] for b in results[0]])
    assert images.shape == (COUNT, 3, CROP, CROP) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [data["labels"][i] for i in order]
    mirrored = 0
    for row, index in enumerate(order):  # CaffeTransform on each record alone, at the draw of (seed, epoch, index)
        h_off, w_off, mirror = caffe.params(HEIGHT, WIDTH, 11, 0, index)
        mirrored += mirror
        expected = caffe._apply(data["planes"][index], h_off, w_off, mirror)
        assert np.array_equal(images[row].numpy(), expected), row
    assert 0 < mirrored < COUNT


def test_uint8_output_normalized_equals_float32_output(data, clean):
    caffe = transform(data)
    floats = run(CaffeLoader(data["raw"], BATCH, transform=caffe, shuffle=True, num_workers=2))
    loader = CaffeLoader(data["raw"], BATCH, transform=caffe, shuffle=True, num_workers=2, output="uint8")
    count = 0
    for (images, labels), (expected, expected_labels) in zip(loader, floats, strict=True):
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, CROP, CROP)
        blob = loader.normalize(images)
        assert blob.dtype == torch.float32 and torch.equal(blob, expected) and torch.equal(labels, expected_labels)
        count += 1
    assert count == len(loader) == 7


def test_no_transform_gives_whole_records_uint8_and_float32(data, clean):
    for output, dtype in (("uint8", torch.uint8), ("float32", torch.float32)):
        batches = run(CaffeLoader(data["raw"], BATCH, num_workers=1, output=output))
        images = torch.cat([b[0] for b in batches])
        assert images.dtype == dtype and images.shape == (COUNT, 3, HEIGHT, WIDTH)
        assert np.array_equal(images.numpy(), np.stack(data["planes"]).astype(images.numpy().dtype))


# --------------------------------------------------------------------------- order and epochs

def test_every_index_once_per_epoch_and_a_new_order_each_epoch(data, clean):
    lookup = index_of(data)
    loader = CaffeLoader(data["raw"], BATCH, shuffle=True, num_workers=2, output="uint8", seed=5)
    assert len(loader) == 7
    first = run(loader)
    second = run(loader)  # the next iter() is epoch 1
    assert [len(b[1]) for b in first] == [6] * 6 + [4]
    assert sorted(indices_in(first, lookup)) == list(range(COUNT))
    assert sorted(indices_in(second, lookup)) == list(range(COUNT))
    assert indices_in(first, lookup) != indices_in(second, lookup)
    loader.set_epoch(0)
    assert same(run(loader), first)
    dropped = CaffeLoader(data["raw"], BATCH, num_workers=1, output="uint8", drop_last=True)
    assert len(dropped) == 6 and indices_in(run(dropped), lookup) == list(range(36))


def test_new_epoch_new_crops_and_set_epoch_repeats_them(data, clean):
    loader = CaffeLoader(data["raw"], BATCH, transform=transform(data), num_workers=1, output="uint8")
    epoch0 = run(loader)
    offsets0 = loader.last_offsets.clone()
    epoch1 = run(loader)
    assert loader.epoch == 1
    assert not torch.equal(torch.cat([b[0] for b in epoch0]), torch.cat([b[0] for b in epoch1]))
    assert not torch.equal(offsets0, loader.last_offsets)
    assert [b[1].tolist() for b in epoch0] == [b[1].tolist() for b in epoch1]  # same order (no shuffle)
    loader.set_epoch(0)
    assert same(run(loader), epoch0)


# --------------------------------------------------------------------------- slots

def test_slot_reuse_never_corrupts_a_batch_within_its_lifetime(data, clean):
    caffe = transform(data)
    expected = run(CaffeLoader(data["raw"], 4, transform=caffe, num_workers=0))
    loader = CaffeLoader(data["raw"], 4, transform=caffe, num_workers=2,
                         worker_options=WorkerOptions(persistent_workers=True, prefetch_factor=1))
    for _ in range(2):
        loader.set_epoch(0)
        addresses = set()
        for (images, labels), (want, want_labels) in zip(loader, expected, strict=True):
            addresses.add(images.data_ptr())
            time.sleep(0.01)  # the workers race ahead meanwhile, filling their other slot
            assert torch.equal(images, want) and torch.equal(labels, want_labels)
            time.sleep(0.01)
            assert torch.equal(images, want)  # still intact just before the next batch is asked for
        assert len(addresses) == 4  # 2 workers x 2 slots, reused for 10 batches
    workers = children()
    run(loader)
    assert children() == workers  # persistent: the same processes (and slots) next epoch
    loader.close()


def test_breaking_out_of_the_loop_stops_the_workers(data, clean):
    loader = CaffeLoader(data["raw"], 4, transform=transform(data), num_workers=2)
    for step, batch in enumerate(loader):
        assert batch[0].shape == (4, 3, CROP, CROP)
        if step == 1:
            assert len(children()) >= 2
            break
    del batch
    gc.collect()
    assert not children()  # checked here, while the loader object is still alive
    rings = [entry for entry in our_shared_memory() if "caffe-lmdb-loader" in entry]
    assert rings  # the slots stay with the loader, for its next epoch
    images, _ = next(iter(loader))
    loader.close()
    assert [entry for entry in our_shared_memory() if "caffe-lmdb-loader-0" in entry]  # a batch held: still mapped
    assert torch.equal(images, images.clone())  # and readable
    del images
    gc.collect()
    assert not [entry for entry in our_shared_memory() if "caffe-lmdb-loader" in entry]


# --------------------------------------------------------------------------- failures

class FailingTransform(CaffeTransform):
    """Raises on one sample index, as a buggy user transform would."""

    def params(self, height, width, seed, epoch, index):
        raise AssertionError("params is only for naming a record smaller than the crop")

    def batch_params(self, height, width, seed, epoch, indices):
        if 13 in list(indices):
            raise ValueError("boom in the batch")
        return super().batch_params(height, width, seed, epoch, indices)


def test_exception_in_transform_is_one_error_naming_worker_lmdb_and_key(data, clean):
    dataset = LmdbDataset_train(data["raw"])
    caffe = FailingTransform(CROP, mirror=True)
    for workers in (0, 2):
        loader = CaffeLoader(dataset, 4, transform=caffe, num_workers=workers)
        with pytest.raises(LoaderError) as excinfo:
            run(loader)
        message = str(excinfo.value)
        assert "\n" not in message and "ValueError: boom in the batch" in message  # not retried one by one
        assert str(data["raw"]) in message and repr(bytes(dataset.keys[12])) in message and "index 12" in message
        assert "drawing the crops of the batch of 4 from it failed" in message
        if workers:
            assert "loader worker 1" in message  # batch 3 (indices 12-15) is worker 3 % 2's
            assert "boom in the batch" in excinfo.value.worker_traceback
        del excinfo


def test_a_record_smaller_than_the_crop_is_named_by_its_key(tmp_path, clean):
    rng = np.random.default_rng(3)
    sizes = [(20, 24)] * 5 + [(10, 24)] + [(20, 24)] * 2
    records = {caffe_key(i, f"{i}.png"): caffe_raw_datum(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8), i)
               .SerializeToString() for i, size in enumerate(sizes)}
    path = write_lmdb(tmp_path / "sizes.lmdb", records)
    for workers in (0, 1):
        loader = CaffeLoader(path, 4, transform=CaffeTransform(CROP, mirror=True), num_workers=workers)
        with pytest.raises(TransformError, match=r"key b'00000005_5.png' \(index 5\): record is 10x24 \(H x W\), "
                                                 r"smaller than crop_size 16"):
            run(loader)


def test_each_key_is_looked_up_once_per_batch(data, monkeypatch):
    import caffe_lmdb.batch_sources
    import caffe_lmdb.dataset
    from caffe_lmdb.safe_lmdb import get_value

    for prefetch in (True, False):
        loader = CaffeLoader(LmdbDataset_train(data["raw"], prefetch=prefetch), BATCH, transform=transform(data))
        looked_up = []

        def counted(txn, key, root, looked_up=looked_up):
            looked_up.append(bytes(key))
            return get_value(txn, key, root)

        monkeypatch.setattr(caffe_lmdb.batch_sources, "get_value", counted)
        monkeypatch.setattr(caffe_lmdb.dataset, "get_value", counted)
        assert len(run(loader)) == -(-COUNT // BATCH)
        assert sorted(looked_up) == sorted(bytes(key) for key in loader.dataset.keys)
        monkeypatch.undo()


def test_a_transform_without_every_batch_transform_method_is_refused_at_once(data):
    class CropOnly:
        def output_shape(self, channels, height, width):
            return channels, CROP, CROP

    with pytest.raises(TypeError, match="has no check_shape, params, batch_params, record_pixels, crop_into, "
                                        "transform_into, normalize"):
        CaffeLoader(data["raw"], 4, transform=CropOnly())


def test_worker_options_are_checked_when_made(data):
    with pytest.raises(InputError, match=r"^prefetch_factor must be >= 1, got 0$"):
        WorkerOptions(prefetch_factor=0)
    with pytest.raises(InputError, match=r"^timeout must be >= 0, got -0.5$"):
        WorkerOptions(timeout=-0.5)
    assert caffe_lmdb.WorkerOptions is WorkerOptions
    default = CaffeLoader(data["raw"], 4)
    assert default.worker_options == WorkerOptions(None, 2, False, 0)  # DataLoader's defaults
    assert (default.prefetch_factor, default.persistent_workers, default.timeout) == (2, False, 0)
    given = CaffeLoader(data["raw"], 4, worker_options=WorkerOptions("spawn", 3, True, 5))
    assert (given.prefetch_factor, given.persistent_workers, given.timeout) == (3, True, 5)
    assert given.multiprocessing_context.get_start_method() == "spawn"
    with pytest.raises(TypeError, match="worker_options must be a WorkerOptions, got dict"):
        CaffeLoader(data["raw"], 4, worker_options={"prefetch_factor": 1})
    with pytest.raises(TypeError, match="prefetch_factor"):  # the options moved into WorkerOptions
        CaffeLoader(data["raw"], 4, prefetch_factor=1)


def test_sigkill_of_a_worker_ends_the_loop_with_one_error(data, clean):
    before = children()
    loader = CaffeLoader(data["raw"], 2, transform=transform(data), num_workers=2, worker_options=WorkerOptions(timeout=30))
    iterator = iter(loader)
    next(iterator)
    workers = sorted(children() - before)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(LoaderError, match="killed by SIGKILL") as excinfo:
        for _ in iterator:
            pass
    assert time.monotonic() - start < 10
    message = str(excinfo.value)
    assert f"pid {workers[0]}" in message and str(data["raw"]) in message and "key b'" in message
    del excinfo, iterator


def test_keyboard_interrupt_in_the_consuming_loop_stops_everything(data, clean):
    loader = CaffeLoader(data["raw"], 4, transform=transform(data), num_workers=2, output="uint8")
    with pytest.raises(KeyboardInterrupt):
        for step, _ in enumerate(loader):
            if step == 2:
                raise KeyboardInterrupt


SCRIPT = """
import os, sys, time
from caffe_lmdb.loader import CaffeLoader, WorkerOptions
from caffe_lmdb.transform import CaffeTransform, TransformError

class Slow(CaffeTransform):
    def params(self, *args):
        time.sleep(0.05)
        return super().params(*args)

# epochs without end, the same two workers throughout: only the signal ends it, however late it comes
loader = CaffeLoader(sys.argv[1], 2, transform=Slow(16, mirror=True), num_workers=2,
                     worker_options=WorkerOptions(persistent_workers=True))
try:
    step = 0
    while True:
        for _ in loader:
            if step == 0:
                print(" ".join(open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()), flush=True)
            step += 1
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@pytest.mark.parametrize("how", ["SIGINT to the process group (Ctrl-C)", "SIGKILL of the main process"])
def test_ctrl_c_or_kill_of_the_main_process_leaves_no_worker(data, how, tmp_path):
    script = tmp_path / "consume.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(data["raw"])], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal
    try:
        workers = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(workers) == 2, proc.stderr.read()
        if how.startswith("SIGINT"):
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.kill()
        out, err = proc.communicate(timeout=20)
        if how.startswith("SIGINT"):
            assert proc.returncode == 0 and "interrupted" in out and "Traceback" not in err, err
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") and _state(pid) != "Z" for pid in workers):
            assert time.monotonic() < deadline, "workers outlived the main process"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"


def test_a_bad_record_is_one_error_naming_lmdb_key_and_worker(tmp_path, clean):
    rng = np.random.default_rng(0)
    records = {caffe_key(i, f"c/{i}.png"): caffe_raw_datum(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), 0)
               .SerializeToString() for i in range(4)}
    records[caffe_key(2, "c/2.png")] = b"\xff\xff not a datum"
    records[caffe_key(3, "c/3.png")] = caffe_raw_datum(np.zeros((6, 7, 3), np.uint8), 1).SerializeToString()
    path = write_lmdb(tmp_path / "bad.lmdb", records)
    with pytest.raises(DatumError) as excinfo:
        run(CaffeLoader(path, 1, sampler=[0, 1, 2], num_workers=1))
    message = str(excinfo.value)
    assert str(path) in message and "00000002_c/2.png" in message and "loader worker 0" in message
    with pytest.raises(DatumError, match="record is 3x6x7.*3x5x7") as excinfo:
        run(CaffeLoader(path, 2, sampler=[0, 3], num_workers=0))
    assert "00000003_c/3.png" in str(excinfo.value)
    del excinfo


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="transform"):
        CaffeLoader(LmdbDataset_train(data["raw"], transform=lambda x: x), 4)
    with pytest.raises(ValueError, match="sampler and shuffle"):
        CaffeLoader(data["raw"], 4, sampler=[0, 1], shuffle=True)
    with pytest.raises(ValueError, match="output"):
        CaffeLoader(data["raw"], 4, output="float16")
    with pytest.raises(ValueError, match="batch_size"):
        CaffeLoader(data["raw"], 0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            CaffeLoader(data["raw"], 4, device="cuda")
    with pytest.raises(CaffeLmdbError, match="not found"):
        CaffeLoader(data["root"] / "missing.lmdb", 4)
    with pytest.raises(TransformError, match=r"key b'00000000_.*smaller than crop_size 30"):
        CaffeLoader(data["raw"], 4, transform=CaffeTransform(30))  # found at construction, not in a worker
    with pytest.raises(IndexError, match="index 40, out of range for the 40 records"):
        iter(CaffeLoader(data["raw"], 4, sampler=[0, 40]))


# --------------------------------------------------------------------------- slot sizes

@pytest.mark.parametrize("workers", [0, 2])
def test_slots_hold_what_an_epoch_can_fill_not_batch_size(data, clean, workers):
    caffe = transform(data)
    huge = CaffeLoader(data["raw"], 100_000, transform=caffe, shuffle=True, num_workers=workers)
    got = run(huge)
    assert same(got, run(CaffeLoader(data["raw"], COUNT, transform=caffe, shuffle=True, num_workers=0)))
    assert len(got) == 1 and got[0][0].shape == (COUNT, 3, CROP, CROP)
    slots = [huge._local] if workers == 0 else huge._rings.slots[0]
    assert {images.shape[0] for images, _, _ in slots} == {COUNT}  # 40 rows, not 100,000
    assert huge._layout().total_bytes < 1 << 20
    huge.close()
    sane = CaffeLoader(data["raw"], BATCH, transform=caffe, num_workers=workers)  # a batch_size an epoch fills
    run(sane)
    assert sane._layout().batch_size == BATCH
    sane.close()


def test_slots_of_a_rank_hold_its_share(data, clean):
    dataset = LmdbDataset_train(data["raw"])
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=True, seed=3)
    loader = CaffeLoader(dataset, 100_000, sampler=sampler, num_workers=0, output="uint8")
    got = run(loader)
    assert indices_in(got, index_of(data)) == list(sampler) and loader._local[0].shape[0] == COUNT // 2


def test_slots_that_cannot_fit_in_memory_are_refused_in_one_line(data, clean):
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # A slot takes at least a page: twice the machine's memory in slots, whatever its size.
    loader = CaffeLoader(data["raw"], BATCH, num_workers=2,
                         worker_options=WorkerOptions(prefetch_factor=memory // mmap.PAGESIZE))
    with pytest.raises(LoaderError) as info:
        next(iter(loader))
    message = str(info.value)
    assert message.startswith(f"{data['raw']}: batches of {BATCH} x 3x{HEIGHT}x{WIDTH} float32 samples need ")
    assert "of memory available: lower batch_size, num_workers or prefetch_factor" in message
    assert "\n" not in message
    loader.close()


# --------------------------------------------------------------------------- start methods, samplers, sources

def test_spawn_start_method(data, clean):
    caffe = transform(data)
    expected = run(CaffeLoader(data["raw"], BATCH, transform=caffe, shuffle=True, num_workers=0))
    spawned = CaffeLoader(data["raw"], BATCH, transform=caffe, shuffle=True, num_workers=1,
                          worker_options=WorkerOptions(multiprocessing_context="spawn"))
    assert same(run(spawned), expected)


def test_distributed_sampler_and_set_epoch(data, clean):
    lookup = index_of(data)
    dataset = LmdbDataset_train(data["raw"])
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=3)
        loader = CaffeLoader(dataset, BATCH, sampler=sampler, num_workers=2, output="uint8")
        loader.set_epoch(4)
        assert sampler.epoch == 4
        got = indices_in(run(loader), lookup)
        assert got == list(sampler) and len(loader) == 4
        seen += got
    assert sorted(seen) == list(range(COUNT))


def test_block_shuffle_sampler(data, clean):
    lookup = index_of(data)
    dataset = LmdbDataset_train(data["raw"])
    sampler = BlockShuffleSampler(dataset, block_size=8, num_replicas=1, rank=0, seed=2, window=2)
    loader = CaffeLoader(dataset, BATCH, sampler=sampler, num_workers=2, output="uint8")
    first = indices_in(run(loader), lookup)
    second = indices_in(run(loader), lookup)  # epoch 1, passed on to the sampler
    assert sorted(first) == sorted(second) == list(range(COUNT))
    assert first == list(BlockShuffleSampler(dataset, 8, 1, 0, seed=2, window=2)) and first != second


def test_sum_of_two_datasets(data, clean):
    lookup = index_of(data)
    both = LmdbDataset_train(data["raw"]) + LmdbDataset_train(data["encoded"])
    loader = CaffeLoader(both, BATCH, num_workers=2, output="uint8")
    batches = run(loader)
    assert len(loader) == 14
    assert indices_in(batches, lookup) == list(range(COUNT)) * 2  # the encoded half decodes to the same planes
    assert torch.cat([b[1] for b in batches]).tolist() == data["labels"] * 2
    listed = CaffeLoader([data["raw"], data["encoded"]], BATCH, num_workers=0, output="uint8")
    assert same(run(listed), batches)


def test_encoded_lmdb_decoded_in_workers(data, clean):
    caffe = transform(data)
    raw = run(CaffeLoader(data["raw"], BATCH, transform=caffe, shuffle=True, num_workers=0, seed=9))
    encoded = run(CaffeLoader(data["encoded"], BATCH, transform=caffe, shuffle=True, num_workers=2, seed=9))
    assert same(encoded, raw)


def test_pin_memory_without_cuda_warns_and_still_loads(data):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: benchmarks/cuda_check.py covers pinned slots")
    with pytest.warns(UserWarning, match="pin_memory"):
        loader = CaffeLoader(data["raw"], BATCH, num_workers=0, pin_memory=True, output="uint8")
    assert len(run(loader)) == 7


def test_records_in_any_wire_layout_load_as_protobuf_reads_them(tmp_path, clean):
    """The loader reads plain raw records without a full parse; every other layout still reads exactly."""
    rng = np.random.default_rng(5)
    planes = [rng.integers(0, 256, (3, 5, 7), dtype=np.uint8) for _ in range(7)]
    head = field_varint(1, 3) + field_varint(2, 5) + field_varint(3, 7)
    layouts = [
        head + field_bytes(4, planes[0].tobytes()) + field_varint(5, 4) + field_varint(7, 0),  # Caffe's
        head + field_bytes(4, planes[1].tobytes()) + field_varint(5, -3),  # MNIST-style, no encoded
        field_varint(5, 6) + head + field_bytes(4, planes[2].tobytes()),  # label first
        head + field_bytes(4, planes[3].tobytes()) + field_varint(5, 1) + field_float(6, 2.5),  # float_data too
        head + field_bytes(4, b"\0" * 105) + field_varint(5, 2) + field_bytes(4, planes[4].tobytes()),  # last wins
        head + field_bytes(4, planes[5].tobytes()) + field_varint(5, 1) + field_varint(5, 8),  # last label wins
        head + field_bytes(4, planes[6].tobytes()),  # no label: 0
    ]
    path = write_lmdb(tmp_path / "layouts.lmdb", {caffe_key(i, f"{i}.png"): value for i, value in enumerate(layouts)})
    expected = [parse_datum(value) for value in layouts]
    for workers in (0, 1):
        [(images, labels)] = run(CaffeLoader(path, len(layouts), num_workers=workers, output="uint8"))
        assert labels.tolist() == [datum.label for datum in expected] == [4, -3, 6, 1, 2, 8, 0]
        assert all(np.array_equal(image.numpy(), plane) for image, plane in zip(images, planes, strict=True))
