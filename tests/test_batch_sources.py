"""CaffeLoader over other image layouts (`batch_sources.LayoutSource`): the same images give the same batches.

The same PNG files and int labels are written into a Caffe Datum LMDB (`write_dataset`, encoded)
and into a folder2lmdb LMDB (`str(i)` keys, pickled `(file bytes, label)` values, `__keys__` and
`__len__`); the same pixels into a raw Datum LMDB and a tensorpack LMDB (`%08d` keys, pickled
`[BGR array, label]` datapoints, as `cv2.imread` gives them, and `__keys__`). The loader's batches
must be equal, byte for byte, between the two LMDBs of a pair, for any workers and output.
"""

from __future__ import annotations

import io
import pickle

import lmdb
import numpy as np
import pytest
import torch
from conftest import write_lmdb
from PIL import Image

from caffe_lmdb import LmdbDataset, LmdbDataset_train, caffe_pb2, open_tree, write_dataset
from caffe_lmdb.datum import parse_datum
from caffe_lmdb.encode import ConvertOptions
from caffe_lmdb.errors import DatumError, InputError, KeysFileError
from caffe_lmdb.loader import CaffeLoader
from caffe_lmdb.transform import CaffeTransform

COUNT, HEIGHT, WIDTH, CROP, BATCH = 26, 20, 24, 16, 5  # 26 = 5 x 5 + 1: a short last batch


def write_folder2lmdb(path, samples: list[tuple[bytes, int]]):
    """folder2lmdb's layout: `str(i)` keys, pickled `(image file bytes, label)`, `__keys__` and `__len__`."""
    keys = [str(i).encode() for i in range(len(samples))]
    records = {key: pickle.dumps(sample, protocol=4) for key, sample in zip(keys, samples, strict=True)}
    records[b"__keys__"] = pickle.dumps(keys, protocol=4)
    records[b"__len__"] = pickle.dumps(len(keys), protocol=4)
    return write_lmdb(path, records)


def write_tensorpack(path, datapoints: list[list]):
    """tensorpack's LMDBSerializer layout: `%08d` keys, pickled `[image, label]` datapoints, `__keys__`."""
    keys = [b"%08d" % i for i in range(len(datapoints))]
    records = {key: pickle.dumps(point, protocol=4) for key, point in zip(keys, datapoints, strict=True)}
    records[b"__keys__"] = pickle.dumps(keys, protocol=4)
    return write_lmdb(path, records)


def write_crnn(path, texts: list[str], image: bytes):
    """The OCR layout: `image-%09d` / `label-%09d` from 1 and `num-samples`; text targets."""
    records = {b"num-samples": str(len(texts)).encode()}
    for i, text in enumerate(texts, start=1):
        records[b"image-%09d" % i] = image
        records[b"label-%09d" % i] = text.encode()
    return write_lmdb(path, records)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def lmdbs(tmp_path_factory) -> dict:
    """Two pairs of LMDBs holding the same samples (see the module docstring), and a mean file."""
    root = tmp_path_factory.mktemp("layouts")
    rng = np.random.default_rng(11)
    pixels = [rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(COUNT)]
    labels = [int(i * 7 % 5) for i in range(COUNT)]
    datum_png = root / "datum_png.lmdb"
    write_dataset([(_png(p), label) for p, label in zip(pixels, labels, strict=True)], datum_png,
                  options=ConvertOptions(encoded=True, encode_type="png"), workers=0)
    dataset = LmdbDataset_train(datum_png)
    env = lmdb.open(str(datum_png), readonly=True, lock=False)
    with env.begin() as txn:
        stored = [parse_datum(txn.get(bytes(key))) for key in dataset.keys]
    env.close()
    assert all(datum.encoded for datum in stored) and [datum.label for datum in stored] == labels
    files = [bytes(datum.data) for datum in stored]  # the very PNG bytes of the Datum LMDB
    datum_raw = root / "datum_raw.lmdb"
    write_dataset(list(zip(pixels, labels, strict=True)), datum_raw, workers=0)
    mean = rng.uniform(0, 255, size=(3, HEIGHT, WIDTH)).astype(np.float32)
    blob = caffe_pb2.BlobProto(num=1, channels=3, height=HEIGHT, width=WIDTH)
    blob.data.extend(mean.ravel().tolist())
    (root / "mean.binaryproto").write_bytes(blob.SerializeToString())
    return {
        "root": root, "labels": labels, "files": files, "mean_file": root / "mean.binaryproto",
        "datum_png": datum_png, "datum_raw": datum_raw,
        "folder2lmdb": write_folder2lmdb(root / "tree" / "a_folder2lmdb", list(zip(files, labels, strict=True))),
        "tensorpack": write_tensorpack(root / "tree" / "b_tensorpack",
                                       [[p[:, :, ::-1].copy(), label] for p, label in zip(pixels, labels, strict=True)]),
    }


def run(loader) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every batch of one epoch, cloned, with its crop offsets (a batch is valid only until the next one)."""
    return [(images.clone(), labels.clone(), loader.last_offsets.clone()) for images, labels in loader]


def assert_same(a, b) -> None:
    assert len(a) == len(b) > 0
    for batch_a, batch_b in zip(a, b, strict=True):
        for x, y in zip(batch_a, batch_b, strict=True):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.numpy().tobytes() == y.numpy().tobytes()


def crop_mirror_mean(lmdbs) -> CaffeTransform:
    return CaffeTransform(CROP, mirror=True, mean_file=lmdbs["mean_file"], scale=0.5)


PAIRS = [("datum_png", "folder2lmdb"), ("datum_raw", "tensorpack")]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("output", ["float32", "uint8"])
@pytest.mark.parametrize("pair", PAIRS, ids=["encoded", "pixels"])
def test_an_int_labelled_layout_gives_the_datum_lmdbs_batches_byte_for_byte(lmdbs, pair, output, workers):
    datum, other = pair
    layout = LmdbDataset(lmdbs[other])
    assert layout.layout.name == other
    batches = []
    for source in (LmdbDataset_train(lmdbs[datum]), layout):
        loader = CaffeLoader(source, BATCH, transform=crop_mirror_mean(lmdbs), shuffle=True, seed=3,
                             num_workers=workers, output=output)
        assert loader.sample_shape == (3, CROP, CROP)
        batches.append(run(loader))
        loader.close()
    assert_same(*batches)
    assert sorted(torch.cat([labels for _, labels, _ in batches[1]]).tolist()) == sorted(lmdbs["labels"])


@pytest.mark.parametrize("options", [{"force_gray": True}, {"force_color": True}, {"rgb": True}])
def test_force_gray_force_color_and_rgb_treat_a_layouts_files_as_encoded_datums(lmdbs, options):
    batches = []
    for source in (lmdbs["datum_png"], LmdbDataset(lmdbs["folder2lmdb"])):
        loader = CaffeLoader(source, BATCH, transform=CaffeTransform(CROP, mirror=True, **options), seed=5)
        assert loader.sample_shape == (1 if options.get("force_gray") else 3, CROP, CROP)
        batches.append(run(loader))
    assert_same(*batches)


def test_without_a_transform_whole_images_in_datum_order(lmdbs):
    loader = CaffeLoader(LmdbDataset(lmdbs["tensorpack"]), BATCH, output="uint8")
    images, labels = next(iter(loader))
    first = np.asarray(Image.open(io.BytesIO(lmdbs["files"][0])).convert("RGB"))
    assert images[0].numpy().tobytes() == first.transpose(2, 0, 1)[::-1].tobytes()  # BGR planes, as a raw Datum
    assert labels.tolist() == lmdbs["labels"][:BATCH]


def test_sums_mixing_layouts_and_datum_datasets_and_open_tree(lmdbs):
    transform = crop_mirror_mean(lmdbs)

    def batches(source, workers):
        return run(CaffeLoader(source, BATCH, transform=transform, shuffle=True, num_workers=workers))

    datum = batches(LmdbDataset_train(lmdbs["datum_png"]) + LmdbDataset_train(lmdbs["datum_raw"]), 0)
    assert_same(datum, batches(LmdbDataset(lmdbs["folder2lmdb"]) + LmdbDataset_train(lmdbs["datum_raw"]), 2))
    assert_same(datum, batches(LmdbDataset_train(lmdbs["datum_png"]) + LmdbDataset(lmdbs["tensorpack"]), 0))
    assert_same(datum, batches(open_tree(lmdbs["root"] / "tree"), 2))  # folder2lmdb, then tensorpack
    # an LmdbDataset of a Datum LMDB is read as Datums (the raw fast path)
    assert_same(datum, batches(LmdbDataset(lmdbs["datum_png"]) + LmdbDataset(lmdbs["datum_raw"]), 0))


def test_text_targets_are_refused_in_one_line_at_construction(lmdbs):
    crnn = write_crnn(lmdbs["root"] / "ocr" / "crnn_lmdb", ["hello", "world"], lmdbs["files"][0])
    for source in (LmdbDataset(crnn), LmdbDataset_train(lmdbs["datum_png"]) + LmdbDataset(crnn),
                   open_tree(lmdbs["root"] / "ocr")):
        with pytest.raises(InputError) as raised:
            CaffeLoader(source, BATCH)
        assert str(raised.value) == (f"{crnn}: crnn targets are text: CaffeLoader needs int labels "
                                     "(read this LMDB with LmdbDataset and a DataLoader)")


@pytest.mark.parametrize("name", ["transform", "target_transform"])
def test_a_layout_dataset_with_its_own_transform_is_refused(lmdbs, name):
    dataset = LmdbDataset(lmdbs["folder2lmdb"], **{name: lambda x: x})
    with pytest.raises(InputError, match=rf"a_folder2lmdb: CaffeLoader reads the records itself; a dataset with a "
                                         rf"{name} would be ignored"):
        CaffeLoader(LmdbDataset_train(lmdbs["datum_png"]) + dataset, BATCH)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_sample_is_one_error_naming_the_lmdb_the_key_and_the_index(lmdbs, tmp_path, workers):
    samples = list(zip(lmdbs["files"][:8], lmdbs["labels"][:8], strict=True))
    samples[6] = (b"not an image", 1)
    bad = write_folder2lmdb(tmp_path / "bad_lmdb", samples)
    loader = CaffeLoader(LmdbDataset(bad), 4, num_workers=workers)
    with pytest.raises(DatumError, match=rf"^{bad}: key b'6' \(index 6\): cannot decode image bytes") as raised:
        run(loader)
    assert "\n" not in str(raised.value)
    points = [[np.frombuffer(data, np.uint8), label] for data, label in samples[:6]]
    points[3][1] = 0.5  # a float label, in a later batch than the first sample that set the shape
    floats = write_tensorpack(tmp_path / "float_lmdb", points)
    with pytest.raises(DatumError, match=rf"^{floats}: key b'00000003' \(index 3\): tensorpack targets are "
                                         r"float32 arrays \(multi-label or regression\): CaffeLoader needs int labels"):
        run(CaffeLoader(LmdbDataset(floats), 4, num_workers=workers))


def test_a_missing_key_names_the_lmdb_the_key_and_the_index(lmdbs, tmp_path):
    path = write_folder2lmdb(tmp_path / "gone_lmdb", [(data, 0) for data in lmdbs["files"][:5]])
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:  # __keys__ lists a key the LMDB does not hold
        txn.put(b"__keys__", pickle.dumps([b"0", b"1", b"9", b"3"], protocol=4))
    env.close()
    with pytest.raises(KeysFileError, match=rf"^{path}: key b'9' \(index 2\) is not in the LMDB"):
        run(CaffeLoader(LmdbDataset(path), 4))


def test_each_key_is_looked_up_once_per_batch(lmdbs, monkeypatch):
    import caffe_lmdb.batch_sources
    from caffe_lmdb.safe_lmdb import get_value

    dataset = LmdbDataset(lmdbs["folder2lmdb"])
    loader = CaffeLoader(dataset, BATCH, transform=crop_mirror_mean(lmdbs))
    looked_up = []

    def counted(txn, key, root):
        looked_up.append(bytes(key))
        return get_value(txn, key, root)

    monkeypatch.setattr(caffe_lmdb.batch_sources, "get_value", counted)
    assert len(run(loader)) == -(-COUNT // BATCH)
    assert sorted(looked_up) == sorted(str(i).encode() for i in range(COUNT))


def test_a_path_of_another_layout_is_read_through_its_layout(lmdbs):
    """CaffeLoader("path") (and loader_from_prototxt's sources) detect the layout: no LmdbDataset wrapper needed."""
    transform = crop_mirror_mean(lmdbs)
    by_path = CaffeLoader([str(lmdbs["folder2lmdb"]), lmdbs["tensorpack"]], BATCH, transform=transform, shuffle=True)
    assert [type(part).__name__ for part in by_path.parts] == ["LmdbDataset", "LmdbDataset"]
    wrapped = CaffeLoader(LmdbDataset(lmdbs["folder2lmdb"]) + LmdbDataset(lmdbs["tensorpack"]), BATCH,
                          transform=transform, shuffle=True)
    assert_same(run(by_path), run(wrapped))
    assert type(CaffeLoader(lmdbs["datum_png"], BATCH).parts[0]).__name__ == "LmdbDataset_train"
