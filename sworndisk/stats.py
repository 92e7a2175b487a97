"""What `SwornDisk.stats()` reports: typed, with lifetime and since-open figures apart.

`Lifetime` counters are persisted in every checkpoint pack and survive reopening (a crash
loses at most the increments since the last checkpoint); everything under `Session`
starts at zero when the disk is opened. `as_dict()` is what `--json` prints.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from . import crypto
from .counters import Lifetime, Session
from .cryptopool import CryptoStats
from .format import BLOCK_SIZE
from .layout import usable_blocks

if TYPE_CHECKING:
    from .config import Config
    from .debug import DebugView


@dataclass
class Space:
    block_size: int
    nr_blocks: int                   # logical size
    usable_blocks: int               # what fits without thin provisioning
    data_segments: int
    reserve_segments: int
    free_segments: int
    valid_blocks: int                # mapped LBAs (committed)
    free_blocks: int                 # neither valid nor written-but-uncommitted
    threaded_segments: int           # log-head switches to hole filling


@dataclass
class Index:
    memtable_records: int
    memtable_limit: int
    bits: int
    levels: list = field(default_factory=list)     # BITs per level
    index_chunks_used: int = 0
    index_chunks: int = 0
    node_cache_entries: int = 0
    node_cache_limit: int = 0
    lookaside_entries: int = 0
    lookaside_limit: int = 0
    summary_bytes: int = 0           # BIT fences and filters in memory (bit.py)
    summary_limit: int = 0
    resident_bytes: int = 0          # BITs held whole in memory (bit.py), the flat index too
    resident_limit: int = 0
    flat_records: int = 0            # the flat index's records (flatindex.py; 0: none)
    merge_records: int = 0           # input records of the merge in progress (0: none)
    merged_records: int = 0          # how many of them it has merged
    merge_steps: int = 0             # chunks merged between commits, this session (lsm.py)
    segtable_cached: int = 0
    segtable_dirty: int = 0
    journal_blocks_used: int = 0
    journal_blocks: int = 0


@dataclass
class DiskStats:
    lifetime: Lifetime
    session: Session
    space: Space
    index: Index
    commit_seq: int
    checkpoint_seq: int
    pending_ops: int                 # journal operations waiting for the next commit
    buffered_blocks: int             # plaintext blocks not yet sealed
    aead_backend: str
    crypto: CryptoStats              # the crypto workers (cryptopool.py)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["session"]["write_amplification"] = self.session.write_amplification
        return d


def collect_stats(parts: "DebugView", lifetime: Lifetime, session: Session, nr_blocks: int,
                  config: "Config", crypto_stats: CryptoStats) -> DiskStats:
    """A snapshot of a disk's figures, read from its parts (SwornDisk.stats)."""
    st, store, protocol = parts.state, parts.index.store, parts.protocol
    merged, merging = st.index.merge_progress()
    layout = protocol.layout
    ses = session
    ses.data_bytes_written, ses.data_bytes_read = parts.data.bytes_written, parts.data.bytes_read
    ses.meta_bytes_written, ses.meta_bytes_read = parts.meta.bytes_written, parts.meta.bytes_read
    ses.node_cache_hits, ses.node_cache_misses = store.hits, store.misses
    ses.segtable_loads = st.segtable.loads
    ses.lookaside_hits, ses.lookaside_misses = st.lookaside.hits, st.lookaside.misses
    protocol.gather_lifetime()
    return DiskStats(
        lifetime=Lifetime(**lifetime.to_dict()), session=Session(**vars(ses)),
        space=Space(block_size=BLOCK_SIZE, nr_blocks=nr_blocks,
                    usable_blocks=usable_blocks(layout.data_blocks * BLOCK_SIZE, config),
                    data_segments=layout.data_segments,
                    reserve_segments=layout.reserve_segments,
                    free_segments=st.space.free_segments(), valid_blocks=st.space.valid_blocks(),
                    free_blocks=st.space.free_blocks(),
                    threaded_segments=st.space.threaded_segments),
        index=Index(memtable_records=len(st.index.memtable),
                    memtable_limit=config.memtable_records,
                    bits=len(st.index.bits()), levels=[len(l) for l in st.index.levels],
                    index_chunks_used=st.ispace.used(), index_chunks=layout.index_chunks,
                    node_cache_entries=store.entries(), node_cache_limit=store.cache_limit,
                    lookaside_entries=len(st.lookaside), lookaside_limit=config.lookaside_records,
                    summary_bytes=store.summaries.used, summary_limit=store.summaries.limit,
                    resident_bytes=store.resident.used, resident_limit=store.resident.limit,
                    flat_records=st.index.flat_records(),
                    merged_records=merged, merge_records=merging,
                    merge_steps=st.index.merge_steps,
                    segtable_cached=st.segtable.cached_count(),
                    segtable_dirty=st.segtable.dirty_count(),
                    journal_blocks_used=protocol.journal.used(),
                    journal_blocks=protocol.journal.nblocks),
        commit_seq=protocol.commit_seq, checkpoint_seq=protocol.pack_seq,
        pending_ops=parts.batch.op_count, buffered_blocks=parts.batch.buffered,
        aead_backend=crypto.backend_name(), crypto=crypto_stats)


__all__ = ["DiskStats", "Lifetime", "Session", "Space", "Index", "collect_stats"]
