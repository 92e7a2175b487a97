"""Where everything lives on the two devices, computed once at format time.

Data device: data segments of 1024 blocks (4 MiB), nothing else (no plaintext at all).
Meta device, in 4 KiB blocks:

    [sb0][sb1][checkpoint slot 0][checkpoint slot 1][journal ring][segment table][index chunks]

The sizes depend on the data device size, the logical size and the Config, and are
recorded in the superblock, so `open` never recomputes them.
"""
from __future__ import annotations

from dataclasses import asdict, astuple, dataclass, replace

from .config import Config
from .format import (BLOCK_SIZE, INDEX_CHUNK_BLOCKS, NODE_HEADER, SEGMENT_BLOCKS, record_dtype,
                     segdir_dtype)
from .errors import DeviceTooSmall, InvalidArgument, MetaTooSmall

MAX_LOGICAL_BLOCKS = 0xFFFF_FFFE   # the RIT stores LBAs as u32
MAX_BITS = 64                  # BIT catalog entries per checkpoint (levels x ratio, bounded)


def leaf_capacity(record_size: int) -> int:
    return (BLOCK_SIZE - NODE_HEADER.size) // record_size


MIN_MEMTABLE = 1024            # records: the smallest MemTable fit_config chooses


def fit_config(config: Config, nr_blocks: int) -> Config:
    """The Config a disk of `nr_blocks` is formatted with: the largest MemTable (halving
    from config.memtable_records, down to MIN_MEMTABLE) whose index and journal fit 3.5%
    of the logical size plus 20 MiB. Level 0 holds about level_ratio MemTables' worth of
    BITs, so on a small disk the MemTable, not the live index, would otherwise set the
    meta device's size; a larger MemTable means fewer compactions. Recorded in the
    superblock like every Config, so the meta device stays within 4% + 24 MiB."""
    budget = (nr_blocks * BLOCK_SIZE * 35 // 1000 + (20 << 20)) // BLOCK_SIZE
    rec = record_dtype(config.cipher_key_bytes).itemsize
    live = nr_blocks
    mem = config.memtable_records
    while True:
        fitted = replace(config, memtable_records=mem)
        blocks = (index_chunks_needed(live, fitted, rec) * INDEX_CHUNK_BLOCKS
                  + journal_blocks_needed(live, fitted, rec))
        if blocks <= budget or mem <= MIN_MEMTABLE:
            return fitted
        mem = max(MIN_MEMTABLE, mem // 2)


def journal_blocks_needed(live: int, config: Config, record_size: int) -> int:
    """A checkpoint is due when the MemTable fills or the journal is half used; sized so
    that the MemTable fills first, and at least 4 MiB (the largest transaction, an
    autocommit's records, is a quarter of that)."""
    return max(1024, 2 * -(-max_bit_records(live, config) * (record_size + 1)
                            // (BLOCK_SIZE - 64)) + 64)


def max_bit_records(live: int, config: Config) -> int:
    """Records in one level-0 BIT: a MemTable is compacted at the first commit that fills
    it, so it holds at most memtable_records plus one autocommit's records."""
    return min(live, config.memtable_records + config.autocommit_bytes // BLOCK_SIZE)


def level_caps(live: int, config: Config) -> list[int]:
    """Record limits of levels 1..d-1 (a level spills into the next beyond its limit);
    level d, the bottom, is unlimited and holds at most `live` records.

    Sized from the bottom up (each level level_ratio times the one above it, the bottom
    `live`) rather than from the MemTable down, so the upper levels together stay near
    1/(ratio-1) of the live index whatever the disk size (RocksDB's dynamic level bytes)."""
    depth = 1
    while config.memtable_records * config.level_ratio ** depth < live:
        depth += 1
    return [max(config.memtable_records, live // config.level_ratio ** (depth - i))
            for i in range(1, depth)]


def level0_records(live: int, config: Config) -> int:
    """Records level 0 may hold: it spills once it has more than level_ratio BITs or
    level_ratio MemTables' worth of records, one merge per checkpoint, so while deeper
    merges are pending it may gain one more BIT per level."""
    pending = len(level_caps(live, config)) + 1
    bit = max_bit_records(live, config)
    return min(config.level_ratio * config.memtable_records + pending * bit,
               (config.level_ratio + pending) * bit)


def index_chunks_needed(live: int, config: Config, record_size: int) -> int:
    """Index chunks at the worst moment, a checkpoint that merges into the bottom level.

    Live then: level 0, every upper level (at most its limit plus one merge's inflow),
    the old bottom (`live` records) and the new one being built (`live`). A checkpoint
    does at most one merge, so the inputs it retires, freed once the pack is durable,
    are the ones counted here, never a whole cascade's."""
    caps = level_caps(live, config)
    l0 = level0_records(live, config)
    records = l0 + sum(min(live, cap + l0) for cap in caps) + 2 * live
    bits = config.level_ratio + 2 * len(caps) + 4
    fanout = leaf_capacity(record_size)
    nodes = -(-records // fanout)
    nodes += nodes // (fanout - 1) + 2 * bits        # interior nodes and roots
    # Each BIT rounds up to whole chunks; slack for the allocator.
    return -(-nodes // INDEX_CHUNK_BLOCKS) + bits + 8


def bit_chunks(records: int, record_size: int) -> int:
    """Index chunks a BIT of at most `records` records takes, at most (nodes full but
    the last of each height, the root, a chunk begun per BIT)."""
    fanout = leaf_capacity(record_size)
    nodes = -(-records // fanout)
    nodes += nodes // (fanout - 1) + 2
    return -(-nodes // INDEX_CHUNK_BLOCKS) + 1


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
        """The end of the last region: the index at format, the moved regions after a
        resize that moved them (resize.py)."""
        return max(self.index_start + self.index_chunks * INDEX_CHUNK_BLOCKS,
                   self.checkpoint_slot(2), self.journal_start + self.journal_blocks,
                   self.segtable_start + self.segtable_blocks)

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


def segments_for(nr_blocks: int, config: Config) -> int:
    """The data segments of the smallest data device whose default logical size
    (usable_blocks) is at least `nr_blocks`: what a disk grown to that size has."""
    segs = -(-nr_blocks // SEGMENT_BLOCKS)
    while usable_blocks(segs * SEGMENT_BLOCKS * BLOCK_SIZE, config) < nr_blocks:
        segs += 1
    return segs


@dataclass(frozen=True)
class RegionSizes:
    """The meta regions a disk of some size needs (their starts are the Layout's)."""
    checkpoint_blocks: int    # per slot
    journal_blocks: int
    segtable_blocks: int
    index_chunks: int


def region_sizes(data_segments: int, live: int, config: Config,
                 index_chunks: int | None = None) -> RegionSizes:
    """What the regions must hold for `data_segments` and `live` index records (at most
    the logical size); `index_chunks`, if the index region has more chunks than needed,
    for the checkpoint's chunk map."""
    rec = record_dtype(config.cipher_key_bytes).itemsize
    needed = index_chunks_needed(live, config, rec)
    dir_entry = segdir_dtype(config.cipher_key_bytes).itemsize
    # Checkpoint body: scalars, the BIT catalog (each index chunk is named by at most one
    # BIT, as a JSON number), the segment directory, the chunk state map.
    body = (4096 + MAX_BITS * 256 + 12 * needed + dir_entry * data_segments
            + max(needed, index_chunks or 0) + 4096)
    # Segment table: one detail block per data segment, twice (out-of-place rewrites).
    return RegionSizes(checkpoint_blocks=1 + -(-body // BLOCK_SIZE),
                       journal_blocks=journal_blocks_needed(live, config, rec),
                       segtable_blocks=2 * data_segments + 16, index_chunks=needed)


def check_logical_size(nr_blocks, data_size: int) -> None:
    """InvalidArgument unless `nr_blocks` is a logical size a data device of `data_size`
    bytes can have."""
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


def plan(data_size: int, nr_blocks: int | None, config: Config,
         max_blocks: int | None = None) -> Layout:
    """Computes the layout for a data device of `data_size` bytes; validates the sizes.

    With `max_blocks`, the meta regions are sized for a disk grown to that logical size
    (on the data device that gives it by default, segments_for), so that growing up to it
    (resize.py) needs no larger meta device."""
    seg_bytes = SEGMENT_BLOCKS * BLOCK_SIZE
    data_segments = data_size // seg_bytes
    reserve = config.cleaning_reserve_segments or auto_reserve_segments(data_segments)
    min_data = (reserve + 2) * seg_bytes
    if data_segments < reserve + 2:
        raise DeviceTooSmall(
            f"data device is {data_size} bytes; it must hold at least {reserve + 2} segments "
            f"of 4 MiB ({min_data} bytes)")
    if nr_blocks is None:
        nr_blocks = usable_blocks(data_size, config)
    check_logical_size(nr_blocks, data_size)
    if max_blocks is not None:
        if not isinstance(max_blocks, int) or not nr_blocks <= max_blocks <= MAX_LOGICAL_BLOCKS:
            raise InvalidArgument(
                f"max_blocks must be an integer from the logical size {nr_blocks} up to "
                f"{MAX_LOGICAL_BLOCKS} (got {max_blocks!r})")
    config = fit_config(config, max_blocks or nr_blocks)
    live = min(nr_blocks, data_segments * SEGMENT_BLOCKS)  # records only name data blocks
    sizes = region_sizes(data_segments, live, config)
    if max_blocks is not None:
        big = region_sizes(max(data_segments, segments_for(max_blocks, config)),
                           max(live, max_blocks), config)
        sizes = RegionSizes(*(max(a, b) for a, b in zip(astuple(sizes), astuple(big))))
    start = 2
    journal_start = start + 2 * sizes.checkpoint_blocks
    segtable_start = journal_start + sizes.journal_blocks
    return Layout(nr_blocks=nr_blocks, data_segments=data_segments, reserve_segments=reserve,
                  checkpoint_start=start, checkpoint_blocks=sizes.checkpoint_blocks,
                  journal_start=journal_start, journal_blocks=sizes.journal_blocks,
                  segtable_start=segtable_start, segtable_blocks=sizes.segtable_blocks,
                  index_start=segtable_start + sizes.segtable_blocks,
                  index_chunks=sizes.index_chunks)


def plan_devices(data_size: int, meta_size: int, nr_blocks: int | None,
                 config: Config, max_blocks: int | None = None) -> tuple[Layout, Config]:
    """The layout and Config a disk is formatted with on devices of these sizes: plan(),
    with every meta block beyond the minimum given to the index region."""
    layout = plan(data_size, nr_blocks, config, max_blocks)
    extra = (meta_size // BLOCK_SIZE - layout.meta_blocks) // INDEX_CHUNK_BLOCKS
    if extra < 0:
        raise DeviceTooSmall(
            f"meta device is {meta_size} bytes; this disk needs at least "
            f"{layout.meta_blocks * BLOCK_SIZE} bytes "
            f"({layout.meta_blocks * BLOCK_SIZE / (1 << 20):.1f} MiB)")
    layout = replace(layout, index_chunks=layout.index_chunks + extra)
    return layout, fit_config(config, max_blocks or layout.nr_blocks)


def grown(old: Layout, config: Config, data_size: int, meta_size: int,
          nr_blocks: int | None = None) -> Layout:
    """The layout of `old` grown onto a data device of `data_size` bytes and a meta
    device of `meta_size` bytes, to `nr_blocks` (default: the larger of the current size
    and what the data device allows, as at format). What changes is docs/format.md's
    "Resize": the sizes, and the meta regions that must grow:

    - when the checkpoint slots, the journal and the segment table are large enough for
      the new size (as --max-sectors reserves at format), they stay; the index region
      gains the chunks the new size needs right after its end;
    - otherwise the three move, together, behind everything the current layout uses
      (the index region grows over the space up to them, including the regions an
      earlier resize moved away from), so that writing them touches nothing of the
      current disk until the superblock names the new layout.

    Raises InvalidArgument for a shrink (not supported) and MetaTooSmall, naming the
    size it needs, when the meta device cannot hold the grown disk."""
    seg_bytes = SEGMENT_BLOCKS * BLOCK_SIZE
    data_segments = data_size // seg_bytes
    if data_segments < old.data_segments:
        raise InvalidArgument(
            f"the data device is {data_size} bytes, smaller than the "
            f"{old.data_blocks * BLOCK_SIZE} bytes the disk uses: shrinking is not supported")
    if nr_blocks is None:
        nr_blocks = max(old.nr_blocks, usable_blocks(data_size, config))
    if isinstance(nr_blocks, int) and nr_blocks < old.nr_blocks:
        raise InvalidArgument(
            f"{nr_blocks * 8} sectors is less than the disk's {old.nr_blocks * 8}: shrinking "
            f"is not supported")
    check_logical_size(nr_blocks, data_size)
    reserve = config.cleaning_reserve_segments or auto_reserve_segments(data_segments)
    need = region_sizes(data_segments, min(nr_blocks, data_segments * SEGMENT_BLOCKS), config)
    index_chunks = max(old.index_chunks, need.index_chunks)
    new = replace(old, nr_blocks=nr_blocks, data_segments=data_segments,
                  reserve_segments=reserve, index_chunks=index_chunks)
    behind_index = old.checkpoint_start > old.index_start      # moved by an earlier resize
    if (old.checkpoint_blocks < need.checkpoint_blocks or old.journal_blocks < need.journal_blocks
            or old.segtable_blocks < need.segtable_blocks
            or (behind_index and index_chunks > old.index_chunks)):
        end = max(old.meta_blocks, old.index_start + index_chunks * INDEX_CHUNK_BLOCKS)
        index_chunks = -(-(end - old.index_start) // INDEX_CHUNK_BLOCKS)
        moved = region_sizes(data_segments, min(nr_blocks, data_segments * SEGMENT_BLOCKS),
                             config, index_chunks)
        start = old.index_start + index_chunks * INDEX_CHUNK_BLOCKS
        journal_start = start + 2 * moved.checkpoint_blocks
        new = replace(new, index_chunks=index_chunks, checkpoint_start=start,
                      checkpoint_blocks=moved.checkpoint_blocks, journal_start=journal_start,
                      journal_blocks=moved.journal_blocks,
                      segtable_start=journal_start + moved.journal_blocks,
                      segtable_blocks=moved.segtable_blocks)
    if new.meta_blocks * BLOCK_SIZE > meta_size:
        need_bytes = new.meta_blocks * BLOCK_SIZE
        raise MetaTooSmall(
            f"the meta device is {meta_size} bytes; the grown disk needs at least "
            f"{need_bytes} bytes: enlarge it first (for an image file: truncate -s "
            f"{-(-need_bytes // (1 << 20))}M META) and run resize again", need_bytes)
    return new
