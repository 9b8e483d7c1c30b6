"""torchvision's RandomResizedCrop (+ flip) and Resize + CenterCrop as `CaffeLoader` transforms, fused with the decode.

Most PyTorch training on encoded images is RandomResizedCrop(224) + RandomHorizontalFlip +
Normalize, and it is decode-bound: Pillow decodes the whole JPEG, crops a box, resizes it to
224 x 224 and flips it, each step a full copy. Here, in the loader's workers:

* The box is drawn first, from (seed, epoch, index) alone (`draws.py`, as `CaffeTransform`
  draws its crops), by torchvision's algorithm (`resized_crop_boxes`: ten tries of an area and
  a log-uniform aspect ratio, then the centre crop clamped to the ratio range), from the record's
  height and width, which a JPEG's header gives without decoding it (`jpeg_scaled.JpegRecord`).
* A JPEG record is then decoded at the largest DCT scale (1/2, 1/4, 1/8) that keeps the box at
  least `size` pixels (`jpeg_scaled.decode_scaled`): libjpeg skips most of the inverse DCT and
  colour conversion. The box is drawn snapped to that scale (`snap_boxes`: its edges moved by
  less than the factor), so it lies on whole pixels of the smaller image and the samples are
  pixels of a box of the record, not a resampling of one.
* Only the box is resized, by torch's antialiased bilinear kernel on uint8 (Pillow's filter,
  so torchvision's pixels up to rounding), and the flip happens while the result is copied into
  the loader's slot. Other records (PNG, WebP, rotated or CMYK JPEGs, raw Datums) are decoded
  whole by the ordinary path (`datum.record_planes`) and cropped and resized the same way.

Samples are uint8 in the slots; `normalize` (`CaffeLoader.normalize`, on the GPU) subtracts the
mean and divides by the std, given in pixel levels (0-255), RGB by default (torchvision's
ImageNet statistics times 255), or BGR with Caffe's means and `rgb=False`. The same transforms
work per sample: `LmdbDataset_train(path, transform=RandomResizedCrop(224))` hands them each
record and its index (`indexed_record`: the loader's draws and pixels), and a plain call on a
PIL image, array or tensor draws from the transform's own generator.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .datum import Datum, DatumView, check_datum, image_plane_order, image_planes, parse_datum_view, record_planes
from .draws import MASK64, below_array, sample_keys, stream, unit_floats
from .errors import DatumError, TransformError
from .image_files import open_image
from .jpeg_scaled import FACTORS, JpegRecord, decode_scaled, jpeg_record, resolve_decoder

#: torchvision's ImageNet statistics in pixel levels (its 0-1 values times 255), RGB order.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

#: Tries of torchvision's box algorithm before the centre fallback.
TRIES = 10
#: Stream positions of a sample's draws: the mirror coin, then four per try (area, ratio, top, left).
_MIRROR_DRAW, _FIRST_TRY_DRAW = 1, 2


# --------------------------------------------------------------------------- the box algorithm

def resized_crop_boxes(heights: np.ndarray, widths: np.ndarray, scale: tuple[float, float],
                       ratio: tuple[float, float], draws: Sequence[np.ndarray]) -> np.ndarray:
    """torchvision's `RandomResizedCrop.get_params` for many records at once, from given uniform draws.

    The documented steps, per record of H x W and per try t (ten tries): `target_area = H * W *
    uniform(scale)`, `aspect = exp(uniform(log ratio))`, `w = round(sqrt(target_area * aspect))`,
    `h = round(sqrt(target_area / aspect))`; the first try with `0 < w <= W` and `0 < h <= H`
    gives the box, its top `randint(0, H - h + 1)` and left `randint(0, W - w + 1)`. When no try
    fits: the whole image if its ratio W / H lies in the range, else the centred box of the
    nearest ratio of the range (full width or full height).

    Args:
        heights, widths: int arrays of B record sizes.
        scale, ratio: as torchvision's (area fraction range; width / height range).
        draws: four B x TRIES arrays per try: the area and aspect uniforms (float64 in [0, 1)),
            and the 64-bit draws (uint64) the top and left come from (`draws.below_array`).

    Returns:
        B x 4 int64: top, left, height, width.
    """
    area_u, aspect_u, top_bits, left_bits = draws
    heights = np.asarray(heights, np.int64)[:, np.newaxis]
    widths = np.asarray(widths, np.int64)[:, np.newaxis]
    target = (heights * widths) * (scale[0] + (scale[1] - scale[0]) * area_u)
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(low + (high - low) * aspect_u)
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths) & (h > 0) & (h <= heights)
    first = np.argmax(fits, axis=1)
    rows = np.arange(len(first))
    found = fits[rows, first]
    h, w = h[rows, first], w[rows, first]
    heights, widths = heights[:, 0], widths[:, 0]
    top = below_array(top_bits[rows, first], np.maximum(heights - h + 1, 1))
    left = below_array(left_bits[rows, first], np.maximum(widths - w + 1, 1))
    # the centre fallback: full width at the lowest ratio, full height at the highest, else the whole image
    in_ratio = widths / heights
    narrow, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fall_w = np.where(wide, np.round(heights * max(ratio)).astype(np.int64), widths)
    fall_h = np.where(narrow, np.round(widths / min(ratio)).astype(np.int64), heights)
    boxes = np.empty((len(first), 4), np.int64)
    boxes[:, 0] = np.where(found, top, (heights - fall_h) // 2)
    boxes[:, 1] = np.where(found, left, (widths - fall_w) // 2)
    boxes[:, 2] = np.where(found, h, fall_h)
    boxes[:, 3] = np.where(found, w, fall_w)
    return boxes


def box_draws(keys: np.ndarray) -> list[np.ndarray]:
    """The four B x TRIES draw arrays of `resized_crop_boxes` from each sample's stream key (`draws.stream`)."""
    columns: list[list[np.ndarray]] = [[], [], [], []]
    for attempt in range(TRIES):
        for kind in range(4):
            columns[kind].append(stream(keys, _FIRST_TRY_DRAW + 4 * attempt + kind))
    area, aspect, tops, lefts = (np.stack(column, axis=1) for column in columns)
    return [unit_floats(area), unit_floats(aspect), tops, lefts]


def scale_factors(sides: np.ndarray, size: int) -> np.ndarray:
    """Per box, the largest DCT factor (1, 2, 4, 8) that leaves its shorter side (plus a factor) >= `size`.

    The extra factor is the most snapping can take off a side (`snap_boxes`), so the snapped box
    still holds `size` pixels at that scale.
    """
    factors = np.ones(len(sides), np.int64)
    for factor in FACTORS[:-1][::-1]:  # 2, 4, 8
        factors = np.where(sides >= factor * (size + 1), factor, factors)
    return factors


def snap_boxes(boxes: np.ndarray, heights: np.ndarray, widths: np.ndarray, size: int) -> np.ndarray:
    """Boxes with their edges moved to the nearest multiple of their DCT factor (`scale_factors`); 1 leaves them.

    The bottom and right edges stop at the record's own (an edge of a JPEG scaled by f ends at
    ceil(side / f) pixels, whose last one stands for the remainder). Each edge moves by at most
    f / 2 pixels, so a 448-pixel box moves by a pixel at most.
    """
    factors = scale_factors(np.minimum(boxes[:, 2], boxes[:, 3]), size)
    half = factors // 2
    top = (boxes[:, 0] + half) // factors * factors
    left = (boxes[:, 1] + half) // factors * factors
    bottom = np.minimum((boxes[:, 0] + boxes[:, 2] + half) // factors * factors, heights)
    right = np.minimum((boxes[:, 1] + boxes[:, 3] + half) // factors * factors, widths)
    return np.stack([top, left, bottom - top, right - left], axis=1)


def box_factor(top: int, left: int, height: int, width: int, shape: tuple[int, int, int], size: int) -> int:
    """The DCT factor to decode a JPEG at for this box: the largest whose grid it lies on that keeps it >= size.

    A box that `snap_boxes` made gets its own factor back (or a larger one it happens to fit);
    any other gets 1 (a full decode), so the pixels are always those of exactly this box.
    """
    _, rows, cols = shape
    bottom, right = top + height, left + width
    for factor in FACTORS[:-1]:
        if min(height, width) >= factor * size and top % factor == 0 and left % factor == 0 \
                and (bottom % factor == 0 or bottom == rows) and (right % factor == 0 or right == cols):
            return factor
    return 1


def resized_size(height: int, width: int, resize: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side to `resize`, the longer one scaled and truncated."""
    if height <= width:
        return resize, int(resize * width / height)
    return int(resize * height / width), resize


# --------------------------------------------------------------------------- the shared transform


class _ResizedCrops:
    """What both transforms share: records, channels, the uint8 kernel, normalize, the per-sample calls."""

    #: Columns of a sample's params in the loader's slots: (top, left, height, width, mirror).
    params_width = 5

    def __init__(self, size: int, mirror: bool, mean: Sequence[float] | None, std: Sequence[float] | None,
                 rgb: bool, gray: bool, decoder: str, seed: int) -> None:
        if not isinstance(size, int | np.integer) or isinstance(size, bool) or size < 1:
            raise TransformError(f"size must be a whole number >= 1, got {size!r}")
        self.size = int(size)
        self.mirror = bool(mirror)
        self.rgb = bool(rgb)
        self.gray = bool(gray)
        self.decoder = resolve_decoder(decoder)
        self.seed = int(seed)
        self.epoch = 0
        self.mean = None if mean is None else tuple(float(v) for v in np.atleast_1d(mean))
        self.std = None if std is None else tuple(float(v) for v in np.atleast_1d(std))
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and not values:
                raise TransformError(f"{name} needs at least one value")
        if self.std is not None and any(v == 0 for v in self.std):
            raise TransformError(f"std values must not be 0, got {self.std}")
        if self.mean is not None and self.std is not None and all(abs(v) < 1 for v in self.mean) \
                and all(abs(v) <= 1 for v in self.std) and any(self.mean):
            raise TransformError(
                f"mean {self.mean} and std {self.std} look like 0-1 values; they are in pixel levels (0-255) here: "
                "multiply torchvision's by 255 (the defaults are its ImageNet statistics)")
        self._rng = np.random.default_rng(self.seed & MASK64)
        self._pid = os.getpid()
        self._device_stats: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ shapes, records

    def output_shape(self, channels: int, height: int, width: int) -> tuple[int, int, int]:
        """C x size x size, for a record of any size."""
        return channels, self.size, self.size

    def check_shape(self, channels: int, height: int, width: int) -> None:
        """Refuse a record the statistics do not fit (a mean or std per channel, or one for all).

        Raises:
            TransformError: more than one mean or std value, but not `channels` of them.
        """
        if height < 1 or width < 1:
            raise TransformError(f"record is {channels}x{height}x{width} (C x H x W): nothing to crop")
        self._statistics(channels)

    def record_pixels(self, record: Datum | DatumView | bytes | bytearray | memoryview) -> Any:
        """A record as the crop reads it: a `JpegRecord` (decoded later, at the box's scale) or C x H x W uint8 planes.

        JPEGs the fused path can take (`jpeg_scaled.jpeg_record`) wait for their box; other
        encoded records are decoded whole as Caffe's `force_color` (3 planes, BGR) or, with
        `gray`, `force_gray` (1); raw records are their own uint8 planes.

        Raises:
            DatumError: the record is not a valid Datum, does not decode, or holds float pixels.
        """
        if isinstance(record, bytes | bytearray | memoryview):
            record = parse_datum_view(record)
        if record.encoded:
            check_datum(record)
            fused = jpeg_record(record.data, 1 if self.gray else 3, self.decoder)
            if fused is not None:
                return fused
            return record_planes(record, gray=self.gray)
        pixels = record_planes(record)
        if pixels.dtype != np.uint8:
            raise DatumError(f"{type(self).__name__} takes uint8 records; this one holds float pixels (float_data)")
        return pixels

    # ------------------------------------------------------------------ draws

    def params(self, height: int, width: int, seed: int, epoch: int, index: int) -> tuple[int, int, int, int, int]:
        """(top, left, height, width, mirror) for sample `index` of `epoch`, from (seed, epoch, index) alone."""
        row = self.batch_params(np.array([height]), np.array([width]), seed, epoch, [index])[0]
        return tuple(int(v) for v in row)

    def batch_params(self, height: Any, width: Any, seed: int, epoch: int, indices: Any) -> np.ndarray:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """The epoch `indexed_record` draws for (`LmdbDataset_train` + DataLoader); CaffeLoader passes its own."""
        self.epoch = int(epoch)

    def state_params(self) -> dict[str, Any]:
        """What the transform does to a sample, as plain values, for `CaffeLoader.state_dict()` (see
        `CaffeTransform.state_params`): a resume with other crops, sizes or normalisation is refused.
        The decoder is left out: both give the same boxes, their pixels differ by a fraction of a level.
        """
        params: dict[str, Any] = {"class": type(self).__name__, "size": self.size, "mirror": self.mirror,
                                  "rgb": self.rgb, "gray": self.gray,
                                  "mean": None if self.mean is None else list(self.mean),
                                  "std": None if self.std is None else list(self.std)}
        for name in ("scale", "ratio", "resize", "dct_scaling"):
            if hasattr(self, name):
                value = getattr(self, name)
                params[name] = [float(v) for v in value] if isinstance(value, tuple | list) else value
        return params

    # ------------------------------------------------------------------ the uint8 kernel

    def crop_into(self, pixels: Any, out: Any, top: int, left: int, height: int, width: int, mirror: int) -> None:
        """Write one record's sample, uint8 C x size x size in output order, into `out` (a slot row)."""
        raise NotImplementedError

    def transform_into(self, record: Any, out: Any, top: int, left: int, height: int, width: int,
                       mirror: int) -> None:
        """The float32 sample (`crop_into`, then `normalize`'s arithmetic) into `out`."""
        pixels = record if isinstance(record, np.ndarray | JpegRecord) else self.record_pixels(record)
        samples = torch.empty(self.output_shape(*pixels.shape), dtype=torch.uint8)
        self.crop_into(pixels, samples, top, left, height, width, mirror)
        dst = out if isinstance(out, torch.Tensor) else torch.from_numpy(out)
        mean, std = self._stats_on(torch.device("cpu"), samples.shape[0])
        torch.sub(samples.to(torch.float32), mean[0], out=dst)
        dst.div_(std[0])

    def _order(self, channels: int) -> list[int] | None:
        """Datum planes in output order (RGB with `rgb`), None when already so."""
        order = image_plane_order(channels) if self.rgb else list(range(channels))
        return None if order == list(range(channels)) else order

    def _source(self, pixels: Any, factor: int) -> tuple[torch.Tensor, list[int] | None, int]:
        """(C x H x W tensor, plane order to output, factor it is scaled by) of a record's pixels."""
        if isinstance(pixels, JpegRecord):
            colorspace = "GRAY" if pixels.shape[0] == 1 else "RGB" if self.rgb else "BGR"
            try:
                decoded = decode_scaled(pixels, factor, colorspace)
            except TransformError:  # the ordinary decode says what is wrong, or decodes what libjpeg only warned about
                planes = image_planes(open_image(bytes(pixels.data), gray=self.gray))
                return _tensor(planes), self._order(planes.shape[0]), 1
            return _tensor(decoded).permute(2, 0, 1), None, factor  # channels-last: torch's fast path
        return _tensor(pixels), self._order(pixels.shape[0]), 1

    def _write(self, region: torch.Tensor, height: int, width: int, order: list[int] | None, flip: bool,
               out: Any, crop: tuple[int, int] | None = None) -> None:
        """Resize `region` (C x h x w) to height x width (antialiased bilinear), crop, reorder, flip, into `out`."""
        if tuple(region.shape[1:]) != (height, width):
            region = torch.nn.functional.interpolate(region[None], size=(height, width), mode="bilinear",
                                                     antialias=True, align_corners=False)[0]
        if crop is not None:
            region = region[:, crop[0]:crop[0] + self.size, crop[1]:crop[1] + self.size]
        if order is not None:
            region = region[order]
        if flip:
            region = region.flip(-1)
        dst = out if isinstance(out, torch.Tensor) else torch.from_numpy(out)
        dst.copy_(region)

    # ------------------------------------------------------------------ normalize

    def _statistics(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 mean and std per output plane: given, or ImageNet's for 3 planes (0 and 1 for others)."""
        mean, std = self.mean, self.std
        if channels == 3 and mean is None:
            mean = IMAGENET_MEAN if self.rgb else IMAGENET_MEAN[::-1]
        if channels == 3 and std is None:
            std = IMAGENET_STD if self.rgb else IMAGENET_STD[::-1]
        values = []
        for name, given, default in (("mean", mean, 0.0), ("std", std, 1.0)):
            given = (default,) if given is None else given
            if len(given) not in (1, channels):
                raise TransformError(f"{len(given)} {name} values for {channels}-channel samples: give 1 (used for "
                                     f"every channel) or {channels}")
            values.append(np.broadcast_to(np.asarray(given, np.float32), (channels,)).copy())
        return values[0], values[1]

    def _stats_on(self, device: torch.device, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and std as 1 x C x 1 x 1 float32 tensors on `device`, made once."""
        key = (str(device), channels)
        if key not in self._device_stats:
            mean, std = self._statistics(channels)
            self._device_stats[key] = tuple(torch.as_tensor(v).reshape(1, channels, 1, 1).to(device)
                                            for v in (mean, std))
        return self._device_stats[key]

    def normalize(self, batch: Any, offsets: Any = None) -> Any:
        """`(pixel - mean) / std` in float32 on the batch's own device (a GPU: a quarter of the bytes copied).

        The same two float32 operations as `transform_into` (`output="float32"`), so the same
        bits. `offsets` (the loader's params) are not needed: the statistics are per channel.

        Args:
            batch: B x C x size x size uint8, a torch tensor (any device) or a numpy array.

        Returns:
            float32, a tensor like `batch` (a numpy array for a numpy batch).
        """
        as_numpy = isinstance(batch, np.ndarray)
        tensor = torch.from_numpy(batch) if as_numpy else batch
        if tensor.ndim != 4:
            raise TransformError(f"normalize expects a B x C x h x w batch, got shape {tuple(tensor.shape)}")
        mean, std = self._stats_on(tensor.device, int(tensor.shape[1]))
        result = tensor.to(torch.float32, copy=True).sub_(mean).div_(std)
        return result.numpy() if as_numpy else result

    # ------------------------------------------------------------------ per sample

    def indexed_record(self, record: Datum | DatumView | bytes | bytearray | memoryview, index: int) -> torch.Tensor:
        """Sample `index` of a dataset from its record: the draws and pixels `CaffeLoader` gives it, normalized.

        What `LmdbDataset_train` calls instead of decoding the record itself: the draws come from
        (`seed`, `epoch`, `index`) as in a `CaffeLoader(seed=seed)` at that epoch (`set_epoch`),
        so a `DataLoader` gives the same samples in any worker, and JPEGs take the fused decode.

        Returns:
            float32 C x size x size (RGB with `rgb`), `normalize`'s values.
        """
        pixels = self.record_pixels(record)
        self.check_shape(*pixels.shape)
        draw = self.params(pixels.shape[1], pixels.shape[2], self.seed, self.epoch, index)
        out = torch.empty(self.output_shape(*pixels.shape), dtype=torch.float32)
        self.transform_into(pixels, out, *draw)
        return out

    def __call__(self, image: Any) -> torch.Tensor:
        """One image (PIL, or C x H x W uint8 RGB array or tensor) with a draw from this transform's own generator.

        For pipelines that hand over decoded images (torchvision datasets, `LmdbDataset_train`
        with another transform before this one). A copy in a DataLoader worker re-keys its
        generator from the worker's seed, so workers do not repeat each other's draws; for draws
        that depend on (seed, epoch, index) only, let `LmdbDataset_train` call `indexed_record`.

        Returns:
            float32 C x size x size, normalized, RGB (or BGR without `rgb`).
        """
        planes = self._image_planes(image)
        self.check_shape(*planes.shape)
        index = int(self._generator().integers(2**62))  # a random stream of the counter-based draws
        draw = self.params(planes.shape[1], planes.shape[2], self.seed, self.epoch, index)
        out = torch.empty(self.output_shape(*planes.shape), dtype=torch.float32)
        self.transform_into(planes, out, *draw)
        return out

    def _image_planes(self, image: Any) -> np.ndarray:
        """A decoded image as C x H x W uint8 planes in Datum order (BGR), as a raw record holds them."""
        if isinstance(image, Image.Image):
            return image_planes(image.convert("L" if self.gray else "RGB"))
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise TransformError(f"{type(self).__name__} takes a PIL image or a C x H x W uint8 array or tensor, got "
                                 f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}")
        planes = image[np.newaxis] if image.ndim == 2 else image
        return planes[image_plane_order(planes.shape[0])] if planes.shape[0] in (3, 4) else planes

    def _generator(self) -> np.random.Generator:
        """This process's generator for `__call__`: a copy in a new process (a DataLoader worker) gets a stream."""
        pid = os.getpid()
        if pid != self._pid:
            info = torch.utils.data.get_worker_info()
            self._rng = np.random.default_rng([self.seed & MASK64, pid if info is None else info.seed & MASK64])
            self._pid = pid
        return self._rng

    def __getstate__(self) -> dict[str, Any]:
        """Pickle for worker processes without the device tensors, which each process makes for itself."""
        return {**self.__dict__, "_device_stats": {}}

    def _repr_parts(self) -> list[str]:
        parts = []
        if self.mean is not None:
            parts.append(f"mean={self.mean}")
        if self.std is not None:
            parts.append(f"std={self.std}")
        if not self.rgb:
            parts.append("rgb=False")
        if self.gray:
            parts.append("gray=True")
        return [*parts, f"decoder={self.decoder!r}"]


class RandomResizedCrop(_ResizedCrops):
    """torchvision's `RandomResizedCrop(size, scale, ratio)` + `RandomHorizontalFlip()`, for `CaffeLoader`.

    Args:
        size: side of the square samples.
        scale: range of the box's area as a fraction of the record's (torchvision's default).
        ratio: range of the box's width / height, drawn log-uniformly.
        mirror: flip left-right with probability 1/2 (torchvision's RandomHorizontalFlip).
        mean, std: per channel in pixel levels (0-255), in output order; None: torchvision's
            ImageNet statistics times 255 (for 3 channels), RGB or BGR as `rgb` says.
        rgb: output RGB planes (torchvision's order); False gives Datum order (BGR, Caffe's).
        gray: one plane per sample (Caffe's `force_gray`); otherwise three (`force_color`).
        dct_scaling: decode JPEGs at the largest DCT scale the box allows, its edges snapped to
            that scale (moved by at most half the factor); False keeps torchvision's exact boxes
            and decodes in full.
        decoder: "auto" (simplejpeg when installed, else Pillow), "simplejpeg" or "pillow".
        seed: the seed of `indexed_record`'s draws and of `__call__`'s generator (CaffeLoader
            draws with its own `seed`).

    Raises:
        TransformError: a size, scale or ratio out of range, statistics that cannot be right,
            or an unknown decoder (or simplejpeg asked for and not installed).
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), mirror: bool = True, *,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, rgb: bool = True,
                 gray: bool = False, dct_scaling: bool = True, decoder: str = "auto", seed: int = 0) -> None:
        super().__init__(size, mirror, mean, std, rgb, gray, decoder, seed)
        scale, ratio = tuple(float(v) for v in scale), tuple(float(v) for v in ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise TransformError(f"scale must be (min, max) with 0 < min <= max, got {scale}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise TransformError(f"ratio must be (min, max) with 0 < min <= max, got {ratio}")
        self.scale = scale
        self.ratio = ratio
        self.dct_scaling = bool(dct_scaling)

    def batch_params(self, height: Any, width: Any, seed: int, epoch: int, indices: Any) -> np.ndarray:
        """`params` for many samples, vectorised: B x 5 int64 (top, left, height, width, mirror).

        Row i is torchvision's box for a record of height[i] x width[i] drawn from sample
        indices[i]'s stream (`resized_crop_boxes`), snapped to its DCT scale (`snap_boxes`) unless
        `dct_scaling` is off, and the mirror coin at the stream's position 1 (as `CaffeTransform`).
        """
        keys = sample_keys(seed, epoch, indices)
        heights = np.broadcast_to(np.asarray(height, np.int64), keys.shape)
        widths = np.broadcast_to(np.asarray(width, np.int64), keys.shape)
        boxes = resized_crop_boxes(heights, widths, self.scale, self.ratio, box_draws(keys))
        if self.dct_scaling:
            boxes = snap_boxes(boxes, heights, widths, self.size)
        out = np.zeros((len(keys), 5), np.int64)
        out[:, :4] = boxes
        if self.mirror:
            out[:, 4] = (stream(keys, _MIRROR_DRAW) >> np.uint64(63)).astype(np.int64)
        return out

    def crop_into(self, pixels: Any, out: Any, top: int, left: int, height: int, width: int, mirror: int) -> None:
        """The box of the record (a JPEG decoded at the box's DCT scale), resized to size x size, flipped if drawn.

        Raises:
            TransformError: the box does not lie inside the record.
            DatumError: a JPEG the fused path took does not decode after all (named by the loader).
        """
        _, rows, cols = pixels.shape
        if top < 0 or left < 0 or height < 1 or width < 1 or top + height > rows or left + width > cols:
            raise TransformError(f"box {height}x{width} at ({top}, {left}) does not fit a "
                                 f"{'x'.join(map(str, pixels.shape))} record (C x H x W)")
        factor = box_factor(top, left, height, width, pixels.shape, self.size) if self.dct_scaling else 1
        source, order, factor = self._source(pixels, factor)
        region = source[:, top // factor:-(-(top + height) // factor), left // factor:-(-(left + width) // factor)]
        self._write(region, self.size, self.size, order, bool(mirror), out)

    def __repr__(self) -> str:
        parts = [f"size={self.size}", f"scale={self.scale}", f"ratio={tuple(round(r, 4) for r in self.ratio)}",
                 f"mirror={self.mirror}", *self._repr_parts()]
        if not self.dct_scaling:
            parts.append("dct_scaling=False")
        return f"{type(self).__name__}({', '.join(parts)})"


class ResizeCenterCrop(_ResizedCrops):
    """torchvision's `Resize(resize)` + `CenterCrop(size)`, the evaluation transform, for `CaffeLoader`.

    The shorter side goes to `resize` (the longer one scaled and truncated, as torchvision's
    Resize of an int), then the centre `size` x `size` is cut (torchvision's rounding). A JPEG is
    decoded at the largest DCT scale that keeps its shorter side >= `resize`, then resized whole.
    The params of a sample are (crop top, crop left, resized height, resized width, 0).

    Args:
        resize: the shorter side after the resize (256 for ImageNet's 224 crops).
        size: side of the square samples (<= resize).
        mean, std, rgb, gray, decoder, seed: as `RandomResizedCrop`.
        dct_scaling: decode JPEGs at a DCT scale (False: always in full).

    Raises:
        TransformError: `size` > `resize`, or as `RandomResizedCrop`.
    """

    def __init__(self, resize: int, size: int, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, rgb: bool = True, gray: bool = False, dct_scaling: bool = True,
                 decoder: str = "auto", seed: int = 0) -> None:
        super().__init__(size, False, mean, std, rgb, gray, decoder, seed)
        if not isinstance(resize, int | np.integer) or isinstance(resize, bool) or resize < self.size:
            raise TransformError(f"resize must be a whole number >= size ({self.size}), got {resize!r}")
        self.resize = int(resize)
        self.dct_scaling = bool(dct_scaling)

    def batch_params(self, height: Any, width: Any, seed: int, epoch: int, indices: Any) -> np.ndarray:
        """B x 5 int64 (crop top, crop left, resized height, resized width, 0): no draws, the same every epoch."""
        count = len(np.atleast_1d(np.asarray(indices)))
        heights = np.broadcast_to(np.asarray(height, np.int64), (count,))
        widths = np.broadcast_to(np.asarray(width, np.int64), (count,))
        out = np.zeros((count, 5), np.int64)
        for row, (h, w) in enumerate(zip(heights.tolist(), widths.tolist(), strict=True)):
            new_h, new_w = resized_size(h, w, self.resize)
            out[row, :4] = (round((new_h - self.size) / 2.0), round((new_w - self.size) / 2.0), new_h, new_w)
        return out

    def crop_into(self, pixels: Any, out: Any, top: int, left: int, height: int, width: int, mirror: int) -> None:
        """The record resized to height x width (a JPEG decoded at a DCT scale first), its centre crop into `out`.

        Raises:
            TransformError: the params are not this record's (`batch_params` of its size).
        """
        _, rows, cols = pixels.shape
        if (height, width) != resized_size(rows, cols, self.resize) or top + self.size > height \
                or left + self.size > width or top < 0 or left < 0:
            raise TransformError(f"params ({top}, {left}, {height}, {width}) are not those of a "
                                 f"{'x'.join(map(str, pixels.shape))} record (C x H x W)")
        factor = 1
        if self.dct_scaling:
            factor = next((f for f in FACTORS if min(rows, cols) >= f * self.resize), 1)
        source, order, _ = self._source(pixels, factor)
        self._write(source, height, width, order, bool(mirror), out, crop=(top, left))

    def __repr__(self) -> str:
        parts = [f"resize={self.resize}", f"size={self.size}", *self._repr_parts()]
        if not self.dct_scaling:
            parts.append("dct_scaling=False")
        return f"{type(self).__name__}({', '.join(parts)})"


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of uint8 pixels, read-only ones (memory-map views, Pillow's arrays) included, without a warning.

    Negative strides (planes reversed out of an image) are copied first: torch has none.
    """
    if min(array.strides, default=0) < 0:
        array = np.ascontiguousarray(array)
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nothing writes through it
        return torch.from_numpy(array)
