"""`mean`: Caffe's mean.binaryproto checked against numpy, on raw, encoded and hand-written LMDBs."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from conftest import NO_IDAT_KEY, assert_one_line_error, caffe_key, run_cli
from toollmdbs import bgr_planes, converted, hand_written, legacy_encoded, raw_value, same_size_tree

from caffe_lmdb import DatumError, caffe_pb2
from caffe_lmdb.cli import main
from caffe_lmdb.mean import MeanError, _mean_to_blob, lmdb_mean, load_mean, save_mean


@pytest.fixture
def tree(tmp_path, rng):
    return same_size_tree(tmp_path / "src", rng)


def expected_bgr(planes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and per-channel population std of C x H x W BGR arrays, in float64 numpy."""
    stack = np.stack(planes).astype(np.float64)
    return stack.mean(axis=0), stack.transpose(1, 0, 2, 3).reshape(stack.shape[1], -1).std(axis=1)


def read_blob(path) -> caffe_pb2.BlobProto:
    blob = caffe_pb2.BlobProto()
    blob.ParseFromString(path.read_bytes())
    return blob


def test_mean_file_is_what_compute_image_mean_writes(tree, tmp_path, capsys):
    lmdb_path = converted(tree, tmp_path / "train.lmdb")
    mean, _ = expected_bgr([bgr_planes(p) for p in sorted(tree.rglob("*.png"))])
    out = tmp_path / "mean.binaryproto"
    assert main(["mean", str(lmdb_path), "-o", str(out), "-q"]) == 0
    blob = read_blob(out)
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 5, 7)
    assert not blob.HasField("shape") and len(blob.diff) == 0 and len(blob.double_data) == 0
    np.testing.assert_allclose(np.asarray(blob.data).reshape(3, 5, 7), mean, rtol=1e-6)
    printed = capsys.readouterr().out.splitlines()
    planes = [bgr_planes(p) for p in sorted(tree.rglob("*.png"))]
    assert printed[1:] == compute_image_mean_log(planes)


def compute_image_mean_log(planes: list[np.ndarray]) -> list[str]:
    """A transcription of tools/compute_image_mean.cpp's sums and log lines, float by float.

    `sum_blob` is a BlobProto (float data): each uint8 pixel is added to a float, the sums are
    divided by the count in float, then each channel's values are added one at a time into a
    float and divided by H*W; `LOG(INFO) << float` prints 6 significant digits.
    """
    sums = np.zeros(planes[0].shape, np.float32)
    for record in planes:
        sums = (sums + record.astype(np.float32)).astype(np.float32)  # elementwise float adds
    mean = (sums / np.float32(len(planes))).astype(np.float32)
    channels, height, width = mean.shape
    lines = [f"Number of channels: {channels}"]
    for c in range(channels):
        value = np.float32(0.0)
        for v in mean[c].ravel():
            value = np.float32(value + v)
        lines.append(f"mean_value channel [{c}]: {float(value / np.float32(height * width)):g}")
    return lines


def test_printed_channel_means_are_caffes_float_sums(tmp_path, capsys):
    rng = np.random.default_rng(9)  # a case where float32 and float64 sums print differently
    planes = [rng.integers(0, 256, (3, 40, 50), dtype=np.uint8) for _ in range(3)]
    lmdb_path = hand_written(tmp_path / "m.lmdb", {caffe_key(i, f"{i}.png"): raw_value(p.transpose(1, 2, 0)[:, :, ::-1], 0)
                                                   for i, p in enumerate(planes)})
    assert main(["mean", str(lmdb_path), "-o", str(tmp_path / "m.binaryproto"), "-q"]) == 0
    printed = capsys.readouterr().out.splitlines()[1:]
    expected = compute_image_mean_log(planes)
    assert printed == expected
    float64 = np.stack(planes).astype(np.float64).mean(axis=0)
    assert printed != ["Number of channels: 3"] + [f"mean_value channel [{c}]: {float64[c].mean():g}" for c in range(3)]
    blob = read_blob(tmp_path / "m.binaryproto")  # the blob itself is Caffe's float sums / count, exactly
    sums = np.zeros((3, 40, 50), np.float32)
    for p in planes:
        sums = sums + p.astype(np.float32)
    assert np.array_equal(np.asarray(blob.data, np.float32).reshape(3, 40, 50), sums / np.float32(3))


def test_json_stats_are_rgb_scaled_for_normalize(tree, tmp_path):
    lmdb_path = converted(tree, tmp_path / "train.lmdb")
    mean, std = expected_bgr([bgr_planes(p) for p in sorted(tree.rglob("*.png"))])
    stats_path = tmp_path / "stats.json"
    assert main(["mean", str(lmdb_path), "-o", str(tmp_path / "m.binaryproto"), "--json", str(stats_path)]) == 0
    stats = json.loads(stats_path.read_text())
    assert stats["channel_order"] == "RGB" and (stats["records"], stats["height"], stats["width"]) == (6, 5, 7)
    np.testing.assert_allclose(stats["mean"], mean.mean(axis=(1, 2))[::-1] / 255, rtol=1e-12)
    np.testing.assert_allclose(stats["std"], std[::-1] / 255, rtol=1e-9)


def test_encoded_records_give_the_raw_mean(tree, tmp_path):
    raw = lmdb_mean(converted(tree, tmp_path / "raw.lmdb"))
    encoded = lmdb_mean(converted(tree, tmp_path / "enc.lmdb", encoded=True))
    np.testing.assert_array_equal(raw.mean, encoded.mean)
    np.testing.assert_array_equal(raw.channel_std, encoded.channel_std)


def test_hand_written_lmdbs(legacy_rgb_lmdb, tmp_path, rng):
    path, _, images, _ = legacy_rgb_lmdb
    mean, std = expected_bgr([image[:, :, ::-1].transpose(2, 0, 1) for image in images])
    result = lmdb_mean(path)
    assert result.count == 6
    np.testing.assert_allclose(result.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(result.channel_std, std, rtol=1e-9)
    enc_path, enc_images = legacy_encoded(tmp_path / "enc", rng)
    expected, _ = expected_bgr([image[:, :, ::-1].transpose(2, 0, 1) for image in enc_images])
    np.testing.assert_allclose(lmdb_mean(enc_path).mean, expected, rtol=1e-12)


def test_gray_records_give_one_channel(tmp_path, rng):
    images = [rng.integers(0, 256, size=(4, 6), dtype=np.uint8) for _ in range(3)]
    path = hand_written(tmp_path / "mnist", {b"%08d" % i: raw_value(p, i) for i, p in enumerate(images)})
    result = lmdb_mean(path)
    np.testing.assert_allclose(result.mean[0], np.mean(images, axis=0))
    assert result.normalize_stats()["channel_order"] == "L"


def test_differing_sizes_name_the_first_offending_key(tmp_path, rng, capsys):
    records = {
        caffe_key(0, "a.jpg"): raw_value(rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8), 0),
        caffe_key(1, "b.jpg"): raw_value(rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8), 0),
        caffe_key(2, "t.jpg"): raw_value(rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8), 0),  # same C*H*W
        caffe_key(3, "c.jpg"): raw_value(rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8), 0),
    }
    path = hand_written(tmp_path / "mixed", records)
    out = tmp_path / "mean.binaryproto"
    assert main(["mean", str(path), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err
    assert "key b'00000002_t.jpg': size 3x7x5 differs from the first record's 3x5x7 (key b'00000000_a.jpg')" in err
    assert not out.exists()


def test_bad_record_and_empty_lmdb(tmp_path):
    path = hand_written(tmp_path / "bad", {caffe_key(0, "a.jpg"): b"\xff junk"})
    with pytest.raises(DatumError, match=r"key b'00000000_a.jpg': not a Datum"):
        lmdb_mean(path)
    with pytest.raises(MeanError, match="no records"):
        lmdb_mean(hand_written(tmp_path / "empty", {}))


# ---------------------------------------------------------------- load_mean

def test_load_mean_round_trip_and_both_layouts(tmp_path, rng):
    mean = rng.random((3, 5, 7)) * 255
    np.testing.assert_allclose(load_mean(save_mean(tmp_path / "legacy.binaryproto", mean)), mean, rtol=1e-6)

    shaped = caffe_pb2.BlobProto()
    shaped.shape.dim.extend([1, 3, 5, 7])
    shaped.data.extend(mean.ravel().tolist())
    (tmp_path / "shaped.binaryproto").write_bytes(shaped.SerializeToString())
    assert load_mean(tmp_path / "shaped.binaryproto").shape == (3, 5, 7)

    doubles = caffe_pb2.BlobProto(num=1, channels=3, height=5, width=7)
    doubles.double_data.extend(mean.ravel().tolist())
    (tmp_path / "double.binaryproto").write_bytes(doubles.SerializeToString())
    loaded = load_mean(tmp_path / "double.binaryproto")
    assert loaded.dtype == np.float64
    np.testing.assert_array_equal(loaded, mean)


def test_load_mean_refuses_what_is_not_a_mean_file(tmp_path):
    with pytest.raises(MeanError, match="not found"):
        load_mean(tmp_path / "missing.binaryproto")
    short = caffe_pb2.BlobProto(num=1, channels=3, height=5, width=7)
    short.data.extend([0.0] * 10)
    (tmp_path / "short.binaryproto").write_bytes(short.SerializeToString())
    with pytest.raises(MeanError, match=r"shape \(1, 3, 5, 7\) does not match its 10 values"):
        load_mean(tmp_path / "short.binaryproto")
    (tmp_path / "junk.binaryproto").write_bytes(b"\xff\xff\xff")
    with pytest.raises(MeanError, match="junk.binaryproto"):
        load_mean(tmp_path / "junk.binaryproto")


# ---------------------------------------------------------------- bit-identical sums, bounded memory

def old_sums(planes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The per-pixel mean and per-plane std as lmdb_mean computed them before its memory bound:
    a float64 copy of each record added in, and an einsum of that copy's squares."""
    total = np.zeros(planes[0].shape, np.float64)
    squares = np.zeros(planes[0].shape[0], np.float64)
    for p in planes:
        values = p.astype(np.float64)
        total += values
        flat = values.reshape(values.shape[0], -1)
        squares += np.einsum("ij,ij->i", flat, flat)
    mean = total / len(planes)
    channel_mean = mean.mean(axis=(1, 2))
    pixels = len(planes) * mean.shape[1] * mean.shape[2]
    return mean, np.sqrt(np.maximum(squares / pixels - channel_mean**2, 0.0))


@pytest.mark.parametrize("kind", ["rgb", "gray", "float"])
def test_mean_is_bit_identical_to_the_float64_copy_sums(tmp_path, rng, kind):
    shape = {"rgb": (3, 300, 301), "gray": (1, 260, 270), "float": (3, 40, 50)}[kind]  # planes over one block
    planes = []
    records = {}
    for i in range(4):
        if kind == "float":
            arr = (rng.random(shape) * 300 - 20).astype(np.float32)
            datum = caffe_pb2.Datum(channels=shape[0], height=shape[1], width=shape[2], label=0)
            datum.float_data.extend(arr.ravel().tolist())
        else:
            arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
            datum = caffe_pb2.Datum(channels=shape[0], height=shape[1], width=shape[2], data=arr.tobytes(), label=0,
                                    encoded=False)
        planes.append(arr)
        records[caffe_key(i, f"{i}.png")] = datum.SerializeToString()
    result = lmdb_mean(hand_written(tmp_path / kind, records))
    mean, std = old_sums(planes)
    np.testing.assert_array_equal(result.mean, mean)
    np.testing.assert_array_equal(result.channel_std, std)


def test_mean_file_bytes_are_what_protobuf_serializes(rng, tmp_path):
    mean = rng.random((3, 5, 7)) * 255
    blob = caffe_pb2.BlobProto(num=1, channels=3, height=5, width=7)
    blob.data.extend(mean.astype(np.float32).ravel().tolist())
    path = save_mean(tmp_path / "m.binaryproto", mean)
    assert path.read_bytes() == blob.SerializeToString()
    assert _mean_to_blob(mean) == blob
    assert [p.name for p in tmp_path.iterdir()] == ["m.binaryproto"]  # no temporary left beside it


#: Runs the command given as its arguments as a child and prints the child's peak RSS (KiB on Linux).
_PEAK_RSS = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss_kib(*cli_args) -> int:
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _PEAK_RSS, sys.executable, "-m", "caffe_lmdb.cli", *map(str, cli_args)],
                          capture_output=True, text=True, env=env, check=True)
    return int(done.stdout)


@pytest.mark.skipif(__import__("sys").platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_mean_of_a_50_megapixel_record_stays_within_a_few_copies_of_it(tmp_path):
    import lmdb

    shape = (3, 4096, 4096)  # 50 MB of pixels in one raw record
    record = caffe_pb2.Datum(channels=shape[0], height=shape[1], width=shape[2], label=0, encoded=False,
                             data=np.arange(np.prod(shape), dtype=np.uint8).tobytes()).SerializeToString()
    big = tmp_path / "big.lmdb"
    env = lmdb.open(str(big), map_size=len(record) + (8 << 20))
    with env.begin(write=True) as txn:
        txn.put(caffe_key(0, "big.png"), record)
    env.close()
    small = hand_written(tmp_path / "small.lmdb", {caffe_key(0, "s.png"): raw_value(np.zeros((5, 7, 3), np.uint8), 0)})
    baseline = peak_rss_kib("mean", small, "-o", tmp_path / "small.binaryproto", "-q")
    peak = peak_rss_kib("mean", big, "-o", tmp_path / "big.binaryproto", "--json", tmp_path / "big.json", "-q")
    # The float64 mean (8 bytes a pixel, returned in MeanResult) and the float32 file bytes (4) are the
    # floor; before the bound, float64 copies and a Python list of the mean took over 50 times the record.
    assert (peak - baseline) * 1024 < 16 * len(record), (peak, baseline)
    assert (tmp_path / "big.binaryproto").stat().st_size == 4 * int(np.prod(shape)) + 15  # + fields 1-5's tags
    assert json.loads((tmp_path / "big.json").read_text())["records"] == 1


# ---------------------------------------------------------------- full disk, decompression bombs

def fill(fs, leave: int = 0) -> None:
    """Fill the file system at `fs` with one file, `filler`, until at most `leave` bytes are free (0: full)."""
    import os

    def free() -> int:
        info = os.statvfs(fs)
        return info.f_bavail * info.f_frsize

    with open(fs / "filler", "wb") as f:
        try:
            while free() > leave:
                f.write(b"\0" * min(64 << 10, max(free() - leave, 4096)))
                f.flush()
        except OSError:  # full
            pass
    assert free() <= leave


def test_mean_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, small_fs, rng):
    from conftest import assert_one_line_error, run_cli

    records = {caffe_key(i, f"{i}.png"): raw_value(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), 0)
               for i in range(2)}
    path = hand_written(tmp_path / "train.lmdb", records)  # the mean file is 768 KiB
    fill(small_fs, leave=256 << 10)
    out = small_fs / "mean.binaryproto"
    result = run_cli("mean", path, "-o", out, "-q")
    assert_one_line_error(result, 1, f"{out}: no space left on device")
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]  # no 0-byte mean file, no temporary


def test_json_on_a_full_disk_takes_back_the_new_mean_file(tmp_path, small_fs, tree):
    lmdb_path = converted(tree, tmp_path / "train.lmdb")
    fill(small_fs)
    out, stats = tmp_path / "mean.binaryproto", small_fs / "stats.json"
    assert main(["mean", str(lmdb_path), "-o", str(out), "--json", str(stats), "-q"]) == 1
    assert not out.exists() and sorted(p.name for p in small_fs.iterdir()) == ["filler"]


def test_encoded_bomb_record_names_the_key_and_the_claimed_size(tmp_path, rng):
    from test_datum import bomb_png
    from toollmdbs import encoded_datum

    records = {caffe_key(0, "a.png"): raw_value(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), 0),
               caffe_key(1, "bomb.png"): encoded_datum(bomb_png(30000, 30000), 0)}
    with pytest.raises(DatumError, match=r"key b'00000001_bomb.png': .*claims a 30000x30000"):
        lmdb_mean(hand_written(tmp_path / "bomb", records))


def test_mean_of_hostile_payloads_decodes_or_names_the_key(hostile_lmdbs, tmp_path):
    """A damaged EXIF tag once crashed `mean` (struct.error): it decodes turned, 3 x 24 x 16 as the PNG beside it."""
    decodable, broken = hostile_lmdbs
    result = run_cli("mean", decodable, "-o", tmp_path / "m.binaryproto", "-q")
    assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr, result.stderr
    assert load_mean(tmp_path / "m.binaryproto").shape == (3, 24, 16)
    result = run_cli("mean", broken, "-o", tmp_path / "b.binaryproto", "-q")
    assert_one_line_error(result, 1, broken, NO_IDAT_KEY, "no IDAT chunk")
    assert not (tmp_path / "b.binaryproto").exists()


# --------------------------------------------------------------------------- outputs that are not regular files

def test_mean_into_a_fifo_and_a_device_writes_them_in_place(tree, tmp_path):
    from conftest import FifoReader, char_device, run_cli

    lmdb_path = converted(tree, tmp_path / "train.lmdb")
    assert main(["mean", str(lmdb_path), "-o", str(tmp_path / "m.binaryproto"), "-q"]) == 0
    node = char_device(tmp_path / "null")
    with FifoReader(tmp_path / "mean.pipe") as reader:
        result = run_cli("mean", lmdb_path, "-o", reader.path, "--json", node, "-q")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert bytes(reader.data) == (tmp_path / "m.binaryproto").read_bytes()
    assert stat.S_ISFIFO(os.lstat(tmp_path / "mean.pipe").st_mode) and stat.S_ISCHR(os.lstat(node).st_mode)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_mean_into_dev_null_leaves_dev_null_a_device(tree, tmp_path):
    from conftest import assert_dev_null_intact, run_cli

    lmdb_path = converted(tree, tmp_path / "train.lmdb")
    result = run_cli("mean", lmdb_path, "-o", "/dev/null", "--json", "/dev/null", "-q")
    assert_dev_null_intact()
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("which", ["-o", "--json"])
def test_mean_into_a_folder_or_an_unread_fifo_is_one_line_and_changes_nothing(tree, tmp_path, which):
    from conftest import assert_one_line_error, run_cli, tree_snapshot

    lmdb_path = converted(tree, tmp_path / "train.lmdb")
    (tmp_path / "adir").mkdir()
    os.mkfifo(tmp_path / "pipe")
    before = tree_snapshot(tmp_path)
    for target, why in (("adir", "is a directory, not a file"), ("pipe", "is a FIFO that no process is reading")):
        outputs = ["-o", tmp_path / target] if which == "-o" else ["-o", tmp_path / "m.bp", "--json", tmp_path / target]
        result = run_cli("mean", lmdb_path, *outputs, "-q")
        message = assert_one_line_error(result, 1, f"{tmp_path / target}: {why}")
        assert " -> " not in message
        assert tree_snapshot(tmp_path) == before
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)
