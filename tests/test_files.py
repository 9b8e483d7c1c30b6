"""`files.write_bytes_atomic`: a new file renamed into place, except over FIFOs and devices, which are written into."""

from __future__ import annotations

import errno
import os
import socket
import stat
import threading
import time

import pytest
from conftest import FifoReader, assert_dev_null_intact, char_device

from caffe_lmdb.errors import CaffeLmdbError, OutputPathError
from caffe_lmdb.files import output_target_kind, write_bytes_atomic, write_text_atomic


def test_regular_file_and_symlinked_file_are_replaced(tmp_path):
    target, victim = tmp_path / "out.bin", tmp_path / "victim"
    target.write_bytes(b"old")
    victim.write_bytes(b"precious")
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    link = tmp_path / "link.bin"
    link.symlink_to(victim)
    write_bytes_atomic(link, b"new")
    assert not link.is_symlink() and link.read_bytes() == b"new" and victim.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.bin", "out.bin", "victim"]  # no temporary left


def test_fifo_is_written_into_and_stays_a_fifo(tmp_path):
    payload = os.urandom(300_000)  # several pipe buffers: the reader sets the pace
    with FifoReader(tmp_path / "pipe") as reader:
        assert output_target_kind(reader.path) == "write through"
        write_bytes_atomic(reader.path, payload)
    assert bytes(reader.data) == payload
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_fifo_nobody_reads_is_refused_at_once(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    start = time.monotonic()
    with pytest.raises(OutputPathError, match=rf"^{tmp_path}/pipe: is a FIFO that no process is reading$") as info:
        write_text_atomic(tmp_path / "pipe", "x")
    assert time.monotonic() - start < 5  # no wait for a reader that never comes
    assert info.value.errno == errno.ENXIO and isinstance(info.value, OSError)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)


def test_reader_that_leaves_early_is_an_error_not_a_broken_pipe(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    reader = os.open(tmp_path / "pipe", os.O_RDONLY | os.O_NONBLOCK)
    leaving = threading.Timer(0.3, os.close, (reader,))  # reads nothing, then leaves while the writer waits
    leaving.start()
    try:
        with pytest.raises(OutputPathError, match=r"pipe: the FIFO's reader closed it before every byte") as info:
            write_bytes_atomic(tmp_path / "pipe", b"x" * (4 << 20))  # more than the pipe holds
    finally:
        leaving.join()
    assert not isinstance(info.value, BrokenPipeError)  # the CLI takes BrokenPipeError for `| head`: exit 0


def test_character_device_is_written_into_not_replaced(tmp_path):
    node = char_device(tmp_path / "null")
    before = os.lstat(node)
    write_bytes_atomic(node, b"into the void")
    after = os.lstat(node)
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["null"]


def test_dev_null_is_written_into_not_replaced():
    write_bytes_atomic("/dev/null", b"into the void")
    write_text_atomic("/dev/null", "and text")
    assert_dev_null_intact()


@pytest.mark.parametrize("kind", ["directory", "socket", "link to fifo", "link to device"])
def test_folders_sockets_and_links_to_special_files_are_refused_and_left_alone(tmp_path, kind):
    target = tmp_path / "target"
    if kind == "directory":
        target.mkdir()
        expected = rf"^{target}: is a directory, not a file$"
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(target))
        expected = rf"^{target}: is a socket, not a file; refusing to replace it$"
    elif kind == "link to fifo":
        os.mkfifo(tmp_path / "pipe")
        target.symlink_to(tmp_path / "pipe")
        expected = rf"^{target}: is a symbolic link to a FIFO \({tmp_path}/pipe\); give that path itself"
    else:
        target.symlink_to("/dev/null")
        expected = rf"^{target}: is a symbolic link to a character device \(/dev/null\)"
    before = os.lstat(target)
    with pytest.raises(OutputPathError, match=expected) as info:
        output_target_kind(target)
    with pytest.raises(OutputPathError, match=expected):
        write_bytes_atomic(target, b"data")
    assert isinstance(info.value, CaffeLmdbError) and isinstance(info.value, OSError)
    assert " -> " not in str(info.value)
    after = os.lstat(target)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert_dev_null_intact()
