"""Admission: how writes and discards get into the pending batch.

Before buffering what would not fit in free space or in the autocommit budget, the disk
commits early (docs/cleaning.md): a crash then leaves the disk as at that commit, a prefix
of the write history. Arguments are checked before they get here (by SwornDisk, and for
write_many by `write_requests`); a failure while buffering (a seal's device write) goes
through `guarded`, the disk's failure latch.
"""
from __future__ import annotations

from typing import Callable

from .batch import PendingBatch
from .committed import CommittedState
from .counters import Lifetime, Session
from .errors import InvalidArgument
from .format import BLOCK_SIZE


def write_requests(items, limit: int, check_range: Callable[[int, int], None]) -> tuple:
    """SwornDisk.write_many's (lba, data) requests as Admission.write_many takes them,
    with their blocks in all; bad arguments raise before anything is buffered. A batch
    of single 4 KiB blocks (a ublk queue's at depth) is checked in one pass, and blocks
    given as bytes need no view."""
    items = items if type(items) is list else list(items)
    if all(type(d) is bytes and len(d) == BLOCK_SIZE and type(lba) is int and 0 <= lba < limit
           for lba, d in items):
        return items, len(items)
    views = [(lba, memoryview(d).cast("B")) for lba, d in items]
    if all(type(lba) is int and len(mv) == BLOCK_SIZE and 0 <= lba < limit
           for lba, mv in views):
        return views, len(views)
    total = 0
    for lba, mv in views:
        n, rem = divmod(len(mv), BLOCK_SIZE)
        if rem or n == 0:
            raise InvalidArgument(f"write length must be a positive multiple of "
                                  f"{BLOCK_SIZE} bytes (got {len(mv)})")
        check_range(lba, n)
        total += n
    return views, total


class Admission:
    def __init__(self, batch: PendingBatch, state: CommittedState, commit: Callable[[], None],
                 budget: int, lifetime: Lifetime, session: Session, guarded: Callable):
        self.batch, self.state, self.commit = batch, state, commit
        # Unflushed blocks (written or discarded) one commit may carry: bounds the
        # MemTable's growth per commit, which sizes level 0 (layout.max_bit_records).
        self.budget = budget
        self.lifetime, self.session, self.guarded = lifetime, session, guarded

    def write(self, lba: int, mv: memoryview) -> None:
        """Buffers whole blocks at lba, committing early as it needs."""
        n = len(mv) // BLOCK_SIZE
        done = 0
        while done < n:
            k = self._make_room(lba + done, n - done)
            piece = mv if k == n else mv[done * BLOCK_SIZE:(done + k) * BLOCK_SIZE]
            self.guarded(lambda: self.batch.put(lba + done, piece))
            done += k
        self._written(n)

    def write_many(self, views: list, total: int) -> None:
        """(lba, view) writes of `total` blocks in all, in order. When the whole batch fits
        the autocommit budget and the free space, it goes into the pending batch at once;
        otherwise one write() at a time, each committing early as it needs."""
        batch = self.batch
        if total > min(self.budget - batch.unflushed,
                       self.state.space.free_blocks() - batch.buffered):
            for lba, mv in views:
                self.write(lba, mv)
            return
        self.guarded(lambda: batch.put_many(views, single=total == len(views)))
        self._written(total)

    def _written(self, n: int) -> None:
        self.lifetime.user_blocks_written += n
        self.session.user_blocks_written += n
        self._advance(n)

    def _advance(self, n: int) -> None:
        """Moves a merge in progress on by as much as `n` blocks written or discarded pay
        for (lsm.LsmIndex.advance): here, while the crypto workers seal."""
        index = self.state.index
        if index.merging():
            self.guarded(lambda: index.advance(n))

    def discard(self, lba: int, nr_blocks: int) -> None:
        """Unmaps [lba, lba+nr_blocks) in pieces of at most the budget, each committed."""
        end, batch = lba + nr_blocks, self.batch
        while lba < end:
            if batch.unflushed >= self.budget:
                self.guarded(self.commit)
            hi = min(end, lba + self.budget - batch.unflushed)
            self.guarded(lambda: batch.discard(lba, hi))    # may finish a seal
            self._advance(hi - lba)
            lba = hi
        self.lifetime.blocks_discarded += nr_blocks

    def _make_room(self, lba: int, n: int) -> int:
        """How many of blocks [lba, lba+n) may be buffered now (at least one), committing
        first if they do not all fit. NoSpaceError, with nothing of the write buffered,
        when even then the blocks it adds to the live data do not fit: possible on a thin
        disk alone (docs/cleaning.md). A write larger than the free space that does fit
        (an overwrite) goes in pieces, each committed to free the blocks it replaces."""
        k = self._room(lba, n)
        if k == n:
            return n
        self.guarded(self.commit)
        k = self._room(lba, n)
        if k < n and (k == 0 or n - self.state.live_blocks(list(range(lba, lba + n)))
                      > self.state.space.free_blocks()):
            raise self.state.space.no_space()
        return k

    def _room(self, lba: int, n: int) -> int:
        """The longest prefix of [lba, lba+n) that fits both the autocommit budget and the
        free blocks left once every buffered block is sealed."""
        batch = self.batch
        n = min(n, self.budget - batch.unflushed)
        return batch.new_blocks(lba, n, self.state.space.free_blocks() - batch.buffered)


__all__ = ["Admission"]
