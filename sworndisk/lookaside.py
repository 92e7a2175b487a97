"""The lookaside cache: recently looked-up LBAs and their newest committed record.

In the spirit of the paper's Search Lookaside Radix Tree: a read of an LBA that lives in
the BITs walks every level-0 BIT and the levels below until one holds it; the cache
remembers the answer (the record value, or that the LBA is unmapped) so that the next read
of it searches nothing. It is consulted after the MemTable, which always has newer records.

Exactness: an entry must be the LBA's newest committed record. Only a committed
transaction changes that, and `CommittedState.apply` invalidates every LBA a transaction
writes (user writes and the cleaner's moves alike) or discards. Compaction and
checkpoints move records between the MemTable and the BITs but never change the newest
record of any LBA, so they leave the cache valid. Uncommitted state is never cached: the
pending batch answers for it before the committed state is asked.

Bounded: at most `limit` entries (Config.lookaside_records); the oldest go first.
"""
from __future__ import annotations

from collections import OrderedDict

from .memtable import partition

UNMAPPED = b""          # the cached answer "no record" (never a valid record value)


class Lookaside:
    def __init__(self, limit: int):
        self.limit = limit
        # OrderedDict, not dict: evicting the oldest of a plain dict (next(iter(d))) walks
        # past every slot deleted before it, which grows without bound.
        self._map: OrderedDict[int, bytes] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._map)

    def split(self, lbas: list[int]) -> tuple[dict[int, bytes], list[int]]:
        """The cached values of those of `lbas` cached (UNMAPPED: known to have no
        record), and the LBAs not cached."""
        found, rest = partition(self._map, lbas)
        self.hits += len(found)
        self.misses += len(rest)
        return found, rest

    def put_many(self, lbas: list[int], values: dict[int, bytes]) -> None:
        """Remembers each of `lbas` with its value in `values` (absent: unmapped); the
        oldest entries beyond the limit go."""
        if self.limit <= 0:
            return
        m, get = self._map, values.get
        for l in lbas:
            m[l] = get(l, UNMAPPED)
        while len(m) > self.limit:
            m.popitem(last=False)

    def invalidate(self, lbas) -> None:
        m = self._map
        if m:
            for l in lbas:
                m.pop(l, None)

    def invalidate_range(self, lo: int, hi: int) -> None:
        m = self._map
        if not m:
            return
        if hi - lo <= len(m):
            for l in range(lo, hi):
                m.pop(l, None)
        else:
            for l in [l for l in m if lo <= l < hi]:
                del m[l]

    def clear(self) -> None:
        self._map.clear()


__all__ = ["Lookaside", "UNMAPPED"]
