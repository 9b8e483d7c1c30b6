"""`info` and `verify` on converter-made and hand-written Caffe LMDBs, including broken ones."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import NO_IDAT_KEY, caffe_key, png_bytes, run_cli
from PIL import Image
from toollmdbs import converted, encoded_datum, hand_written, legacy_encoded, raw_value

from caffe_lmdb import KeysFileError, LmdbFormatError, caffe_pb2, save_keys
from caffe_lmdb.cli import main
from caffe_lmdb.datum import read_encoded_header
from caffe_lmdb.inspection import info, verify


@pytest.fixture
def train_lmdb(image_tree, tmp_path):
    """The converter's LMDB of `image_tree`: cat/a.png 5x7, cat/deep/b c.png 6x4, dog/g.png 5x7 gray, dog/x.JPG."""
    return converted(image_tree, tmp_path / "train.lmdb")


# ---------------------------------------------------------------- info

def test_info_on_converter_lmdb(train_lmdb, tmp_path):
    result = info(train_lmdb)
    assert (result.records, result.scanned, result.raw, result.encoded, result.invalid) == (4, 4, 4, 0, 0)
    assert result.shapes == {(3, 5, 7): 2, (3, 6, 4): 1, (3, 16, 24): 1}
    assert result.labels == {0: 2, 1: 2} and result.classes == ["cat", "dog"]
    assert (result.first_key, result.last_key) == (b"00000000_cat/a.png", b"00000003_dog/x.JPG")
    assert result.keys_path == tmp_path / "train_keys.npy" and result.keys_count == 4
    assert result.disk_bytes > 0 and result.payload_bytes > 3 * 5 * 7
    text = str(result)
    assert "4 records" in text and "3x5x7" in text and "cat" in text and "dog" in text


def test_info_on_hand_written_caffe_lmdb(legacy_rgb_lmdb):
    path, keys, _, _ = legacy_rgb_lmdb
    result = info(path)
    assert result.keys_path is None and result.classes is None
    assert result.shapes == {(3, 5, 7): 6} and result.labels == {0: 2, 1: 2, 2: 2}
    assert (result.first_key, result.last_key) == (keys[0], keys[-1])
    assert "keys file: none" in str(result)


def test_info_reads_encoded_dims_from_headers(tmp_path, rng):
    path, _ = legacy_encoded(tmp_path / "enc", rng)
    result = info(path)
    assert (result.raw, result.encoded) == (0, 3)
    assert result.formats == {"PNG": 3} and result.shapes == {(3, 5, 7): 3}


def test_read_encoded_header_applies_exif_rotation_and_gray():
    image = Image.new("RGB", (7, 5))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: decodes 5 wide x 7 high
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    assert read_encoded_header(buf.getvalue()) == ("JPEG", 3, 7, 5, 6)
    assert read_encoded_header(png_bytes(Image.new("L", (7, 5)))) == ("PNG", 1, 5, 7, 1)


def test_info_sample_counts_only_the_sample(train_lmdb):
    result = info(train_lmdb, sample=2, seed=1)
    assert (result.records, result.scanned) == (4, 2) and result.sampled
    assert sum(result.labels.values()) == 2
    assert info(train_lmdb, sample=2, seed=1).labels == result.labels  # seeded


def test_info_json_and_exit_codes(train_lmdb, tmp_path, capsys):
    assert main(["info", str(train_lmdb), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["records"] == 4 and data["first_key"] == "00000000_cat/a.png"
    assert {row["name"] for row in data["labels"]} == {"cat", "dog"}
    assert main(["info", str(tmp_path / "missing.lmdb")]) == 1
    assert "missing.lmdb: LMDB not found" in capsys.readouterr().err
    (tmp_path / "plain").mkdir()
    assert main(["info", str(tmp_path / "plain")]) == 1
    assert "not an LMDB" in capsys.readouterr().err
    assert main(["info", str(train_lmdb), "--sample", "0"]) == 2


def test_info_counts_records_that_are_not_datums(tmp_path, rng, capsys):
    path = hand_written(tmp_path / "bad", {caffe_key(0, "a.jpg"): raw_value(np.zeros((5, 7, 3), np.uint8), 0),
                                           caffe_key(1, "b.jpg"): b"\xff\xff garbage"})
    assert info(path).invalid == 1
    assert main(["info", str(path)]) == 1
    assert "NOT DATUMS: 1 records, first key b'00000001_b.jpg'" in capsys.readouterr().out


# ---------------------------------------------------------------- verify

def test_verify_clean_lmdbs(train_lmdb, legacy_rgb_lmdb, capsys):
    report = verify(train_lmdb, decode=True)
    assert report.ok and report.records == 4 and report.keys_path is not None
    assert main(["verify", str(legacy_rgb_lmdb[0]), "-q"]) == 0
    assert "6 records checked: OK" in capsys.readouterr().out


def test_verify_names_each_bad_record(tmp_path, capsys):
    short = caffe_pb2.Datum(channels=3, height=5, width=7, data=b"\x00" * 100, label=0, encoded=False)
    records = {
        caffe_key(0, "good.jpg"): raw_value(np.zeros((5, 7, 3), np.uint8), 0),
        caffe_key(1, "short.jpg"): short.SerializeToString(),
        caffe_key(2, "junk.jpg"): b"\xff\xff junk",
        caffe_key(3, "empty.jpg"): encoded_datum(b"", 1),
    }
    path = hand_written(tmp_path / "bad", records)
    assert main(["verify", str(path), "-q"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any("key b'00000001_short.jpg'" in line and "100 bytes" in line and "3*5*7 = 105" in line for line in out)
    assert any("key b'00000002_junk.jpg'" in line and "not a Datum" in line for line in out)
    assert any("key b'00000003_empty.jpg'" in line and "empty data" in line for line in out)
    assert not any("good.jpg" in line for line in out)
    assert out[-1].endswith("4 records checked: 3 problems")


def test_verify_decode_finds_undecodable_payloads(tmp_path, capsys):
    payload = png_bytes(Image.new("RGB", (7, 5)))
    path = hand_written(tmp_path / "enc", {caffe_key(0, "ok.png"): encoded_datum(payload, 0),
                                           caffe_key(1, "cut.png"): encoded_datum(payload[:40], 0)})
    assert verify(path).ok  # structure only
    report = verify(path, decode=True)
    assert [key for key, _ in report.problems] == [caffe_key(1, "cut.png")] and report.decoded == 1
    assert main(["verify", str(path), "--decode", "-q"]) == 1
    assert "key b'00000001_cut.png': cannot decode" in capsys.readouterr().out


def test_verify_keys_file_mismatch_names_missing_and_extra_keys(legacy_rgb_lmdb, tmp_path, capsys):
    path, keys, _, _ = legacy_rgb_lmdb
    keys_file = save_keys(tmp_path / "k.npy", [*keys[1:], b"99999999_ghost.jpg", keys[2]])
    report = verify(path, keys_path=keys_file)
    assert report.problems == [
        (b"99999999_ghost.jpg", f"listed in keys file {keys_file} but missing from the LMDB"),
        (keys[2], f"listed twice in keys file {keys_file}"),
        (keys[0], f"in the LMDB but not in keys file {keys_file}"),
    ]
    assert main(["verify", str(path), "--keys", str(keys_file), "-q"]) == 1
    out = capsys.readouterr().out
    assert "key b'99999999_ghost.jpg': listed in keys file" in out and f"key {keys[0]!r}: in the LMDB" in out


def test_verify_picks_up_the_converters_keys_file(train_lmdb, tmp_path):
    save_keys(tmp_path / "train_keys.npy", [b"00000000_cat/a.png"])
    report = verify(train_lmdb)
    assert len(report.problems) == 3 and all("not in keys file" in why for _, why in report.problems)


def test_verify_empty_and_missing(tmp_path):
    assert verify(hand_written(tmp_path / "empty", {})).problems == [(None, "the LMDB has no records")]
    with pytest.raises(LmdbFormatError, match="LMDB not found"):
        verify(tmp_path / "nope")


# ---------------------------------------------------------------- files that are not (readable) LMDBs: one line

@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty (0 bytes"), (b"\x00" * 20000, "not a readable LMDB"), (b"junk" * 5000, "not a readable LMDB")],
    ids=["empty", "zeros", "junk"],
)
def test_info_and_verify_on_a_data_mdb_that_is_no_lmdb(tmp_path, capsys, content, message):
    (tmp_path / "x.lmdb").mkdir()
    (tmp_path / "x.lmdb" / "data.mdb").write_bytes(content)
    for command in ("info", "verify"):
        assert main([command, str(tmp_path / "x.lmdb")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"caffe-lmdb {command}: error: {tmp_path / 'x.lmdb'}: ") and message in err
        assert "\n" not in err


def test_info_on_an_unreadable_data_mdb(train_lmdb, without_file_caps):
    from conftest import assert_one_line_error, run_cli

    (train_lmdb / "data.mdb").chmod(0)
    try:
        result = run_cli("info", train_lmdb, drop_file_caps=True)
    finally:
        (train_lmdb / "data.mdb").chmod(0o644)
    assert_one_line_error(result, 1, train_lmdb / "data.mdb", "permission denied")


def test_info_sample_on_a_key_ending_in_nul_names_the_lmdb(tmp_path):
    path = hand_written(tmp_path / "nul", {caffe_key(0, "a.jpg"): raw_value(np.zeros((5, 7, 3), np.uint8), 0),
                                           b"00000001_b\x00": raw_value(np.zeros((5, 7, 3), np.uint8), 1)})
    with pytest.raises(KeysFileError, match=rf"^{path}: key b'00000001_b\\x00' ends with a NUL byte"):
        info(path, sample=1)


def test_info_on_a_class_file_that_is_not_utf8(train_lmdb, tmp_path, capsys):
    (tmp_path / "train_classes.txt").write_bytes(b"cat\n\xff\xfedog\n")
    assert main(["info", str(train_lmdb)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"caffe-lmdb info: error: {tmp_path / 'train_classes.txt'}: not UTF-8 text (invalid start byte at byte 4)"


def test_verify_finds_labels_the_class_file_does_not_name(train_lmdb):
    classes = train_lmdb.with_name(train_lmdb.name.removesuffix(".lmdb") + "_classes.txt")
    names = classes.read_text().splitlines()
    assert verify(train_lmdb).ok and len(names) > 1
    classes.write_text(names[0] + "\n")  # a class file from another run, as a kill between renames once left
    report = verify(train_lmdb)
    assert not report.ok and any("has no class in the class file (1 classes)" in why for _, why in report.problems)


def test_verify_decode_on_hostile_payloads_names_the_key_never_a_traceback(hostile_lmdbs):
    """A damaged EXIF tag once crashed `verify --decode` (struct.error); a PNG without IDAT is one finding."""
    decodable, broken = hostile_lmdbs
    result = run_cli("verify", decodable, "--decode")
    assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr, result.stderr
    assert "2 encoded images decoded" in result.stdout
    result = run_cli("verify", broken, "--decode")
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr
    findings = [line for line in result.stdout.splitlines() if "key b'" in line]
    assert findings == [f"{broken}: {NO_IDAT_KEY}: cannot decode image bytes (45 bytes): "
                        "PNG has no image data (no IDAT chunk)"], result.stdout


# --------------------------------------------------------------------------- other layouts (LSUN, a test layout)

@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_info_on_lsun_says_the_layout_samples_formats_sizes_and_targets(tmp_path, rng, fmt, capsys):
    from test_lmdb_dataset import make_lsun

    make_lsun(tmp_path / "church_outdoor_train_lmdb", 12, rng, fmt)
    result = info(tmp_path / "church_outdoor_train_lmdb")
    assert result.samples == 12 and result.scanned == 12 and result.formats == {fmt: 12}
    assert result.targets == {"str": 12} and result.examples == ["church_outdoor"] and result.invalid == 0
    assert sum(result.shapes.values()) == 12 and {shape[2] for shape in result.shapes} == {9}
    assert main(["info", str(tmp_path / "church_outdoor_train_lmdb")]) == 0
    out = capsys.readouterr().out
    assert "12 samples (12 LMDB entries), layout lsun (encoded images" in out and f"{fmt} 12" in out
    assert main(["info", str(tmp_path / "church_outdoor_train_lmdb"), "--json", "--sample", "5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 12 and summary["scanned"] == 5 and summary["targets"] == {"str": 5}


def test_verify_reads_every_lsun_sample_and_names_each_bad_key(tmp_path, rng, capsys):
    import lmdb
    from test_lmdb_dataset import make_lsun

    values = make_lsun(tmp_path / "bedroom_val_lmdb", 6, rng)
    report = verify(tmp_path / "bedroom_val_lmdb")
    assert report.ok and report.records == report.decoded == 6
    bad = sorted(values)[3]
    env = lmdb.open(str(tmp_path / "bedroom_val_lmdb"))
    with env.begin(write=True) as txn:
        txn.put(bad, values[bad][:40])  # a truncated JPEG
    env.close()
    assert main(["verify", str(tmp_path / "bedroom_val_lmdb"), "-q"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and f"key {bad!r}" in out[0] and out[1].endswith("1 problems")


def test_verify_of_a_layout_whose_count_points_at_absent_keys_names_them(tmp_path, rng):
    import lmdb
    from test_layout_migration import OcrLayout, make_ocr

    make_ocr(tmp_path / "ocr.lmdb", ["a", "b", "c", "d"], rng)
    env = lmdb.open(str(tmp_path / "ocr.lmdb"))
    with env.begin(write=True) as txn:
        txn.delete(b"txt-00001")
        txn.delete(b"img-00003")
        txn.put(b"pad1", b"x")
        txn.put(b"pad2", b"x")
    env.close()
    report = verify(tmp_path / "ocr.lmdb", layout=OcrLayout())
    assert report.records == 4 and report.decoded == 2
    assert [why.split(" is not")[0] for _, why in report.problems] == ["key b'txt-00001'", "key b'img-00003'"]
    result = info(tmp_path / "ocr.lmdb", layout=OcrLayout())
    assert result.samples == 4 and result.invalid == 2 and result.targets == {"str": 2}


def test_info_and_verify_with_an_unknown_or_wrong_layout_say_one_line(tmp_path, rng):
    from test_lmdb_dataset import make_lsun

    make_lsun(tmp_path / "tower_val_lmdb", 2, rng)
    result = run_cli("verify", tmp_path / "tower_val_lmdb", "--layout", "nope")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "unknown layout 'nope'" in result.stderr
    result = run_cli("info", tmp_path / "tower_val_lmdb", "--layout", "datum")
    assert "Traceback" not in result.stderr and result.returncode != 0


def test_the_tools_work_while_datasets_of_the_lmdb_are_open(tmp_path, rng):
    """py-lmdb opens an LMDB once per process: the tools share the datasets' environment (safe_lmdb.OPEN_ENVS)."""
    from caffe_lmdb import LmdbDataset, LmdbDataset_train, compute_mean, export, grid, info, verify, write_dataset

    samples = [(rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8), i % 2) for i in range(6)]
    write_dataset(samples, tmp_path / "d.lmdb", workers=0)
    train = LmdbDataset_train(tmp_path / "d.lmdb")
    any_layout = LmdbDataset(tmp_path / "d.lmdb")
    assert train[0][1] == any_layout[0][1] == 0
    assert info(tmp_path / "d.lmdb").records == 6
    assert verify(tmp_path / "d.lmdb", decode=True).ok
    export(tmp_path / "d.lmdb", tmp_path / "out")
    grid(tmp_path / "d.lmdb", tmp_path / "grid.png", n=4)
    compute_mean(tmp_path / "d.lmdb", tmp_path / "mean.binaryproto")
    assert train[5][1] == any_layout[5][1] == 1  # the datasets still read after the tools
