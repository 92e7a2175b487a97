"""The flat index: the newest BIT record of every LBA, all levels in one sorted array.

With every BIT resident (bit.Bit.resident), a batch lookup still searches each BIT in
turn, newest first: about ten numpy calls per BIT, most of a random read's index cost
with a few BITs. The flat index merges what they hold once (newest record of each LBA,
tombstones kept, as a lookup over the BITs would find them) so that a batch is one
search. It is a cache of the BITs in memory, never written anywhere: lsm.LsmIndex builds
it when the reads' lookups it would have saved outweigh building it, and drops it when a
compaction or a load changes the BITs.
"""
from __future__ import annotations

import numpy as np

from .records import RecordFormat


class FlatIndex:
    def __init__(self, lbas: np.ndarray, recs: np.ndarray, owned: bool = True):
        self.lbas, self.recs = lbas, recs
        self.owned = owned              # False: the arrays are a single BIT's own

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
        """Memory of its own (none while it is a single BIT's arrays)."""
        return self.lbas.nbytes + self.recs.nbytes if self.owned else 0

    def __len__(self) -> int:
        return len(self.lbas)

    def lookup_sorted(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For sorted uint64 `keys`: which have a record, and that record (rows where
        not found are undefined), as LsmIndex.lookup_sorted."""
        if not len(self.lbas):
            return np.zeros(len(keys), bool), np.empty(len(keys), self.recs.dtype)
        i = np.minimum(self.lbas.searchsorted(keys), len(self.lbas) - 1)
        return self.lbas[i] == keys, self.recs[i]


__all__ = ["FlatIndex"]
