"""What a net is fed from a record, for `caffe-lmdb serve`'s transform page: the TEST crop and TRAIN draws.

The transforms are `CaffeTransform`s, from a net prototxt's Data layers (`--prototxt`) or from
crop/mirror/mean options. Each draw is what `CaffeLoader` (default `seed=0`) feeds for the
record's index: `params(height, width, seed, epoch, index)`, so the TRAIN draws shown for epochs
0, 1, 2, ... are the crops and mirrors training sees in those epochs. Each is shown as the crop
window of the record's own pixels (mirrored when the draw mirrors), with the numbers of the
float32 blob `transform_into` makes from it (shape, per-channel mean, range: mean subtracted and
scaled as the net sees them).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .datum import planes_to_image
from .errors import PrototxtError
from .prototxt import data_layers, transform_param_summary
from .transform import CaffeTransform

#: The seed `CaffeLoader` draws crops and mirrors with by default.
LOADER_SEED = 0
#: TRAIN draws shown: epochs 0 .. TRAIN_DRAWS - 1.
TRAIN_DRAWS = 4


@dataclass(frozen=True)
class Transforms:
    """The TRAIN and TEST transforms records are shown through, and where they come from (for the page)."""

    train: CaffeTransform
    test: CaffeTransform
    source: str

    def names(self) -> list[str]:
        """The draws shown: `test`, then `train-0`, `train-1`, ..."""
        return ["test", *(f"train-{epoch}" for epoch in range(TRAIN_DRAWS))]


@dataclass(frozen=True)
class Draw:
    """One draw of a transform on one record, and the float32 blob it makes.

    Attributes:
        name: `test` or `train-<epoch>`.
        title: how the page heads it (`TEST`, `TRAIN, epoch 0`).
        h_off, w_off, mirrored: the crop window's corner and the mirror coin.
        shape: the blob's C x H x W.
        means, minimum, maximum: the blob's per-channel means (its channel order) and range.
    """

    name: str
    title: str
    h_off: int
    w_off: int
    mirrored: bool
    shape: tuple[int, int, int]
    means: tuple[float, ...]
    minimum: float
    maximum: float


def transforms_from(
    prototxt: str | os.PathLike | None = None,
    layer: str | None = None,
    root: str | os.PathLike | None = None,
    crop_size: int = 0,
    mirror: bool = False,
    mean_file: str | os.PathLike | None = None,
    mean_value: Sequence[float] = (),
    scale: float = 1.0,
) -> Transforms | None:
    """The transforms of a net prototxt's Data layers, or of the options; None when nothing was given.

    With a prototxt, the TRAIN net's Data layer (`layer`, or its first) gives the TRAIN transform
    and the TEST net's the TEST one (the TRAIN layer's, centre-cropped, when the TEST net has no
    Data layer). The layers' sources are not opened: the served LMDBs are what is shown.

    Raises:
        PrototxtError: the prototxt cannot be read, or its TRAIN net has no such Data layer.
        TransformError, MeanError: the transform is refused (e.g. a mean file that is not a BlobProto).
    """
    if prototxt is not None:
        train_spec = _layer(prototxt, "TRAIN", layer, root)
        try:
            test_spec = _layer(prototxt, "TEST", layer, root)
        except PrototxtError:
            test_spec = train_spec
        return Transforms(train_spec.transform(phase="train"), test_spec.transform(phase="test"),
                          f"{train_spec} / {test_spec}" if test_spec is not train_spec else str(train_spec))
    if not (crop_size or mirror or mean_file is not None or len(mean_value) or scale != 1):
        return None
    options = {"crop_size": crop_size, "mirror": mirror, "mean_file": mean_file, "mean_value": tuple(mean_value),
               "scale": scale}
    train = CaffeTransform(phase="train", **options)
    described = "options: " + ", ".join(transform_param_summary(train))
    return Transforms(train, CaffeTransform(phase="test", **options), described)


def _layer(prototxt: str | os.PathLike, phase: str, layer: str | None, root: str | os.PathLike | None):
    specs = data_layers(prototxt, phase, root=root, check_files=False)
    if layer is None:
        return specs[0]
    for spec in specs:
        if spec.name == layer:
            return spec
    raise PrototxtError(f'{Path(prototxt)}: no Data layer "{layer}" in the {phase} net')


def _transform_of(transforms: Transforms, name: str) -> tuple[CaffeTransform, int, str]:
    """The transform, epoch and title of a draw name (`test`, `train-2`).

    Raises:
        KeyError: not a draw the page shows.
    """
    if name == "test":
        return transforms.test, 0, "TEST"
    if name in transforms.names():
        epoch = int(name.removeprefix("train-"))
        return transforms.train, epoch, f"TRAIN, epoch {epoch}"
    raise KeyError(name)


def draw(transforms: Transforms, name: str, pixels: np.ndarray, index: int) -> Draw:
    """Draw `name` of the record at `index` (C x H x W pixels in Datum order) and the blob it makes.

    Raises:
        KeyError: `name` is not one of `transforms.names()`.
        TransformError: Caffe's CHECKs refuse the record (smaller than the crop, another size than the mean).
    """
    transform, epoch, title = _transform_of(transforms, name)
    channels, height, width = pixels.shape
    transform.check_shape(channels, height, width)
    h_off, w_off, mirrored = transform.params(height, width, LOADER_SEED, epoch, index)
    blob = np.empty(transform.output_shape(channels, height, width), np.float32)
    transform.transform_into(pixels, blob, h_off, w_off, mirrored)
    means = tuple(float(m) for m in blob.reshape(blob.shape[0], -1).mean(axis=1, dtype=np.float64))
    return Draw(name, title, h_off, w_off, bool(mirrored), blob.shape, means, float(blob.min()), float(blob.max()))


def draw_picture(transforms: Transforms, name: str, pixels: np.ndarray, index: int) -> Image.Image:
    """The crop window of draw `name`, mirrored when it is: the record's own pixels the net is fed, as an image.

    Raises:
        KeyError, TransformError: as `draw`.
    """
    found = draw(transforms, name, pixels, index)
    _, out_h, out_w = found.shape
    window = pixels[:, found.h_off:found.h_off + out_h, found.w_off:found.w_off + out_w]
    if found.mirrored:
        window = window[:, :, ::-1]
    if window.dtype != np.uint8:  # float records: shown clipped, as the datasets show them
        window = np.clip(window, 0, 255).astype(np.uint8)
    channels = window.shape[0]
    if channels not in (1, 3, 4):
        window, channels = window[:1], 1
    return planes_to_image(np.ascontiguousarray(window).tobytes(), channels, out_h, out_w).convert("RGB")
