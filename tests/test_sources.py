"""Conversion inputs: folder scanning, class indexing, list-file parsing, shuffling, split discovery."""

from __future__ import annotations

import os

import pytest
from conftest import save_image

from caffe_lmdb.sources import (
    InputError,
    find_splits,
    load_entries,
    parse_list_file,
    scan_folder,
    shuffle_entries,
)


def test_scan_folder_sorted_recursive_and_filtered(image_tree):
    entries, classes = scan_folder(image_tree)
    assert classes == ["cat", "dog"]
    assert [(e.relpath, e.label) for e in entries] == [
        ("cat/a.png", 0), ("cat/deep/b c.png", 0), ("dog/g.png", 1), ("dog/x.JPG", 1),
    ]
    assert all(e.path == image_tree / e.relpath for e in entries)


def test_empty_class_folder_is_an_error(image_tree):
    (image_tree / "empty").mkdir()
    with pytest.raises(InputError, match="empty: class folder has no images"):
        scan_folder(image_tree)


def test_folder_without_classes(tmp_path):
    with pytest.raises(InputError, match="no class folders"):
        scan_folder(tmp_path)
    with pytest.raises(InputError, match="not a directory"):
        scan_folder(tmp_path / "missing")


def test_list_file_splits_at_last_space_and_reads_multilabel(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("my photos/a b.jpg 3\n\nc.png 0\n")
    entries = parse_list_file(lst, tmp_path)
    assert [(e.relpath, e.label, e.targets) for e in entries] == [("my photos/a b.jpg", 3, ()), ("c.png", 0, ())]
    assert entries[0].path == tmp_path / "my photos" / "a b.jpg"

    lst.write_text("a b.jpg 1 0 1\nphoto 12.jpg 0 1.5 -2\n")
    entries = parse_list_file(lst, tmp_path)
    assert [(e.relpath, e.label, e.targets) for e in entries] == [
        ("a b.jpg", 1, (1.0, 0.0, 1.0)), ("photo 12.jpg", 0, (0.0, 1.5, -2.0)),
    ]


def test_list_file_column_count_is_the_minimum_over_lines(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("scan 12 5\nother.jpg 7\n")  # a path ending in a number
    assert [(e.relpath, e.label) for e in parse_list_file(lst, tmp_path)] == [("scan 12", 5), ("other.jpg", 7)]


@pytest.mark.parametrize(("text", "message"), [
    ("a.jpg 1\nnolabel.jpg\n", r"list.txt:2: expected 'relative/path label'"),
    ("a.jpg 1\n\nb.jpg cat\n", r"list.txt:3: expected"),
    ("a.jpg 1.5\n", r"list.txt:1: label '1.5' is not an integer"),
    ("a.jpg 99999999999\n", r"list.txt:1: label 99999999999 does not fit"),
    ("\n\n", r"list file has no entries"),
])
def test_malformed_list_lines_name_the_line(tmp_path, text, message):
    lst = tmp_path / "list.txt"
    lst.write_text(text)
    with pytest.raises(InputError, match=message):
        parse_list_file(lst, tmp_path)


def test_missing_list_file(tmp_path):
    with pytest.raises(InputError, match="nope.txt: list file not found"):
        parse_list_file(tmp_path / "nope.txt", tmp_path)


def test_shuffle_is_deterministic(image_tree):
    entries, _ = scan_folder(image_tree)
    assert shuffle_entries(entries, 1) == shuffle_entries(entries, 1)
    assert sorted(shuffle_entries(entries, 1), key=lambda e: e.relpath) == entries
    orders = {tuple(e.relpath for e in shuffle_entries(entries, seed)) for seed in range(10)}
    assert len(orders) > 1


def test_load_entries_takes_a_file_as_list(tmp_path, image_tree):
    lst = image_tree / "list.txt"
    lst.write_text("cat/a.png 4\n")
    entries, classes = load_entries(lst)
    assert classes is None and entries[0].path == image_tree / "cat" / "a.png"
    entries, classes = load_entries(image_tree)
    assert classes == ["cat", "dog"]


def test_find_splits(tmp_path, image_tree):
    root = image_tree.parent
    (root / "notes").mkdir()
    (root / "old.lmdb").mkdir()
    assert find_splits(root) == [image_tree]


def test_packed_entries_give_back_each_entry_s_file_label_and_targets(tmp_path):
    from caffe_lmdb.sources import Entry, FileInput, PackedEntries

    entries = [
        Entry("a/x.jpg", tmp_path / "a" / "x.jpg", 3),
        Entry("b/ünï cödé.png", tmp_path / "b" / "ünï cödé.png", -1, (0.5, 2.0, -3.25)),
        Entry("c/z.png", tmp_path / "c" / "z.png", 7, (1.0,)),
    ]
    packed = PackedEntries(entries)
    assert len(packed) == 3
    assert list(packed) == [FileInput(str(e.path), e.label, e.targets) for e in entries]
    assert packed[-1] == packed[2]
    with pytest.raises(IndexError):
        packed[3]


# ---------------------------------------------------------------- links, special files, unreadable folders

def test_symlink_loop_is_visited_once(image_tree):
    before, _ = scan_folder(image_tree)
    (image_tree / "cat" / "self").symlink_to(".")
    (image_tree / "cat" / "deep" / "up").symlink_to("..")
    entries, _ = scan_folder(image_tree)
    assert [(e.relpath, e.label) for e in entries] == [(e.relpath, e.label) for e in before]


def test_symlinked_folders_are_followed_each_real_folder_once(image_tree, tmp_path, rgb_image):
    save_image(tmp_path / "outside" / "o.png", rgb_image)
    (image_tree / "cat" / "ext").symlink_to(tmp_path / "outside")
    (image_tree / "cat" / "ext2").symlink_to(tmp_path / "outside")
    (image_tree / "cat" / "alias").symlink_to("deep")  # the real path wins over a link at the same depth
    (image_tree / "dog" / "ext").symlink_to(tmp_path / "outside")  # per class: dog lists it too
    entries, _ = scan_folder(image_tree)
    assert [(e.relpath, e.label) for e in entries] == [
        ("cat/a.png", 0), ("cat/deep/b c.png", 0), ("cat/ext/o.png", 0),
        ("dog/ext/o.png", 1), ("dog/g.png", 1), ("dog/x.JPG", 1),
    ]


def test_scan_leaves_out_fifos_and_devices_but_lists_dangling_links(image_tree):
    os.mkfifo(image_tree / "cat" / "fifo.jpg")
    (image_tree / "cat" / "zero.jpg").symlink_to("/dev/zero")
    (image_tree / "cat" / "gone.png").symlink_to("nowhere.png")
    (image_tree / "cat" / "loop.png").symlink_to("loop.png")
    (image_tree / "cat" / "knot").symlink_to("knot")  # file or folder? Cannot tell: listed, so it is reported
    entries, _ = scan_folder(image_tree)
    assert [e.relpath for e in entries if e.label == 0] == ["cat/a.png", "cat/deep/b c.png", "cat/gone.png",
                                                            "cat/knot", "cat/loop.png"]
    from caffe_lmdb.encode import ConvertOptions, encode_entry

    assert [encode_entry(e, ConvertOptions()).error for e in entries if e.label == 0] == [
        None, None, "no such file or directory", "too many levels of symbolic links",
        "too many levels of symbolic links",
    ]


def test_a_class_with_only_a_fifo_has_no_images(image_tree):
    (image_tree / "bird").mkdir()
    os.mkfifo(image_tree / "bird" / "x.jpg")
    with pytest.raises(InputError, match="bird: class folder has no images"):
        scan_folder(image_tree)


def test_read_image_file_reads_regular_files_only(tmp_path, image_tree):
    from caffe_lmdb.errors import DatumError
    from caffe_lmdb.sources import MAX_IMAGE_BYTES, read_image_file

    assert read_image_file(image_tree / "cat" / "a.png") == (image_tree / "cat" / "a.png").read_bytes()
    assert read_image_file(image_tree / "dog" / "readme.txt") == b"not an image"
    os.mkfifo(tmp_path / "fifo.jpg")  # blocked forever before the fix: nothing writes to it
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # MemoryError before the fix
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:  # sparse: no disk space used
        f.truncate(MAX_IMAGE_BYTES + 1)
    for path, message in [
        (tmp_path / "fifo.jpg", r"^not a regular file \(a FIFO\)$"),
        (tmp_path / "zero.jpg", r"^not a regular file \(a character device\)$"),
        (image_tree / "cat", r"^is a folder, not an image file$"),
        (huge, rf"^file is larger than {MAX_IMAGE_BYTES} bytes \({MAX_IMAGE_BYTES + 1} bytes\)$"),
    ]:
        with pytest.raises(DatumError, match=message):
            read_image_file(path)
    with pytest.raises(FileNotFoundError):
        read_image_file(tmp_path / "missing.png")


def test_find_splits_ignores_hidden_class_folders(tmp_path, rgb_image):
    save_image(tmp_path / "data" / "train" / "cat" / "a.png", rgb_image)
    save_image(tmp_path / "data" / "cache" / ".thumbs" / "a.png", rgb_image)  # scan_folder finds no class here
    assert find_splits(tmp_path / "data") == [tmp_path / "data" / "train"]


def test_find_splits_survives_a_symlink_loop(tmp_path, rgb_image):
    save_image(tmp_path / "data" / "train" / "cat" / "sub" / "a.png", rgb_image)
    (tmp_path / "data" / "val" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "val" / "cat" / "self").symlink_to(".")
    (tmp_path / "data" / "val" / "cat" / "self2").symlink_to(".")
    assert find_splits(tmp_path / "data") == [tmp_path / "data" / "train"]


# ---------------------------------------------------------------- list file edge cases

def test_list_file_byte_order_mark_is_ignored(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_bytes("a.jpg 1\r\nb c.jpg 2\r\n".encode("utf-8-sig"))
    assert [(e.relpath, e.label) for e in parse_list_file(lst, tmp_path)] == [("a.jpg", 1), ("b c.jpg", 2)]


@pytest.mark.parametrize("value", ["3e40", "-3.5e38", "1e999", "-1e400"])
def test_list_column_beyond_float32_names_file_line_and_value(tmp_path, value):
    lst = tmp_path / "list.txt"
    lst.write_text(f"a.jpg 0 1\nb.jpg 1 {value}\n")
    with pytest.raises(InputError, match=rf"list.txt:2: value '{value}' does not fit a 32-bit float$"):
        parse_list_file(lst, tmp_path)


def test_list_columns_within_float32_are_kept(tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_text("a.jpg 0 3.4028234e38 -1e-50 2147483647\n")
    assert parse_list_file(lst, tmp_path)[0].targets == (0.0, 3.4028234e38, -1e-50, 2147483647.0)


def test_list_file_that_is_a_folder_or_fifo(tmp_path):
    (tmp_path / "list.txt").mkdir()
    with pytest.raises(InputError, match="list.txt: is a folder, not a list file"):
        parse_list_file(tmp_path / "list.txt", tmp_path)
    os.mkfifo(tmp_path / "fifo.txt")
    with pytest.raises(InputError, match=r"fifo.txt: list file is not a regular file \(a FIFO\)$"):
        parse_list_file(tmp_path / "fifo.txt", tmp_path)
