"""The MemTable: the newest committed index records, in RAM until a minor compaction.

Only committed records live here (uncommitted ones wait in the engine's pending batch),
so a minor compaction may persist the whole table: that is how the paper keeps
uncommitted writes out of the BITs.
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

    def __len__(self) -> int:
        return len(self.map)

    def get(self, lba: int) -> bytes | None:
        return self.map.get(lba)

    def split(self, lbas) -> tuple[dict[int, bytes], list[int]]:
        """The values of those of `lbas` held here, and the others (in order)."""
        return partition(self.map, lbas)

    def find(self, lbas: list[int]) -> tuple[list[int], list[bytes]]:
        """The positions in `lbas` of those held here, and their values: nothing is
        looked at LBA by LBA when none is (the intersection is taken in C)."""
        m = self.map
        if not m or not m.keys() & lbas:
            return [], []
        pos = [i for i, l in enumerate(lbas) if l in m]
        return pos, [m[lbas[i]] for i in pos]

    def put(self, lba: int, value: bytes) -> None:
        if self._sorted is not None and lba not in self.map:
            self._sorted = None
        self.map[lba] = value

    def update(self, records: dict[int, bytes]) -> None:
        if self._sorted is not None and not self.map.keys() >= records.keys():
            self._sorted = None
        self.map.update(records)

    def range(self, lo: int, hi: int) -> list[tuple[int, bytes]]:
        """(lba, value) with lo <= lba < hi, ascending."""
        if hi - lo <= 64:
            return [(l, self.map[l]) for l in range(lo, hi) if l in self.map]
        if self._sorted is None:
            self._sorted = sorted(self.map)
        i, j = bisect.bisect_left(self._sorted, lo), bisect.bisect_left(self._sorted, hi)
        return [(l, self.map[l]) for l in self._sorted[i:j]]

    def to_array(self) -> np.ndarray:
        lbas = sorted(self.map)
        return self.fmt.array(lbas, [self.map[l] for l in lbas])

    def clear(self) -> None:
        self.map.clear()
        self._sorted = None


def partition(table: dict, keys: list) -> tuple[dict, list]:
    """{key: value} of the `keys` in `table`, and the keys not in it (in order). The
    intersection is taken in C; when it is empty (a batch of new LBAs), nothing is
    looked at key by key."""
    common = table.keys() & keys
    if not common:
        return {}, list(keys)
    return {k: table[k] for k in common}, [k for k in keys if k not in common]
