"""The MemTable: the newest committed index records, in RAM until a minor compaction.

Only committed records live here (uncommitted ones wait in the engine's pending batch),
so a minor compaction may persist the whole table: that is how the paper keeps
uncommitted writes out of the BITs.

A commit's records that arrive while the table is empty (the common case when every
commit of a write burst fills it and a checkpoint empties it) are kept as the record
array they came in, sorted: `find` and `to_array` answer from it in numpy, and it becomes
a dict (one entry per record) only when a change, a range query or LBA-by-LBA lookups
need one.
"""
from __future__ import annotations

import bisect

import numpy as np

from .records import RecordFormat


class MemTable:
    def __init__(self, fmt: RecordFormat):
        self.fmt = fmt
        self.map: dict[int, bytes] = {}
        self._sorted: list[int] | None = None
        self._staged: np.ndarray | None = None     # records (sorted, unique), map empty
        self._staged_lbas: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._staged) if self._staged is not None else len(self.map)

    def is_empty(self) -> bool:
        return self._staged is None and not self.map

    def stage(self, recs: np.ndarray) -> None:
        """Adds records with sorted, unique LBAs, newer than any held: kept as they are if
        the table is empty, else merged into its dict."""
        if not len(recs):
            return
        if self.is_empty():
            recs.flags.writeable = False            # compacted as it is: nobody may change it
            self._staged, self._staged_lbas = recs, np.ascontiguousarray(recs["lba"])
        else:
            self.update(dict(zip(recs["lba"].tolist(), self.fmt.values_of(recs))))

    def get(self, lba: int) -> bytes | None:
        self._unstage()                 # lookups one LBA at a time come many at once
        return self.map.get(lba)

    def split(self, lbas) -> tuple[dict[int, bytes], list[int]]:
        """The values of those of `lbas` held here, and the others (in order)."""
        self._unstage()
        return partition(self.map, lbas)

    def find(self, lbas: list[int]) -> tuple[list[int], list[bytes]]:
        """The positions in `lbas` of those held here, and their values: nothing is
        looked at LBA by LBA when none is (the intersection is taken in C, or one search
        of staged records)."""
        if self._staged is not None:
            keys = np.asarray(lbas, np.uint64)
            at = np.minimum(self._staged_lbas.searchsorted(keys), len(self._staged) - 1)
            hit = np.flatnonzero(self._staged_lbas[at] == keys)
            return hit.tolist(), self.fmt.values_of(self._staged[at[hit]])
        m = self.map
        if not m or not m.keys() & lbas:
            return [], []
        pos = [i for i, l in enumerate(lbas) if l in m]
        return pos, [m[lbas[i]] for i in pos]

    def put(self, lba: int, value: bytes) -> None:
        self._unstage()
        if self._sorted is not None and lba not in self.map:
            self._sorted = None
        self.map[lba] = value

    def update(self, records: dict[int, bytes]) -> None:
        self._unstage()
        if self._sorted is not None and not self.map.keys() >= records.keys():
            self._sorted = None
        self.map.update(records)

    def _unstage(self) -> None:
        """Staged records into the dict (a change or a range query is coming)."""
        if self._staged is not None:
            recs, self._staged, self._staged_lbas = self._staged, None, None
            self.map = dict(zip(recs["lba"].tolist(), self.fmt.values_of(recs)))
            self._sorted = None

    def range(self, lo: int, hi: int) -> list[tuple[int, bytes]]:
        """(lba, value) with lo <= lba < hi, ascending."""
        self._unstage()
        if hi - lo <= 64:
            return [(l, self.map[l]) for l in range(lo, hi) if l in self.map]
        if self._sorted is None:
            self._sorted = sorted(self.map)
        i, j = bisect.bisect_left(self._sorted, lo), bisect.bisect_left(self._sorted, hi)
        return [(l, self.map[l]) for l in self._sorted[i:j]]

    def to_array(self) -> np.ndarray:
        """Every record, sorted by LBA."""
        if self._staged is not None:
            return self._staged
        lbas = sorted(self.map)
        return self.fmt.array(lbas, [self.map[l] for l in lbas])

    def clear(self) -> None:
        self.map.clear()
        self._sorted = None
        self._staged = self._staged_lbas = None


def partition(table: dict, keys: list) -> tuple[dict, list]:
    """{key: value} of the `keys` in `table`, and the keys not in it (in order). The
    intersection is taken in C; when it is empty (a batch of new LBAs), nothing is
    looked at key by key."""
    common = table.keys() & keys
    if not common:
        return {}, list(keys)
    return {k: table[k] for k in common}, [k for k in keys if k not in common]
