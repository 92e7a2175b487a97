"""SwornDisk: the engine's public face.

This module checks arguments, keeps the failure latch and assembles stats; the work is
done by the parts (docs/modules.md):

    Admission       admission.py   writes and discards into the batch; early commits
    BlockCrypto     blockcrypto.py sealing and verifying blocks, in worker processes
    PendingBatch    batch.py       writes and discards since the last commit; sealing
    CommittedState  committed.py   the secure index and space accounting; apply(ops)
    CommitProtocol  protocol.py    commit, checkpoint and recovery over journal and packs
    Cleaner         cleaner.py     segment cleaning

Write path: blocks go into the batch's segment buffer; before buffering what would not
fit in free space or in the autocommit budget the disk commits early (docs/cleaning.md).
flush() is a commit. After a crash, recovery replays whole committed transactions onto
the newest checkpoint, so the disk reads exactly as at the last completed commit.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Union

import numpy as np

from . import crypto, superblock as sbmod
from .admission import Admission, write_requests
from .anchor import Anchor, attach_anchor
from .batch import PendingBatch
from .bit import NodeStore
from .cleaner import Cleaner
from .committed import CommittedState
from .debug import DebugView
from .config import RUNTIME_FIELDS, Config
from .blockcrypto import open_crypto
from .device import BlockDevice, CountingDevice, closing_on_error, open_pair
from .format import BLOCK_SIZE, LABEL_ANCHOR, LABEL_DISK, LABEL_FRONTEND, MASTER_KEY_BYTES
from .errors import DiskClosedError, InvalidArgument, SwornDiskError
from .kdf import KdfParams
from .latch import FailureLatch
from .layout import Layout, plan, plan_devices, usable_blocks
from .protocol import CommitProtocol
from .reader import PendingReads, Reader
from .records import RecordFormat
from .segtable import SegmentTable
from .counters import Lifetime, Session
from .stats import DiskStats, collect_stats
from .readonly import open_pair_readonly
from .superblock import Credential, Superblock, Unlocked

Dev = Union[str, BlockDevice]


class SwornDisk:
    block_size = BLOCK_SIZE

    # ------------------------------------------------------------------ construction
    def __init__(self, data: BlockDevice, meta: BlockDevice, master: bytes, sb: Superblock,
                 owned: list[BlockDevice], *, read_only: bool = False,
                 runtime: Config | None = None, slot: int | None = None,
                 fresh: bytes | None = None, anchor: str | None = None,
                 accept_rollback: bool = False):
        """The disk on opened devices and an unlocked superblock: formatted with the
        superblock bytes `fresh`, else recovered; then checked against `anchor`."""
        self._owned = owned
        self._latch = FailureLatch()        # a failed step makes the disk refuse calls
        self._guarded = self._latch.run     # runs a state-changing step under the latch
        self.read_only = read_only           # opened for inspection: close() writes nothing
        self.key_slot = slot                 # the key slot that opened this disk
        self.anchor: Anchor | None = None
        self._data = CountingDevice(data)    # close() is never called on these: the
        self._meta = CountingDevice(meta)    # caller owns devices it passed in
        self.sb = sb
        self.layout: Layout = sb.layout
        # format-time fields from the superblock, runtime ones (crypto_workers) from the caller
        self.config: Config = replace(sb.config, **{
            f: getattr(runtime or Config(), f) for f in RUNTIME_FIELDS})
        self.nr_blocks = self.layout.nr_blocks
        self._disk_key = crypto.derive(master, LABEL_DISK,
                                       *np.frombuffer(sb.uuid, "<u8").tolist())
        fmt = RecordFormat(self.config.cipher_key_bytes)
        self._fmt = fmt
        self._lifetime = Lifetime()
        self._session = Session()
        self._crypto = open_crypto(self.config.crypto_workers, fmt.key_bytes, self._data)
        self._store = NodeStore(self._meta, fmt, self.config.node_cache_bytes, self._crypto)
        segtable = SegmentTable(self._meta, self.layout.data_segments,
                                self.config.cipher_key_bytes, self.layout.segtable_start,
                                self.layout.segtable_blocks,
                                self.config.node_cache_bytes // 4 // BLOCK_SIZE)
        self._state = CommittedState(fmt, self._store, segtable, self.layout, self.config)
        self._batch = PendingBatch(fmt, self._state.space, self._data, self._lifetime,
                                   self._crypto)
        self._protocol = CommitProtocol(self._meta, self._data, self.layout, self.config,
                                        self._disk_key, fmt, self._state, self._batch,
                                        self._lifetime, self._session)
        self._cleaner = Cleaner(self._state, self._batch, self._data, self._lifetime)
        self._reader = Reader(fmt, self._batch, self._state, self._data, self.layout.data_blocks,
                              self._crypto)
        self._admission = Admission(self._batch, self._state, self._protocol.commit,
                                    self.config.autocommit_bytes // BLOCK_SIZE,
                                    self._lifetime, self._session, self._guarded)
        self._closed = False
        try:
            self._protocol.format(fresh) if fresh is not None else self._protocol.recover()
            if anchor is not None:      # checked; moved along with every commit
                self.anchor = attach_anchor(anchor, sb.uuid,
                                            crypto.derive(self._disk_key, LABEL_ANCHOR),
                                            self.commit_seq, accept_rollback, read_only)
                if not read_only:
                    self._protocol.on_commit = self.anchor.write
        except BaseException:
            self._crypto.close()
            raise

    @classmethod
    def create(cls, data: Dev, meta: Dev, key=None, nr_blocks: int | None = None,
               config: Config | None = None, *, passphrase: bytes | str | None = None,
               kdf: KdfParams | None = None, anchor: str | None = None,
               max_blocks: int | None = None) -> "SwornDisk":
        """Formats the two devices and returns the open, empty disk.

        A random master key is made; key slot 0 wraps it under `key` (a raw 16 or 32-byte
        key, as from a key file) or `passphrase` (Argon2id with `kdf`, calibrated to about
        a second when None). With `anchor`, that file starts tracking the disk's commits.
        `max_blocks` reserves meta room for growing (grow) up to that logical size."""
        cred = Credential.of(key, passphrase)
        config = (config or Config()).validate()
        master = crypto.random_bytes(MASTER_KEY_BYTES)
        d, m, owned = open_pair(data, meta)
        with closing_on_error(owned):
            layout, fitted = plan_devices(d.size, m.size, nr_blocks, config, max_blocks)
            sb = Superblock.new(layout, fitted, cred, master, kdf)
            return cls(d, m, master, sb, owned, runtime=config, slot=0,
                       fresh=sb.encode(master), anchor=anchor, accept_rollback=True)

    @classmethod
    def open(cls, data: Dev, meta: Dev, key=None, *, passphrase: bytes | str | None = None,
             anchor: str | None = None, accept_rollback: bool = False,
             read_only: bool = False, config: Config | None = None) -> "SwornDisk":
        """Opens a disk, recovering to the last completed flush after a crash.

        `key` opens any key-file slot, `passphrase` any passphrase slot. With `anchor`, a
        committed state older than the anchor raises RollbackError, and a missing or
        forged anchor AnchorError, unless `accept_rollback` (the anchor then moves to the
        disk's state). `read_only` opens for inspection: nothing is ever written, and
        close() commits nothing. Of `config`, only the runtime fields (crypto_workers) are
        used: the format-time ones always come from the superblock."""
        cred = Credential.of(key, passphrase)
        return cls._open(data, meta, lambda blocks: sbmod.unlock(blocks, cred), anchor=anchor,
                         accept_rollback=accept_rollback, read_only=read_only,
                         config=(config or Config()).validate())

    @classmethod
    def _open(cls, data: Dev, meta: Dev, unlock: Callable[[list[bytes]], Unlocked], *,
              anchor: str | None = None, accept_rollback: bool = False,
              read_only: bool = False, config: Config | None = None) -> "SwornDisk":
        """open() with the unlocking step given (check.py keeps what it unlocked)."""
        d, m, owned = (open_pair_readonly if read_only else open_pair)(data, meta)
        with closing_on_error(owned):
            unlocked = sbmod.unlock_devices(d, m, unlock)
            return cls(d, m, unlocked.master, unlocked.superblock, owned, read_only=read_only,
                       runtime=config, slot=unlocked.slot, anchor=anchor,
                       accept_rollback=accept_rollback)

    # ------------------------------------------------------------------ static helpers
    @staticmethod
    def probe(meta: Dev) -> bool:
        """True if the meta device carries a SwornDisk superblock magic (in either copy)."""
        return any(sbmod.has_magic(b) for b in sbmod.read_copies(meta))

    def move_regions(self, layout: Layout) -> None:
        """Writes the committed state into the moved regions of a grown `layout`, then
        closes the disk (resize.py; the superblock that names `layout` comes after)."""
        self._check_usable()
        try:
            self._guarded(lambda: self._protocol.move_to(layout))
        finally:
            self.close()

    @staticmethod
    def min_meta_size(data_size: int, nr_blocks: int | None = None,
                      config: Config | None = None, max_blocks: int | None = None) -> int:
        return plan(data_size, nr_blocks, (config or Config()).validate(),
                    max_blocks).meta_blocks * BLOCK_SIZE

    @staticmethod
    def usable_blocks(data_size: int, config: Config | None = None) -> int:
        return usable_blocks(data_size, config)

    # ------------------------------------------------------------------ public I/O
    @property
    def commit_seq(self) -> int:
        """Increases by one at each durable commit (flush, autocommit, early commit)."""
        return self._protocol.commit_seq

    def subkey(self, label: str) -> bytes:
        """A 32-byte key for `label`, derived from this disk's key: for front ends that
        keep their own authenticated state bound to this disk (never the disk's own keys)."""
        return crypto.derive(self._disk_key, LABEL_FRONTEND + label)

    def read(self, lba: int, nr_blocks: int) -> bytes:
        result = self.read_many([(lba, nr_blocks)])[0]
        if isinstance(result, SwornDiskError):
            raise result
        return result

    def read_many(self, ranges) -> list:
        """Reads many (lba, nr_blocks) ranges at once. Returns, for each range in order,
        its bytes or the SwornDiskError (e.g. IntegrityError) that this range alone
        raised; the other ranges still return their data. Bad arguments raise before any
        I/O, as read() does. Each result is what read() would return at this moment."""
        return self.start_reads(ranges).result()

    def start_reads(self, ranges) -> PendingReads:
        """read_many in two steps: this call looks the blocks up and starts reading and
        verifying them (in the crypto workers, which may read the device themselves);
        result() on what it returns waits and gives read_many's answer. result() touches
        no state of the disk, so a caller that serialises calls into the disk (a ublk
        target's queues) may let other calls in before it, and started reads may be
        finished in any order."""
        self._check_usable()
        ranges = [(lba, n) for lba, n in ranges]
        blocks, limit = 0, self.nr_blocks
        for lba, n in ranges:
            if type(lba) is not int or type(n) is not int or lba < 0 or n < 0 \
                    or lba + n > limit:
                self._check_range(lba, n)       # raises, or passes an int subclass
            blocks += n
        pending = self._reader.start(ranges)
        self._lifetime.user_blocks_read += blocks
        self._session.user_blocks_read += blocks
        return pending

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
        self._admission.write(lba, memoryview(data).cast("B"))

    def write_many(self, items) -> None:
        """Writes many (lba, data) requests, in order: the same as write() for each, as a
        ublk queue's batch of WRITEs hands them over, with the per-request work done
        once for the batch where it can be. Bad arguments raise before anything is
        buffered."""
        self._check_usable()
        self._admission.write_many(*write_requests(items, self.nr_blocks, self._check_range))

    def discard(self, lba: int, nr_blocks: int) -> None:
        """Unmaps blocks. A large range goes in several commits (each at most the
        autocommit budget of blocks), since every mapped block becomes a tombstone."""
        self._check_usable()
        self._check_range(lba, nr_blocks)
        self._admission.discard(lba, nr_blocks)

    def flush(self) -> None:
        self._check_usable()
        self._guarded(self._protocol.commit)
        if self._state.space.free_segments() <= self.layout.reserve_segments + 1:
            self._clean(greedy=True)

    def background_step(self) -> bool:
        """One bounded unit of background work (one segment's cleaning when free space
        runs low, else a chunk of a merge in progress); True if it did any.

        Runs only when nothing unflushed is pending: a cleaning step commits its moves,
        and a merge is installed, right after the last commit."""
        self._check_usable()
        if not self._batch.is_empty():
            return False
        if self._state.space.free_segments() < self.layout.reserve_segments + 4 \
                and self._clean(greedy=False):
            return True
        return self._guarded(self._protocol.step_merge)

    def _clean(self, greedy: bool) -> bool:
        return self._guarded(lambda: self._cleaner.step(greedy, self._protocol.commit))

    def close(self) -> None:
        if self._closed:
            return
        try:
            if self._latch.failed is None and not self.read_only:
                self._guarded(self._protocol.commit)
                self._guarded(self._protocol.final_checkpoint)
        finally:
            self._closed = True
            self._crypto.close()
            for dev in self._owned:
                dev.close()

    @property
    def failure(self) -> str | None:
        """Why the disk stopped accepting writes (the failure latch: a device error, a
        region full, ...) as one line, or None while it works. Reopening recovers."""
        return self._latch.reason

    def __enter__(self) -> "SwornDisk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _check_usable(self) -> None:
        if self._closed:
            raise DiskClosedError("the disk is closed")
        failed = self._latch.failed
        if failed is not None:
            raise DiskClosedError(f"the disk stopped after an I/O failure ({failed}); "
                                  f"reopen it to recover to the last flush")

    def _check_range(self, lba: int, n: int) -> None:
        if not isinstance(lba, int) or not isinstance(n, int):
            raise InvalidArgument("lba and block counts must be integers")
        if lba < 0 or n < 0 or lba + n > self.nr_blocks:
            raise InvalidArgument(f"blocks [{lba}, {lba + n}) are outside the disk "
                                  f"(0..{self.nr_blocks - 1})")

    def stats(self) -> DiskStats:
        return collect_stats(self.debug, self._lifetime, self._session, self.nr_blocks,
                             self.config, self._crypto.stats())

    # ------------------------------------------------------------------ tests and tools
    @property
    def debug(self) -> DebugView:
        """The parts, by name, for tests and diagnostic tools; not a stable interface."""
        return DebugView(state=self._state, batch=self._batch, cleaner=self._cleaner,
                         protocol=self._protocol, fmt=self._fmt, data=self._data,
                         meta=self._meta, guarded=self._guarded, pool=self._crypto.pool)


__all__ = ["SwornDisk"]
