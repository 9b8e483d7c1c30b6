"""RandomResizedCrop and ResizeCenterCrop: torchvision's boxes, the fused JPEG decode's pixels, the loader and dataset.

torchvision is not installed here, so its box algorithm is transcribed below from the documented
steps of `RandomResizedCrop.get_params` and fed the same draws as the library's vectorised code.
The pixels are compared with the reference a torchvision user gets: Pillow's full decode, a crop
of the same box, Pillow's antialiased bilinear resize, a flip. JPEGs are ImageNet-like (quality
90, 500x375 and 1000x750), made from the shared photos when present, else from smooth generated
images; LMDBs are real, written by the converter.
"""

from __future__ import annotations

import io
import math
import pickle

import numpy as np
import pytest
import torch
from conftest import SHARED_IMAGES, save_image
from lmdbread import read_datums
from PIL import Image
from toollmdbs import converted

from caffe_lmdb import CaffeLoader, LmdbDataset_train, RandomResizedCrop, ResizeCenterCrop, WorkerOptions, caffe_pb2
from caffe_lmdb.draws import below, sample_keys
from caffe_lmdb.errors import DatumError, TransformError
from caffe_lmdb.jpeg_scaled import jpeg_orientation, simplejpeg
from caffe_lmdb.resized_crop import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRIES,
    box_draws,
    box_factor,
    resized_crop_boxes,
    snap_boxes,
)

SIZES = [(500, 375), (1000, 750)]  # (width, height), as ImageNet's typical photos
COUNT = 16
DECODERS = ["pillow", *(["simplejpeg"] if simplejpeg is not None else [])]


# --------------------------------------------------------------------------- torchvision's algorithm, transcribed

def get_params_transcribed(height, width, scale, ratio, source):
    """`torchvision.transforms.RandomResizedCrop.get_params`, step by step as its documentation and source give it.

    (Its `int(round(x))` is Python's `round(x)`: an int, ties to even.)
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * source.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(source.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            i = source.randint(0, height - h + 1)
            j = source.randint(0, width - w + 1)
            return i, j, h, w
    # fallback to central crop
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:  # whole image
        w = width
        h = height
    i = (height - h) // 2
    j = (width - w) // 2
    return i, j, h, w


class ScriptedDraws:
    """The random source of one sample: try t's area and aspect uniforms, then (if it fits) its top and left draws."""

    def __init__(self, area, aspect, tops, lefts):
        self.draws = area, aspect, tops, lefts
        self.uniforms = self.randints = 0

    def uniform(self, low, high):
        attempt, kind = divmod(self.uniforms, 2)
        self.uniforms += 1
        self.randints = 0
        return low + (high - low) * float(self.draws[kind][attempt])

    def randint(self, low, high):
        attempt = self.uniforms // 2 - 1
        bits = int(self.draws[2 + self.randints][attempt])
        self.randints += 1
        return low + below(bits, high - low)


@pytest.mark.parametrize(("scale", "ratio"), [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 0.9), (0.2, 5.0)),
                                              ((0.9, 1.0), (1.0, 1.0)), ((0.01, 0.02), (2.0, 3.0))])
def test_boxes_equal_torchvisions_algorithm_given_the_same_draws(scale, ratio):
    rng = np.random.default_rng(5)
    count = 400
    heights = rng.integers(1, 1200, count)
    widths = rng.integers(1, 1200, count)
    heights[:20], widths[:20] = 1, rng.integers(50, 900, 20)  # extreme ratios: the centre fallback
    widths[20:40], heights[20:40] = 1, rng.integers(50, 900, 20)
    draws = [rng.random((count, TRIES)), rng.random((count, TRIES)),
             rng.integers(0, 2**63, (count, TRIES), dtype=np.uint64) * np.uint64(2),
             rng.integers(0, 2**63, (count, TRIES), dtype=np.uint64) * np.uint64(2) + np.uint64(1)]
    boxes = resized_crop_boxes(heights, widths, scale, ratio, draws)
    for row in range(count):
        source = ScriptedDraws(*(d[row] for d in draws))
        expected = get_params_transcribed(int(heights[row]), int(widths[row]), scale, ratio, source)
        assert tuple(boxes[row].tolist()) == expected, (row, heights[row], widths[row])
        top, left, h, w = expected
        assert top >= 0 and left >= 0 and top + h <= heights[row] and left + w <= widths[row]
    assert (boxes[:20, 2] == 1).all()  # 1-pixel-high records fall back to a centred full-height box


def test_the_loaders_draws_are_the_algorithm_on_the_sample_streams_and_depend_on_seed_epoch_index_only():
    t = RandomResizedCrop(224, dct_scaling=False)
    heights, widths = np.array([375, 750, 120, 3000] * 5), np.array([500, 1000, 4000, 200] * 5)
    indices = list(range(100, 120))
    params = t.batch_params(heights, widths, 3, 7, indices)
    keys = sample_keys(3, 7, indices)
    assert (params[:, :4] == resized_crop_boxes(heights, widths, t.scale, t.ratio, box_draws(keys))).all()
    for row, index in enumerate(indices):  # one at a time, in any order: the same
        assert t.params(int(heights[row]), int(widths[row]), 3, 7, index) == tuple(params[row].tolist())
    assert (t.batch_params(heights[::-1], widths[::-1], 3, 7, indices[::-1]) == params[::-1]).all()
    params = t.batch_params(375, 500, 3, 7, range(200))
    other_epoch = t.batch_params(375, 500, 3, 8, range(200))
    other_seed = t.batch_params(375, 500, 4, 7, range(200))
    assert (other_epoch != params).any(axis=1).mean() > 0.9 and (other_seed != params).any(axis=1).mean() > 0.9
    mirrors = t.batch_params(375, 500, 0, 0, range(4000))[:, 4]
    assert set(mirrors.tolist()) == {0, 1} and 0.45 < mirrors.mean() < 0.55
    assert (RandomResizedCrop(224, mirror=False).batch_params(375, 500, 0, 0, range(50))[:, 4] == 0).all()


def test_snapped_boxes_lie_on_their_dct_scale_and_move_by_at_most_half_of_it():
    t = RandomResizedCrop(224)
    exact = RandomResizedCrop(224, dct_scaling=False)
    heights = np.array([750, 1500, 3000, 375, 2001] * 400)
    widths = np.array([1000, 2000, 4000, 500, 2999] * 400)
    drawn = exact.batch_params(heights, widths, 1, 2, range(len(heights)))[:, :4]
    snapped = t.batch_params(heights, widths, 1, 2, range(len(heights)))[:, :4]
    assert (snap_boxes(drawn, heights, widths, 224) == snapped).all()
    factors = []
    for (top, left, h, w), box, rows, cols in zip(snapped.tolist(), drawn.tolist(), heights, widths, strict=True):
        factor = box_factor(top, left, h, w, (3, rows, cols), 224)
        factors.append(factor)
        assert factor == 1 or min(h, w) >= factor * 224  # a scaled box holds the output size at its scale
        edges = np.array([top, left, top + h, left + w]) - np.array([box[0], box[1], box[0] + box[2], box[1] + box[3]])
        assert np.abs(edges).max() <= factor // 2 if factor > 1 else (edges == 0).all()
        assert top % factor == 0 and left % factor == 0
        assert (top + h) % factor == 0 or top + h == rows
    assert {1, 2, 4, 8} <= set(factors)
    unaligned = box_factor(1, 0, 500, 500, (3, 1000, 1000), 224)  # a box off the grid decodes in full
    assert unaligned == 1 and box_factor(0, 0, 500, 500, (3, 1000, 1000), 224) == 2
    assert box_factor(0, 0, 900, 900, (3, 1000, 1000), 224) == 4


# --------------------------------------------------------------------------- ImageNet-like JPEG LMDBs

def photo_sources() -> list[Image.Image]:
    """The shared photos, or smooth generated images (low-frequency noise plus gradients) where they are absent."""
    if SHARED_IMAGES.is_dir():
        names = ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_right.png", "rocket.jpg",
                 "hubble_deep_field.jpg", "grace_hopper.jpg"]
        return [Image.open(SHARED_IMAGES / name).convert("RGB") for name in names]
    rng = np.random.default_rng(3)
    images = []
    for _ in range(5):
        field = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
        images.append(field)
    return images


def photo(index: int, width: int, height: int) -> Image.Image:
    """An ImageNet-like photo: a crop of a source of the right aspect, resized to width x height."""
    source = photo_sources()[index % len(photo_sources())]
    w, h = source.size
    crop_w = min(w, h * width // height)
    crop_h = crop_w * height // width
    x, y = (w - crop_w) * (index % 3) // 2, (h - crop_h) * (index % 2)
    return source.crop((x, y, x + crop_w, y + crop_h)).resize((width, height), Image.BICUBIC)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory) -> dict:
    """An encoded LMDB of COUNT JPEGs (quality 90, half 500x375, half 1000x750), a raw one of the same, their bytes."""
    root = tmp_path_factory.mktemp("jpegs")
    for i in range(COUNT):
        save_image(root / "src" / f"class{i % 2}" / f"{i:03d}.jpg", photo(i, *SIZES[i % 2]), quality=90)
    encoded = converted(root / "src", root / "encoded.lmdb", encoded=True)
    raw = converted(root / "src", root / "raw.lmdb")
    files = [datum.data for datum in read_datums(encoded).values()]  # key order: the dataset's index order
    return {"encoded": encoded, "raw": raw, "files": files, "root": root}


def reference_crop(data: bytes, box, mirror: bool, size: int = 224) -> np.ndarray:
    """What torchvision gives: Pillow's full decode, the crop of the box, Pillow's antialiased bilinear resize, a flip."""
    top, left, height, width = box
    with Image.open(io.BytesIO(data)) as image:
        crop = image.convert("RGB").crop((left, top, left + width, top + height)).resize((size, size), Image.BILINEAR)
    if mirror:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(crop).transpose(2, 0, 1)


def reference_eval(data: bytes, resize: int = 256, size: int = 224) -> np.ndarray:
    """torchvision's Resize(resize) + CenterCrop(size) on Pillow's full decode."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        width, height = image.size
        if height <= width:
            new_h, new_w = resize, int(resize * width / height)
        else:
            new_h, new_w = int(resize * height / width), resize
        resized = np.asarray(image.resize((new_w, new_h), Image.BILINEAR))
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    return resized[top:top + size, left:left + size].transpose(2, 0, 1)


def loader_samples(path, transform, workers: int = 0, seed: int = 0):
    """Every sample of one epoch in index order, uint8, with its params row."""
    loader = CaffeLoader(path, 5, transform=transform, num_workers=workers, output="uint8", seed=seed)
    images, params = [], []
    for batch, _ in loader:
        images.append(batch.clone())
        params.append(loader.last_offsets.clone())
    return torch.cat(images), torch.cat(params)


def mean_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


def max_abs(a, b) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


def same_but_rounding(a, b) -> bool:
    """Pixels of the same resize by two kernels: torch's and Pillow's fixed-point rounding differ by a level or two."""
    return mean_abs(a, b) < 0.2 and max_abs(a, b) <= 2


@pytest.mark.parametrize("decoder", DECODERS)
def test_fused_pixels_are_within_a_third_of_a_level_of_the_full_decode(jpegs, decoder):
    t = RandomResizedCrop(224, decoder=decoder)
    images, params = loader_samples(jpegs["encoded"], t)
    assert images.shape == (COUNT, 3, 224, 224) and params.shape == (COUNT, 5)
    differences = [mean_abs(images[i], reference_crop(jpegs["files"][i], params[i, :4].tolist(), bool(params[i, 4])))
                   for i in range(COUNT)]
    assert np.mean(differences) <= 0.35, differences
    scaled = [i for i in range(COUNT) if box_factor(*params[i, :4].tolist(), (3, 750, 1000), 224) > 1]
    assert scaled  # some boxes did decode at a DCT scale
    exact = RandomResizedCrop(224, dct_scaling=False, decoder=decoder)
    images, params = loader_samples(jpegs["encoded"], exact)
    for i in range(COUNT):  # no DCT scale: Pillow's pixels, up to the resize kernels' rounding
        assert same_but_rounding(images[i], reference_crop(jpegs["files"][i], params[i, :4].tolist(),
                                                           bool(params[i, 4])))


def test_both_decoders_give_the_same_samples(jpegs):
    if simplejpeg is None:
        pytest.skip("simplejpeg is not installed")
    pillow, _ = loader_samples(jpegs["encoded"], RandomResizedCrop(224, decoder="pillow"))
    fast, _ = loader_samples(jpegs["encoded"], RandomResizedCrop(224, decoder="simplejpeg"))
    assert mean_abs(pillow, fast) < 0.01  # the same libjpeg-turbo scaled IDCT behind both


@pytest.mark.parametrize("decoder", DECODERS)
def test_eval_transform_is_resize_and_centre_crop(jpegs, decoder):
    images, params = loader_samples(jpegs["encoded"], ResizeCenterCrop(256, 224, decoder=decoder))
    differences = [mean_abs(images[i], reference_eval(jpegs["files"][i])) for i in range(COUNT)]
    assert np.mean(differences) <= 0.35, differences
    assert params[0].tolist() == [16, 58, 256, 341, 0] and params[1].tolist() == [16, 58, 256, 341, 0]
    exact, _ = loader_samples(jpegs["encoded"], ResizeCenterCrop(256, 224, dct_scaling=False, decoder=decoder))
    assert all(same_but_rounding(exact[i], reference_eval(jpegs["files"][i])) for i in range(COUNT))


def test_raw_records_take_the_ordinary_path_with_the_same_boxes(jpegs):
    t = RandomResizedCrop(224)
    raw, raw_params = loader_samples(jpegs["raw"], t)
    _, encoded_params = loader_samples(jpegs["encoded"], t)
    assert torch.equal(raw_params, encoded_params)  # the draws depend on the record's size only
    for i in range(COUNT):  # the raw record holds Pillow's full decode: only the resize kernels differ
        assert same_but_rounding(raw[i], reference_crop(jpegs["files"][i], raw_params[i, :4].tolist(),
                                                        bool(raw_params[i, 4])))


def test_batches_are_the_same_for_any_worker_count_and_float32_is_normalize(jpegs):
    t = RandomResizedCrop(224)
    zero, params = loader_samples(jpegs["encoded"], t, workers=0, seed=9)
    two, params_two = loader_samples(jpegs["encoded"], t, workers=2, seed=9)
    assert torch.equal(zero, two) and torch.equal(params, params_two)
    spawned = CaffeLoader(jpegs["encoded"], 5, transform=t, num_workers=1, output="uint8", seed=9,
                          worker_options=WorkerOptions(multiprocessing_context="spawn"))
    first, _ = next(iter(spawned))  # the transform pickled into a fresh interpreter
    assert torch.equal(first, zero[:5]) and torch.equal(spawned.normalize(first), t.normalize(zero[:5]))
    spawned.close()
    loader = CaffeLoader(jpegs["encoded"], 5, transform=t, seed=9)  # output="float32": one pass per sample
    floats = torch.cat([batch.clone() for batch, _ in loader])
    assert floats.dtype == torch.float32 and torch.equal(floats, t.normalize(zero))
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).reshape(1, 3, 1, 1)
    assert torch.equal(floats, (zero.to(torch.float32) - mean) / std)
    assert torch.allclose(floats, (zero / 255.0 - mean / 255) / (std / 255), atol=1e-5)  # torchvision's 0-1 form


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalize_on_the_gpu_gives_the_cpu_bits(jpegs):
    t = RandomResizedCrop(224)
    images, _ = loader_samples(jpegs["encoded"], t)
    assert torch.equal(t.normalize(images.cuda()).cpu(), t.normalize(images))


def test_rgb_false_gives_bgr_planes_and_caffe_means(jpegs):
    rgb, _ = loader_samples(jpegs["encoded"], RandomResizedCrop(224))
    bgr, _ = loader_samples(jpegs["encoded"], RandomResizedCrop(224, rgb=False))
    assert torch.equal(bgr, rgb.flip(1))
    caffe = RandomResizedCrop(224, rgb=False, mean=(104, 117, 123), std=(1,))
    assert torch.equal(caffe.normalize(bgr[:2]), bgr[:2].to(torch.float32) - torch.tensor([104.0, 117, 123])[:, None, None])
    default_bgr = RandomResizedCrop(224, rgb=False).normalize(bgr[:2])
    assert torch.equal(default_bgr, RandomResizedCrop(224).normalize(rgb[:2]).flip(1))


def test_dataset_samples_are_the_loaders(jpegs):
    t = RandomResizedCrop(224, seed=9)
    samples, _ = loader_samples(jpegs["encoded"], t, seed=9)
    dataset = LmdbDataset_train(jpegs["encoded"], transform=t)
    for index in (0, 3, COUNT - 1, -1):
        image, _ = dataset[index]
        assert image.dtype == torch.float32 and torch.equal(image, t.normalize(samples[index:index + 1 or None])[0])
    t.set_epoch(1)
    moved = dataset[3][0]
    loader = CaffeLoader(jpegs["encoded"], 5, transform=t, seed=9, output="uint8")
    loader.set_epoch(1)
    epoch_one = torch.cat([batch.clone() for batch, _ in loader])
    assert torch.equal(moved, t.normalize(epoch_one[3:4])[0]) and not torch.equal(epoch_one[3], samples[3])
    from torch.utils.data import DataLoader

    batches = list(DataLoader(dataset, batch_size=4, num_workers=2))
    assert torch.equal(torch.cat([images for images, _ in batches]), t.normalize(epoch_one))


def test_eval_dataset_and_plain_call(jpegs):
    e = ResizeCenterCrop(256, 224)
    samples, _ = loader_samples(jpegs["encoded"], e)
    dataset = LmdbDataset_train(jpegs["encoded"], transform=e)
    assert torch.equal(dataset[2][0], e.normalize(samples[2:3])[0])
    with Image.open(io.BytesIO(jpegs["files"][2])) as image:  # a decoded image: the ordinary path, the same box
        called = e(image.convert("RGB"))
    assert called.shape == (3, 224, 224) and (called - dataset[2][0]).abs().mean() < 0.35 / 57


def test_plain_call_on_images_arrays_and_tensors_draws_from_its_generator():
    image = photo(1, 320, 240)
    first = RandomResizedCrop(64, seed=5)
    outs = [first(image) for _ in range(3)]
    again = RandomResizedCrop(64, seed=5)
    assert all(torch.equal(a, again(image)) for a in outs) and not torch.equal(outs[0], outs[1])
    chw = np.asarray(image).transpose(2, 0, 1)
    assert torch.equal(RandomResizedCrop(64, seed=5)(chw), outs[0])
    assert torch.equal(RandomResizedCrop(64, seed=5)(torch.from_numpy(chw.copy())), outs[0])
    gray = RandomResizedCrop(64, gray=True, seed=5)(image)
    assert gray.shape == (1, 64, 64)
    with pytest.raises(TransformError, match="PIL image or a C x H x W uint8"):
        RandomResizedCrop(64)(np.zeros((3, 8, 8), np.float32))
    copy = pickle.loads(pickle.dumps(first))
    assert copy.size == 64 and copy.seed == 5


# --------------------------------------------------------------------------- other JPEGs, other formats

def encoded_lmdb(path, payloads: list[bytes]):
    from conftest import write_lmdb

    return write_lmdb(path, {b"%08d" % i: caffe_pb2.Datum(data=data, label=i, encoded=True).SerializeToString()
                             for i, data in enumerate(payloads)})


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def test_rotated_cmyk_gray_png_and_broken_records(tmp_path):
    upright = photo(2, 300, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # turn a quarter: decoded 200 wide x 300 high
    rotated = jpeg_bytes(upright, exif=exif.tobytes())
    cmyk = jpeg_bytes(upright.convert("CMYK"))
    gray = jpeg_bytes(upright.convert("L"))
    png = io.BytesIO()
    upright.save(png, format="PNG")
    payloads = [rotated, cmyk, gray, png.getvalue(), jpeg_bytes(upright)]
    path = encoded_lmdb(tmp_path / "mixed.lmdb", payloads)
    t = RandomResizedCrop(96, decoder=DECODERS[-1])
    images, params = loader_samples(path, t)
    assert images.shape == (5, 3, 96, 96)
    assert tuple(params[0, :4].tolist()) == t.params(300, 200, 0, 0, 0)[:4]  # the upright size drew the box
    for i, payload in enumerate(payloads):
        with Image.open(io.BytesIO(payload)) as image:
            from PIL import ImageOps

            upright_image = ImageOps.exif_transpose(image).convert("RGB")
        buf = io.BytesIO()
        upright_image.save(buf, format="PNG")
        reference = reference_crop(buf.getvalue(), params[i, :4].tolist(), bool(params[i, 4]), 96)
        assert mean_abs(images[i], reference) < (1.0 if i == 1 else 0.5), i  # CMYK: OpenCV's formula, not Pillow's
    assert torch.equal(images[2][0], images[2][1]) and torch.equal(images[2][1], images[2][2])  # gray: 3 equal planes
    gray_images, _ = loader_samples(path, RandomResizedCrop(96, gray=True))
    assert gray_images.shape == (5, 1, 96, 96)
    broken = encoded_lmdb(tmp_path / "broken.lmdb", [jpeg_bytes(upright), jpeg_bytes(upright)[:600]])
    with pytest.raises(DatumError, match=r"key b'00000001' \(index 1\)"):
        loader_samples(broken, t)


def test_orientation_is_read_from_the_header():
    image = photo(0, 40, 30)
    assert jpeg_orientation(memoryview(jpeg_bytes(image))) == 1
    for orientation in (1, 3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = orientation
        assert jpeg_orientation(memoryview(jpeg_bytes(image, exif=exif.tobytes()))) == orientation
    xmp = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    assert jpeg_orientation(memoryview(jpeg_bytes(image, xmp=xmp))) == 0  # Pillow would turn it: not ours to decode
    assert jpeg_orientation(memoryview(b"\xff\xd8\xff\xe1\xff\xff")) == 0  # a segment longer than the data


def test_bad_arguments():
    for kwargs, message in [({"size": 0}, "size"), ({"size": 8, "scale": (0.9, 0.1)}, "scale"),
                            ({"size": 8, "ratio": (0, 1)}, "ratio"), ({"size": 8, "decoder": "turbo"}, "decoder"),
                            ({"size": 8, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}, "pixel levels"),
                            ({"size": 8, "std": (1, 0, 1)}, "std")]:
        with pytest.raises(TransformError, match=message):
            RandomResizedCrop(**kwargs)
    with pytest.raises(TransformError, match="resize must be"):
        ResizeCenterCrop(200, 224)
    with pytest.raises(TransformError, match="2 mean values for 3-channel"):
        RandomResizedCrop(8, mean=(1, 2)).check_shape(3, 10, 10)
    if simplejpeg is None:
        with pytest.raises(TransformError, match="pip install"):
            RandomResizedCrop(8, decoder="simplejpeg")
    assert "decoder=" in repr(RandomResizedCrop(8)) and "resize=256" in repr(ResizeCenterCrop(256, 224))


def test_a_loader_of_these_transforms_resumes_mid_epoch_exactly(jpegs):
    """Issue 26's transforms draw from (seed, epoch, index), so CaffeLoader's state_dict resumes them exactly."""
    from caffe_lmdb.errors import LoaderError

    def loader(transform):
        return CaffeLoader(jpegs["encoded"], 3, transform=transform, output="uint8", seed=4, shuffle=True)

    whole = [batch.clone() for batch, _ in loader(RandomResizedCrop(224))]
    first = loader(RandomResizedCrop(224))
    iterator = iter(first)
    for _ in range(2):
        next(iterator)
    state = first.state_dict()
    assert state["transform"]["class"] == "RandomResizedCrop" and state["transform"]["size"] == 224
    resumed = loader(RandomResizedCrop(224))
    resumed.load_state_dict(state)
    rest = [batch.clone() for batch, _ in resumed]
    assert len(rest) == len(whole) - 2 and all(torch.equal(a, b) for a, b in zip(rest, whole[2:], strict=True))
    with pytest.raises(LoaderError, match="transform"):
        loader(RandomResizedCrop(224, scale=(0.5, 1.0))).load_state_dict(state)
    with pytest.raises(LoaderError, match="transform"):
        loader(ResizeCenterCrop(256, 224)).load_state_dict(state)
