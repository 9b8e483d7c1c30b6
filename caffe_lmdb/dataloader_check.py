"""The loader check: an LMDB through `LmdbDataset_train` and a `DataLoader`, batch by batch.

This is the check the original `main.py` ran (`python main.py img/train.lmdb`): every sample read,
resized to 224 x 224, turned into an H x W x C uint8 tensor and batched in pairs, printing
`key N` per sample and the batch's `torch.Size` per batch. It exercises what training needs:
key enumeration (keys file or scan), record decoding, a picklable transform, worker processes
that each open the LMDB themselves, and collation into equal-sized batches.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from .dataset import LmdbDataset_train
from .errors import CaffeLmdbError, InputError
from .tool_reading import keys_file_for


class ResizeToHWC:
    """Resize a PIL image to `size` x `size` (bilinear, aspect ratio not kept) as an H x W x C uint8 tensor.

    A plain Pillow callable, so the check needs no torchvision; a class rather than a lambda so
    that worker processes can receive it (spawned workers unpickle the dataset and its transform).
    """

    def __init__(self, size: int = 224) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        resized = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.array(resized))  # np.array copies: a writable array torch can own

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def loader_check(
    lmdb_path: str | os.PathLike,
    keys_path: str | os.PathLike | None = None,
    *,
    batch_size: int = 2,
    size: int = 224,
    num_workers: int = 0,
) -> Iterator[str]:
    """Iterate the LMDB through a DataLoader and yield the lines the original `main.py` printed.

    Samples come in key order (no shuffling), so `key N` is the N-th record of the dataset.

    Args:
        lmdb_path: the LMDB.
        keys_path: its keys file; default the converter's `<stem>_keys.npy` when present, else
            the keys are scanned from the LMDB.
        batch_size: samples per batch.
        size: the side images are resized to.
        num_workers: DataLoader worker processes (0 reads in this process).

    Yields:
        `key N` for each sample, then `torch.Size([batch, size, size, 3])` after each batch.

    Raises:
        InputError: `num_workers` is negative.
        LmdbFormatError, CorruptLmdbError, KeysFileError, DatumError: as `LmdbDataset_train` reading
            the LMDB, with one-line messages also when a worker process raised them.
    """
    if num_workers < 0:
        raise InputError(f"num_workers must be >= 0, got {num_workers}")
    dataset = LmdbDataset_train(lmdb_path, transform=ResizeToHWC(size), keys_path=keys_file_for(lmdb_path, keys_path))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    index = 0
    batches = iter(loader)
    try:
        for images, _labels in batches:
            for _ in range(len(images)):
                yield f"key {index}"
                index += 1
            yield str(images.shape)
    except CaffeLmdbError as exc:
        raise _worker_error(exc) from None
    finally:
        _stop_workers(batches)


def _stop_workers(batches: Iterator) -> None:
    """Stop a DataLoader iterator's workers now, so that they exit normally and clean up after themselves.

    torch stops them only when the iterator is collected. After a worker's exception the iterator
    sits in a reference cycle (through the exception's traceback), so that happens in the garbage
    collector or at the interpreter's exit, which terminates the workers: each left behind the
    folder in /tmp that it passed batches through (`pymp-*`, torch's file-descriptor sharing).
    There is no public call for this; where torch has none of that name, collection does it.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


def _worker_error(exc: CaffeLmdbError) -> CaffeLmdbError:
    """The error a DataLoader worker raised, as its own one line again.

    torch re-raises a worker's exception in the main process with the worker's whole traceback as
    its message ("Caught DatumError in DataLoader worker process 0. Original Traceback ..."); the
    last line of that traceback is the original `Type: message`.
    """
    text = str(exc)
    if "\nOriginal Traceback" not in text:
        return exc
    name, sep, message = text.rstrip().splitlines()[-1].partition(": ")
    if not sep or name.rpartition(".")[2] != type(exc).__name__:
        return exc
    return type(exc)(message)
