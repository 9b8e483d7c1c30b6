"""LmdbDataset_train on real LMDBs: legacy (no keys file) and keyed, every record kind, workers, errors."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import NO_IDAT_KEY, caffe_key, caffe_raw_datum, png_bytes, write_lmdb
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler
from wire import field_varint

from caffe_lmdb import (
    DatumError,
    KeysFileError,
    KeysFileWarning,
    LmdbDataset_train,
    LmdbFormatError,
    caffe_pb2,
    save_keys,
)

# ---------------------------------------------------------------- picklable transforms (spawn workers import them)


def pil_to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).copy()


def label_plus_100(label: int) -> int:
    return label + 100


class Scale:
    """A transform object with state, as torchvision's are."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.float() * self.factor

    def __repr__(self) -> str:
        return f"Scale(factor={self.factor})"


# ---------------------------------------------------------------- more LMDBs


def keyed_lmdb(tmp_path, name: str, records: dict[bytes, bytes]):
    """An LMDB plus its keys file, as the converter leaves them (keys written with save_keys)."""
    path = write_lmdb(tmp_path / name, records)
    return path, save_keys(tmp_path / f"{name}_keys.npy", list(records))


@pytest.fixture
def gray_lmdb(tmp_path, rng):
    """MNIST-like: one 7x5 plane per record, bare `%08d` keys, `encoded` never written."""
    images = [rng.integers(0, 256, size=(5, 7), dtype=np.uint8) for _ in range(4)]
    labels = [3, -1, 0, 9]  # a negative label survives the int32 varint
    records = {
        b"%08d" % i: caffe_raw_datum(pixels, label, explicit_encoded=False).SerializeToString()
        for i, (pixels, label) in enumerate(zip(images, labels, strict=True))
    }
    path, keys_path = keyed_lmdb(tmp_path, "gray_lmdb", records)
    return path, keys_path, images, labels


@pytest.fixture
def encoded_lmdb(tmp_path, rng):
    """`convert_imageset --encoded`: PNG file bytes, dims unset, extra targets in float_data."""
    rgb = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, size=(5, 7), dtype=np.uint8)
    images = [rgb, gray]
    records = {}
    for i, pixels in enumerate(images):
        datum = caffe_pb2.Datum(data=png_bytes(Image.fromarray(pixels)), label=i, encoded=True)
        datum.float_data.extend([0.5 * i, -1.25])
        records[caffe_key(i, f"c/{i}.png")] = datum.SerializeToString()
    path, keys_path = keyed_lmdb(tmp_path, "encoded_lmdb", records)
    return path, keys_path, images


@pytest.fixture
def float_lmdb(tmp_path, rng):
    """pycaffe's `array_to_datum` of a float32 C x H x W array (BGR planes): pixels in float_data."""
    chw = rng.normal(100, 80, size=(3, 5, 7)).astype(np.float32)
    datum = caffe_pb2.Datum(channels=3, height=5, width=7, label=4, encoded=False)
    datum.float_data.extend(chw.ravel().tolist())
    path, keys_path = keyed_lmdb(tmp_path, "float_lmdb", {caffe_key(0, "f.npy"): datum.SerializeToString()})
    return path, keys_path, chw


def rgb_chw(pixels: np.ndarray) -> np.ndarray:
    return pixels.transpose(2, 0, 1)


# ---------------------------------------------------------------- legacy LMDB: raw RGB, keys scanned


def test_legacy_lmdb_reads_pixel_exact_rgb_in_key_order(legacy_rgb_lmdb):
    path, keys, images, labels = legacy_rgb_lmdb
    ds = LmdbDataset_train(path)
    assert len(ds) == 6
    assert ds.keys.dtype.kind == "S" and ds.keys.tolist() == keys
    for i in range(len(ds)):
        image, label = ds[i]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (7, 5)
        assert np.array_equal(np.asarray(image), images[i])
        assert label == labels[i] and type(label) is int
    assert np.array_equal(np.asarray(ds[-1][0]), images[-1])


def test_tensor_and_numpy_outputs_are_chw_rgb_and_own_their_memory(legacy_rgb_lmdb):
    path, _, images, labels = legacy_rgb_lmdb
    tensors = LmdbDataset_train(path, output="tensor")
    arrays = LmdbDataset_train(path, output="numpy")
    for i in range(len(tensors)):
        tensor, label = tensors[i]
        array, _ = arrays[i]
        assert tensor.dtype == torch.uint8 and tensor.shape == (3, 5, 7) and tensor.is_contiguous()
        assert torch.equal(tensor, torch.from_numpy(rgb_chw(images[i])))
        assert isinstance(array, np.ndarray) and array.flags.writeable and array.flags.c_contiguous
        assert np.array_equal(array, rgb_chw(images[i])) and label == labels[i]


def test_saved_keys_skip_the_scan_and_read_the_same(legacy_rgb_lmdb, tmp_path):
    path, keys, images, _ = legacy_rgb_lmdb
    saved = LmdbDataset_train(path).save_keys(tmp_path / "legacy_keys.npy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matching keys file must not warn
        ds = LmdbDataset_train(path, None, saved)
    assert ds.keys.tolist() == keys
    assert np.array_equal(np.asarray(ds[2][0]), images[2])


def test_transform_and_target_transform_are_applied(legacy_rgb_lmdb):
    path, _, images, labels = legacy_rgb_lmdb
    ds = LmdbDataset_train(path, pil_to_array, target_transform=label_plus_100)
    image, label = ds[1]
    assert np.array_equal(image, images[1]) and label == labels[1] + 100


# ---------------------------------------------------------------- gray, encoded, float records


def test_gray_records_are_l_or_forced_rgb(gray_lmdb):
    path, keys_path, images, labels = gray_lmdb
    ds = LmdbDataset_train(path, None, keys_path)
    assert [ds[i][1] for i in range(len(ds))] == labels
    image, _ = ds[0]
    assert image.mode == "L" and np.array_equal(np.asarray(image), images[0])
    forced, _ = LmdbDataset_train(path, None, keys_path, mode="RGB")[0]
    assert forced.mode == "RGB" and np.array_equal(np.asarray(forced), np.stack([images[0]] * 3, axis=2))
    tensor, _ = LmdbDataset_train(path, None, keys_path, output="tensor")[1]
    assert tensor.shape == (1, 5, 7) and torch.equal(tensor[0], torch.from_numpy(images[1]))
    tensor3, _ = LmdbDataset_train(path, None, keys_path, output="tensor", mode="RGB")[1]
    assert tensor3.shape == (3, 5, 7) and all(torch.equal(plane, tensor[0]) for plane in tensor3)


def test_encoded_records_decode_with_pillow(encoded_lmdb):
    path, keys_path, images = encoded_lmdb
    ds = LmdbDataset_train(path, None, keys_path)
    assert ds.encoded is True
    rgb, label = ds[0]
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb), images[0]) and label == 0
    gray, _ = ds[1]
    assert gray.mode == "L" and np.array_equal(np.asarray(gray), images[1])
    tensor, _ = LmdbDataset_train(path, None, keys_path, output="tensor")[0]
    assert torch.equal(tensor, torch.from_numpy(rgb_chw(images[0])))
    forced, _ = LmdbDataset_train(path, None, keys_path, output="numpy", mode="RGB")[1]
    assert forced.shape == (3, 5, 7) and np.array_equal(forced[2], images[1])


def test_float_data_targets(encoded_lmdb):
    path, keys_path, _ = encoded_lmdb
    floats = LmdbDataset_train(path, None, keys_path, target="float")
    _, target = floats[1]
    assert target.dtype == torch.float32 and torch.equal(target, torch.tensor([0.5, -1.25]))
    _, (label, target) = LmdbDataset_train(path, None, keys_path, target="both")[1]
    assert label == 1 and torch.equal(target, torch.tensor([0.5, -1.25]))


def test_float_records_keep_their_values(float_lmdb):
    path, keys_path, chw = float_lmdb
    tensor, label = LmdbDataset_train(path, None, keys_path, output="tensor")[0]
    assert tensor.dtype == torch.float32 and label == 4
    assert torch.equal(tensor, torch.from_numpy(chw[::-1].copy()))  # BGR planes -> RGB
    image, _ = LmdbDataset_train(path, None, keys_path)[0]  # PIL: clipped to 0..255
    assert image.mode == "RGB" and np.array_equal(
        np.asarray(image), np.clip(chw[::-1], 0, 255).astype(np.uint8).transpose(1, 2, 0)
    )
    with pytest.raises(DatumError, match=f"{path}: key b'00000000_f.npy': float_data holds this float datum's pixels"):
        LmdbDataset_train(path, None, keys_path, target="float")[0]


# ---------------------------------------------------------------- several LMDBs as one


def test_three_lmdbs_concatenate(legacy_rgb_lmdb, gray_lmdb, encoded_lmdb):
    legacy = LmdbDataset_train(legacy_rgb_lmdb[0], output="tensor", mode="RGB")
    gray = LmdbDataset_train(gray_lmdb[0], None, gray_lmdb[1], output="tensor", mode="RGB")
    encoded = LmdbDataset_train(encoded_lmdb[0], None, encoded_lmdb[1], output="tensor", mode="RGB")
    ds = legacy + gray + encoded
    assert isinstance(ds, ConcatDataset) and len(ds) == 6 + 4 + 2
    parts = [legacy[i] for i in range(6)] + [gray[i] for i in range(4)] + [encoded[i] for i in range(2)]
    for i, (tensor, label) in enumerate(parts):
        got, got_label = ds[i]
        assert torch.equal(got, tensor) and got_label == label
    assert torch.equal(ds[-1][0], encoded[1][0]) and ds[-5][1] == gray[1][1] == -1
    with pytest.raises(IndexError):
        ds[12]
    batch = [11, 0, 7, -1, 6, 3]  # what a DataLoader hands __getitems__: parts interleaved
    for (got, got_label), i in zip(ds.__getitems__(batch), batch, strict=True):
        expected, label = ds[i]
        assert torch.equal(got, expected) and got_label == label
    loader = DataLoader(ds, batch_size=5, sampler=[11, 0, 7, 6, 3], collate_fn=list)
    assert [label for batch in loader for _, label in batch] == [ds[i][1] for i in (11, 0, 7, 6, 3)]


def test_datasets_over_one_lmdb_share_its_environment(legacy_rgb_lmdb):
    path, _, images, _ = legacy_rgb_lmdb
    train = LmdbDataset_train(path, output="tensor")
    train[0]  # py-lmdb refuses a second open of these files in this process
    val = LmdbDataset_train(path)  # scans the keys through the open environment
    doubled = train + train
    assert len(doubled) == 12 and torch.equal(doubled[7][0], train[1][0])
    assert np.array_equal(np.asarray(val[3][0]), images[3]) and val.reader._env is train.reader._env


def test_no_reader_table_so_no_max_readers(legacy_rgb_lmdb):
    # lock=False keeps no reader table: far more read transactions than LMDB's default reader-table
    # size (126) are open at once, so a `max_readers` could not have any effect and there is none.
    path, _, _, _ = legacy_rgb_lmdb
    ds = LmdbDataset_train(path)
    ds[0]
    transactions = [ds.reader._env.begin() for _ in range(300)]
    assert all(txn.stat()["entries"] == 6 for txn in transactions)
    for txn in transactions:
        txn.abort()
    with pytest.raises(TypeError, match="max_readers"):
        LmdbDataset_train(path, max_readers=2048)


# ---------------------------------------------------------------- workers, samplers, pickling


def fork_and_spawn():
    methods = multiprocessing.get_all_start_methods()
    return [m for m in ("fork", "spawn") if m in methods]


@pytest.mark.parametrize("start_method", fork_and_spawn())
def test_dataloader_workers_return_what_one_process_does(legacy_rgb_lmdb, gray_lmdb, start_method):
    tensors = LmdbDataset_train(legacy_rgb_lmdb[0], Scale(0.5), output="tensor") + LmdbDataset_train(
        gray_lmdb[0], Scale(0.5), gray_lmdb[1], output="tensor", mode="RGB"
    )
    pil = LmdbDataset_train(legacy_rgb_lmdb[0], pil_to_array, target_transform=label_plus_100)
    for ds in (tensors, pil):
        ds[0]  # the parent has opened its env: forked workers must open their own
        expected = list(DataLoader(ds, batch_size=3, num_workers=0))
        loader = DataLoader(
            ds, batch_size=3, num_workers=2, multiprocessing_context=multiprocessing.get_context(start_method)
        )
        got = list(loader)
        assert len(got) == len(expected)
        for (images, labels), (want_images, want_labels) in zip(got, expected, strict=True):
            assert torch.equal(images, want_images) and torch.equal(labels, want_labels)


def test_distributed_sampler_covers_the_dataset_once(legacy_rgb_lmdb, gray_lmdb):
    ds = LmdbDataset_train(legacy_rgb_lmdb[0], output="tensor") + LmdbDataset_train(
        gray_lmdb[0], None, gray_lmdb[1], output="tensor", mode="RGB"
    )
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=7)
        sampler.set_epoch(3)
        indices = list(sampler)
        assert len(indices) == len(ds) // 2
        for _, labels in DataLoader(ds, batch_size=2, sampler=sampler):
            seen += labels.tolist()
        seen_indices = set(indices)
        assert len(seen_indices) == len(indices)
        if rank == 0:
            first = seen_indices
    assert first.isdisjoint(seen_indices) and first | seen_indices == set(range(len(ds)))
    assert sorted(seen) == sorted([ds[i][1] for i in range(len(ds))])


def test_pickling_after_use_leaves_the_environment_behind(legacy_rgb_lmdb):
    ds = LmdbDataset_train(legacy_rgb_lmdb[0], output="tensor")
    first, _ = ds[0]
    assert ds.reader._env is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.reader._env is None and ds.reader._env is not None
    assert torch.equal(clone[0][0], first) and clone.reader._env is not None


def read_in_child(ds, queue) -> None:
    inherited = ds.reader._env
    image, _ = ds[0]
    queue.put((ds.reader._env is not inherited, ds.reader._pid == os.getpid(), image.tolist()))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform")
def test_an_environment_that_crosses_fork_is_reopened(legacy_rgb_lmdb):
    ds = LmdbDataset_train(legacy_rgb_lmdb[0], output="tensor")
    first, _ = ds[0]
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=read_in_child, args=(ds, queue))
    child.start()
    reopened, own_pid, pixels = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0 and reopened and own_pid
    assert pixels == first.tolist()


# ---------------------------------------------------------------- repr


def test_repr_follows_torchvision(legacy_rgb_lmdb, encoded_lmdb):
    ds = LmdbDataset_train(legacy_rgb_lmdb[0], Scale(0.5), target_transform=label_plus_100)
    lines = repr(ds).splitlines()
    assert lines[:7] == [
        "Dataset LmdbDataset_train",
        "    Number of datapoints: 6",
        f"    Root location: {legacy_rgb_lmdb[0]}",
        "    Keys file: None (keys scanned from the LMDB)",
        "    Encoded: False (first record)",
        "    Output: pil",
        "    Target: label",
    ]
    assert lines[7] == "    Transform: Scale(factor=0.5)"
    assert lines[8].startswith("    Target transform: <function label_plus_100")
    keyed = repr(LmdbDataset_train(encoded_lmdb[0], None, encoded_lmdb[1], output="tensor", target="both"))
    assert f"    Keys file: {encoded_lmdb[1]}" in keyed and "    Encoded: True (first record)" in keyed
    assert "    Output: tensor" in keyed and "    Target: both" in keyed and "Transform" not in keyed


def test_empty_lmdb(tmp_path):
    ds = LmdbDataset_train(write_lmdb(tmp_path / "empty_lmdb", {}))
    assert len(ds) == 0 and ds.encoded is None and "    Encoded: unknown (first record)" in repr(ds)
    with pytest.raises(IndexError):
        ds[0]


# ---------------------------------------------------------------- errors: one line, naming the LMDB and the key


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_path_and_non_lmdb(tmp_path):
    with pytest.raises(LmdbFormatError, match="LMDB not found") as excinfo:
        LmdbDataset_train(tmp_path / "missing")
    assert str(tmp_path / "missing") in one_line(excinfo)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmdbFormatError, match="empty: not an LMDB"):
        LmdbDataset_train(tmp_path / "empty", None, tmp_path / "no_keys.npy")
    (tmp_path / "junk.lmdb").write_bytes(b"not an lmdb" * 100)
    with pytest.raises(LmdbFormatError, match="junk.lmdb: not a readable LMDB"):
        LmdbDataset_train(tmp_path / "junk.lmdb")


def test_key_in_keys_file_but_not_in_lmdb(legacy_rgb_lmdb, tmp_path):
    path, keys, _, _ = legacy_rgb_lmdb
    keys_path = save_keys(tmp_path / "k.npy", [*keys, b"00000009_class0/lost.jpg"])
    with pytest.warns(KeysFileWarning, match="k.npy: keys file has 7 keys but the LMDB .* has 6 entries"):
        ds = LmdbDataset_train(path, None, keys_path)
    ds[5]
    with pytest.raises(KeysFileError) as excinfo:
        ds[6]
    assert one_line(excinfo) == (
        f"{path}: key b'00000009_class0/lost.jpg' is not in the LMDB (listed in keys file {keys_path})"
    )


def test_keys_file_with_fewer_keys_warns_and_reads(legacy_rgb_lmdb, tmp_path):
    path, keys, images, _ = legacy_rgb_lmdb
    keys_path = save_keys(tmp_path / "k.npy", keys[2:4])
    with pytest.warns(KeysFileWarning, match="2 keys but the LMDB .* has 6 entries"):
        ds = LmdbDataset_train(path, None, keys_path)
    assert len(ds) == 2 and np.array_equal(np.asarray(ds[0][0]), images[2])


@pytest.mark.parametrize("output", ["pil", "tensor"])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"\xff\xff\xff\xff", "not a Datum"),
        (field_varint(15, 1), "not a Datum .* field 15"),
        (
            caffe_pb2.Datum(channels=3, height=5, width=7, data=bytes(100), label=1, encoded=False).SerializeToString(),
            r"raw datum data has 100 bytes, channels\*height\*width = 3\*5\*7 = 105",
        ),
        (caffe_pb2.Datum(data=b"garbage", label=1, encoded=True).SerializeToString(), r"cannot decode image bytes"),
    ],
    ids=["garbage", "unknown-field", "size-mismatch", "undecodable"],
)
def test_bad_records_name_the_lmdb_and_the_key(tmp_path, value, message, output):
    good = caffe_raw_datum(np.zeros((5, 7, 3), np.uint8), 0).SerializeToString()
    path = write_lmdb(tmp_path / "bad_lmdb", {caffe_key(0, "good.jpg"): good, caffe_key(1, "bad.jpg"): value})
    ds = LmdbDataset_train(path, output=output)
    ds[0]
    with pytest.raises(DatumError, match=f"^{path}: key b'00000001_bad.jpg': {message}") as excinfo:
        ds[1]
    one_line(excinfo)


def test_index_out_of_range(legacy_rgb_lmdb):
    path = legacy_rgb_lmdb[0]
    ds = LmdbDataset_train(path)
    for index in (6, -7, 100):
        with pytest.raises(IndexError) as excinfo:
            ds[index]
        assert one_line(excinfo) == f"{path}: index {index} out of range for 6 records"
    with pytest.raises(TypeError, match="indices must be integers, not str"):
        ds["0"]
    assert len(list(ds)) == 6  # the old iteration protocol stops at IndexError


def test_bad_options_are_refused(legacy_rgb_lmdb):
    with pytest.raises(ValueError, match="target must be one of 'label', 'float', 'both', got 'labels'"):
        LmdbDataset_train(legacy_rgb_lmdb[0], target="labels")
    with pytest.raises(ValueError, match="output must be one of 'pil', 'tensor', 'numpy', got 'PIL'"):
        LmdbDataset_train(legacy_rgb_lmdb[0], output="PIL")
    with pytest.raises(ValueError, match="mode must be None or a Pillow mode .* got 'rgb'"):
        LmdbDataset_train(legacy_rgb_lmdb[0], mode="rgb")


def test_reads_what_the_converter_wrote_raw_and_encoded(image_tree, tmp_path):
    from caffe_lmdb.conversion import convert
    from caffe_lmdb.encode import ConvertOptions

    for encoded in (False, True):
        out = tmp_path / f"conv{encoded}.lmdb"
        result = convert(image_tree, out, workers=1, options=ConvertOptions(encoded=encoded))
        dataset = LmdbDataset_train(out, None, result.keys_path)
        assert len(dataset) == 4
        for key, (image, label) in zip(dataset.keys, (dataset[i] for i in range(4)), strict=True):
            relpath = key.decode().split("_", 1)[1]
            with Image.open(image_tree / relpath) as source:
                expected = np.asarray(source.convert("RGB"))
            assert label == (0 if relpath.startswith("cat/") else 1)
            assert np.array_equal(np.asarray(image.convert("RGB")), expected), relpath
        tensor, _ = LmdbDataset_train(out, None, result.keys_path, output="tensor", mode="RGB")[0]
        assert tensor.shape == (3, 5, 7) and tensor.dtype == torch.uint8


def test_readahead_is_chosen_by_record_size_and_batches_prefetch(tmp_path):
    from caffe_lmdb.reader import READAHEAD_MIN_BYTES

    rng = np.random.default_rng(0)
    big = [rng.integers(0, 256, size=(160, 160, 3), dtype=np.uint8) for _ in range(5)]
    small = [rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8) for _ in range(5)]
    assert 3 * 160 * 160 >= READAHEAD_MIN_BYTES > 3 * 8 * 8
    for name, arrays, expected in (("big", big, True), ("small", small, False)):
        path = tmp_path / f"{name}.lmdb"
        write_lmdb(path, {caffe_key(i, f"{i}.png"): caffe_raw_datum(a, i).SerializeToString()
                          for i, a in enumerate(arrays)})
        dataset = LmdbDataset_train(path, output="numpy")
        assert dataset.readahead is expected
        batch = dataset.__getitems__([4, 0, 2])
        assert [label for _, label in batch] == [4, 0, 2]
        for (image, _), i in zip(batch, (4, 0, 2), strict=True):
            assert np.array_equal(image, arrays[i].transpose(2, 0, 1))
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=0)
        assert [int(x) for _, labels in loader for x in labels] == [0, 1, 2, 3, 4]
    assert LmdbDataset_train(tmp_path / "small.lmdb", readahead=True).readahead is True


# ---------------------------------------------------------------- the LMDB replaced under a dataset


def _class_tree(root, rng, count: int, shade: int):
    """`count` 5x7 PNGs in two class folders; `shade` makes the trees tell apart."""
    for i in range(count):
        pixels = np.full((5, 7, 3), shade, np.uint8)
        pixels[0, 0] = rng.integers(0, 256, 3)
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def test_dataset_reused_after_convert_overwrite_fails_naming_the_lmdb(tmp_path, rng):
    """`convert --overwrite` publishes a new LMDB under the same name: old keys must not read it."""
    from caffe_lmdb.conversion import convert

    out = tmp_path / "train.lmdb"
    convert(_class_tree(tmp_path / "old", rng, 8, 10), out, workers=1, progress=False)
    dataset = LmdbDataset_train(out, None, tmp_path / "train_keys.npy", output="numpy")
    worker_copy = pickle.dumps(dataset)  # what a spawned DataLoader worker receives
    dataset[0]  # this process has opened the old LMDB
    convert(_class_tree(tmp_path / "new", rng, 6, 200), out, workers=1, progress=False, overwrite=True)

    with pytest.raises(LmdbFormatError) as excinfo:
        pickle.loads(worker_copy)[0]
    assert one_line(excinfo) == (f"{out}: the LMDB was replaced or rewritten since this dataset was created (its "
                                 "keys would read other records); create the dataset again")
    fresh = LmdbDataset_train(out, None, tmp_path / "train_keys.npy", output="numpy")
    assert len(fresh) == 6 and fresh[0][0][0, 1, 1] == 200  # the new LMDB, not this process's old environment


def test_forked_worker_checks_the_lmdb_it_opens(legacy_rgb_lmdb, tmp_path):
    path = tmp_path / "copy_lmdb"
    shutil.copytree(legacy_rgb_lmdb[0], path)
    dataset = LmdbDataset_train(path)
    replacement = tmp_path / "replacement"
    shutil.copytree(legacy_rgb_lmdb[0], replacement)
    shutil.rmtree(path)
    replacement.rename(path)  # same records, but a new file: the dataset cannot know that the keys still fit
    loader = DataLoader(dataset, batch_size=2, num_workers=1, multiprocessing_context="fork")
    with pytest.raises(LmdbFormatError, match="was replaced or rewritten since this dataset was created"):
        next(iter(loader))


def test_key_ending_in_nul_names_the_lmdb_and_the_key(tmp_path):
    path = write_lmdb(tmp_path / "nul_lmdb", {b"00000000_a.png": b"x", b"00000001_b\x00": b"y"})
    with pytest.raises(KeysFileError) as excinfo:
        LmdbDataset_train(path)
    assert one_line(excinfo).startswith(f"{path}: key b'00000001_b\\x00' ends with a NUL byte")


@pytest.mark.parametrize("output", ["pil", "numpy"])
def test_hostile_payloads_decode_or_raise_naming_lmdb_and_key(hostile_lmdbs, output):
    """A damaged EXIF tag once raised a bare struct.error; a PNG without IDAT is a DatumError naming LMDB and key."""
    _, broken = hostile_lmdbs
    ds = LmdbDataset_train(broken, output=output)
    turned, label = ds[1]  # damaged-exif.jpg: 24 wide x 16 high, EXIF orientation 6
    size = turned.size if output == "pil" else turned.shape[:0:-1]
    assert label == 1 and tuple(size) == (16, 24)
    with pytest.raises(DatumError) as raised:
        ds[2]
    message = str(raised.value)
    assert str(broken) in message and NO_IDAT_KEY in message and "no IDAT chunk" in message
    assert "\n" not in message
