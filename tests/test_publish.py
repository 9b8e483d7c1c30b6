"""Publishing under a kill at every file-system step: what is left is the old set or the new one, or a pending
publish that `verify` reports and the next run finishes.

Each run is killed just before its Nth rename, removal or `renameat2` (`killstep.py`), for every N until it
finishes, in each mode (fresh, --overwrite, --append --extend-classes, --resume), with and without
`RENAME_EXCHANGE`. The output is named `o[ab].lmdb`, beside another output's temporaries, which no
cleanup may take for its own.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, save_image, tree_snapshot
from lmdbread import read_all
from PIL import Image

from caffe_lmdb import cli, verify
from caffe_lmdb.files import is_temporary_of
from caffe_lmdb.publish import pending_publish, publish_log_path

OUT = "o[ab].lmdb"
SIDES = ("o[ab]_keys.npy", "o[ab]_classes.txt", "o[ab]_skipped.txt")
KILLSTEP = Path(__file__).with_name("killstep.py")


def _sources(root: Path) -> None:
    """src1: cat, dog (and an unreadable dog); src2: cat, dog, eel: appending src2 extends the classes."""
    rng = np.random.default_rng(5)
    for src, classes in (("src1", ("cat", "dog")), ("src2", ("cat", "dog", "eel"))):
        for label, name in enumerate(classes):
            for i in range(2):
                pixels = rng.integers(0, 256, size=(6 + label, 5, 3), dtype=np.uint8)
                save_image(root / src / name / f"{src}{i}.png", Image.fromarray(pixels))
    (root / "src1" / "dog" / "broken.png").write_bytes(b"not an image")
    # someone else's work in the same folder: another output's temporaries and a file
    (root / ".oa.lmdb.tmp-999999").mkdir()
    (root / ".oa.lmdb.tmp-999999" / "data.mdb").write_bytes(b"another run's records")
    (root / ".oa_keys.npy.tmp-999999").write_bytes(b"another run's keys")
    (root / "notes.txt").write_text("mine\n")


def _state(root: Path) -> tuple:
    """The output as a reader sees it: records, and each side file's bytes (None where absent)."""
    out = root / OUT
    records = read_all(out) if out.exists() else None
    return records, *((root / side).read_bytes() if (root / side).exists() else None for side in SIDES)


def _bystanders(root: Path) -> dict:
    return {name: tree_snapshot(root / name) for name in (".oa.lmdb.tmp-999999", ".oa_keys.npy.tmp-999999",
                                                          "notes.txt", "src1", "src2")}


def _convert(*args: str) -> list[str]:
    return ["convert", *args, "--workers", "0", "-q"]


MODES = {
    # mode: (command to set up the state before, the command killed)
    "fresh": (None, _convert("src1", OUT)),
    "overwrite": (_convert("src2", OUT), _convert("src1", OUT, "--overwrite")),
    "append": (_convert("src1", OUT), _convert("src2", OUT, "--append", "--extend-classes")),
    "resume": ("leftover", _convert("src1", OUT, "--resume")),
}


def _run_killed(root: Path, step: int, command: list[str], exchange: bool) -> subprocess.CompletedProcess:
    extra = [] if exchange else ["--no-exchange"]
    return subprocess.run([sys.executable, str(KILLSTEP), str(step), *extra, *command], cwd=root,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "PATH": "/usr/bin:/bin"})


def _before(base: Path, mode: str, exchange: bool) -> Path:
    """A folder in the state the mode starts from."""
    root = base / f"before-{mode}"
    _sources(root)
    setup = MODES[mode][0]
    if setup == "leftover":  # a fresh run killed once its temporaries were complete, just before publishing
        pristine, leftover = base / "pristine", None
        root.rename(pristine)
        for step in range(1, 100):
            trial = base / f"probe{step}"
            shutil.copytree(pristine, trial, symlinks=True)
            killed = _run_killed(trial, step, MODES["fresh"][1], exchange)
            if killed.returncode != -signal.SIGKILL or publish_log_path(trial / OUT).exists():
                break
            leftover = trial
        leftover.rename(root)
        assert any(is_temporary_of(p, root / OUT) for p in root.iterdir())
    elif setup is not None:
        assert _in(root, setup) == 0
    return root


def _in(root: Path, args: list[str]) -> int:
    import os
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return cli.main(args)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "rename-aside"])
@pytest.mark.parametrize("mode", list(MODES))
def test_a_kill_at_every_step_leaves_the_old_or_the_new_set_or_a_publish_the_next_run_finishes(
        tmp_path, mode, exchange, capsys):
    before = _before(tmp_path, mode, exchange)
    old = _state(before)
    reference = tmp_path / "reference"
    shutil.copytree(before, reference, symlinks=True)
    assert _run_killed(reference, 10**6, MODES[mode][1], exchange).returncode == 0
    new = _state(reference)
    assert new != old and new[0] is not None
    bystanders = _bystanders(before)
    pending_seen = finished = 0
    for step in range(1, 200):
        trial = tmp_path / f"step{step}"
        shutil.copytree(before, trial, symlinks=True)
        killed = _run_killed(trial, step, MODES[mode][1], exchange)
        if killed.returncode == 0:
            finished = step
            assert _state(trial) == new
            break
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        if pending_publish(trial / OUT) is not None:
            pending_seen += 1
            report = verify(trial / OUT)
            assert not report.ok and "killed while publishing" in str(report.problems), (step, report.problems)
        else:
            assert _state(trial) in (old, new), f"step {step}: neither the old set nor the new one"
        # the next run (the same command with --resume, as a restarted job runs it) ends at the new set
        again = MODES[mode][1] if "--resume" in MODES[mode][1] else [*MODES[mode][1], "--resume"]
        assert _in(trial, again) == 0, (step, capsys.readouterr().err)
        assert _state(trial) == new, f"step {step}: the next run did not end at the new set"
        assert verify(trial / OUT).ok
        names = {p.name for p in trial.iterdir()} - set(bystanders)
        assert names <= {OUT, *SIDES}, (step, names)  # no temporary, log or lock left
        assert _bystanders(trial) == bystanders, f"step {step}: another output's files changed"
        shutil.rmtree(trial)
    assert finished > 3, "the run never finished"
    assert pending_seen >= 3  # the publish has several steps after its log
