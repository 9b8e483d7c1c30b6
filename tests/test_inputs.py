"""Conversion inputs a user really has: symlink loops, unreadable folders, odd list files, FIFOs and devices.

CLI runs (a fresh process each) check what the user sees: exit status, one line naming the file
or folder (and line), the skipped list, and an input tree left as it was. The rest runs in-process.
"""

from __future__ import annotations

import os
import stat

import pytest
from conftest import assert_one_line_error, run_cli, save_image, tree_snapshot
from lmdbread import read_all

from caffe_lmdb.conversion import convert
from caffe_lmdb.encode import ConvertOptions
from caffe_lmdb.sources import InputError


@pytest.fixture
def lock():
    """chmod 000 a folder for the test; every folder is given its mode back at teardown, so tmp dirs go away."""
    locked: list[tuple[os.PathLike, int]] = []

    def lock(path) -> None:
        locked.append((path, stat.S_IMODE(os.stat(path).st_mode)))
        os.chmod(path, 0)

    yield lock
    for path, mode in reversed(locked):
        os.chmod(path, mode)


def special_safe_snapshot(root) -> dict[str, object]:
    """`tree_snapshot` that does not open FIFOs or devices (opening a FIFO to read it blocks)."""
    snapshot: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                snapshot[path] = "link:" + os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as f:
                    snapshot[path] = f.read()
            else:
                snapshot[path] = (stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode))
    return snapshot


def keys_of(lmdb_path) -> list[str]:
    return [key.decode() for key, _ in read_all(lmdb_path)]


def skipped_lines(path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- 7. symlink loops

def test_cli_two_symlink_loops_finish_with_each_image_once(image_tree, tmp_path):
    (image_tree / "cat" / "self").symlink_to(".")
    (image_tree / "cat" / "again").symlink_to(".")  # before the fix: exponential, never finished
    (image_tree / "dog" / "up").symlink_to("..")  # dog's walk then reaches cat too, once
    before = tree_snapshot(image_tree)
    result = run_cli("convert", image_tree, tmp_path / "out.lmdb", "-q", "--workers", "0", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert keys_of(tmp_path / "out.lmdb") == [
        "00000000_cat/a.png", "00000001_cat/deep/b c.png", "00000002_dog/g.png",
        "00000003_dog/up/cat/a.png", "00000004_dog/up/cat/deep/b c.png", "00000005_dog/x.JPG",
    ]
    assert tree_snapshot(image_tree) == before


# ---------------------------------------------------------------- 8. unreadable folders

@pytest.fixture
def dataset(tmp_path, rgb_image):
    """data/train/{bird (unreadable to be), cat/{a.png, locked/b.png}, dog/c.png} and data/val/cat/v.png."""
    root = tmp_path / "data"
    for relpath in ("train/bird/z.png", "train/cat/a.png", "train/cat/locked/b.png", "train/dog/c.png",
                    "val/cat/v.png"):
        save_image(root / relpath, rgb_image)
    return root


def test_cli_unreadable_folders_are_skipped_listed_and_fail_strict(dataset, tmp_path, lock, without_file_caps):
    train = dataset / "train"
    before = tree_snapshot(train), tree_snapshot(dataset / "val")
    lock(train / "bird")  # a whole class folder: not "class folder has no images"
    lock(train / "cat" / "locked")

    result = run_cli("convert", dataset, "-q", "--workers", "0", drop_file_caps=True)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "has no images" not in result.stderr
    assert keys_of(dataset / "train.lmdb") == ["00000001_cat/a.png", "00000003_dog/c.png"]  # gaps: skipped
    assert skipped_lines(dataset / "train_skipped.txt") == [
        ["bird", "cannot list folder: permission denied"],
        ["cat/locked", "cannot list folder: permission denied"],
    ]
    assert keys_of(dataset / "val.lmdb") == ["00000000_cat/v.png"]

    strict = run_cli("convert", train, tmp_path / "strict.lmdb", "--strict", "-q", drop_file_caps=True)
    assert_one_line_error(strict, 1, train / "bird", "cannot list folder: permission denied", "--strict")
    assert not (tmp_path / "strict.lmdb").exists()

    for path in (train / "bird", train / "cat" / "locked"):
        os.chmod(path, 0o755)
    assert (tree_snapshot(train), tree_snapshot(dataset / "val")) == before


def test_cli_unreadable_split_or_input_folder_is_one_line(dataset, tmp_path, lock, without_file_caps):
    before = tree_snapshot(dataset)
    lock(dataset / "val")
    result = run_cli("convert", dataset, "-q", drop_file_caps=True)
    assert_one_line_error(result, 2, dataset / "val", "cannot list folder: permission denied")
    assert not (dataset / "train.lmdb").exists()  # nothing half-done: the splits are found before any is converted

    lock(dataset / "train")
    result = run_cli("convert", dataset / "train", tmp_path / "out.lmdb", "-q", drop_file_caps=True)
    assert_one_line_error(result, 2, dataset / "train", "cannot list folder: permission denied")
    assert not (tmp_path / "out.lmdb").exists()
    os.chmod(dataset / "train", 0o755)
    os.chmod(dataset / "val", 0o755)
    assert tree_snapshot(dataset) == before


def test_folder_entries_are_never_converted(image_tree, tmp_path):
    """A list line naming a folder is skipped with the reason (a readable folder: root sees the same)."""
    lst = tmp_path / "list.txt"
    lst.write_text("cat/a.png 0\ncat/deep 0\ndog/g.png 1\n")
    result = convert(None, tmp_path / "out.lmdb", list_file=lst, root=image_tree, workers=0)
    assert result.skipped_files == [("cat/deep", "is a folder, not an image file")]
    assert keys_of(tmp_path / "out.lmdb") == ["00000000_cat/a.png", "00000002_dog/g.png"]


# ---------------------------------------------------------------- 10. list files, FIFOs, devices, huge files

def test_cli_list_file_with_byte_order_mark_keeps_its_first_image(image_tree, tmp_path):
    lst = tmp_path / "list.txt"
    lst.write_bytes("cat/a.png 0\ndog/g.png 1\n".encode("utf-8-sig"))
    result = run_cli("convert", "--list", lst, "--root", image_tree, tmp_path / "out.lmdb", "-q")
    assert result.returncode == 0, result.stderr
    assert keys_of(tmp_path / "out.lmdb") == ["00000000_cat/a.png", "00000001_dog/g.png"]
    assert not (tmp_path / "out_skipped.txt").exists()


@pytest.mark.parametrize("flags", [(), ("--encoded",)])
def test_cli_list_column_beyond_float32_names_file_and_line(image_tree, tmp_path, flags):
    lst = tmp_path / "list.txt"
    lst.write_text("cat/a.png 0 0.5\ndog/g.png 1 3e40\n")
    before = tree_snapshot(image_tree)
    result = run_cli("convert", "--list", lst, "--root", image_tree, tmp_path / "out.lmdb", "-q", *flags)
    assert_one_line_error(result, 2, f"{lst}:2: value '3e40' does not fit a 32-bit float")
    assert not (tmp_path / "out.lmdb").exists() and not (tmp_path / "out_keys.npy").exists()
    assert tree_snapshot(image_tree) == before


@pytest.mark.parametrize("encoded", [False, True])
def test_raw_and_encoded_refuse_float_overflow_alike(image_tree, tmp_path, encoded):
    lst = tmp_path / "list.txt"
    lst.write_text("cat/a.png 0 1e39\n")
    with pytest.raises(InputError, match=r"list.txt:1: value '1e39' does not fit a 32-bit float$"):
        convert(None, tmp_path / "out.lmdb", list_file=lst, root=image_tree, options=ConvertOptions(encoded=encoded))
    assert not (tmp_path / "out.lmdb").exists()


def special_files(root) -> None:
    os.mkfifo(root / "fifo.jpg")
    (root / "zero.jpg").symlink_to("/dev/zero")
    with open(root / "huge.png", "wb") as f:  # sparse: no disk space used
        from caffe_lmdb.sources import MAX_IMAGE_BYTES

        f.truncate(MAX_IMAGE_BYTES + 1)


@pytest.mark.parametrize("workers", [0, 1])
def test_fifo_device_and_huge_file_in_a_list_are_skipped(image_tree, tmp_path, workers):
    from caffe_lmdb.sources import MAX_IMAGE_BYTES

    special_files(image_tree)
    lst = tmp_path / "list.txt"  # 1 worker: at least 4 entries go through the worker processes
    lst.write_text("cat/a.png 0\nfifo.jpg 1\nzero.jpg 1\nhuge.png 0\ndog/g.png 1\n")
    result = convert(None, tmp_path / "out.lmdb", list_file=lst, root=image_tree, workers=workers)
    assert result.skipped_files == [
        ("fifo.jpg", "not a regular file (a FIFO)"),
        ("zero.jpg", "not a regular file (a character device)"),
        ("huge.png", f"file is larger than {MAX_IMAGE_BYTES} bytes ({MAX_IMAGE_BYTES + 1} bytes)"),
    ]
    assert keys_of(tmp_path / "out.lmdb") == ["00000000_cat/a.png", "00000004_dog/g.png"]


def test_cli_fifo_and_dev_zero_never_hang(image_tree, tmp_path):
    special_files(image_tree)
    os.mkfifo(image_tree / "cat" / "pipe.png")  # in the folder form: not listed at all
    lst = tmp_path / "list.txt"
    lst.write_text("cat/a.png 0\nfifo.jpg 1\nzero.jpg 1\n")
    before = special_safe_snapshot(image_tree)
    result = run_cli("convert", "--list", lst, "--root", image_tree, tmp_path / "list.lmdb", "-q", timeout=60)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "fifo.jpg" in result.stderr and "zero.jpg" in result.stderr  # the skip warnings name them
    assert skipped_lines(tmp_path / "list_skipped.txt") == [
        ["fifo.jpg", "not a regular file (a FIFO)"], ["zero.jpg", "not a regular file (a character device)"],
    ]
    strict = run_cli("convert", "--list", lst, "--root", image_tree, tmp_path / "strict.lmdb", "--strict", "-q",
                     timeout=60)
    assert_one_line_error(strict, 1, image_tree / "fifo.jpg", "not a regular file (a FIFO)")

    folder = run_cli("convert", image_tree, tmp_path / "folder.lmdb", "-q", timeout=60)
    assert folder.returncode == 0, folder.stderr
    assert keys_of(tmp_path / "folder.lmdb") == [  # cat/pipe.png is not an image: left out
        "00000000_cat/a.png", "00000001_cat/deep/b c.png", "00000002_dog/g.png", "00000003_dog/x.JPG",
    ]
    assert special_safe_snapshot(image_tree) == before
