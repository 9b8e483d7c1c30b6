"""The converter on real files and real LMDBs: Caffe's layout, keys, flags, bad input, atomicity."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time

import lmdb
import numpy as np
import pytest
from conftest import REPO, run_cli, save_image
from lmdbread import raw_rgb, read_all, read_datums
from PIL import Image

from caffe_lmdb import conversion as conversion_module
from caffe_lmdb import load_keys
from caffe_lmdb.atomic_lmdb import BatchWriter
from caffe_lmdb.cli import main
from caffe_lmdb.conversion import WriteTuning, convert, write_lmdb
from caffe_lmdb.encode import ConvertOptions
from caffe_lmdb.errors import ConversionError
from caffe_lmdb.sources import InputError, scan_folder


def source_rgb(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------- layout and keys

def test_raw_conversion_is_pixel_exact_with_caffe_keys(image_tree, tmp_path):
    out = tmp_path / "train.lmdb"
    result = convert(image_tree, out, workers=1)
    assert (result.written, result.skipped) == (4, 0)
    datums = read_datums(out)
    assert list(datums) == [b"00000000_cat/a.png", b"00000001_cat/deep/b c.png", b"00000002_dog/g.png",
                            b"00000003_dog/x.JPG"]
    for key, datum in datums.items():
        relpath = key.decode().split("_", 1)[1]
        assert not datum.encoded and datum.HasField("encoded") and datum.HasField("label")
        assert datum.channels == 3
        assert np.array_equal(raw_rgb(datum), source_rgb(image_tree / relpath)), relpath
    assert datums[b"00000000_cat/a.png"].label == 0 and datums[b"00000003_dog/x.JPG"].label == 1
    assert (datums[b"00000000_cat/a.png"].height, datums[b"00000000_cat/a.png"].width) == (5, 7)


def test_keys_file_matches_lmdb_and_loads_without_pickle(image_tree, tmp_path):
    out = tmp_path / "train.lmdb"
    convert(image_tree, out, workers=1)
    keys = np.load(tmp_path / "train_keys.npy", allow_pickle=False)
    assert keys.tolist() == [key for key, _ in read_all(out)]
    assert (tmp_path / "train_classes.txt").read_text() == "cat\ndog\n"
    assert not (tmp_path / "train_skipped.txt").exists()


def test_explicit_keys_path(image_tree, tmp_path):
    assert main(["convert", str(image_tree), str(tmp_path / "a.lmdb"), "--keys", str(tmp_path / "k.npy"), "-q"]) == 0
    assert len(load_keys(tmp_path / "k.npy")) == 4


def test_unreadable_images_are_skipped_leave_key_gaps_and_are_listed(image_tree, tmp_path, caplog):
    (image_tree / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (image_tree / "cat" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "train.lmdb"
    result = convert(image_tree, out, workers=1)
    assert (result.written, result.skipped) == (4, 2)
    keys = [key for key, _ in read_all(out)]
    assert keys == [b"00000000_cat/a.png", b"00000002_cat/deep/b c.png", b"00000004_dog/g.png", b"00000005_dog/x.JPG"]
    skipped = (tmp_path / "train_skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in skipped] == ["cat/broken.png", "cat/empty.jpg"]
    assert "skipping" in caplog.text and "broken.png" in caplog.text and "file is empty" in caplog.text


def test_strict_fails_on_first_unreadable_image_and_writes_nothing(image_tree, tmp_path, capsys):
    (image_tree / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "train.lmdb"
    assert main(["convert", str(image_tree), str(out), "--strict", "-q", "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "--strict" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == [image_tree]


def test_truncated_jpeg_is_skipped_in_raw_and_encoded_modes(image_tree, tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (10, 200, 30)).save(buf, format="JPEG")
    (image_tree / "cat" / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for encoded in (False, True):
        result = convert(image_tree, tmp_path / f"o{encoded}.lmdb", workers=1, options=ConvertOptions(encoded=encoded))
        assert result.skipped == 1 and result.skipped_files[0][0] == "cat/trunc.jpg"


def test_shuffle_is_deterministic_and_line_ids_follow_it(image_tree, tmp_path):
    keys = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        convert(image_tree, tmp_path / f"{name}.lmdb", shuffle=True, seed=seed, workers=1)
        keys.append(load_keys(tmp_path / f"{name}_keys.npy").tolist())
    assert keys[0] == keys[1]
    assert sorted(k[9:] for k in keys[0]) == sorted(k[9:] for k in keys[2])
    assert [k[:8] for k in keys[0]] == [b"%08d" % i for i in range(4)]
    seeds = {tuple(k[9:] for k in keys[i]) for i in (0, 2)}
    unshuffled = tuple(sorted(k[9:] for k in keys[0]))
    assert seeds != {unshuffled} or keys[0] != keys[2]


def test_workers_do_not_change_a_byte(shared_images, tmp_path):
    root = tmp_path / "src"
    for i, name in enumerate(("chelsea.png", "rocket.jpg", "coffee.png", "camera.png", "logo.png", "moon.png")):
        save_image(root / f"c{i % 2}" / name, Image.open(shared_images / name))
    convert(root, tmp_path / "w1.lmdb", workers=1)
    convert(root, tmp_path / "w2.lmdb", workers=2, commit_every=2)
    assert read_all(tmp_path / "w1.lmdb") == read_all(tmp_path / "w2.lmdb")
    assert (tmp_path / "w1_keys.npy").read_bytes() == (tmp_path / "w2_keys.npy").read_bytes()


def _mixed_tree(root, rng):
    """40 images of several sizes and modes, plus two unreadable files (skipped, leaving key gaps)."""
    for i in range(40):
        h, w = (12 + i % 5, 9 + i % 7) if i % 4 else (60, 80)  # the 60x80 ones go through the pipe below
        mode_shape = (h, w) if i % 5 == 0 else (h, w, 3)
        save_image(root / f"c{i % 3}" / f"{i:02d}.png", Image.fromarray(rng.integers(0, 256, size=mode_shape,
                                                                                    dtype=np.uint8)))
    (root / "c0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "c1" / "empty.jpg").write_bytes(b"")
    return root


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("map_full", [False, True])
def test_worker_processes_do_not_change_a_byte(tmp_path, rng, caplog, workers, map_full):
    """Through the shared-memory rings, wrapping many times (tiny transactions) and with records too
    big for the ring: the LMDB, keys and skipped list are those of the in-process conversion. With
    `map_full`, transactions hit MDB_MAP_FULL and are replayed from the rings."""
    root = _mixed_tree(tmp_path / "src", rng)
    convert(root, tmp_path / "w1.lmdb", workers=0)
    # Rings of 16 KiB (2 transactions of 8 KiB): a 60x80 record goes by pipe.
    small = dict(commit_bytes=8 << 10, ring_bytes=16 << 10)
    if map_full:
        small.update(initial_map_size=64 << 10, grow_ahead=False)
    small = dict(tuning=WriteTuning(**small))
    caplog.set_level(logging.DEBUG, logger="caffe_lmdb.atomic_lmdb")
    result = convert(root, tmp_path / "wn.lmdb", workers=workers, commit_every=3, **small)
    assert result.written == 40 and result.skipped == 2
    grown = [r for r in caplog.records if r.getMessage().startswith("LMDB map: growing")]
    assert bool(grown) == map_full
    assert read_all(tmp_path / "w1.lmdb") == read_all(tmp_path / "wn.lmdb")
    for name in ("keys.npy", "skipped.txt", "classes.txt"):
        assert (tmp_path / f"w1_{name}").read_bytes() == (tmp_path / f"wn_{name}").read_bytes()


def test_without_fork_a_process_pool_gives_the_same_bytes(tmp_path, rng, monkeypatch):
    root = _mixed_tree(tmp_path / "src", rng)
    convert(root, tmp_path / "w1.lmdb", workers=0)
    monkeypatch.setattr(conversion_module._workers, "AVAILABLE", False)
    convert(root, tmp_path / "pool.lmdb", workers=2, commit_every=5)
    assert read_all(tmp_path / "w1.lmdb") == read_all(tmp_path / "pool.lmdb")


def test_map_grows_and_replays_the_whole_batch(image_tree, tmp_path):
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(120, 160, 3), dtype=np.uint8))
    for i in range(30):
        save_image(image_tree / "dog" / f"big{i:02d}.png", big)
    out = tmp_path / "grow.lmdb"
    result = convert(image_tree, out, workers=1, commit_every=7, tuning=WriteTuning(initial_map_size=64 << 10))
    datums = read_datums(out)
    assert len(datums) == result.written == 34
    assert all(len(d.data) == d.channels * d.height * d.width for d in datums.values())


# ---------------------------------------------------------------- flags

def test_gray_stores_one_channel(image_tree, tmp_path):
    convert(image_tree, tmp_path / "g.lmdb", workers=1, options=ConvertOptions(gray=True))
    datums = read_datums(tmp_path / "g.lmdb")
    assert {d.channels for d in datums.values()} == {1}
    gray = datums[b"00000002_dog/g.png"]
    with Image.open(image_tree / "dog" / "g.png") as source:
        assert gray.data == source.tobytes()


def test_resize_both_sides(image_tree, tmp_path):
    convert(image_tree, tmp_path / "r.lmdb", workers=1, options=ConvertOptions(resize_height=9, resize_width=11))
    assert {(d.channels, d.height, d.width) for d in read_datums(tmp_path / "r.lmdb").values()} == {(3, 9, 11)}


def test_encoded_keeps_original_file_bytes(image_tree, tmp_path):
    convert(image_tree, tmp_path / "e.lmdb", workers=1, options=ConvertOptions(encoded=True))
    for key, datum in read_datums(tmp_path / "e.lmdb").items():
        relpath = key.decode().split("_", 1)[1]
        assert datum.encoded and (datum.channels, datum.height, datum.width) == (0, 0, 0)
        assert datum.data == (image_tree / relpath).read_bytes(), relpath


def test_encode_type_reencodes_other_formats_and_keeps_matching_ones(image_tree, tmp_path):
    convert(image_tree, tmp_path / "e.lmdb", workers=1, options=ConvertOptions(encode_type="jpg"))
    datums = read_datums(tmp_path / "e.lmdb")
    assert datums[b"00000003_dog/x.JPG"].data == (image_tree / "dog" / "x.JPG").read_bytes()
    png = datums[b"00000000_cat/a.png"]
    assert png.encoded and png.data[:2] == b"\xff\xd8"
    assert Image.open(io.BytesIO(png.data)).size == (7, 5)


def test_encoded_with_resize_or_gray_reencodes(image_tree, tmp_path):
    convert(image_tree, tmp_path / "e.lmdb", workers=1,
            options=ConvertOptions(encoded=True, gray=True, resize_height=4, resize_width=6))
    for datum in read_datums(tmp_path / "e.lmdb").values():
        image = Image.open(io.BytesIO(datum.data))
        assert image.size == (6, 4) and image.mode == "L"


def test_check_size_rejects_differing_sizes(image_tree, tmp_path, capsys):
    assert main(["convert", str(image_tree), str(tmp_path / "c.lmdb"), "--check_size", "-q"]) == 1
    assert "differs from the first image's 3x5x7 (--check_size)" in capsys.readouterr().err
    assert not (tmp_path / "c.lmdb").exists()
    assert main(["convert", str(image_tree), str(tmp_path / "c.lmdb"), "--check_size", "--resize_height=5",
                 "--resize_width=7", "-q"]) == 0


def test_caffe_style_boolean_flags(image_tree, tmp_path):
    assert main(["convert", str(image_tree), str(tmp_path / "c.lmdb"), "--gray=true", "--encoded=false", "-q"]) == 0
    assert {d.channels for d in read_datums(tmp_path / "c.lmdb").values()} == {1}


@pytest.mark.parametrize(("flags", "encoded", "channels"), [
    (["--encoded"], True, None),  # once a usage error: the flag's optional value swallowed SRC
    (["--gray", "--encoded"], True, None),
    (["--encoded", "--gray"], True, None),
    (["--gray", "false", "--encoded", "true"], True, None),
    (["--gray", "1"], False, 1),
    (["--check_size=false", "--gray"], False, 1),
])
def test_boolean_flags_written_before_the_paths(image_tree, tmp_path, flags, encoded, channels):
    out = tmp_path / "c.lmdb"
    assert main(["convert", *flags, str(image_tree), str(out), "-q"]) == 0
    datums = read_datums(out).values()
    assert len(datums) == 4 and {d.encoded for d in datums} == {encoded}
    if channels is not None:
        assert {d.channels for d in datums} == {channels}


def test_boolean_flags_take_only_true_or_false_words():
    from caffe_lmdb.cli import bind_bool_values, bool_flag_names, build_parser

    names = bool_flag_names(build_parser())
    assert {"--encoded", "--gray", "--shuffle", "--check_size", "--fast-resize", "--reencode-gray"} <= names
    assert bind_bool_values(["convert", "--encoded", "src", "out"], names) == ["convert", "--encoded=true", "src", "out"]
    assert bind_bool_values(["convert", "src", "out", "--encoded"], names) == ["convert", "src", "out", "--encoded=true"]
    assert bind_bool_values(["convert", "--gray", "No", "src"], names) == ["convert", "--gray", "No", "src"]
    assert bind_bool_values(["convert", "--", "--gray", "src"], names) == ["convert", "--", "--gray", "src"]


# ---------------------------------------------------------------- --fast-resize

def big_photos(root, count: int = 4) -> None:
    """Camera-sized JPEGs (1600x1200, quality 90) of smooth, photo-like content, in two class folders."""
    rng = np.random.default_rng(11)
    for i in range(count):
        field = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        image = Image.fromarray(field).resize((1600, 1200), Image.BICUBIC)
        save_image(root / f"class{i % 2}" / f"{i}.jpg", image, quality=90)


@pytest.mark.parametrize("encoded", [False, True])
def test_fast_resize_decodes_jpegs_at_a_dct_scale_with_close_pixels(tmp_path, encoded):
    big_photos(tmp_path / "src")
    save_image(tmp_path / "src" / "class0" / "z.png", Image.new("RGB", (40, 30), (10, 200, 30)))
    plain, fast = tmp_path / "plain.lmdb", tmp_path / "fast.lmdb"
    options = {"resize_height": 256, "resize_width": 256, "encoded": encoded}
    convert(tmp_path / "src", plain, workers=1, options=ConvertOptions(**options))
    assert main(["convert", "--fast-resize", str(tmp_path / "src"), str(fast), "--resize_height=256",
                 "--resize_width=256", f"--encoded={str(encoded).lower()}", "-q"]) == 0
    plain_datums, fast_datums = read_datums(plain), read_datums(fast)
    assert plain_datums.keys() == fast_datums.keys()
    differences = []
    for key, datum in plain_datums.items():
        if encoded:
            a = np.asarray(Image.open(io.BytesIO(datum.data)), np.int16)
            b = np.asarray(Image.open(io.BytesIO(fast_datums[key].data)), np.int16)
        else:
            a, b = raw_rgb(datum).astype(np.int16), raw_rgb(fast_datums[key]).astype(np.int16)
        assert a.shape == b.shape == (256, 256, 3)
        if key.endswith(b".png"):
            assert (a == b).all()  # only JPEGs decode at a DCT scale
        else:
            differences.append(np.abs(a - b).mean())
    assert 0 < np.mean(differences) < 1.0


def test_fast_resize_needs_a_resize(tmp_path):
    with pytest.raises(InputError, match="--fast-resize needs a resize"):
        ConvertOptions(fast_resize=True)


# ---------------------------------------------------------------- pixels as OpenCV would give Caffe

def test_pixel_normalisation_exif_alpha_palette_16bit_gif(tmp_path):
    root = tmp_path / "src"
    base = np.random.default_rng(5).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    rotated = Image.fromarray(base)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    save_image(root / "c" / "1exif.jpg", rotated, exif=exif, quality=100)
    save_image(root / "c" / "2rgba.png", Image.fromarray(np.dstack([base, np.full((5, 7), 7, np.uint8)])))
    save_image(root / "c" / "3pal.png", Image.fromarray(base).quantize(16))
    sixteen = np.arange(35, dtype=np.uint16).reshape(5, 7) * 1800
    save_image(root / "c" / "4deep.png", Image.fromarray(sixteen))
    save_image(root / "c" / "5anim.gif", Image.fromarray(base).quantize(8), save_all=True,
               append_images=[Image.new("P", (7, 5))])
    convert(root, tmp_path / "n.lmdb", workers=1)
    datums = list(read_datums(tmp_path / "n.lmdb").values())
    exif_datum, rgba, pal, deep, gif = datums
    assert (exif_datum.height, exif_datum.width) == (7, 5)  # orientation applied
    assert np.array_equal(raw_rgb(rgba), base)  # alpha dropped, not composited
    assert np.array_equal(raw_rgb(pal), np.asarray(Image.fromarray(base).quantize(16).convert("RGB")))
    deep_rgb = raw_rgb(deep)
    assert np.array_equal(deep_rgb[..., 0], (sixteen >> 8).astype(np.uint8))  # scaled, not clipped
    assert np.array_equal(raw_rgb(gif), np.asarray(Image.fromarray(base).quantize(8).convert("RGB")))  # frame 0

    convert(root, tmp_path / "ne.lmdb", workers=1, options=ConvertOptions(encoded=True))
    gif_encoded = list(read_datums(tmp_path / "ne.lmdb").values())[4]
    assert gif_encoded.data[:8] == b"\x89PNG\r\n\x1a\n"  # GIF re-encoded: OpenCV/DALI cannot decode GIF


# ---------------------------------------------------------------- list files

def test_list_file_with_spaces_and_multilabel(image_tree, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("cat/deep/b c.png 1 0 1\ncat/a.png 0 1 1\nmissing.png 1 1 1\n")
    assert main(["convert", "--list", str(lst), "--root", str(image_tree), str(tmp_path / "l.lmdb"), "-q"]) == 0
    datums = read_datums(tmp_path / "l.lmdb")
    assert list(datums) == [b"00000000_cat/deep/b c.png", b"00000001_cat/a.png"]
    first = datums[b"00000000_cat/deep/b c.png"]
    assert first.label == 1 and list(first.float_data) == [1.0, 0.0, 1.0]
    assert len(first.data) == 3 * 6 * 4


def test_caffe_positional_form(image_tree, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("dog/x.JPG 5\n")
    assert main(["convert", str(image_tree) + "/", str(lst), str(tmp_path / "p.lmdb"), "-q"]) == 0
    assert [d.label for d in read_datums(tmp_path / "p.lmdb").values()] == [5]


def test_file_or_folder_is_guessed_once(image_tree, monkeypatch):
    # convert takes load_entries' decision: a source read as a list file stays one, even if the path then
    # names a folder (a second guess would take it for the input folder and refuse an output inside it).
    lst = image_tree / "list.txt"
    lst.write_text("cat/a.png 0\n")
    load_entries = conversion_module.load_entries

    def load_then_replace(*args, **kwargs):
        loaded = load_entries(*args, **kwargs)
        lst.unlink()
        lst.mkdir()
        return loaded

    monkeypatch.setattr(conversion_module, "load_entries", load_then_replace)
    result = convert(lst, lst / "o.lmdb", progress=False)
    assert result.written == 1 and list(read_datums(lst / "o.lmdb")) == [b"00000000_cat/a.png"]


def test_seed_shortcut_converts_each_split(tmp_path, image_tree):
    val = tmp_path / "val" / "cat"
    save_image(val / "v.png", Image.new("RGB", (3, 2)))
    assert main(["convert", str(tmp_path), "-q"]) == 0
    assert len(read_all(tmp_path / "src.lmdb")) == 4 and len(read_all(tmp_path / "val.lmdb")) == 1
    assert len(load_keys(tmp_path / "val_keys.npy")) == 1


# ---------------------------------------------------------------- usage errors: exit 2, one line

@pytest.mark.parametrize("args", [
    ["--resize_height", "10"],
    ["--resize-width", "3"],
    ["--no-such-flag"],
    ["--encode_type", "xyz"],
    ["--workers", "-1"],
])
def test_bad_flags_exit_2(image_tree, tmp_path, args, capsys):
    assert main(["convert", str(image_tree), str(tmp_path / "o.lmdb"), *args]) == 2
    assert not (tmp_path / "o.lmdb").exists()


def test_input_errors_exit_2_with_one_line(tmp_path, image_tree, capsys):
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "cls").mkdir()
    cases = [
        ([str(tmp_path / "nothing"), str(tmp_path / "o.lmdb")], "cls: class folder has no images"),
        ([str(tmp_path / "missing"), str(tmp_path / "o.lmdb")], "input folder not found"),
        (["--list", str(tmp_path / "nope.txt"), str(tmp_path / "o.lmdb")], "nope.txt: list file not found"),
    ]
    for args, message in cases:
        assert main(["convert", *args, "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_existing_output_is_refused_without_overwrite(image_tree, tmp_path, capsys):
    out = tmp_path / "o.lmdb"
    assert main(["convert", str(image_tree), str(out), "-q"]) == 0
    before = read_all(out)
    assert main(["convert", str(image_tree), str(out), "-q", "--gray"]) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert read_all(out) == before
    assert main(["convert", str(image_tree), str(out), "-q", "--gray", "--overwrite"]) == 0
    assert {d.channels for d in read_datums(out).values()} == {1}
    assert [e for e in tmp_path.iterdir() if e.name.startswith(".")] == []


def test_no_images_at_all(tmp_path):
    with pytest.raises(InputError, match="no input images"):
        write_lmdb([], tmp_path / "o.lmdb")


def test_all_images_unreadable_writes_nothing(tmp_path):
    (tmp_path / "src" / "c").mkdir(parents=True)
    (tmp_path / "src" / "c" / "bad.png").write_bytes(b"junk")
    with pytest.raises(ConversionError, match="no image could be converted"):
        convert(tmp_path / "src", tmp_path / "o.lmdb", workers=1)
    assert not (tmp_path / "o.lmdb").exists() and not (tmp_path / "o_keys.npy").exists()


def test_exception_mid_run_leaves_nothing(image_tree, tmp_path):
    """Three records committed one by one, then `strict` fails on the fourth: nothing is left (a
    real Ctrl-C mid-run: `test_killed_conversion_never_leaves_a_complete_looking_output`)."""
    (image_tree / "dog" / "h.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    entries, classes = scan_folder(image_tree)
    assert [e.relpath for e in entries].index("dog/h.png") == 3
    with pytest.raises(ConversionError, match="h.png"):
        write_lmdb(entries, tmp_path / "o.lmdb", classes=classes, workers=1, commit_every=1, strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---------------------------------------------------------------- killed for real

def _slow_conversion(tmp_path, workers=1):
    """A list of 3000 lines pointing at one 740x500 PNG: seconds of work, so it can be killed mid-run."""
    root = tmp_path / "src"
    noise = np.random.default_rng(9).integers(0, 256, size=(500, 740, 3), dtype=np.uint8)
    save_image(root / "m.png", Image.fromarray(noise))
    lst = tmp_path / "list.txt"
    lst.write_text("m.png 1\n" * 3000)
    out = tmp_path / "out.lmdb"
    cmd = [sys.executable, str(REPO / "tools" / "convert.py"), "--list", str(lst), "--root", str(root), str(out),
           "--workers", str(workers), "--commit-every", "10", "-q"]
    # SIGINT as a terminal gives it: a run started in the background (`cmd &`) inherits it ignored.
    return out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_partial_output(tmp_path, proc):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        partial = [p / "data.mdb" for p in tmp_path.glob(".out.lmdb.tmp-*")]
        if partial and partial[0].exists() and partial[0].stat().st_size > 2 << 20:
            return partial[0].parent
        if proc.poll() is not None:
            pytest.fail(f"conversion ended before it could be interrupted: {proc.communicate()}")
        time.sleep(0.05)
    pytest.fail("conversion never started writing")


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_conversion_never_leaves_a_complete_looking_output(tmp_path, sig, workers):
    out, proc = _slow_conversion(tmp_path, workers)
    partial = _wait_for_partial_output(tmp_path, proc)
    os.kill(proc.pid, sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert not out.exists() and not (tmp_path / "out_keys.npy").exists()
    deadline = time.monotonic() + 10  # worker processes notice their closed pipe and exit
    while _processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_mentioning(str(out)) == []
    if sig == signal.SIGINT:
        assert not partial.exists()  # cleaned up on Ctrl-C
    else:
        assert partial.exists()  # kill -9 cannot clean up, but the name says it is not the output
        lst = tmp_path / "small.txt"
        lst.write_text("m.png 1\n")
        assert main(["convert", "--list", str(lst), "--root", str(tmp_path / "src"), str(out), "-q"]) == 0
        assert not partial.exists()  # the next run removed the dead run's temporary


def test_map_full_replays_the_whole_batch(tmp_path):
    """Without growing ahead, MDB_MAP_FULL must double the map and replay every record."""
    env = lmdb.open(str(tmp_path / "db"), map_size=256 << 10)
    values = {b"%08d" % i: bytes([i]) * 20000 for i in range(100)}
    with BatchWriter(env, commit_every=40, grow_ahead=False) as writer:
        for key, value in values.items():
            writer.put(key, value)
    assert env.info()["map_size"] > 256 << 10
    env.close()
    assert dict(read_all(tmp_path / "db")) == values


def test_batch_writer_commits_on_a_clean_exit_and_aborts_on_an_exception(tmp_path):
    env = lmdb.open(str(tmp_path / "db"), map_size=1 << 20)
    with BatchWriter(env, commit_every=2) as writer:
        for i in range(3):
            writer.put(b"k%d" % i, b"v")
    assert env.stat()["entries"] == 3  # the last, odd record committed by leaving the block
    with pytest.raises(KeyError), BatchWriter(env, commit_every=2) as writer:
        for i in range(3, 6):
            writer.put(b"k%d" % i, b"v")
        raise KeyError("stop")
    assert env.stat()["entries"] == 5  # k3, k4 had committed; k5's transaction was aborted
    env.close()


def test_commit_bytes_ends_transactions_before_commit_every(tmp_path):
    env = lmdb.open(str(tmp_path / "db"), map_size=4 << 20)
    commits = []
    with BatchWriter(env, commit_every=1000, commit_bytes=10_000, after_commit=commits.append) as writer:
        for i in range(10):
            writer.put(b"%02d" % i, bytes(4000))
    env.close()
    assert commits == [3, 6, 9, 10]  # 3 records reach 10,000 bytes; the last by leaving the block


def test_commit_limits_below_one_are_refused_before_any_file_is_made(tmp_path, image_tree):
    with pytest.raises(InputError, match="commit_every must be >= 1"):
        convert(image_tree, tmp_path / "o.lmdb", commit_every=0)
    with pytest.raises(InputError, match="commit_bytes must be >= 1"):
        convert(image_tree, tmp_path / "o.lmdb", tuning=WriteTuning(commit_bytes=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_opencv_resize_backend_matches_cv2_or_says_what_to_install(image_tree, tmp_path, capsys):
    try:
        import cv2
    except ImportError:
        cv2 = None
    args = ["convert", str(image_tree), str(tmp_path / "cv.lmdb"), "-q", "--resize_height=4", "--resize_width=6",
            "--resize-backend", "opencv"]
    if cv2 is None:
        assert main(args) == 2
        assert "pip install opencv-python-headless" in capsys.readouterr().err
        return
    assert main(args) == 0
    for key, datum in read_datums(tmp_path / "cv.lmdb").items():
        relpath = key.decode().split("_", 1)[1]
        expected = cv2.resize(source_rgb(image_tree / relpath), (6, 4), interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(raw_rgb(datum), expected), relpath


# ---------------------------------------------------------------- hostile image files (issue 22)

@pytest.mark.parametrize("encoded", [False, True])
def test_hostile_images_are_skipped_or_converted_never_a_traceback(tmp_path, hostile_files, encoded):
    """A 45-byte PNG without IDAT is skipped and listed; a JPEG with a damaged EXIF tag converts turned upright."""
    for name, data in hostile_files.items():
        save_path = tmp_path / "src" / "a" / name
        save_path.parent.mkdir(parents=True, exist_ok=True)
        save_path.write_bytes(data)
    out = tmp_path / "out.lmdb"
    result = run_cli("convert", tmp_path / "src", out, "--workers", "0", *(["--encoded"] if encoded else []))
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Traceback" not in output, output
    assert "object at 0x" not in output, output
    warning = [line for line in result.stderr.splitlines() if "no-idat.png" in line]
    assert len(warning) == 1 and "no IDAT chunk" in warning[0], output
    skipped = (tmp_path / "out_skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith("a/no-idat.png\t") and "no IDAT chunk" in skipped[0]
    datums = read_datums(out)
    assert sorted(datums) == [b"00000000_a/damaged-exif.jpg", b"00000002_a/upright.png"]
    turned = datums[b"00000000_a/damaged-exif.jpg"]
    if encoded:
        assert turned.encoded and turned.data == hostile_files["damaged-exif.jpg"]  # bytes kept as Caffe keeps them
    else:
        assert (turned.channels, turned.height, turned.width) == (3, 24, 16)  # EXIF orientation 6 applied
