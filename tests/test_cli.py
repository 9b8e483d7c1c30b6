"""The `caffe-lmdb` command, run in-process."""

from __future__ import annotations

import runpy
import sys

import pytest
from conftest import NO_IDAT_KEY, REPO, SAMPLE_TRAIN, assert_one_line_error, run_cli, write_lmdb
from lmdbread import read_all

from caffe_lmdb.cli import build_parser, main


def test_selftest_on_bundled_samples(capsys):
    assert main(["selftest", str(SAMPLE_TRAIN)]) == 0
    out = capsys.readouterr().out
    assert "20 images, 20 round-tripped pixel-exact, 0 mismatched" in out


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["selftest", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2


# ---------------------------------------------------------------- the inspection tools and the loader check

TOOL_COMMANDS = {"info": "info", "verify": "verify", "mean": "mean", "export": "export", "grid": "grid",
                 "main": "loader", "serve": "serve"}


@pytest.mark.parametrize("command", sorted(set(TOOL_COMMANDS.values())))
def test_tool_help_has_an_example_and_help_per_option(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "Example: caffe-lmdb " + command in " ".join(text.split())
    parser = next(action for action in build_parser()._actions if action.dest == "command").choices[command]
    assert all(action.help for action in parser._actions), command


@pytest.mark.parametrize("script", sorted(TOOL_COMMANDS))
def test_tools_scripts_call_their_subcommand(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"tools/{script}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "tools" / f"{script}.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert f"caffe-lmdb {TOOL_COMMANDS[script]}" in capsys.readouterr().out


def test_loader_check_prints_keys_and_batch_shapes(legacy_rgb_lmdb, tmp_path, capsys):
    three = write_lmdb(tmp_path / "three", dict(read_all(legacy_rgb_lmdb[0])[:3]))
    assert main(["loader", str(three), "--workers", "0"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "key 0", "key 1", "torch.Size([2, 224, 224, 3])", "key 2", "torch.Size([1, 224, 224, 3])"]
    assert main(["loader", str(three), "--workers", "-1"]) == 2
    assert main(["loader", str(tmp_path / "missing.lmdb")]) == 1


def test_loader_check_with_workers_and_keys_file(image_tree, tmp_path):
    from caffe_lmdb.conversion import convert
    from caffe_lmdb.dataloader_check import loader_check

    convert(image_tree, tmp_path / "train.lmdb", workers=1, progress=False)
    lines = list(loader_check(tmp_path / "train.lmdb", batch_size=3, size=8, num_workers=2))
    assert lines == ["key 0", "key 1", "key 2", "torch.Size([3, 8, 8, 3])", "key 3", "torch.Size([1, 8, 8, 3])"]


def test_loader_transform_gives_hwc_uint8():
    import torch
    from PIL import Image

    from caffe_lmdb.dataloader_check import ResizeToHWC

    tensor = ResizeToHWC(224)(Image.new("L", (7, 5), 9))
    assert tensor.shape == (224, 224, 3) and tensor.dtype == torch.uint8 and int(tensor[0, 0, 0]) == 9


def test_loader_check_on_hostile_payloads_reads_or_names_the_key(hostile_lmdbs):
    """A damaged EXIF tag once crashed `loader` in its worker (struct.error); a PNG without IDAT is one line."""
    decodable, broken = hostile_lmdbs
    result = run_cli("loader", decodable, "--workers", "0", "--size", "8")
    assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr, result.stderr
    assert "key 1" in result.stdout
    result = run_cli("loader", broken, "--workers", "0", "--size", "8")
    assert_one_line_error(result, 1, broken, NO_IDAT_KEY, "no IDAT chunk")


def test_convert_encoded_before_the_paths_as_caffe_users_write_it(image_tree, tmp_path):
    """`--encoded`'s optional BOOL value once swallowed SRC: a usage error where Caffe's command line works."""
    result = run_cli("convert", "--encoded", image_tree, tmp_path / "out.lmdb", "-q")
    assert result.returncode == 0, result.stderr
    result = run_cli("convert", "--gray", "--shuffle", image_tree, tmp_path / "gray.lmdb", "-q")
    assert result.returncode == 0, result.stderr
    info = run_cli("info", tmp_path / "out.lmdb")
    assert "4 records: 0 raw, 4 encoded" in info.stdout, info.stdout
    assert "1x" in run_cli("info", tmp_path / "gray.lmdb").stdout
