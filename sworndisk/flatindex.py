"""The flat index: the newest BIT record of every LBA, all levels in one sorted array.

With every BIT resident (bit.Bit.resident), a batch lookup still searches each BIT in
turn, newest first: about ten numpy calls per BIT, most of a random read's index cost
with a few BITs. The flat index merges what they hold once (newest record of each LBA,
tombstones kept, as a lookup over the BITs would find them) so that a batch is one
search. It is a cache of the BITs in memory, never written anywhere: lsm.LsmIndex builds
it when the reads' lookups it would have saved outweigh building it, and drops it when a
compaction or a load changes the BITs.

Where its LBAs are dense (they span at most DIRECT_SPAN times their number, as on a disk
mostly written), it can also hold a direct table: the position of every LBA of the span
(-1: none), 4 bytes each. A lookup is then one gather in any order of keys, not a binary
search of ~18 steps per key whose last steps miss the cache.
"""
from __future__ import annotations

import numpy as np

from .records import RecordFormat

DIRECT_SPAN = 2             # a direct table costs at most 8 bytes per record
DIRECT_MIN_RECORDS = 1024   # below that a search is as cheap


class FlatIndex:
    def __init__(self, lbas: np.ndarray, recs: np.ndarray, owned: bool = True):
        self.lbas, self.recs = lbas, recs
        self.owned = owned              # False: the arrays are a single BIT's own
        # Rows gathered as opaque bytes (numpy copies a structured dtype field by field).
        self._raw = recs.view(np.dtype((np.void, recs.dtype.itemsize)))
        self._pos: np.ndarray | None = None     # the direct table, once built
        self._lo = self._span = np.uint64(0)

    @classmethod
    def merged(cls, parts: list[tuple[np.ndarray, np.ndarray]],
               fmt: RecordFormat) -> "FlatIndex":
        """From the resident (LBAs, records) of each BIT, newest first: a single BIT's
        arrays as they are, else the oldest copied and each newer one laid over it."""
        if len(parts) == 1:
            return cls(*parts[0], owned=False)
        flat = cls(np.empty(0, np.uint64), np.empty(0, fmt.dtype))
        for _lbas, recs in reversed(parts):
            flat = flat.overlay(recs)
        return flat

    def overlay(self, newer: np.ndarray) -> "FlatIndex":
        """This index with `newer` (records sorted by LBA, unique) laid over it: theirs
        replace the records of the same LBAs, the others go in between, in order. A
        search per new record and one pass over the index, no sort. Records move as
        opaque bytes (numpy copies a structured dtype field by field, 3-5x slower)."""
        keys = newer["lba"]
        raw = np.dtype((np.void, newer.dtype.itemsize))
        add = newer.view(raw)
        at = self.lbas.searchsorted(keys)
        hit = at < len(self.lbas)
        hit[hit] = self.lbas[at[hit]] == keys[hit]
        new = np.flatnonzero(~hit)
        place = at[new] + np.arange(len(new))          # each goes before self's at[j]
        taken = np.zeros(len(self.lbas) + len(new), bool)
        taken[place] = True
        recs = np.empty(len(taken), raw)
        recs[~taken] = self.recs.view(raw)
        recs[place] = add[new]
        old = at[hit]                                   # replaced, where they moved to
        recs[old + np.searchsorted(at[new], old, side="right")] = add[hit]
        recs = recs.view(newer.dtype)
        return FlatIndex(np.ascontiguousarray(recs["lba"]), recs)

    @property
    def nbytes(self) -> int:
        """Memory of its own: the direct table, and the records unless they are a single
        BIT's arrays."""
        table = self._pos.nbytes if self._pos is not None else 0
        return table + (self.lbas.nbytes + self.recs.nbytes if self.owned else 0)

    def __len__(self) -> int:
        return len(self.lbas)

    def direct_nbytes(self) -> int:
        """What a direct table would take (0: the LBAs are too sparse or too few)."""
        n = len(self.lbas)
        if self._pos is not None or not DIRECT_MIN_RECORDS <= n < 1 << 31:
            return 0
        span = int(self.lbas[-1]) - int(self.lbas[0]) + 1
        return 4 * (span + 1) if span <= DIRECT_SPAN * n else 0

    def build_direct(self) -> None:
        """Builds the direct table (direct_nbytes() bytes): entry lba - lo holds the
        LBA's row, the last entry -1 for every key outside the span."""
        nbytes = self.direct_nbytes()
        if not nbytes:
            return
        pos = np.full(nbytes // 4, -1, np.int32)
        pos[(self.lbas - self.lbas[0]).astype(np.intp)] = np.arange(len(self.lbas),
                                                                     dtype=np.int32)
        self._pos, self._lo, self._span = pos, self.lbas[0], np.uint64(len(pos) - 1)

    @property
    def direct(self) -> bool:
        """Whether lookups may come in any order (the direct table is built)."""
        return self._pos is not None

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For uint64 `keys` in any order (needs the direct table): which have a record,
        and that record (rows where not found are undefined)."""
        # A key below the span wraps around to a huge offset: it too lands on the -1.
        keys = keys.astype(np.uint64, copy=False)
        rows = self._pos[np.minimum(keys - self._lo, self._span)]
        return rows >= 0, self._raw[rows].view(self.recs.dtype)

    def lookup_sorted(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For sorted uint64 `keys`: which have a record, and that record (rows where
        not found are undefined), as LsmIndex.lookup_sorted."""
        if self._pos is not None:
            return self.lookup(keys)
        if not len(self.lbas):
            return np.zeros(len(keys), bool), np.empty(len(keys), self.recs.dtype)
        rows = np.minimum(self.lbas.searchsorted(keys), len(self.lbas) - 1)
        return self.lbas[rows] == keys, self._raw[rows].view(self.recs.dtype)


__all__ = ["FlatIndex"]
