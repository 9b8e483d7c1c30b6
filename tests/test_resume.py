"""convert --resume: a conversion killed for real (SIGKILL), resumed, equals an uninterrupted run."""

from __future__ import annotations

import hashlib
import logging
import signal
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
from conftest import REPO, kill_when_temporary_reaches, save_image
from PIL import Image

from caffe_lmdb import cli, convert
from caffe_lmdb.conversion import _write_entries
from caffe_lmdb.errors import InputError
from caffe_lmdb.sources import parse_list_file

LINES = 700


def records(path: Path) -> list[tuple[bytes, bytes]]:
    with lmdb.open(str(path), readonly=True, lock=False) as env, env.begin() as txn:
        return list(txn.cursor())


def outputs(folder: Path, stem: str) -> tuple:
    """Everything a conversion publishes: the records, the LMDB file's bytes, the side files' bytes."""
    sides = {name: (folder / f"{stem}_{name}").read_bytes() for name in ("keys.npy", "skipped.txt", "classes.txt")
             if (folder / f"{stem}_{name}").exists()}
    data = folder / f"{stem}.lmdb" / "data.mdb"
    return records(folder / f"{stem}.lmdb"), hashlib.sha256(data.read_bytes()).hexdigest(), sides


@pytest.fixture
def work(tmp_path) -> Path:
    """700 lines (one 120x160 PNG, 56 KiB raw records: 39 MiB) with two unreadable lines early on."""
    noise = np.random.default_rng(3).integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    save_image(tmp_path / "src" / "m.png", Image.fromarray(noise))
    (tmp_path / "src" / "bad.png").write_bytes(b"truncated")
    lines = [f"m.png {i % 4}\n" for i in range(LINES)]
    lines[3] = lines[40] = "bad.png 1\n"
    (tmp_path / "list.txt").write_text("".join(lines))
    (tmp_path / "other.txt").write_text("".join(lines[:-1]))
    return tmp_path


def _command(work: Path, out: str, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "convert.py"), "--list", str(work / "list.txt"), "--root",
            str(work / "src"), str(work / out), "--commit-every", "5", "-q", *extra]


def _kill_when(work: Path, cmd: list[str], leftover: str, size: int) -> None:
    """Run `cmd` and SIGKILL it once its temporary's data.mdb reaches `size` bytes."""
    proc = kill_when_temporary_reaches(cmd, work, leftover, size)
    assert proc.returncode == -signal.SIGKILL, "the conversion ended before it was killed"
    assert not (work / leftover).exists() and list(work.glob(f".{leftover}.tmp-*"))


@pytest.mark.parametrize("size, workers", [(1, "0"), (6 << 20, "2"), (30 << 20, "0")])
def test_resume_after_sigkill_equals_an_uninterrupted_run(work, size, workers):
    convert(None, work / "full.lmdb", list_file=work / "list.txt", root=work / "src", workers=0, commit_every=5)
    _kill_when(work, _command(work, "out.lmdb", "--workers", workers), "out.lmdb", size)
    done = subprocess.run(_command(work, "out.lmdb", "--workers", workers, "--resume"), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{LINES - 2} records written" in done.stdout
    assert outputs(work, "out") == outputs(work, "full")
    assert (work / "out_skipped.txt").read_text().count("bad.png") == 2
    assert not list(work.glob(".out*.tmp-*"))


def test_resume_of_one_shard(work):
    shard = ["--num-shards", "2", "--shard-index", "1", "--workers", "1"]
    convert(None, work / "full.lmdb", list_file=work / "list.txt", root=work / "src", workers=0, commit_every=5,
            num_shards=2, shard_index=1)
    _kill_when(work, _command(work, "out.lmdb", *shard), "out-00001-of-00002.lmdb", 6 << 20)
    # another shard never takes this one's leftover: its temporaries have its own name
    other = ["--num-shards", "2", "--shard-index", "0", "--workers", "1", "--resume"]
    assert cli.main(["convert", *_command(work, "out.lmdb", *other)[2:]]) == 0
    assert list(work.glob(".out-00001-of-00002.lmdb.tmp-*"))
    assert cli.main(["convert", *_command(work, "out.lmdb", *shard, "--resume")[2:]]) == 0
    assert outputs(work, "out-00001-of-00002") == outputs(work, "full-00001-of-00002")


def test_changed_arguments_are_refused_in_one_line(work, capsys):
    _kill_when(work, _command(work, "out.lmdb", "--workers", "0"), "out.lmdb", 6 << 20)
    leftover = list(work.glob(".out.lmdb.tmp-*"))
    base = ["convert", *_command(work, "out.lmdb", "--workers", "0", "--resume")[2:]]
    for change, what in [(["--gray"], "the flags differ"), (["--commit-every", "7"], "the commit settings differ")]:
        assert cli.main([*base, *change]) == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"{what} from the interrupted run's (run with the same arguments, or without "
                            "--resume to start over)") and "\n" not in err
    with pytest.raises(InputError, match="the input list differs"):
        convert(None, work / "out.lmdb", list_file=work / "other.txt", root=work / "src", workers=0,
                commit_every=5, resume=True)
    entries = parse_list_file(work / "list.txt", work / "src")
    with pytest.raises(InputError, match="the shard differs"):  # same output name, another slice's line ids
        _write_entries(entries, work / "out.lmdb", workers=0, commit_every=5, line_offset=700, resume=True)
    assert list(work.glob(".out.lmdb.tmp-*")) == leftover  # refused: the leftover is kept for a correct resume
    # without --resume a run starts over, and clears the leftover
    assert cli.main(["convert", *_command(work, "out.lmdb", "--workers", "0")[2:]]) == 0
    assert not list(work.glob(".out.lmdb.tmp-*"))
    convert(None, work / "full.lmdb", list_file=work / "list.txt", root=work / "src", workers=0, commit_every=5)
    assert outputs(work, "out") == outputs(work, "full")


def test_resume_with_nothing_to_resume_is_a_plain_run(work):
    convert(None, work / "a.lmdb", list_file=work / "list.txt", root=work / "src", workers=0, resume=True)
    convert(None, work / "b.lmdb", list_file=work / "list.txt", root=work / "src", workers=0)
    assert outputs(work, "a") == outputs(work, "b")
    before = outputs(work, "a")
    again = convert(None, work / "a.lmdb", list_file=work / "list.txt", root=work / "src", workers=0, resume=True)
    assert again.already_complete and "already complete" in str(again)  # a restarted job: nothing to do
    assert outputs(work, "a") == before
    with pytest.raises(InputError, match="already exists"):  # other input: a finished output is not resumed over
        convert(None, work / "a.lmdb", list_file=work / "other.txt", root=work / "src", workers=0, resume=True)


def _cut_last_entry(data: bytes) -> bytes:
    return data[:-3]  # a kill in the middle of the journal's last write


def _drop_last_keys(data: bytes) -> bytes:
    keys = _read_journal_bytes(data)
    return _journal_of(keys[:-7])  # a kill between a commit and its journal entry (and more)


def _scramble(data: bytes) -> bytes:
    keys = _read_journal_bytes(data)
    return _journal_of([keys[0], keys[-1]])  # not the LMDB's keys: counts disagree


def _read_journal_bytes(data: bytes) -> list[bytes]:
    keys, at = [], 0
    while at < len(data):
        length = int.from_bytes(data[at:at + 4], "little")
        keys.append(data[at + 4:at + 4 + length])
        at += 4 + length
    return keys


def _journal_of(keys: list[bytes]) -> bytes:
    return b"".join(len(key).to_bytes(4, "little") + key for key in keys)


@pytest.mark.parametrize("damage", [None, "remove", _cut_last_entry, _drop_last_keys, _scramble])
def test_resume_reads_the_key_journal_and_survives_a_damaged_one(work, damage, caplog):
    """The journal lists the committed keys; one that a kill cut short, lost or garbled falls back to the LMDB."""
    caplog.set_level(logging.INFO, logger="caffe_lmdb.append_resume")
    convert(None, work / "full.lmdb", list_file=work / "list.txt", root=work / "src", workers=0, commit_every=5)
    _kill_when(work, _command(work, "out.lmdb", "--workers", "0"), "out.lmdb", 12 << 20)
    [leftover] = work.glob(".out.lmdb.tmp-*")
    journal = leftover / "committed-keys"
    with lmdb.open(str(leftover), readonly=True, lock=False) as env, env.begin() as txn:
        in_lmdb = list(txn.cursor().iternext(values=False))
    written = _read_journal_bytes(journal.read_bytes())
    assert written == in_lmdb[:len(written)] and len(in_lmdb) - len(written) <= 5  # at most the last commit
    if damage == "remove":
        journal.unlink()
    elif damage is not None:
        journal.write_bytes(damage(journal.read_bytes()))
    assert cli.main(["convert", *_command(work, "out.lmdb", "--workers", "0", "--resume")[2:]]) == 0
    assert outputs(work, "out") == outputs(work, "full")
    assert sorted(p.name for p in (work / "out.lmdb").iterdir()) == ["data.mdb", "lock.mdb"]
    fell_back = "key journal does not match" in caplog.text
    assert fell_back == (damage is _scramble)  # a missing journal is read from the LMDB without a word


# ---------------------------------------------------------------- leftovers that are not what they seem

@pytest.mark.parametrize("plant", ["journal", "data.mdb", "folder"])
def test_resume_never_follows_links_planted_in_the_leftover(work, plant, capsys):
    import os

    _kill_when(work, _command(work, "out.lmdb", "--workers", "0"), "out.lmdb", 6 << 20)
    (leftover,) = work.glob(".out.lmdb.tmp-*")
    outside = work / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"not yours")
    if plant == "folder":
        leftover.rename(outside / "moved")
        leftover.symlink_to(outside / "moved")
    else:
        name = {"journal": "committed-keys", "data.mdb": "data.mdb"}[plant]
        (leftover / name).rename(outside / "victim2")
        (leftover / name).symlink_to(outside / "victim")
    before = sorted((p.name, p.read_bytes() if p.is_file() else None) for p in outside.rglob("*"))
    assert cli.main(["convert", *_command(work, "out.lmdb", "--workers", "0", "--resume")[2:]]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot resume" in err and "symbolic link" in err and "\n" not in err, err
    assert sorted((p.name, p.read_bytes() if p.is_file() else None) for p in outside.rglob("*")) == before
    assert not os.path.lexists(work / "out.lmdb") and os.path.lexists(leftover)


def test_resume_after_the_images_changed_is_refused(work, capsys):
    _kill_when(work, _command(work, "out.lmdb", "--workers", "0"), "out.lmdb", 6 << 20)
    noise = np.random.default_rng(4).integers(0, 256, size=(120, 160, 3), dtype=np.uint8)
    save_image(work / "src" / "m.png", Image.fromarray(noise))  # same name, other pixels
    assert cli.main(["convert", *_command(work, "out.lmdb", "--workers", "0", "--resume")[2:]]) == 2
    assert "input files changed" in capsys.readouterr().err
    assert list(work.glob(".out.lmdb.tmp-*"))


def test_a_resume_that_fails_keeps_the_leftover_for_the_next(work, small_fs, capsys):
    out = small_fs / "out.lmdb"  # 39 MiB of records on a 4 MiB disk
    command = [str(a) for a in _command(work, "out.lmdb", "--workers", "0")]
    command[6] = str(out)
    proc = kill_when_temporary_reaches(command, small_fs, "out.lmdb", 1 << 20)  # after some commits
    assert proc.returncode == -signal.SIGKILL
    assert cli.main(["convert", *command[2:], "--resume"]) == 1
    assert "no space left" in capsys.readouterr().err
    kept = list(small_fs.glob(".out.lmdb.tmp-*"))
    assert len(kept) == 1 and (kept[0] / "resume.json").is_file()  # still resumable on a bigger disk


@pytest.mark.parametrize("mode, resumes", [(0o775, True), (0o777, False)])  # umask 002 is common; 000 is not ours
def test_a_leftover_other_users_can_write_is_not_taken_over(work, mode, resumes, capsys):
    _kill_when(work, _command(work, "out.lmdb", "--workers", "0"), "out.lmdb", 6 << 20)
    (leftover,) = work.glob(".out.lmdb.tmp-*")
    leftover.chmod(mode)
    code = cli.main(["convert", *_command(work, "out.lmdb", "--workers", "0", "--resume")[2:]])
    err = capsys.readouterr().err
    assert (code, "other users cannot write" in err) == ((0, False) if resumes else (2, True)), err
