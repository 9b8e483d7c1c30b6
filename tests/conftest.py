"""Shared fixtures: small generated images (non-square, so swapped H/W fails) and the shared photos."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_IMAGES = REPO.parent / "shared" / "images"
SAMPLE_TRAIN = REPO / "img" / "train"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def rgb_image(rng) -> Image.Image:
    """A 7 wide x 5 high RGB image with distinct values in every channel."""
    return Image.fromarray(rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8), mode="RGB")


@pytest.fixture
def gray_image(rng) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(5, 7), dtype=np.uint8), mode="L")


@pytest.fixture
def shared_images() -> Path:
    """The real photos in ../shared/images; tests using them skip cleanly where it is absent."""
    if not SHARED_IMAGES.is_dir():
        pytest.skip("../shared/images not present")
    return SHARED_IMAGES


def png_bytes(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_image(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


@pytest.fixture
def image_tree(tmp_path, rng) -> Path:
    """A class-folder tree: cat/ (two non-square PNGs, one in a subfolder), dog/ (a JPEG, a gray PNG), notes."""
    root = tmp_path / "src"

    def noise(h, w, c=3):
        shape = (h, w, c) if c > 1 else (h, w)
        return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8))

    save_image(root / "cat" / "a.png", noise(5, 7))
    save_image(root / "cat" / "deep" / "b c.png", noise(6, 4))
    save_image(root / "dog" / "x.JPG", noise(16, 24), quality=90)
    save_image(root / "dog" / "g.png", noise(5, 7, 1))
    (root / "dog" / "readme.txt").write_text("not an image")
    return root


# ---------------------------------------------------------------- LMDBs written as Caffe writes them

def caffe_raw_datum(pixels: np.ndarray, label: int, explicit_encoded: bool = True):
    """A raw Datum built as Caffe's `CVMatToDatum` does, without caffe_lmdb's codec.

    `pixels` is H x W x 3 RGB (stored as planar BGR, OpenCV's order) or H x W gray (one plane).
    MNIST's converter never sets `encoded`; pass `explicit_encoded=False` for such records.
    """
    from caffe_lmdb import caffe_pb2

    planes = pixels[np.newaxis] if pixels.ndim == 2 else pixels[:, :, ::-1].transpose(2, 0, 1)
    channels, height, width = planes.shape
    datum = caffe_pb2.Datum(channels=channels, height=height, width=width, data=planes.tobytes(), label=label)
    if explicit_encoded:
        datum.encoded = False
    return datum


def write_lmdb(path: Path, records: dict[bytes, bytes], subdir: bool = True) -> Path:
    """Write `records` (key -> value) to a new LMDB (a directory, or with `subdir=False` a single file) with
    py-lmdb alone, in one commit; missing parent folders are made."""
    return edit_lmdb(path, put=records, subdir=subdir)


def edit_lmdb(path: Path, put: dict[bytes, bytes] = (), delete: tuple[bytes, ...] = (), subdir: bool = True) -> Path:
    """Put and delete records of an LMDB (made if missing) with py-lmdb alone, in one commit: a fixture, or damage."""
    import lmdb

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 26, subdir=subdir)
    with env.begin(write=True) as txn:
        for key, value in dict(put).items():
            txn.put(key, value)
        for key in delete:
            txn.delete(key)
    env.close()
    return path


def caffe_key(line_id: int, relpath: str) -> bytes:
    """`convert_imageset`'s key, spelled out here rather than taken from caffe_lmdb.keys."""
    return b"%08d_%s" % (line_id, relpath.encode())


@pytest.fixture
def legacy_rgb_lmdb(tmp_path, rng):
    """An LMDB as `convert_imageset` writes it: 7 wide x 5 high RGB raw records, no keys file.

    Line ids 2, 5 and 6 are missing (images Caffe failed to read), so the keys have gaps.
    Returns (path, keys in LMDB order, RGB H x W x 3 arrays, labels), all in key order.
    """
    line_ids = [0, 1, 3, 4, 7, 8]
    labels = [0, 1, 2, 0, 1, 2]
    images = [rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8) for _ in line_ids]
    keys = [caffe_key(i, f"class{label}/img{i}.jpg") for i, label in zip(line_ids, labels, strict=True)]
    records = {
        key: caffe_raw_datum(pixels, label).SerializeToString()
        for key, pixels, label in zip(keys, images, labels, strict=True)
    }
    return write_lmdb(tmp_path / "legacy_rgb_lmdb", records), keys, images, labels


# ---------------------------------------------------------------- the CLI as a user runs it (reliability tests)

#: Drops root's power to ignore file permissions, so a mode-000 folder is unreadable even to root.
_DROP_FILE_CAPS = "-dac_override,-dac_read_search,-fowner"


def file_caps_droppable() -> bool:
    """True where `setpriv` can run a command without root's file powers (or we are not root at all)."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0:
        return True
    if shutil.which("setpriv") is None:
        return False
    probe = subprocess.run(["setpriv", f"--inh-caps={_DROP_FILE_CAPS}", f"--bounding-set={_DROP_FILE_CAPS}",
                            "true"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture
def without_file_caps() -> None:
    """Skip cleanly unless permission tests can see a permission error (see `run_cli(drop_file_caps=True)`)."""
    if not file_caps_droppable():
        pytest.skip("cannot drop root's file capabilities here (no setpriv)")


def run_cli(*args, drop_file_caps: bool = False, timeout: float = 120, cwd=None, env: dict | None = None):
    """Run `caffe-lmdb ARGS...` in a fresh process, as a user would; returns the CompletedProcess (text).

    `env`: variables to set on top of this process's environment (e.g. a private TMPDIR).
    """
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "caffe_lmdb.cli", *map(str, args)]
    if drop_file_caps and os.geteuid() == 0:
        command = ["setpriv", f"--inh-caps={_DROP_FILE_CAPS}", f"--bounding-set={_DROP_FILE_CAPS}", *command]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def kill_when_temporary_reaches(cmd: list[str], folder: Path, output: str, size: int):
    """Run `cmd` and SIGKILL it once the data.mdb of `folder/.OUTPUT.tmp-*` (its unfinished output) holds
    `size` bytes, or after 60 s, or not at all if it ended first; returns the finished Popen."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        partial = [p / "data.mdb" for p in folder.glob(f".{output}.tmp-*")]
        try:
            if partial and partial[0].stat().st_size >= size:
                break
        except FileNotFoundError:  # the temporary was renamed or removed between glob and stat
            pass
        time.sleep(0.002)
    if proc.poll() is None:  # once poll() has reaped it, its pid may be gone (ProcessLookupError) or reused
        os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    return proc


def assert_one_line_error(result, exit_code: int, *names) -> str:
    """The run failed with `exit_code`, printed no traceback, and its error line names each of `names`."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.returncode == exit_code, output
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors, output
    for name in names:
        assert str(name) in result.stderr, (name, result.stderr)
    return result.stderr


def tree_snapshot(root: Path) -> dict[str, bytes | str]:
    """Every entry below `root` (itself included) -> its bytes, link target or 'dir': to assert nothing changed."""
    import os
    import stat

    root = Path(root)
    snapshot: dict[str, bytes | str] = {}
    for path in [root, *sorted(root.rglob("*"))] if root.exists() else []:
        name = path.relative_to(root).as_posix()
        if path.is_symlink():
            snapshot[name] = "link:" + os.readlink(path)
        elif path.is_dir():
            snapshot[name] = "dir"
        elif not path.is_file():  # a FIFO, device or socket: never read (a FIFO would block)
            info = os.lstat(path)
            snapshot[name] = f"special:{stat.S_IFMT(info.st_mode):o}:{info.st_ino}"
        else:
            snapshot[name] = path.read_bytes()
    return snapshot


@pytest.fixture
def small_fs(tmp_path):
    """A real 4 MiB tmpfs mounted for the test (root only; skipped cleanly elsewhere): a disk that fills up."""
    import subprocess

    mount_point = tmp_path / "small_fs"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder and `freeze()`, which makes it read-only for this process: chmod 555, or as root (whom
    permissions do not stop) a tmpfs remounted read-only; skipped where neither works."""
    import subprocess

    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = False
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
        mounted = True

    def freeze() -> None:
        if mounted:
            done = subprocess.run(["mount", "-o", "remount,ro", str(folder)], capture_output=True)
            assert done.returncode == 0, done.stderr
        else:
            folder.chmod(0o555)

    try:
        yield folder, freeze
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)


# ---------------------------------------------------------------- hostile image files (issue 22, defect 6)

def png_without_idat(width: int = 7, height: int = 5) -> bytes:
    """A 45-byte PNG: signature, IHDR and IEND, no IDAT chunk. Pillow opens it, but there are no pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


#: XResolution, a RATIONAL tag, and T4Options, a LONG one: the damage renames the first to the second.
_X_RESOLUTION, _T4_OPTIONS = 0x011A, 0x0124


def jpeg_with_damaged_exif(image: Image.Image, orientation: int = 6) -> bytes:
    """A JPEG of `image` whose EXIF block says `orientation` and holds one damaged tag.

    The damage: XResolution's tag number is rewritten to T4Options, so the entry holds a RATIONAL
    where its number says LONG. Pillow still reads the orientation, but writing the block back
    out (which `ImageOps.exif_transpose` does) fails with `struct.error`. OpenCV decodes the file
    turned as the orientation says.
    """
    import io
    import struct

    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[_X_RESOLUTION] = 72.0
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    data = buf.getvalue()
    tiff = data.index(b"Exif\x00\x00") + 6
    order = "<" if data[tiff:tiff + 2] == b"II" else ">"
    entry = data.index(struct.pack(order + "HH", _X_RESOLUTION, 5), tiff)  # tag, type RATIONAL
    return data[:entry] + struct.pack(order + "H", _T4_OPTIONS) + data[entry + 2:]


def unreadable_exif(jpeg: bytes) -> bytes:
    """`jpeg` with its EXIF block's first-IFD offset pointing past the block: no tag can be read (OpenCV: none)."""
    tiff = jpeg.index(b"Exif\x00\x00") + 6
    order = "little" if jpeg[tiff:tiff + 2] == b"II" else "big"
    return jpeg[:tiff + 4] + (0xFFFFFF00).to_bytes(4, order) + jpeg[tiff + 8:]


def gradient_image(width: int, height: int) -> Image.Image:
    """A smooth RGB image (JPEG keeps it close), so a wrong turn of it is easy to see in the pixels."""
    y, x = np.mgrid[0:height, 0:width]
    planes = [x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) * 127 // (width + height) + 60]
    return Image.fromarray(np.stack(planes, axis=-1).astype(np.uint8), mode="RGB")


@pytest.fixture
def hostile_files() -> dict[str, bytes]:
    """Image files that once crashed every decode path, plus a good one; names are their roles.

    * `upright.png`: a good 16 wide x 24 high PNG.
    * `damaged-exif.jpg`: 24 wide x 16 high, EXIF orientation 6 (decodes 16 x 24, as the PNG),
      with one damaged EXIF tag (`jpeg_with_damaged_exif`).
    * `no-idat.png`: a 45-byte PNG without image data (`png_without_idat`).
    """
    return {
        "upright.png": png_bytes(gradient_image(16, 24)),
        "damaged-exif.jpg": jpeg_with_damaged_exif(gradient_image(24, 16)),
        "no-idat.png": png_without_idat(),
    }


def encoded_lmdb_of(path: Path, files: dict[str, bytes]) -> tuple[Path, list[bytes]]:
    """An LMDB of encoded Datums holding `files` unchanged, written with py-lmdb as another tool would.

    Returns the path and the keys, in the order of `files`.
    """
    from caffe_lmdb import caffe_pb2

    keys = [caffe_key(i, name) for i, name in enumerate(files)]
    records = {key: caffe_pb2.Datum(data=data, label=i, encoded=True).SerializeToString()
               for i, (key, data) in enumerate(zip(keys, files.values(), strict=True))}
    return write_lmdb(path, records), keys


@pytest.fixture
def hostile_lmdbs(tmp_path, hostile_files) -> tuple[Path, Path]:
    """Two encoded LMDBs of `hostile_files`, written as another tool would (convert skips the PNG without IDAT).

    `decodable` holds upright.png and damaged-exif.jpg, which both decode 16 wide x 24 high;
    `broken` holds all three, the PNG without IDAT under key b'00000002_no-idat.png'.
    """
    decodable = {name: hostile_files[name] for name in ("upright.png", "damaged-exif.jpg")}
    return (encoded_lmdb_of(tmp_path / "decodable.lmdb", decodable)[0],
            encoded_lmdb_of(tmp_path / "broken.lmdb", hostile_files)[0])


#: The key of the PNG without IDAT in `hostile_lmdbs`' broken LMDB, as readers print it.
NO_IDAT_KEY = "key b'00000002_no-idat.png'"


class FifoReader:
    """A FIFO made at `path`, read by a thread while the `with` block runs; `data` holds what was written to it.

    The read end is open (non-blocking) before the block starts, so a writer finds a reader at
    once; the thread drains the pipe as it fills, so a writer of more than a pipe's buffer is
    never stuck.
    """

    def __init__(self, path: Path) -> None:
        import os

        os.mkfifo(path)
        self.path = path
        self.data = bytearray()

    def __enter__(self) -> FifoReader:
        import os
        import threading

        self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()
        return self

    def _drain(self) -> None:
        import os
        import select
        import time

        while True:
            select.select([self._fd], [], [], 0.05)
            try:
                chunk = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                chunk = None
            if chunk:
                self.data += chunk
            elif self._stop.is_set():
                return
            else:
                time.sleep(0.01)  # no writer (yet, or any more): a FIFO then reads as end of file at once

    def __exit__(self, *exc_info) -> None:
        import os

        self._stop.set()
        self._thread.join(30)
        os.close(self._fd)


def char_device(path: Path) -> Path:
    """A character device node like /dev/null (major 1, minor 3) at `path` (root only; the test is skipped elsewhere)."""
    import os
    import stat

    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("making a device node needs root")
    return path


def assert_dev_null_intact() -> None:
    """The system's /dev/null is still the character device (a test that replaced it would break the machine)."""
    import os
    import stat

    info = os.lstat("/dev/null")
    assert stat.S_ISCHR(info.st_mode) and os.major(info.st_rdev) == 1 and os.minor(info.st_rdev) == 3
