"""Space allocation on the data device (log head, threaded logging) and the index region.

Invariants (the reasons for the commit protocol in disk.py):
- A data block is *valid* when the committed index maps some LBA to it. Validity changes
  only when a transaction commits: the new block becomes valid, the block it supersedes
  (found by an index lookup at commit time) becomes invalid at that moment, exactly once.
- A block written but not yet committed is *busy*: not valid, not allocatable.
- An invalid, non-busy block is free and may be reused at once: the commit that freed it
  is durable before any later write can land on it, and recovery replays the same commits.
- The segment validity table (SVT) is derived: a segment is free when it has no valid and
  no busy block and is not the log head.
"""
from __future__ import annotations

import numpy as np

from .format import SEGMENT_BLOCKS
from .errors import IntegrityError, MetadataFullError, NoSpaceError
from .segtable import NONE, SegmentTable

from .format import ICHUNK_FREE as CHUNK_FREE, ICHUNK_RETIRING as CHUNK_RETIRING
from .format import ICHUNK_USED as CHUNK_USED

CHUNK_BUILDING = 3      # in memory only: a merge's output, not yet named by a pack


HEAD_USER, HEAD_COLD = "user", "cold"


class _Head:
    """One log head: the segment it fills and how far it got."""

    def __init__(self) -> None:
        self.seg, self.off = -1, SEGMENT_BLOCKS


class DataSpace:
    """Allocation on the data device over the paged segment table (segtable.py).

    Two log heads: user writes go to the *user* head, blocks the cleaner moves to the
    *cold* head (F2FS's hot/cold separation). A moved block survived a whole segment's
    worth of overwrites, so it is likely to survive more: kept apart from fresh writes,
    its segments stay full and are not cleaned again and again."""

    def __init__(self, table: SegmentTable, reserve_segments: int):
        self.table = table
        self.nseg = table.nseg
        self.nblocks = self.nseg * SEGMENT_BLOCKS
        self.reserve = reserve_segments
        self.busy: dict[int, np.ndarray] = {}            # seg -> bool per block (sparse)
        self.seg_busy = np.zeros(self.nseg, np.int32)
        self.total_busy = 0
        self._excluded: set[int] = set()      # segments being cleaned: no allocation there
        self.seg_stamp = np.zeros(self.nseg, np.int64)   # commit seq of the last write (age)
        self.clock = 0                        # the current commit seq, for stamps
        self.heads = {HEAD_USER: _Head(), HEAD_COLD: _Head()}
        self.threaded_segments = 0            # head switches to hole filling
        self.valid = _ValidView(table)        # read-only views for tests and debugging
        self.rit = _RitView(table)

    @property
    def seg_valid(self) -> np.ndarray:
        return self.table.count

    def reset_volatile(self) -> None:
        self.busy.clear()
        self.seg_busy[:] = 0
        self.total_busy = 0
        self.heads = {name: _Head() for name in self.heads}

    # ---- commit-time accounting ----
    def validate(self, hba: int, lba: int) -> None:
        self.table.validate(hba, lba)

    def invalidate(self, hba: int) -> None:
        self.table.invalidate(hba)

    def set_busy(self, hbas, busy: bool) -> None:
        hbas = np.asarray(hbas, np.int64)
        if len(hbas) == 0:
            return
        segs = hbas // SEGMENT_BLOCKS
        for seg in np.unique(segs).tolist():
            offs = hbas[segs == seg] - seg * SEGMENT_BLOCKS
            m = self.busy.get(seg)
            if m is None:
                m = self.busy[seg] = np.zeros(SEGMENT_BLOCKS, bool)
            m[offs] = busy
            n = int(m.sum())
            self.total_busy += n - int(self.seg_busy[seg])
            self.seg_busy[seg] = n
            if not busy and self.seg_busy[seg] == 0:
                del self.busy[seg]

    def exclude(self, seg: int) -> None:
        """No allocation in `seg` (it is being cleaned) until include()."""
        self._excluded.add(seg)

    def include(self, seg: int) -> None:
        self._excluded.discard(seg)

    def excluded(self) -> set[int]:
        return set(self._excluded)

    def stamp(self, hbas) -> None:
        """Marks the segments of newly written user blocks as written now (their age
        for cost-benefit cleaning)."""
        self.seg_stamp[np.unique(np.asarray(hbas, np.int64) // SEGMENT_BLOCKS)] = self.clock

    def segment_lbas(self, seg: int) -> np.ndarray:
        """LBA per block of a segment (NONE where not valid)."""
        return self.table.detail(seg)

    # ---- queries ----
    def head_segments(self) -> list[int]:
        """The segments the log heads are filling (never free, never cleaned)."""
        return [h.seg for h in self.heads.values() if h.seg >= 0]

    def free_mask(self) -> np.ndarray:
        free = (self.table.count == 0) & (self.seg_busy == 0)
        for s in self.head_segments():
            free[s] = False
        for s in self._excluded:
            free[s] = False
        return free

    def free_segments(self) -> int:
        return int(self.free_mask().sum())

    def valid_blocks(self) -> int:
        return self.table.total_valid

    def free_blocks(self) -> int:
        return self.nblocks - self.table.total_valid - self.total_busy

    # ---- allocation ----
    def alloc(self, n: int, head: str = HEAD_USER) -> list[tuple[int, int]]:
        """n blocks as ascending (start, count) runs, from a log head or holes; they are
        busy (unallocatable) until the commit that validates or drops them."""
        runs: list[tuple[int, int]] = []
        try:
            self._alloc_into(runs, n, self.heads[head])
        except NoSpaceError:
            for start, count in runs:      # all or nothing
                self.set_busy(range(start, start + count), False)
            raise
        return runs

    def _alloc_into(self, runs: list, n: int, head: _Head) -> None:
        while n > 0:
            if head.off >= SEGMENT_BLOCKS:
                self._new_head(head)
            seg, base = head.seg, head.seg * SEGMENT_BLOCKS
            window = self.table.detail(seg)[head.off:] == NONE
            busy = self.busy.get(seg)
            if busy is not None:
                window &= ~busy[head.off:]
            idx = np.flatnonzero(window)[:n]
            if len(idx) == 0:
                head.off = SEGMENT_BLOCKS
                continue
            hbas = base + head.off + idx
            head.off += int(idx[-1]) + 1
            self.set_busy(hbas, True)     # at once: a later head choice must not see them free
            n -= len(idx)
            cuts = np.flatnonzero(np.diff(hbas) != 1) + 1
            for run in np.split(hbas, cuts):
                start, count = int(run[0]), len(run)
                if runs and runs[-1][0] + runs[-1][1] == start:
                    runs[-1] = (runs[-1][0], runs[-1][1] + count)
                else:
                    runs.append((start, count))

    def _new_head(self, head: _Head) -> None:
        """Normal logging into a free segment while they last beyond the reserve;
        threaded logging (filling holes of used segments) when they run low."""
        previous, head.seg = head.seg, -1      # this head's segment may be chosen again:
        free = np.flatnonzero(self.free_mask())  # it may have holes behind its offset
        # A segment another head is filling was free when it took it: it counts toward
        # the reserve, so that two heads do not push the disk into threaded logging.
        if len(free) + len(self.head_segments()) > self.reserve:
            after = free[free > previous]
            self._set_head(head, int(after[0] if len(after) else free[0]), threaded=False)
            return
        holes = SEGMENT_BLOCKS - self.table.count - self.seg_busy
        holes[list(self._excluded)] = 0        # (two heads may share a segment's holes:
        holes[free] = 0                        # busy marks keep them apart) whole free
                                               # segments are the reserve, used last
        best = int(np.argmax(holes))
        if holes[best] > 0:
            self._set_head(head, best, threaded=True)
            return
        if len(free):
            self._set_head(head, int(free[0]), threaded=False)
            return
        raise self.no_space()

    def no_space(self) -> NoSpaceError:
        return NoSpaceError(
            f"the data device is full: {self.valid_blocks()} valid and "
            f"{self.total_busy} unflushed blocks in {self.nblocks}; "
            f"discard data or flush more often")

    def _set_head(self, head: _Head, seg: int, threaded: bool) -> None:
        head.seg, head.off = seg, 0
        self.threaded_segments += threaded


class _ValidView:
    """space.valid[h] / space.valid[a:b]: is the block valid (computed from the table)."""

    def __init__(self, table: SegmentTable):
        self.table = table

    def __getitem__(self, idx):
        return _RitView(self.table)[idx] != NONE

    def sum(self) -> int:
        return int(self.table.count.sum())


class _RitView:
    """space.rit[h]: the LBA a block holds, NONE if none (computed from the table)."""

    def __init__(self, table: SegmentTable):
        self.table = table

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(self.table.nseg * SEGMENT_BLOCKS))
        if np.ndim(idx) == 0:
            h = int(idx)
            return self.table.detail(h // SEGMENT_BLOCKS)[h % SEGMENT_BLOCKS]
        idx = np.asarray(idx, np.int64)
        return np.array([self.table.detail(int(h) // SEGMENT_BLOCKS)[int(h) % SEGMENT_BLOCKS]
                         for h in idx], np.uint32)


class IndexSpace:
    """Index chunks: free, used by a live BIT, retiring (freed at the next checkpoint), or
    building: written by a merge in progress (merge.py), used once it is installed. A pack
    records a building chunk as free (`packed`): no BIT it names is there, so after a
    crash the chunk is free again."""

    def __init__(self, nchunks: int):
        self.state = np.zeros(nchunks, np.uint8)

    def alloc(self) -> int:
        return self._take(CHUNK_USED)

    def alloc_building(self) -> int:
        """A chunk for a merge in progress."""
        return self._take(CHUNK_BUILDING)

    def _take(self, state: int) -> int:
        free = np.flatnonzero(self.state == CHUNK_FREE)
        if len(free) == 0:
            raise MetadataFullError("the index region is full")
        c = int(free[0])
        self.state[c] = state
        return c

    def settle(self, chunks: list[int]) -> None:
        """A merge's chunks, now its installed BIT's."""
        self._expect(chunks, CHUNK_BUILDING)
        self.state[chunks] = CHUNK_USED

    def _expect(self, chunks: list[int], state: int) -> None:
        if chunks and not (self.state[chunks] == state).all():
            raise AssertionError(f"index chunks {chunks} are not all in state {state}")

    def packed(self) -> np.ndarray:
        """The chunk map as a checkpoint pack records it (building chunks free)."""
        out = self.state.copy()
        out[out == CHUNK_BUILDING] = CHUNK_FREE
        return out

    def free(self) -> int:
        return int((self.state == CHUNK_FREE).sum())

    def load(self, state) -> None:
        """The chunk map of a checkpoint pack; retiring chunks are free once it is durable.
        A pack written before the index region grew (a resize) names fewer chunks: the
        others are free."""
        state = np.asarray(state, np.uint8)
        if len(state) > len(self.state):
            raise IntegrityError("the chunk map names more index chunks than the region has")
        self.state = np.zeros(len(self.state), np.uint8)
        self.state[:len(state)] = state
        self.release_retired()

    def retire(self, chunks) -> None:
        self.state[list(chunks)] = CHUNK_RETIRING

    def release_retired(self) -> None:
        """After a checkpoint is durable, no committed state references retired chunks."""
        self.state[self.state == CHUNK_RETIRING] = CHUNK_FREE

    def used(self) -> int:
        return int((self.state != CHUNK_FREE).sum())
