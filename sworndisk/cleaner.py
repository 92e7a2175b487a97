"""Segment cleaning: turn partially valid data segments back into free ones.

A victim's still-valid blocks are found through the DST bitmap, their LBAs through the
RIT, and each is confirmed against the index (the RIT is only a hint: a block moves only
if the committed index still maps its LBA to it, and nothing newer is pending). The
ciphertext moves as is, with its key, nonce and MAC: no decryption, no new key material,
and a replay of the old copy at the old place stays useless because no record points
there any more. The moves are ordinary uncommitted write records; the victim frees itself
when they commit, by the commit-time invalidation that every overwrite uses.

Policy (see docs/cleaning.md): threaded logging (filling holes of used segments) absorbs
writes when free segments run low, so cleaning is never needed for progress; it runs only
where it is cheap: victims at most `max_util` valid, greedy when free segments are at the
reserve, cost-benefit (age x free / valid) otherwise. Work per step is one segment.
"""
from __future__ import annotations

import numpy as np

from .config import BLOCK_SIZE, SEGMENT_BLOCKS
from .errors import IntegrityError
from .segtable import NONE


class Cleaner:
    def __init__(self, disk, max_util: float = 0.35):
        self.disk = disk
        self.max_util = max_util

    def pick_victim(self, greedy: bool) -> int | None:
        sp = self.disk.space
        used = (sp.seg_valid > 0) & (sp.seg_busy == 0)
        if 0 <= sp.head_seg:
            used[sp.head_seg] = False
        for s in sp.excluded:
            used[s] = False
        cand = np.flatnonzero(used & (sp.seg_valid <= int(self.max_util * SEGMENT_BLOCKS)))
        if len(cand) == 0:
            return None
        u = sp.seg_valid[cand] / SEGMENT_BLOCKS
        if greedy:
            return int(cand[np.argmin(u)])
        age = (self.disk.commit_seq - sp.seg_stamp[cand] + 1).astype(float)
        return int(cand[np.argmax((1 - u) * age / (1 + u))])

    def clean(self, victim: int) -> int:
        """Moves the victim's valid blocks (uncommitted); returns how many moved."""
        disk, sp, fmt = self.disk, self.disk.space, self.disk.fmt
        base = victim * SEGMENT_BLOCKS
        seg_lbas = sp.segment_lbas(victim)
        offs = np.flatnonzero(seg_lbas != NONE)
        sp.excluded.add(victim)
        if len(offs) == 0:
            return 0
        live = [(base + int(o), int(seg_lbas[o])) for o in offs
                if not disk._superseded(int(seg_lbas[o]))]
        committed = disk.index.get_many_exact([l for _, l in live])
        moves = []
        for h, l in live:
            v = committed.get(l)
            if v is None or fmt.hba_of(v) != h:
                raise IntegrityError(
                    f"reverse index says data block {h} holds LBA {l}, but the index disagrees")
            moves.append((h, l, v))
        if not moves:
            return 0
        raw = disk.data.pread(SEGMENT_BLOCKS * BLOCK_SIZE, base * BLOCK_SIZE)
        runs = sp.alloc(len(moves))
        i = 0
        new_hbas = []
        writes = []
        for start, count in runs:
            parts = []
            for j in range(count):
                h, l, v = moves[i]
                off = (h - base) * BLOCK_SIZE
                parts.append(raw[off:off + BLOCK_SIZE])
                _, key, nonce, mac = fmt.split(v)
                disk._stage_write(l, fmt.value(start + j, key, nonce, mac))
                new_hbas.append(start + j)
                i += 1
            writes.append((b"".join(parts), start * BLOCK_SIZE))
        disk.data.pwrite_many(writes)
        disk._pending_hbas.extend(new_hbas)
        disk.counters["blocks_moved"] += len(moves)
        disk.counters["cleaning_runs"] += 1
        return len(moves)
