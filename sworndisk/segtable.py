"""The segment table: per-data-segment valid map and reverse index (DST + RIT), paged.

For each data segment, a *detail* is one 4 KiB array of 1024 u32: the LBA stored in each
block, or NONE when the block holds nothing valid. So the detail is both the segment's
valid bitmap (DST) and its reverse index (RIT). Details live on the meta device in the
segment-table region, one encrypted block each (fresh random key, like a BIT node); the
checkpoint pack holds the directory (per segment: block, key, nonce, MAC, valid count).

RAM holds only the directory and the counts (about 70 bytes per 4 MiB segment, 18 MiB per
TiB) plus a bounded cache of details: a disk of any size opens without per-block state.
Details changed since the last checkpoint are dirty and pinned; a checkpoint writes them
out of place (so the previous pack's details stay intact until the new pack is durable)
and the engine checkpoints early when too many are dirty.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from . import crypto
from .format import BLOCK_SIZE, SEGMENT_BLOCKS
from .device import BlockDevice
from .errors import IntegrityError, MetadataFullError

from .format import DETAIL_DTYPE, DETAIL_NONE as NONE, NO_BLOCK as _NO_BLOCK
from .format import segdir_dtype as dir_dtype


class SegmentTable:
    def __init__(self, meta: BlockDevice, nseg: int, key_bytes: int, region_start: int,
                 region_blocks: int, cache_segments: int):
        self.meta = meta
        self.nseg = nseg
        self.key_bytes = key_bytes
        self.region_start = region_start
        self.region_blocks = region_blocks
        self.dir = np.zeros(nseg, dir_dtype(key_bytes))
        self.dir["hba"] = _NO_BLOCK
        self.count = np.zeros(nseg, np.int32)
        self.total_valid = 0                  # == count.sum(), kept for the write path
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_limit = max(8, cache_segments)
        self.dirty: set[int] = set()
        self.region_used = np.zeros(region_blocks, bool)
        self.retiring: list[int] = []
        self.loads = 0
        self.blocks_written = 0

    # ---- persistence ----
    def cached_count(self) -> int:
        return len(self.cache)

    def dirty_count(self) -> int:
        return len(self.dirty)

    def load(self, directory: np.ndarray) -> None:
        """The directory of a checkpoint pack; one written before the disk grew is
        shorter, and the segments it does not name are empty."""
        if len(directory) > self.nseg:
            raise IntegrityError("the segment table directory names more segments than the "
                                 "disk has")
        self.dir = np.zeros(self.nseg, directory.dtype)
        self.dir["hba"] = _NO_BLOCK
        self.dir[:len(directory)] = directory
        self.count = self.dir["count"].astype(np.int32)
        self.total_valid = int(self.count.sum())
        self.cache.clear()
        self.dirty.clear()
        self.retiring = []
        self.region_used[:] = False
        used = self.dir["hba"][self.dir["hba"] != _NO_BLOCK].astype(np.int64) - self.region_start
        if len(used) and (used.min() < 0 or used.max() >= self.region_blocks):
            raise IntegrityError("segment table directory points outside its region")
        self.region_used[used] = True

    def directory(self) -> np.ndarray:
        d = self.dir.copy()
        d["count"] = self.count
        return d

    # ---- details ----
    def detail(self, seg: int) -> np.ndarray:
        """The segment's u32 LBA-per-block array (NONE = not valid); cached."""
        d = self.cache.get(seg)
        if d is not None:
            self.cache.move_to_end(seg)
            return d
        e = self.dir[seg]
        if e["hba"] == _NO_BLOCK:
            d = np.full(SEGMENT_BLOCKS, NONE, np.uint32)
        else:
            hba = int(e["hba"])
            ct = self.meta.pread(BLOCK_SIZE, hba * BLOCK_SIZE)
            pt = crypto.decrypt(e["key"].tobytes(), e["nonce"].tobytes(), ct, e["mac"].tobytes(),
                                f"segment table block for data segment {seg} (meta block {hba})")
            d = np.frombuffer(pt, DETAIL_DTYPE).astype(np.uint32)
            if int((d != NONE).sum()) != int(self.count[seg]):
                raise IntegrityError(f"segment table block for data segment {seg} disagrees "
                                     f"with its valid count")
            self.loads += 1
        self.cache[seg] = d
        self._evict(keep=seg)
        return d

    def _evict(self, keep: int = -1) -> None:
        """Drops clean details, oldest first; never `keep`, which the caller is about to
        change (evicting it would lose the change)."""
        while len(self.cache) > self.cache_limit:
            for seg in self.cache:
                if seg not in self.dirty and seg != keep:
                    del self.cache[seg]
                    break
            else:
                return          # everything cached is dirty: the engine checkpoints soon

    def validate(self, hba: int, lba: int) -> None:
        seg, off = divmod(hba, SEGMENT_BLOCKS)
        if seg >= self.nseg:
            raise IntegrityError(f"index record points outside the data device (block {hba})")
        d = self.detail(seg)
        if d[off] == NONE:
            self.count[seg] += 1
            self.total_valid += 1
        d[off] = lba
        self.dirty.add(seg)

    def invalidate(self, hba: int) -> None:
        seg, off = divmod(hba, SEGMENT_BLOCKS)
        if seg >= self.nseg:
            return
        d = self.detail(seg)
        if d[off] != NONE:
            d[off] = NONE
            self.count[seg] -= 1
            self.total_valid -= 1
            self.dirty.add(seg)

    def validate_many(self, hbas: np.ndarray, lbas: np.ndarray) -> None:
        """validate() for many blocks, one segment at a time."""
        for seg, offs, sel in self._by_segment(hbas):
            d = self.detail(seg)
            added = int((d[offs] == NONE).sum())
            d[offs] = lbas[sel]
            self.count[seg] += added
            self.total_valid += added
            self.dirty.add(seg)

    def invalidate_many(self, hbas: np.ndarray) -> None:
        if len(hbas) == 0:
            return
        hbas = np.unique(np.asarray(hbas, np.int64))    # sorted: segments in runs
        self._check_hbas(int(hbas[0]), int(hbas[-1]))
        segs = hbas // SEGMENT_BLOCKS
        cuts = (np.flatnonzero(np.diff(segs)) + 1).tolist()
        for a, b in zip([0] + cuts, cuts + [len(hbas)]):
            seg, offs = int(segs[a]), hbas[a:b] % SEGMENT_BLOCKS
            d = self.detail(seg)
            removed = int((d[offs] != NONE).sum())
            if removed:
                d[offs] = NONE
                self.count[seg] -= removed
                self.total_valid -= removed
                self.dirty.add(seg)

    def _check_hbas(self, lo: int, hi: int) -> None:
        if lo < 0 or hi >= self.nseg * SEGMENT_BLOCKS:
            raise IntegrityError("an index record points outside the data device")

    def _by_segment(self, hbas: np.ndarray):
        """(segment, offsets, selection) groups of an HBA array, checked against the device."""
        if len(hbas) == 0:
            return
        hbas = np.asarray(hbas, np.int64)
        self._check_hbas(int(hbas.min()), int(hbas.max()))
        segs = hbas // SEGMENT_BLOCKS
        order = np.argsort(segs, kind="stable")
        segs_sorted = segs[order]
        cuts = np.flatnonzero(np.diff(segs_sorted)) + 1
        for sel in np.split(order, cuts):
            yield int(segs[sel[0]]), hbas[sel] % SEGMENT_BLOCKS, sel

    # ---- checkpoint ----
    def write_dirty(self) -> int:
        """Writes dirty details out of place; the blocks they replace retire until the
        next checkpoint is durable (release_retired)."""
        n = 0
        writes = []                 # all written together (io_uring), before the pack
        free = iter(np.flatnonzero(~self.region_used).tolist())
        for seg in sorted(self.dirty):
            d = self.cache[seg]
            old = self.dir[seg]["hba"]
            if self.count[seg] == 0:
                self.dir[seg]["hba"] = _NO_BLOCK     # an empty segment needs no block
            else:
                blk = next(free, None)
                if blk is None:
                    raise MetadataFullError("the segment table region is full")
                self.region_used[blk] = True
                blk += self.region_start
                key = crypto.random_bytes(self.key_bytes)
                nonce = crypto.random_bytes(crypto.NONCE_BYTES)
                ct, mac = crypto.encrypt(key, nonce, d.astype("<u4").tobytes())
                writes.append((ct, blk * BLOCK_SIZE))
                self.dir[seg] = (blk, key, nonce, mac, 0)
                n += 1
            if old != _NO_BLOCK:
                self.retiring.append(int(old) - self.region_start)
        self.meta.pwrite_many(writes)
        self.dirty.clear()
        self._evict()
        self.blocks_written += n
        return n

    def move(self, region_start: int, region_blocks: int) -> int:
        """Copies every detail block into a new region (at the same offset: it is at
        least as large) and points the directory there; returns the blocks copied. For a
        resize (resize.py): the old region is left as it was, and the blocks need no
        re-encryption since nothing binds them to where they are."""
        if region_blocks < self.region_blocks or self.dirty or self.retiring:
            raise ValueError("the segment table moves only when clean, to a region as large")
        hbas = self.dir["hba"]
        named = np.flatnonzero(hbas != _NO_BLOCK)
        for seg in named.tolist():
            old = int(hbas[seg])
            ct = self.meta.pread(BLOCK_SIZE, old * BLOCK_SIZE)
            self.meta.pwrite(ct, (region_start + old - self.region_start) * BLOCK_SIZE)
        hbas[named] += region_start - self.region_start
        used = np.zeros(region_blocks, bool)
        used[:self.region_blocks] = self.region_used
        self.region_start, self.region_blocks, self.region_used = region_start, region_blocks, used
        return len(named)

    def release_retired(self) -> None:
        if self.retiring:
            self.region_used[self.retiring] = False
            self.retiring = []
