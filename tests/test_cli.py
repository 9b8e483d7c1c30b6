"""The `caffe-lmdb` command, run in-process."""

from __future__ import annotations

from conftest import SAMPLE_TRAIN

from caffe_lmdb.cli import main


def test_selftest_on_bundled_samples(capsys):
    assert main(["selftest", str(SAMPLE_TRAIN)]) == 0
    out = capsys.readouterr().out
    assert "20 images, 20 round-tripped pixel-exact, 0 mismatched" in out


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["selftest", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["no-such-command"]) == 2
