"""Segment cleaning: turn partially valid data segments back into free ones.

A victim's still-valid blocks are found through the DST bitmap, their LBAs through the
RIT, and each is confirmed against the index (the RIT is only a hint: a block moves only
if the committed index still maps its LBA to it, and nothing newer is pending). Each is
verified (decrypted with its record's key) before it moves: a block tampered with while
the disk was online would otherwise be copied, and its place reused, turning one bad
block into permanent loss. One that fails stays where it is, keeps its segment from
being cleaned, and is reported (log and stats). The ciphertext moves as is, with its
key, nonce and MAC: no new key material, and a replay of the old copy at the old place
stays useless because no record points there any more. The moves are ordinary uncommitted write records; the victim frees itself
when they commit, by the commit-time invalidation that every overwrite uses.

Policy (see docs/cleaning.md): threaded logging (filling holes of used segments) absorbs
writes when free segments run low, so cleaning is never needed for progress; it runs only
where it is cheap: victims at most 15% valid in the foreground (35% when idle), greedy when free segments are at the
reserve, cost-benefit (age x free / valid) otherwise. Work per step is one segment.
"""
from __future__ import annotations

import errno
import logging
from typing import Callable

import numpy as np

from . import crypto
from .batch import PendingBatch
from .committed import CommittedState
from .format import BLOCK_SIZE, SEGMENT_BLOCKS
from .device import BlockDevice
from .errors import IntegrityError
from .segtable import NONE
from .space import HEAD_COLD
from .counters import Lifetime

log = logging.getLogger("sworndisk.cleaner")


class Cleaner:
    """Works on the parts it needs: the committed state (where blocks are, what is valid),
    the pending batch (what is newer, where moves are staged) and the data device."""

    def __init__(self, state: CommittedState, batch: PendingBatch, data: BlockDevice,
                 lifetime: Lifetime, foreground_util: float = 0.15,
                 background_util: float = 0.35):
        self.state = state
        self.batch = batch
        self.data = data
        self.lifetime = lifetime
        # Victims at most this valid: foreground cleaning (in flush, while a request
        # waits, at every flush under pressure) only where it is cheapest; background
        # cleaning (idle queues) may spend more, since no request waits for it.
        self.foreground_util = foreground_util
        self.background_util = background_util
        self.quarantined: set[int] = set()    # segments holding a block that failed to verify

    def step(self, greedy: bool, commit: Callable[[], None], victim: int | None = None) -> bool:
        """Cleans one victim (picked, unless given) and commits its moves with `commit`.
        False if nothing was worth cleaning or there was no room to move into."""
        if victim is None:
            victim = self.pick_victim(greedy)
            if victim is None:
                return False
        sp = self.state.space
        sp.exclude(victim)                # no allocation in the victim while it is cleaned
        try:
            moved = self.clean(victim)
            commit()
        finally:
            sp.include(victim)
        return moved is not None

    def pick_victim(self, greedy: bool) -> int | None:
        sp = self.state.space
        used = (sp.seg_valid > 0) & (sp.seg_busy == 0)
        used[sp.head_segments()] = False
        for s in sp.excluded() | self.quarantined:
            used[s] = False
        limit = self.foreground_util if greedy else self.background_util
        cand = np.flatnonzero(used & (sp.seg_valid <= int(limit * SEGMENT_BLOCKS)))
        if len(cand) == 0:
            return None
        u = sp.seg_valid[cand] / SEGMENT_BLOCKS
        if greedy:
            return int(cand[np.argmin(u)])
        age = (sp.clock - sp.seg_stamp[cand] + 1).astype(float)
        return int(cand[np.argmax((1 - u) * age / (1 + u))])

    def clean(self, victim: int) -> int | None:
        """Moves the victim's valid blocks (uncommitted; the victim must be excluded from
        allocation); returns how many moved, or None if there is no room outside the
        victim to move them into (nothing staged)."""
        sp, fmt, batch = self.state.space, self.state.fmt, self.batch
        base = victim * SEGMENT_BLOCKS
        seg_lbas = sp.segment_lbas(victim)
        offs = np.flatnonzero(seg_lbas != NONE)
        if len(offs) == 0:
            return 0
        live = [(base + int(o), int(seg_lbas[o])) for o in offs
                if not batch.superseded(int(seg_lbas[o]))]
        committed = self.state.lookup_exact([l for _, l in live])
        moves = []
        for h, l in live:
            v = committed.get(l)
            if v is None or fmt.hba_of(v) != h:
                raise IntegrityError(
                    f"reverse index says data block {h} holds LBA {l}, but the index disagrees")
            moves.append((h, l, v))
        if not moves:
            return 0
        holes = SEGMENT_BLOCKS - int(sp.seg_valid[victim]) - int(sp.seg_busy[victim])
        if len(moves) > sp.free_blocks() - batch.buffered - holes:
            return None
        raw = self.data.pread(SEGMENT_BLOCKS * BLOCK_SIZE, base * BLOCK_SIZE)
        if len(raw) != SEGMENT_BLOCKS * BLOCK_SIZE:
            # A device fault, not tampering: failing here keeps the victim out of quarantine.
            raise OSError(errno.EIO, f"short read of data segment {victim} "
                                     f"({len(raw)} of {SEGMENT_BLOCKS * BLOCK_SIZE} bytes)")
        moves = self._verified(victim, raw, moves)
        if not moves:
            return 0
        runs = sp.alloc(len(moves), HEAD_COLD)
        new_hbas = np.concatenate([np.arange(start, start + count) for start, count in runs])
        writes, i = [], 0
        for start, count in runs:
            writes.append((b"".join(
                raw[(h - base) * BLOCK_SIZE:(h - base + 1) * BLOCK_SIZE]
                for h, _, _ in moves[i:i + count]), start * BLOCK_SIZE))
            i += count
        self.data.pwrite_many(writes)
        recs = fmt.array([l for _, l, _ in moves], [v for _, _, v in moves])
        recs["hba"] = new_hbas            # same key, nonce and MAC: the ciphertext moved
        batch.stage(recs)
        self.lifetime.blocks_moved += len(moves)
        self.lifetime.cleaning_runs += 1
        return len(moves)

    def _verified(self, victim: int, raw: bytes, moves: list) -> list:
        """The moves whose ciphertext authenticates under its record; the others are
        reported and left in place (their LBA reads as IntegrityError, as before)."""
        fmt, base, good = self.state.fmt, victim * SEGMENT_BLOCKS, []
        for h, l, v in moves:
            _, key, nonce, mac = fmt.split(v)
            off = (h - base) * BLOCK_SIZE
            try:
                crypto.decrypt(key, nonce, raw[off:off + BLOCK_SIZE], mac, f"data block {h}")
            except IntegrityError:
                log.warning("cleaning: data block %d (LBA %d) fails to verify; not moved, "
                            "segment %d will not be cleaned", h, l, victim)
                self.lifetime.cleaning_unverified_blocks += 1
                self.quarantined.add(victim)
                continue
            good.append((h, l, v))
        return good
