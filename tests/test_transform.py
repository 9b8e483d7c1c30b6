"""`CaffeTransform` against a plain-loop transcription of Caffe's `DataTransformer::Transform(const Datum&)`.

The reference below is written from `src/caffe/data_transformer.cpp`, loop for loop: indices
computed as Caffe computes them and every operation on numpy float32 scalars (Dtype=float), so
a different order of operations or a float64 intermediate shows up as different bits.
"""

from __future__ import annotations

import io
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image

from caffe_lmdb import CaffeLmdbError, DatumError, caffe_pb2
from caffe_lmdb.transform import CaffeTransform, TransformError

C, H, W = 3, 7, 9


# --------------------------------------------------------------------------- the reference

def caffe_reference(datum, crop_size, h_off, w_off, do_mirror, mean=None, mean_values=(), scale=1.0):
    """`Transform(const Datum&, Dtype*)`'s loops over c, h, w, in float32 scalars, as data_transformer.cpp has them."""
    data = datum.data
    channels, datum_height, datum_width = datum.channels, datum.height, datum.width
    has_uint8 = len(data) > 0
    scale = np.float32(scale)
    values = [np.float32(v) for v in mean_values]
    if channels > 1 and len(values) == 1:
        values = values * channels
    mean_flat = None if mean is None else np.asarray(mean, np.float32).ravel()
    height = crop_size or datum_height
    width = crop_size or datum_width
    top = np.zeros(channels * height * width, np.float32)
    for c in range(channels):
        for h in range(height):
            for w in range(width):
                data_index = (c * datum_height + h_off + h) * datum_width + w_off + w
                top_index = (c * height + h) * width + ((width - 1 - w) if do_mirror else w)
                element = np.float32(data[data_index]) if has_uint8 else np.float32(datum.float_data[data_index])
                if mean_flat is not None:
                    top[top_index] = (element - mean_flat[data_index]) * scale
                elif values:
                    top[top_index] = (element - values[c]) * scale
                else:
                    top[top_index] = element * scale
    return top.reshape(channels, height, width)


def raw_datum(planes: np.ndarray) -> caffe_pb2.Datum:
    """A raw Datum of C x H x W planes (uint8 to `data`, anything else to `float_data`), built by hand."""
    channels, height, width = planes.shape
    datum = caffe_pb2.Datum(channels=channels, height=height, width=width, label=1, encoded=False)
    if planes.dtype == np.uint8:
        datum.data = planes.tobytes()
    else:
        datum.float_data.extend(planes.astype(np.float32).ravel().tolist())
    return datum


def write_mean_file(path, mean: np.ndarray):
    """A `mean.binaryproto` as Caffe's compute_image_mean writes it (legacy num/channels/height/width)."""
    channels, height, width = mean.shape
    blob = caffe_pb2.BlobProto(num=1, channels=channels, height=height, width=width)
    blob.data.extend(mean.astype(np.float32).ravel().tolist())
    path.write_bytes(blob.SerializeToString())
    return path


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def caffe_draws(seed, mirror, phase, crop, height, width, count):
    """The (h_off, w_off, do_mirror) a seeded transform must draw: Caffe's order, from a Generator of the same seed."""
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(count):
        do_mirror = mirror and bool(rng.integers(2))
        h_off = w_off = 0
        if crop and phase == "train":
            h_off = int(rng.integers(height - crop + 1))
            w_off = int(rng.integers(width - crop + 1))
        elif crop:
            h_off, w_off = (height - crop) // 2, (width - crop) // 2
        draws.append((h_off, w_off, do_mirror))
    return draws


@pytest.fixture
def planes(rng) -> np.ndarray:
    return rng.integers(0, 256, size=(C, H, W), dtype=np.uint8)


@pytest.fixture
def mean_image(rng) -> np.ndarray:
    """A full-size mean with values that float32 cannot hold exactly in decimal (rounding shows)."""
    return (rng.random((C, H, W)) * 255).astype(np.float32)


# --------------------------------------------------------------------------- Transform, exactly

def test_test_phase_is_the_reference_at_the_floored_centre(planes):
    datum = raw_datum(planes)
    out = CaffeTransform(crop_size=5, phase="test")(datum)
    assert same_bits(out, caffe_reference(datum, 5, (H - 5) // 2, (W - 5) // 2, False))
    assert np.array_equal(out, planes[:, 1:6, 2:7].astype(np.float32))


def test_train_draws_mirror_then_rows_then_columns_and_matches_the_reference(planes):
    datum = raw_datum(planes)
    transform = CaffeTransform(crop_size=5, mirror=True, phase="train", mean_value=(104.008, 116.669, 122.675),
                               scale=0.017, seed=11)
    draws = caffe_draws(11, True, "train", 5, H, W, 24)
    for h_off, w_off, do_mirror in draws:
        out = transform(datum)
        assert same_bits(out, caffe_reference(datum, 5, h_off, w_off, do_mirror, mean_values=transform.mean_value,
                                              scale=0.017))
    assert {d[2] for d in draws} == {False, True} and len({d[:2] for d in draws}) > 3  # the draws varied


def test_mirror_applies_in_test_too(planes):
    datum = raw_datum(planes)
    transform = CaffeTransform(crop_size=5, mirror=True, phase="test", seed=3)
    outputs = [transform(datum) for _ in range(16)]
    centre = (1, 2)
    plain = caffe_reference(datum, 5, *centre, False)
    flipped = caffe_reference(datum, 5, *centre, True)
    assert all(same_bits(o, plain) or same_bits(o, flipped) for o in outputs)
    assert any(same_bits(o, flipped) for o in outputs) and any(same_bits(o, plain) for o in outputs)
    for out, (_, _, do_mirror) in zip(outputs, caffe_draws(3, True, "test", 5, H, W, 16), strict=True):
        assert same_bits(out, flipped if do_mirror else plain)


def test_test_offset_is_floored_where_rounding_would_differ(rng):
    planes = rng.integers(0, 256, size=(C, 8, 8), dtype=np.uint8)
    datum = raw_datum(planes)
    out = CaffeTransform(crop_size=5, phase="test")(datum)
    assert same_bits(out, caffe_reference(datum, 5, 1, 1, False))  # (8 - 5) // 2 = 1
    torchvision_offset = round((8 - 5) / 2)  # torchvision's CenterCrop: int(round(1.5)) = 2
    assert torchvision_offset == 2
    assert not np.array_equal(out, caffe_reference(datum, 5, 2, 2, False))


def test_no_crop_is_the_whole_record(planes):
    datum = raw_datum(planes)
    out = CaffeTransform(mirror=True, seed=5, mean_value=(3.5,))(datum)
    do_mirror = caffe_draws(5, True, "train", 0, H, W, 1)[0][2]
    assert out.shape == (C, H, W)
    assert same_bits(out, caffe_reference(datum, 0, 0, 0, do_mirror, mean_values=(3.5,)))


@pytest.mark.parametrize("phase", ["train", "test"])
def test_mean_file_is_indexed_at_the_crop_window_and_mirrored_with_it(planes, mean_image, tmp_path, phase):
    mean_file = write_mean_file(tmp_path / "mean.binaryproto", mean_image)
    datum = raw_datum(planes)
    transform = CaffeTransform(crop_size=4, mirror=True, mean_file=mean_file, scale=0.00390625, phase=phase, seed=8)
    draws = caffe_draws(8, True, phase, 4, H, W, 12)
    for h_off, w_off, do_mirror in draws:
        expected = caffe_reference(datum, 4, h_off, w_off, do_mirror, mean=mean_image, scale=0.00390625)
        assert same_bits(transform(datum), expected)
    assert any(d[2] for d in draws)
    # the mean window moves with the crop: subtracting the top-left window instead would differ
    h_off, w_off, do_mirror = draws[-1]
    wrong = caffe_reference(datum, 4, h_off, w_off, do_mirror, mean=np.roll(mean_image, 1, axis=2), scale=0.00390625)
    assert not np.array_equal(wrong, caffe_reference(datum, 4, h_off, w_off, do_mirror, mean=mean_image,
                                                     scale=0.00390625))


@pytest.mark.parametrize("values", [(127.3,), (104.008, 116.669, 122.675)])
def test_mean_values_one_replicated_or_one_per_channel(planes, values):
    datum = raw_datum(planes)
    out = CaffeTransform(crop_size=5, phase="test", mean_value=values, scale=0.7)(datum)
    assert same_bits(out, caffe_reference(datum, 5, 1, 2, False, mean_values=values, scale=0.7))


def test_scale_multiplies_after_the_subtraction(planes):
    datum = raw_datum(planes)
    out = CaffeTransform(phase="test", mean_value=(0.1,), scale=3.3)(datum)
    assert same_bits(out, caffe_reference(datum, 0, 0, 0, False, mean_values=(0.1,), scale=3.3))
    # pixel * scale - mean * scale (an algebraically equal order) rounds differently somewhere
    other = planes.astype(np.float32) * np.float32(3.3) - np.float32(0.1) * np.float32(3.3)
    assert not np.array_equal(out, other)


def test_rgb_reverses_the_planes_and_the_mean(planes, mean_image, tmp_path):
    mean_file = write_mean_file(tmp_path / "mean.binaryproto", mean_image)
    datum = raw_datum(planes)
    for kwargs in ({"mean_file": mean_file}, {"mean_value": (1.5, 2.25, 3.125)}):
        bgr = CaffeTransform(crop_size=5, mirror=True, seed=2, **kwargs)(datum)
        rgb = CaffeTransform(crop_size=5, mirror=True, seed=2, rgb=True, **kwargs)(datum)
        assert same_bits(rgb, np.ascontiguousarray(bgr[::-1]))
        assert not np.array_equal(rgb, bgr)


def test_float_data_records(rng, mean_image, tmp_path):
    floats = (rng.random((C, H, W)) * 300 - 20).astype(np.float32)
    datum = raw_datum(floats)
    assert not datum.data and len(datum.float_data) == C * H * W
    mean_file = write_mean_file(tmp_path / "mean.binaryproto", mean_image)
    transform = CaffeTransform(crop_size=6, mirror=True, mean_file=mean_file, scale=0.01, seed=4)
    for h_off, w_off, do_mirror in caffe_draws(4, True, "train", 6, H, W, 6):
        assert same_bits(transform(datum), caffe_reference(datum, 6, h_off, w_off, do_mirror, mean=mean_image,
                                                           scale=0.01))


def test_uint8_data_wins_over_float_data(planes):
    datum = raw_datum(planes)
    datum.float_data.extend([9.5, 8.5])  # extra per-record targets, not pixels
    out = CaffeTransform(phase="test")(datum)
    assert same_bits(out, planes.astype(np.float32))


def test_gray_records(rng):
    gray = rng.integers(0, 256, size=(1, H, W), dtype=np.uint8)
    datum = raw_datum(gray)
    out = CaffeTransform(crop_size=5, phase="test", mean_value=(33.3,), scale=0.5, rgb=True)(datum)
    assert out.shape == (1, 5, 5)
    assert same_bits(out, caffe_reference(datum, 5, 1, 2, False, mean_values=(33.3,), scale=0.5))


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_encoded_records_are_decoded_with_force_color_or_force_gray(rng):
    rgb = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, size=(H, W), dtype=np.uint8)
    encoded_rgb = caffe_pb2.Datum(data=png(rgb), label=0, encoded=True)
    encoded_gray = caffe_pb2.Datum(data=png(gray), label=0, encoded=True)
    bgr_planes = rgb[:, :, ::-1].transpose(2, 0, 1).copy()
    import cv2  # dev extra; force_gray is OpenCV's IMREAD_GRAYSCALE decode (#17)

    as_gray = cv2.imdecode(np.frombuffer(png(rgb), np.uint8), cv2.IMREAD_GRAYSCALE)[np.newaxis]
    cases = [
        (encoded_rgb, {}, bgr_planes),  # native colour
        (encoded_rgb, {"force_gray": True}, as_gray),
        (encoded_gray, {}, gray[np.newaxis]),  # native gray stays one channel
        (encoded_gray, {"force_color": True}, np.repeat(gray[np.newaxis], 3, axis=0)),
    ]
    for datum, flags, expected_planes in cases:
        out = CaffeTransform(crop_size=5, phase="test", mean_value=(10.5,), **flags)(datum)
        expected = caffe_reference(raw_datum(expected_planes), 5, 1, 2, False, mean_values=(10.5,))
        assert same_bits(out, expected), flags
    # the serialized bytes are accepted too (an LMDB value)
    out = CaffeTransform(phase="test", force_gray=True)(encoded_rgb.SerializeToString())
    assert same_bits(out, as_gray.astype(np.float32))


# --------------------------------------------------------------------------- errors: Caffe's CHECKs, one line each

def one_line(excinfo, *names) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    assert isinstance(excinfo.value, CaffeLmdbError)
    for name in names:
        assert str(name) in message, (name, message)
    return message


def test_mean_file_of_another_size_names_both_shapes_and_the_file(planes, rng, tmp_path):
    mean_file = write_mean_file(tmp_path / "mean.binaryproto", rng.random((C, 8, 8)).astype(np.float32))
    transform = CaffeTransform(crop_size=5, mean_file=mean_file)
    with pytest.raises(TransformError) as excinfo:
        transform(raw_datum(planes))
    one_line(excinfo, mean_file, "3x8x8", "3x7x9")


def test_mean_file_and_mean_value_together(tmp_path, mean_image):
    mean_file = write_mean_file(tmp_path / "mean.binaryproto", mean_image)
    with pytest.raises(TransformError) as excinfo:
        CaffeTransform(mean_file=mean_file, mean_value=(104.0,))
    one_line(excinfo, "mean_file", "mean_value", mean_file, "104")


def test_record_smaller_than_the_crop(planes):
    with pytest.raises(TransformError) as excinfo:
        CaffeTransform(crop_size=8)(raw_datum(planes))
    one_line(excinfo, "3x7x9", "crop_size 8")
    with pytest.raises(TransformError) as excinfo:
        CaffeTransform(crop_size=8).params(7, 9, 0, 0, 0)
    one_line(excinfo, "crop_size 8")


def test_wrong_number_of_mean_values(planes, rng):
    with pytest.raises(TransformError) as excinfo:
        CaffeTransform(mean_value=(1.0, 2.0))(raw_datum(planes))
    one_line(excinfo, "2 mean_value", "3-channel")
    gray = raw_datum(rng.integers(0, 256, size=(1, H, W), dtype=np.uint8))
    with pytest.raises(TransformError) as excinfo:
        CaffeTransform(mean_value=(1.0, 2.0, 3.0))(gray)
    one_line(excinfo, "3 mean_value", "1-channel")


def test_force_color_and_force_gray_together():
    with pytest.raises(TransformError) as excinfo:
        CaffeTransform(force_color=True, force_gray=True)
    one_line(excinfo, "force_color", "force_gray")


def test_bad_options_and_files(tmp_path):
    with pytest.raises(TransformError) as excinfo:
        CaffeTransform(phase="val")
    one_line(excinfo, "phase", "'val'")
    for crop_size in (-1, 2.5, "224"):
        with pytest.raises(TransformError) as excinfo:
            CaffeTransform(crop_size=crop_size)
        one_line(excinfo, "crop_size", repr(crop_size))
    with pytest.raises(CaffeLmdbError) as excinfo:
        CaffeTransform(mean_file=tmp_path / "missing.binaryproto")
    one_line(excinfo, tmp_path / "missing.binaryproto")
    broken = tmp_path / "broken.binaryproto"
    broken.write_bytes(b"\xff\xff\xff")
    with pytest.raises(CaffeLmdbError) as excinfo:
        CaffeTransform(mean_file=broken)
    one_line(excinfo, broken)
    undecodable = caffe_pb2.Datum(data=b"not an image", encoded=True)
    with pytest.raises(DatumError) as excinfo:
        CaffeTransform()(undecodable)
    one_line(excinfo, "decode")


# --------------------------------------------------------------------------- params: (seed, epoch, index) only

def test_params_are_a_function_of_seed_epoch_and_index():
    transform = CaffeTransform(crop_size=4, mirror=True)
    forward = [transform.params(12, 10, 7, 0, i) for i in range(200)]
    backward = [transform.params(12, 10, 7, 0, i) for i in reversed(range(200))][::-1]
    assert forward == backward
    assert forward == [CaffeTransform(crop_size=4, mirror=True).params(12, 10, 7, 0, i) for i in range(200)]
    assert forward != [transform.params(12, 10, 7, 1, i) for i in range(200)]  # another epoch
    assert forward != [transform.params(12, 10, 8, 0, i) for i in range(200)]  # another seed
    assert all(isinstance(h, int) and isinstance(w, int) and isinstance(m, bool) for h, w, m in forward)
    rows = transform.batch_params(12, 10, 7, 0, np.arange(200))
    assert rows.shape == (200, 3) and [tuple(r) for r in rows.tolist()] == [(h, w, int(m)) for h, w, m in forward]


def test_params_cover_every_offset_and_mirror_half_the_time():
    transform = CaffeTransform(crop_size=224, mirror=True)
    draws = [transform.params(256, 240, 1, 3, i) for i in range(4000)]
    assert {h for h, _, _ in draws} == set(range(256 - 224 + 1))
    assert {w for _, w, _ in draws} == set(range(240 - 224 + 1))
    mirrored = sum(m for _, _, m in draws) / len(draws)
    assert 0.46 < mirrored < 0.54
    # the three draws are not tied to each other
    assert len({(h, w, m) for h, w, m in draws}) > 0.8 * 33 * 17 * 2


def test_params_in_test_phase_and_without_mirror_or_crop():
    assert {CaffeTransform(crop_size=5, phase="test").params(8, 9, 0, 0, i) for i in range(50)} == {(1, 2, False)}
    mirrors = {CaffeTransform(crop_size=5, mirror=True, phase="test").params(8, 9, 0, 0, i)[2] for i in range(50)}
    assert mirrors == {False, True}
    assert {CaffeTransform().params(8, 9, 0, 0, i) for i in range(50)} == {(0, 0, False)}
    # turning mirror on does not move the crops
    plain = [CaffeTransform(crop_size=5).params(8, 9, 2, 1, i)[:2] for i in range(50)]
    assert plain == [CaffeTransform(crop_size=5, mirror=True).params(8, 9, 2, 1, i)[:2] for i in range(50)]


# --------------------------------------------------------------------------- batch kernels == per-sample __call__

def batch_case(rng, tmp_path, **kwargs):
    """Records, their draws from `params`, and the transform; records differ so that mixing them up shows."""
    mean = mean_file = None
    if kwargs.pop("mean_file", False):
        mean = (rng.random((C, H, W)) * 255).astype(np.float32)
        mean_file = write_mean_file(tmp_path / "mean.binaryproto", mean)
    transform = CaffeTransform(crop_size=5, mirror=True, mean_file=mean_file, **kwargs)
    records = [raw_datum(rng.integers(0, 256, size=(C, H, W), dtype=np.uint8)) for _ in range(10)]
    offsets = transform.batch_params(H, W, 5, 2, np.arange(10))
    assert offsets[:, 2].min() == 0 and offsets[:, 2].max() == 1
    return transform, records, offsets, mean


@pytest.mark.parametrize("kwargs", [
    {"mean_file": True, "scale": 0.017},
    {"mean_file": True, "scale": 0.017, "rgb": True},
    {"mean_value": (104.008, 116.669, 122.675), "scale": 0.017, "rgb": True},
    {"mean_value": (127.5,)},
    {"scale": 0.00390625},
    {},
])
def test_normalize_of_crop_into_is_bit_identical_to_call(rng, tmp_path, kwargs):
    transform, records, offsets, mean = batch_case(rng, tmp_path, **kwargs)
    singles = np.stack([transform._apply(_bgr(r), *map(int, row[:2]), bool(row[2])) for r, row in zip(
        records, offsets, strict=True)])
    # the per-sample path (`__call__`) draws its own offsets: check it at those, sample by sample
    for record, row in zip(records, offsets, strict=True):
        reference = caffe_reference(record, 5, int(row[0]), int(row[1]), bool(row[2]),
                                    mean=mean, mean_values=transform.mean_value, scale=transform.scale)
        reference = reference[::-1] if transform.rgb else reference
        assert same_bits(transform._apply(_bgr(record), int(row[0]), int(row[1]), bool(row[2])),
                         np.ascontiguousarray(reference))
    numpy_batch = np.empty((10, C, 5, 5), np.uint8)
    torch_batch = torch.empty((10, C, 5, 5), dtype=torch.uint8)
    fused = np.empty((10, C, 5, 5), np.float32)
    for i, (record, (h_off, w_off, do_mirror)) in enumerate(zip(records, offsets.tolist(), strict=True)):
        pixels = np.frombuffer(record.data, np.uint8).reshape(C, H, W)  # read-only, as from the memory map
        transform.crop_into(pixels, numpy_batch[i], h_off, w_off, bool(do_mirror))
        transform.crop_into(pixels, torch_batch[i], h_off, w_off, bool(do_mirror))
        transform.transform_into(record, fused[i], h_off, w_off, bool(do_mirror))
    assert same_bits(transform.normalize(numpy_batch, offsets), singles)
    assert same_bits(transform.normalize(torch_batch, torch.as_tensor(offsets)).numpy(), singles)
    # the torch operations normalize runs on a GPU batch, here on the CPU
    assert same_bits(transform._normalize_tensor(torch_batch, torch.as_tensor(offsets)).numpy(), singles)
    reused = np.full((10, C, 5, 5), np.nan, np.float32)
    assert transform.normalize(numpy_batch, offsets, out=reused) is reused and same_bits(reused, singles)
    reused_t = torch.full((10, C, 5, 5), float("nan"))
    assert transform._normalize_tensor(torch_batch, offsets, out=reused_t) is reused_t
    assert same_bits(reused_t.numpy(), singles)
    assert same_bits(fused, singles)
    assert np.array_equal(numpy_batch, torch_batch.numpy())


def _bgr(record) -> np.ndarray:
    return np.frombuffer(record.data, np.uint8).reshape(record.channels, record.height, record.width)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalize_on_the_gpu_is_bit_identical(rng, tmp_path):
    for kwargs in ({"mean_file": True, "scale": 0.017, "rgb": True}, {"mean_value": (104.008, 116.669, 122.675),
                                                                      "scale": 0.017}):
        transform, records, offsets, _ = batch_case(rng, tmp_path, **kwargs)
        batch = np.empty((len(records), C, 5, 5), np.uint8)
        for i, (record, (h_off, w_off, do_mirror)) in enumerate(zip(records, offsets.tolist(), strict=True)):
            transform.crop_into(_bgr(record), batch[i], h_off, w_off, bool(do_mirror))
        on_gpu = transform.normalize(torch.from_numpy(batch).cuda(), torch.as_tensor(offsets).cuda())
        assert on_gpu.device.type == "cuda"
        assert same_bits(on_gpu.cpu().numpy(), transform.normalize(batch, offsets))


def test_call_equals_the_batch_kernels_at_its_own_draws(rng, tmp_path):
    transform, records, _, _ = batch_case(rng, tmp_path, mean_file=True, scale=0.02, seed=9)
    draws = caffe_draws(9, True, "train", 5, H, W, len(records))
    batch = np.empty((len(records), C, 5, 5), np.uint8)
    for i, (record, (h_off, w_off, do_mirror)) in enumerate(zip(records, draws, strict=True)):
        transform.crop_into(_bgr(record), batch[i], h_off, w_off, do_mirror)
    calls = np.stack([transform(record) for record in records])
    assert same_bits(transform.normalize(batch, np.array(draws, dtype=np.int64)), calls)


def test_normalize_needs_offsets_with_a_mean_file(rng, tmp_path):
    transform, _, _, _ = batch_case(rng, tmp_path, mean_file=True)
    with pytest.raises(TransformError) as excinfo:
        transform.normalize(np.zeros((2, C, 5, 5), np.uint8))
    one_line(excinfo, "offsets", transform.mean_file)
    with pytest.raises(TransformError) as excinfo:
        transform.normalize(np.zeros((2, C, 5, 5), np.uint8), np.zeros((3, 3), np.int64))
    one_line(excinfo, "2 x 3")
    with pytest.raises(TransformError) as excinfo:
        transform.normalize(np.zeros((2, C, 5, 5), np.uint8), np.array([[0, 0, 0], [3, 0, 0]]))
    one_line(excinfo, "row 1")
    with pytest.raises(TransformError) as excinfo:
        CaffeTransform(mean_value=(1, 2, 3)).normalize(np.zeros((2, 1, 5, 5), np.uint8))
    one_line(excinfo, "3 mean_value", "1-channel")


def test_crop_into_refuses_a_window_outside_the_record(planes):
    transform = CaffeTransform(crop_size=5)
    with pytest.raises(TransformError) as excinfo:
        transform.crop_into(planes, np.empty((C, 5, 5), np.uint8), 3, 0, False)
    one_line(excinfo, "(3, 0)", "3x7x9")


# --------------------------------------------------------------------------- no global random state

def test_no_global_random_state_is_used_or_changed(planes, rng, tmp_path):
    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(0)
    numpy_state, python_state, torch_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
    transform, records, offsets, _ = batch_case(rng, tmp_path, mean_file=True)
    for seed in (None, 1):
        plain = CaffeTransform(crop_size=5, mirror=True, seed=seed)
        for _ in range(20):
            plain(raw_datum(planes))
    transform.params(H, W, 1, 1, 1)
    batch = torch.zeros((len(records), C, 5, 5), dtype=torch.uint8)
    transform.normalize(batch, offsets)
    transform.crop_into(planes, batch[0], 0, 0, True)
    after = np.random.get_state()
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(numpy_state, after, strict=True))
    assert random.getstate() == python_state
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_seeded_transform_repeats_and_unseeded_ones_differ(planes):
    datum = raw_datum(planes)

    def run(seed):
        transform = CaffeTransform(crop_size=3, mirror=True, seed=seed)
        return np.stack([transform(datum) for _ in range(12)])

    assert same_bits(run(4), run(4))
    assert not np.array_equal(run(None), run(None))


# --------------------------------------------------------------------------- with LmdbDataset_train and DataLoader

@pytest.fixture
def lmdb_of_records(tmp_path, rng):
    from conftest import caffe_key, write_lmdb

    records = [raw_datum(rng.integers(0, 256, size=(C, H, W), dtype=np.uint8)) for _ in range(8)]
    path = write_lmdb(tmp_path / "train.lmdb",
                      {caffe_key(i, f"c/{i}.png"): r.SerializeToString() for i, r in enumerate(records)})
    return path, records


@pytest.mark.parametrize("output", ["numpy", "tensor", "pil"])
def test_as_a_dataset_transform(lmdb_of_records, output):
    from torch.utils.data import DataLoader

    from caffe_lmdb.dataset import LmdbDataset_train

    path, records = lmdb_of_records
    transform = CaffeTransform(crop_size=5, phase="test", mean_value=(104.008, 116.669, 122.675), scale=0.017)
    dataset = LmdbDataset_train(path, transform, output=output)
    images, labels = next(iter(DataLoader(dataset, batch_size=8)))
    expected = np.stack([caffe_reference(r, 5, 1, 2, False, mean_values=transform.mean_value, scale=0.017)
                         for r in records])
    assert images.dtype == torch.float32 and same_bits(images.numpy(), expected)
    assert labels.tolist() == [r.label for r in records]
    assert "CaffeTransform(crop_size=5" in repr(dataset)


def test_arrays_in_image_order_any_layout(planes):
    """RGB arrays (the dataset's numpy output) are put back in Datum order, views with negative strides too."""
    datum = raw_datum(planes)
    rgb = np.ascontiguousarray(planes[::-1])
    expected = [caffe_reference(datum, 5, h, w, m) for h, w, m in caffe_draws(6, True, "train", 5, H, W, 8)]
    for sample in (rgb, planes[::-1], torch.from_numpy(rgb), Image.fromarray(rgb.transpose(1, 2, 0))):
        transform = CaffeTransform(crop_size=5, mirror=True, seed=6)
        for reference in expected:
            out = transform(sample)
            assert same_bits(np.asarray(out), reference), type(sample)
        assert isinstance(out, torch.Tensor) == isinstance(sample, torch.Tensor)
    assert same_bits(CaffeTransform()._apply(planes, 0, 0, True), caffe_reference(datum, 0, 0, 0, True))


def test_dataloader_workers_do_not_repeat_each_others_crops(tmp_path, rng):
    """Forked workers inherit the generator: each must re-key it, or worker 0 and 1 would crop alike."""
    from conftest import caffe_key, write_lmdb
    from torch.utils.data import DataLoader

    from caffe_lmdb.dataset import LmdbDataset_train

    same = raw_datum(rng.integers(0, 256, size=(C, 12, 12), dtype=np.uint8)).SerializeToString()
    path = write_lmdb(tmp_path / "same.lmdb", {caffe_key(i, f"c/{i}.png"): same for i in range(8)})
    transform = CaffeTransform(crop_size=6, mirror=True, seed=1)
    dataset = LmdbDataset_train(path, transform, output="numpy")
    loader = DataLoader(dataset, batch_size=1, num_workers=2, multiprocessing_context="fork",
                        generator=torch.Generator().manual_seed(0))
    crops = [images[0].numpy() for images, _ in loader]
    pairs = [np.array_equal(crops[i], crops[i + 1]) for i in range(0, 8, 2)]  # worker 0's i-th, worker 1's i-th
    assert not all(pairs)
    assert len({c.tobytes() for c in crops}) > 4


def test_pickles_for_spawned_workers(planes, tmp_path, mean_image):
    mean_file = write_mean_file(tmp_path / "mean.binaryproto", mean_image)
    transform = CaffeTransform(crop_size=5, mirror=True, mean_file=mean_file, seed=3)
    transform.normalize(torch.zeros((1, C, 5, 5), dtype=torch.uint8), [[0, 0, 1]])  # fills the device cache
    copy = pickle.loads(pickle.dumps(transform))
    assert copy._device_means == {}
    assert same_bits(copy._apply(planes, 1, 2, True), transform._apply(planes, 1, 2, True))
