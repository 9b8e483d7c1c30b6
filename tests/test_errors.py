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


def test_not_found_errors_are_file_not_found_and_keep_their_library_type(tmp_path):
    from caffe_lmdb import LmdbDataset_train, load_keys, migrate
    from caffe_lmdb.errors import InputError, KeysFileError, LmdbFormatError
    from caffe_lmdb.sources import load_entries, parse_list_file

    missing = tmp_path / "missing"
    (tmp_path / "list.txt").write_text("a.png 0\n")
    cases = [
        (lambda: load_entries(missing), InputError, "input folder not found"),
        (lambda: load_entries(list_file=tmp_path / "list.txt", root=missing), InputError, "root folder not found"),
        (lambda: parse_list_file(missing, tmp_path), InputError, "list file not found"),
        (lambda: migrate(missing, tmp_path / "new.lmdb"), InputError, "LMDB not found"),
        (lambda: load_keys(missing), KeysFileError, "keys file not found"),
        (lambda: LmdbDataset_train(missing), LmdbFormatError, "LMDB not found"),
    ]
    for call, library_type, message in cases:
        with pytest.raises(FileNotFoundError, match=message) as info:
            call()
        assert isinstance(info.value, library_type) and isinstance(info.value, ValueError)
        assert str(info.value) == f"{missing}: {message}"  # the one line the CLI prints, as before
        with pytest.raises(library_type, match=message):
            call()


def test_not_found_keeps_the_cli_exit_codes(tmp_path, capsys):
    from caffe_lmdb.cli import main

    missing = tmp_path / "missing"
    for argv, code, message in [
        (["convert", str(missing), str(tmp_path / "o.lmdb"), "-q"], 2, "input folder not found"),
        (["migrate", str(missing), str(tmp_path / "new.lmdb")], 2, "LMDB not found"),
        (["info", str(missing)], 1, "LMDB not found"),
    ]:
        assert main(argv) == code
        assert capsys.readouterr().err == f"caffe-lmdb {argv[0]}: error: {missing}: {message}\n"
