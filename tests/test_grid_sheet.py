"""`grid`: a contact sheet of random records, opened with Pillow; colours and layout checked."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import NO_IDAT_KEY, assert_one_line_error, caffe_key, edit_lmdb, run_cli
from PIL import Image
from toollmdbs import converted, encoded_datum, hand_written, raw_value

from caffe_lmdb import DatumError
from caffe_lmdb.cli import main
from caffe_lmdb.grid_sheet import BROKEN, PAD, Grid, grid, make_grid


def test_grid_of_converter_lmdb(image_tree, tmp_path, capsys):
    lmdb_path = converted(image_tree, tmp_path / "train.lmdb")
    out = tmp_path / "samples.png"
    assert main(["grid", str(lmdb_path), "-o", str(out), "--n", "3", "--tile", "32"]) == 0
    assert "3 of 4 records, 2x2 tiles" in capsys.readouterr().out
    with Image.open(out) as sheet:
        assert sheet.format == "PNG" and sheet.mode == "RGB"
        assert sheet.width == 2 * (32 + PAD) + PAD
        assert 2 * (32 + PAD) + PAD < sheet.height < 2 * (32 + 40) + PAD  # tiles plus one caption row each


def test_more_samples_than_records_shows_them_all(legacy_rgb_lmdb, tmp_path):
    sheet_result = grid(legacy_rgb_lmdb[0], tmp_path / "all.png", n=64, tile=16)
    assert (sheet_result.count, sheet_result.records, sheet_result.columns, sheet_result.rows) == (6, 6, 3, 2)
    with Image.open(tmp_path / "all.png") as sheet:
        assert sheet.size == sheet_result.image.size and sheet.width == 3 * (16 + PAD) + PAD


def test_same_seed_same_sheet(image_tree, tmp_path):
    lmdb_path = converted(image_tree, tmp_path / "train.lmdb")
    first = make_grid(lmdb_path, n=2, seed=3, tile=16).image
    assert first.tobytes() == make_grid(lmdb_path, n=2, seed=3, tile=16).image.tobytes()


def test_tiles_show_rgb_not_bgr(tmp_path):
    red = np.zeros((4, 6, 3), np.uint8)
    red[..., 0] = 255  # RGB red, stored by Caffe as planes B=0, G=0, R=255
    path = hand_written(tmp_path / "red", {caffe_key(0, "red.jpg"): raw_value(red, 0)})
    sheet = make_grid(path, n=1, tile=24).image
    assert sheet.getpixel((PAD + 12, PAD + 12)) == (255, 0, 0)


def test_grid_errors(tmp_path, legacy_rgb_lmdb, capsys):
    bad = hand_written(tmp_path / "bad", {caffe_key(0, "x.png"): encoded_datum(b"not an image", 0)})
    with pytest.raises(DatumError, match=r"key b'00000000_x.png'"):
        make_grid(bad, n=1)
    assert main(["grid", str(bad), "-o", str(tmp_path / "g.png")]) == 1
    assert main(["grid", str(legacy_rgb_lmdb[0]), "-o", str(tmp_path / "g.png"), "--n", "0"]) == 2
    assert main(["grid", str(legacy_rgb_lmdb[0]), "-o", str(tmp_path / "g.unknown-ext")]) == 2
    assert "cannot save the grid" in capsys.readouterr().err
    assert main(["grid", str(tmp_path / "nothing"), "-o", str(tmp_path / "g.png")]) == 1


def test_grid_on_a_full_disk_leaves_no_file_and_names_it(legacy_rgb_lmdb, small_fs):
    import os

    from caffe_lmdb.errors import describe_os_error

    fd = os.open(small_fs / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # fill the 4 MiB file system
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    with pytest.raises(OSError) as excinfo:
        grid(legacy_rgb_lmdb[0], small_fs / "grid.png", n=6, tile=64)
    assert describe_os_error(excinfo.value) == f"{small_fs / 'grid.png'}: no space left on device"
    assert [p.name for p in small_fs.iterdir()] == ["filler"]


def test_grid_checks_the_extension_before_reading_the_lmdb(tmp_path, capsys):
    assert main(["grid", str(tmp_path / "missing.lmdb"), "-o", str(tmp_path / "g.txt")]) == 2
    assert "unknown image extension '.txt'" in capsys.readouterr().err


def test_grid_of_hostile_payloads_draws_or_names_the_key(hostile_lmdbs, tmp_path):
    """A damaged EXIF tag once crashed `grid` (struct.error); a PNG without IDAT is one line naming its key."""
    decodable, broken = hostile_lmdbs
    result = run_cli("grid", decodable, "-o", tmp_path / "g.png")
    assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr, result.stderr
    assert (tmp_path / "g.png").stat().st_size > 0
    result = run_cli("grid", broken, "-o", tmp_path / "b.png", "--n", "3")
    assert_one_line_error(result, 1, broken, NO_IDAT_KEY, "no IDAT chunk")
    assert not (tmp_path / "b.png").exists()


def test_grid_into_a_fifo_writes_the_image_and_keeps_the_fifo(legacy_rgb_lmdb, tmp_path):
    import io
    import os
    import stat

    from conftest import FifoReader, run_cli

    with FifoReader(tmp_path / "sheet.png") as reader:
        result = run_cli("grid", legacy_rgb_lmdb[0], "-o", reader.path, "--n", "6", "--tile", "64")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    with Image.open(io.BytesIO(bytes(reader.data))) as sheet:
        assert sheet.format == "PNG"
    assert stat.S_ISFIFO(os.lstat(tmp_path / "sheet.png").st_mode)


def test_grid_into_a_folder_or_an_unread_fifo_is_refused_before_reading_in_one_line(legacy_rgb_lmdb, tmp_path):
    import os

    from conftest import assert_one_line_error, run_cli, tree_snapshot

    (tmp_path / "adir.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")
    before = tree_snapshot(tmp_path)
    for target, why in (("adir.png", "is a directory, not a file"), ("pipe.png", "is a FIFO that no process is reading")):
        result = run_cli("grid", legacy_rgb_lmdb[0], "-o", tmp_path / target, "--n", "2")
        assert " -> " not in assert_one_line_error(result, 1, f"{tmp_path / target}: {why}")
        assert tree_snapshot(tmp_path) == before
    result = run_cli("grid", tmp_path / "missing.lmdb", "-o", tmp_path / "adir.png")
    assert_one_line_error(result, 1, f"{tmp_path / 'adir.png'}: is a directory")  # checked before the LMDB is opened


# ---------------------------------------------------------------- other layouts (LSUN, CRNN)

def _tile_origin(sheet: Grid, i: int, tile: int) -> tuple[int, int]:
    caption_height = (sheet.image.height - PAD) // sheet.rows - tile - PAD
    return PAD + (i % sheet.columns) * (tile + PAD), PAD + (i // sheet.columns) * (tile + caption_height + PAD)


def test_grid_of_lsun_samples_shows_their_pixels(tmp_path, rng):
    import cv2
    from test_lmdb_dataset import make_lsun

    path = tmp_path / "church_outdoor_train_lmdb"
    values = make_lsun(path, 9, rng)
    out = tmp_path / "lsun.png"
    sheet = grid(path, out, n=4, seed=1, tile=18)  # LSUN images are 9 px wide: enlarged 2x, NEAREST
    assert (sheet.count, sheet.records, sheet.columns, sheet.rows, sheet.problems) == (4, 9, 2, 2, ())
    assert "4 of 9 samples (lsun layout), 2x2 tiles" in str(sheet)
    with Image.open(out) as saved:
        assert saved.format == "PNG" and saved.size == sheet.image.size and saved.width == 2 * (18 + PAD) + PAD
    chosen = sorted(np.random.default_rng(1).choice(9, size=4, replace=False).tolist())  # seeded, shown in order
    stored = [values[key] for key in sorted(values)]  # the layout's order: the keys'
    for i, index in enumerate(chosen):
        image = cv2.imdecode(np.frombuffer(stored[index], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]  # OpenCV's pixels
        x, y = _tile_origin(sheet, i, 18)
        y += (18 - 2 * image.shape[0]) // 2
        assert sheet.image.getpixel((x + 1, y + 1)) == tuple(image[0, 0].tolist())
    assert make_grid(path, n=4, seed=1, tile=18).image.tobytes() == sheet.image.tobytes()


def test_grid_of_crnn_draws_a_damaged_sample_as_a_broken_tile_and_names_its_key(tmp_path, rng):
    from test_layout_crnn import LABELS, make_crnn

    path = tmp_path / "ocr_lmdb"
    make_crnn(path, LABELS[:5], rng)
    edit_lmdb(path, put={b"image-000000003": b"not an image"}, delete=(b"label-000000005",))
    out = tmp_path / "ocr.png"
    result = run_cli("grid", path, "-o", out, "--n", "5", "--tile", "32")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"{path}: key b'image-000000003': cannot decode image bytes (12 bytes): not an image format Pillow recognises"
    assert lines[1].startswith(f"{path}: key b'label-000000005' is not in the LMDB (sample 4")
    assert "5 of 5 samples (crnn layout), 3x2 tiles" in lines[2] and "2 broken (listed above)" in lines[2]
    sheet = make_grid(path, n=5, tile=32)
    assert len(sheet.problems) == 2
    with Image.open(out) as saved:
        assert saved.size == sheet.image.size and saved.width == 3 * (32 + PAD) + PAD
        assert saved.convert("RGB").tobytes() == sheet.image.tobytes()
    for i in range(5):
        x, y = _tile_origin(sheet, i, 32)
        broken = sheet.image.getpixel((x + 16, y + 28)) == BROKEN  # below the reason, off the diagonals
        assert broken == (i in (2, 4)), i


def test_grid_of_pairs_and_a_bad_layout(tmp_path, rng):
    from test_layout_crnn import LABELS, make_crnn_sr

    path = tmp_path / "textzoom_lmdb"
    make_crnn_sr(path, LABELS[:2], rng)
    sheet = make_grid(path, n=2, tile=64)
    assert (sheet.count, sheet.problems, sheet.layout.split(" ")[0]) == (2, (), "crnn-sr")
    assert_one_line_error(run_cli("grid", path, "-o", tmp_path / "g.png", "--layout", "nope"), 2, path,
                          "unknown layout 'nope'")
    assert_one_line_error(run_cli("grid", path, "-o", tmp_path / "g.png", "--layout", "lsun"), 1, path,
                          "does not hold the 'lsun' layout")
    assert not (tmp_path / "g.png").exists()
