"""caffe-lmdb: image folders to Caffe Datum LMDBs, and Caffe LMDBs (new or legacy) to PyTorch.

Each command has one library call of the same name, which is what the command runs:
`convert`, `merge`, `migrate`, `info`, `verify`, `compute_mean`, `export`, `grid`, `serve`.

Importing the package needs the generated `caffe_pb2` (`make proto`); without it the import
fails with one line saying so. Everything beyond the codec and the keys (the commands' calls, the
PyTorch parts `LmdbDataset_train`, `BlockShuffleSampler`, `DistributedShuffleSampler`, `open_shards`)
is imported on first use, so that the command-line tools start without torch and `import caffe_lmdb`
stays light.
"""

from .datum import (
    Datum,
    DatumView,
    array_to_datum,
    check_datum,
    datum_to_array,
    datum_to_encoded,
    datum_to_image,
    datum_to_image_array,
    encoded_to_datum,
    image_to_datum,
    parse_datum,
    parse_datum_view,
    serialize_datum,
)
from .errors import (
    CaffeLmdbError,
    CorruptLmdbError,
    DatumError,
    InputError,
    KeysFileError,
    KeysFileWarning,
    LmdbFormatError,
    LoaderError,
    PrototxtError,
    TransformError,
)
from .image_files import open_image
from .keys import load_keys, make_key, save_keys, scan_keys
from .proto import caffe_pb2

__version__ = "0.1.0"

_LAZY = {
    "LmdbDataset_train": "dataset",
    "open_shards": "dataset",
    "LmdbDataset": "lmdb_dataset",
    "PairedLmdbDataset": "lmdb_dataset",
    "open_tree": "lmdb_dataset",
    "Stylegan2Layout": "layout_stylegan2",
    "BlockShuffleSampler": "samplers",
    "DistributedShuffleSampler": "samplers",
    "CaffeLoader": "loader",
    "WorkerOptions": "batch_workers",
    "CaffeTransform": "transform",
    "RandomResizedCrop": "resized_crop",
    "ResizeCenterCrop": "resized_crop",
    "loader_from_prototxt": "prototxt",
    "convert": "conversion",
    "convert_splits": "conversion",
    "write_lmdb": "conversion",
    "write_dataset": "dataset_writer",
    "ConvertOptions": "encode",
    "WriteTuning": "conversion",
    "merge": "merging",
    "migrate": "migration",
    "info": "inspection",
    "verify": "inspection",
    "compute_mean": "mean",
    "load_mean": "mean",
    "export": "exporting",
    "grid": "grid_sheet",
    "serve": "serving",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "BlockShuffleSampler",
    "CaffeLmdbError",
    "CaffeLoader",
    "CaffeTransform",
    "ConvertOptions",
    "CorruptLmdbError",
    "Datum",
    "DatumError",
    "DatumView",
    "DistributedShuffleSampler",
    "InputError",
    "KeysFileError",
    "KeysFileWarning",
    "LmdbDataset",
    "LmdbDataset_train",
    "LmdbFormatError",
    "LoaderError",
    "PairedLmdbDataset",
    "PrototxtError",
    "RandomResizedCrop",
    "ResizeCenterCrop",
    "Stylegan2Layout",
    "TransformError",
    "WorkerOptions",
    "WriteTuning",
    "__version__",
    "array_to_datum",
    "caffe_pb2",
    "check_datum",
    "compute_mean",
    "convert",
    "convert_splits",
    "datum_to_array",
    "datum_to_encoded",
    "datum_to_image",
    "datum_to_image_array",
    "encoded_to_datum",
    "export",
    "grid",
    "image_to_datum",
    "info",
    "load_keys",
    "load_mean",
    "loader_from_prototxt",
    "make_key",
    "merge",
    "migrate",
    "open_image",
    "open_shards",
    "open_tree",
    "parse_datum",
    "parse_datum_view",
    "save_keys",
    "scan_keys",
    "serialize_datum",
    "serve",
    "verify",
    "write_dataset",
    "write_lmdb",
]
