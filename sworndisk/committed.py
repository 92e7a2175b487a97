"""The committed state: the secure index and the space accounting, and `apply`.

Everything here changes only through `apply(ops)`, with the operations of one committed
journal transaction. A commit calls it right after the transaction is durable; recovery
calls it with the same transactions read back from the journal. It is deterministic given
the state it starts from, so recovery rebuilds exactly the accounting the disk had.

Accounting rule (docs/cleaning.md): when a write record commits, the block that the LBA's
previous committed record named becomes invalid at that moment, exactly once; a discard
invalidates every mapped block in its range and leaves tombstones.
"""
from __future__ import annotations

import numpy as np

from .bit import NodeStore
from .config import Config
from .layout import INDEX_CHUNK_BLOCKS, Layout
from .lookaside import UNMAPPED, Lookaside
from .lsm import LsmIndex
from .ops import Discard, Op, Writes
from .records import TOMBSTONE_HBA, RecordFormat
from .segtable import SegmentTable
from .space import DataSpace, IndexSpace

_DISCARD_WINDOW = 1 << 16
SCALAR_LOOKUPS = 2


class CommittedState:
    def __init__(self, fmt: RecordFormat, store: NodeStore, segtable: SegmentTable,
                 layout: Layout, config: Config):
        self.fmt = fmt
        self.segtable = segtable
        self.space = DataSpace(segtable, layout.reserve_segments)
        self.ispace = IndexSpace(layout.index_chunks)
        self.index = LsmIndex(fmt, store, config, min(layout.nr_blocks, layout.data_blocks),
                              self.ispace,
                              lambda c: layout.index_start + c * INDEX_CHUNK_BLOCKS)
        self.lookaside = Lookaside(config.lookaside_records)

    # ---- lookups ----
    def resolve(self, lbas: list[int]) -> dict[int, bytes]:
        """The newest committed record of each LBA among `lbas` that holds data (not
        unmapped, not discarded): MemTable, then the lookaside cache, then the BITs for
        all the remaining LBAs at once (lsm.lookup_bits). When every BIT is resident, a
        search of them costs less than the cache's own bookkeeping, so the cache is
        neither asked nor filled (apply still invalidates it: it stays exact for when a
        BIT is not resident again)."""
        tomb = self.fmt.tombstone
        found, misses = self.index.memtable.split(lbas)
        cache = None if self.index.all_resident() else self.lookaside
        if misses and cache is not None:
            cached, misses = cache.split(misses)
            found.update(cached)
        if misses:
            # A few LBAs: look each up (numpy's per-call overhead, paid per BIT, outweighs
            # vectorising); many: per BIT over the sorted batch.
            in_bits = (self.index.lookup_each(misses) if len(misses) <= SCALAR_LOOKUPS
                       else self.index.lookup_bits(misses))
            if cache is not None:
                cache.put_many(misses, in_bits)
            found.update(in_bits)
        return {l: v for l, v in found.items() if v != tomb and v != UNMAPPED}

    def resolve_records(self, lbas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`resolve` for a batch, as arrays aligned with `lbas` (uint64, any order,
        repeats allowed): each LBA's newest committed record, and which of them hold
        data. While every BIT is resident this stays in numpy from the LBAs to the
        records (a gather, or a search per BIT, for the whole batch; no dict, no value
        per LBA); otherwise it is `resolve` (node by node, through the lookaside cache),
        packed."""
        fmt = self.fmt
        recs = np.empty(len(lbas), fmt.dtype)
        have = np.zeros(len(lbas), bool)
        if not self.index.batch_lookups():
            ll = lbas.tolist()
            found = self.resolve(ll)
            pos = [i for i, l in enumerate(ll) if l in found]
            if pos:
                recs[pos] = fmt.array(lbas[pos], [found[ll[i]] for i in pos])
                have[pos] = True
            return recs, have
        pos, values = self.index.memtable.find(lbas.tolist())
        rest = lbas
        if pos:
            recs[pos] = fmt.array(lbas[pos], values)
            have[pos] = True
            rest = np.flatnonzero(~have)
        if len(rest) and self.index.levels:
            if rest is lbas:                    # nothing in the MemTable: theirs as they are
                have, recs = self.index.lookup(lbas, reads=True)
            else:
                found, out = self.index.lookup(lbas[rest], reads=True)
                recs.view(fmt.opaque)[rest[found]] = out[found].view(fmt.opaque)
                have[rest[found]] = True
        have &= recs["hba"] != TOMBSTONE_HBA     # rows not had: undefined, masked
        return recs, have

    def lookup_exact(self, lbas: list[int]) -> dict[int, bytes]:
        return self.index.get_many_exact(lbas)

    def live_blocks(self, lbas: list[int]) -> int:
        """How many of `lbas` are mapped (not discarded) now."""
        return sum(1 for v in self.index.get_many_exact(lbas).values()
                   if self.fmt.hba_of(v) != TOMBSTONE_HBA)

    # ---- apply ----
    def apply(self, ops: list[Op]) -> None:
        """Applies one committed transaction's operations (no Commit/Checkpoint records)."""
        run: list[np.ndarray] = []
        for op in ops:
            if isinstance(op, Writes):
                run.append(op.records)
                continue
            if run:
                self._apply_writes(self.fmt.concat(run))
                run = []
            if isinstance(op, Discard):
                self._apply_discard(op.lba, op.count)
            else:
                raise TypeError(f"cannot apply {op!r}")
        if run:
            self._apply_writes(self.fmt.concat(run))

    def _apply_writes(self, recs: np.ndarray) -> None:
        """A run of write records, in bulk. Same result as one at a time: the last record
        of an LBA wins; the block its previous committed record named becomes invalid; an
        earlier record of the same LBA in this run never becomes valid (the blocks of this
        run were busy, so they are disjoint from every previously valid block)."""
        keys, last = np.unique(recs["lba"][::-1], return_index=True)
        if len(keys) < len(recs):
            recs = recs[len(recs) - 1 - last]           # the last record of each LBA
        else:
            recs = recs[np.argsort(recs["lba"], kind="stable")]
        mt = self.index.memtable
        if mt.is_empty():                   # every old record is in the BITs, if any
            old_hbas = self.index.lookup_records(np.ascontiguousarray(recs["lba"]))["hba"]
            if len(self.lookaside):
                self.lookaside.invalidate(recs["lba"].tolist())
            self._revalidate(old_hbas, recs)
            mt.stage(recs)
            return
        lbas, values = recs["lba"].tolist(), self.fmt.values_of(recs)
        in_mt, misses = mt.split(lbas)
        old = [np.frombuffer(b"".join(v[:8] for v in in_mt.values()), "<u8")]
        if misses:
            old.append(self.index.lookup_records(np.asarray(misses, np.uint64))["hba"])
        self.lookaside.invalidate(lbas)
        self._revalidate(np.concatenate(old), recs)
        mt.update(dict(zip(lbas, values)))

    def _revalidate(self, old_hbas: np.ndarray, recs: np.ndarray) -> None:
        """The blocks the old records named become invalid, the new records' valid."""
        self.segtable.invalidate_many(old_hbas[old_hbas != TOMBSTONE_HBA].astype(np.uint64))
        self.segtable.validate_many(recs["hba"], recs["lba"])

    def _apply_discard(self, lo: int, n: int) -> None:
        self.lookaside.invalidate_range(lo, lo + n)
        mt = self.index.memtable
        hba_of, tomb = self.fmt.hba_of, self.fmt.tombstone
        for w in range(lo, lo + n, _DISCARD_WINDOW):
            for l, old in self.index.range(w, min(lo + n, w + _DISCARD_WINDOW)).items():
                hba = hba_of(old)
                if hba != TOMBSTONE_HBA:
                    self.space.invalidate(hba)
                    mt.put(l, tomb)


__all__ = ["CommittedState"]
