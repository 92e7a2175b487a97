"""The pending batch: everything written or discarded since the last commit.

Writes first collect in a plaintext segment buffer (one 4 MiB segment). Sealing encrypts
each buffered block under a fresh random key and nonce, writes the run at the log head
and turns the blocks into index records, which wait here, uncommitted, with the discards
and the cleaner's moves, as the operations of the next journal transaction. Reads see
this state first (`overlay`), the committed index after it; the cleaner asks whether an
LBA has anything newer here (`superseded`) before it moves the committed copy.

Sealed blocks are *busy* in the space accounting (written, not valid, not allocatable)
until the commit that validates them, or a reopen that forgets them.
"""
from __future__ import annotations

import mmap
from collections import deque
from typing import NamedTuple

import numpy as np

from . import crypto
from .format import BLOCK_SIZE, SEGMENT_BLOCKS
from .device import BlockDevice
from .ops import Discard, Op, Writes
from .blockcrypto import BlockCrypto
from .cryptopool import SEAL_DEPTH, SealJob
from .records import RecordFormat
from .space import DataSpace
from .counters import Lifetime


class _Sealing(NamedTuple):
    """A segment the workers are sealing, read through until its records are staged."""
    job: SealJob
    live: list                  # (buffer slot, LBA) of its blocks, in sealing order
    runs: list                  # where they go on the data device
    slot_of: dict               # LBA -> buffer slot
    buf: memoryview             # its plaintext
    index: int                  # which of the pool's buffers that is


class PendingBatch:
    def __init__(self, fmt: RecordFormat, space: DataSpace, data: BlockDevice,
                 lifetime: Lifetime, crypto_: BlockCrypto | None = None):
        self.fmt = fmt
        self.lifetime = lifetime
        self.space = space
        self.data = data
        self.crypto = crypto_ or BlockCrypto(0, fmt.key_bytes)
        self.pool = pool = self.crypto.pool
        if pool is None:
            self._bufs = [bytearray(SEGMENT_BLOCKS * BLOCK_SIZE)]
            # Ciphertext of a seal (16 spare bytes for the last tag): two page-aligned
            # areas, one seal each in turn, as in the pool's region (see _write_sealed).
            self._sealed = [mmap.mmap(-1, SEGMENT_BLOCKS * BLOCK_SIZE + 4096) for _ in range(2)]
            self._sealing = 0
        else:                           # SEAL_DEPTH buffers in the pool's shared region
            self._bufs = [pool.plaintext(i) for i in range(SEAL_DEPTH)]
        self._cur = 0
        self._buf = self._bufs[0]
        # The segments the workers are sealing, oldest first: up to SEAL_DEPTH - 1, so
        # that a worker a little behind costs the next writes no wait (nor this thread a
        # take-over of its chunks) until a commit needs every one of them.
        self._inflight: deque[_Sealing] = deque()
        self._slots: list = []                  # buffer slot -> LBA, None once discarded
        self._slot_of: dict[int, int] = {}      # LBA -> buffer slot
        self._values: dict[int, bytes] = {}     # LBA -> sealed, uncommitted record value
        self._staged: list[np.ndarray] = []     # staged records not folded into _values yet
        self._ops: list[Op] = []
        self._discards: list[tuple[int, int]] = []
        self._hbas: list[int] = []              # busy blocks this batch will validate
        self.unflushed = 0                      # blocks written or discarded since commit

    # ---- queries ----
    def is_empty(self) -> bool:
        return not self._ops and not self._slot_of and not self._inflight

    @property
    def sealing(self) -> int:
        """Segments the workers are sealing now (at most SEAL_DEPTH - 1)."""
        return len(self._inflight)

    @property
    def buffered(self) -> int:
        """Blocks in the plaintext buffer, not allocated yet (those being sealed are)."""
        return len(self._slot_of)

    @property
    def op_count(self) -> int:
        return len(self._ops)

    def new_blocks(self, lba: int, n: int, limit: int) -> int:
        """The longest prefix of [lba, lba+n) whose blocks not yet buffered number at
        most `limit` (what buffering it adds to the buffer)."""
        if n <= limit or not self._slot_of:
            return min(n, max(limit, 0))
        new = 0
        for i in range(n):
            if lba + i not in self._slot_of:
                new += 1
                if new > limit:
                    return i
        return n

    def superseded(self, lba: int) -> bool:
        """True if something newer than the committed value of lba is buffered or pending."""
        return (lba in self._slot_of or lba in self._value_map()
                or any(lba in s.slot_of for s in self._inflight)
                or (bool(self._discards) and self._discarded(lba)))

    def overlay(self, lba: int, n: int, out: bytearray) -> tuple[list, list[int]]:
        """Reads [lba, lba+n) through the batch: buffered blocks are copied into `out`;
        returns the sealed values to fetch, as (index in request, lba, value), and the
        LBAs the batch says nothing about (for the committed index)."""
        inflight = self._inflight
        if (not self._slot_of and not self._values and not self._staged and not self._discards
                and not inflight):
            return [], list(range(lba, lba + n))    # nothing pending: all committed
        values = self._value_map()
        fetch, rest = [], []
        tomb = self.fmt.tombstone
        sealing = list(reversed(inflight))          # newest first
        for i in range(n):
            l = lba + i
            slot = self._slot_of.get(l)
            buf = self._buf
            if slot is None:
                for seg in sealing:
                    slot = seg.slot_of.get(l)
                    if slot is not None:
                        buf = seg.buf
                        break
            if slot is not None:
                out[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] = \
                    buf[slot * BLOCK_SIZE:(slot + 1) * BLOCK_SIZE]
                continue
            v = values.get(l)
            if v is not None:
                if v != tomb:
                    fetch.append((i, l, v))
                continue
            if self._discards and self._discarded(l):
                continue
            rest.append(l)
        return fetch, rest

    def _value_map(self) -> dict[int, bytes]:
        """LBA -> sealed, uncommitted record value, the staged records folded in (in
        order: a later record wins). Folded only when asked (a read or the cleaner meets
        the batch): a burst of writes stages segment after segment and never needs it."""
        for recs in self._staged:
            self._values.update(zip(recs["lba"].tolist(), self.fmt.values_of(recs)))
        self._staged = []
        return self._values

    def _discarded(self, lba: int) -> bool:
        return any(lo <= lba < hi for lo, hi in self._discards)

    # ---- changes ----
    def put_many(self, items: list[tuple[int, memoryview]], single: bool = False) -> None:
        """put() for each (lba, bytes) in order; single blocks take a short path, and a
        batch of distinct new single blocks (`single`: the caller knows every item is
        one block) that fits the buffer goes in at once."""
        if single and self._put_new(items):
            return
        buf, slot_of, put = self._buf, self._slot_of, self.put
        for lba, mv in items:
            if len(mv) != BLOCK_SIZE:
                put(lba, mv)
                continue
            slot = slot_of.get(lba)
            if slot is None:
                slot = self._new_slot(lba)
                buf = self._buf                 # a seal may have switched buffers
            buf[slot * BLOCK_SIZE:(slot + 1) * BLOCK_SIZE] = mv
            self.unflushed += 1

    def _put_new(self, items: list[tuple[int, memoryview]]) -> bool:
        """The whole batch of single blocks with one slot assignment, if none
        is buffered already, no LBA repeats and all fit the buffer (a random-write batch
        at depth, but at a segment's end); False, with nothing done, otherwise."""
        slots, slot_of = self._slots, self._slot_of
        n, first = len(items), len(self._slots)
        if n > SEGMENT_BLOCKS - first:
            return False
        lbas = [lba for lba, _ in items]
        if len(set(lbas)) != n or not slot_of.keys().isdisjoint(lbas):
            return False
        buf, at = self._buf, first * BLOCK_SIZE
        for _, mv in items:                 # each straight in: a join would copy twice
            buf[at:at + BLOCK_SIZE] = mv
            at += BLOCK_SIZE
        slots.extend(lbas)
        slot_of.update(zip(lbas, range(first, first + n)))
        self.unflushed += n
        return True

    def put(self, lba: int, mv: memoryview) -> None:
        """Copies whole blocks into the buffer, sealing it whenever it fills; the caller
        has made room for every block this adds (DataSpace.free_blocks). A buffered LBA
        is overwritten in place; runs of new LBAs go in with one copy each, as much of
        the run as the buffer has room for, the buffer sealed between two such pieces."""
        n = len(mv) // BLOCK_SIZE
        buf, slot_of, slots = self._buf, self._slot_of, self._slots
        done = 0
        while done < n:
            lo = lba + done
            slot = slot_of.get(lo)
            if slot is None and n - done > 1:
                if len(slots) == SEGMENT_BLOCKS:
                    self.seal()
                    buf = self._buf             # a free buffer, while this one seals
                k = min(n - done, SEGMENT_BLOCKS - len(slots))
                if not slot_of or slot_of.keys().isdisjoint(range(lo, lo + k)):
                    first = len(slots)
                    buf[first * BLOCK_SIZE:(first + k) * BLOCK_SIZE] = \
                        mv[done * BLOCK_SIZE:(done + k) * BLOCK_SIZE]
                    slots.extend(range(lo, lo + k))
                    slot_of.update(zip(range(lo, lo + k), range(first, first + k)))
                    done += k
                    continue
            if slot is None:
                slot = self._new_slot(lo)
                buf = self._buf
            buf[slot * BLOCK_SIZE:(slot + 1) * BLOCK_SIZE] = \
                mv[done * BLOCK_SIZE:(done + 1) * BLOCK_SIZE]
            done += 1
        self.unflushed += n

    def _new_slot(self, lba: int) -> int:
        """A buffer slot for an LBA not buffered yet, sealing the buffer first if full."""
        if len(self._slots) == SEGMENT_BLOCKS:
            self.seal()
        slot = len(self._slots)
        self._slots.append(lba)
        self._slot_of[lba] = slot
        return slot

    def discard(self, lo: int, hi: int) -> None:
        self.finish_seal()          # its records go before this discard in the ops
        tomb = self.fmt.tombstone
        for table in (self._slot_of, self._value_map()):
            keys = range(lo, hi) if hi - lo <= len(table) else list(table)
            for l in keys:
                if lo <= l < hi and l in table:
                    if table is self._slot_of:
                        self._slots[self._slot_of.pop(l)] = None
                    else:
                        self._values[l] = tomb
        self._ops.append(Discard(lo, hi - lo))
        self._discards.append((lo, hi))
        self.unflushed += hi - lo

    def stage(self, records: np.ndarray) -> None:
        """Stages index records whose blocks are already written and busy (the cleaner's
        moves), after those of every segment being sealed."""
        if not len(records):
            return
        self.finish_seal()
        self._stage(records)

    def _stage(self, records: np.ndarray) -> None:
        """Records go into the ops in the order they are staged: a later one wins."""
        self._staged.append(records)
        self._ops.append(Writes(records))
        self._hbas.extend(records["hba"].tolist())

    def seal(self) -> None:
        """Encrypts the buffer and writes it at the log head (uncommitted). With a crypto
        pool, the workers seal it while another buffer takes new writes: the oldest
        segment in flight is finished first if every other buffer is taken, this one by
        a later seal, a discard or the commit."""
        if self.pool is None:
            self.finish_seal()
        else:
            while len(self._inflight) >= SEAL_DEPTH - 1:
                self._finish_oldest()
        live = [(slot, l) for slot, l in enumerate(self._slots) if l is not None]
        if not live:
            self._reset_buffer()
            return
        n = len(live)
        runs = self.space.alloc(n)
        slots = [slot for slot, _ in live]
        if self.pool is not None:
            job = self.pool.seal_start(self._cur, slots)
            self._inflight.append(_Sealing(job, live, runs, dict(self._slot_of), self._buf,
                                           self._cur))
            taken = {seg.index for seg in self._inflight}
            self._cur = next(i for i in range(SEAL_DEPTH) if i not in taken)
            self._buf = self._bufs[self._cur]
            self._reset_buffer()
            return
        kb = self.fmt.key_bytes
        material = crypto.random_bytes(n * (kb + crypto.NONCE_BYTES))
        tags = bytearray(n * crypto.TAG_BYTES)
        done = 0
        sealed = memoryview(self._sealed[self._sealing])
        self._sealing ^= 1
        for start, count in runs:
            # Each run's ciphertext follows the last in one reused buffer: a block's tag
            # spills 16 bytes into the next block's place before that block is written.
            out = sealed[done * BLOCK_SIZE:]
            crypto.seal_blocks(material, kb, self._buf, slots[done:done + count], out, tags, done)
            done += count
        self.crypto.count_inline(n)
        self._write_sealed(live, runs, material, tags, sealed)
        self._reset_buffer()

    def finish_seal(self) -> None:
        """Waits for every segment the workers are sealing, writes them and stages their
        records, in order."""
        while self._inflight:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        seg = self._inflight[0]
        material, tags, sealed = seg.job.result()
        self._inflight.popleft()
        self._write_sealed(seg.live, seg.runs, material, tags, sealed)

    def _write_sealed(self, live: list, runs: list, material: bytes, tags, sealed) -> None:
        """Writes the sealed runs (consecutive in `sealed`) and stages their records."""
        n, kb = len(live), self.fmt.key_bytes
        writes, done = [], 0
        for start, count in runs:
            writes.append((sealed[done * BLOCK_SIZE:(done + count) * BLOCK_SIZE],
                           start * BLOCK_SIZE))
            done += count
        recs = self.fmt.records(
            [l for _, l in live],
            np.concatenate([np.arange(start, start + count) for start, count in runs]),
            np.frombuffer(material, np.uint8).reshape(n, kb + crypto.NONCE_BYTES),
            np.frombuffer(tags, np.uint8).reshape(n, crypto.TAG_BYTES))
        # Written from where they are (stable): the areas are used in turn (two here,
        # SEAL_DEPTH in the pool, with at most SEAL_DEPTH - 1 seals in flight), so this
        # segment's is not sealed over before a later segment's pwrite_many waited for it.
        self.data.pwrite_many_stable(writes)
        self.space.stamp(recs["hba"])
        self._stage(recs)                   # after the segments before it, before the rest
        self.lifetime.segments_sealed += 1

    def take(self) -> tuple[list[Op], list[int]]:
        """The batch's operations and busy blocks, for a commit; the batch is empty after.
        A commit covers everything written before it (the ublk target's write log and
        `recover` rely on that), so every segment in flight is finished first."""
        self.seal()
        self.finish_seal()
        ops, hbas = self._ops, self._hbas
        self._values, self._ops, self._discards, self._hbas = {}, [], [], []
        self._staged = []
        self.unflushed = 0
        return ops, hbas

    def _reset_buffer(self) -> None:
        # In place: put() holds these objects in locals across a seal.
        self._slots.clear()
        self._slot_of.clear()


__all__ = ["PendingBatch"]
