"""A Bloom filter over LBAs, numpy over a whole batch at once.

A lookup of an LBA that is not in a BIT still costs a walk to the leaf that would hold
it. Above the bottom level most LBAs of a batch are in no BIT of a level, so each BIT
above the bottom keeps a filter (as LevelDB's tables do): one vectorised test answers, for
every LBA of the batch, "certainly not here" or "maybe". A BIT is immutable, so its
filter is exact about absence (no false negatives) for its whole life; with 10 bits per
LBA and 6 probes about 1% of absent LBAs still walk.

Filters live in memory only; nothing here is on disk.
"""
from __future__ import annotations

import numpy as np

BITS_PER_KEY = 10
PROBES = 6
_MUL_A = np.uint64(0x9E3779B97F4A7C15)
_MUL_B = np.uint64(0xC2B2AE3D27D4EB4F)
_STEPS = np.arange(PROBES, dtype=np.uint64)
_A, _B, _M64 = int(_MUL_A), int(_MUL_B), (1 << 64) - 1


class BloomFilter:
    def __init__(self, expected_keys: int):
        m = max(64, expected_keys * BITS_PER_KEY)
        self.log2_bits = max(6, (m - 1).bit_length())     # a power of two: shifts, no modulo
        self._bits = np.zeros((1 << self.log2_bits) // 8, np.uint8)
        self._shift = np.uint64(64 - self.log2_bits)

    @property
    def nbytes(self) -> int:
        return self._bits.nbytes

    def _positions(self, keys: np.ndarray) -> np.ndarray:
        """(len(keys), PROBES) bit positions: double hashing, the top bits of each probe."""
        keys = keys.astype(np.uint64, copy=False)
        a = keys * _MUL_A
        b = ((keys ^ (keys >> np.uint64(29))) * _MUL_B) | np.uint64(1)
        return (a[:, None] + _STEPS[None, :] * b[:, None]) >> self._shift

    def add(self, keys: np.ndarray) -> None:
        pos = self._positions(keys).ravel()
        np.bitwise_or.at(self._bits, pos >> np.uint64(3),
                         np.left_shift(1, pos & np.uint64(7)).astype(np.uint8))

    def may_contain(self, keys: np.ndarray) -> np.ndarray:
        """A bool per key: False means the key was certainly never added."""
        pos = self._positions(keys)
        hit = (self._bits[pos >> np.uint64(3)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1
        return hit.all(axis=1)

    def may_contain_one(self, key: int) -> bool:
        """may_contain for one key, in plain Python (numpy's per-call cost is the larger
        part for a single key). Same positions: the same arithmetic modulo 2**64."""
        a = (key * _A) & _M64
        b = (((key ^ (key >> 29)) * _B) & _M64) | 1
        bits, shift = self._bits, 64 - self.log2_bits
        for i in range(PROBES):
            p = ((a + i * b) & _M64) >> shift
            if not (bits[p >> 3] >> (p & 7)) & 1:
                return False
        return True


__all__ = ["BloomFilter"]
