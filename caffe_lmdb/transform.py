"""Caffe's `DataTransformer`, exactly: crop, mirror, mean subtraction and scale, as a Data layer feeds a net.

A model trained in Caffe saw each record through `DataTransformer::Transform(const Datum&)`
(`src/caffe/data_transformer.cpp`); reproducing its inputs bit for bit needs its exact rules, which
torchvision's transforms do not follow:

* `do_mirror = mirror && Rand(2)` is drawn first, in TRAIN and TEST alike; then, in TRAIN only,
  `h_off = Rand(H - crop + 1)` and `w_off = Rand(W - crop + 1)`. TEST crops at
  `((H - crop) // 2, (W - crop) // 2)`, floored (torchvision's CenterCrop rounds, 1 px off when
  `(H - crop) % 4 == 3`). `crop_size` 0 keeps the whole record.
* `out[c][h][w'] = (pixel[c][h_off + h][w_off + w] - mean[c][h_off + h][w_off + w]) * scale`, with
  `w' = crop - 1 - w` when mirrored. The mean file is the records' full size (Caffe CHECKs it),
  indexed at the crop window, so a mirrored crop subtracts the mirrored mean window. One
  `mean_value` serves every channel, otherwise there is exactly one per channel.
* The arithmetic is float32 (`Dtype=float`): the pixel is converted to float, the float mean
  subtracted, the difference multiplied by the float `scale`, each step rounded to float32. The
  numpy and torch code here does the same two operations in the same order, so its results are
  the same bits (`mean_value` and `scale` are rounded to float32 first, as protobuf's `float`
  fields are).
* The uint8 `data` is used when present, otherwise `float_data`; encoded records are decoded
  first (`force_color`: 3 channels, `force_gray`: 1, otherwise the file's own), as Caffe's
  `DecodeDatumToCVMat`, through `datum.open_image`.
* Outputs are float32 C x crop x crop in Datum order (BGR for colour), as Caffe's blob holds them;
  `rgb=True` reverses the colour planes (and the mean with them) for torchvision-style models.

Two ways in:

* `CaffeTransform(...)` is a plain callable for `LmdbDataset_train(..., transform=...)`: give the
  dataset `output="numpy"` (or "tensor"), which hands over C x H x W arrays of the record's exact
  values (uint8, or float32 for float records) in RGB plane order; the transform puts the planes
  back in Datum order. `output="pil"` works too but clips float records. It draws its crops and
  mirrors from its own `numpy.random.Generator` (from `seed=`, or fresh entropy), never from
  numpy's, Python's or torch's global random state, and gives each DataLoader worker process its
  own stream (see `__call__`).
* The batch loader calls the pieces: `params` derives (h_off, w_off, do_mirror) from (seed, epoch,
  index) alone, so batches do not depend on the number of workers; `crop_into` copies a record's
  crop window (mirrored) from the memory map into a reused uint8 batch buffer, and `normalize`
  turns a uint8 batch into Caffe's float32 blob on the CPU or on the batch's GPU; `transform_into`
  does the float32 result of one record in a single pass.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .datum import Datum, DatumView, image_plane_order, image_planes, parse_datum_view, record_planes
from .draws import GOLDEN, MASK64, below, mix64, mix64_array, sample_key
from .errors import TransformError
from .mean import load_mean
from .optional_torch import torch_if_imported
from .tool_reading import format_shape

_PHASES = ("train", "test")

# --------------------------------------------------------------------------- the transform

class CaffeTransform:
    """Caffe's `DataTransformer::Transform(const Datum&)` on one record, and the batch kernels a loader needs.

    Args:
        crop_size: side of the square crop; 0 keeps the whole record (Caffe's default).
        mirror: flip the crop left-right with probability 1/2, in TRAIN and TEST alike.
        mean_file: a `mean.binaryproto` (C x H x W, Datum order, the records' full size), loaded now.
        mean_value: 1 value for every channel, or one per channel in Datum order (B, G, R).
        scale: multiplies each pixel after the mean is subtracted (e.g. 0.00390625 for 1/256).
        phase: "train" (random crops) or "test" (centre crops, floored), case-insensitive.
        rgb: give the output (and take the mean) in RGB plane order instead of Caffe's BGR.
        force_color: decode encoded records to 3 channels (Caffe ignores it for raw records).
        force_gray: decode encoded records to 1 channel (Caffe ignores it for raw records).
        seed: seeds the generator `__call__` draws from; None uses fresh OS entropy.

    Raises:
        TransformError: both `mean_file` and `mean_value`, both `force_color` and `force_gray`,
            a negative `crop_size` or an unknown `phase`, or a mean file that is not C x H x W.
        MeanError: the mean file is missing or is not a BlobProto (names the file).
    """

    def __init__(
        self,
        crop_size: int = 0,
        mirror: bool = False,
        mean_file: str | os.PathLike | None = None,
        mean_value: Sequence[float] | float = (),
        scale: float = 1.0,
        phase: str = "train",
        rgb: bool = False,
        force_color: bool = False,
        force_gray: bool = False,
        *,
        seed: int | None = None,
    ) -> None:
        values = np.atleast_1d(np.asarray(mean_value, dtype=np.float32))
        if mean_file is not None and values.size:
            raise TransformError(
                f"mean_file ({os.fspath(mean_file)}) and mean_value ({', '.join(f'{v:g}' for v in values)}) "
                "cannot be used together; give one of them"
            )
        if force_color and force_gray:
            raise TransformError("force_color and force_gray cannot both be set")
        if not isinstance(crop_size, int | np.integer) or isinstance(crop_size, bool) or crop_size < 0:
            raise TransformError(f"crop_size must be a whole number >= 0 (0: no crop), got {crop_size!r}")
        if not isinstance(phase, str) or phase.lower() not in _PHASES:
            raise TransformError(f"phase must be 'train' or 'test', got {phase!r}")
        self.crop_size = int(crop_size)
        self.mirror = bool(mirror)
        self.mean_file = None if mean_file is None else os.fspath(mean_file)
        self.mean_value = tuple(float(v) for v in values)
        self.scale = float(np.float32(scale))
        self.phase = phase.lower()
        self.rgb = bool(rgb)
        self.force_color = bool(force_color)
        self.force_gray = bool(force_gray)
        self.seed = seed
        self._scale = np.float32(scale)
        self._mean_values = values
        self._mean: np.ndarray | None = None
        if self.mean_file is not None:

            mean = load_mean(self.mean_file)
            if mean.ndim != 3:
                raise TransformError(
                    f"{self.mean_file}: mean blob is {format_shape(mean.shape)}, not one C x H x W image"
                )
            self._mean = np.ascontiguousarray(mean, dtype=np.float32)  # Caffe's Blob<float>::FromProto
        self._rng = np.random.default_rng(seed)
        self._pid = os.getpid()
        self._checked: tuple[int, int, int] | None = None  # the last record shape that passed `check_shape`
        self._out_means: dict[int, _OutputMean | None] = {}  # per channel count: the mean in output order
        self._orders: dict[int, list[int] | None] = {}  # per channel count: `_order`
        self._device_means: dict[Any, Any] = {}  # per (device, channels): the output-order mean as a tensor
        self._mean_digest: str | None = None  # `state_params`' name of the mean file's values, made once

    # ------------------------------------------------------------------ shapes and checks

    def output_shape(self, channels: int, height: int, width: int) -> tuple[int, int, int]:
        """The C x H x W of the transform's output for a record of this shape (the crop, or the record)."""
        if self.crop_size:
            return channels, self.crop_size, self.crop_size
        return channels, height, width

    def check_shape(self, channels: int, height: int, width: int) -> None:
        """Caffe's CHECKs for a record of this C x H x W: big enough to crop, and matching the mean.

        Raises:
            TransformError: the record is smaller than `crop_size`, differs from the mean file's
                size, or has a channel count the mean values do not fit.
        """
        shape = (channels, height, width)
        if shape == self._checked:
            return
        crop = self.crop_size
        if height < crop or width < crop:
            raise TransformError(f"record is {format_shape(shape)} (C x H x W), smaller than crop_size {crop}")
        if self._mean is not None and self._mean.shape != shape:
            raise TransformError(
                f"{self.mean_file}: mean is {format_shape(self._mean.shape)} but the record is "
                f"{format_shape(shape)} (C x H x W); the mean file must be the records' full size"
            )
        count = len(self._mean_values)
        if count > 1 and count != channels:
            raise TransformError(
                f"{count} mean_value values for a {channels}-channel record: give 1 (used for every channel) "
                f"or {channels}"
            )
        self._checked = shape

    # ------------------------------------------------------------------ crop and mirror draws

    def _offsets(self, height: int, width: int, draw_h: Any, draw_w: Any) -> tuple[int, int]:
        crop = self.crop_size
        if not crop:
            return 0, 0
        if height < crop or width < crop:
            raise TransformError(f"record is {height}x{width} (H x W), smaller than crop_size {crop}")
        if self.phase == "test":
            return (height - crop) // 2, (width - crop) // 2
        return draw_h(height - crop + 1), draw_w(width - crop + 1)

    def draw(self, height: int, width: int) -> tuple[int, int, bool]:
        """(h_off, w_off, do_mirror) for one record, from this transform's own generator, in Caffe's order.

        As `Transform` draws them: the mirror coin first (only when `mirror` is set), then in TRAIN
        the row offset, then the column offset.
        """
        self._own_process_rng()
        rng = self._rng
        do_mirror = self.mirror and bool(rng.integers(2))
        h_off, w_off = self._offsets(height, width, lambda n: int(rng.integers(n)), lambda n: int(rng.integers(n)))
        return h_off, w_off, do_mirror

    def params(self, height: int, width: int, seed: int, epoch: int, index: int) -> tuple[int, int, bool]:
        """(h_off, w_off, do_mirror) for sample `index` of `epoch`, a function of (seed, epoch, index) alone.

        What makes the loader's batches the same whatever its number of workers and whichever
        worker reads a sample: no generator state is carried from one sample to the next. The
        draws come from a splitmix64 stream keyed by the three numbers (each taken modulo
        2**64): the mirror coin first, then the row offset, then the column offset, each at a
        fixed position of the stream (so turning `mirror` on does not move the crops). In TEST
        the offsets are Caffe's floored centre; without a crop they are 0.

        Raises:
            TransformError: the record is smaller than `crop_size`.
        """
        key = mix64(((sample_key(seed, epoch) ^ (index & MASK64)) + GOLDEN) & MASK64)
        do_mirror = self.mirror and mix64((key + GOLDEN) & MASK64) >> 63 == 1
        h_off, w_off = self._offsets(
            height, width,
            lambda n: below(mix64((key + 2 * GOLDEN) & MASK64), n),
            lambda n: below(mix64((key + 3 * GOLDEN) & MASK64), n),
        )
        return h_off, w_off, do_mirror

    def batch_params(
        self,
        height: int | np.ndarray,
        width: int | np.ndarray,
        seed: int,
        epoch: int,
        indices: Sequence[int] | np.ndarray,
    ) -> np.ndarray:
        """`params` for many samples at once, vectorised: a B x 3 int64 array of (h_off, w_off, do_mirror).

        Row i equals `params(height[i], width[i], seed, epoch, indices[i])` (height and width may
        be one size for all or one per sample); the array is what `normalize` takes as `offsets`.

        Raises:
            TransformError: a record is smaller than `crop_size`.
        """
        index = np.asarray(indices, dtype=np.int64).astype(np.uint64)  # two's complement, as `& MASK64`
        key = mix64_array((np.uint64(sample_key(seed, epoch)) ^ index) + np.uint64(GOLDEN))
        out = np.zeros((len(index), 3), np.int64)
        if self.mirror:
            out[:, 2] = mix64_array(key + np.uint64(GOLDEN)) >> np.uint64(63)
        crop = self.crop_size
        if not crop:
            return out
        heights = np.broadcast_to(np.asarray(height, dtype=np.int64), index.shape)
        widths = np.broadcast_to(np.asarray(width, dtype=np.int64), index.shape)
        small = (heights < crop) | (widths < crop)
        if small.any():
            i = int(np.flatnonzero(small)[0])
            raise TransformError(
                f"sample {int(indices[i])}: record is {heights[i]}x{widths[i]} (H x W), smaller than crop_size {crop}"
            )
        if self.phase == "test":
            out[:, 0] = (heights - crop) // 2
            out[:, 1] = (widths - crop) // 2
            return out
        for column, sizes, step in ((0, heights, 2), (1, widths, 3)):
            draws = mix64_array(key + np.uint64((step * GOLDEN) & MASK64)) >> np.uint64(32)
            out[:, column] = ((draws * (sizes - crop + 1).astype(np.uint64)) >> np.uint64(32)).astype(np.int64)
        return out

    def _own_process_rng(self) -> None:
        """Give a copy of this transform in a new process (a DataLoader worker) a stream of its own.

        Forked workers inherit the parent's generator state, and without this every worker (and
        every epoch of non-persistent workers) would repeat the same crops. Without `seed` the
        new stream comes from fresh OS entropy. With one, it is keyed by `seed` and, in a
        worker, the worker's `torch.utils.data.get_worker_info().seed` (which the DataLoader
        draws anew for each epoch, reproducibly under `torch.manual_seed` or its `generator`),
        elsewhere the process id.
        """
        pid = os.getpid()
        if pid == self._pid:
            return
        worker_seed = None
        torch = torch_if_imported()
        if torch is not None:
            info = torch.utils.data.get_worker_info()
            worker_seed = None if info is None else info.seed & MASK64
        if self.seed is None:
            self._rng = np.random.default_rng()  # fresh OS entropy: a stream of its own in any process
        else:
            self._rng = np.random.default_rng([self.seed & MASK64, pid if worker_seed is None else worker_seed])
        self._pid = pid

    # ------------------------------------------------------------------ per-sample transform

    def __call__(self, sample: Any) -> Any:
        """Transform one record as Caffe does, with a crop and mirror from this transform's own generator.

        Args:
            sample: what `LmdbDataset_train` hands a transform: a C x H x W numpy array or torch
                tensor in RGB plane order (`output="numpy"` or `"tensor"`: the record's exact
                values) or a PIL image (`output="pil"`); or the record itself, a `Datum`,
                `DatumView` or its serialized bytes (decoded here with `force_color`/`force_gray`;
                the dataset's outputs are decoded natively, so for those, ask the dataset for
                `mode="RGB"` in place of `force_color`).

        The crop and mirror come from `draw`. A copy of the transform in another process (a
        DataLoader worker, forked or spawned) first re-keys its generator, so that workers do
        not repeat each other's draws (see `_own_process_rng`); for draws that do not depend on
        the worker layout at all, use `params`.

        Returns:
            float32 C x crop x crop (or the record's size without a crop), in Datum (BGR) order
            or RGB with `rgb=True`: a torch tensor for a tensor input, otherwise a numpy array.

        Raises:
            TransformError: one of Caffe's CHECKs fails (see `check_shape`).
            DatumError: the record is not a valid Datum, or its encoded image does not decode.
        """
        torch = torch_if_imported()
        as_tensor = torch is not None and isinstance(sample, torch.Tensor)
        pixels = self._pixels(sample)
        channels, height, width = pixels.shape
        self.check_shape(channels, height, width)
        h_off, w_off, do_mirror = self.draw(height, width)
        out = np.empty(self.output_shape(channels, height, width), np.float32)
        self.transform_into(pixels, out, h_off, w_off, do_mirror)
        return torch.from_numpy(out) if as_tensor else out

    def _apply(self, pixels: np.ndarray, h_off: int, w_off: int, do_mirror: bool) -> np.ndarray:
        """The float32 output for a C x H x W array in Datum order (`datum.datum_to_array`) at the given draw."""
        pixels = _datum_order_array(pixels)
        channels, height, width = pixels.shape
        self.check_shape(channels, height, width)
        out = np.empty(self.output_shape(channels, height, width), np.float32)
        self.transform_into(pixels, out, h_off, w_off, do_mirror)
        return out

    def _pixels(self, sample: Any) -> np.ndarray:
        """The sample as a C x H x W array in Datum order: uint8, or float32 for float records."""
        if isinstance(sample, bytes | bytearray | memoryview):
            sample = parse_datum_view(sample)
        if isinstance(sample, Datum | DatumView):
            return self.record_pixels(sample)
        if isinstance(sample, Image.Image):
            return image_planes(sample)
        torch = torch_if_imported()
        if torch is not None and isinstance(sample, torch.Tensor):
            sample = sample.detach().cpu().numpy()
        if isinstance(sample, np.ndarray):
            array = sample[np.newaxis] if sample.ndim == 2 else sample
            if array.ndim != 3:
                raise TransformError(f"expected a C x H x W image, got an array of shape {sample.shape}")
            if array.shape[0] == 3:  # RGB back to BGR: a view
                array = array[::-1]
            elif array.shape[0] == 4:
                array = array[image_plane_order(4)]  # RGBA back to BGRA (the order is its own inverse)
            return _datum_order_array(array)
        raise TransformError(
            f"cannot transform a {type(sample).__name__}: expected a C x H x W array or tensor, a PIL image, "
            "a Datum or its bytes"
        )

    def record_pixels(self, record: Datum | DatumView | bytes | bytearray | memoryview) -> np.ndarray:
        """A record's pixels, C x H x W in Datum order, as `Transform` reads them.

        Raw records give a read-only uint8 view on their `data` (no copy) or, with `data` empty,
        float32 `float_data`; encoded ones are decoded (`force_color`: 3 channels, `force_gray`:
        1, otherwise the file's own), colour as BGR planes.

        Raises:
            DatumError: the record is not a valid Datum, or its image does not decode.
        """
        gray = True if self.force_gray else False if self.force_color else None
        return record_planes(record, gray=gray)

    # ------------------------------------------------------------------ batch kernels

    def _order(self, channels: int) -> list[int] | None:
        """Datum planes in output order, or None when that is the Datum's own order (cached per channel count)."""
        try:
            return self._orders[channels]
        except KeyError:
            order = image_plane_order(channels) if self.rgb else list(range(channels))
            self._orders[channels] = None if order == list(range(channels)) else order
            return self._orders[channels]

    def _window_size(self, pixels: np.ndarray, h_off: int, w_off: int) -> tuple[int, int]:
        """The crop's height and width for this record, after Caffe's CHECKs and a bounds check of the window."""
        shape = pixels.shape
        if shape != self._checked:
            if len(shape) != 3:
                raise TransformError(f"expected a C x H x W record, got an array of shape {shape}")
            self.check_shape(*shape)
        _, height, width = shape
        out_h = out_w = self.crop_size
        if not out_h:
            out_h, out_w = height, width
        if h_off < 0 or w_off < 0 or h_off + out_h > height or w_off + out_w > width:
            raise TransformError(
                f"crop window {out_h}x{out_w} at ({h_off}, {w_off}) does not fit a "
                f"{format_shape(shape)} record (C x H x W)"
            )
        return out_h, out_w

    def crop_into(self, pixels: np.ndarray, out: Any, h_off: int, w_off: int, do_mirror: bool) -> None:
        """Copy a record's crop window, mirrored when asked, into `out`: the loader's one copy per sample.

        Args:
            pixels: C x H x W in Datum order, typically uint8 straight from the memory map
                (`np.frombuffer(view.data, np.uint8).reshape(c, h, w)`; read-only is fine).
            out: C x crop x crop of the same dtype (a slice of a preallocated batch, numpy or a
                CPU torch tensor); written in output order (RGB planes with `rgb=True`).
            h_off, w_off, do_mirror: the draw (`params`).

        The mirrored copy is `torch.flip` (vectorised) into a small buffer, then copied into
        `out`: numpy's copy through a negative stride runs element by element, several times
        slower (numpy alone is used where torch is not installed).

        Raises:
            TransformError: the record does not fit the crop or the mean file, or the window
                lies outside the record.
        """
        out_h, out_w = self._window_size(pixels, h_off, w_off)
        src = pixels[:, h_off:h_off + out_h, w_off:w_off + out_w]
        order = self._order(pixels.shape[0])
        if do_mirror:
            _mirror_copy(src, out, order)
            return
        dst = out if type(out) is np.ndarray else _numpy_view(out)
        if order is None:
            np.copyto(dst, src)
        elif order == _REVERSED_BGR:
            np.copyto(dst, src[::-1])
        else:
            for i, c in enumerate(order):
                np.copyto(dst[i], src[c])

    def transform_into(
        self,
        record: Datum | DatumView | bytes | bytearray | memoryview | np.ndarray,
        out: Any,
        h_off: int,
        w_off: int,
        do_mirror: bool,
    ) -> None:
        """Write one record's float32 output into `out`: `(pixel - mean at the window) * scale`, crop and mirror.

        The float path without a uint8 batch in between (`crop_into` + `normalize` give the same
        bits); each step works on one record, which stays in the CPU cache between them.

        Args:
            record: a Datum, `DatumView` or serialized bytes, or a C x H x W array in Datum order.
            out: float32 C x crop x crop (numpy, or a CPU torch tensor), in output order.
            h_off, w_off, do_mirror: the draw (`params` or `draw`).

        Raises:
            TransformError: one of Caffe's CHECKs fails (see `check_shape`).
            DatumError: the record is not a valid Datum, or its encoded image does not decode.
        """
        pixels = record if isinstance(record, np.ndarray) else self.record_pixels(record)
        out_h, out_w = self._window_size(pixels, h_off, w_off)
        dst = out if type(out) is np.ndarray else _numpy_view(out)
        if do_mirror:
            _mirror_copy(pixels[:, h_off:h_off + out_h, w_off:w_off + out_w], dst, self._order(pixels.shape[0]))
        else:
            self.crop_into(pixels, dst, h_off, w_off, False)  # converts to float32 while copying
        self._normalize_one(dst, self._output_mean(pixels.shape[0]), h_off, w_off, do_mirror)

    def _normalize_one(self, dst: np.ndarray, mean: _OutputMean | None, h_off: int, w_off: int, flip: bool) -> None:
        """In place on one float32 crop in output order: subtract the mean at its window, then scale."""
        if mean is not None:
            np.subtract(dst, mean.window(h_off, w_off, dst.shape[1], dst.shape[2], flip), out=dst)
        if self._scale != 1:
            np.multiply(dst, self._scale, out=dst)

    def _channel_means(self, channels: int) -> np.ndarray:
        """The mean values for a record of `channels` planes, in Datum order (1 value replicated)."""
        values = self._mean_values
        return np.full(channels, values[0], np.float32) if len(values) == 1 else values

    def _output_mean(self, channels: int) -> _OutputMean | None:
        """The mean in output order for records of `channels` planes (None without one), cached."""
        try:
            return self._out_means[channels]
        except KeyError:
            pass
        count = len(self._mean_values)
        if count > 1 and count != channels:
            raise TransformError(
                f"{count} mean_value values for {channels}-channel crops: give 1 (used for every channel) or {channels}"
            )
        if self._mean is not None:
            mean = self._mean
        elif count:
            mean = self._channel_means(channels)[:, np.newaxis, np.newaxis]
        else:
            mean = None
        order = self._order(channels)
        if mean is not None and order is not None:
            mean = mean[order]
        self._out_means[channels] = None if mean is None else _OutputMean(mean, per_pixel=self._mean is not None)
        return self._out_means[channels]

    def normalize(self, batch: Any, offsets: Any = None, out: Any = None) -> Any:
        """Caffe's float32 blob from a uint8 batch of crops: `(pixel - mean at the window) * scale`.

        Bit for bit what `__call__` gives each sample at the same draw. With a mean file the
        window is each sample's own (its crop offsets, and mirrored when the crop was), so
        `offsets` is needed unless every sample's window is the whole, unmirrored mean.

        Args:
            batch: B x C x h x w, uint8 (or float32 for float records), in output order as
                `crop_into` writes it: a numpy array, or a torch tensor on any device (CPU
                tensors go through the numpy code, others through `_normalize_tensor`).
            offsets: B x 3 integers (h_off, w_off, do_mirror) per sample, as `params` or
                `batch_params` give them (numpy, a list, or a tensor).
            out: float32 B x C x h x w to write into (reused across batches, it saves
                allocating and faulting in a fresh array each time); None allocates one.

        Returns:
            float32 B x C x h x w (`out` when given), numpy or a torch tensor like `batch`.

        Raises:
            TransformError: the batch's shape does not fit the mean, or `offsets` are needed
                and missing or not B x 3.
        """
        torch = torch_if_imported()
        if torch is not None and isinstance(batch, torch.Tensor):
            if batch.device.type != "cpu":
                return self._normalize_tensor(batch, offsets, out)
            result = self.normalize(batch.numpy(), offsets, None if out is None else _numpy_view(out))
            return out if out is not None else torch.from_numpy(result)
        if batch.ndim != 4:
            raise TransformError(f"normalize expects a B x C x h x w batch, got shape {tuple(batch.shape)}")
        count, channels, out_h, out_w = batch.shape
        mean = self._output_mean(channels)
        windows = self._windows(count, channels, out_h, out_w, offsets)
        if out is None:
            out = np.empty(batch.shape, np.float32)
        elif out.shape != batch.shape or out.dtype != np.float32:
            raise TransformError(f"out must be float32 {format_shape(batch.shape)}, got {out.dtype} {out.shape}")
        draws = windows.tolist() if windows is not None else [(0, 0, 0)] * count
        for i, (h_off, w_off, flip) in enumerate(draws):  # sample by sample: each stays in the cache
            np.copyto(out[i], batch[i])
            self._normalize_one(out[i], mean, h_off, w_off, bool(flip))
        return out

    def _normalize_tensor(self, batch: Any, offsets: Any = None, out: Any = None) -> Any:
        """`normalize` in torch operations on the batch's own device (what it does for GPU tensors).

        The same two float32 operations (`sub`, then `mul` by a float32 scalar tensor), so the
        same bits on any device; with a mean file, every sample's window of the mean (copied to
        the device once) is gathered in one indexing operation.
        """
        import torch

        if batch.ndim != 4:
            raise TransformError(f"normalize expects a B x C x h x w batch, got shape {tuple(batch.shape)}")
        device = batch.device
        count, channels, out_h, out_w = (int(d) for d in batch.shape)
        mean = self._output_mean(channels)
        windows = self._windows(count, channels, out_h, out_w, offsets)
        if out is None:
            result = batch.to(torch.float32, copy=True)
        else:
            result = out
            result.copy_(batch)
        mean_t, scale_t = self._device_tensors(torch, device, channels, mean)
        if mean_t is not None:
            if windows is None:
                result.sub_(mean_t)
            else:
                win = torch.as_tensor(windows, device=device)
                rows = win[:, 0:1] + torch.arange(out_h, device=device)
                steps = torch.arange(out_w, device=device)
                cols = win[:, 1:2] + torch.where(win[:, 2:3] != 0, out_w - 1 - steps, steps)
                # C x B x h x w, viewed as B x C x h x w
                result.sub_(mean_t[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3))
        if self._scale != 1:
            result.mul_(scale_t)  # a float32 tensor, so the product is rounded to float32 as Caffe's is
        return result

    def _windows(self, count: int, channels: int, out_h: int, out_w: int, offsets: Any) -> np.ndarray | None:
        """The per-sample (h_off, w_off, mirror) of a mean file's windows; None when all are the whole mean."""
        if self._mean is None:
            return None
        mean_c, mean_h, mean_w = self._mean.shape
        if channels != mean_c or out_h > mean_h or out_w > mean_w:
            raise TransformError(
                f"{self.mean_file}: mean is {format_shape(self._mean.shape)}, which cannot hold a batch of "
                f"{channels}x{out_h}x{out_w} crops (C x H x W)"
            )
        if offsets is None:
            if (out_h, out_w) == (mean_h, mean_w) and not self.mirror:
                return None
            raise TransformError(
                f"normalize with mean_file {self.mean_file} needs each sample's offsets (h_off, w_off, do_mirror): "
                "the mean window follows the crop and the mirror"
            )
        torch = torch_if_imported()
        if torch is not None and isinstance(offsets, torch.Tensor):
            offsets = offsets.cpu().numpy()
        windows = np.asarray(offsets, dtype=np.int64)
        if windows.shape != (count, 3):
            raise TransformError(f"offsets must be {count} x 3 (h_off, w_off, do_mirror), got shape {windows.shape}")
        bad = (windows[:, 0] < 0) | (windows[:, 1] < 0) | (windows[:, 0] + out_h > mean_h) | \
            (windows[:, 1] + out_w > mean_w)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise TransformError(
                f"offsets row {i}: a {out_h}x{out_w} window at ({windows[i, 0]}, {windows[i, 1]}) does not fit "
                f"the mean {format_shape(self._mean.shape)} of {self.mean_file}"
            )
        return windows

    def _device_tensors(self, torch: Any, device: Any, channels: int, mean: _OutputMean | None) -> tuple[Any, Any]:
        """The output-order mean and the float32 scale as tensors on `device`, copied there once."""
        key = (str(device), channels)
        cached = self._device_means.get(key)
        if cached is None:
            mean_t = None if mean is None else torch.as_tensor(mean.mean, device=device)
            cached = (mean_t, torch.tensor(self._scale, dtype=torch.float32, device=device))
            self._device_means[key] = cached
        return cached

    # ------------------------------------------------------------------ identity

    def state_params(self) -> dict[str, Any]:
        """What the transform does to a sample, as plain values: what a loader's saved state is checked against.

        A resumed run must crop, mirror and normalise as the interrupted one did, or its batches
        would silently differ; the loader saves this dict and refuses a state whose dict differs.
        The mean file is named by a digest of its values, not its path, so a run resumed on
        another machine with the file elsewhere still matches. The generator `seed` is left out:
        the loader draws crops from its own seed (`params`), which it saves itself.
        """
        if self._mean is not None and self._mean_digest is None:
            digest = hashlib.blake2b(digest_size=16)
            digest.update(repr(self._mean.shape).encode())
            digest.update(self._mean.tobytes())
            self._mean_digest = digest.hexdigest()
        return {"class": type(self).__name__, "crop_size": self.crop_size, "mirror": self.mirror,
                "mean_file": self._mean_digest,
                "mean_value": list(self.mean_value), "scale": self.scale, "phase": self.phase, "rgb": self.rgb,
                "force_color": self.force_color, "force_gray": self.force_gray}

    # ------------------------------------------------------------------ plumbing

    def __getstate__(self) -> dict[str, Any]:
        """Pickle for DataLoader workers without the device tensors, which each process makes for itself."""
        state = self.__dict__.copy()
        state["_device_means"] = {}
        return state

    def __repr__(self) -> str:
        parts = [f"crop_size={self.crop_size}", f"mirror={self.mirror}"]
        if self.mean_file is not None:
            parts.append(f"mean_file={self.mean_file!r}")
        if self.mean_value:
            parts.append(f"mean_value={self.mean_value}")
        if self.scale != 1:
            parts.append(f"scale={self.scale:g}")
        parts.append(f"phase={self.phase!r}")
        for flag in ("rgb", "force_color", "force_gray"):
            if getattr(self, flag):
                parts.append(f"{flag}=True")
        return f"{type(self).__name__}({', '.join(parts)})"


# --------------------------------------------------------------------------- helpers

#: The plane order of `rgb=True` for 3-channel records: a reversed view, no copy.
_REVERSED_BGR = [2, 1, 0]


class _OutputMean:
    """A mean in output plane order, and its left-right flip, for the windows of plain and mirrored crops.

    A mirrored crop subtracts the mirrored window of the mean; reading it through a negative
    stride is slow, so the flipped mean is kept too (made on first need): the mirror image of
    the window at column `w_off` is the window of the flipped mean at `W - crop - w_off`.
    """

    def __init__(self, mean: np.ndarray, per_pixel: bool) -> None:
        self.mean = np.ascontiguousarray(mean, dtype=np.float32)
        self.per_pixel = per_pixel
        self._flipped: np.ndarray | None = None

    def window(self, h_off: int, w_off: int, out_h: int, out_w: int, flip: bool) -> np.ndarray:
        """The mean under a crop at (h_off, w_off), mirrored with it; mean values are C x 1 x 1 for any window."""
        if not self.per_pixel:
            return self.mean
        if not flip:
            return self.mean[:, h_off:h_off + out_h, w_off:w_off + out_w]
        if self._flipped is None:
            self._flipped = np.ascontiguousarray(self.mean[..., ::-1])
        start = self.mean.shape[2] - out_w - w_off
        return self._flipped[:, h_off:h_off + out_h, start:start + out_w]


def _datum_order_array(array: np.ndarray) -> np.ndarray:
    """A C x H x W array as `Transform` reads it: uint8 kept, other numbers as float32 (Caffe's `float_data`)."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3 or 0 in array.shape:
        raise TransformError(f"expected a C x H x W image, got an array of shape {array.shape}")
    if array.dtype == np.uint8 or array.dtype == np.float32:
        return array
    if array.dtype.kind not in "iuf":
        raise TransformError(f"image array dtype must be uint8 or numeric, got {array.dtype}")
    return array.astype(np.float32)


def _numpy_view(out: Any) -> np.ndarray:
    """`out` as a numpy array sharing its memory (a CPU torch tensor is viewed, not copied)."""
    if isinstance(out, np.ndarray):
        return out
    torch = torch_if_imported()
    if torch is not None and isinstance(out, torch.Tensor):
        if out.device.type != "cpu":
            raise TransformError(f"the output buffer must be in CPU memory, got a tensor on {out.device}")
        return out.numpy()
    raise TransformError(f"the output buffer must be a numpy array or a CPU torch tensor, got {type(out).__name__}")


def _torch() -> Any:
    """torch, imported on first need (the command-line tools never need it), or None without it."""
    torch = torch_if_imported()
    if torch is None:
        try:
            import torch
        except ImportError:
            return None
    return torch


def _as_tensor(torch: Any, array: np.ndarray) -> Any:
    """A torch view of a numpy array, read-only ones included (a memory-map view) without a warning.

    `torch.from_numpy` warns on every read-only array; DLPack shares the memory the same way
    without one. Nothing writes through the view. torch has no negative strides, and its DLPack
    import aborts the whole process on them (torch 2.13) where `from_numpy` raises: such views
    (RGB planes reversed out of an array) are copied first.
    """
    if min(array.strides, default=0) < 0:
        array = np.ascontiguousarray(array)
    try:
        return torch.from_dlpack(array)
    except (BufferError, RuntimeError, TypeError):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(array)


def _mirror_copy(src: np.ndarray, out: Any, order: list[int] | None) -> None:
    """`out[c] = src[order[c]][:, ::-1]`: the mirrored window, in output plane order."""
    torch = _torch()
    if torch is None:  # numpy alone: the element-by-element negative-stride copy
        dst = _numpy_view(out)
        planes = src if order is None else src[order]
        np.copyto(dst, planes[..., ::-1])
        return
    dst = out if isinstance(out, torch.Tensor) else torch.from_numpy(out)
    if dst.device.type != "cpu":
        raise TransformError(f"the output buffer must be in CPU memory, got a tensor on {dst.device}")
    window = _as_tensor(torch, src)
    if order is None:
        dst.copy_(torch.flip(window, (2,)))
    elif order == [2, 1, 0]:
        dst.copy_(torch.flip(window, (0, 2)))
    else:
        for i, c in enumerate(order):
            dst[i].copy_(torch.flip(window[c], (1,)))
