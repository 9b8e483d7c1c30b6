"""Caffe's `compute_image_mean`: the per-pixel mean of an LMDB as a `mean.binaryproto`, and reading one back.

A Caffe model trained with `transform_param { mean_file: "mean.binaryproto" }` subtracts this
blob from every input, so it must be what Caffe's own tool writes: a `BlobProto` with the legacy
`num=1, channels, height, width` fields (no `shape`) and `data` = the float mean of every pixel,
C x H x W in Datum order (BGR for colour, because raw Datums are BGR). Encoded records are decoded
to the same BGR planes first, as Caffe's `DecodeDatumNative` does. Sums are kept in float64, so
the mean does not drift on big LMDBs (Caffe sums in float32).

The same pass also gives per-channel statistics in RGB order scaled to [0, 1], the form
`torchvision.transforms.Normalize(mean, std)` expects for the tensors `LmdbDataset_train` returns.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from .datum import datum_to_array, image_plane_order, parse_datum_view
from .errors import CaffeLmdbError, DatumError
from .proto import caffe_pb2
from .records import format_key, format_shape, iter_values, read_txn
from .writer import progress_bar

#: The channel order `MeanResult.normalize_stats` reports, by channel count.
_IMAGE_ORDER_NAMES = {1: "L", 3: "RGB", 4: "RGBA"}


class MeanError(CaffeLmdbError, ValueError):
    """The mean cannot be computed (records of differing sizes, an empty LMDB) or a mean file is unreadable."""


@dataclass
class MeanResult:
    """The mean image of an LMDB and its per-channel statistics.

    Attributes:
        path: the LMDB.
        mean: float64 C x H x W, the per-pixel mean in Datum order (BGR for colour), 0..255.
        channel_std: float64, one population standard deviation per Datum plane (over every
            pixel of every record), 0..255.
        count: records averaged.
    """

    path: Path
    mean: np.ndarray
    channel_std: np.ndarray
    count: int

    @property
    def channel_mean(self) -> np.ndarray:
        """One mean per Datum plane (BGR order for colour), 0..255: the values Caffe prints."""
        return self.mean.mean(axis=(1, 2))

    def normalize_stats(self) -> dict[str, Any]:
        """Per-channel mean and std in image order (RGB), scaled to [0, 1], plus what they describe.

        Ready for `torchvision.transforms.Normalize(stats["mean"], stats["std"])` on tensors made
        by `ToTensor()`-style scaling of the RGB images the dataset returns.
        """
        channels, height, width = self.mean.shape
        order = image_plane_order(channels)
        return {
            "lmdb": str(self.path),
            "records": self.count,
            "channels": channels,
            "height": height,
            "width": width,
            "channel_order": _IMAGE_ORDER_NAMES.get(channels, "Datum planes"),
            "mean": [float(v) / 255 for v in self.channel_mean[order]],
            "std": [float(v) / 255 for v in self.channel_std[order]],
            "caffe_mean_values": [float(v) for v in self.channel_mean],
        }

    def caffe_lines(self) -> list[str]:
        """What Caffe's `compute_image_mean` logs at the end: the channel count, then one mean per channel."""
        lines = [f"Number of channels: {self.mean.shape[0]}"]
        lines += [f"mean_value channel [{c}]: {value:g}" for c, value in enumerate(self.channel_mean)]
        return lines

    def __str__(self) -> str:
        return "\n".join([f"{self.path}: mean of {self.count} records, {format_shape(self.mean.shape)}",
                          *self.caffe_lines()])


def compute_mean(lmdb_path: str | os.PathLike, progress: bool | None = None) -> MeanResult:
    """The per-pixel mean of every record of an LMDB, as Caffe's `compute_image_mean` computes it.

    Records are read in key order (Caffe's cursor order); raw ones are summed straight from the
    memory map, encoded ones decoded to BGR planes first, float ones summed as floats.

    Args:
        lmdb_path: the LMDB.
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        The mean image and per-channel statistics.

    Raises:
        LmdbFormatError: the path is not an LMDB.
        DatumError: a record is not a valid Datum or its image does not decode (names the key).
        MeanError: the LMDB is empty, or a record's size differs from the first record's (names
            both keys). Caffe only checks that C*H*W agree, which lets a 5x7 and a 7x5 image be
            averaged pixel by pixel; this requires equal channels, height and width.
    """
    path = Path(lmdb_path)
    total: np.ndarray | None = None
    squares: np.ndarray | None = None
    first_key = b""
    count = 0
    with read_txn(path, readahead=True) as txn, progress_bar(txn.stat()["entries"], path.name, progress) as bar:
        for key, value in iter_values(txn):
            try:
                planes = datum_to_array(parse_datum_view(value))
            except DatumError as exc:
                raise DatumError(f"{path}: {format_key(key)}: {exc}") from None
            if total is None:
                total = np.zeros(planes.shape, np.float64)
                squares = np.zeros(planes.shape[0], np.float64)
                first_key = key
            elif planes.shape != total.shape:
                raise MeanError(
                    f"{path}: {format_key(key)}: size {format_shape(planes.shape)} differs from the first record's "
                    f"{format_shape(total.shape)} ({format_key(first_key)}); a mean image needs every record the same "
                    f"size (convert with --resize_height and --resize_width)"
                )
            values = planes.astype(np.float64)
            total += values
            flat = values.reshape(values.shape[0], -1)
            squares += np.einsum("ij,ij->i", flat, flat)
            count += 1
            bar.update()
    if total is None or squares is None:
        raise MeanError(f"{path}: the LMDB has no records to average")
    mean = total / count
    pixels = count * mean.shape[1] * mean.shape[2]
    channel_mean = mean.mean(axis=(1, 2))
    variance = np.maximum(squares / pixels - channel_mean**2, 0.0)  # rounding can dip just below 0
    return MeanResult(path=path, mean=mean, channel_std=np.sqrt(variance), count=count)


# --------------------------------------------------------------------------- mean.binaryproto

def mean_to_blob(mean: np.ndarray) -> caffe_pb2.BlobProto:
    """A C x H x W mean as the `BlobProto` Caffe writes: legacy num=1/channels/height/width, float data."""
    mean = np.asarray(mean)
    if mean.ndim != 3:
        raise MeanError(f"a mean image must be C x H x W, got shape {mean.shape}")
    channels, height, width = mean.shape
    blob = caffe_pb2.BlobProto(num=1, channels=channels, height=height, width=width)
    blob.data.extend(mean.astype(np.float32).ravel().tolist())
    return blob


def save_mean(path: str | os.PathLike, mean: np.ndarray) -> Path:
    """Write a C x H x W mean to `path` as Caffe's `mean.binaryproto`.

    Returns:
        The path written.
    """
    path = Path(path)
    path.write_bytes(mean_to_blob(mean).SerializeToString())
    return path


def load_mean(path: str | os.PathLike) -> np.ndarray:
    """Load a Caffe `mean.binaryproto` (from `compute_image_mean`, this module, or any Caffe tool).

    Both blob layouts are read: the legacy `num, channels, height, width` fields and the newer
    `shape`; values come from `data` (float) or `double_data`. A 4-D blob with num=1, which is
    what every mean file holds, is returned as C x H x W, in the file's channel order (BGR for
    Caffe colour means).

    Returns:
        float32 array (float64 for `double_data`), C x H x W for mean files, else the blob's shape.

    Raises:
        MeanError: the file is missing, not a BlobProto, or its data does not fill its shape.
    """
    path = Path(path)
    if not path.is_file():
        raise MeanError(f"{path}: mean file not found")
    blob = caffe_pb2.BlobProto()
    try:
        blob.ParseFromString(path.read_bytes())
    except DecodeError as exc:
        raise MeanError(f"{path}: not a Caffe BlobProto ({exc})") from None
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
    values = np.asarray(blob.data, np.float32) if len(blob.data) else np.asarray(blob.double_data, np.float64)
    if not shape or any(d <= 0 for d in shape) or values.size != int(np.prod(shape)):
        raise MeanError(f"{path}: blob shape {shape} does not match its {values.size} values (not a mean file?)")
    array = values.reshape(shape)
    return array[0] if array.ndim == 4 and shape[0] == 1 else array


def image_mean(
    lmdb_path: str | os.PathLike,
    output: str | os.PathLike,
    json_path: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> MeanResult:
    """Compute an LMDB's mean and write `mean.binaryproto` (and, if asked, the Normalize stats as JSON).

    What `caffe-lmdb mean` runs. Nothing is written unless the whole LMDB was averaged.

    Args:
        lmdb_path: the LMDB.
        output: where to write the mean blob (Caffe's `mean.binaryproto`).
        json_path: where to write `MeanResult.normalize_stats()` as JSON; None writes none.
        progress: show a progress bar (default: when stderr is a terminal).

    Raises:
        As `compute_mean`.
    """
    result = compute_mean(lmdb_path, progress=progress)
    save_mean(output, result.mean)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result.normalize_stats(), indent=2) + "\n", encoding="utf-8")
    return result
