"""The atomic output: what --overwrite may replace, one writer per target, full disks, all-or-nothing publishing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import lmdb
import numpy as np
import pytest
from conftest import REPO, assert_one_line_error, run_cli, save_image, tree_snapshot
from lmdbread import read_all
from PIL import Image
from test_migration import folder2lmdb_pickle

from caffe_lmdb import load_keys
from caffe_lmdb.atomic_lmdb import AtomicLmdb, OutputError
from caffe_lmdb.conversion import convert
from caffe_lmdb.sources import InputError
from caffe_lmdb.targets import is_lmdb


def _tree(root, count=6, side=40, rng=None):
    rng = rng or np.random.default_rng(5)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(side, side + 3, 3), dtype=np.uint8)
        save_image(root / ("cat" if i % 2 else "dog") / f"{i:02d}.png", Image.fromarray(pixels))
    return root


def _user_folder(path):
    """A folder of someone's documents, as a mistyped output path might name."""
    (path / "notes").mkdir(parents=True)
    (path / "README.md").write_text("mine\n")
    (path / "notes" / "todo.txt").write_text("keep me\n")
    return path


# ---------------------------------------------------------------- what --overwrite may replace

def test_overwrite_refuses_a_folder_that_holds_the_input(tmp_path):
    """`convert data/train data --overwrite`, a typo for data/train.lmdb: data/ keeps everything."""
    data = tmp_path / "data"
    _tree(data / "train")
    _tree(data / "val", count=2)
    (data / "README.md").write_text("the dataset\n")
    before = tree_snapshot(data)
    result = run_cli("convert", data / "train", data, "--overwrite", "-q")
    assert_one_line_error(result, 2, data, "contains the input")
    assert tree_snapshot(data) == before


@pytest.mark.parametrize("where", ["same", "inside"])
def test_output_equal_to_or_inside_the_input_folder_is_refused(tmp_path, where):
    src = _tree(tmp_path / "imgs")
    before = tree_snapshot(src)
    out = src if where == "same" else src / "cat" / "out.lmdb"
    result = run_cli("convert", src, out, "--overwrite", "-q")
    assert_one_line_error(result, 2, out)
    assert tree_snapshot(src) == before


def test_an_output_inside_a_list_files_root_is_fine(tmp_path):
    """Caffe users write `convert_imageset /data/ list.txt /data/train_lmdb`: the root is not scanned."""
    src = _tree(tmp_path / "data")
    (tmp_path / "data" / "list.txt").write_text("cat/01.png 1\ndog/00.png 0\n")
    convert(None, src / "train.lmdb", list_file=src / "list.txt", root=src, workers=0)
    assert len(read_all(src / "train.lmdb")) == 2


@pytest.mark.parametrize("command", ["convert", "merge", "migrate"])
def test_overwrite_never_deletes_a_folder_of_documents(tmp_path, command):
    src = _tree(tmp_path / "src")
    docs = _user_folder(tmp_path / "docs")
    before = tree_snapshot(docs)
    if command == "convert":
        args = ["convert", src, docs]
    elif command == "merge":
        convert(src, tmp_path / "x.lmdb", workers=0)
        args = ["merge", tmp_path / "x.lmdb", "-o", docs]
    else:
        folder2lmdb_pickle(tmp_path / "old.lmdb", [(src / "cat" / "01.png").read_bytes()], [1])
        args = ["migrate", tmp_path / "old.lmdb", docs]
    result = run_cli(*args, "--overwrite", "-q")
    stderr = assert_one_line_error(result, 2, docs, "not an LMDB")
    assert "README.md" in stderr  # says what is there
    assert tree_snapshot(docs) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overwrite_refuses_a_plain_file_and_a_non_npy_keys_file(tmp_path):
    src = _tree(tmp_path / "src")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    with pytest.raises(InputError, match="not an LMDB"):
        convert(src, notes, overwrite=True, workers=0)
    assert notes.read_text() == "mine\n"
    with pytest.raises(InputError, match="is not a .npy keys file"):
        convert(src, tmp_path / "o.lmdb", keys_path=_planted(tmp_path / "k.npy"), overwrite=True, workers=0)
    assert (tmp_path / "k.npy").read_text() == "not numpy\n"
    assert not (tmp_path / "o.lmdb").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.npy", "notes.txt", "src"]


def _planted(path):
    path.write_text("not numpy\n")
    return path


def test_overwrite_replaces_an_lmdb_folder_a_single_file_lmdb_and_an_empty_folder(tmp_path):
    src = _tree(tmp_path / "src")
    folder = tmp_path / "a.lmdb"
    convert(src, folder, workers=0, options=None)
    single = tmp_path / "b.lmdb"
    env = lmdb.open(str(single), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    env.close()
    os.unlink(str(single) + "-lock")
    empty = tmp_path / "c.lmdb"
    empty.mkdir()
    assert is_lmdb(folder) and is_lmdb(single) and not is_lmdb(empty)
    for out in (folder, single, empty):
        convert(src, out, overwrite=True, workers=0)
        assert out.is_dir() and len(read_all(out)) == 6
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no .old.tmp or lock left


def test_without_overwrite_an_existing_side_file_is_refused(tmp_path):
    src = _tree(tmp_path / "src")
    (tmp_path / "o_classes.txt").write_text("someone's list\n")
    with pytest.raises(InputError, match="o_classes.txt: already exists"):
        convert(src, tmp_path / "o.lmdb", workers=0)
    assert (tmp_path / "o_classes.txt").read_text() == "someone's list\n"
    assert not (tmp_path / "o.lmdb").exists()


# ---------------------------------------------------------------- one writer per target

def _slow_conversion(tmp_path, out, *extra):
    """A list of 1500 lines pointing at one 740x500 PNG: seconds of work, so a second run can race it."""
    root = tmp_path / "slow"
    if not (root / "m.png").exists():
        noise = np.random.default_rng(9).integers(0, 256, size=(500, 740, 3), dtype=np.uint8)
        save_image(root / "m.png", Image.fromarray(noise))
        (tmp_path / "list.txt").write_text("m.png 1\n" * 1500)
    cmd = [sys.executable, str(REPO / "tools" / "convert.py"), "--list", str(tmp_path / "list.txt"), "--root",
           str(root), str(out), "--workers", "0", "--commit-every", "10", "-q", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, proc, what):
    deadline = time.monotonic() + 60
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the first run ended before {what}: {proc.communicate()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.parametrize("second_overwrites", [False, True])
def test_a_second_writer_on_the_same_target_fails_at_once(tmp_path, second_overwrites):
    out = tmp_path / "out.lmdb"
    first = _slow_conversion(tmp_path, out)
    _wait_for(lambda: list(tmp_path.glob(".out.lmdb.tmp-*")), first, "writing started")
    started = time.monotonic()
    second = run_cli("convert", "--list", tmp_path / "list.txt", "--root", tmp_path / "slow", out, "-q",
                     *(["--overwrite"] if second_overwrites else []))
    assert_one_line_error(second, 2, out, "another caffe-lmdb run is writing it", f"pid {first.pid}")
    assert time.monotonic() - started < 30 and first.poll() is None  # failed at once, the first still runs
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert len(load_keys(tmp_path / "out_keys.npy")) == len(read_all(out)) == 1500
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # lock file gone too


def test_kill_9_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out.lmdb"
    first = _slow_conversion(tmp_path, out)
    _wait_for(lambda: list(tmp_path.glob(".out.lmdb.tmp-*")), first, "writing started")
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert (tmp_path / ".out.lmdb.lock").exists()  # the file stays, the kernel dropped the lock
    (tmp_path / "one.txt").write_text("m.png 3\n")
    result = run_cli("convert", "--list", tmp_path / "one.txt", "--root", tmp_path / "slow", out, "-q")
    assert result.returncode == 0, result.stderr
    assert len(read_all(out)) == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temporary and lock cleaned


# ---------------------------------------------------------------- full disks

def _fill(folder, leave: int) -> None:
    """Fill the file system of `folder` until only about `leave` bytes are free (0: full to the last block)."""
    fd = os.open(folder / "filler.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (65536, 4096):
            while os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize > leave + (chunk if leave else 0):
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError:
                    break
    finally:
        os.close(fd)


@pytest.mark.parametrize("command", ["convert", "merge"])
def test_a_full_disk_gives_one_line_and_leaves_nothing(tmp_path, small_fs, command):
    src = _tree(tmp_path / "src", count=40, side=60)  # ~440 KB raw
    out = small_fs / "out.lmdb"
    _fill(small_fs, leave=200 << 10)
    if command == "convert":
        result = run_cli("convert", src, out, "--workers", "0", "-q")
    else:
        convert(src, tmp_path / "x.lmdb", workers=0)
        result = run_cli("merge", tmp_path / "x.lmdb", "-o", out, "-q")
    assert_one_line_error(result, 1, out, "no space left on device")
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler.bin"]


def test_a_full_disk_keeps_the_earlier_output_whole(tmp_path, small_fs):
    small = _tree(tmp_path / "small", count=2, side=8)
    big = _tree(tmp_path / "big", count=40, side=60)
    out = small_fs / "out.lmdb"
    convert(small, out, workers=0)
    before = tree_snapshot(small_fs)
    _fill(small_fs, leave=200 << 10)
    result = run_cli("convert", big, out, "--overwrite", "--workers", "0", "-q")
    assert_one_line_error(result, 1, out, "no space left on device")
    (small_fs / "filler.bin").unlink()
    assert tree_snapshot(small_fs) == before


def test_keys_that_cannot_be_written_leave_nothing_published(tmp_path, small_fs):
    """The LMDB fits, the keys file's disk is full: neither the LMDB nor the classes file appears."""
    src = _tree(tmp_path / "src")
    _fill(small_fs, leave=0)
    out = tmp_path / "o.lmdb"
    result = run_cli("convert", src, out, "--keys", small_fs / "k.npy", "--workers", "0", "-q")
    assert_one_line_error(result, 1, f"{small_fs / 'k.npy'}: no space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small_fs", "src"]
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler.bin"]
    (small_fs / "filler.bin").unlink()
    assert run_cli("convert", src, out, "--keys", small_fs / "k.npy", "-q").returncode == 0  # the re-run works


def test_an_unwritable_keys_folder_fails_before_converting(tmp_path, without_file_caps):
    src = _tree(tmp_path / "src")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = run_cli("convert", src, tmp_path / "o.lmdb", "--keys", locked / "k.npy", "-q", drop_file_caps=True)
    finally:
        locked.chmod(0o755)
    assert_one_line_error(result, 1, f"{locked / 'k.npy'}: permission denied")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked", "src"]


def test_write_errors_are_output_errors_naming_the_output(tmp_path, small_fs):
    src = _tree(tmp_path / "src", count=40, side=60)
    _fill(small_fs, leave=100 << 10)
    with pytest.raises(OutputError, match=r"out.lmdb: cannot write the LMDB: .*no space left on device"):
        convert(src, small_fs / "out.lmdb", workers=0)


_WATCH = """
import os, sys
path, stop = sys.argv[1], sys.argv[2]
checks = missing = 0
while checks % 256 or not os.path.exists(stop):
    checks += 1
    try:
        os.lstat(path)
    except FileNotFoundError:
        missing += 1
print(checks, missing)
"""


def test_overwriting_never_leaves_a_moment_without_the_output(tmp_path):
    """The new LMDB is swapped in (`RENAME_EXCHANGE`): a reader opening the path always finds one."""
    out = tmp_path / "out.lmdb"

    def publish(value: bytes) -> None:
        with AtomicLmdb(out, overwrite=True) as lmdb_out:
            lmdb_out.put(b"00000000_a", value)
            lmdb_out.finish()

    publish(b"first")
    watcher = subprocess.Popen([sys.executable, "-c", _WATCH, str(out), str(tmp_path / "stop")],
                               stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.2)  # the watcher is looking
        for i in range(40):
            publish(b"v%d" % i)
    finally:
        (tmp_path / "stop").touch()
        checks, missing = map(int, watcher.communicate(timeout=30)[0].split())
    assert checks > 1000 and missing == 0
    assert read_all(out) == [(b"00000000_a", b"v39")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.lmdb", "out_keys.npy", "stop"]


# ---------------------------------------------------------------- names, not patterns; files that are not ours

@pytest.mark.parametrize("name", ["*.lmdb", "o?.lmdb", "o[ab].lmdb"])
def test_an_output_name_is_never_a_pattern_for_other_outputs_temporaries(tmp_path, name):
    src = _tree(tmp_path / "src")
    theirs = tmp_path / ".oa.lmdb.tmp-999999"
    theirs.mkdir()
    (theirs / "data.mdb").write_bytes(b"another run's records")
    (tmp_path / ".oa_keys.npy.tmp-999999").write_bytes(b"another run's keys")
    (tmp_path / ".oa.lmdb.tmp-999999.old").write_bytes(b"another run's old LMDB")
    before = tree_snapshot(tmp_path / ".oa.lmdb.tmp-999999"), (tmp_path / ".oa_keys.npy.tmp-999999").read_bytes()
    convert(src, tmp_path / name, workers=0)
    convert(src, tmp_path / name, workers=0, overwrite=True)
    assert (tree_snapshot(theirs), (tmp_path / ".oa_keys.npy.tmp-999999").read_bytes()) == before
    assert (tmp_path / ".oa.lmdb.tmp-999999.old").exists()
    assert len(read_all(tmp_path / name)) == 6


def test_side_files_of_another_lmdb_are_not_replaced(tmp_path):
    src = _tree(tmp_path / "src")
    convert(src, tmp_path / "train.lmdb", workers=0)
    mine = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("train_")}
    result = run_cli("convert", src, tmp_path / "train", "--overwrite", "--workers", "0", "-q")
    assert_one_line_error(result, 2, tmp_path / "train", "train.lmdb", "train_keys.npy")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("train_")} == mine
    assert not (tmp_path / "train").exists()


def test_overwriting_a_single_file_lmdb_removes_its_lock_file(tmp_path):
    src = _tree(tmp_path / "src")
    single = tmp_path / "b.lmdb"
    with lmdb.open(str(single), subdir=False) as env, env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    assert (tmp_path / "b.lmdb-lock").exists()
    convert(src, single, overwrite=True, workers=0)
    assert single.is_dir() and not (tmp_path / "b.lmdb-lock").exists()


def test_a_hard_link_at_the_lock_path_is_refused_not_truncated(tmp_path):
    src = _tree(tmp_path / "src")
    precious = tmp_path / "precious.txt"
    precious.write_text("do not truncate\n")
    os.link(precious, tmp_path / ".o.lmdb.lock")
    result = run_cli("convert", src, tmp_path / "o.lmdb", "--workers", "0", "-q")
    assert_one_line_error(result, 2, ".o.lmdb.lock", "hard link")
    assert precious.read_text() == "do not truncate\n" and not (tmp_path / "o.lmdb").exists()


def test_a_key_over_lmdbs_limit_is_skipped_and_listed(tmp_path):
    root = tmp_path / "src"
    long_name = "n" * 250
    save_image(root / long_name / long_name / "x.png", Image.new("RGB", (4, 3)))
    save_image(root / "short.png", Image.new("RGB", (4, 3)))
    (tmp_path / "list.txt").write_text(f"{long_name}/{long_name}/x.png 0\nshort.png 1\n")
    result = run_cli("convert", "--list", tmp_path / "list.txt", "--root", root, tmp_path / "o.lmdb", "--workers", "0")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert [key for key, _ in read_all(tmp_path / "o.lmdb")] == [b"00000001_short.png"]
    skipped = (tmp_path / "o_skipped.txt").read_text()
    assert skipped.startswith(f"{long_name}/{long_name}/x.png\t") and "over LMDB's limit of 511" in skipped
