"""Any Python dataset of `(image, target)` samples to a Caffe Datum LMDB, with `convert`'s guarantees.

The recipe this project grew from wrote a torch `Dataset` through a `DataLoader` with a collate
function that returns the samples as they are; `write_dataset(dataset, "out.lmdb")` does the same
job with the converter's pipeline: each sample becomes one serialized Datum in a worker process
(a map-style dataset is indexed there, after `fork`, so neither the dataset nor its samples are
ever pickled), the bytes come back through the workers' shared-memory rings in index order, and
one writer puts them into an `AtomicLmdb` (locked, built aside, published whole with its keys file).

Record i is sample i, with key `"%08d_%s" % (i, name)`; a sample that cannot be stored leaves a
gap in the keys, as an unreadable image does in `convert`, and is listed by index in
`<out>_skipped.txt`.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .append_resume import check_append_layout, merged_classes, read_previous
from .atomic_lmdb import AtomicLmdb
from .conversion import ConvertResult, Front, WriteTuning, default_workers, dispatched, summarise, write_records
from .datum import DatumError, encode_image, encoded_to_datum, raw_datum_parts, serialize_datum
from .encode import ConvertOptions, build_record, resize_image
from .errors import ConversionError, InputError, os_error_reason
from .image_files import normalize_image
from .keys import MAX_KEY_BYTES, make_key
from .labels import sample_targets
from .optional_torch import torch_if_imported
from .sources import read_image_file
from .workers import Record

log = logging.getLogger(__name__)

_NAME_HEAD = struct.Struct("<I")  # a worker's record is: name length, name (UTF-8), serialized Datum


# --------------------------------------------------------------------------- one sample, one record

def _image_from_array(array: np.ndarray, what: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(array), mode="L")
    if array.ndim == 3 and array.shape[2] == 3:
        return Image.fromarray(np.ascontiguousarray(array), mode="RGB")
    raise ValueError(f"{what} must be H x W x 3 (RGB) or H x W, got shape {tuple(array.shape)}")


def _tensor_type() -> type | None:
    torch = torch_if_imported()
    return getattr(torch, "Tensor", None) if torch is not None else None


def sample_record(image: Any, label: int, floats: Sequence[float], options: ConvertOptions) -> Record:
    """The Datum of one image of any supported kind (see `write_dataset`), as `convert` builds it.

    Paths and file bytes go through `encode.build_record` (the pass-through rule); decoded images
    (PIL, numpy, torch) are stored raw, or with `encoded` encoded as `encode_type` (PNG by default:
    lossless, since there are no file bytes to keep).

    Raises:
        DatumError: the image cannot be converted (the message says why).
        OSError: a path cannot be read.
        ValueError: an image of an unsupported kind, dtype or shape.
    """
    if isinstance(image, (str, os.PathLike)):
        return build_record(read_image_file(image), label, floats, options)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return build_record(bytes(image), label, floats, options)
    tensor = _tensor_type()
    if tensor is not None and isinstance(image, tensor):
        array = image.detach().cpu().numpy()
        if array.ndim == 3:
            if array.shape[0] not in (1, 3):
                raise ValueError(f"a tensor image must be C x H x W with C = 3 (RGB) or 1, got shape {array.shape}")
            array = array.transpose(1, 2, 0)  # torchvision's C x H x W to H x W x C
        pil = _image_from_array(array, "a tensor image")
    elif isinstance(image, np.ndarray):
        pil = _image_from_array(image, "an array image")
    elif isinstance(image, Image.Image):
        pil = image
    else:
        raise ValueError(f"unsupported image type {type(image).__name__} (PIL image, uint8 array or tensor, "
                         "encoded file bytes, or a path)")
    if not pil.width or not pil.height:  # Pillow and numpy allow these; a Datum of them is no image (verify flags it)
        raise DatumError(f"image is {pil.width}x{pil.height} pixels (width x height): a record needs at least 1x1")
    pil = _normalised(pil, options)
    if options.resize:
        pil = resize_image(pil, options)
    width, height = pil.size
    if options.stores_encoded:
        datum = encoded_to_datum(encode_image(pil, options.encode_type or "png"), label)
        datum.float_data.extend(floats)
        return Record((serialize_datum(datum),), (1 if options.gray else 3, height, width))
    return Record(tuple(raw_datum_parts(pil, label, gray=options.gray, float_data=floats)),
                  (1 if options.gray else 3, height, width))


def _normalised(image: Image.Image, options: ConvertOptions) -> Image.Image:
    target = "L" if options.gray else "RGB"
    return image if image.mode == target else normalize_image(image, gray=options.gray)


def _sample_name(index: int, sample: Any, key: Callable[[int, Any], str] | None) -> str:
    """The name in the sample's key: `key(index, sample)`, else its path, else the index.

    Raises:
        ValueError: `key` raised (any exception: the user's code, as `__getitem__`'s, fails this
            sample alone; the message names the exception) or returned something other than a str.
    """
    if key is not None:
        try:
            name = key(index, sample)
        except Exception as exc:
            raise ValueError(f"key({index}, sample) raised {type(exc).__name__}: {exc}") from None
        if not isinstance(name, str):
            raise ValueError(f"key() must return a str, got {type(name).__name__}")
        return name
    image = sample[0]
    if isinstance(image, (str, os.PathLike)):
        return Path(image).as_posix()
    return str(index)


def encode_sample(index: int, sample: Any, options: ConvertOptions,
                  key: Callable[[int, Any], str] | None = None) -> Record:
    """The sample of line id `index` as one record: its key name and serialized Datum, or why it cannot be stored.

    The record's bytes are the name's length (4 bytes), the name in UTF-8, then the Datum: the
    name is made where the sample is (a worker process) and travels with the bytes.
    """
    try:
        if not isinstance(sample, (tuple, list)) or len(sample) != 2:
            raise ValueError(f"expected an (image, target) pair, got {type(sample).__name__}"
                             + (f" of length {len(sample)}" if isinstance(sample, (tuple, list)) else ""))
        name = _sample_name(index, sample, key).encode("utf-8")
        if len(name) + 9 > MAX_KEY_BYTES:
            raise ValueError(f"key name is {len(name)} bytes; LMDB keys hold at most {MAX_KEY_BYTES}")
        label, floats = sample_targets(sample[1])
        record = sample_record(sample[0], label, floats, options)
    except DatumError as exc:
        return Record(error=str(exc))
    except OSError as exc:
        return Record(error=os_error_reason(exc))
    except (ValueError, TypeError, UnicodeError) as exc:
        return Record(error=str(exc))
    return Record((_NAME_HEAD.pack(len(name)), name, *record.parts), record.shape)


def _encode_index(index: int, dataset: Any, options: ConvertOptions,
                  key: Callable[[int, Any], str] | None, line_offset: int = 0) -> Record:
    try:
        sample = dataset[index]
    except Exception as exc:  # the user's __getitem__: any failure is this sample's, named by index
        return Record(error=f"dataset[{index}] raised {type(exc).__name__}: {exc}")
    return encode_sample(line_offset + index, sample, options, key)


def split_record(value: bytes | memoryview) -> tuple[str, memoryview]:
    """(name, Datum bytes) of a record made by `encode_sample`."""
    view = memoryview(value)
    (length,) = _NAME_HEAD.unpack_from(view)
    return bytes(view[4:4 + length]).decode("utf-8"), view[4 + length:]


# --------------------------------------------------------------------------- reading the dataset

def is_map_style(dataset: Any) -> bool:
    """A dataset indexed 0..len-1 (a torch map-style `Dataset`, a list); else it is iterated."""
    torch = torch_if_imported()
    iterable_dataset = getattr(getattr(getattr(torch, "utils", None), "data", None), "IterableDataset", None)
    if iterable_dataset is not None and isinstance(dataset, iterable_dataset):
        return False
    if isinstance(dataset, (str, bytes, dict)):
        return False
    return hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")


def _iterated_records(dataset: Iterable[Any], options: ConvertOptions, key, line_offset: int) -> Iterator[Record]:
    """The records of the samples `dataset` yields, in its order.

    Raises:
        InputError: it yields no sample.
        ConversionError: iterating it raised (an iterator cannot go on after that).
    """
    samples = (encode_sample(line_offset + index, sample, options, key) for index, sample in enumerate(dataset))
    index = 0
    while True:
        try:
            record = next(samples)
        except StopIteration:
            break
        except ConversionError:
            raise
        except Exception as exc:
            raise ConversionError(f"sample {index}: iterating the dataset raised {type(exc).__name__}: {exc}") from None
        yield record
        index += 1
    if index == 0:
        raise InputError("the dataset has no samples")


def write_dataset(
    dataset: Sequence[Any] | Iterable[Any],
    output: str | os.PathLike,
    *,
    options: ConvertOptions | None = None,
    workers: int | None = None,
    key: Callable[[int, Any], str] | None = None,
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
    append: bool = False,
    extend_classes: bool = False,
    strict: bool = False,
    progress: bool | None = None,
    tuning: WriteTuning | None = None,
) -> ConvertResult:
    """Write a dataset of `(image, target)` samples to a Caffe Datum LMDB, as `convert` writes files.

    Images may be a PIL image; an H x W x 3 (RGB) or H x W uint8 numpy array; a C x H x W uint8
    torch tensor with RGB channels (torchvision's `ToTensor`/`PILToTensor` layout, C = 3 or 1);
    the bytes of an encoded image file; or a path. Paths and file bytes follow `convert`'s rules
    (with `options.encoded`, a file's bytes are stored unchanged when nothing would change them);
    decoded images are stored raw, or with `options.encoded` as `options.encode_type` (default
    PNG, lossless).

    Targets may be an int (the Datum's `label`); a sequence, array or tensor of numbers (all
    stored in `float_data`, the first, a whole number, also as `label`: the list-file rule for
    `path l1 l2 ...`, so an 80-class multi-hot vector reads back with
    `LmdbDataset_train(target="float")`); or `(label, floats)`.

    A map-style dataset (`__len__` and `__getitem__`, e.g. a torch `Dataset`) is read in `workers`
    processes forked from this one (so it need not be picklable); record i is sample i and the
    output is byte-identical for any worker count. Anything else is iterated once, in this
    process, in its own order: record i is the i-th sample it yields (an exception raised by the
    iterator itself ends the run, since an iterator cannot go on after one).

    Args:
        dataset: the samples.
        output: the LMDB to create (or, with `append`, to add to); its keys file is
            `<out>_keys.npy` beside it.
        options: the record layout: gray, resize, encoded, encode_type, ... (default `ConvertOptions()`:
            raw records as they are).
        workers: processes reading a map-style dataset (default: one per CPU; 0 reads here).
        key: `key(i, sample) -> str`, the name in key `"%08d_%s" % (i, name)`; default the path
            when the image is one, else the index `i`. An exception it raises fails that sample
            alone (skipped and listed, or the run under `strict`), as one from `__getitem__` does.
        classes: class names, saved as `<out>_classes.txt` (label i is `classes[i]`).
        overwrite: replace an existing output.
        append: add the samples after an existing LMDB's records (`convert --append`): sample i
            gets line id `next + i` (the `i` that `key` and the default name see), so writing a
            dataset in two appended parts gives what one run gives; `classes` must then keep the
            LMDB's own classes at their indices.
        extend_classes: with `append`, allow `classes` to add names after the existing ones.
        strict: fail on the first sample that cannot be stored, instead of skipping it.
        progress: show a progress bar (default: when stderr is a terminal).
        tuning: speed and memory knobs that never change the records, `commit_every` (records
            per transaction, Caffe's 1000) among them (default `WriteTuning()`).

    Returns:
        The summary; bad samples are in `skipped_files` as (index, reason).

    Raises:
        InputError: no samples, bad arguments, or an output that exists without `overwrite`.
        ConversionError: `strict` and a bad sample, no sample could be stored, or the iterator raised.
    """
    options = options or ConvertOptions()
    tuning = tuning or WriteTuning()
    workers = workers if workers is not None else default_workers()
    if workers < 0:
        raise InputError(f"workers must be >= 0 (0 reads in this process), got {workers}")
    mapped = is_map_style(dataset)
    count = len(dataset) if mapped else None
    if count == 0:
        raise InputError("the dataset has no samples")
    line_offset, classes, previous = 0, (list(classes) if classes is not None else None), None
    if append:
        if overwrite:
            raise InputError("append adds to the existing LMDB; overwrite would replace it: give one of them")
        previous = read_previous(output)
        line_offset, classes = previous.next_line_id, merged_classes(previous, classes, extend=extend_classes)
    start = time.perf_counter()
    total = count if mapped else _length_hint(dataset)
    if previous is not None:
        check_append_layout(previous, options)
    with AtomicLmdb(output, overwrite=overwrite, commit_every=tuning.commit_every,
                    commit_bytes=tuning.commit_bytes, initial_map_size=tuning.initial_map_size,
                    grow_ahead=tuning.grow_ahead, previous=previous) as out:
        result = ConvertResult(output=out.output, keys_path=out.keys_path)
        records = _records(dataset, count, options, key, line_offset, workers, tuning)
        write_records(out, records, _sample_front(line_offset), strict=strict, skipped=result.skipped_files,
                      classes=classes, previous=previous, total=total, progress=progress, unit="sample")
    return summarise(result, out, previous, start)


def _records(dataset: Any, count: int | None, options: ConvertOptions, key: Callable[[int, Any], str] | None,
             line_offset: int, workers: int, tuning: WriteTuning) -> AbstractContextManager[Any]:
    """The samples' records in order, for `write_records`: a map-style dataset of `count` samples
    read in `workers` forked processes, anything else (`count` None) iterated in this one."""
    if count is None:
        return nullcontext(_iterated_records(dataset, options, key, line_offset))
    work = partial(_encode_index, dataset=dataset, options=options, key=key, line_offset=line_offset)
    return dispatched(range(count), work, workers, max(2 * tuning.commit_bytes, tuning.ring_bytes),
                      needs_fork=True)  # a dataset need not be picklable under fork


def _sample_front(line_offset: int) -> Front:
    """How `write_records` keys the records of samples (line id `line_offset + index`) and names bad ones."""

    def place(index: int, record: Record) -> tuple[bytes, Any] | str:
        if record.error is not None:
            return record.error
        name, value = split_record(record.value)
        return make_key(line_offset + index, name), value

    return Front(place, lambda index: (f"sample {index}", str(index)), strict_flag="strict",
                 nothing_stored="no sample could be stored", first_skipped="sample ")


def _length_hint(dataset: Any) -> int | None:
    try:
        hint = len(dataset)
    except TypeError:
        return None
    return hint if isinstance(hint, int) and not math.isnan(hint) else None
