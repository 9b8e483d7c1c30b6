"""write_dataset: every image and target kind, workers 0/1/2 byte-identical, the COCO case end to end."""

from __future__ import annotations

import io
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from caffe_lmdb import ConvertOptions, LmdbDataset_train, convert, load_keys, parse_datum, write_dataset
from caffe_lmdb.conversion import WriteTuning
from caffe_lmdb.dataset_writer import sample_targets
from caffe_lmdb.errors import CaffeLmdbError, ConversionError, InputError


def records(path: Path) -> list[tuple[bytes, bytes]]:
    with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
        return list(txn.cursor())


def noise(rng, h: int, w: int, c: int = 3) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, c) if c > 1 else (h, w), dtype=np.uint8)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def bgr_planes(array: np.ndarray) -> bytes:
    return array[:, :, ::-1].transpose(2, 0, 1).tobytes()


class Samples(torch.utils.data.Dataset):
    """A map-style dataset made of a list (torch Datasets need not be picklable: this one holds a lambda)."""

    def __init__(self, samples):
        self.samples = samples
        self.unpicklable = lambda: None

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def test_every_image_kind_gives_the_same_raw_record(tmp_path, rng):
    pixels = noise(rng, 5, 7)
    file = tmp_path / "a.png"
    file.write_bytes(png(pixels))
    kinds = [Image.fromarray(pixels), pixels, torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),
             png(pixels), file, str(file)]
    write_dataset([(image, 3) for image in kinds], tmp_path / "out.lmdb", workers=0)
    got = records(tmp_path / "out.lmdb")
    assert [key for key, _ in got] == [b"00000000_0", b"00000001_1", b"00000002_2", b"00000003_3",
                                       f"00000004_{file.as_posix()}".encode(), f"00000005_{file.as_posix()}".encode()]
    for _, value in got:
        datum = parse_datum(value)
        assert (datum.channels, datum.height, datum.width, datum.label) == (3, 5, 7, 3)
        assert datum.data == bgr_planes(pixels)
    assert load_keys(tmp_path / "out_keys.npy").tolist() == [key for key, _ in got]


def test_gray_images_and_encoded_kinds(tmp_path, rng):
    gray = noise(rng, 4, 6, 1)
    samples = [(gray, 1), (torch.from_numpy(gray)[None], 2), (gray[:, :, None], 3)]
    write_dataset(samples, tmp_path / "g.lmdb", workers=0, options=ConvertOptions(gray=True))
    for _, value in records(tmp_path / "g.lmdb"):
        datum = parse_datum(value)
        assert (datum.channels, datum.height, datum.width) == (1, 4, 6) and datum.data == gray.tobytes()
    write_dataset(samples, tmp_path / "c.lmdb", workers=0)  # without gray, as convert stores a gray file: 3 planes
    for _, value in records(tmp_path / "c.lmdb"):
        assert parse_datum(value).data == gray.tobytes() * 3
    pixels = noise(rng, 5, 7)
    file_bytes = png(pixels)
    write_dataset([(file_bytes, 0), (Image.fromarray(pixels), 1)], tmp_path / "e.lmdb",
                  options=ConvertOptions(encoded=True), workers=0)
    first, second = (parse_datum(value) for _, value in records(tmp_path / "e.lmdb"))
    assert first.encoded and first.data == file_bytes  # file bytes are kept, as convert keeps them
    assert second.encoded and np.array_equal(np.asarray(Image.open(io.BytesIO(second.data))), pixels)
    assert Image.open(io.BytesIO(second.data)).format == "PNG"  # no encode_type: decoded images go lossless
    write_dataset([(Image.fromarray(pixels), 1)], tmp_path / "j.lmdb", options=ConvertOptions(encode_type="jpg"),
                  workers=0)
    ((_, value),) = records(tmp_path / "j.lmdb")
    assert Image.open(io.BytesIO(parse_datum(value).data)).format == "JPEG"


@pytest.mark.parametrize("target, label, floats", [
    (7, 7, []),
    (np.int64(2), 2, []),
    (torch.tensor(4), 4, []),
    ([1, 0.5, 2], 1, [1, 0.5, 2]),
    (np.array([0.0, 1.0, 1.0], dtype=np.float32), 0, [0, 1, 1]),
    (torch.tensor([2.0, 0.25]), 2, [2, 0.25]),
    ([5], 5, []),  # one column is the label alone, as in a list file
    ((3, [0.5, 0.125]), 3, [0.5, 0.125]),
    ((3, torch.tensor([0.75])), 3, [0.75]),
])
def test_every_target_kind(tmp_path, rng, target, label, floats):
    write_dataset([(noise(rng, 2, 3), target)], tmp_path / "t.lmdb", workers=0)
    ((_, value),) = records(tmp_path / "t.lmdb")
    datum = parse_datum(value)
    assert datum.label == label and list(datum.float_data) == floats


def test_targets_match_the_list_file_rule(tmp_path, rng):
    """A multi-column list file and the same targets from Python give the same records."""
    root = tmp_path / "imgs"
    root.mkdir()
    files = []
    for i in range(3):
        files.append(root / f"{i}.png")
        files[-1].write_bytes(png(noise(rng, 3, 4)))
    rows = [(1, 0.5, 2.0), (0, 1.0, 0.0), (3, 0.25, 1.5)]
    (tmp_path / "list.txt").write_text("".join(f"{i}.png {' '.join(map(str, r))}\n" for i, r in enumerate(rows)))
    convert(None, tmp_path / "list.lmdb", list_file=tmp_path / "list.txt", root=root, workers=0)
    write_dataset([(f.read_bytes(), list(r)) for f, r in zip(files, rows, strict=True)], tmp_path / "py.lmdb", workers=0,
                  key=lambda i, sample: f"{i}.png")
    assert records(tmp_path / "list.lmdb") == records(tmp_path / "py.lmdb")
    assert (tmp_path / "list_keys.npy").read_bytes() == (tmp_path / "py_keys.npy").read_bytes()


@pytest.mark.parametrize("target, message", [
    (2.5, "not a whole number"),
    ([0.5, 1.0], "not a whole number"),
    ("cat", "must be"),
    ([1, float("nan")], "finite 32-bit float"),
    (2**31, "int32"),
    ([[1, 2]], "one-dimensional"),
])
def test_bad_targets_are_refused_with_a_reason(target, message):
    with pytest.raises(ValueError, match=message):
        sample_targets(target)


def test_workers_give_byte_identical_output(tmp_path, rng):
    samples = Samples([(Image.fromarray(noise(rng, 5 + i % 3, 7)), [i % 2, 0.5, i]) for i in range(40)]
                      + [("missing.png", 1)])
    outputs = []
    for workers in (0, 1, 2):
        out = tmp_path / f"w{workers}.lmdb"
        write_dataset(samples, out, workers=workers, tuning=WriteTuning(ring_bytes=1 << 16, commit_bytes=1 << 12))
        outputs.append(((out / "data.mdb").read_bytes(), (tmp_path / f"w{workers}_keys.npy").read_bytes(),
                        (tmp_path / f"w{workers}_skipped.txt").read_text()))
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(load_keys(tmp_path / "w0_keys.npy")) == 40
    assert outputs[0][2].startswith("40\t")


def test_commit_every_comes_from_tuning_and_never_changes_the_records(tmp_path, rng):
    samples = Samples([(noise(rng, 3, 4), i % 2) for i in range(9)])  # 9 >= 4 x 2 workers: read in workers
    write_dataset(samples, tmp_path / "one.lmdb", workers=0)
    write_dataset(samples, tmp_path / "two.lmdb", workers=2, tuning=WriteTuning(commit_every=2))
    assert records(tmp_path / "two.lmdb") == records(tmp_path / "one.lmdb")
    assert (tmp_path / "two_keys.npy").read_bytes() == (tmp_path / "one_keys.npy").read_bytes()
    transactions = {}
    for name in ("one", "two"):
        with lmdb.open(str(tmp_path / f"{name}.lmdb"), readonly=True, lock=False) as env:
            transactions[name] = env.info()["last_txnid"]
    assert transactions == {"one": 1, "two": 5}  # 9 records: one transaction of up to 1000, or five of <= 2
    with pytest.raises(InputError, match="commit_every must be >= 1"):
        write_dataset(samples, tmp_path / "zero.lmdb", workers=0, tuning=WriteTuning(commit_every=0))
    assert not (tmp_path / "zero.lmdb").exists()


def test_coco_like_dataset_reads_back_identical(tmp_path, rng):
    """The recipe this project grew from: PIL images with 80-class multi-hot targets."""
    multi_hot = [torch.from_numpy((rng.random(80) < 0.05).astype(np.float32)) for _ in range(12)]
    images = [Image.fromarray(noise(rng, 6 + i % 4, 9)) for i in range(12)]
    write_dataset(Samples(list(zip(images, multi_hot, strict=True))), tmp_path / "coco.lmdb", workers=2,
                  classes=[f"class{i}" for i in range(80)])
    dataset = LmdbDataset_train(tmp_path / "coco.lmdb", target="float")
    assert len(dataset) == 12
    for i in range(12):
        image, target = dataset[i]
        assert np.array_equal(np.asarray(image), np.asarray(images[i]))
        assert torch.equal(target, multi_hot[i])
    assert (tmp_path / "coco_classes.txt").read_text().splitlines()[79] == "class79"


def test_bad_samples_are_skipped_by_index_or_fail_under_strict(tmp_path, rng):
    class Broken(Samples):
        def __getitem__(self, index):
            if index == 2:
                raise KeyError("no annotation")
            return super().__getitem__(index)

    good = (noise(rng, 2, 2), 0)
    samples = Broken([good, (b"not an image", 0), good, (np.zeros((2, 2), np.float32), 0), good, "no pair"])
    result = write_dataset(samples, tmp_path / "s.lmdb", workers=0)
    assert (result.written, result.skipped) == (2, 4)
    skipped = (tmp_path / "s_skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in skipped] == ["1", "2", "3", "5"]
    assert "raised KeyError" in skipped[1] and "uint8" in skipped[2] and "(image, target) pair" in skipped[3]
    assert load_keys(tmp_path / "s_keys.npy").tolist() == [b"00000000_0", b"00000004_4"]
    with pytest.raises(ConversionError, match=r"^sample 1: .*\(strict\)$"):
        write_dataset(samples, tmp_path / "strict.lmdb", workers=0, strict=True)
    assert not (tmp_path / "strict.lmdb").exists() and not (tmp_path / "strict_keys.npy").exists()


def test_iterables_are_streamed_in_their_order(tmp_path, rng):
    pixels = [noise(rng, 3, 3) for _ in range(5)]

    def generate():
        for i, p in enumerate(pixels):
            yield p, i

    write_dataset(generate(), tmp_path / "it.lmdb", key=lambda i, sample: f"img{i}.png")
    got = records(tmp_path / "it.lmdb")
    assert [key for key, _ in got] == [f"{i:08d}_img{i}.png".encode() for i in range(5)]
    assert [parse_datum(v).data for _, v in got] == [bgr_planes(p) for p in pixels]

    def failing():
        yield pixels[0], 0
        raise RuntimeError("shard unreachable")

    with pytest.raises(ConversionError, match="sample 1: iterating the dataset raised RuntimeError"):
        write_dataset(failing(), tmp_path / "fail.lmdb")
    assert not (tmp_path / "fail.lmdb").exists()


def test_same_guarantees_as_convert(tmp_path, rng):
    out = tmp_path / "out.lmdb"
    write_dataset([(noise(rng, 2, 2), 0)] * 3, out, workers=0)
    with pytest.raises(InputError, match="already exists"):
        write_dataset([(noise(rng, 2, 2), 1)], out, workers=0)
    write_dataset([(noise(rng, 2, 2), 1)], out, workers=0, overwrite=True, tuning=WriteTuning(initial_map_size=1 << 16))
    assert len(records(out)) == 1
    big = [(noise(rng, 64, 64), i) for i in range(40)]  # 480 KiB through a 64 KiB map: it must grow
    write_dataset(big, tmp_path / "big.lmdb", workers=0, tuning=WriteTuning(initial_map_size=1 << 16))
    assert len(records(tmp_path / "big.lmdb")) == 40
    with pytest.raises(CaffeLmdbError, match="no samples"):
        write_dataset([], tmp_path / "empty.lmdb")
    with pytest.raises(ConversionError, match="no sample could be stored"):
        write_dataset([(b"", 0)], tmp_path / "none.lmdb")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.lmdb", "big_keys.npy", "out.lmdb", "out_keys.npy"]


def test_zero_height_or_width_images_are_skipped_not_stored(tmp_path, rng):
    from caffe_lmdb.inspection import verify

    good = (noise(rng, 2, 3), 0)
    samples = [good, (np.zeros((0, 5, 3), np.uint8), 1), (Image.new("RGB", (4, 0)), 1), good,
               (torch.zeros((3, 5, 0), dtype=torch.uint8), 1), (np.zeros((6, 0), np.uint8), 1)]
    for encoded in (False, True):
        out = tmp_path / f"e{int(encoded)}.lmdb"
        result = write_dataset(samples, out, workers=0, options=ConvertOptions(encoded=encoded))
        assert (result.written, result.skipped) == (2, 4)
        skipped = (tmp_path / f"e{int(encoded)}_skipped.txt").read_text().splitlines()
        assert [line.split("\t")[0] for line in skipped] == ["1", "2", "4", "5"]
        assert all("a record needs at least 1x1" in line for line in skipped), skipped
        assert "image is 5x0 pixels" in skipped[0] and "image is 4x0 pixels" in skipped[1]
        assert load_keys(tmp_path / f"e{int(encoded)}_keys.npy").tolist() == [b"00000000_0", b"00000003_3"]
        assert verify(out).ok


@pytest.mark.parametrize("workers", [0, 2])
def test_an_exception_in_key_fails_that_sample_in_one_line(tmp_path, rng, workers):
    def key(index, sample):
        if index in (1, 5):
            raise RuntimeError(f"no name for {index}")
        return f"img{index}"

    samples = Samples([(noise(rng, 2, 2), i) for i in range(8)])  # 8 >= 2 x 2 workers: read in worker processes
    result = write_dataset(samples, tmp_path / "k.lmdb", workers=workers, key=key)
    assert (result.written, result.skipped) == (6, 2)
    assert result.skipped_files == [("1", "key(1, sample) raised RuntimeError: no name for 1"),
                                    ("5", "key(5, sample) raised RuntimeError: no name for 5")]
    with pytest.raises(ConversionError) as info:
        write_dataset(samples, tmp_path / "strict.lmdb", workers=workers, key=key, strict=True)
    assert str(info.value) == "sample 1: key(1, sample) raised RuntimeError: no name for 1 (strict)"

    def broken(index, sample):
        return {}["name"]

    with pytest.raises(ConversionError) as info:
        write_dataset(samples, tmp_path / "none.lmdb", workers=workers, key=broken)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.endswith("no sample could be stored (8 skipped; the first, sample 0: key(0, sample) raised "
                            "KeyError: 'name')")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.lmdb", "k_keys.npy", "k_skipped.txt"]
