"""convert --append / append=True: one run's output, class checks, refusals, and kill -9 at any moment."""

from __future__ import annotations

import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
from conftest import REPO, kill_when_temporary_reaches, save_image
from PIL import Image

from caffe_lmdb import cli, convert, load_keys, scan_keys, verify, write_dataset
from caffe_lmdb.errors import InputError


def records(path: Path) -> list[tuple[bytes, bytes]]:
    with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
        return list(txn.cursor())


def side_files(tmp_path: Path, stem: str) -> dict[str, bytes]:
    return {name: (tmp_path / f"{stem}_{name}").read_bytes() for name in ("keys.npy", "skipped.txt", "classes.txt")
            if (tmp_path / f"{stem}_{name}").exists()}


@pytest.fixture
def listed(tmp_path, rng):
    """Ten small PNGs and a broken file, listed with gaps in the middle and at the end of the first half."""
    root = tmp_path / "img"
    for i in range(10):
        save_image(root / f"{i}.png", Image.fromarray(rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)))
    (root / "bad.png").write_bytes(b"not an image")
    lines = [f"{i}.png {i % 3}\n" for i in range(10)]
    lines[2:2] = ["bad.png 1\n"]
    lines[6:6] = ["bad.png 2\n"]  # the last line of the first list: a gap only the skipped list knows
    (tmp_path / "first.txt").write_text("".join(lines[:7]))
    (tmp_path / "second.txt").write_text("".join(lines[7:]))
    (tmp_path / "all.txt").write_text("".join(lines))
    return root


def test_append_equals_one_run(tmp_path, listed):
    convert(None, tmp_path / "a.lmdb", list_file=tmp_path / "first.txt", root=listed, workers=0)
    result = convert(None, tmp_path / "a.lmdb", list_file=tmp_path / "second.txt", root=listed, workers=2,
                     append=True)
    assert (result.written, result.skipped) == (5, 0)
    convert(None, tmp_path / "one.lmdb", list_file=tmp_path / "all.txt", root=listed, workers=0)
    assert records(tmp_path / "a.lmdb") == records(tmp_path / "one.lmdb")
    assert side_files(tmp_path, "a") == side_files(tmp_path, "one")
    assert load_keys(tmp_path / "a_keys.npy")[-1] == b"00000011_9.png"
    assert verify(tmp_path / "a.lmdb").ok
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".a", "a.", "a_"))) == [
        "a.lmdb", "a_keys.npy", "a_skipped.txt"]


def test_append_through_the_command_line(tmp_path, listed, capsys):
    base = ["convert", "--workers", "0", "-q", "--root", str(listed)]
    assert cli.main([*base, "--list", str(tmp_path / "first.txt"), str(tmp_path / "a.lmdb")]) == 0
    assert cli.main([*base, "--list", str(tmp_path / "second.txt"), str(tmp_path / "a.lmdb"), "--append"]) == 0
    assert "5 records written" in capsys.readouterr().out
    convert(None, tmp_path / "one.lmdb", list_file=tmp_path / "all.txt", root=listed, workers=0)
    assert records(tmp_path / "a.lmdb") == records(tmp_path / "one.lmdb")
    assert cli.main([*base, "--list", str(tmp_path / "second.txt"), str(tmp_path / "a.lmdb"), "--append",
                     "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_folder_classes_are_matched_by_name(tmp_path, rng):
    def folder(name: str, classes: list[str]) -> Path:
        for cls in classes:
            save_image(tmp_path / name / cls / f"{name}.png",
                       Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)))
        return tmp_path / name

    convert(folder("one", ["cat", "dog"]), tmp_path / "pets.lmdb", workers=0)
    convert(folder("two", ["dog"]), tmp_path / "pets.lmdb", workers=0, append=True)  # dog is label 1 here too
    labels = [parse_label(value) for _, value in records(tmp_path / "pets.lmdb")]
    assert labels == [0, 1, 1]
    with pytest.raises(InputError, match="new class 'bird' is not in .*pets_classes.txt .*--extend-classes"):
        convert(folder("three", ["bird", "dog"]), tmp_path / "pets.lmdb", workers=0, append=True)
    assert len(records(tmp_path / "pets.lmdb")) == 3  # refused before anything was written
    convert(tmp_path / "three", tmp_path / "pets.lmdb", workers=0, append=True, extend_classes=True)
    assert (tmp_path / "pets_classes.txt").read_text().split() == ["cat", "dog", "bird"]
    assert [parse_label(value) for _, value in records(tmp_path / "pets.lmdb")] == [0, 1, 1, 2, 1]


def parse_label(value: bytes) -> int:
    from caffe_lmdb import parse_datum

    return parse_datum(value).label


def test_refusals_name_the_problem(tmp_path, listed):
    with pytest.raises(InputError, match="no LMDB to append to; convert without --append first"):
        convert(None, tmp_path / "none.lmdb", list_file=tmp_path / "first.txt", root=listed, append=True)
    convert(None, tmp_path / "a.lmdb", list_file=tmp_path / "first.txt", root=listed, workers=0)
    (tmp_path / "a_keys.npy").unlink()
    with pytest.raises(InputError, match=r"no keys file .*a_keys.npy.*save_keys\('.*a_keys.npy', "
                                         r"c.scan_keys\('.*a.lmdb'\)\)"):
        convert(None, tmp_path / "a.lmdb", list_file=tmp_path / "second.txt", root=listed, append=True)
    from caffe_lmdb import save_keys

    save_keys(tmp_path / "a_keys.npy", scan_keys(tmp_path / "a.lmdb")[:-1])
    with pytest.raises(InputError, match="lists 4 keys but .* holds 5 records"):
        convert(None, tmp_path / "a.lmdb", list_file=tmp_path / "second.txt", root=listed, append=True)
    with pytest.raises(InputError, match="--num-shards"):
        convert(None, tmp_path / "a.lmdb", list_file=tmp_path / "second.txt", root=listed, append=True,
                num_shards=2, shard_index=0)


def test_write_dataset_append_equals_one_run(tmp_path, rng):
    samples = [(rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8), [i % 2, 0.5]) for i in range(9)]
    samples[3] = (b"broken", 0)
    write_dataset(samples[:5], tmp_path / "a.lmdb", workers=0, classes=["no", "yes"])
    write_dataset(samples[5:], tmp_path / "a.lmdb", workers=0, append=True)
    write_dataset(samples, tmp_path / "one.lmdb", workers=0, classes=["no", "yes"])
    keys = [key for key, _ in records(tmp_path / "a.lmdb")]
    assert keys[-1] == b"00000008_8"  # the default name is the line id, so one run gives the same keys
    assert records(tmp_path / "a.lmdb") == records(tmp_path / "one.lmdb")
    assert side_files(tmp_path, "a") == side_files(tmp_path, "one")
    assert (tmp_path / "a_classes.txt").read_text() == "no\nyes\n"
    with pytest.raises(InputError, match="class 1 is 'yes' there but 'maybe'"):
        write_dataset(samples, tmp_path / "a.lmdb", append=True, classes=["no", "maybe"])
    with pytest.raises(InputError, match="new class 'maybe'"):
        write_dataset(samples, tmp_path / "a.lmdb", append=True, classes=["no", "yes", "maybe"])


# ---------------------------------------------------------------- kill -9 during an append, for real

def _big_lists(tmp_path: Path) -> tuple[Path, Path]:
    noise = np.random.default_rng(5).integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    save_image(tmp_path / "src" / "m.png", Image.fromarray(noise))
    (tmp_path / "old.txt").write_text("m.png 0\n" * 300)
    (tmp_path / "new.txt").write_text("m.png 1\n" * 900)
    return tmp_path / "old.txt", tmp_path / "new.txt"


@pytest.mark.parametrize("point", ["copying", "appending", "late"])
def test_kill_during_append_leaves_old_or_new(tmp_path, point):
    old_list, new_list = _big_lists(tmp_path)
    out = tmp_path / "out.lmdb"
    convert(None, out, list_file=old_list, root=tmp_path / "src", workers=0)
    old_keys, old_size = load_keys(tmp_path / "out_keys.npy").tolist(), (out / "data.mdb").stat().st_size
    cmd = [sys.executable, str(REPO / "tools" / "convert.py"), "--list", str(new_list), "--root", str(tmp_path / "src"),
           str(out), "--append", "--workers", "0", "--commit-every", "5", "-q"]
    threshold = {"copying": 1, "appending": old_size + (4 << 20), "late": old_size + (40 << 20)}[point]
    kill_when_temporary_reaches(cmd, tmp_path, "out.lmdb", threshold)
    report = verify(out)
    assert report.ok, report
    lmdb_keys = scan_keys(out).tolist()
    new_keys = old_keys + [f"{300 + i:08d}_m.png".encode() for i in range(900)]
    assert lmdb_keys in (old_keys, new_keys)
    if (tmp_path / "out_keys.npy").exists():
        assert load_keys(tmp_path / "out_keys.npy").tolist() == lmdb_keys
    if point != "late":
        assert lmdb_keys == old_keys, "killed before it could have finished"
    # and the next append runs normally, clearing what the killed one left
    if lmdb_keys == old_keys:
        convert(None, out, list_file=new_list, root=tmp_path / "src", workers=0, append=True)
        assert scan_keys(out).tolist() == new_keys
    assert not list(tmp_path.glob(".out.lmdb.tmp-*"))


# ---------------------------------------------------------------- restarted jobs, other layouts, odd targets

def test_append_resume_after_the_append_finished_is_a_no_op(tmp_path, listed, capsys):
    base = ["convert", "--workers", "0", "--root", str(listed)]
    assert cli.main([*base, "-q", "--list", str(tmp_path / "first.txt"), str(tmp_path / "a.lmdb")]) == 0
    append = [*base, "--list", str(tmp_path / "second.txt"), str(tmp_path / "a.lmdb"), "--append", "--resume"]
    assert cli.main(append) == 0  # nothing to resume: a plain append
    done = records(tmp_path / "a.lmdb"), side_files(tmp_path, "a")
    capsys.readouterr()
    assert cli.main(append) == 0  # the preempted job restarted after it had finished
    assert "already complete" in capsys.readouterr().out
    assert (records(tmp_path / "a.lmdb"), side_files(tmp_path, "a")) == done
    assert cli.main([*append[:-1]]) == 0  # without --resume, appending the same images again is what was asked
    assert len(records(tmp_path / "a.lmdb")) == len(done[0]) + 5


def test_append_with_another_record_layout_is_refused(tmp_path, listed, capsys):
    convert(None, tmp_path / "a.lmdb", list_file=tmp_path / "first.txt", root=listed, workers=0)
    before = records(tmp_path / "a.lmdb")
    base = ["convert", "--workers", "0", "-q", "--root", str(listed), "--list", str(tmp_path / "second.txt"),
            str(tmp_path / "a.lmdb"), "--append"]
    for flags, said in [(["--gray"], "raw gray"), (["--encoded"], "encoded"),
                        (["--resize_height", "3", "--resize_width", "3"], "raw 3-channel 3x3")]:
        assert cli.main([*base, *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and "its records are raw 3-channel" in err and "\n" not in err, err
    assert records(tmp_path / "a.lmdb") == before


def test_append_to_a_link_or_a_single_file_lmdb_says_so(tmp_path, listed):
    convert(None, tmp_path / "a.lmdb", list_file=tmp_path / "first.txt", root=listed, workers=0)
    (tmp_path / "link.lmdb").symlink_to(tmp_path / "a.lmdb")
    with pytest.raises(InputError, match=r"link.lmdb: is a symbolic link .*give the LMDB itself: .*a\.lmdb"):
        convert(None, tmp_path / "link.lmdb", list_file=tmp_path / "second.txt", root=listed, append=True)
    with lmdb.open(str(tmp_path / "single.lmdb"), subdir=False) as env, env.begin(write=True) as txn:
        txn.put(b"00000000_x.png", b"")
    with pytest.raises(InputError, match="single.lmdb: is a single-file LMDB"):
        convert(None, tmp_path / "single.lmdb", list_file=tmp_path / "second.txt", root=listed, append=True)
