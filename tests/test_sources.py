"""Conversion inputs: folder scanning, class indexing, list-file parsing, shuffling, split discovery."""

from __future__ import annotations

import pytest

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
