"""BasicSR / mmagic (meta_info.txt, PNG values) and EDVR (meta_info.pkl, raw BGR values) read back exactly.

Fixtures are written here from the layouts' facts: BasicSR keys an image by its file name cut at
the first dot, stores `cv2.imencode('.png', img)` bytes and lists `name.png (H,W,C) level` lines
in meta_info.txt; EDVR stores `cv2.imread` arrays' raw bytes (H x W x C BGR) and pickles
`{'name', 'resolution': 'C_H_W', 'keys'}` to meta_info.pkl.
"""

from __future__ import annotations

import os
import pickle

import cv2
import lmdb
import numpy as np
import pytest
from torch.utils.data import DataLoader

from caffe_lmdb import LmdbDataset, PairedLmdbDataset
from caffe_lmdb.errors import DatumError, KeysFileError, LmdbFormatError
from caffe_lmdb.layout_basicsr import MAX_META_BYTES, BasicSRLayout


def _opencv_rgb(data: bytes) -> np.ndarray:
    """What BasicSR's reader sees: `cv2.imdecode(..., IMREAD_COLOR)`, as RGB."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def make_basicsr(path, images: dict[str, np.ndarray], *, level: int = 1, order=None) -> dict[bytes, bytes]:
    """An LMDB as BasicSR's make_lmdb_from_imgs writes one: PNG bytes keyed by the name, meta_info.txt inside."""
    values: dict[bytes, bytes] = {}
    env = lmdb.open(str(path), map_size=1 << 26)
    lines = []
    with env.begin(write=True) as txn:
        for name in order or images:
            ok, png = cv2.imencode(".png", images[name], [cv2.IMWRITE_PNG_COMPRESSION, level])
            assert ok
            key = name.split(".")[0].encode("ascii")
            txn.put(key, png.tobytes())
            values[key] = png.tobytes()
            shape = images[name].shape
            h, w, c = shape[0], shape[1], shape[2] if len(shape) == 3 else 1
            lines.append(f"{name} ({h},{w},{c}) {level}\n")
    env.close()
    (path / "meta_info.txt").write_text("".join(lines))
    return values


def _noise(rng, *shape, dtype=np.uint8):
    high = 256 if dtype == np.uint8 else 65536
    return rng.integers(0, high, size=shape, dtype=dtype)


def test_basicsr_reads_meta_info_order_and_opencvs_pixels_keys_cut_at_the_first_dot(tmp_path, rng):
    images = {"0002_s001.png": _noise(rng, 6, 9, 3), "0001.x2.png": _noise(rng, 5, 7, 3),
              "0003_s002.png": _noise(rng, 8, 4, 3)}
    values = make_basicsr(tmp_path / "train.lmdb", images)
    assert set(values) == {b"0002_s001", b"0001", b"0003_s002"}
    dataset = LmdbDataset(tmp_path / "train.lmdb")
    assert dataset.layout.name == "basicsr" and len(dataset) == 3
    assert dataset.layout.keys.tolist() == [b"0002_s001", b"0001", b"0003_s002"]  # the file's order, not LMDB's
    for index, key in enumerate(dataset.layout.keys.tolist()):
        image, target = dataset[index]
        assert image.mode == "RGB" and target is None
        np.testing.assert_array_equal(np.asarray(image), _opencv_rgb(values[key]))
        name = next(name for name in images if name.startswith(key.decode() + "."))
        np.testing.assert_array_equal(np.asarray(image), images[name][:, :, ::-1])
    assert "meta_info.txt" in dataset.layout.describe()


def test_sixteen_bit_and_gray_pngs_read_as_opencvs_color_decode(tmp_path, rng):
    images = {"deep.png": _noise(rng, 5, 6, 3, dtype=np.uint16), "gray.png": _noise(rng, 7, 5),
              "deepgray.png": _noise(rng, 4, 4, dtype=np.uint16)}
    values = make_basicsr(tmp_path / "g.lmdb", images)
    dataset = LmdbDataset(tmp_path / "g.lmdb", layout="basicsr")
    for index, key in enumerate((b"deep", b"gray", b"deepgray")):
        image, _ = dataset[index]
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), _opencv_rgb(values[key]))
    # stored: the PNG bytes exactly as the LMDB holds them (what migrate copies)
    with dataset.reader.environment().begin(buffers=True) as txn:
        assert dataset.layout.stored([txn.get(b"deep")]) == ((values[b"deep"],), None)


def _arrays(pair):
    return tuple(np.asarray(image) for image in pair)


def test_paired_lq_and_gt_read_in_sorted_key_order_and_mismatched_keys_are_one_line(tmp_path, rng):
    names = ["0003.png", "0001.png", "0002.png"]
    gt = {name: _noise(rng, 8, 12, 3) for name in names}
    lq = {name: cv2.resize(image, (6, 4), interpolation=cv2.INTER_AREA) for name, image in gt.items()}
    lq_values = make_basicsr(tmp_path / "lq.lmdb", lq)
    gt_values = make_basicsr(tmp_path / "gt.lmdb", gt, order=["0002.png", "0003.png", "0001.png"])
    pairs = PairedLmdbDataset(tmp_path / "lq.lmdb", tmp_path / "gt.lmdb")
    assert len(pairs) == 3
    for index, key in enumerate((b"0001", b"0002", b"0003")):
        lq_image, gt_image = pairs[index]
        assert lq_image.size == (6, 4) and gt_image.size == (12, 8)
        np.testing.assert_array_equal(np.asarray(lq_image), _opencv_rgb(lq_values[key]))
        np.testing.assert_array_equal(np.asarray(gt_image), _opencv_rgb(gt_values[key]))
    assert [np.asarray(b).shape for _, b in pairs.__getitems__([2, 0])] == [(8, 12, 3)] * 2
    swapped = PairedLmdbDataset(tmp_path / "lq.lmdb", tmp_path / "gt.lmdb", transform=lambda a, b: (b, a))
    assert swapped[0][0].size == (12, 8)
    loader = DataLoader(pairs, batch_size=None, num_workers=2, multiprocessing_context="spawn",
                        collate_fn=_arrays)
    for (a, b), (lq_image, gt_image) in zip(loader, (pairs[i] for i in range(3)), strict=True):
        np.testing.assert_array_equal(a, np.asarray(lq_image))
        np.testing.assert_array_equal(b, np.asarray(gt_image))

    make_basicsr(tmp_path / "short.lmdb", {name: gt[name] for name in ("0001.png", "0003.png")})
    with pytest.raises(LmdbFormatError, match=r"do not hold the same keys .*b'0002' is listed 1 times in the LQ LMDB "
                                              r"and 0 in the GT LMDB"):
        PairedLmdbDataset(tmp_path / "lq.lmdb", tmp_path / "short.lmdb")
    other = make_basicsr(tmp_path / "other.lmdb", {"0001.png": gt["0001.png"], "0002.png": gt["0002.png"],
                                                   "0004.png": gt["0003.png"]})
    assert b"0004" in other
    with pytest.raises(LmdbFormatError, match=r"b'0003' is listed 0 times in the LQ LMDB and 1 in the GT"):
        PairedLmdbDataset(tmp_path / "other.lmdb", tmp_path / "lq.lmdb")


def test_a_bad_meta_info_line_names_the_file_and_line_and_a_missing_key_fails_on_read(tmp_path, rng):
    images = {"a.png": _noise(rng, 3, 3, 3), "b.png": _noise(rng, 3, 4, 3)}
    make_basicsr(tmp_path / "m.lmdb", images)
    meta = tmp_path / "m.lmdb" / "meta_info.txt"
    good = meta.read_text()
    meta.write_bytes(good.replace("\n", "\r\n").encode())  # Windows line ends read the same
    assert LmdbDataset(tmp_path / "m.lmdb").layout.keys.tolist() == [b"a", b"b"]
    meta.write_text(good + "\nc.png (3,3,3) 1\n")  # a blank line is skipped; c is not in the LMDB
    dataset = LmdbDataset(tmp_path / "m.lmdb")
    assert len(dataset) == 3
    with pytest.raises(KeysFileError, match=r"m.lmdb: key b'c' is not in the LMDB"):
        dataset[2]
    for bad in ("c.png 3x3\n", "nodot (3,3,3) 1\n", ".png (3,3,3) 1\n"):
        meta.write_text(good + bad)
        with pytest.raises(LmdbFormatError, match=r"meta_info.txt: line 3: .* is not a BasicSR meta_info line"):
            LmdbDataset(tmp_path / "m.lmdb")
    meta.write_bytes(good.encode() + b"\xff\xfe.png (1,1,1) 1\n")
    with pytest.raises(LmdbFormatError, match=r"meta_info.txt: line 3: not UTF-8 text"):
        LmdbDataset(tmp_path / "m.lmdb")
    with open(meta, "r+b") as file:  # sparse: a first line that detects, then 256 MiB of nothing
        file.truncate(MAX_META_BYTES + 1)
    with pytest.raises(LmdbFormatError, match=r"meta_info.txt: 268435457 bytes is more than a meta_info.txt may hold"):
        LmdbDataset(tmp_path / "m.lmdb")
    meta.write_text("readme: these are images\n")  # a meta_info.txt of another kind: not BasicSR's
    with pytest.raises(LmdbFormatError, match="not an image LMDB layout"):
        LmdbDataset(tmp_path / "m.lmdb")


def test_an_undecodable_png_names_the_lmdb_and_key(tmp_path, rng):
    make_basicsr(tmp_path / "u.lmdb", {"x.png": _noise(rng, 3, 3, 3), "y.png": _noise(rng, 3, 3, 3)})
    env = lmdb.open(str(tmp_path / "u.lmdb"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(b"y", b"not a png")
    env.close()
    with pytest.raises(DatumError, match=r"u.lmdb: key b'y': cannot decode"):
        LmdbDataset(tmp_path / "u.lmdb")[1]
    assert isinstance(LmdbDataset(tmp_path / "u.lmdb").layout, BasicSRLayout)


# --------------------------------------------------------------------------- EDVR


def make_edvr(path, images: dict[str, np.ndarray], resolution=None, protocol: int = 4) -> None:
    """An LMDB as EDVR's create_lmdb writes one: raw cv2.imread arrays (H x W x C BGR) and meta_info.pkl."""
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, image in images.items():
            txn.put(key.encode("ascii"), image.tobytes())
    env.close()
    if resolution is None:
        first = next(iter(images.values()))
        c = first.shape[2] if first.ndim == 3 else 1
        resolution = f"{c}_{first.shape[0]}_{first.shape[1]}"
    meta = {"name": "REDS_train", "resolution": resolution, "keys": list(images)}
    (path / "meta_info.pkl").write_bytes(pickle.dumps(meta, protocol=protocol))


@pytest.mark.parametrize("protocol", [2, 4])
def test_edvr_reads_raw_bgr_pixels_reversed_to_rgb_in_pkl_order(tmp_path, rng, protocol):
    images = {f"000_{i:08d}": _noise(rng, 4, 6, 3) for i in (2, 0, 1)}
    make_edvr(tmp_path / "reds.lmdb", images, protocol=protocol)
    dataset = LmdbDataset(tmp_path / "reds.lmdb")
    assert dataset.layout.name == "edvr" and len(dataset) == 3
    for index, bgr in enumerate(images.values()):
        image, target = dataset[index]
        assert target is None and image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), bgr[:, :, ::-1])
    stored, target = dataset.layout.stored([next(iter(images.values())).tobytes()])
    np.testing.assert_array_equal(stored[0], next(iter(images.values()))[:, :, ::-1])


def test_edvr_per_key_resolutions_and_gray(tmp_path, rng):
    images = {"a": _noise(rng, 4, 6, 3), "b": _noise(rng, 5, 6, 3), "g": _noise(rng, 3, 7, 1)}
    make_edvr(tmp_path / "div2k.lmdb", images, resolution=["3_4_6", "3_5_6", "1_3_7"])
    dataset = LmdbDataset(tmp_path / "div2k.lmdb")
    for index, bgr in enumerate(images.values()):
        image, _ = dataset[index]
        expected = np.repeat(bgr, 3, axis=2) if bgr.shape[2] == 1 else bgr[:, :, ::-1]
        np.testing.assert_array_equal(np.asarray(image), expected)
    assert dataset.layout.stored([images["g"].tobytes()])[0][0].shape == (3, 7)
    make_edvr(tmp_path / "same.lmdb", {"a": _noise(rng, 4, 6, 3), "b": _noise(rng, 6, 4, 3)},
              resolution=["3_4_6", "3_6_4"])
    with pytest.raises(LmdbFormatError, match=r"meta_info.pkl: resolutions .* hold the same number of bytes"):
        LmdbDataset(tmp_path / "same.lmdb")
    make_edvr(tmp_path / "badres.lmdb", {"a": _noise(rng, 4, 6, 3)}, resolution="4x6")
    with pytest.raises(LmdbFormatError, match=r"meta_info.pkl: resolution '4x6' is not 'C_H_W'"):
        LmdbDataset(tmp_path / "badres.lmdb")


def test_an_edvr_value_of_the_wrong_size_names_the_lmdb_and_key(tmp_path, rng):
    make_edvr(tmp_path / "e.lmdb", {"k1": _noise(rng, 4, 6, 3), "k2": _noise(rng, 4, 6, 3)})
    env = lmdb.open(str(tmp_path / "e.lmdb"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(b"k2", b"\x00" * 71)
    env.close()
    dataset = LmdbDataset(tmp_path / "e.lmdb")
    np.testing.assert_array_equal(np.asarray(dataset[0][0]).shape, (4, 6, 3))
    with pytest.raises(DatumError, match=r"e.lmdb: key b'k2': raw value of 71 bytes does not match "
                                         r"meta_info.pkl's resolution: 3_4_6 \(72 bytes\)"):
        dataset[1]


class _Hostile:
    """Pickles as a call of os.system: what a malicious meta_info.pkl would hold."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_hostile_meta_info_pkl_is_one_line_and_nothing_runs(tmp_path, rng):
    make_edvr(tmp_path / "h.lmdb", {"k": _noise(rng, 2, 2, 3)})
    marker = tmp_path / "ran"
    hostile = {"name": "x", "resolution": "3_2_2", "keys": ["k"], "payload": _Hostile(str(marker))}
    (tmp_path / "h.lmdb" / "meta_info.pkl").write_bytes(pickle.dumps(hostile))
    with pytest.raises(LmdbFormatError, match=r"h.lmdb/meta_info.pkl: refused to unpickle global (posix|os|nt)\.system"
                                              r" .*nothing of the file was run") as caught:
        LmdbDataset(tmp_path / "h.lmdb")
    assert "\n" not in str(caught.value) and not marker.exists()
    (tmp_path / "h.lmdb" / "meta_info.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(LmdbFormatError, match=r"meta_info.pkl: cannot unpickle it safely"):
        LmdbDataset(tmp_path / "h.lmdb")
    with open(tmp_path / "h.lmdb" / "meta_info.pkl", "r+b") as file:  # sparse, never read
        file.truncate(MAX_META_BYTES + 1)
    with pytest.raises(LmdbFormatError, match=r"meta_info.pkl: 268435457 bytes is more than a meta_info.pkl may hold"):
        LmdbDataset(tmp_path / "h.lmdb")


def test_a_pkl_that_is_not_edvrs_leaves_detection_to_the_other_layouts(tmp_path, rng):
    make_edvr(tmp_path / "n.lmdb", {"k": _noise(rng, 2, 2, 3)})
    (tmp_path / "n.lmdb" / "meta_info.pkl").write_bytes(pickle.dumps({"something": "else"}))
    with pytest.raises(LmdbFormatError, match="not an image LMDB layout"):
        LmdbDataset(tmp_path / "n.lmdb")


def test_edvr_reads_in_forked_workers(tmp_path, rng):
    images = {f"k{i}": _noise(rng, 3, 5, 3) for i in range(4)}
    make_edvr(tmp_path / "w.lmdb", images)
    dataset = LmdbDataset(tmp_path / "w.lmdb", transform=np.asarray)
    loader = DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork")
    for (image, target), bgr in zip(loader, images.values(), strict=True):
        assert target is None
        np.testing.assert_array_equal(np.asarray(image), bgr[:, :, ::-1])
