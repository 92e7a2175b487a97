"""The disk-oriented secure LSM-tree: the committed MemTable over levels of BITs.

Level 0 holds BITs, newest first, each a former MemTable (minor compaction). When L0 has
more than `level_ratio` BITs or `level_ratio` MemTables' worth of records, all of L0 and
L1 merge into one new L1 BIT; level i >= 1 holds a single BIT and merges into level i+1
when it exceeds its limit (layout.level_caps: sized from the bottom, which holds the
whole live index). The newest record of an LBA wins; tombstones drop out when the merge
writes the deepest level. Merges stream leaf by leaf, so memory stays bounded by a few
leaves per input whatever the disk size.

A checkpoint starts at most one merge, the shallowest due (merge.py), and it runs in the
background: paced by the blocks written (`advance`), a chunk of records at a time, so
that a commit does not stall for a rewrite of the deepest level and the crypto workers
seal new writes meanwhile. Level 0 keeps taking MemTables while it runs, and a later
checkpoint installs it once it is done. A merge runs in the background only while the
index region has room for the rest of its output and for the next MemTable's BIT
besides (checked at each checkpoint, each an upper bound: layout.bit_chunks), and
while the level-0 BITs written since it began do not fill level 0; otherwise the
checkpoint runs it to its end. A checkpoint installs at most one merge, so that the
inputs it retires are freed by its own pack and index space never has to hold a cascade
(layout.index_chunks_needed); the one it starts after an install takes no chunk before
that pack is durable.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .bit import Bit, BitBuilder, BitMeta, NodeStore
from .config import Config
from .flatindex import FlatIndex
from .layout import INDEX_CHUNK_BLOCKS, bit_chunks, level_caps, max_bit_records
from .memtable import MemTable
from .merge import Merge
from .records import TOMBSTONE_HBA, RecordFormat
from .space import IndexSpace

# With several BITs, the flat index is built once the BIT searches since the last change
# cost about what building it does (one BIT's search of a key, measured, costs about the
# copying of FLAT_BUILD_RATIO records); a single resident BIT is its own flat index.
FLAT_BUILD_RATIO = 8


class LsmIndex:
    def __init__(self, fmt: RecordFormat, store: NodeStore, config: Config, live: int,
                 space: IndexSpace, chunk_block: Callable[[int], int]):
        self.fmt = fmt
        self.store = store
        self.config = config
        self.caps = level_caps(live, config)      # limits of levels 1..; the last is bottom
        self.max_bit = max_bit_records(live, config)     # records of a MemTable's BIT
        self.space = space
        self.chunk_block = chunk_block
        self.merge: Merge | None = None         # the merge in progress (merge.py), or None
        self._credit = 0.0                      # records it may merge now (advance)
        self.merge_steps = 0                    # chunks merged between commits (advance)
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
        self.merge = None               # (none at an open; the pack's chunk map frees its chunks)
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
    def _builder(self, expect: int, bottom: bool, alloc: Callable[[], int]) -> BitBuilder:
        return BitBuilder(self.store, alloc, INDEX_CHUNK_BLOCKS, self.chunk_block,
                          expect, filtered=not bottom)

    def _finish(self, builder: BitBuilder, level: int) -> Bit | None:
        meta = builder.finish(self.next_bit_id, level)
        self.index_blocks_written += builder.blocks_written
        if meta is None:
            return None
        self.next_bit_id += 1
        return Bit(meta, self.store, builder.fence(), builder.bloom,
                   records=builder.all_records())

    def compact(self, finish: bool = False) -> list[int]:
        """Minor compaction of the whole MemTable into a new level-0 BIT (nodes written,
        no flush); then the install of a merge that is done or may not wait longer, or
        the start of the shallowest merge due. `finish` (the last checkpoint before a
        close): a merge in progress or started here is run to its end and installed.
        Returns the index chunks of retired BITs."""
        if len(self.memtable):
            recs = self.memtable.to_array()
            bottom = not any(self.levels)
            if bottom:
                recs = recs[recs["hba"] != TOMBSTONE_HBA]
            # Dropped first: the reads to come rebuild it if they pay for it, and the new
            # BIT takes its share of the resident budget (reserved when it is built).
            self._set_flat(None)
            b = self._builder(len(recs), bottom, self.space.alloc)
            b.add(recs)
            bit = self._finish(b, 0)
            if not self.levels:
                self.levels.append([])
            if bit is not None:
                self.levels[0].insert(0, bit)
            self.memtable.clear()
            self.minor_compactions += 1
        retired: list[int] = []
        if self.merge is not None:
            if not (finish or self.merge.done or not self._room_for(self._chunks_left())
                    or self._full(self._since_merge())):
                return []
            retired = self._install()
        due = next((lvl for lvl in range(len(self.levels)) if self._overfull(lvl)), None)
        if due is None or (retired and finish):
            return retired
        inputs, target, bottom = self._plan(due)
        total = sum(bit.meta.count for bit in inputs)
        if not finish and self._room_for(bit_chunks(total, self.fmt.size)):
            self._start_merge(inputs, due, target, bottom)      # in the background
        elif not retired:                   # at most one install per checkpoint
            self._start_merge(inputs, due, target, bottom)
            retired = self._install()
        return retired

    def _overfull(self, lvl: int) -> bool:
        level = self.levels[lvl]
        if lvl == 0:
            return self._full(level)
        return lvl <= len(self.caps) and bool(level) and level[0].meta.count > self.caps[lvl - 1]

    def _full(self, level0: list[Bit]) -> bool:
        """Whether these level-0 BITs are more than level 0 holds."""
        return (len(level0) > self.config.level_ratio
                or sum(b.meta.count for b in level0)
                > self.config.level_ratio * self.config.memtable_records)

    def _since_merge(self) -> list[Bit]:
        """The level-0 BITs written since the merge in progress began (none of its inputs):
        once they alone fill level 0 (checkpoints that the journal or the segment table
        called for come faster than the writes pace the merge), it is finished."""
        inputs = {id(bit) for bit in self.merge.inputs}
        return [bit for bit in self._level(0) if id(bit) not in inputs]

    def _level(self, lvl: int) -> list[Bit]:
        return self.levels[lvl] if lvl < len(self.levels) else []

    def _plan(self, lvl: int) -> tuple[list[Bit], int, bool]:
        """The merge of level `lvl` into the next one; if what they hold together would
        already be over that level's limit, into the one below it instead (and so on), in
        the same single merge: the output would spill at the very next checkpoint, and
        writing it twice costs a rewrite of the deeper level's records for nothing.
        Its inputs, target level, and whether that is the bottom."""
        target = lvl + 1
        inputs = self._level(lvl) + self._level(target)
        while (target <= len(self.caps) and any(self.levels[target + 1:])
               and sum(bit.meta.count for bit in inputs) > self.caps[target - 1]):
            target += 1
            inputs += self._level(target)
        return inputs, target, not any(self.levels[target + 1:])

    def _start_merge(self, inputs: list[Bit], lvl: int, target: int, bottom: bool) -> None:
        builder = self._builder(sum(bit.meta.count for bit in inputs), bottom,
                                self.space.alloc_building)
        self.merge = Merge(inputs, lvl, target, bottom, builder, self.fmt)
        self._credit = 0.0

    # ---- the merge in progress ----
    def merging(self) -> bool:
        return self.merge is not None

    def merge_ready(self) -> bool:
        """A merge is in progress and has merged all its inputs (a checkpoint installs it)."""
        return self.merge is not None and self.merge.done

    def merge_progress(self) -> tuple[int, int]:
        """(records merged, input records) of the merge in progress; (0, 0) if none."""
        return (self.merge.merged, self.merge.total) if self.merge is not None else (0, 0)

    def advance(self, blocks: int) -> bool:
        """Paces the merge in progress by `blocks` just written: it is given the records
        that finish it by the time 3/4 of level_ratio MemTables more are written (before
        full MemTables can fill level 0 again; checkpoints called for by the journal may
        come sooner, see _since_merge), and merges them a chunk at a time. Whether it is
        done."""
        m = self.merge
        if m is None:
            return False
        self._credit += blocks * m.total / max(1, self.config.level_ratio
                                               * self.config.memtable_records * 3 // 4)
        while self._credit > 0:
            n = m.step()
            if not n:
                break
            self._credit -= n
            self.merge_steps += 1
        return m.done

    def step_merge(self) -> None:
        """One chunk of the merge in progress, whatever the pace (an idle disk's
        background work); the last call finds the inputs exhausted (merge_ready)."""
        if self.merge is not None and self.merge.step():
            self.merge_steps += 1

    def _chunks_left(self) -> int:
        """Index chunks the merge in progress may still take, at most."""
        m = self.merge
        return bit_chunks(m.total, self.fmt.size) - len(m.chunks())

    def _room_for(self, chunks: int) -> bool:
        """Whether the index region has `chunks` free and the next MemTable's BIT besides."""
        return self.space.free() >= chunks + bit_chunks(self.max_bit, self.fmt.size)

    def _install(self) -> list[int]:
        """Finishes the merge in progress and puts its BIT in place of its inputs; the
        index chunks they held (retiring until the next pack is durable)."""
        m = self.merge
        m.run()
        for bit in m.inputs:                # their budget, before the new BIT takes its own
            bit.release()
        self._set_flat(None)
        new = self._finish(m.builder, m.target)
        self.space.settle(m.chunks())
        self.merge = None
        gone = {id(bit) for bit in m.inputs}
        while len(self.levels) <= m.target:
            self.levels.append([])
        self.levels[m.source] = [b for b in self.levels[m.source] if id(b) not in gone]
        for level in range(m.source + 1, m.target):
            self.levels[level] = []
        self.levels[m.target] = [new] if new is not None else []
        while self.levels and not self.levels[-1]:
            self.levels.pop()
        self.major_compactions += 1
        return [c for bit in m.inputs for c in bit.meta.chunks]
