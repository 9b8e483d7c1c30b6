"""caffe-lmdb: image folders to Caffe Datum LMDBs, and Caffe LMDBs (new or legacy) to PyTorch.

Importing the package needs the generated `caffe_pb2` (`make proto`); without it the import
fails with one line saying so.
"""

from .datum import (
    Datum,
    array_to_datum,
    check_datum,
    datum_to_array,
    datum_to_encoded,
    datum_to_image,
    encoded_to_datum,
    image_to_datum,
    open_image,
    parse_datum,
    serialize_datum,
)
from .errors import CaffeLmdbError, DatumError, KeysFileError, LmdbFormatError
from .keys import load_keys, make_key, save_keys, scan_keys
from .proto import caffe_pb2

__version__ = "0.1.0"

__all__ = [
    "CaffeLmdbError",
    "Datum",
    "DatumError",
    "KeysFileError",
    "LmdbFormatError",
    "__version__",
    "array_to_datum",
    "caffe_pb2",
    "check_datum",
    "datum_to_array",
    "datum_to_encoded",
    "datum_to_image",
    "encoded_to_datum",
    "image_to_datum",
    "load_keys",
    "make_key",
    "open_image",
    "parse_datum",
    "save_keys",
    "scan_keys",
    "serialize_datum",
]
