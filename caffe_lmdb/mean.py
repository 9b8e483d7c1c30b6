"""Caffe's `compute_image_mean`: the per-pixel mean of an LMDB as a `mean.binaryproto`, and reading one back.

A Caffe model trained with `transform_param { mean_file: "mean.binaryproto" }` subtracts this
blob from every input, so it must be what Caffe's own tool writes: a `BlobProto` with the legacy
`num=1, channels, height, width` fields (no `shape`) and `data` = the float mean of every pixel,
C x H x W in Datum order (BGR for colour, because raw Datums are BGR). Encoded records are decoded
to the same BGR planes first, as Caffe's `DecodeDatumNative` does. Sums are kept in float64, so
the mean does not drift on big LMDBs (Caffe sums in float32; on uint8 records the two agree
exactly below 65,793 records, where every per-pixel sum is an integer float32 holds). The
per-channel values printed are computed as Caffe computes them, in float32 (`caffe_lines`).

Memory stays a small multiple of one record, whatever its size: uint8 pixels are added into the
float64 sum in place, straight from the memory map, and their squares summed in blocks (integer
sums, so exact in any order: the result is bit for bit what a float64 copy of the record gives);
the mean file is serialized from the array, never from a Python list of its values.

The same pass also gives per-channel statistics in RGB order scaled to [0, 1], the form
`torchvision.transforms.Normalize(mean, std)` expects for the tensors `LmdbDataset_train` returns.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from .datum import datum_to_array, encode_varint, image_plane_order, parse_datum_view
from .errors import DatumError, MeanError, describe_os_error
from .files import TMP_MARK, output_target_kind, write_bytes_atomic, write_text_atomic
from .progress import progress_bar
from .proto import caffe_pb2
from .tool_reading import format_key, format_shape, iter_values, read_txn

#: The channel order `MeanResult.normalize_stats` reports, by channel count.
_IMAGE_ORDER_NAMES = {1: "L", 3: "RGB", 4: "RGBA"}

#: Pixels per plane squared at once for uint8 records: a 3-plane block is 1.5 MiB of float64.
_SQUARE_BLOCK = 1 << 16


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
        """One mean per Datum plane (BGR order for colour), 0..255, in float64."""
        return self.mean.mean(axis=(1, 2))

    @property
    def caffe_channel_mean(self) -> np.ndarray:
        """The per-channel means `compute_image_mean` prints, computed as it computes them.

        Caffe adds up the float32 mean blob one value at a time in a float32 accumulator per
        channel, then divides by H*W in float32, so its last printed digit can differ from
        the float64 `channel_mean`.
        """
        channels, height, width = self.mean.shape
        planes = self.mean.reshape(channels, height * width)
        sums = np.zeros(channels, np.float32)
        for start in range(0, planes.shape[1], _SQUARE_BLOCK):  # blocks: a few MiB, whatever the mean's size
            block = planes[:, start:start + _SQUARE_BLOCK].astype(np.float32)
            block[:, 0] += sums
            sums = np.add.accumulate(block, axis=1)[:, -1]  # one value at a time, as Caffe's loop (not pairwise)
        return sums / np.float32(height * width)

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
        """What Caffe's `compute_image_mean` logs at the end: the channel count, then one mean per channel.

        The values are `caffe_channel_mean`, printed as C++'s `ostream << float` does (6
        significant digits, `%g`).
        """
        lines = [f"Number of channels: {self.mean.shape[0]}"]
        lines += [f"mean_value channel [{c}]: {float(value):g}" for c, value in enumerate(self.caffe_channel_mean)]
        return lines

    def __str__(self) -> str:
        return "\n".join([f"{self.path}: mean of {self.count} records, {format_shape(self.mean.shape)}",
                          *self.caffe_lines()])


def lmdb_mean(lmdb_path: str | os.PathLike, progress: bool | None = None) -> MeanResult:
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
                planes = datum_to_array(parse_datum_view(value), copy=False)
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
            _accumulate(total, squares, planes)
            count += 1
            bar.update()
    if total is None or squares is None:
        raise MeanError(f"{path}: the LMDB has no records to average")
    total /= count  # in place: the sum becomes the mean, with no second array of its size
    mean = total
    pixels = count * mean.shape[1] * mean.shape[2]
    channel_mean = mean.mean(axis=(1, 2))
    variance = np.maximum(squares / pixels - channel_mean**2, 0.0)  # rounding can dip just below 0
    return MeanResult(path=path, mean=mean, channel_std=np.sqrt(variance), count=count)


def _accumulate(total: np.ndarray, squares: np.ndarray, planes: np.ndarray) -> None:
    """Add one record's pixels to the per-pixel sums and their squares to the per-plane sums, in place.

    Both come out bit for bit as adding a float64 copy of the record and the einsum of that copy's
    squares did, without that copy (8 bytes a pixel, 8 times the record) for uint8
    pixels: the in-place add converts each value exactly, and a plane's sum of squares is an
    integer below 2**53 (for planes up to 1.4e11 pixels), which float64 sums exactly in any blocks.
    Float pixels keep the copy: their squares round, so the order of summing is part of the result.
    """
    np.add(total, planes, out=total)
    flat = planes.reshape(planes.shape[0], -1)
    if planes.dtype == np.uint8:
        record = np.zeros(flat.shape[0], np.float64)
        for start in range(0, flat.shape[1], _SQUARE_BLOCK):
            block = flat[:, start:start + _SQUARE_BLOCK].astype(np.float64)
            record += np.einsum("ij,ij->i", block, block)
        squares += record
    else:
        values = flat.astype(np.float64)
        squares += np.einsum("ij,ij->i", values, values)


# --------------------------------------------------------------------------- mean.binaryproto

def _mean_to_blob(mean: np.ndarray) -> caffe_pb2.BlobProto:
    """A C x H x W mean as the `BlobProto` Caffe writes: legacy num=1/channels/height/width, float data."""
    blob = caffe_pb2.BlobProto()
    blob.ParseFromString(mean_blob_bytes(mean))  # parsing packed floats is C; extending from a list is not
    return blob


def mean_blob_bytes(mean: np.ndarray) -> bytearray:
    """The serialized `BlobProto` of a C x H x W mean: byte for byte what protobuf writes for `_mean_to_blob`.

    Built straight from the array (fields 1-4, then `data` packed as little-endian float32), so a
    50-megapixel mean costs its float32 bytes once, not a Python float object per value.
    """
    mean = np.asarray(mean)
    if mean.ndim != 3:
        raise MeanError(f"a mean image must be C x H x W, got shape {mean.shape}")
    channels, height, width = mean.shape
    head = b"".join((b"\x08\x01\x10", encode_varint(channels), b"\x18", encode_varint(height),
                     b"\x20", encode_varint(width), b"\x2a", encode_varint(4 * mean.size)))
    out = bytearray(len(head) + 4 * mean.size)
    out[:len(head)] = head
    np.frombuffer(out, dtype="<f4", offset=len(head)).reshape(mean.shape)[...] = mean  # the float32 cast astype does
    return out


def save_mean(path: str | os.PathLike, mean: np.ndarray) -> Path:
    """Write a C x H x W mean to `path` as Caffe's `mean.binaryproto`, whole or not at all.

    The file is built under a temporary name beside `path` and renamed into place, so a full disk
    or a crash leaves the old file (or none), never a truncated blob Caffe would fail to load.

    Returns:
        The path written.

    Raises:
        MeanError: the file cannot be written (the message names it and says why).
    """
    path = Path(path)
    data = mean_blob_bytes(mean)
    try:
        write_bytes_atomic(path, data)
    except OSError as exc:
        raise MeanError(_write_failure(exc, path)) from None
    return path


def _write_failure(exc: OSError, path: Path) -> str:
    """`PATH: no space left on device`, naming the output even when the error names our temporary."""
    if exc.filename is not None and TMP_MARK in os.fsdecode(exc.filename):
        exc = OSError(exc.errno, exc.strerror)
    return describe_os_error(exc, path)


def blob_to_array(blob: caffe_pb2.BlobProto, diff: bool = False) -> np.ndarray:
    """A BlobProto's values shaped as pycaffe's `caffe.io.blobproto_to_array` shapes them.

    The legacy `num, channels, height, width` fields give a 4-D array when any of them is set
    (a mean file: 1 x C x H x W); otherwise `shape.dim` does, so a blob with neither is a 0-d
    array when it holds one value (a scalar) and an error otherwise. Values are float64, as
    pycaffe's `np.array(blob.data)`; `diff=True` reads `diff` instead.

    Raises:
        MeanError: the values do not fill the shape (pycaffe raises numpy's ValueError).
    """
    values = np.asarray(blob.diff if diff else blob.data, dtype=np.float64)
    if any(blob.HasField(name) for name in ("num", "channels", "height", "width")):
        shape: tuple[int, ...] = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(int(d) for d in blob.shape.dim)
    if values.size != int(np.prod(shape, dtype=np.int64)):
        raise MeanError(f"blob shape {shape} does not match its {values.size} values")
    return values.reshape(shape)


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


def compute_mean(
    lmdb_path: str | os.PathLike,
    output: str | os.PathLike,
    json_path: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> MeanResult:
    """Compute an LMDB's mean and write `mean.binaryproto` (and, if asked, the Normalize stats as JSON).

    What `caffe-lmdb mean` runs. Nothing is written unless the whole LMDB was averaged, and each
    file is written whole or not at all; if the JSON cannot be written, a mean file this run
    created is removed again (one it replaced holds the new, correct mean).

    Args:
        lmdb_path: the LMDB.
        output: where to write the mean blob (Caffe's `mean.binaryproto`).
        json_path: where to write `MeanResult.normalize_stats()` as JSON; None writes none.
        progress: show a progress bar (default: when stderr is a terminal).

    Raises:
        As `lmdb_mean`; MeanError: an output cannot be written (names the file, e.g. a full disk);
        OutputPathError: an output is a folder or a special file other than a FIFO or character
            device (refused before the LMDB is read; see `files.write_bytes_atomic`).
    """
    for target in (output, json_path):
        if target is not None:
            output_target_kind(target)
    result = lmdb_mean(lmdb_path, progress=progress)
    output = Path(output)
    existed = os.path.lexists(output)
    save_mean(output, result.mean)
    if json_path is not None:
        json_path = Path(json_path)
        try:
            write_text_atomic(json_path, json.dumps(result.normalize_stats(), indent=2) + "\n")
        except OSError as exc:
            if not existed:  # the run failed: take back the mean file it created, so nothing looks done
                with contextlib.suppress(OSError):
                    output.unlink()
            raise MeanError(_write_failure(exc, json_path)) from None
    return result
