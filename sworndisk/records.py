"""The index record, defined once: LBA -> (HBA, key, nonce, MAC).

A record is 8+8+k+12+16 bytes (60 with AES-128 keys, 76 with AES-256), little-endian,
packed. The same layout serves four places: MemTable values (the part after the LBA),
journal data-log records, BIT leaf entries, and BIT internal entries (where LBA is the
child's first LBA and HBA the child node's meta block).
"""
from __future__ import annotations

import struct

import numpy as np

from .format import NONCE_BYTES, TOMBSTONE_HBA, record_dtype
_HBA = struct.Struct("<Q")
_U64_MAX = (1 << 64) - 1


def u64(x: int) -> np.uint64:
    """A search key for an LBA or HBA column (uint64). Never search one with a plain
    int: numpy then converts the whole array to a common type first (100 us for 256K
    LBAs, against 0.6 us)."""
    return np.uint64(min(x, _U64_MAX))


class RecordFormat:
    """Record layout for one key size; `value` means a record without its LBA."""

    def __init__(self, key_bytes: int):
        self.key_bytes = key_bytes
        self.dtype = record_dtype(key_bytes)
        self.size = self.dtype.itemsize
        self.value_size = self.size - 8
        self.key_at = 8                 # a value's key offset: HBA, key, nonce, tag
        self.tombstone = _HBA.pack(TOMBSTONE_HBA) + bytes(self.value_size - 8)
        self.opaque = np.dtype((np.void, self.size))     # a record as bytes: copies fast

    def concat(self, arrays: list[np.ndarray]) -> np.ndarray:
        """np.concatenate for record arrays, as opaque fixed-size items: numpy would
        otherwise work out a common structured dtype field by field on every call, which
        costs several times the copy itself."""
        if not arrays:
            return np.empty(0, self.dtype)
        return np.concatenate([a.view(self.opaque) for a in arrays]).view(self.dtype)

    def value(self, hba: int, key: bytes, nonce: bytes, mac: bytes) -> bytes:
        return _HBA.pack(hba) + key + nonce + mac

    def split(self, value: bytes) -> tuple[int, bytes, bytes, bytes]:
        k = self.key_bytes
        return (_HBA.unpack_from(value)[0], value[8:8 + k], value[8 + k:8 + k + NONCE_BYTES],
                value[8 + k + NONCE_BYTES:])

    @staticmethod
    def hba_of(value: bytes) -> int:
        return _HBA.unpack_from(value)[0]

    def array(self, lbas, values: list[bytes]) -> np.ndarray:
        """Packs parallel (lba, value) sequences into a record array."""
        n = len(values)
        out = np.empty(n, self.dtype)
        if n:
            raw = out.view(np.uint8).reshape(n, self.size)
            raw[:, 8:] = np.frombuffer(b"".join(values), np.uint8).reshape(n, self.value_size)
            out["lba"] = lbas
        return out

    def one(self, lba: int, value: bytes) -> np.ndarray:
        """A (read-only) array of the single record lba -> value."""
        return np.frombuffer(_HBA.pack(lba) + value, self.dtype)

    def records(self, lbas, hbas, key_nonce: np.ndarray, macs: np.ndarray) -> np.ndarray:
        """Packs columns into a record array: key_nonce is n x (key + nonce) bytes."""
        n = len(hbas)
        out = np.empty(n, self.dtype)
        raw = out.view(np.uint8).reshape(n, self.size)
        raw[:, 16:16 + self.key_bytes + NONCE_BYTES] = key_nonce
        raw[:, 16 + self.key_bytes + NONCE_BYTES:] = macs
        out["lba"], out["hba"] = lbas, hbas
        return out

    def values_of(self, recs: np.ndarray) -> list[bytes]:
        raw = recs.view(np.uint8).reshape(len(recs), self.size)[:, 8:]
        blob = raw.tobytes()
        vs = self.value_size
        return [blob[i:i + vs] for i in range(0, len(blob), vs)]

    def value_at(self, recs: np.ndarray, i: int) -> bytes:
        return recs[i:i + 1].tobytes()[8:]
