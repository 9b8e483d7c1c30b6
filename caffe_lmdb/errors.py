"""The exception types of caffe-lmdb: one base, each subclass also the matching built-in."""

from __future__ import annotations


class CaffeLmdbError(Exception):
    """Base of every error caffe-lmdb raises on purpose, so callers can catch ours alone."""


class DatumError(CaffeLmdbError, ValueError):
    """A record is not a valid Caffe Datum (bad dims, wrong data size, undecodable payload)."""


class LmdbFormatError(CaffeLmdbError, ValueError):
    """A path is not an LMDB, or an LMDB does not hold what the caller expects."""


class KeysFileError(CaffeLmdbError, ValueError):
    """A `.npy` keys file is unreadable, pickled, or disagrees with its LMDB."""


class KeysFileWarning(UserWarning):
    """A keys file that loads but disagrees with its LMDB (e.g. a different number of entries)."""
