"""Counter-based random draws: a sample's random numbers as a function of (seed, epoch, index) alone.

A batch loader's workers make samples in any order and any process; a generator carried from one
sample to the next would make the batches depend on who made them. Here every draw is
splitmix64's finaliser applied to a key made of the three numbers, at a fixed position of the
stream: `stream(keys, position)`. `CaffeTransform.params` (crop offsets, mirror) and the
resized-crop transforms (`resized_crop.py`: torchvision's box tries) draw this way, so their
batches are the same bytes for any number of workers, and an epoch can be made again to resume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MASK64 = (1 << 64) - 1
#: splitmix64's increment (2**64 / golden ratio) and its finaliser's multipliers (Stafford's mix 13).
GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def mix64(z: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit integers whose output bits all depend on every input bit."""
    z = ((z ^ (z >> 30)) * _MIX1) & MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & MASK64
    return z ^ (z >> 31)


def mix64_array(z: np.ndarray) -> np.ndarray:
    """`mix64` on a uint64 array (numpy's uint64 arithmetic wraps modulo 2**64, as the mask does)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


def sample_key(seed: int, epoch: int) -> int:
    """The per-(seed, epoch) half of a sample's key; the index is mixed in last (`sample_keys`)."""
    key = mix64(((seed & MASK64) + GOLDEN) & MASK64)
    return mix64(((key ^ (epoch & MASK64)) + GOLDEN) & MASK64)


def below(draw: int, n: int) -> int:
    """A value in [0, n) from a 64-bit draw: Lemire's multiply-shift on its high 32 bits (bias below n / 2**32)."""
    return ((draw >> 32) * n) >> 32


def sample_keys(seed: int, epoch: int, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """Each sample's stream key (uint64), as `CaffeTransform.params` keys sample `index` of `epoch`."""
    index = np.asarray(indices, dtype=np.int64).astype(np.uint64)  # two's complement, as `& MASK64`
    return mix64_array((np.uint64(sample_key(seed, epoch)) ^ index) + np.uint64(GOLDEN))


def stream(keys: np.ndarray, position: int) -> np.ndarray:
    """The 64-bit draw at `position` of each key's stream (position 1: the mirror coin of both transforms)."""
    return mix64_array(keys + np.uint64((position * GOLDEN) & MASK64))


def below_array(draws: np.ndarray, n: np.ndarray) -> np.ndarray:
    """`below` on arrays: int64 values in [0, n) (n <= 2**32) from uint64 draws."""
    return (((draws >> np.uint64(32)) * n.astype(np.uint64)) >> np.uint64(32)).astype(np.int64)


def unit_floats(draws: np.ndarray) -> np.ndarray:
    """float64 values in [0, 1) from uint64 draws: their top 53 bits, exactly representable."""
    return (draws >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
