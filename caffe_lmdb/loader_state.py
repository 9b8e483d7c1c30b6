"""What `CaffeLoader.state_dict()` saves besides the position, and the checks `load_state_dict` makes on it.

A state is plain Python values (what `torch.save`, JSON and checkpointing libraries store): the
position (epoch, samples received) and everything that decides which bytes the next batches
hold, so that a state from another LMDB, another record count, batch size, seed, shuffle or
transform is refused in one line naming what differs, never resumed into a silently different
order. An LMDB is known by its folder name, its record count and a digest of keys spread over
it (`lmdb_identity`), not by its path or inode: a run resumed on another node, with its own copy
of the LMDB, still matches; a rewritten LMDB (other records, another order) does not.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

from .errors import LoaderError

#: The `format` and `version` of a `CaffeLoader` state.
STATE_FORMAT = "caffe_lmdb.CaffeLoader"
STATE_VERSION = 1

#: Keys digested per LMDB (first and last included, evenly spaced): enough to tell a rewrite
#: (another order, other records) from a copy, at a cost of microseconds.
FINGERPRINT_KEYS = 65


class EpochProgress:
    """One iteration (epoch) of a loader: where in the epoch's order it began and how many samples it delivered.

    The loader keeps it after the iterator is gone (a loop left with `break`, then a checkpoint):
    the state is what the user received, counted as batches are handed out, never what workers
    made ahead.
    """

    __slots__ = ("delivered", "epoch", "finished", "start")

    def __init__(self, epoch: int, start: int) -> None:
        self.epoch = epoch
        self.start = start  # samples of the epoch skipped by a resume
        self.delivered = 0  # samples handed to the user by this iteration
        self.finished = False  # the iteration ran to its end (StopIteration)


def _key_at(part: Any, index: int) -> bytes:
    keys = getattr(part, "keys", None)
    if keys is not None:
        return bytes(keys[index])
    reader = getattr(part, "reader", None)
    if reader is not None and callable(getattr(reader, "sample_keys", None)):
        return b"\0".join(bytes(key) for key in reader.sample_keys(index))
    return b""


def lmdb_identity(part: Any) -> dict[str, Any]:
    """An LMDB as a state names it: folder name, record count, first and last key, a digest of keys spread over it."""
    count = len(part)
    name = os.path.basename(os.path.normpath(os.fspath(part.root)))
    picks = sorted({round(i * (count - 1) / (FINGERPRINT_KEYS - 1)) for i in range(FINGERPRINT_KEYS)}) if count else []
    digest = hashlib.blake2b(digest_size=8)
    keys = []
    for index in picks:
        key = _key_at(part, index)
        keys.append(key)
        digest.update(len(key).to_bytes(4, "little") + key)
    return {"name": name, "records": count, "first_key": _text(keys[0]) if keys else "",
            "last_key": _text(keys[-1]) if keys else "", "fingerprint": digest.hexdigest()}


def _text(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


def transform_identity(transform: Any) -> dict[str, Any] | None:
    """The transform's `state_params()` (CaffeTransform has it), or just its class name for one that has none."""
    if transform is None:
        return None
    params = getattr(transform, "state_params", None)
    return dict(params()) if callable(params) else {"class": type(transform).__name__}


def check_state(state: Any, expected: Mapping[str, Any]) -> None:
    """Refuse a state that is not a loader state of this version, or that was saved by a loader unlike `expected`.

    `expected` is the loader's own identity (every key of a state but the position and the
    sampler's); the first difference is the message.

    Raises:
        LoaderError: one line saying what differs.
    """
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        got = f"a dict with format {state.get('format')!r}" if isinstance(state, Mapping) else \
            f"a {type(state).__name__}"
        raise LoaderError(f"load_state_dict: not a CaffeLoader state (a dict from CaffeLoader.state_dict(), format "
                          f"{STATE_FORMAT!r}), got {got}")
    if state.get("version") != STATE_VERSION:
        raise LoaderError(f"load_state_dict: loader state version {state.get('version')!r}; this caffe-lmdb reads "
                          f"version {STATE_VERSION}")
    for key in ("epoch", "received"):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise LoaderError(f"load_state_dict: the state's {key!r} must be an int >= 0, got {value!r}")
    saved = state.get("lmdbs")
    if not isinstance(saved, list) or not all(isinstance(entry, Mapping) for entry in saved):
        raise LoaderError(f"load_state_dict: the state's 'lmdbs' must be a list of dicts, got {saved!r}")
    mine = expected["lmdbs"]
    if len(saved) != len(mine):
        raise LoaderError(f"load_state_dict: the state was saved reading {len(saved)} LMDB(s) "
                          f"({_names(saved)}), this loader reads {len(mine)} ({_names(mine)})")
    for number, (old, new) in enumerate(zip(saved, mine, strict=True)):
        for key in ("name", "records", "first_key", "last_key", "fingerprint"):
            if old.get(key) != new[key]:
                where = f"LMDB {number + 1} of {len(mine)}" if len(mine) > 1 else "the LMDB"
                raise LoaderError(f"load_state_dict: {where} differs: the state's {old.get('name')!r} has {key} "
                                  f"{old.get(key)!r}, this loader's {new['name']!r} has {new[key]!r}")
    for key in ("records", "batch_size", "drop_last", "shuffle", "seed"):
        if state.get(key) != expected[key]:
            raise LoaderError(f"load_state_dict: the state was saved with {key} {state.get(key)!r}, this loader "
                              f"has {key} {expected[key]!r}")
    old, new = state.get("transform"), expected["transform"]
    if old != new:
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            key = next(k for k in [*new, *old] if old.get(k) != new.get(k))
            raise LoaderError(f"load_state_dict: the state was saved with another transform: {key} "
                              f"{old.get(key)!r}, this loader's transform has {key} {new.get(key)!r}")
        raise LoaderError(f"load_state_dict: the state was saved with transform {_show(old)}, this loader has "
                          f"{_show(new)}")


def _names(lmdbs: list[Mapping[str, Any]]) -> str:
    return ", ".join(str(entry.get("name")) for entry in lmdbs) or "none"


def _show(value: Any) -> str:
    if value is None:
        return "none"
    return repr(value.get("class", value)) if isinstance(value, Mapping) else repr(value)


def sampler_identity(sampler: Any) -> dict[str, Any]:
    """A sampler that keeps no state of its own (torch's DistributedSampler), as a state names it."""
    return {"class": type(sampler).__name__, "num_replicas": int(getattr(sampler, "num_replicas", 1)),
            "rank": int(getattr(sampler, "rank", 0)), "length": len(sampler)}


def sampler_name(saved: Any) -> str:
    """The sampler a state's entry names: a plain sampler's class, a caffe-lmdb sampler's own state's, or none."""
    if saved is None:
        return "none"
    if not isinstance(saved, Mapping):
        return f"(a {type(saved).__name__})"
    return str(saved.get("class", saved.get("sampler")))


def check_position(saved: Any, mine: Mapping[str, Any] | None, received: int, size: int, batch_size: int,
                   drop_last: bool) -> None:
    """Without a caffe-lmdb sampler: the same sampler (or none), and `received` a whole number of batches of the epoch.

    `mine` is the loader's `sampler_identity` (None without a sampler), `size` its samples per epoch.

    Raises:
        LoaderError: another sampler, rank count, rank or length, or a position between batches.
    """
    if sampler_name(saved) != sampler_name(mine):
        raise LoaderError(f"load_state_dict: the state was saved with sampler {sampler_name(saved)}, this loader "
                          f"has {sampler_name(mine)}")
    key = next((k for k in mine or {} if saved.get(k) != mine[k]), None)
    if key is not None:
        hint = (": only caffe-lmdb's samplers (BlockShuffleSampler, DistributedShuffleSampler) resume on another "
                "number of ranks") if key in ("num_replicas", "rank") else ""
        raise LoaderError(f"load_state_dict: the state's sampler has {key} {saved.get(key)!r}, this loader's "
                          f"{mine['class']} has {key} {mine[key]!r}{hint}")
    last = size - size % batch_size if drop_last else size
    if received > last or (received % batch_size and received != last):
        raise LoaderError(f"load_state_dict: the state says {received} samples received, which is not a whole number "
                          f"of batches of {batch_size} within an epoch of {last}")
