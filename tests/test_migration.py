"""`migrate`: pickle/msgpack LMDBs written the way the recipes write them, read without running their code.

The old LMDBs are built here exactly as the recipes build them, with the real `pickle.dumps` and
`msgpack.packb`: Efficient-PyTorch's `tools/folder2lmdb.py` (values `pickle.dumps((image, label))`
from a batch-size-1 DataLoader over raw file bytes, `__keys__`/`__len__` meta records), its older
msgpack variant (`[{"data": bytes}, label]`, as msgpack < 1.0 packed it), and the `LMDB_Image` recipe
(a class defined in the user's script, so pickled as `__main__.LMDB_Image`).
"""

from __future__ import annotations

import builtins
import io
import os
import pickle
import struct
import subprocess
import sys

import lmdb
import msgpack
import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli
from lmdbread import raw_rgb, read_all, read_datums
from PIL import Image
from torch.utils.data import DataLoader

from caffe_lmdb import LmdbDataset_train, load_keys, parse_datum
from caffe_lmdb.cli import main
from caffe_lmdb.datum import DatumError, image_to_datum, serialize_datum
from caffe_lmdb.errors import LmdbFormatError, MigrationError
from caffe_lmdb.foreign_values import foreign_kind, foreign_value_hint
from caffe_lmdb.legacy_records import LegacyRecord
from caffe_lmdb.migration import label_fields, migrate, record_to_datum
from caffe_lmdb.safe_unpickle import LmdbImageRecord, safe_unpickle


def _what(value) -> str | None:
    kind = foreign_kind(value)
    return None if kind is None else kind[1]


COUNT = 12  # > 10, so LMDB's byte order of the recipes' keys ('0', '1', '10', '11', '2', ...) differs from theirs


# ---------------------------------------------------------------- the recipes' writers

class LMDB_Image:  # the recipe's own name, which migrate recognises
    """The recipe's class, as users define it in their own script (hence pickled as __main__.LMDB_Image)."""

    __module__ = "__main__"

    def __init__(self, image: np.ndarray, label) -> None:
        self.channels = image.shape[2]
        self.size = image.shape[:2]
        self.image = image.tobytes()
        self.label = label


@pytest.fixture
def main_module_class(monkeypatch):
    """Make `__main__.LMDB_Image` resolvable, as it is in the user's script, so pickle can write it."""
    monkeypatch.setattr(sys.modules["__main__"], "LMDB_Image", LMDB_Image, raising=False)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


@pytest.fixture
def image_files(rng) -> list[bytes]:
    """COUNT image files: JPEG, PNG, gray PNG and (animated-free) GIF, 7 wide x 5 high (JPEG 24 x 16)."""
    files = []
    for i in range(COUNT):
        pixels = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
        kind = i % 4
        if kind == 0:
            files.append(encoded(Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)), "JPEG"))
        elif kind == 1:
            files.append(encoded(Image.fromarray(pixels), "PNG"))
        elif kind == 2:
            files.append(encoded(Image.fromarray(pixels[:, :, 0]), "PNG"))
        else:
            files.append(encoded(Image.fromarray(pixels).quantize(16), "GIF"))
    return files


def recipe_env(path):
    return lmdb.open(str(path), subdir=True, map_size=1 << 26, readonly=False, meminit=False, map_async=True)


def put_meta(env, keys: list[bytes], dumps, with_len: bool = True) -> None:
    with env.begin(write=True) as txn:
        txn.put(b"__keys__", dumps(keys))
        if with_len:
            txn.put(b"__len__", dumps(len(keys)))


def folder2lmdb_pickle(path, files: list[bytes], labels: list[int], wrap: str = "dataloader", write_frequency=5):
    """Efficient-PyTorch `folder2lmdb` (pickle): DataLoader(batch 1) over (raw bytes, label), `label.numpy()`.

    `wrap="list"` stores the bytes in a one-element list, as older torch collation left them.
    """
    env = recipe_env(path)
    txn = env.begin(write=True)
    for idx, (data, label) in enumerate(DataLoader(list(zip(files, labels, strict=True)), num_workers=0)):
        image = list(data) if wrap == "list" else data
        txn.put(f"{idx}".encode("ascii"), pickle.dumps((image, label.numpy())))
        if idx % write_frequency == 0:
            txn.commit()
            txn = env.begin(write=True)
    txn.commit()
    put_meta(env, [f"{k}".encode("ascii") for k in range(idx + 1)], pickle.dumps)
    env.close()
    return path


def folder2lmdb_msgpack(path, files: list[bytes], labels: list[int], with_keys: bool = True):
    """The older msgpack variant, as msgpack < 1.0 packed it (bytes with the str type)."""
    env = recipe_env(path)
    with env.begin(write=True) as txn:
        for idx, (data, label) in enumerate(zip(files, labels, strict=True)):
            txn.put(f"{idx}".encode("ascii"), msgpack.packb([{"data": data}, label], use_bin_type=False))
    if with_keys:
        put_meta(env, [f"{k}".encode("ascii") for k in range(len(files))],
                 lambda obj: msgpack.packb(obj, use_bin_type=False), with_len=False)
    env.close()
    return path


def lmdb_image_recipe(path, pixels: list[np.ndarray], labels: list) -> object:
    """The LMDB_Image recipe: `pickle.dumps(LMDB_Image(image, label))`, meta keys as folder2lmdb."""
    env = recipe_env(path)
    with env.begin(write=True) as txn:
        for idx, (image, label) in enumerate(zip(pixels, labels, strict=True)):
            txn.put(f"{idx}".encode("ascii"), pickle.dumps(LMDB_Image(image, label)))
    put_meta(env, [f"{k}".encode("ascii") for k in range(len(pixels))], pickle.dumps)
    env.close()
    return path


def pyarrow_serialized(body: bytes) -> bytes:
    """A value laid out as `pyarrow.serialize(obj).to_buffer()` wrote it (arrow python/serialize.cc).

    pyarrow.serialize no longer exists, so the layout is spelled out: int32 counts (tensors,
    sparse tensors, ndarrays, buffers), then an Arrow IPC stream (continuation marker, metadata
    length, a schema flatbuffer whose one field is named "list"), then the body.
    """
    schema = b"\x10\x00\x00\x00\x0c\x00" + b"\x04\x00\x00\x00list\x00\x00\x00\x00" + b"\x05\x00\x00\x00dense\x00\x00\x00"
    return struct.pack("<4i", 0, 0, 0, 1) + struct.pack("<iI", -1, len(schema)) + schema + struct.pack("<q", len(body)) + body


def expected_keys(old_keys) -> list[bytes]:
    return [b"%08d_%s" % (i, key) for i, key in enumerate(old_keys)]


def lmdb_listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------- format 1: folder2lmdb (pickle)

@pytest.mark.parametrize("wrap", ["list", "dataloader"])
def test_folder2lmdb_pickle_migrates_bytes_unchanged_with_keys_in_old_order(tmp_path, image_files, wrap, capsys):
    labels = [i % 3 for i in range(COUNT)]
    old = folder2lmdb_pickle(tmp_path / "old.lmdb", image_files, labels, wrap=wrap)
    new = tmp_path / "new.lmdb"
    assert main(["migrate", str(old), str(new), "-q"]) == 0
    assert "12 records migrated" in capsys.readouterr().out

    old_keys = [f"{i}".encode() for i in range(COUNT)]  # __keys__ order, not LMDB order
    datums = read_datums(new)
    assert list(datums) == expected_keys(old_keys)  # no meta records
    assert load_keys(tmp_path / "new_keys.npy").tolist() == expected_keys(old_keys)
    for i, (datum, source) in enumerate(zip(datums.values(), image_files, strict=True)):
        assert datum.encoded and datum.HasField("label") and datum.label == labels[i]
        assert (datum.channels, datum.height, datum.width) == (0, 0, 0) and len(datum.float_data) == 0
        if source.startswith(b"GIF"):  # Caffe/DALI cannot decode GIF: re-encoded as PNG, same pixels
            assert datum.data.startswith(b"\x89PNG")
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(datum.data))),
                                  np.asarray(Image.open(io.BytesIO(source)).convert("RGB")))
        else:
            assert datum.data == source


def test_multilabel_and_regression_labels_go_to_float_data():
    assert label_fields(np.array([7])) == (7, ())
    assert label_fields(np.int64(7)) == (7, ())
    assert label_fields(3) == (3, ())
    multi_hot = np.zeros(80, np.float32)
    multi_hot[[0, 17]] = 1
    label, floats = label_fields(multi_hot)
    assert (label, len(floats), floats[17]) == (1, 80, 1.0)
    assert label_fields(np.array([0.25, 2.0])) == (0, (0.25, 2.0))
    assert label_fields(np.array([0.5])) == (0, (0.5,))
    with pytest.raises(ValueError, match="empty"):
        label_fields(np.array([]))
    with pytest.raises(ValueError, match="int32"):
        label_fields(2**40)
    with pytest.raises(ValueError, match="not numeric"):
        label_fields("cat")


# ---------------------------------------------------------------- format 2: msgpack

def test_folder2lmdb_msgpack_migrates(tmp_path, image_files):
    labels = [(i * 5) % 7 for i in range(COUNT)]
    old = folder2lmdb_msgpack(tmp_path / "old.lmdb", image_files, labels)
    result = migrate(old, tmp_path / "new.lmdb", keys_path=tmp_path / "k.npy")
    assert (result.format, result.written, result.keys_origin) == ("folder2lmdb-msgpack", COUNT, "__keys__")
    datums = read_datums(tmp_path / "new.lmdb")
    assert list(datums) == expected_keys([f"{i}".encode() for i in range(COUNT)])
    assert load_keys(tmp_path / "k.npy").tolist() == list(datums)
    for datum, source, label in zip(datums.values(), image_files, labels, strict=True):
        assert datum.label == label and datum.encoded
        if not source.startswith(b"GIF"):
            assert datum.data == source


def test_without_keys_meta_the_cursor_order_is_kept(tmp_path, image_files):
    old = folder2lmdb_msgpack(tmp_path / "old.lmdb", image_files, list(range(COUNT)), with_keys=False)
    result = migrate(old, tmp_path / "new.lmdb")
    cursor_order = sorted(f"{i}".encode() for i in range(COUNT))  # b'0', b'1', b'10', b'11', b'2', ...
    assert result.keys_origin == "cursor order"
    assert [key for key, _ in read_all(tmp_path / "new.lmdb")] == expected_keys(cursor_order)
    assert [d.label for d in read_datums(tmp_path / "new.lmdb").values()] == [int(k) for k in cursor_order]


# ---------------------------------------------------------------- format 3: LMDB_Image

@pytest.mark.parametrize("multilabel", [False, True], ids=["int-label", "80-way-multi-hot"])
def test_lmdb_image_becomes_raw_bgr_pixel_exact(tmp_path, rng, main_module_class, multilabel):
    pixels = [rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8) for _ in range(COUNT)]
    if multilabel:
        labels = [np.zeros(80, np.float32) for _ in range(COUNT)]
        for i, label in enumerate(labels):
            label[[i % 80, (i * 7 + 3) % 80]] = 1.0
    else:
        labels = [i % 5 for i in range(COUNT)]
    old = lmdb_image_recipe(tmp_path / "old.lmdb", pixels, labels)
    assert b"__main__\x94\x8c\nLMDB_Image" in read_all(old)[0][1]  # pickled as the user's script class

    result = migrate(old, tmp_path / "new.lmdb")
    assert (result.format, result.written) == ("lmdb-image", COUNT)
    datums = read_datums(tmp_path / "new.lmdb")
    assert list(datums) == expected_keys([f"{i}".encode() for i in range(COUNT)])
    for datum, source, label in zip(datums.values(), pixels, labels, strict=True):
        assert not datum.encoded and datum.HasField("encoded")
        assert (datum.channels, datum.height, datum.width) == (3, 5, 7)
        assert np.array_equal(raw_rgb(datum), source)  # planar BGR holding exactly the RGB source
        if multilabel:
            assert np.array_equal(np.asarray(datum.float_data, np.float32), label)
            assert datum.label == int(label[0])
        else:
            assert datum.label == label and len(datum.float_data) == 0


def test_lmdb_image_gray_and_rgba_pixels():
    gray = np.arange(35, dtype=np.uint8).reshape(5, 7, 1)
    value, _ = record_to_datum(LegacyRecord(label=1, pixels=gray))
    datum = parse_datum(bytes(value))
    assert (datum.channels, datum.height, datum.width, datum.data) == (1, 5, 7, gray.tobytes())
    rgba = np.random.default_rng(2).integers(0, 256, size=(5, 7, 4), dtype=np.uint8)
    datum = parse_datum(bytes(record_to_datum(LegacyRecord(label=1, pixels=rgba))[0]))
    assert datum.channels == 3 and np.array_equal(raw_rgb(datum), rgba[:, :, :3])  # alpha dropped, as convert does


def test_bytes_that_are_no_image_fail_naming_the_key(tmp_path, image_files):
    files = [*image_files[:3], b"this is not an image"]
    old = folder2lmdb_pickle(tmp_path / "old.lmdb", files, [0, 1, 2, 3])
    with pytest.raises(MigrationError, match=r"old.lmdb: key b'3': cannot decode image"):
        migrate(old, tmp_path / "new.lmdb")
    assert not (tmp_path / "new.lmdb").exists()


# ---------------------------------------------------------------- safety

class Payload:
    """A record whose unpickling calls `func(*args)`: what a hostile LMDB contains."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def touch_payloads(marker):
    """(payload, the global its pickle names) for several ways to create `marker` on unpickling."""
    code = f"open({str(marker)!r}, 'w').close()"
    return [
        (Payload(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),  # posix.system
        (Payload(builtins.exec, code), "builtins.exec"),
        (Payload(builtins.eval, code), "builtins.eval"),
        (Payload(subprocess.Popen, ["touch", str(marker)]), "subprocess.Popen"),
    ]


@pytest.mark.parametrize("which", range(4))
def test_malicious_record_is_refused_and_nothing_happens(tmp_path, image_files, which, capsys):
    marker = tmp_path / "pwned"
    payload, global_name = touch_payloads(marker)[which]
    old = folder2lmdb_pickle(tmp_path / "old.lmdb", image_files, list(range(COUNT)))
    env = lmdb.open(str(old))
    with env.begin(write=True) as txn:  # record 7: the first six are migrated before it is met
        txn.put(b"7", pickle.dumps(([image_files[7]], payload)))
    env.close()
    before = lmdb_listing(tmp_path)
    assert main(["migrate", str(old), str(tmp_path / "out" / "new.lmdb"), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "key b'7'" in err and f"refused to unpickle global {global_name}" in err
    assert not marker.exists()
    assert lmdb_listing(tmp_path) == before  # no output, keys file, temporary or parent folder


def test_malicious_lmdb_image_state_and_keys_are_refused(tmp_path, rng, main_module_class, capsys):
    marker = tmp_path / "pwned"
    pixels = [rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8) for _ in range(3)]
    old = lmdb_image_recipe(tmp_path / "old.lmdb", pixels, [0, 1, 2])
    hostile = LMDB_Image(pixels[0], 0)
    hostile.label = Payload(os.system, f"touch {marker}")
    env = lmdb.open(str(old))
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps(hostile))
    env.close()
    assert main(["migrate", str(old), str(tmp_path / "new.lmdb"), "--dry-run"]) == 1
    assert "key b'0': refused to unpickle global posix.system" in capsys.readouterr().err

    env = lmdb.open(str(old))
    with env.begin(write=True) as txn:
        txn.put(b"__keys__", pickle.dumps([b"0", Payload(builtins.exec, f"open({str(marker)!r}, 'w')")]))
    env.close()
    assert main(["migrate", str(old), str(tmp_path / "new.lmdb")]) == 1
    assert "key b'__keys__': refused to unpickle global builtins.exec" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "new.lmdb").exists()


def test_allocation_and_codec_tricks_are_refused():
    with pytest.raises(pickle.UnpicklingError, match="bytes"):
        safe_unpickle(pickle.dumps(Payload(bytes, 10**12)))
    with pytest.raises(pickle.UnpicklingError, match="codec"):
        safe_unpickle(pickle.dumps(Payload(__import__("_codecs").encode, "x", "zlib")))
    with pytest.raises(pickle.UnpicklingError, match="builtins.getattr"):
        safe_unpickle(pickle.dumps(Payload(getattr, "text", "upper")))


@pytest.mark.parametrize("protocol", range(6))
def test_safe_unpickler_rebuilds_what_the_recipes_store(protocol, main_module_class):
    values = (b"", [b"\xff\xd8\xff"], np.array([3]), np.zeros(80, np.float32) + 0.5, np.int64(4), np.float32(1.5),
              {"a": (1, 2.5, None, True)}, {1, 2}, 1j, bytearray(b"xy"))
    for value in values:
        back = safe_unpickle(pickle.dumps(value, protocol=protocol))
        if isinstance(value, np.ndarray | np.generic):
            assert back.dtype == value.dtype and np.array_equal(back, value)
        else:
            assert back == value
    record = safe_unpickle(pickle.dumps(LMDB_Image(np.zeros((2, 3, 3), np.uint8), np.array([1])), protocol=protocol))
    assert isinstance(record, LmdbImageRecord)
    assert record.fields["size"] == (2, 3) and record.fields["channels"] == 3 and record.fields["label"] == [1]


# ---------------------------------------------------------------- pyarrow, detection, readers' pointer

def test_pyarrow_value_gets_one_clear_line(tmp_path, image_files, capsys):
    old = tmp_path / "old.lmdb"
    env = recipe_env(old)
    with env.begin(write=True) as txn:
        txn.put(b"0", pyarrow_serialized(image_files[0]))
    env.close()
    assert _what(pyarrow_serialized(b"x" * 40)) == "pyarrow-serialized data (pyarrow.serialize)"
    assert main(["migrate", str(old), str(tmp_path / "new.lmdb"), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pyarrow.serialize no longer exists" in err and "key b'0'" in err
    assert not (tmp_path / "new.lmdb").exists()


def test_foreign_values_are_recognised_formats_without_unpickling(rgb_image):
    for protocol in range(6):
        what = _what(pickle.dumps(([b"\xff\xd8"], np.array([1])), protocol=protocol))
        assert what is not None and what.startswith("pickled Python objects (pickle protocol")
    assert _what(pickle.dumps([b"0", b"1"], protocol=4)) == "pickled Python objects (pickle protocol 4)"
    assert _what(msgpack.packb([{"data": b"\xff\xd8"}, 1])) == "msgpack-encoded records"
    datum = serialize_datum(image_to_datum(rgb_image, label=3))
    for not_foreign in (datum, b"", b"\xff\xff\xff\xff", b"\xff\xd8\xff\xe0 a jpeg", bytes(range(256))):
        assert _what(not_foreign) is None
    assert "`caffe-lmdb migrate OLD.lmdb NEW.lmdb`" in foreign_value_hint(pickle.dumps((b"x", 1)))
    assert "`caffe-lmdb migrate data/train.lmdb NEW.lmdb`" in foreign_value_hint(pickle.dumps(1), "data/train.lmdb")
    assert foreign_value_hint(datum) is None


@pytest.mark.parametrize("recipe", ["pickle", "msgpack", "lmdb-image"])
def test_dataset_on_an_unmigrated_lmdb_points_to_migrate(tmp_path, image_files, rng, main_module_class, recipe):
    old = tmp_path / "old.lmdb"
    if recipe == "pickle":
        folder2lmdb_pickle(old, image_files[:3], [0, 1, 2])
    elif recipe == "msgpack":
        folder2lmdb_msgpack(old, image_files[:3], [0, 1, 2])
    else:
        lmdb_image_recipe(old, [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)] * 3, [0, 1, 2])
    with pytest.raises(DatumError, match="caffe-lmdb migrate"):
        parse_datum(read_all(old)[0][1])
    with pytest.raises(LmdbFormatError) as info:  # refused at construction, before any record is read
        LmdbDataset_train(old)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "not Caffe Datums" in message
    assert "caffe-lmdb migrate" in message and str(old) in message


@pytest.mark.parametrize("command", ["info", "verify"])
def test_info_and_verify_read_a_folder2lmdb_lmdb_directly(tmp_path, image_files, capsys, command):
    old = folder2lmdb_pickle(tmp_path / "old.lmdb", image_files[:3], [0, 1, 2])
    assert main([command, str(old)]) == 0
    out = capsys.readouterr().out
    assert ("folder2lmdb" if command == "info" else "3 records checked, 3 encoded images decoded: OK") in out


@pytest.mark.parametrize("command", ["info", "verify"])
def test_info_and_verify_on_pickles_no_layout_reads_say_one_line(tmp_path, capsys, command):
    env = lmdb.open(str(tmp_path / "odd.lmdb"), map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"record-a", pickle.dumps({"pixels": [1, 2, 3]}))  # a pickled dict: no layout's record
    env.close()
    assert main([command, str(tmp_path / "odd.lmdb")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not Caffe Datums" in err and "caffe-lmdb migrate" in err


# ---------------------------------------------------------------- hostile nesting and size claims (hand-made pickles)

DEPTH = 200_000


def deep_list(depth: int = DEPTH) -> bytes:
    """Opcodes (no PROTO/STOP) of a list nested `depth` deep: EMPTY_LIST `depth` times, then APPEND."""
    return b"]" * depth + b"a" * (depth - 1)


def deep_tuple(depth: int = DEPTH) -> bytes:
    """Opcodes of a tuple nested `depth` deep: EMPTY_TUPLE, then TUPLE1 around it, two bytes a level at most."""
    return b")" + b"\x85" * (depth - 1)


def image_record_pickle(image: bytes, label_opcodes: bytes) -> bytes:
    """`pickle.dumps((image, <label>))` at protocol 2, the label given as raw opcodes."""
    return b"\x80\x02" + b"B" + struct.pack("<I", len(image)) + image + label_opcodes + b"\x86."


def put_record(old, key: bytes, value: bytes) -> None:
    env = lmdb.open(str(old))
    with env.begin(write=True) as txn:
        txn.put(key, value)
    env.close()


@pytest.mark.parametrize("which", ["deep label", "deep tuple as dict key", "deep LMDB_Image state key",
                                   "bytes8 claim", "bytearray8 claim"])
def test_hostile_pickles_get_one_line_and_nothing_is_written(tmp_path, image_files, which):
    hostile = {
        "deep label": image_record_pickle(image_files[0], deep_list()),
        # hashing a 200,000-deep tuple overflows the C stack: a segmentation fault, if it were ever unpickled
        "deep tuple as dict key": b"\x80\x02}" + deep_tuple() + b"K\x01s.",
        "deep LMDB_Image state key": b"\x80\x02c__main__\nLMDB_Image\n)\x81}" + deep_tuple() + b"K\x01sb.",
        "bytes8 claim": b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"abc.",
        "bytearray8 claim": b"\x80\x05\x96" + struct.pack("<Q", 2**62) + b"abc.",  # CPython 3.11 prints a stray line
    }[which]
    old = folder2lmdb_pickle(tmp_path / "old.lmdb", image_files, list(range(COUNT)))
    put_record(old, b"0", hostile)
    before = lmdb_listing(tmp_path)
    result = run_cli("migrate", old, tmp_path / "out" / "new.lmdb")
    err = assert_one_line_error(result, 1, old, "key b'0'")
    assert len(err.strip().splitlines()) == 1, err
    assert lmdb_listing(tmp_path) == before  # no output, keys file, temporary or parent folder


def test_deep_record_after_migrated_ones_leaves_nothing(tmp_path, image_files):
    old = folder2lmdb_pickle(tmp_path / "old.lmdb", image_files, list(range(COUNT)))
    put_record(old, b"7", image_record_pickle(image_files[7], deep_list()))  # the first 7 are written before it
    before = lmdb_listing(tmp_path)
    with pytest.raises(MigrationError, match=r"old.lmdb: key b'7': label <a list nested too deeply to show>"):
        migrate(old, tmp_path / "new.lmdb")
    put_record(old, b"7", image_record_pickle(image_files[7], b"}" + deep_tuple() + b"K\x01s"))
    with pytest.raises(MigrationError, match=r"key b'7': the pickle builds more than 10000 tuples"):
        migrate(old, tmp_path / "new.lmdb")
    assert lmdb_listing(tmp_path) == before


@pytest.mark.parametrize("protocol", [0, 1, 2, 4, 5])
def test_pickle_screen_counts_tuples_at_every_protocol(protocol):
    from caffe_lmdb.safe_unpickle import MAX_PICKLE_TUPLES, PickleTooComplexError

    pairs = [(i, i + 1) for i in range(MAX_PICKLE_TUPLES // 2)]  # a label of 5000 pairs is still read
    assert safe_unpickle(pickle.dumps(pairs, protocol=protocol)) == pairs
    many = [(i,) for i in range(MAX_PICKLE_TUPLES + 1)]  # refused by count: the bound on how deep they could nest
    with pytest.raises(PickleTooComplexError):
        safe_unpickle(pickle.dumps(many, protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match="more than the pickle holds|truncated|expected"):
        safe_unpickle(pickle.dumps(b"x" * 300, protocol=4)[:-20] + b".")  # BINBYTES claims 300
    with pytest.raises(pickle.UnpicklingError, match="more than the pickle holds|truncated|expected"):
        safe_unpickle(pickle.dumps([b"x" * 30], protocol=5)[:-20] + b".")  # SHORT_BINBYTES claims 30


# ---------------------------------------------------------------- dry run, overwrite, refusals

def test_dry_run_reports_and_writes_nothing(tmp_path, image_files, capsys):
    old = folder2lmdb_pickle(tmp_path / "old.lmdb", image_files, [i % 3 for i in range(COUNT)], wrap="list")
    before = lmdb_listing(tmp_path)
    assert main(["migrate", str(old), str(tmp_path / "new.lmdb"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "folder2lmdb-pickle" in out and "records: 12 (order: __keys__" in out and "__keys__, __len__" in out
    assert "image: JPEG file" in out and "in a one-element list" in out
    assert "label: numpy int64 array of shape (1,) -> label 0" in out
    assert lmdb_listing(tmp_path) == before


def test_existing_output_needs_overwrite(tmp_path, image_files, capsys):
    old = folder2lmdb_msgpack(tmp_path / "old.lmdb", image_files, [1] * COUNT)
    new = tmp_path / "new.lmdb"
    assert main(["migrate", str(old), str(new), "-q"]) == 0
    assert main(["migrate", str(old), str(new), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["migrate", str(old), str(new), "-q", "--overwrite"]) == 0


def test_datum_lmdbs_and_missing_inputs_are_usage_errors(tmp_path, legacy_rgb_lmdb, capsys):
    path = legacy_rgb_lmdb[0]
    assert main(["migrate", str(path), str(tmp_path / "new.lmdb")]) == 2
    assert "already holds a Caffe Datum" in capsys.readouterr().err
    assert main(["migrate", str(tmp_path / "nope.lmdb"), str(tmp_path / "new.lmdb")]) == 2


def test_keys_listed_but_missing_and_unlisted_records(tmp_path, image_files, caplog):
    old = folder2lmdb_msgpack(tmp_path / "old.lmdb", image_files[:4], [0, 1, 2, 3])
    env = lmdb.open(str(old))
    with env.begin(write=True) as txn:
        txn.put(b"__keys__", msgpack.packb([b"2", b"0"]))
    env.close()
    result = migrate(old, tmp_path / "new.lmdb")
    assert [d.label for d in read_datums(tmp_path / "new.lmdb").values()] == [2, 0]
    assert result.unlisted == 2 and "not listed in __keys__" in caplog.text
    env = lmdb.open(str(old))
    with env.begin(write=True) as txn:
        txn.put(b"__keys__", msgpack.packb([b"0", b"9"]))
    env.close()
    with pytest.raises(MigrationError, match="key b'9' is listed in __keys__ but not in the LMDB"):
        migrate(old, tmp_path / "other.lmdb")


def test_migrate_applies_converts_pass_through_rule_to_truncated_files(tmp_path, image_files):
    """A JPEG cut short has the right magic number, but `convert` never stores it as is: neither does migrate."""
    jpeg = image_files[0]
    truncated = jpeg[: len(jpeg) // 2]
    old = folder2lmdb_pickle(tmp_path / "old.lmdb", [jpeg, truncated], [0, 1])
    with pytest.raises(MigrationError, match=r"old.lmdb: key b'1': cannot decode image"):
        migrate(old, tmp_path / "new.lmdb")
    assert not (tmp_path / "new.lmdb").exists()
    ok = folder2lmdb_pickle(tmp_path / "ok.lmdb", [jpeg], [0])
    migrate(ok, tmp_path / "ok_new.lmdb")
    assert parse_datum(read_all(tmp_path / "ok_new.lmdb")[0][1]).data == jpeg  # intact: kept as is


def test_hostile_image_bytes_fail_in_one_line_naming_the_key(tmp_path, hostile_files):
    """A 45-byte PNG without IDAT once ended migrate in an IndexError traceback; the damaged-EXIF JPEG migrates."""
    files = [hostile_files["upright.png"], hostile_files["damaged-exif.jpg"]]
    good = folder2lmdb_pickle(tmp_path / "good.lmdb", files, [0, 1])
    assert main(["migrate", str(good), str(tmp_path / "good-new.lmdb"), "-q"]) == 0
    assert read_datums(tmp_path / "good-new.lmdb")[b"00000001_1"].data == hostile_files["damaged-exif.jpg"]

    old = folder2lmdb_pickle(tmp_path / "old.lmdb", [*files, hostile_files["no-idat.png"]], [0, 1, 2])
    result = run_cli("migrate", old, tmp_path / "new.lmdb")
    error = assert_one_line_error(result, 1, old, "key b'2'", "no IDAT chunk")
    assert len(error.strip().splitlines()) == 1
    assert not (tmp_path / "new.lmdb").exists()
