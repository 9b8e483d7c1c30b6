"""`export`: records back to files and a list file; `convert --list` of it rebuilds identical Datums."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from conftest import assert_one_line_error, caffe_key, edit_lmdb, png_bytes, run_cli, save_image, tree_snapshot
from lmdbread import read_datums
from PIL import Image
from toollmdbs import converted, encoded_datum, hand_written, legacy_encoded, raw_value

from caffe_lmdb import caffe_pb2
from caffe_lmdb.cli import main
from caffe_lmdb.exporting import LIST_NAME, ExportError, export, key_file_stem
from caffe_lmdb.files import TMP_MARK
from caffe_lmdb.sources import InputError


def fields(datum: caffe_pb2.Datum) -> tuple:
    return (datum.channels, datum.height, datum.width, datum.data, datum.label, datum.encoded,
            list(datum.float_data))


def assert_rebuilds(original, out_dir, *flags: str) -> None:
    """Convert the export's list file back (with `flags`) and compare every record, in order."""
    rebuilt = out_dir.with_name(out_dir.name + "-rebuilt.lmdb")
    assert main(["convert", *flags, "--list", str(out_dir / "list.txt"), str(rebuilt), "-q", "--workers", "1"]) == 0
    before, after = list(read_datums(original).values()), list(read_datums(rebuilt).values())
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        assert fields(old) == fields(new)


def files_under(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- round trips

def test_raw_round_trip_from_converter_lmdb(image_tree, tmp_path):
    original = converted(image_tree, tmp_path / "train.lmdb")
    out = tmp_path / "out"
    result = export(original, out)
    assert (result.written, result.raw, result.encoded, result.problems, result.inexact) == (4, 4, 0, [], [])
    assert result.convert_flags == []
    assert files_under(out) == {"list.txt", "cat/00000000_a.png", "cat/00000001_b c.png", "dog/00000002_g.png",
                                "dog/00000003_x.png"}
    assert (out / "list.txt").read_text().splitlines()[1] == "cat/00000001_b c.png 0"
    assert_rebuilds(original, out)


def test_encoded_round_trip_keeps_the_stored_bytes(image_tree, tmp_path):
    original = converted(image_tree, tmp_path / "train.lmdb", encoded=True)
    out = tmp_path / "out"
    result = export(original, out)
    assert result.encoded == 4 and result.convert_flags == ["--encoded"]
    stored = {key.decode().split("_", 1)[1].rsplit("/", 1)[-1]: d.data for key, d in read_datums(original).items()}
    assert (out / "dog" / "00000003_x.JPG").read_bytes() == stored["x.JPG"]
    assert (out / "cat" / "00000001_b c.png").read_bytes() == stored["b c.png"]
    assert_rebuilds(original, out, "--encoded")


def test_gray_round_trip_needs_gray(image_tree, tmp_path):
    original = converted(image_tree, tmp_path / "train.lmdb", gray=True)
    result = export(original, tmp_path / "out")
    assert result.convert_flags == ["--gray"]
    assert "--gray --list" in result.convert_command()
    assert_rebuilds(original, tmp_path / "out", "--gray")


def test_hand_written_lmdbs_round_trip_with_label_folders(legacy_rgb_lmdb, tmp_path, rng):
    path, _, _, _ = legacy_rgb_lmdb
    out = tmp_path / "out"
    assert main(["export", str(path), str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0", "1", "2", "list.txt"]
    assert (out / "list.txt").read_text().splitlines()[0] == "0/00000000_img0.png 0"
    assert_rebuilds(path, out)

    enc_path, _ = legacy_encoded(tmp_path / "enc", rng)
    assert export(enc_path, tmp_path / "enc_out").convert_flags == ["--encoded"]
    assert_rebuilds(enc_path, tmp_path / "enc_out", "--encoded")


def test_targets_become_list_columns(tmp_path, rng):
    images = tmp_path / "img"
    for i in range(3):
        save_image(images / f"{i}.png", Image.fromarray(rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)))
    (tmp_path / "list.txt").write_text("0.png 1 0.5 -2\n1.png 0 0.25 3e-3\n2.png 2 1 7\n")
    original = tmp_path / "multi.lmdb"
    assert main(["convert", "--list", str(tmp_path / "list.txt"), "--root", str(images), str(original), "-q"]) == 0
    out = tmp_path / "out"
    result = export(original, out)
    assert result.inexact == []
    assert (out / "list.txt").read_text().splitlines()[0] == "1/00000000_0.png 1 0.5 -2.0"
    assert_rebuilds(original, out)


def test_mixed_kinds_and_lossy_records_are_reported(tmp_path, rng):
    rgba = caffe_pb2.Datum(channels=4, height=2, width=3, data=bytes(range(24)), label=0, encoded=False)
    records = {
        caffe_key(0, "a.jpg"): raw_value(rng.integers(0, 256, size=(2, 3, 3), dtype=np.uint8), 0),
        caffe_key(1, "b.png"): encoded_datum(png_bytes(Image.new("RGB", (3, 2))), 1),
        caffe_key(2, "c.png"): rgba.SerializeToString(),
    }
    result = export(hand_written(tmp_path / "mixed", records), tmp_path / "out")
    assert result.written == 3 and result.convert_flags is None and result.convert_command() is None
    assert result.inexact == [(caffe_key(2, "c.png"), "4 channels: convert stores 3 (alpha dropped)")]
    assert "the records mix encoded, raw 3-channel and raw 4-channel kinds: no single convert rebuilds them" in str(
        result)
    assert result.kinds == ("encoded", "raw3", "raw4")


def test_float_only_export_says_what_the_records_are(tmp_path, rng):
    from caffe_lmdb.datum import array_to_datum, serialize_datum

    records = {caffe_key(i, f"{i}.npy"): serialize_datum(array_to_datum(rng.random((3, 2, 4)), label=i))
               for i in range(3)}
    result = run_cli("export", hand_written(tmp_path / "float.lmdb", records), tmp_path / "out", "-q")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr  # exported, with warnings
    assert "the records are all float (float_data pixels), which convert does not write" in result.stdout
    assert "mix" not in result.stdout


# ---------------------------------------------------------------- names, safety, overwrite

@pytest.mark.parametrize(("key", "stem"), [
    (b"00000007_cat/deep/a.jpg", "00000007_a.jpg"),
    (b"00000001_../../x.jpg", "00000001_x.jpg"),
    (b"00000002_a\\..\\..\\y.png", "00000002_y.png"),
    (b"..", "record"),
    (b"/etc/passwd", "passwd"),
    (b"00000003_.hidden", "00000003_.hidden"),
    (b".hidden", "hidden"),
    (b"00000004_a\nb\x00c.jpg", "00000004_a_b_c.jpg"),
    (b"00042", "00042"),
    (b" spaced ", "spaced"),
])
def test_key_file_stem(key, stem):
    assert key_file_stem(key) == stem


def test_keys_cannot_escape_out_dir(tmp_path, rng):
    pixels = rng.integers(0, 256, size=(2, 3, 3), dtype=np.uint8)
    hostile = [b"00000001_../../x.jpg", b"..", b"/tmp/abs.jpg", b"00000002_..\\..\\y.jpg", b"../../../z"]
    path = hand_written(tmp_path / "evil.lmdb", {key: raw_value(pixels, 0) for key in hostile})
    (tmp_path / "evil_classes.txt").write_text("../../escaped\n")
    out = tmp_path / "deep" / "out"
    before = files_under(tmp_path) - files_under(tmp_path / "evil.lmdb")
    result = export(path, out)
    assert result.written == 5
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()} - before
    assert all(name.startswith(os.path.join("deep", "out") + os.sep) for name in written), written
    assert {p.name for p in (out / "_.._escaped").iterdir()} == {
        "00000001_x.png", "record.png", "abs.png", "00000002_y.png", "z.png"}
    lines = (out / "list.txt").read_text().splitlines()
    assert len(lines) == 5 and all(line.startswith("_.._escaped/") for line in lines)


def test_symlinked_class_folder_pointing_outside_is_refused(legacy_rgb_lmdb, tmp_path):
    path = legacy_rgb_lmdb[0]
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "0").symlink_to(outside)
    with pytest.raises(ExportError, match="resolves outside"):
        export(path, out)
    assert list(outside.iterdir()) == []


def test_nothing_is_overwritten_without_overwrite(legacy_rgb_lmdb, tmp_path, capsys):
    path = legacy_rgb_lmdb[0]
    out = tmp_path / "out"
    export(path, out)
    assert main(["export", str(path), str(out), "-q"]) == 2
    assert "list.txt: already exists (pass --overwrite" in capsys.readouterr().err
    kept = save_image(tmp_path / "fresh" / "1" / "00000001_img1.png", Image.new("RGB", (1, 1)))
    mine = kept.read_bytes()
    with pytest.raises(InputError, match="00000001_img1.png: already exists"):
        export(path, tmp_path / "fresh")
    assert kept.read_bytes() == mine
    assert main(["export", str(path), str(tmp_path / "fresh"), "--overwrite", "-q"]) == 0
    assert kept.read_bytes() != mine and (tmp_path / "fresh" / "list.txt").is_file()


def test_bad_records_are_named_and_the_rest_exported(tmp_path, rng, capsys):
    records = {
        caffe_key(0, "a.jpg"): raw_value(rng.integers(0, 256, size=(2, 3, 3), dtype=np.uint8), 0),
        caffe_key(1, "b.jpg"): b"\xff junk",
        caffe_key(2, "c.png"): encoded_datum(b"not an image", 0),
    }
    path = hand_written(tmp_path / "bad", records)
    assert main(["export", str(path), str(tmp_path / "out"), "-q"]) == 1
    out = capsys.readouterr().out
    assert "key b'00000001_b.jpg': not exported: not a Datum" in out
    assert "key b'00000002_c.png': not exported: encoded data (12 bytes) is not an image" in out
    assert (tmp_path / "out" / "list.txt").read_text() == "0/00000000_a.png 0\n"


# ---------------------------------------------------------------- planted symlinks

def test_planted_symlinks_are_replaced_never_written_through(legacy_rgb_lmdb, tmp_path):
    path = legacy_rgb_lmdb[0]
    export(path, tmp_path / "clean")
    out, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    victim, victim_list = outside / "victim", outside / "victim_list"
    victim.write_bytes(b"precious")
    victim_list.write_bytes(b"also precious")
    (out / "0").mkdir(parents=True)
    (out / "0" / "00000000_img0.png").symlink_to(victim)  # the name export writes for the first record
    (out / LIST_NAME).symlink_to(victim_list)
    with pytest.raises(InputError, match=r"list.txt: already exists"):
        export(path, out)
    (out / LIST_NAME).unlink()
    with pytest.raises(InputError, match=r"00000000_img0.png: is a symbolic link \(pass --overwrite"):
        export(path, out)
    (out / LIST_NAME).symlink_to(victim_list)
    export(path, out, overwrite=True)
    assert victim.read_bytes() == b"precious" and victim_list.read_bytes() == b"also precious"
    for name in ("0/00000000_img0.png", LIST_NAME):
        assert not (out / name).is_symlink()
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()


def test_symlinked_class_folder_within_the_export_is_refused_too(legacy_rgb_lmdb, tmp_path):
    path = legacy_rgb_lmdb[0]
    out = tmp_path / "out"
    (out / "mine").mkdir(parents=True)
    (out / "mine" / "notes.txt").write_text("the user's")
    (out / "1").symlink_to(out / "mine")  # label 1's folder, pointing at a folder of the user's
    before = tree_snapshot(out / "mine")
    result = run_cli("export", path, out, "--overwrite", "-q")
    assert_one_line_error(result, 1, f"{out / '1'}: is a symbolic link", "points within", "refusing to write")
    assert tree_snapshot(out / "mine") == before
    assert not (out / LIST_NAME).exists()


# ---------------------------------------------------------------- full disk, interrupted runs, resuming

def noisy_lmdb(path, rng, count: int = 12, side: int = 128):
    """Raw records of noise, whose PNGs do not compress: each about side*side*3 bytes."""
    records = {caffe_key(i, f"c{i % 2}/{i}.jpg"): raw_value(rng.integers(0, 256, (side, side, 3), dtype=np.uint8),
                                                           i % 2)
               for i in range(count)}
    return hand_written(path, records)


def fill(fs, leave: int) -> None:
    """Fill the file system at `fs` with one file, `filler`, until at most `leave` bytes are free."""
    def free() -> int:
        info = os.statvfs(fs)
        return info.f_bavail * info.f_frsize

    with open(fs / "filler", "wb") as f:
        while free() > leave:
            f.write(b"\0" * min(64 << 10, max(free() - leave, 4096)))
            f.flush()


def leftovers(root) -> list[str]:
    """Temporaries and empty files under `root`: what a failed write must never leave."""
    return [str(p) for p in root.rglob("*") if p.is_file() and (TMP_MARK in p.name or p.stat().st_size == 0)]


def test_full_disk_names_the_file_leaves_no_list_and_a_rerun_continues(tmp_path, small_fs, rng):
    path = noisy_lmdb(tmp_path / "noise.lmdb", rng)  # 12 PNGs of ~48 KiB
    out = small_fs / "out"
    fill(small_fs, leave=200 << 10)
    result = run_cli("export", path, out, "-q")
    err = assert_one_line_error(result, 1, "no space left on device", "is incomplete", "run the same command again")
    assert re.search(rf"error: {re.escape(str(out))}/[01]/\d{{8}}_\d+\.png: no space left on device", err), err
    assert not (out / LIST_NAME).exists() and leftovers(out) == []
    written = files_under(out)
    assert 0 < len(written) < 12

    (small_fs / "filler").unlink()
    result = export(path, out)  # no --overwrite needed: the files there are this export's own
    assert (result.written, result.kept) == (12, len(written))
    assert f"{len(written)} files were already there with the same bytes" in str(result)
    assert leftovers(out) == []
    assert_rebuilds(path, out)


def test_failed_overwrite_never_leaves_the_old_list(tmp_path, small_fs, rng):
    out = small_fs / "out"
    export(noisy_lmdb(tmp_path / "a.lmdb", rng, count=4), out)
    assert (out / LIST_NAME).exists()
    fill(small_fs, leave=100 << 10)
    other = noisy_lmdb(tmp_path / "b.lmdb", rng, count=6)  # other pixels: every file must be replaced
    with pytest.raises(ExportError, match="no space left on device"):
        export(other, out, overwrite=True)
    assert not (out / LIST_NAME).exists() and leftovers(out) == []


#: Exports, but dies by SIGKILL at the 4th rename: three files in place, the fourth's temporary written.
_KILLED_EXPORT = """
import os, signal, sys
from caffe_lmdb.exporting import export
real, calls = os.replace, []
def replace(src, dst):
    calls.append(dst)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
export(sys.argv[1], sys.argv[2], progress=False)
"""


def test_export_killed_mid_write_is_continued_by_a_rerun(tmp_path, rng):
    import signal
    import subprocess
    import sys

    from conftest import REPO

    path = noisy_lmdb(tmp_path / "noise.lmdb", rng, count=8, side=16)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.run([sys.executable, "-c", _KILLED_EXPORT, str(path), str(out)], env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / LIST_NAME).exists()
    assert len(files_under(out)) == 4 and len([p for p in out.rglob("*") if TMP_MARK in p.name]) == 1
    result = run_cli("export", path, out, "-q")
    assert result.returncode == 0, result.stderr
    assert "3 files were already there with the same bytes (an earlier export's) and kept" in result.stdout
    assert [p for p in out.rglob("*") if TMP_MARK in p.name] == []  # the killed run's temporary is gone
    assert_rebuilds(path, out)


def test_a_rerun_still_refuses_files_that_are_not_the_exports(tmp_path, rng):
    path = noisy_lmdb(tmp_path / "noise.lmdb", rng, count=4, side=16)
    out = tmp_path / "out"
    export(path, out)
    (out / LIST_NAME).unlink()  # as if interrupted before the list
    (out / "1" / "00000001_1.png").write_bytes(b"the user's own file")
    with pytest.raises(InputError, match=r"00000001_1.png: already exists with other content \(pass --overwrite"):
        export(path, out)
    assert (out / "1" / "00000001_1.png").read_bytes() == b"the user's own file"


# ---------------------------------------------------------------- decompression bombs

def test_bomb_record_is_a_problem_named_by_key(tmp_path, rng, capsys):
    from test_datum import bomb_png

    records = {
        caffe_key(0, "a.png"): raw_value(rng.integers(0, 256, size=(2, 3, 3), dtype=np.uint8), 0),
        caffe_key(1, "bomb.png"): encoded_datum(bomb_png(30000, 30000), 0),
    }
    path = hand_written(tmp_path / "bomb", records)
    assert main(["export", str(path), str(tmp_path / "out"), "-q"]) == 1
    out = capsys.readouterr().out
    assert "key b'00000001_bomb.png': not exported: encoded data (69 bytes): its header claims a 30000x30000" in out
    assert (tmp_path / "out" / "list.txt").read_text() == "0/00000000_a.png 0\n"


# ---------------------------------------------------------------- outputs that are not regular files

def test_list_file_that_is_a_fifo_is_written_into_with_overwrite(legacy_rgb_lmdb, tmp_path):
    from conftest import FifoReader

    path = legacy_rgb_lmdb[0]
    export(path, tmp_path / "clean")
    out = tmp_path / "out"
    out.mkdir()
    with FifoReader(out / LIST_NAME) as reader:
        result = run_cli("export", path, out, "--overwrite", "-q")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert bytes(reader.data) == (tmp_path / "clean" / LIST_NAME).read_bytes()
    assert os.path.exists(out / LIST_NAME) and not (out / LIST_NAME).is_file()  # still the FIFO


def test_list_file_that_is_a_folder_is_refused_before_any_file_is_written(legacy_rgb_lmdb, tmp_path):
    out = tmp_path / "out"
    (out / LIST_NAME).mkdir(parents=True)
    before = tree_snapshot(tmp_path)
    result = run_cli("export", legacy_rgb_lmdb[0], out, "--overwrite", "-q")
    assert " -> " not in assert_one_line_error(result, 1, f"{out / LIST_NAME}: is a directory, not a file")
    assert tree_snapshot(tmp_path) == before


def test_image_name_that_is_a_fifo_says_so(legacy_rgb_lmdb, tmp_path):
    out = tmp_path / "out"
    (out / "0").mkdir(parents=True)
    os.mkfifo(out / "0" / "00000000_img0.png")  # the name export writes for the first record
    result = run_cli("export", legacy_rgb_lmdb[0], out, "-q")
    assert_one_line_error(result, 2, f"{out / '0' / '00000000_img0.png'}: is a FIFO or device (pass --overwrite")


# ---------------------------------------------------------------- other layouts (LSUN, CRNN, tensorpack)

def _list_lines(out) -> list[tuple[str, str]]:
    return [tuple(line.split(" ", 1)) for line in (out / LIST_NAME).read_text(encoding="utf-8").splitlines()]


def _texts(out) -> list[str]:
    from caffe_lmdb.text_targets import unescape_text

    return [unescape_text(line) for line in (out / "texts.txt").read_bytes().decode("utf-8").split("\n")[:-1]]


def _opencv_rgb(data: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lsun_export_writes_the_stored_bytes_in_the_category_folder(tmp_path, rng, fmt):
    from test_lmdb_dataset import make_lsun

    from caffe_lmdb import LmdbDataset

    path = tmp_path / "church_outdoor_train_lmdb"
    values = make_lsun(path, 7, rng, fmt)
    out = tmp_path / "out"
    result = export(path, out)
    assert (result.written, result.encoded, result.raw, result.problems, result.inexact) == (7, 7, 0, [], [])
    assert result.layout.startswith("lsun") and result.texts_path is None and result.convert_flags == ["--encoded"]
    assert "7 samples exported from lsun layout" in str(result)
    lines = _list_lines(out)
    suffix = ".jpg" if fmt == "JPEG" else ".webp"
    dataset = LmdbDataset(path)
    assert len(lines) == len(values) == len(dataset)
    for index, (key, (name, label)) in enumerate(zip(sorted(values), lines, strict=True)):  # the layout's order
        assert name == f"church_outdoor/{index:08d}_{key.decode()}{suffix}" and label == "0"
        assert (out / name).read_bytes() == values[key]  # unchanged
        assert name.split("/")[0] == dataset[index][1]  # the class folder is the target
        np.testing.assert_array_equal(_opencv_rgb((out / name).read_bytes()), np.asarray(dataset[index][0]))
    assert not (out / "texts.txt").exists()


OCR_TEXTS = ["hello", "你好世界", "two\nlines", "back\\slash \\n", "", "x y\tz", "sep\u2028ar\x85ate", "🙂"]


def test_crnn_export_list_and_texts_read_back_as_the_targets(tmp_path, rng, capsys):
    from test_layout_crnn import make_crnn

    path = tmp_path / "ocr_lmdb"
    images = make_crnn(path, OCR_TEXTS, rng)
    out = tmp_path / "out"
    assert main(["export", str(path), str(out), "-q"]) == 0
    summary = capsys.readouterr().out
    assert "8 samples exported from crnn layout" in summary and f"text targets: {out / 'texts.txt'}" in summary
    lines = _list_lines(out)
    assert [label for _, label in lines] == ["0"] * 8
    assert [name for name, _ in lines] == [f"0/{i:08d}_image-{i + 1:09d}{'.png' if i % 2 == 0 else '.jpg'}"
                                           for i in range(8)]
    assert [(out / name).read_bytes() for name, _ in lines] == images
    assert _texts(out) == OCR_TEXTS
    assert len((out / "texts.txt").read_text(encoding="utf-8").splitlines()) == 8  # one line per sample, always


def test_damaged_samples_are_named_and_the_rest_exported_with_their_texts_in_line(tmp_path, rng, capsys):
    from test_layout_crnn import make_crnn

    path = tmp_path / "ocr_lmdb"
    images = make_crnn(path, OCR_TEXTS[:6], rng)
    edit_lmdb(path, put={b"image-000000002": b"not an image", b"label-000000004": b"\xff\xfe"},
               delete=(b"image-000000005",))
    out = tmp_path / "out"
    assert main(["export", str(path), str(out), "-q"]) == 1
    printed = capsys.readouterr().out
    assert f"{path}: key b'image-000000002': not exported: encoded data (12 bytes) is not an image" in printed
    assert "key b'image-000000004': not exported: key b'label-000000004': label is not UTF-8 text" in printed
    assert "key b'image-000000005': not exported: key b'image-000000005' is not in the LMDB (sample 4" in printed
    assert "3 samples could not be exported" in printed
    lines = _list_lines(out)
    assert [name.split("_", 1)[1] for name, _ in lines] == ["image-000000001.png", "image-000000003.png",
                                                            "image-000000006.jpg"]
    assert [(out / name).read_bytes() for name, _ in lines] == [images[0], images[2], images[5]]
    assert _texts(out) == [OCR_TEXTS[0], OCR_TEXTS[2], OCR_TEXTS[5]]  # line i for list line i


def test_pairs_need_image_and_each_side_exports_its_bytes(tmp_path, rng):
    from test_layout_crnn import make_crnn_sr

    path = tmp_path / "textzoom_lmdb"
    pairs = make_crnn_sr(path, OCR_TEXTS[:3], rng)
    result = run_cli("export", path, tmp_path / "out", "-q")
    assert "--image 0, --image 1" in assert_one_line_error(result, 2, path, "2 images per sample")
    assert not (tmp_path / "out").exists()
    for side in (0, 1):
        out = tmp_path / f"side{side}"
        assert main(["export", str(path), str(out), "--image", str(side), "-q"]) == 0
        assert [(out / name).read_bytes() for name, _ in _list_lines(out)] == [pair[side] for pair in pairs]
        assert _texts(out) == OCR_TEXTS[:3]
    assert_one_line_error(run_cli("export", path, tmp_path / "o2", "--image", "2"), 2, "--image 2", "(0..1)")


def test_stored_pixels_become_pngs_and_numeric_targets_list_columns(tmp_path, rng):
    import cv2
    from test_layout_tensorpack import write_tensorpack

    from caffe_lmdb.reader import LayoutReader

    bgr = [rng.integers(0, 256, size=(5 + i, 7, 3), dtype=np.uint8) for i in range(4)]
    gray = rng.integers(0, 256, size=(6, 4), dtype=np.uint8)
    path = write_tensorpack(tmp_path / "t.lmdb", [[image, [i, 0.5 * i]] for i, image in enumerate([*bgr, gray])])
    out = tmp_path / "out"
    result = export(path, out)  # tensorpack's pickled datapoints are detected: no --layout needed
    assert (result.written, result.raw, result.kinds, result.convert_flags) == (5, 5, ("raw1", "raw3"), None)
    lines = _list_lines(out)
    assert [label for _, label in lines] == [f"{i} {0.5 * i}" for i in range(5)]  # the list-file rule
    assert [name.split("/")[0] for name, _ in lines] == ["0", "1", "2", "3", "4"]
    reader = LayoutReader(path, "tensorpack")
    for index, (name, _) in enumerate(lines):
        (stored,), _ = reader.stored(index)
        assert name.endswith(".png")
        np.testing.assert_array_equal(cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)[..., ::-1]
                                      if stored.ndim == 3 else cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED),
                                      stored)


def test_layout_export_resumes_and_refuses_other_files(tmp_path, rng):
    from test_lmdb_dataset import make_lsun

    path = tmp_path / "bedroom_val_lmdb"
    make_lsun(path, 5, rng)
    out = tmp_path / "out"
    export(path, out)
    (out / LIST_NAME).unlink()  # as if interrupted before the list
    names = sorted((out / "bedroom").iterdir())
    names[0].unlink()
    result = export(path, out)
    assert (result.written, result.kept) == (5, 4)
    with pytest.raises(InputError, match="list.txt: already exists"):
        export(path, out)
    (out / LIST_NAME).unlink()
    names[1].write_bytes(b"the user's own file")
    with pytest.raises(InputError, match="already exists with other content"):
        export(path, out)
    assert names[1].read_bytes() == b"the user's own file"
    assert export(path, out, overwrite=True).written == 5 and names[1].read_bytes() != b"the user's own file"


def test_bad_layout_or_image_is_one_line(tmp_path, rng, legacy_rgb_lmdb):
    from test_lmdb_dataset import make_lsun

    path = tmp_path / "church_outdoor_train_lmdb"
    make_lsun(path, 3, rng)
    assert_one_line_error(run_cli("export", path, tmp_path / "a", "--layout", "nope"), 2, path, "unknown layout 'nope'")
    assert_one_line_error(run_cli("export", path, tmp_path / "b", "--layout", "crnn"), 1, path,
                          "does not hold the 'crnn' layout")
    assert_one_line_error(run_cli("export", legacy_rgb_lmdb[0], tmp_path / "c", "--image", "1"), 2,
                          "Caffe Datums hold one image each")
    assert not any((tmp_path / name).exists() for name in "abc")
    datum = export(legacy_rgb_lmdb[0], tmp_path / "d", layout="datum")  # the Datum path, forced
    assert datum.layout is None and datum.written == 6
