"""Where everything lives on the two devices, computed once at format time.

Data device: data segments of 1024 blocks (4 MiB), nothing else (no plaintext at all).
Meta device, in 4 KiB blocks:

    [sb0][sb1][checkpoint slot 0][checkpoint slot 1][journal ring][segment table][index chunks]

The sizes depend on the data device size, the logical size and the Config, and are
recorded in the superblock, so `open` never recomputes them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import BLOCK_SIZE, SEGMENT_BLOCKS, Config
from .errors import DeviceTooSmall, InvalidArgument

INDEX_CHUNK_BLOCKS = 64        # index space is allocated in 256 KiB chunks (see docs/format.md)
MAX_LOGICAL_BLOCKS = 0xFFFF_FFFE   # the RIT stores LBAs as u32
MAX_BITS = 64                  # BIT catalog entries per checkpoint (levels x ratio, bounded)


def leaf_capacity(record_size: int) -> int:
    from .bit import NODE_HEADER
    return (BLOCK_SIZE - NODE_HEADER.size) // record_size


def auto_reserve_segments(data_segments: int) -> int:
    """Cleaning reserve: 2 segments, or 2% of the data device, whichever is more."""
    return max(2, -(-data_segments * 2 // 100))


def usable_blocks(data_size: int, config: Config | None = None) -> int:
    """The default logical size: what the data device holds minus the cleaning reserve."""
    config = config or Config()
    segs = data_size // (SEGMENT_BLOCKS * BLOCK_SIZE)
    reserve = config.cleaning_reserve_segments or auto_reserve_segments(segs)
    return max(0, (segs - reserve) * SEGMENT_BLOCKS)


@dataclass(frozen=True)
class Layout:
    nr_blocks: int            # logical size
    data_segments: int
    reserve_segments: int
    checkpoint_start: int     # meta block numbers
    checkpoint_blocks: int    # per slot
    journal_start: int
    journal_blocks: int
    segtable_start: int
    segtable_blocks: int
    index_start: int
    index_chunks: int

    @property
    def data_blocks(self) -> int:
        return self.data_segments * SEGMENT_BLOCKS

    @property
    def meta_blocks(self) -> int:
        return self.index_start + self.index_chunks * INDEX_CHUNK_BLOCKS

    def checkpoint_slot(self, slot: int) -> int:
        return self.checkpoint_start + slot * self.checkpoint_blocks

    def regions(self) -> dict:
        b = BLOCK_SIZE
        return {
            "superblock0": ("meta", 0, b),
            "superblock1": ("meta", b, b),
            "checkpoint0": ("meta", self.checkpoint_slot(0) * b, self.checkpoint_blocks * b),
            "checkpoint1": ("meta", self.checkpoint_slot(1) * b, self.checkpoint_blocks * b),
            "journal": ("meta", self.journal_start * b, self.journal_blocks * b),
            "segtable": ("meta", self.segtable_start * b, self.segtable_blocks * b),
            "index": ("meta", self.index_start * b, self.index_chunks * INDEX_CHUNK_BLOCKS * b),
            "data": ("data", 0, self.data_blocks * b),
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(**d)


def plan(data_size: int, nr_blocks: int | None, config: Config) -> Layout:
    """Computes the layout for a data device of `data_size` bytes; validates the sizes."""
    seg_bytes = SEGMENT_BLOCKS * BLOCK_SIZE
    data_segments = data_size // seg_bytes
    reserve = config.cleaning_reserve_segments or auto_reserve_segments(data_segments)
    min_data = (reserve + 2) * seg_bytes
    if data_segments < reserve + 2:
        raise DeviceTooSmall(
            f"data device is {data_size} bytes; it must hold at least {reserve + 2} segments "
            f"of 4 MiB ({min_data} bytes)")
    data_blocks = data_segments * SEGMENT_BLOCKS
    if nr_blocks is None:
        nr_blocks = usable_blocks(data_size, config)
    if not isinstance(nr_blocks, int) or nr_blocks <= 0:
        raise InvalidArgument(f"nr_blocks must be a positive integer (got {nr_blocks!r})")
    # Thin provisioning: the logical size may be the data device's whole size (the Rust
    # manual's 30 GB table on a 30 GB device), including a tail smaller than a segment
    # that holds no data; writes get ENOSPC only when live data no longer fits.
    device_blocks = data_size // BLOCK_SIZE
    if nr_blocks > device_blocks:
        raise InvalidArgument(
            f"nr_blocks {nr_blocks} exceeds the data device's {device_blocks} blocks; "
            f"the logical size may be at most the data device size")
    if nr_blocks > MAX_LOGICAL_BLOCKS:
        raise InvalidArgument(f"nr_blocks may be at most {MAX_LOGICAL_BLOCKS} (16 TiB)")

    rec = 28 + 8 + 8 + config.cipher_key_bytes
    fanout = leaf_capacity(rec)
    # Checkpoint slot: header block + body (BIT catalog, segment directory, chunk map, scalars).
    live = min(nr_blocks, data_blocks)     # index records can only name data blocks
    leaves = -(-live // fanout)
    index_chunks_needed = -(-(leaves + leaves // (fanout - 1) + 2) // INDEX_CHUNK_BLOCKS)
    # A BIT holds at most one record per LBA: small disks need less than a full MemTable.
    mem_leaves = -(-min(config.memtable_records, nr_blocks) // fanout)
    l0_chunks = (config.level_ratio + 2) * (-(-(mem_leaves + 2) // INDEX_CHUNK_BLOCKS) + 1)
    # Live index, a full copy during the largest major compaction, L0, and slack.
    index_chunks = 2 * index_chunks_needed + 2 * l0_chunks + 8
    dir_entry = 8 + config.cipher_key_bytes + 12 + 16 + 2
    body = (4096 + MAX_BITS * (256 + 8 * index_chunks) + dir_entry * data_segments
            + index_chunks + 4096)
    checkpoint_blocks = 1 + -(-body // BLOCK_SIZE)
    # Journal: at least 4 MiB and room for 4 MemTables' worth of records between checkpoints.
    per_block = BLOCK_SIZE - 64
    journal_blocks = max(1024, 4 * -(-min(config.memtable_records, nr_blocks) * (rec + 1)
                                      // per_block) + 64)
    # Segment table: one detail block per data segment, twice (out-of-place rewrites).
    segtable_blocks = 2 * data_segments + 16
    start = 2
    journal_start = start + 2 * checkpoint_blocks
    segtable_start = journal_start + journal_blocks
    return Layout(nr_blocks=nr_blocks, data_segments=data_segments, reserve_segments=reserve,
                  checkpoint_start=start, checkpoint_blocks=checkpoint_blocks,
                  journal_start=journal_start, journal_blocks=journal_blocks,
                  segtable_start=segtable_start, segtable_blocks=segtable_blocks,
                  index_start=segtable_start + segtable_blocks, index_chunks=index_chunks)
