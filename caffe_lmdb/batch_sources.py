"""Where `CaffeLoader`'s samples come from: one record source per part (LMDB) of the loader's source.

A batch is made part by part (`BatchMaker.fill`); each part reads its samples as
`(key, label, C x H x W pixels in Datum order)` through its source, and the crop, mirror and mean
are the same code for all. Two kinds:

* `DatumSource`: Caffe Datum records, one per key (an `LmdbDataset_train`, or an `LmdbDataset` of
  the datum layout): each record parsed in place on the memory map, raw uint8 records of the
  part's first shape read through `RawRecordLayout` without a full parse (the fast path).
* `LayoutSource`: any other image layout of an `LmdbDataset` whose target is an int label
  (tensorpack, folder2lmdb, Caffe2, ...): a sample's values go through `Layout.stored`; its
  encoded bytes are decoded as an encoded Datum holding them would be (the transform's
  `record_pixels`: `force_color`/`force_gray`), stored pixels become Datum-order planes (BGR for
  colour). So the same images give the same batches, byte for byte, whichever LMDB holds them.

Every error names the LMDB, the key and the dataset index (`named_error`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from .datum import DatumView, RawRecordLayout, parse_datum_view
from .errors import CaffeLmdbError, DatumError, InputError, KeysFileError, LoaderError
from .layout_datum import DatumLayout
from .layouts import ValueAtError
from .safe_lmdb import get_value

#: A record's value not looked up yet (`DatumSource.read` looks it up itself).
LOOK_UP = object()

#: A sample as a source gives it: (key, label, C x H x W pixels in Datum order).
Record = tuple[Any, int, np.ndarray]


class RecordReader(Protocol):
    """What a source needs of the batch maker: how a record decodes and what shape a sample must have.

    `decode(view)` gives a Datum's C x H x W pixels as the loader's transform reads them;
    `check(pixels)` refuses pixels that do not make a sample of the batch's shape;
    `raw_fast_path` says raw records may skip the full parse.
    """

    raw_fast_path: bool

    def decode(self, view: DatumView) -> np.ndarray: ...

    def check(self, pixels: np.ndarray) -> None: ...


class DatumSource:
    """A part of Caffe Datum records, one per key: today's Datum path, with the raw fast path.

    Args:
        dataset: the part (`LmdbDataset_train`, or an `LmdbDataset` of the datum layout); its
            `root` and `reader` (environment, prefetch) are used.
        keys: the record keys, in index order.
        prefetch: look a batch's keys up first and ask the kernel for all their pages at once.
    """

    def __init__(self, dataset: Any, keys: np.ndarray, prefetch: bool) -> None:
        self.dataset = dataset
        self.keys = keys
        self.prefetch = prefetch
        self.raw: RawRecordLayout | None = None  # the layout of the part's raw records, once seen

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "raw": None}

    def __len__(self) -> int:
        return len(self.keys)

    def key(self, local: int) -> bytes:
        """The (first) key of sample `local`, for messages."""
        return bytes(self.keys[local])

    def first_pixels(self, txn: Any, reader: RecordReader) -> tuple[Any, Callable[[], np.ndarray]]:
        """(key, a call giving the pixels) of the part's first sample; a missing key is a KeysFileError."""
        key = self.keys[0]
        value = get_value(txn, key, self.dataset.root)
        if value is None:
            raise KeysFileError(f"{self.dataset.root}: key {bytes(key)!r} is not in the LMDB")
        return key, lambda: reader.decode(parse_datum_view(value))

    def records(self, txn: Any, locals_: list[int], indices: list[int], reader: RecordReader) -> list[Record]:
        """The samples `locals_` of this part (dataset indices `indices`), every key looked up once."""
        keys = [self.keys[local] for local in locals_]
        if self.prefetch and len(locals_) > 1:  # every key looked up (once) before any record is read
            values = [get_value(txn, key, self.dataset.root) for key in keys]
            self.dataset.reader.prefetch_values(values)
        else:
            values = [LOOK_UP] * len(keys)
        return [self.read(txn, key, value, index, reader)
                for key, value, index in zip(keys, values, indices, strict=True)]

    def read(self, txn: Any, key: Any, value: Any, index: int, reader: RecordReader) -> Record:
        """(key, label, C x H x W pixels) of one record: a view on the memory map, or decoded.

        Raw uint8 records of the shape the part's first one had are read through its
        `RawRecordLayout` (no full parse, no repeated checks); any other record is parsed and
        checked in full.
        """
        dataset = self.dataset
        if value is LOOK_UP:
            value = get_value(txn, key, dataset.root)  # names the LMDB and the key itself
        if value is None:
            raise KeysFileError(f"{dataset.root}: key {bytes(key)!r} (index {index}) is not in the LMDB")
        layout = self.raw
        if layout is not None:
            hit = layout.read(value)
            if hit is not None:
                return key, hit[1], np.frombuffer(hit[0], np.uint8).reshape(layout.shape)
        try:
            view = parse_datum_view(value)
            pixels = reader.decode(view)
            reader.check(pixels)
        except Exception as exc:
            raise named_error(exc, dataset, key, index) from error_cause(exc)
        if layout is None and reader.raw_fast_path and not view.encoded and pixels.dtype == np.uint8:
            self.raw = RawRecordLayout(*pixels.shape)
        return key, view.label, pixels


class LayoutSource:
    """A part of another image layout (`LmdbDataset`): samples through `Layout.stored`, int targets only.

    A sample's keys are `sample_keys(i)` (one or several), looked up once per batch and
    prefetched together. Its one image becomes Datum-order planes: encoded bytes are decoded as
    an encoded Datum of them is (`reader.decode`, so `force_color`/`force_gray` apply), stored
    pixels (RGB or gray) are transposed to C x H x W, colour as BGR.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def key(self, local: int) -> bytes:
        return bytes(self.dataset.reader.sample_keys(local)[0])

    def first_pixels(self, txn: Any, reader: RecordReader) -> tuple[Any, Callable[[], np.ndarray]]:
        """(key, a call giving the pixels) of the part's first sample; a missing key is a KeysFileError."""
        keys, values = self._look_up(txn, 0, 0)
        return keys[0], lambda: self._sample(values, reader)[1]

    def check_target(self) -> None:
        """Refuse, in one line, a part whose first sample's target is not an int label (text, None, a list...).

        Raises:
            InputError: naming the LMDB, the layout and what its targets are.
        """
        if not len(self):
            return
        reader = self.dataset.reader
        with reader.environment().begin(buffers=True) as txn:
            _, values = self._look_up(txn, 0, 0)
            try:
                target = reader.layout.stored(values)[1]
            except Exception:
                return  # a bad first value is named when it is read
        if int_label(target) is None:
            raise InputError(f"{self.dataset.root}: {target_problem(reader.layout.name, target)}")

    def records(self, txn: Any, locals_: list[int], indices: list[int], reader: RecordReader) -> list[Record]:
        """The samples `locals_` of this part (dataset indices `indices`), every key looked up once."""
        looked_up = [self._look_up(txn, local, index) for local, index in zip(locals_, indices, strict=True)]
        if len(looked_up) > 1:
            self.dataset.reader.prefetch_values([value for _, values in looked_up for value in values])
        records = []
        for (keys, values), index in zip(looked_up, indices, strict=True):
            try:
                label, pixels = self._sample(values, reader)
                reader.check(pixels)
            except Exception as exc:
                key = keys[exc.position] if isinstance(exc, ValueAtError) else keys[0]
                raise named_error(exc, self.dataset, key, index) from error_cause(exc)
            records.append((keys[0], label, pixels))
        return records

    def _look_up(self, txn: Any, local: int, index: int) -> tuple[Sequence[bytes], list[Any]]:
        """A sample's keys and values; a required key the LMDB lacks is a KeysFileError naming it."""
        dataset = self.dataset
        layout = dataset.reader.layout
        keys = dataset.reader.sample_keys(local)
        values = [get_value(txn, key, dataset.root) for key in keys]
        for position, (key, value) in enumerate(zip(keys, values, strict=True)):
            if value is None and position not in layout.optional:
                raise KeysFileError(f"{dataset.root}: key {bytes(key)!r} (index {index}) is not in the LMDB "
                                    f"(sample {local} of the {layout.name} layout)")
        return keys, values

    def _sample(self, values: list[Any], reader: RecordReader) -> tuple[int, np.ndarray]:
        """(label, C x H x W pixels in Datum order) of one sample's values; errors say what, the caller says where.

        Raises:
            DatumError: a value is not what the layout stores (a `ValueAtError` says which), the
                target is not an int label, the sample holds several images, or its image does not decode.
        """
        layout = self.dataset.reader.layout
        try:
            images, target = layout.stored(values)
        except ValueError as exc:
            if isinstance(exc, CaffeLmdbError):
                raise
            raise DatumError(str(exc)) from None
        label = int_label(target)
        if label is None:
            raise DatumError(target_problem(layout.name, target))
        if len(images) != 1:
            raise DatumError(f"a {layout.name} sample holds {len(images)} images: CaffeLoader reads one per sample")
        image = images[0]
        if isinstance(image, bytes | bytearray | memoryview):
            return label, reader.decode(encoded_record(bytes(image)))
        return label, array_planes(image)


def record_source(part: Any) -> DatumSource | LayoutSource:
    """How one part is read: as Datums (`LmdbDataset_train`, an `LmdbDataset` of the datum layout), or its layout."""
    layout = getattr(part.reader, "layout", None)
    if layout is None:
        return DatumSource(part, part.reader.keys, part.prefetch)
    if isinstance(layout, DatumLayout):
        return DatumSource(part, layout.keys, True)
    return LayoutSource(part)


def encoded_record(data: bytes) -> DatumView:
    """Encoded image bytes as the encoded Datum holding them: what the transform's `record_pixels` decodes."""
    return DatumView(0, 0, 0, memoryview(data), 0, np.empty(0, np.float32), True)


def array_planes(pixels: np.ndarray) -> np.ndarray:
    """Stored pixels (H x W x 3 RGB, H x W x 1 or H x W gray, uint8) as C x H x W planes in Datum order (BGR).

    What a raw Datum of the same image holds (`datum.image_planes` of it): a view, no copy.
    """
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (
            pixels.ndim == 3 and pixels.shape[2] not in (1, 3)):
        got = f"{pixels.dtype} {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        raise DatumError(f"stored pixels must be H x W x 3 or H x W uint8, got {got}")
    if pixels.ndim == 2:
        return pixels[np.newaxis]
    planes = pixels.transpose(2, 0, 1)
    return planes[::-1] if planes.shape[0] == 3 else planes


def int_label(target: Any) -> int | None:
    """`target` as an int label (a Python or numpy integer that fits int64), or None when it is not one."""
    if isinstance(target, bool) or not isinstance(target, int | np.integer):
        return None
    label = int(target)
    return label if -2**63 <= label < 2**63 else None


def target_problem(layout: str, target: Any) -> str:
    """Why a target is not a label CaffeLoader can batch, in words: `crnn targets are text: ...`."""
    if isinstance(target, str):
        kind = "text"
    elif target is None:
        kind = "None (no labels)"
    elif isinstance(target, bool | int | np.integer):
        kind = f"{target!r}, not an int64 label"
    elif isinstance(target, float | np.floating):
        kind = "floats (regression)"
    elif isinstance(target, np.ndarray):
        kind = f"{target.dtype} arrays (multi-label or regression)"
    elif isinstance(target, list | tuple):
        kind = f"{type(target).__name__}s (multi-label)"
    else:
        kind = f"{type(target).__name__}s"
    return (f"{layout} targets are {kind}: CaffeLoader needs int labels "
            "(read this LMDB with LmdbDataset and a DataLoader)")


def named_error(exc: BaseException, dataset: Any, key: Any, index: int, doing: str = "") -> CaffeLmdbError:
    """An error met on one record (or `doing` something from it), as one line naming the LMDB, the key and the index."""
    where = f"{dataset.root}: key {bytes(key)!r} (index {index})" + (f": {doing} failed" if doing else "")
    if isinstance(exc, CaffeLmdbError):
        return type(exc)(f"{where}: {exc}")
    return LoaderError(f"{where}: {type(exc).__name__}: {exc}")


def error_cause(exc: BaseException) -> BaseException | None:
    """What `named_error`'s error is raised from: nothing for our own errors (the message says it all), else the
    original exception, whose traceback shows the bug in a transform."""
    return None if isinstance(exc, CaffeLmdbError) else exc
