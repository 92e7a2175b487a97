"""The disk-oriented secure LSM-tree: the committed MemTable over levels of BITs.

Level 0 holds BITs, newest first, each a former MemTable (minor compaction). When L0 has
more than `level_ratio` BITs or `level_ratio` MemTables' worth of records, all of L0 and
L1 merge into one new L1 BIT; level i >= 1 holds a single BIT and merges into level i+1
when it exceeds its limit (layout.level_caps: sized from the bottom, which holds the
whole live index). A compaction does at most one merge, the shallowest due, so that the
inputs it retires are freed by the very next checkpoint and index space never has to
hold a whole cascade (layout.index_chunks_needed). The newest record of an LBA wins;
tombstones drop out when the merge writes the deepest level. Merges stream leaf by leaf,
so memory stays bounded by a few leaves per input whatever the disk size.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .bit import Bit, BitBuilder, BitMeta, NodeStore
from .config import Config
from .flatindex import FlatIndex
from .layout import INDEX_CHUNK_BLOCKS, level_caps
from .memtable import MemTable
from .records import TOMBSTONE_HBA, RecordFormat, u64

# With several BITs, the flat index is built once the BIT searches since the last change
# cost about what building it does (one BIT's search of a key, measured, costs about the
# copying of FLAT_BUILD_RATIO records); a single resident BIT is its own flat index.
FLAT_BUILD_RATIO = 8


class LsmIndex:
    def __init__(self, fmt: RecordFormat, store: NodeStore, config: Config, live: int,
                 alloc_chunk: Callable[[], int], chunk_block: Callable[[int], int]):
        self.fmt = fmt
        self.store = store
        self.config = config
        self.caps = level_caps(live, config)      # limits of levels 1..; the last is bottom
        self.alloc_chunk = alloc_chunk
        self.chunk_block = chunk_block
        self.memtable = MemTable(fmt)
        self.levels: list[list[Bit]] = []
        self.next_bit_id = 1
        self.minor_compactions = 0
        self.major_compactions = 0
        self.index_blocks_written = 0
        self._flat: FlatIndex | None = None     # every BIT merged (flatindex.py), or None
        self._flat_bytes = 0                    # its share of the store's resident budget
        self._probes = 0                        # BIT searches of a key since it was dropped

    # ---- catalog ----
    def bits(self) -> list[Bit]:
        """All BITs, newest first (L0 newest to oldest, then L1, L2, ...)."""
        return [b for level in self.levels for b in level]

    def catalog(self) -> list[dict]:
        return [b.meta.to_dict() for b in self.bits()]

    def load(self, catalog: list[dict], next_bit_id: int, minor_compactions: int = 0,
             major_compactions: int = 0) -> None:
        """The index of a checkpoint pack: its BIT catalog and compaction counts."""
        self.minor_compactions, self.major_compactions = minor_compactions, major_compactions
        self._set_flat(None)
        for bit in self.bits():
            bit.release()
        self.levels = []
        metas = [BitMeta.from_dict(d) for d in catalog]
        bottom = max((m.level for m in metas), default=0)
        for meta in metas:
            while len(self.levels) <= meta.level:
                self.levels.append([])
            self.levels[meta.level].append(Bit(meta, self.store,
                                               want_filter=meta.level < bottom))
        self.next_bit_id = next_bit_id

    # ---- lookups ----
    def get(self, lba: int) -> bytes | None:
        v = self.memtable.get(lba)
        if v is not None:
            return v
        for bit in self.bits():
            v = bit.get(lba)
            if v is not None:
                return v
        return None

    def all_resident(self) -> bool:
        """True if every BIT is held whole in memory (Bit.resident)."""
        return all(bit.resident() is not None for level in self.levels for bit in level)

    def batch_lookups(self) -> bool:
        """True if lookup_sorted stays in numpy for a whole batch: there is a flat index,
        or every BIT is resident (and a flat index may be built from them)."""
        return self._flat is not None or self.all_resident()

    def lookup_each(self, lbas: list[int]) -> dict[int, bytes]:
        """Newest BIT record for each LBA (MemTable not consulted), one lookup per LBA."""
        out = {}
        for l in lbas:
            for bit in self.bits():
                v = bit.get(l)
                if v is not None:
                    out[l] = v
                    break
        return out

    def lookup_bits(self, lbas: list[int]) -> dict[int, bytes]:
        """Newest BIT record for each LBA (MemTable not consulted), batched per BIT."""
        if not lbas or not self.levels:
            return {}
        hit = self.lookup_records(np.unique(np.asarray(lbas, np.uint64)))
        return dict(zip(hit["lba"].tolist(), self.fmt.values_of(hit)))

    def lookup_records(self, keys: np.ndarray) -> np.ndarray:
        """The newest BIT record of each of `keys` (sorted, unique uint64) that has one,
        as a record array in LBA order (MemTable not consulted)."""
        found, out = self.lookup_sorted(keys)
        return out[found]

    def lookup(self, keys: np.ndarray, reads: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """lookup_sorted for uint64 `keys` in any order, its answers aligned with them:
        one gather through the flat index's direct table when it has one, else sorted,
        searched and put back in order."""
        if self._flat is not None and self._flat.direct:
            return self._flat.lookup(keys)
        order = np.argsort(keys, kind="stable")
        found_sorted, out_sorted = self.lookup_sorted(keys[order], reads)
        found, out = np.empty_like(found_sorted), np.empty_like(out_sorted)
        found[order] = found_sorted
        out.view(self.fmt.opaque)[order] = out_sorted.view(self.fmt.opaque)
        return found, out

    def lookup_sorted(self, keys: np.ndarray, reads: bool = False
                      ) -> tuple[np.ndarray, np.ndarray]:
        """For sorted uint64 `keys` (repeats allowed): which have a BIT record, and the
        newest one of each (rows where not found are undefined). MemTable not consulted.
        `reads`: a read's lookup, which counts toward building a flat index of several
        BITs (a commit's lookups do not: a write burst would pay for building it anew
        after every minor compaction, and reads barely come)."""
        if self._flat is not None:
            return self._flat.lookup_sorted(keys)
        found = np.zeros(len(keys), bool)
        out = np.empty(len(keys), self.fmt.dtype)
        bits = self.bits()
        for bit in bits:
            bit.lookup_many(keys, found, out)
            if found.all():
                break
        if reads:
            self._probes += len(keys) * len(bits)
        if len(bits) == 1 or self._probes * FLAT_BUILD_RATIO >= self._records():
            self.flatten()
        return found, out

    # ---- the flat index ----
    def flatten(self) -> bool:
        """Builds the flat index now if every BIT is resident and it fits the store's
        resident budget; whether there is one."""
        if self._flat is None and self.all_resident():
            self._probes = 0
            bits = self.bits()
            if len(bits) == 1 or self.store.resident.room() >= self._records() * (
                    self.fmt.size + 8):             # at most that much: not built to no use
                self._set_flat(FlatIndex.merged([bit.resident() for bit in bits], self.fmt))
        return self._flat is not None

    def flat_records(self) -> int:
        """Records in the flat index (0: none)."""
        return len(self._flat) if self._flat is not None else 0

    def flat_direct(self) -> bool:
        """Whether the flat index has its direct table (lookups in any order)."""
        return self._flat is not None and self._flat.direct

    def _records(self) -> int:
        return sum(bit.meta.count for bit in self.bits())

    def _set_flat(self, flat: FlatIndex | None) -> None:
        """Replaces the flat index (None drops it), within the resident budget, with its
        direct table if that fits too."""
        self.store.release_resident(self._flat_bytes)
        self._flat, self._flat_bytes, self._probes = None, 0, 0
        if flat is not None and self.store.reserve_resident(flat.nbytes):
            table = flat.direct_nbytes()
            if table and self.store.reserve_resident(table):
                flat.build_direct()
            self._flat, self._flat_bytes = flat, flat.nbytes

    def range(self, lo: int, hi: int) -> dict[int, bytes]:
        """Newest committed value of every mapped LBA in [lo, hi) (tombstones included)."""
        out = dict(self.memtable.range(lo, hi))
        for bit in self.bits():
            recs = bit.range(lo, hi)
            if len(recs):
                for lba, v in zip(recs["lba"].tolist(), self.fmt.values_of(recs)):
                    out.setdefault(lba, v)
        return out

    def get_many_exact(self, lbas: list[int]) -> dict[int, bytes]:
        """Committed value of each given LBA: MemTable first, then a batched BIT lookup."""
        out = {}
        misses = []
        for l in lbas:
            v = self.memtable.get(l)
            if v is None:
                misses.append(l)
            else:
                out[l] = v
        out.update(self.lookup_bits(misses))
        return out

    def get_many(self, lbas: list[int]) -> dict[int, bytes]:
        if len(lbas) <= 4:
            res = {}
            for l in lbas:
                v = self.get(l)
                if v is not None:
                    res[l] = v
            return res
        return self.range(min(lbas), max(lbas) + 1)

    # ---- compaction ----
    def _builder(self, expect: int, bottom: bool) -> BitBuilder:
        return BitBuilder(self.store, self.alloc_chunk, INDEX_CHUNK_BLOCKS, self.chunk_block,
                          expect, filtered=not bottom)

    def _finish(self, builder: BitBuilder, level: int) -> Bit | None:
        meta = builder.finish(self.next_bit_id, level)
        self.index_blocks_written += builder.blocks_written
        if meta is None:
            return None
        self.next_bit_id += 1
        return Bit(meta, self.store, builder.fence(), builder.bloom,
                   records=builder.all_records())

    def compact(self) -> list[int]:
        """Minor compaction of the whole MemTable, then major compactions as needed.
        Writes BIT nodes (no flush); returns the index chunks of retired BITs."""
        retired: list[int] = []
        if len(self.memtable):
            recs = self.memtable.to_array()
            bottom = not any(self.levels)
            if bottom:
                recs = recs[recs["hba"] != TOMBSTONE_HBA]
            # Dropped first: the reads to come rebuild it if they pay for it, and the new
            # BIT takes its share of the resident budget (reserved when it is built).
            self._set_flat(None)
            b = self._builder(len(recs), bottom)
            b.add(recs)
            bit = self._finish(b, 0)
            if not self.levels:
                self.levels.append([])
            if bit is not None:
                self.levels[0].insert(0, bit)
            self.memtable.clear()
            self.minor_compactions += 1
        due = next((lvl for lvl in range(len(self.levels)) if self._overfull(lvl)), None)
        if due is not None:
            retired += self._merge_down(due)
        while self.levels and not self.levels[-1]:
            self.levels.pop()
        return retired

    def _overfull(self, lvl: int) -> bool:
        level = self.levels[lvl]
        if lvl == 0:
            return (len(level) > self.config.level_ratio
                    or sum(b.meta.count for b in level)
                    > self.config.level_ratio * self.config.memtable_records)
        return lvl <= len(self.caps) and bool(level) and level[0].meta.count > self.caps[lvl - 1]

    def _merge_down(self, lvl: int) -> list[int]:
        """Merges level `lvl` into the next one; if what they hold together would already
        be over that level's limit, into the one below it instead (and so on), in the
        same single merge: the output would spill at the very next checkpoint, and
        writing it twice costs a rewrite of the deeper level's records for nothing."""
        if lvl + 1 == len(self.levels):
            self.levels.append([])
        target = lvl + 1
        inputs = self.levels[lvl] + self.levels[target]
        while (target <= len(self.caps) and any(self.levels[target + 1:])
               and sum(bit.meta.count for bit in inputs) > self.caps[target - 1]):
            target += 1
            inputs += self.levels[target]
        bottom = not any(self.levels[target + 1:])
        b = self._builder(sum(bit.meta.count for bit in inputs), bottom)
        for recs in merge_streams([bit.leaves() for bit in inputs], self.fmt):
            if bottom:
                recs = recs[recs["hba"] != TOMBSTONE_HBA]
            b.add(recs)
        for bit in inputs:
            bit.release()
        self._set_flat(None)
        new = self._finish(b, target)
        retired = [c for bit in inputs for c in bit.meta.chunks]
        for level in range(lvl, target):
            self.levels[level] = []
        self.levels[target] = [new] if new is not None else []
        self.major_compactions += 1
        return retired


MERGE_CHUNK_RECORDS = 4096


def merge_streams(streams: list, fmt: RecordFormat) -> "iter[np.ndarray]":
    """Merges sorted record streams (index 0 newest) into one, newest record per LBA.

    Each step takes everything up to the smallest last-buffered LBA among the inputs, so
    no input can still hold a smaller LBA. Inputs are read in chunks of a few thousand
    records (several leaves), so that the numpy work of a step is spread over many
    records; memory stays a chunk per input. Each chunk keeps its LBAs as a contiguous
    array for the searches and the sort, and records move as opaque bytes (numpy copies
    a structured dtype field by field)."""
    streams = [_chunked(s, fmt) for s in streams]
    bufs = [next(s, None) for s in streams]
    raw = fmt.opaque
    while True:
        live = [i for i, b in enumerate(bufs) if b is not None]
        if not live:
            return
        cut = u64(min(int(bufs[i][1][-1]) for i in live))
        parts, keys = [], []
        for i in live:
            recs, lbas = bufs[i]
            k = int(lbas.searchsorted(cut, side="right"))
            if k:
                parts.append(recs[:k].view(raw))
                keys.append(lbas[:k])
            bufs[i] = (recs[k:], lbas[k:]) if k < len(recs) else next(streams[i], None)
        if len(parts) == 1:
            yield parts[0].view(fmt.dtype)
            continue
        lbas = np.concatenate(keys)
        order = np.argsort(lbas, kind="stable")     # equal LBAs: the newer input first
        lbas = lbas[order]
        first = np.empty(len(lbas), bool)
        first[0] = True
        np.not_equal(lbas[1:], lbas[:-1], out=first[1:])
        yield np.concatenate(parts)[order[first]].view(fmt.dtype)


def _chunked(stream, fmt: RecordFormat) -> "iter[tuple[np.ndarray, np.ndarray]]":
    """The arrays of `stream` joined into chunks of at least MERGE_CHUNK_RECORDS, each
    with its LBAs as a contiguous array."""
    parts, n = [], 0
    for recs in stream:
        parts.append(recs)
        n += len(recs)
        if n >= MERGE_CHUNK_RECORDS:
            chunk = fmt.concat(parts)
            yield chunk, np.ascontiguousarray(chunk["lba"])
            parts, n = [], 0
    if parts:
        chunk = fmt.concat(parts)
        yield chunk, np.ascontiguousarray(chunk["lba"])


