"""`errors.describe_os_error`: one line naming the file(s) of a failed file operation."""

from __future__ import annotations

import errno
import os

import pytest

from caffe_lmdb.errors import describe_os_error


def test_a_rename_names_both_paths_and_one_path_only_once(tmp_path):
    (tmp_path / "a").write_text("x")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "keep").write_text("x")
    with pytest.raises(OSError) as info:
        os.rename(tmp_path / "a", tmp_path / "adir")
    assert describe_os_error(info.value) == f"{tmp_path / 'a'} -> {tmp_path / 'adir'}: is a directory"
    same = OSError(errno.EISDIR, "Is a directory", str(tmp_path / "adir"), None, str(tmp_path / "adir"))
    assert describe_os_error(same) == f"{tmp_path / 'adir'}: is a directory"
