"""SwornDisk: the engine's public face and its commit protocol.

Write path: blocks collect in a plaintext segment buffer; sealing encrypts each block
under a fresh random key and nonce and writes the run to the log head; the records
LBA -> (HBA, key, nonce, MAC) wait in the *pending* batch (uncommitted).

flush() = commit:
    1. seal the buffer; flush the data device (data before the records that name it)
    2. append one journal transaction: the pending ops and a commit record; flush meta
    3. apply the ops to the committed state: MemTable insert, and for each LBA the block
       it supersedes (looked up in the index now) becomes invalid, exactly once.
After a crash, recovery replays whole committed transactions onto the newest checkpoint
pack, so the disk reads exactly as at the last completed flush.

Checkpoint (after a commit, when the MemTable is full or the journal half used):
    compact (MemTable -> BIT, merges) -> journal "K" record naming the new pack's seq and
    MAC -> write the pack to the other slot. A pack is trusted only if the journal record
    at its anchor confirms it; a K record without its pack is honest only as the last
    transaction (crash between the two writes).
"""
from __future__ import annotations

import time
from typing import Union

import numpy as np

from . import crypto, superblock as sbmod
from .bit import NodeStore
from .checkpoint import Pack, read_pack
from .cleaner import Cleaner
from .config import BLOCK_SIZE, SEGMENT_BLOCKS, Config
from .device import BlockDevice, CountingDevice, as_device, open_pair
from .errors import (DeviceTooSmall, DiskClosedError, IntegrityError, InvalidArgument,
                     MetadataFullError, NoSpaceError, WrongKeyError)
from .journal import Journal, decode_ops, encode_ops
from .layout import INDEX_CHUNK_BLOCKS, Layout, fit_config, plan, usable_blocks
from .lsm import LsmIndex
from .records import RecordFormat
from .segtable import SegmentTable, dir_dtype
from .space import DataSpace, IndexSpace
from .superblock import Superblock

Dev = Union[str, BlockDevice]
_TOMB_PREFIX = b"\xff" * 8
_DISCARD_WINDOW = 1 << 16


def _is_tomb(value: bytes) -> bool:
    return value[:8] == _TOMB_PREFIX


def _hbas(values: list[bytes]) -> np.ndarray:
    """The HBA field of many record values at once."""
    return np.frombuffer(b"".join(v[:8] for v in values), "<u8")


class SwornDisk:
    block_size = BLOCK_SIZE

    # ------------------------------------------------------------------ construction
    def __init__(self, data: BlockDevice, meta: BlockDevice, root: bytes, sb: Superblock,
                 owned: list[BlockDevice]):
        self._owned = owned
        self.data = CountingDevice(data)     # close() is never called on these: the
        self.meta = CountingDevice(meta)     # caller owns devices it passed in
        self.sb = sb
        self.layout: Layout = sb.layout
        self.config: Config = sb.config
        self.nr_blocks = self.layout.nr_blocks
        self._disk_key = crypto.derive(root, "disk", *np.frombuffer(sb.uuid, "<u8").tolist())
        self.fmt = RecordFormat(self.config.cipher_key_bytes)
        self._tomb = self.fmt.tombstone
        self.store = NodeStore(self.meta, self.fmt, self.config.node_cache_bytes)
        self.ispace = IndexSpace(self.layout.index_chunks)
        self.segtable = SegmentTable(self.meta, self.layout.data_segments,
                                     self.config.cipher_key_bytes, self.layout.segtable_start,
                                     self.layout.segtable_blocks,
                                     self.config.node_cache_bytes // 4 // BLOCK_SIZE)
        self.space = DataSpace(self.segtable, self.layout.reserve_segments)
        self.index = LsmIndex(self.fmt, self.store, self.config,
                              min(self.nr_blocks, self.layout.data_blocks), self.ispace.alloc,
                              lambda c: self.layout.index_start + c * INDEX_CHUNK_BLOCKS)
        self.journal = Journal(self.meta, self._disk_key, self.layout.journal_start,
                               self.layout.journal_blocks)
        # segment buffer (plaintext, not yet sealed)
        self._buf = bytearray(SEGMENT_BLOCKS * BLOCK_SIZE)
        self._buf_lbas: list = []
        self._buf_map: dict[int, int] = {}
        # pending = sealed or discarded but not committed
        self._pending: dict[int, bytes] = {}
        self._ops: list = []
        self._pending_discards: list[tuple[int, int]] = []
        self._pending_hbas: list[int] = []
        self._unflushed = 0
        self.commit_seq = 0
        self.pack_seq = 0
        self._pack_slot = 0        # the slot holding the trusted pack; the next goes to the other
        self._closed = False
        self._failed: BaseException | None = None
        self.counters = dict(user_blocks_written=0, user_blocks_read=0, blocks_discarded=0,
                             commits=0, checkpoints=0, recovered_txns=0, segments_sealed=0,
                             cleaning_runs=0, blocks_moved=0, cleaning_unverified_blocks=0)
        self._user_blocks_at_open = 0
        self.cleaner = Cleaner(self)

    @classmethod
    def create(cls, data: Dev, meta: Dev, key, nr_blocks: int | None = None,
               config: Config | None = None, *, kdf_salt: bytes | None = None) -> "SwornDisk":
        """Formats the two devices and returns the open, empty disk."""
        root = crypto.check_root_key(key)
        config = (config or Config()).validate()
        d, m, owned = open_pair(data, meta)
        try:
            layout = plan(d.size, nr_blocks, config)
            extra = (m.size // BLOCK_SIZE - layout.meta_blocks) // INDEX_CHUNK_BLOCKS
            if extra < 0:
                raise DeviceTooSmall(
                    f"meta device is {m.size} bytes; this disk needs at least "
                    f"{layout.meta_blocks * BLOCK_SIZE} bytes ({_mib(layout.meta_blocks)})")
            layout = Layout(**dict(layout.to_dict(), index_chunks=layout.index_chunks + extra))
            sb = Superblock(Superblock.new_uuid(), layout, fit_config(config, layout.nr_blocks),
                            kdf_salt)
            disk = cls(d, m, root, sb, owned)
            disk._format(root)
            return disk
        except BaseException:
            for dev in owned:
                dev.close()
            raise

    @classmethod
    def open(cls, data: Dev, meta: Dev, key) -> "SwornDisk":
        """Opens a disk, recovering to the last completed flush after a crash."""
        root = crypto.check_root_key(key)
        d, m, owned = open_pair(data, meta)
        try:
            if m.size < 2 * BLOCK_SIZE:
                raise DeviceTooSmall(f"meta device is {m.size} bytes; too small for a SwornDisk")
            sb = sbmod.decode([m.pread(BLOCK_SIZE, 0), m.pread(BLOCK_SIZE, BLOCK_SIZE)], root)
            lay = sb.layout
            if d.size < lay.data_blocks * BLOCK_SIZE or m.size < lay.meta_blocks * BLOCK_SIZE:
                raise DeviceTooSmall(
                    f"devices are smaller than when formatted: data needs "
                    f"{lay.data_blocks * BLOCK_SIZE} bytes, meta {lay.meta_blocks * BLOCK_SIZE}")
            disk = cls(d, m, root, sb, owned)
            disk._recover()
            return disk
        except BaseException:
            for dev in owned:
                dev.close()
            raise

    # ------------------------------------------------------------------ static helpers
    @staticmethod
    def probe(meta: Dev) -> bool:
        """True if the meta device carries a SwornDisk superblock magic (in either copy)."""
        m = as_device(meta, "the meta device")
        try:
            if m.size < 2 * BLOCK_SIZE:
                return False
            return any(sbmod.has_magic(m.pread(BLOCK_SIZE, i * BLOCK_SIZE)) for i in (0, 1))
        finally:
            if m is not meta:
                m.close()

    @staticmethod
    def read_kdf_salt(meta: Dev) -> bytes | None:
        """The KDF salt of the first superblock copy that has one (see passphrase_key)."""
        salts = SwornDisk.read_kdf_salts(meta)
        return salts[0] if salts else None

    @staticmethod
    def read_kdf_salts(meta: Dev) -> list[bytes]:
        """Every distinct KDF salt the superblock copies hold, copy 0's first."""
        m = as_device(meta, "the meta device")
        try:
            salts: list[bytes] = []
            for i in (0, 1):
                salt = sbmod.read_salt(m.pread(BLOCK_SIZE, i * BLOCK_SIZE))
                if salt and salt not in salts:
                    salts.append(salt)
            return salts
        finally:
            if m is not meta:
                m.close()

    @staticmethod
    def passphrase_key(meta: Dev, passphrase: bytes | str) -> bytes:
        """The root key a passphrase gives for this disk. Tries the salt of every
        superblock copy and keeps the key whose key check verifies, so one damaged salt
        does not read as a wrong passphrase. WrongKeyError if none verifies."""
        from . import kdf
        m = as_device(meta, "the meta device")
        try:
            copies = [m.pread(BLOCK_SIZE, i * BLOCK_SIZE) for i in (0, 1)]
        finally:
            if m is not meta:
                m.close()
        salts = []
        for blk in copies:
            salt = sbmod.read_salt(blk)
            if salt and salt not in salts:
                salts.append(salt)
        if not salts:
            raise WrongKeyError("this disk has no passphrase (it was formatted with a key file)")
        for salt in salts:
            key = kdf.derive_key(passphrase, salt)
            if sbmod.key_verifies(copies, key):
                return key
        raise WrongKeyError("the passphrase does not match this disk")

    @staticmethod
    def min_meta_size(data_size: int, nr_blocks: int | None = None,
                      config: Config | None = None) -> int:
        return plan(data_size, nr_blocks, (config or Config()).validate()).meta_blocks * BLOCK_SIZE

    @staticmethod
    def usable_blocks(data_size: int, config: Config | None = None) -> int:
        return usable_blocks(data_size, config)

    def subkey(self, label: str) -> bytes:
        """A 32-byte key for `label`, derived from this disk's key: for front ends that
        keep their own authenticated state bound to this disk (never the disk's own keys)."""
        return crypto.derive(self._disk_key, "frontend:" + label)

    # ------------------------------------------------------------------ format / recovery
    def _format(self, root: bytes) -> None:
        blk = self.sb.encode(root)
        # Old checkpoint headers would only confuse a reader; make both slots empty.
        for slot in (0, 1):
            self.meta.pwrite(bytes(BLOCK_SIZE), self.layout.checkpoint_slot(slot) * BLOCK_SIZE)
        self.meta.pwrite(blk, 0)
        self.meta.pwrite(blk, BLOCK_SIZE)
        self.meta.flush()
        self._checkpoint()

    def _recover(self) -> None:
        packs = [(read_pack(self.meta, self._disk_key, self.layout.checkpoint_slot(s),
                            self.layout.checkpoint_blocks, dir_dtype(self.config.cipher_key_bytes)),
                  s) for s in (0, 1)]
        packs = sorted(((p, s) for p, s in packs if p is not None), key=lambda ps: -ps[0].seq)
        if not packs:
            raise IntegrityError("no checkpoint pack verifies: the meta device is damaged or tampered")
        pack, self._pack_slot = packs[0]
        self._load_pack(pack)
        txns = self.journal.scan(pack.anchor_seq, pack.anchor_prev_mac)
        first = next(txns, None)
        if first is None or decode_ops(self.fmt, first.payload) != [("K", pack.seq, pack.mac)]:
            raise IntegrityError(
                f"checkpoint {pack.seq} is not confirmed by the journal: a checkpoint or journal "
                f"block was replaced with a stale copy, or the journal was damaged")
        resume = (first.end_seq, first.end_mac)
        pending_ckpt = None
        for txn in txns:
            if pending_ckpt is not None:
                raise IntegrityError(
                    f"checkpoint {pending_ckpt} is recorded in the journal but its pack is "
                    f"missing or stale while later transactions exist: the pack was replaced")
            ops = decode_ops(self.fmt, txn.payload)
            if ops and ops[-1][0] == "C":
                self._apply(ops[:-1])
                self.commit_seq = ops[-1][1]
                self.counters["recovered_txns"] += 1
                resume = (txn.end_seq, txn.end_mac)
            elif len(ops) == 1 and ops[0][0] == "K" and ops[0][1] > pack.seq:
                pending_ckpt = ops[0][1]          # crash between K record and pack: honest
            else:
                raise IntegrityError("the journal holds a transaction of unexpected form")
        self.journal.resume(*resume)
        self.journal.anchor_seq = pack.anchor_seq
        self._user_blocks_at_open = self.counters["user_blocks_written"]

    def _load_pack(self, pack: Pack) -> None:
        m = pack.meta
        if len(pack.segdir) != self.layout.data_segments \
                or len(pack.ichunks) != self.layout.index_chunks:
            raise IntegrityError("checkpoint pack does not match the disk layout")
        self.pack_seq = pack.seq
        self.commit_seq = m["commit_seq"]
        self.segtable.load(pack.segdir)
        self.space.reset_volatile()
        self.ispace.state = pack.ichunks.copy()
        self.ispace.release_retired()
        self.index.load(m["bits"], m["next_bit_id"])
        for k, v in m.get("counters", {}).items():
            if k in self.counters:
                self.counters[k] = v
        self.index.minor_compactions = m.get("minor_compactions", 0)
        self.index.major_compactions = m.get("major_compactions", 0)
        self.journal.blocks_written = m.get("journal_blocks_written", 0)

    # ------------------------------------------------------------------ public I/O
    def read(self, lba: int, nr_blocks: int) -> bytes:
        self._check_usable()
        self._check_range(lba, nr_blocks)
        out = bytearray(nr_blocks * BLOCK_SIZE)
        fetch: list[tuple[int, int, bytes]] = []     # (index in request, lba, value)
        lookup: list[int] = []
        for i in range(nr_blocks):
            l = lba + i
            slot = self._buf_map.get(l)
            if slot is not None:
                out[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] = \
                    self._buf[slot * BLOCK_SIZE:(slot + 1) * BLOCK_SIZE]
                continue
            v = self._pending.get(l)
            if v is not None:
                if not _is_tomb(v):
                    fetch.append((i, l, v))
                continue
            if self._pending_discards and self._pending_discarded(l):
                continue
            lookup.append(l)
        if lookup:
            found = self.index.get_many(lookup)
            for l in lookup:
                v = found.get(l)
                if v is not None and not _is_tomb(v):
                    fetch.append((l - lba, l, v))
        self._fetch(fetch, out)
        self.counters["user_blocks_read"] += nr_blocks
        return bytes(out)

    def _fetch(self, fetch: list, out: bytearray) -> None:
        """Reads and verifies blocks, coalescing runs of consecutive HBAs into one pread."""
        if not fetch:
            return
        split = self.fmt.split
        items = sorted((split(v)[0], i, l, v) for i, l, v in fetch)
        j = 0
        while j < len(items):
            k = j + 1
            while k < len(items) and items[k][0] == items[k - 1][0] + 1 and k - j < 256:
                k += 1
            start = items[j][0]
            if start + (k - j) > self.layout.data_blocks:
                raise IntegrityError(f"index record points outside the data device (block {start})")
            raw = self.data.pread((k - j) * BLOCK_SIZE, start * BLOCK_SIZE)
            for n, (hba, i, l, v) in enumerate(items[j:k]):
                _, key, nonce, mac = split(v)
                pt = crypto.decrypt(key, nonce, raw[n * BLOCK_SIZE:(n + 1) * BLOCK_SIZE], mac,
                                    f"data block {hba} (LBA {l})")
                out[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] = pt
            j = k

    def write(self, lba: int, data) -> None:
        """Buffers the blocks; `data` (any buffer) is copied before this returns.

        Commits early, before buffering what would not fit, when the unflushed writes
        would exhaust free space or exceed the autocommit budget: a crash then leaves the
        disk as at that commit, a prefix of the write history (see docs/cleaning.md)."""
        self._check_usable()
        n, rem = divmod(len(data), BLOCK_SIZE)
        if rem or n == 0:
            raise InvalidArgument(f"write length must be a positive multiple of {BLOCK_SIZE} "
                                  f"bytes (got {len(data)})")
        self._check_range(lba, n)
        mv = memoryview(data).cast("B")
        done = 0
        while done < n:
            k = self._make_room(lba + done, n - done)
            self._buffer(lba + done, mv[done * BLOCK_SIZE:(done + k) * BLOCK_SIZE])
            done += k
        self.counters["user_blocks_written"] += n

    def _buffer(self, lba: int, mv: memoryview) -> None:
        """Copies whole blocks into the segment buffer (room was made by _make_room)."""
        n = len(mv) // BLOCK_SIZE
        buf, bmap, blbas = self._buf, self._buf_map, self._buf_lbas
        if len(blbas) + n <= SEGMENT_BLOCKS and (not bmap or not any(
                l in bmap for l in range(lba, lba + n))):
            # Bulk path: new blocks that fit the buffer go in with one copy.
            first = len(blbas)
            buf[first * BLOCK_SIZE:(first + n) * BLOCK_SIZE] = mv
            blbas.extend(range(lba, lba + n))
            bmap.update(zip(range(lba, lba + n), range(first, first + n)))
        else:
            for i in range(n):
                l = lba + i
                slot = bmap.get(l)
                if slot is None:
                    if len(blbas) == SEGMENT_BLOCKS:
                        self._guarded(self._seal)
                    slot = len(blbas)
                    blbas.append(l)
                    bmap[l] = slot
                buf[slot * BLOCK_SIZE:(slot + 1) * BLOCK_SIZE] = \
                    mv[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]
        self._unflushed += n

    def _make_room(self, lba: int, n: int) -> int:
        """How many of blocks [lba, lba+n) may be buffered now (at least one), committing
        first if they do not all fit. NoSpaceError, with nothing of the write buffered,
        when even then the blocks it adds to the live data do not fit: possible on a thin
        disk alone (docs/cleaning.md). A write larger than the free space that does fit
        (an overwrite) goes in pieces, each committed to free the blocks it replaces."""
        k = self._room(lba, n)
        if k == n:
            return n
        self._guarded(self._commit)
        k = self._room(lba, n)
        if k < n and (k == 0 or self._growth(lba, n) > self.space.free_blocks()):
            raise self.space.no_space()
        return k

    def _growth(self, lba: int, n: int) -> int:
        """Blocks that [lba, lba+n) adds to the live data (LBAs not mapped now); called
        with nothing unflushed."""
        mapped = self.index.get_many_exact(list(range(lba, lba + n)))
        return n - sum(1 for v in mapped.values() if not _is_tomb(v))

    def _room(self, lba: int, n: int) -> int:
        """The longest prefix of [lba, lba+n) that fits both the autocommit budget and the
        free blocks left once every buffered block is sealed."""
        n = min(n, self._budget - self._unflushed)
        free = self.space.free_blocks() - len(self._buf_map)
        if n <= free or n <= 0:
            return max(n, 0)
        bmap, new = self._buf_map, 0
        for i in range(n):
            if lba + i not in bmap:
                new += 1
                if new > free:
                    return i
        return n

    @property
    def _budget(self) -> int:
        """Unflushed blocks (written or discarded) one commit may carry: bounds the
        MemTable's growth per commit, which sizes level 0 (layout.max_bit_records)."""
        return self.config.autocommit_bytes // BLOCK_SIZE

    def discard(self, lba: int, nr_blocks: int) -> None:
        """Unmaps blocks. A large range goes in several commits (each at most the
        autocommit budget of blocks), since every mapped block becomes a tombstone."""
        self._check_usable()
        self._check_range(lba, nr_blocks)
        end = lba + nr_blocks
        while lba < end:
            if self._unflushed >= self._budget:
                self._guarded(self._commit)
            hi = min(end, lba + self._budget - self._unflushed)
            self._stage_discard(lba, hi)
            lba = hi
        self.counters["blocks_discarded"] += nr_blocks

    def _stage_discard(self, lba: int, hi: int) -> None:
        for table in (self._buf_map, self._pending):
            keys = range(lba, hi) if hi - lba <= len(table) else list(table)
            for l in keys:
                if lba <= l < hi and l in table:
                    if table is self._buf_map:
                        self._buf_lbas[self._buf_map.pop(l)] = None
                    else:
                        self._pending[l] = self._tomb
        self._ops.append(("D", lba, hi - lba))
        self._pending_discards.append((lba, hi))
        self._unflushed += hi - lba

    def flush(self) -> None:
        self._check_usable()
        self._guarded(self._commit)
        if self.space.free_segments() <= self.layout.reserve_segments + 1:
            self._clean_and_commit(greedy=True)

    def background_step(self) -> bool:
        """One bounded unit of background work (one segment's cleaning); True if it did any.

        Runs only when nothing unflushed is pending, since it commits its own moves."""
        self._check_usable()
        if self._ops or self._buf_map:
            return False
        if self.space.free_segments() >= self.layout.reserve_segments + 4:
            return False
        return self._clean_and_commit(greedy=False)

    def _clean_and_commit(self, greedy: bool) -> bool:
        """Cleans one victim and commits its moves; False if there was nothing worth
        cleaning or no room to move into (threaded logging carries on)."""
        victim = self.cleaner.pick_victim(greedy)
        if victim is None:
            return False
        try:
            moved = self._guarded_value(lambda: self.cleaner.clean(victim))
            self._guarded(self._commit)
        finally:
            self.space.excluded.discard(victim)
        return moved is not None

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._failed is None:
                self._guarded(self._commit)
                if self.journal.used() > 1:
                    self._guarded(self._checkpoint)
        finally:
            self._closed = True
            for dev in self._owned:
                dev.close()

    def __enter__(self) -> "SwornDisk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _check_usable(self) -> None:
        if self._closed:
            raise DiskClosedError("the disk is closed")
        if self._failed is not None:
            raise DiskClosedError(f"the disk stopped after an I/O failure ({self._failed}); "
                                  f"reopen it to recover to the last flush")

    def _check_range(self, lba: int, n: int) -> None:
        if not isinstance(lba, int) or not isinstance(n, int):
            raise InvalidArgument("lba and block counts must be integers")
        if lba < 0 or n < 0 or lba + n > self.nr_blocks:
            raise InvalidArgument(f"blocks [{lba}, {lba + n}) are outside the disk "
                                  f"(0..{self.nr_blocks - 1})")

    def _guarded(self, fn) -> None:
        self._guarded_value(fn)

    def _guarded_value(self, fn):
        """Runs a state-changing step; any failure midway (device error, an internal
        region full, a bug) makes the disk unusable: the on-disk state is consistent,
        the in-memory one may not be. Reopening recovers to the last commit."""
        try:
            return fn()
        except BaseException as e:
            self._failed = e
            raise

    def _superseded(self, lba: int) -> bool:
        """True if something newer than the committed value of lba is buffered or pending."""
        return (lba in self._buf_map or lba in self._pending
                or (bool(self._pending_discards) and self._pending_discarded(lba)))

    def _stage_write(self, lba: int, value: bytes) -> None:
        self._pending[lba] = value
        self._ops.append(("W", lba, value))

    def _pending_discarded(self, lba: int) -> bool:
        return any(lo <= lba < hi for lo, hi in self._pending_discards)

    def _seal(self) -> None:
        """Encrypts the segment buffer and writes it at the log head (uncommitted)."""
        live = [(slot, l) for slot, l in enumerate(self._buf_lbas) if l is not None]
        if not live:
            self._reset_buffer()
            return
        runs = self.space.alloc(len(live))
        kb = self.fmt.key_bytes
        n = len(live)
        material = crypto.random_bytes(n * (kb + crypto.NONCE_BYTES))
        slots = [slot for slot, _ in live]
        lbas = [l for _, l in live]
        hbas = np.concatenate([np.arange(start, start + count) for start, count in runs])
        tags = bytearray(n * crypto.TAG_BYTES)
        writes = []
        done = 0
        for start, count in runs:
            out = bytearray(count * BLOCK_SIZE + crypto.TAG_BYTES)
            crypto.seal_blocks(material, kb, self._buf, slots[done:done + count], out, tags, done)
            writes.append((memoryview(out)[:count * BLOCK_SIZE], start * BLOCK_SIZE))
            done += count
        recs = np.empty(n, self.fmt.dtype)
        raw = recs.view(np.uint8).reshape(n, self.fmt.size)
        raw[:, 16:16 + kb + 12] = np.frombuffer(material, np.uint8).reshape(n, kb + 12)
        raw[:, 16 + kb + 12:] = np.frombuffer(tags, np.uint8).reshape(n, crypto.TAG_BYTES)
        recs["lba"], recs["hba"] = lbas, hbas
        values = self.fmt.values_of(recs)
        self._pending.update(zip(lbas, values))
        self._ops.extend(zip(["W"] * n, lbas, values))
        hbas = hbas.tolist()
        self.data.pwrite_many(writes)
        self.space.seg_stamp[np.unique(np.asarray(hbas) // SEGMENT_BLOCKS)] = self.commit_seq
        self._pending_hbas.extend(hbas)
        self.counters["segments_sealed"] += 1
        self._reset_buffer()

    def _reset_buffer(self) -> None:
        # In place: write() holds these objects in locals across a seal.
        self._buf_lbas.clear()
        self._buf_map.clear()

    def _commit(self) -> None:
        self._seal()
        if not self._ops:
            return
        self.data.flush()
        self.commit_seq += 1
        ops = self._ops
        self.journal.append(encode_ops(self.fmt, ops + [("C", self.commit_seq)]))
        self._apply(ops)
        self.space.set_busy(self._pending_hbas, False)
        self._pending, self._ops, self._pending_discards, self._pending_hbas = {}, [], [], []
        self._unflushed = 0
        self.counters["commits"] += 1
        if (len(self.index.memtable) >= self.config.memtable_records
                or self.journal.used() > self.journal.nblocks // 2
                or len(self.segtable.dirty) > self.segtable.cache_limit // 2):
            self._checkpoint()

    def _apply(self, ops: list) -> None:
        """Applies committed ops to the MemTable and the space accounting.

        Deterministic given the committed state, so recovery replays it identically."""
        i = 0
        while i < len(ops):
            if ops[i][0] == "W":
                j = i
                while j < len(ops) and ops[j][0] == "W":
                    j += 1
                self._apply_writes(ops[i:j])
                i = j
            else:
                self._apply_discard(ops[i][1], ops[i][2])
                i += 1

    def _apply_writes(self, ops: list) -> None:
        """A run of write records, in bulk. Same result as one at a time: the last record
        of an LBA wins; the block its previous committed record named becomes invalid; an
        earlier record of the same LBA in this run never becomes valid (the blocks of this
        run were busy, so they are disjoint from every previously valid block)."""
        mt = self.index.memtable
        latest = {l: v for _, l, v in ops}
        misses = [l for l in latest if mt.get(l) is None]
        in_bits = self.index.lookup_bits(misses)
        old_hbas = []
        for l in latest:
            old = mt.get(l)
            if old is None:
                old = in_bits.get(l)
            if old is not None and old[:8] != _TOMB_PREFIX:
                old_hbas.append(old)
        new = self.fmt.array(list(latest), list(latest.values()))
        self.segtable.invalidate_many(_hbas(old_hbas))
        self.segtable.validate_many(new["hba"], new["lba"])
        mt.update(latest)

    def _apply_discard(self, lo: int, n: int) -> None:
        mt = self.index.memtable
        hba_of = self.fmt.hba_of
        for w in range(lo, lo + n, _DISCARD_WINDOW):
            for l, old in self.index.range(w, min(lo + n, w + _DISCARD_WINDOW)).items():
                if not _is_tomb(old):
                    self.space.invalidate(hba_of(old))
                    mt.put(l, self._tomb)

    def _checkpoint(self) -> None:
        retired = self.index.compact()
        self.ispace.retire(retired)
        self.segtable.write_dirty()
        seq = self.pack_seq + 1
        pack = Pack(seq, self.journal.head_seq, self.journal.last_mac,
                    meta={"commit_seq": self.commit_seq, "bits": self.index.catalog(),
                          "next_bit_id": self.index.next_bit_id, "counters": self.counters,
                          "journal_blocks_written": self.journal.blocks_written,
                          "minor_compactions": self.index.minor_compactions,
                          "major_compactions": self.index.major_compactions,
                          "time": time.time()},
                    segdir=self.segtable.directory(), ichunks=self.ispace.state)
        slot_bytes, mac = pack.encode(self._disk_key)
        if len(slot_bytes) > self.layout.checkpoint_blocks * BLOCK_SIZE:
            raise MetadataFullError(f"checkpoint pack {seq} outgrew its slot")
        anchor = self.journal.head_seq
        self.journal.append(encode_ops(self.fmt, [("K", seq, mac)]))
        # Never over the trusted pack, whichever slot it was found in: until this one is
        # durable, the trusted one is what recovery needs.
        slot = 1 - self._pack_slot
        self.meta.pwrite(slot_bytes, self.layout.checkpoint_slot(slot) * BLOCK_SIZE)
        self.meta.flush()
        self.pack_seq, self._pack_slot = seq, slot
        self.journal.anchor_seq = anchor
        self.ispace.release_retired()
        self.segtable.release_retired()
        self.counters["checkpoints"] += 1

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        c = self.counters
        # Device counters are per session, so write amplification is too.
        user_bytes = (c["user_blocks_written"] - self._user_blocks_at_open) * BLOCK_SIZE
        dev_bytes = self.data.bytes_written + self.meta.bytes_written
        return dict(
            c,
            block_size=BLOCK_SIZE, nr_blocks=self.nr_blocks,
            data_segments=self.layout.data_segments,
            free_segments=self.space.free_segments(),
            reserve_segments=self.layout.reserve_segments,
            valid_blocks=self.space.valid_blocks(),
            free_blocks=self.space.free_blocks(),
            threaded_segments=self.space.threaded_segments,
            memtable_records=len(self.index.memtable),
            memtable_limit=self.config.memtable_records,
            pending_ops=len(self._ops), buffered_blocks=len(self._buf_map),
            bits=len(self.index.bits()), levels=[len(l) for l in self.index.levels],
            minor_compactions=self.index.minor_compactions,
            major_compactions=self.index.major_compactions,
            index_chunks_used=self.ispace.used(), index_chunks=self.layout.index_chunks,
            node_cache_hits=self.store.hits, node_cache_misses=self.store.misses,
            node_cache_entries=len(self.store.cache), node_cache_limit=self.store.cache_limit,
            segtable_cached=len(self.segtable.cache), segtable_dirty=len(self.segtable.dirty),
            segtable_loads=self.segtable.loads,
            journal_blocks_used=self.journal.used(), journal_blocks=self.journal.nblocks,
            data_bytes_written=self.data.bytes_written, meta_bytes_written=self.meta.bytes_written,
            data_bytes_read=self.data.bytes_read, meta_bytes_read=self.meta.bytes_read,
            write_amplification=(dev_bytes / user_bytes) if user_bytes else None,
            commit_seq=self.commit_seq, checkpoint_seq=self.pack_seq,
            aead_backend=crypto.backend_name(),
        )


def _mib(blocks: int) -> str:
    return f"{blocks * BLOCK_SIZE / (1 << 20):.1f} MiB"


__all__ = ["SwornDisk"]
