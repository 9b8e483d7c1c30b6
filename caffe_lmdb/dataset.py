"""The PyTorch side: `LmdbDataset_train`, a map-style Dataset over one Caffe Datum LMDB, new or legacy.

It reads the LMDB through a `reader.LmdbReader` (keys, identity check, an environment per process,
prefetch: `caffe_lmdb.reader` says why each is built as it is). Values are read with
`buffers=True` and parsed by `datum.parse_datum_view`, so the pixels are copied once, from the
memory map into the image, tensor or array returned.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import lmdb
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .datum import DECODE_MODES, DatumView, datum_to_image, datum_to_image_array, parse_datum_view
from .errors import DatumError, KeysFileError
from .keys import save_keys
from .reader import LmdbReader, PartIndex
from .safe_lmdb import get_value
from .shards import find_shards
from .tool_reading import keys_file_for

Target = Literal["label", "float", "both"]
Output = Literal["pil", "tensor", "numpy"]

_TARGETS = ("label", "float", "both")
_OUTPUTS = ("pil", "tensor", "numpy")

class LmdbDataset_train(Dataset[tuple[Any, Any]]):
    """Images and labels from a Caffe Datum LMDB, in key order, for `torch.utils.data.DataLoader`.

    Works on LMDBs written by caffe-lmdb (with a `.npy` keys file) and on legacy LMDBs written by
    Caffe's own `convert_imageset` (no keys file: the keys are scanned from the LMDB, which reads
    keys only). Several LMDBs train as one with `ds1 + ds2 + ...` (torch's `ConcatDataset`).

    Each item is `(image, target)`. Raw records become an RGB image rebuilt from their planar BGR
    channels (an `L` image for one channel), encoded records are decoded with Pillow, and float
    records (pixels in `float_data`) keep their values in the tensor and numpy outputs (the PIL
    output clips them to 0..255).

    Args:
        lmdb_path: the LMDB: a directory holding `data.mdb` (what Caffe writes) or a single file.
        transform: called on each image (a PIL image, tensor or array, as `output` says). A
            transform with an `indexed_record` method (`RandomResizedCrop`, `ResizeCenterCrop`) is
            handed the record and its index instead, and decodes it itself (`output` and `mode`
            do not apply): the draws and pixels `CaffeLoader` gives the same index.
        keys_path: the `.npy` keys file written with the LMDB. None scans the keys from the LMDB
            at construction; `save_keys` writes them out so the next run can skip the scan.
        target: what the second item is: "label", the Datum's int `label`; "float", its
            `float_data` as a 1-D float32 tensor (multi-label or regression targets stored with
            the image); "both", a `(label, float_data)` tuple. A float record's `float_data` is
            its pixels, not targets, so asking it for "float" raises `DatumError`.
        target_transform: called on each target.
        output: "pil" for a PIL image; "tensor" for a C x H x W uint8 `torch.Tensor` in RGB
            order, built straight from the planar record (no PIL, no H x W x C round trip);
            "numpy" for the same as a numpy array.
        mode: a Pillow mode for every image, or Caffe's names "color" / "gray". What each gives
            (`datum.datum_to_image` has the details):
            None: raw records keep their channels (1 -> L, 3 -> RGB); encoded records decode to
            L for gray files (L, LA, 1-bit, 16-bit gray) and RGB for all others (alpha dropped,
            16-bit scaled to 8 bits).
            "color" (= "RGB"): always 3 channels, what Caffe's data layer gives with
            `force_color` (`DecodeDatumToCVMat(datum, true)`); gray records and files become
            three equal channels, so that an LMDB of mixed records collates into one batch.
            "gray" (= "L"): always 1 channel; encoded records decode as OpenCV's
            `IMREAD_GRAYSCALE` (Caffe's `force_gray`); raw colour records use Pillow's L formula
            (Caffe never converts raw records).
        readahead: let the OS read ahead around each record. None (default) decides from the
            first record's size: on for records of `READAHEAD_MIN_BYTES` or more (a cold raw
            256x256 record spans 48 pages, each its own synchronous page fault without
            readahead: far slower on an LMDB bigger than RAM; docs/benchmarks.md), off for small
            records read at random (readahead would read neighbours nobody asked for). Datasets
            over one LMDB share one environment per process, so the first to open it sets this.
            Warm-cache speed is the same either way.
        prefetch: when the DataLoader asks for a whole batch (`__getitems__`), first tell the
            kernel about every record of the batch (`posix_fadvise(WILLNEED)` on their byte
            ranges), so that a cold batch is read with many IOs in flight instead of one page
            fault at a time.

    Raises:
        LmdbFormatError: `lmdb_path` is missing or is not an LMDB; on a later read, the LMDB was
            replaced since the dataset was created.
        CorruptLmdbError: the LMDB is truncated or damaged (here or on a later read), naming the
            LMDB and the key.
        KeysFileError: `keys_path` is missing, pickled or not a 1-D bytes/str array.
        ValueError: `target`, `output` or `mode` is not one of the values above.
    """

    def __init__(
        self,
        lmdb_path: str | os.PathLike,
        transform: Callable[[Any], Any] | None = None,
        keys_path: str | os.PathLike | None = None,
        *,
        target: Target = "label",
        target_transform: Callable[[Any], Any] | None = None,
        output: Output = "pil",
        mode: str | None = None,
        readahead: bool | None = None,
        prefetch: bool = True,
    ) -> None:
        if target not in _TARGETS:
            raise ValueError(f"target must be one of {', '.join(map(repr, _TARGETS))}, got {target!r}")
        if output not in _OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(map(repr, _OUTPUTS))}, got {output!r}")
        if mode is not None and mode not in Image.MODES and mode not in DECODE_MODES:
            raise ValueError(
                f"mode must be None or a Pillow mode such as 'RGB' or 'L' (or Caffe's 'color', 'gray'), got {mode!r}"
            )
        #: The LMDB's reader: keys, this process's environment, prefetch.
        self.reader = LmdbReader(lmdb_path, keys_path, readahead=readahead, stacklevel=3)
        self.transform = transform
        self.target_transform = target_transform
        self.target = target
        self.output = output
        self.mode = mode
        self.prefetch = prefetch

    @property
    def root(self) -> str:
        """The LMDB's path, as given."""
        return self.reader.root

    @property
    def keys_path(self) -> str | None:
        """The keys file, None when the keys were scanned from the LMDB."""
        return self.reader.keys_path

    @property
    def encoded(self) -> bool | None:
        """Whether the first record is encoded (None: empty LMDB, or not a Datum), shown by repr."""
        return self.reader.encoded

    @property
    def readahead(self) -> bool:
        """Whether the OS reads ahead around each record (see the `readahead` argument)."""
        return self.reader.readahead

    @property
    def keys(self) -> np.ndarray:
        """The record keys in dataset order, a numpy bytes (`S`) array (index i reads key i)."""
        return self.reader.keys

    def save_keys(self, path: str | os.PathLike) -> Path:
        """Write this dataset's keys to a `.npy` keys file, so that the next run skips the scan.

        Use it once on a legacy LMDB, then pass the file as `keys_path`:
        `LmdbDataset_train(lmdb_path, transform, saved_keys)`.

        Returns:
            The path written.
        """
        return save_keys(path, self.reader.keys)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """Read, decode and transform record `index` (negative indices count from the end).

        Raises:
            IndexError: `index` is out of range.
            KeysFileError: the key is not in the LMDB.
            DatumError: the value is not a Datum, its data size disagrees with its dims, or its
                encoded payload cannot be decoded.
        """
        key = self.reader.key_at(index)
        indexed = getattr(self.transform, "indexed_record", None)  # RandomResizedCrop, ResizeCenterCrop
        with self.reader.environment().begin(buffers=True) as txn:
            value = get_value(txn, key, self.root)
            if value is None:
                raise KeysFileError(f"{self.root}: key {bytes(key)!r} is not in the LMDB ({self.reader.keys_origin()})")
            try:
                view = parse_datum_view(value)
                # an indexed transform takes the record itself, and its index for the draws: CaffeLoader's
                # samples; otherwise the pixels are copied out of the memory map here
                image = self._image(view) if indexed is None else indexed(view, index % len(self))
                target = self._target(view)
            except DatumError as exc:
                raise DatumError(f"{self.root}: key {bytes(key)!r}: {exc}") from None
        if self.transform is not None and indexed is None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, Any]]:
        """A whole batch (the DataLoader's fetcher calls this): prefetch every record, then read each."""
        if self.prefetch and len(indices) > 1:
            self.prefetch_records(indices)
        return [self[i] for i in indices]

    def environment(self) -> lmdb.Environment:
        """This process's read-only environment of the LMDB (`LmdbReader.environment`).

        For readers that take records straight from the memory map (`CaffeLoader`'s workers):
        the handle is checked against the keys the dataset was created with, as `__getitem__` does.
        """
        return self.reader.environment()

    def prefetch_records(self, indices: Sequence[int]) -> None:
        """Ask the kernel to read these records now, all at once (`LmdbReader.prefetch_records`)."""
        self.reader.prefetch_records(indices)

    def prefetch_values(self, values: Sequence[Any]) -> None:
        """`prefetch_records` for records already looked up (`LmdbReader.prefetch_values`)."""
        self.reader.prefetch_values(values)

    def _image(self, view: DatumView) -> Any:
        if self.output == "pil":
            return datum_to_image(view, self.mode)
        array = datum_to_image_array(view, self.mode)
        return torch.from_numpy(array) if self.output == "tensor" else array

    def _target(self, view: DatumView) -> Any:
        if self.target == "label":
            return view.label
        if not view.encoded and not view.data:
            raise DatumError("float_data holds this float datum's pixels, not targets (use target='label')")
        floats = torch.from_numpy(view.float_data)
        return floats if self.target == "float" else (view.label, floats)

    def __add__(self, other: Dataset) -> LmdbConcatDataset:
        """`ds1 + ds2`: torch's ConcatDataset semantics, with batch prefetch kept (`LmdbConcatDataset`)."""
        return LmdbConcatDataset([self, other])

    def extra_repr(self) -> str:
        """The lines of `repr` after the location, as torchvision's `VisionDataset.extra_repr`."""
        keys = self.keys_path if self.keys_path is not None else "None (keys scanned from the LMDB)"
        encoded = "unknown" if self.encoded is None else str(self.encoded)
        lines = [f"Keys file: {keys}", f"Encoded: {encoded} (first record)", f"Output: {self.output}"]
        if self.mode is not None:
            lines.append(f"Mode: {self.mode}")
        lines.append(f"Target: {self.target}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        body = [f"Number of datapoints: {len(self)}", f"Root location: {self.root}"]
        body += self.extra_repr().splitlines()
        for head, transform in (("Transform: ", self.transform), ("Target transform: ", self.target_transform)):
            if transform is not None:
                first, *rest = repr(transform).splitlines() or [""]
                body.append(head + first)
                body += [" " * len(head) + line for line in rest]
        return "\n".join([f"Dataset {type(self).__name__}"] + ["    " + line for line in body])


def open_shards(
    shards: str | os.PathLike | list[str | os.PathLike],
    transform: Callable[[Any], Any] | None = None,
    **kwargs: Any,
) -> torch.utils.data.ConcatDataset:
    """Open shard LMDBs (a glob such as `"train-*-of-00008.lmdb"`, a folder of them, or a list) as one dataset.

    Each shard's keys file is found beside it (`<shard>_keys.npy`; scanned when absent), and the
    shards are concatenated in name order with `+` (torch's `ConcatDataset`), so index i is the
    i-th record of the unsharded conversion. `kwargs` go to every `LmdbDataset_train`.
    """

    parts = [LmdbDataset_train(path, transform, keys_file_for(path), **kwargs) for path in find_shards(shards)]
    return LmdbConcatDataset(parts)


class LmdbConcatDataset(torch.utils.data.ConcatDataset):
    """torch's `ConcatDataset` (same `len` and indexing) that keeps batch prefetch across LMDBs.

    `ds1 + ds2` builds one of these. The DataLoader hands a whole batch to `__getitems__`; the
    batch is split by part, so each LMDB prefetches its own records, and reassembled in order.
    """

    def __init__(self, datasets: Iterable[torch.utils.data.Dataset]) -> None:
        super().__init__(datasets)
        #: Where an index lies among the parts (`reader.PartIndex`, as `CaffeLoader` locates them).
        self.parts = PartIndex([len(dataset) for dataset in self.datasets])

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, Any]]:
        count = len(self)
        out: list[Any] = [None] * len(indices)
        wanted = [index + count if index < 0 else index for index in indices]
        for part, positions, locals_, _ in self.parts.group(wanted):
            dataset = self.datasets[part]
            values = dataset.__getitems__(locals_) if hasattr(dataset, "__getitems__") else \
                [dataset[local] for local in locals_]
            for position, value in zip(positions, values, strict=True):
                out[position] = value
        return out

    def __add__(self, other: torch.utils.data.Dataset) -> LmdbConcatDataset:
        return LmdbConcatDataset([self, other])
