"""The engine's counters: what the parts count as they work, read by `stats.py`.

`Lifetime` counters are persisted in every checkpoint pack and survive reopening (a crash
loses at most the increments since the last checkpoint); `Session` starts at zero when
the disk is opened. Apart from stats.py so that the parts that count (batch, cleaner,
protocol) import only this, and stats.py may import the parts without a circle.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .format import BLOCK_SIZE


@dataclass
class Lifetime:
    """Since the disk was formatted (persisted in checkpoint packs)."""
    user_blocks_written: int = 0
    user_blocks_read: int = 0
    blocks_discarded: int = 0
    commits: int = 0
    checkpoints: int = 0
    segments_sealed: int = 0
    cleaning_runs: int = 0
    blocks_moved: int = 0
    cleaning_unverified_blocks: int = 0    # blocks the cleaner found tampered and left
    minor_compactions: int = 0
    major_compactions: int = 0
    journal_blocks_written: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Lifetime":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Session:
    """Since this open."""
    recovered_txns: int = 0          # journal transactions replayed by recovery
    user_blocks_written: int = 0
    user_blocks_read: int = 0
    data_bytes_written: int = 0
    meta_bytes_written: int = 0
    data_bytes_read: int = 0
    meta_bytes_read: int = 0
    node_cache_hits: int = 0
    node_cache_misses: int = 0
    segtable_loads: int = 0
    lookaside_hits: int = 0          # committed lookups answered by the lookaside cache
    lookaside_misses: int = 0

    @property
    def write_amplification(self) -> float | None:
        """Bytes written to both devices per byte the user wrote (None before a write)."""
        user = self.user_blocks_written * BLOCK_SIZE
        return (self.data_bytes_written + self.meta_bytes_written) / user if user else None


__all__ = ["Lifetime", "Session"]
