"""Tunables, fixed at format time and recorded in the superblock.

`open` always uses the recorded values, so a disk behaves the same however it is opened;
the runtime fields (RUNTIME_FIELDS: crypto_workers) are not recorded and are taken from
the Config given to create() or open().
"""
from dataclasses import asdict, dataclass, fields

from .errors import InvalidArgument

from .format import BLOCK_SIZE


RUNTIME_FIELDS = frozenset({"crypto_workers"})     # chosen at each open, never recorded


@dataclass(frozen=True)
class Config:
    # Index (dsLSM-tree)
    memtable_records: int = 65536   # committed records before a minor compaction (Rust default)
    level_ratio: int = 8            # size ratio between adjacent BIT levels; also L0 BIT count
    # Crypto: AES-GCM key size for data blocks and BIT nodes (16 = AES-128, 32 = AES-256)
    cipher_key_bytes: int = 16
    # Space
    cleaning_reserve_segments: int = 0   # 0 = automatic (see space.py)
    # Caches (bounded memory)
    node_cache_bytes: int = 64 << 20     # BIT node cache (plaintext nodes)
    lookaside_records: int = 65536       # LBA -> newest record cache, ~200 B each; 0 = off
    # Automatic commit after this many unflushed bytes (the issue allows >= 64 MiB)
    autocommit_bytes: int = 64 << 20
    crypto_workers: int | None = None  # runtime only, not recorded: 0 = in-thread, None = automatic

    def validate(self) -> "Config":
        if self.memtable_records < 16:
            raise InvalidArgument(f"memtable_records must be at least 16 (got {self.memtable_records})")
        if self.level_ratio < 2:
            raise InvalidArgument(f"level_ratio must be at least 2 (got {self.level_ratio})")
        if self.cipher_key_bytes not in (16, 32):
            raise InvalidArgument(f"cipher_key_bytes must be 16 or 32 (got {self.cipher_key_bytes})")
        if self.cleaning_reserve_segments < 0:
            raise InvalidArgument("cleaning_reserve_segments must be >= 0")
        if self.lookaside_records < 0:
            raise InvalidArgument("lookaside_records must be >= 0")
        if self.node_cache_bytes < 64 * BLOCK_SIZE:
            raise InvalidArgument(f"node_cache_bytes must be at least {64 * BLOCK_SIZE}")
        if self.autocommit_bytes < (64 << 20):
            raise InvalidArgument("autocommit_bytes must be at least 64 MiB (flush semantics)")
        if self.crypto_workers is not None and (
                type(self.crypto_workers) is not int or not 0 <= self.crypto_workers <= 64):
            raise InvalidArgument(f"crypto_workers must be 0..64 or None for automatic "
                                  f"(got {self.crypto_workers!r})")
        return self

    def to_dict(self) -> dict:
        """The format-time fields, as the superblock records them."""
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in fields(cls)} - RUNTIME_FIELDS
        return cls(**{k: v for k, v in d.items() if k in known}).validate()
