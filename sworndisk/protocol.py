"""The commit, checkpoint and recovery protocols (docs/format.md, "Protocols").

Commit (flush):
    1. seal the pending batch; flush the data device (data before the records naming it)
    2. append one journal transaction: the batch's operations and a Commit; flush meta
    3. apply the operations to the committed state.
Checkpoint (after a commit, when the MemTable is full, the journal half used or too
many segment-table details dirty):
    compact -> journal Checkpoint record naming the new pack's seq and MAC -> write the
    pack to the slot that does not hold the trusted pack -> flush.
    A merge the compaction starts runs between later writes (lsm.py) and is installed by
    a later checkpoint; its chunks are free in every pack until then.
Recovery: the newest pack that authenticates, confirmed by the Checkpoint record at its
anchor, then every whole committed transaction after it, applied in order. A trailing
Checkpoint record without its pack is the honest trace of a crash between the two
writes of a checkpoint.
"""
from __future__ import annotations

import time
from typing import Callable

from .batch import PendingBatch
from .checkpoint import Pack, read_pack
from .committed import CommittedState
from .config import Config
from .format import BLOCK_SIZE
from .device import BlockDevice
from .errors import IntegrityError, MetadataFullError
from .journal import Journal
from .layout import Layout
from .ops import Checkpoint, Commit, decode, encode
from .records import RecordFormat
from .segtable import dir_dtype
from .counters import Lifetime, Session


class CommitProtocol:
    def __init__(self, meta: BlockDevice, data: BlockDevice, layout: Layout, config: Config,
                 disk_key: bytes, fmt: RecordFormat, state: CommittedState,
                 batch: PendingBatch, lifetime: Lifetime, session: Session):
        self.meta, self.data = meta, data
        self.layout, self.config = layout, config
        self.disk_key = disk_key
        self.fmt = fmt
        self.state = state
        self.batch = batch
        self.lifetime = lifetime
        self.session = session
        self.journal = Journal(meta, disk_key, layout.journal_start, layout.journal_blocks)
        self.commit_seq = 0
        self.pack_seq = 0
        self._pack_slot = 0        # the slot holding the trusted pack; the next goes to the other
        # Run with the new commit seq once a commit is durable and applied, before commit()
        # returns (the rollback anchor); an exception fails the commit's caller.
        self.on_commit: Callable[[int], None] | None = None

    # ---- format ----
    def format(self, superblock: bytes) -> None:
        """Writes both superblock copies and the first, empty checkpoint."""
        # Old checkpoint headers would only confuse a reader; make both slots empty.
        for slot in (0, 1):
            self.meta.pwrite(bytes(BLOCK_SIZE), self.layout.checkpoint_slot(slot) * BLOCK_SIZE)
        self.meta.pwrite(superblock, 0)
        self.meta.pwrite(superblock, BLOCK_SIZE)
        self.meta.flush()
        self.checkpoint()

    # ---- commit ----
    def commit(self) -> None:
        ops, busy = self.batch.take()
        if not ops:
            return
        self.data.flush()
        seq = self.commit_seq + 1
        self.journal.append(encode(ops + [Commit(seq)]))
        self.commit_seq = seq
        self.state.apply(ops)
        self.state.space.set_busy(busy, False)
        self.state.space.clock = seq
        self.lifetime.commits += 1
        if self.on_commit is not None:
            self.on_commit(seq)
        if self._checkpoint_due():
            self.checkpoint()

    def _checkpoint_due(self) -> bool:
        st = self.state
        return (len(st.index.memtable) >= self.config.memtable_records
                or self.journal.used() > self.journal.nblocks // 2
                or st.segtable.dirty_count() > st.segtable.cache_limit // 2)

    # ---- checkpoint ----
    def checkpoint(self, finish: bool = False) -> None:
        """`finish`: a merge in progress or due is run to its end (lsm.LsmIndex.compact)."""
        st = self.state
        st.ispace.retire(st.index.compact(finish))
        st.segtable.write_dirty()
        self._write_pack(1 - self._pack_slot)
        st.ispace.release_retired()
        st.segtable.release_retired()
        self.lifetime.checkpoints += 1

    def final_checkpoint(self) -> None:
        """At close, after the last commit: a checkpoint if anything happened since the
        last one, with every merge finished, so that reopening finds none half done."""
        if self.journal.used() > 1 or self.state.index.merging():
            self.checkpoint(finish=True)

    def step_merge(self) -> bool:
        """One chunk of a merge in progress, or the checkpoint that installs it once it is
        done: an idle disk's background work, with nothing pending. Whether it did any."""
        index = self.state.index
        if not index.merging():
            return False
        if not index.merge_ready():
            index.step_merge()
        if index.merge_ready():
            self.checkpoint()
        return True

    def _write_pack(self, slot: int) -> None:
        """The Checkpoint record, then the pack in `slot`, then a flush."""
        st = self.state
        seq = self.pack_seq + 1
        self.gather_lifetime()
        pack = Pack(seq, self.journal.head_seq, self.journal.last_mac,
                    meta={"commit_seq": self.commit_seq, "bits": st.index.catalog(),
                          "next_bit_id": st.index.next_bit_id,
                          "counters": self.lifetime.to_dict(), "time": time.time()},
                    segdir=st.segtable.directory(), ichunks=st.ispace.packed())
        slot_bytes, mac = pack.encode(self.disk_key)
        if len(slot_bytes) > self.layout.checkpoint_blocks * BLOCK_SIZE:
            raise MetadataFullError(f"checkpoint pack {seq} outgrew its slot")
        anchor = self.journal.head_seq
        self.journal.append(encode([Checkpoint(seq, mac)]))
        # Never over the trusted pack, whichever slot it was found in: until this one is
        # durable, the trusted one is what recovery needs.
        self.meta.pwrite(slot_bytes, self.layout.checkpoint_slot(slot) * BLOCK_SIZE)
        self.meta.flush()
        self.pack_seq, self._pack_slot = seq, slot
        self.journal.set_anchor(anchor)

    # ---- resize ----
    def move_to(self, layout: Layout) -> None:
        """Writes the committed state into the checkpoint slots, journal and segment
        table of `layout` (a grown disk's, resize.py), which overlap nothing the current
        layout uses: a checkpoint here first (the state is then whole in one pack), the
        segment-table blocks copied, an empty slot 1, then in slot 0 a pack confirmed by
        the first block of a new journal (sequence 1 and the genesis MAC, as at format:
        the chain and the pack MAC still tie every block to this pack). Until the
        superblock names `layout`, the disk stays as it was."""
        self.commit()
        self.checkpoint(finish=True)
        self.state.segtable.move(layout.segtable_start, layout.segtable_blocks)
        self.meta.pwrite(bytes(BLOCK_SIZE), layout.checkpoint_slot(1) * BLOCK_SIZE)
        journal = Journal(self.meta, self.disk_key, layout.journal_start, layout.journal_blocks)
        journal.restore_count(self.journal.blocks_written)
        self.journal, self.layout = journal, layout
        self._write_pack(0)

    def gather_lifetime(self) -> None:
        """Brings the counters the parts keep themselves into the lifetime counters."""
        self.lifetime.minor_compactions = self.state.index.minor_compactions
        self.lifetime.major_compactions = self.state.index.major_compactions
        self.lifetime.journal_blocks_written = self.journal.blocks_written

    # ---- recovery ----
    def recover(self) -> None:
        found = [(read_pack(self.meta, self.disk_key, self.layout.checkpoint_slot(s),
                            self.layout.checkpoint_blocks, dir_dtype(self.config.cipher_key_bytes)),
                  s) for s in (0, 1)]
        found = sorted(((p, s) for p, s in found if p is not None), key=lambda ps: -ps[0].seq)
        if not found:
            raise IntegrityError("no checkpoint pack verifies: the meta device is damaged or tampered")
        pack, self._pack_slot = found[0]
        self._load_pack(pack)
        txns = self.journal.scan(pack.anchor_seq, pack.anchor_prev_mac)
        first = next(txns, None)
        if first is None or decode(self.fmt, first.payload) != [Checkpoint(pack.seq, pack.mac)]:
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
            ops = decode(self.fmt, txn.payload)
            if ops and isinstance(ops[-1], Commit):
                self.state.apply(ops[:-1])
                self.commit_seq = ops[-1].seq
                self.state.space.clock = self.commit_seq
                self.session.recovered_txns += 1
                resume = (txn.end_seq, txn.end_mac)
            elif len(ops) == 1 and isinstance(ops[0], Checkpoint) and ops[0].seq > pack.seq:
                pending_ckpt = ops[0].seq      # crash between K record and pack: honest
            else:
                raise IntegrityError("the journal holds a transaction of unexpected form")
        self.journal.resume(*resume)
        self.journal.set_anchor(pack.anchor_seq)

    def _load_pack(self, pack: Pack) -> None:
        st, m = self.state, pack.meta
        # A pack written before a resize names fewer segments and chunks (the others
        # are empty and free); never more.
        if len(pack.segdir) > self.layout.data_segments \
                or len(pack.ichunks) > self.layout.index_chunks:
            raise IntegrityError("checkpoint pack does not match the disk layout")
        self.pack_seq = pack.seq
        self.commit_seq = m["commit_seq"]
        st.space.clock = self.commit_seq
        st.segtable.load(pack.segdir)
        st.space.reset_volatile()
        st.ispace.load(pack.ichunks)
        restored = Lifetime.from_dict(m["counters"])
        st.index.load(m["bits"], m["next_bit_id"], restored.minor_compactions,
                      restored.major_compactions)
        self.journal.restore_count(restored.journal_blocks_written)
        for name, value in restored.to_dict().items():
            setattr(self.lifetime, name, value)


__all__ = ["CommitProtocol"]
