"""Block Index Tables: immutable, encrypted B+trees that are also Merkle trees.

A BIT node is one 4 KiB meta block, AES-GCM encrypted under its own random key. Its
parent entry (a record: first LBA, node HBA, key, nonce, MAC) is the only place that
key and MAC live, so a node that is tampered with, stale or moved fails verification.
The root's entry lives in the BIT catalog (BITC) of the checkpoint.

Nodes are written in post-order as the records stream in (leaves first, each parent after
its last child), sequentially over index chunks. See docs/format.md.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from . import crypto
from .format import BLOCK_SIZE
from .device import BlockDevice
from .errors import IntegrityError
from .records import RecordFormat

from .format import NODE_HEADER, NODE_INTERNAL as INTERNAL, NODE_LEAF as LEAF, NODE_MAGIC


@dataclass
class BitMeta:
    """A BIT catalog entry."""
    bit_id: int
    level: int
    height: int            # 0: the root is a leaf
    count: int             # records in the leaves
    lba_min: int
    lba_max: int
    root: bytes            # record value of the root node: hba, key, nonce, mac
    chunks: list = field(default_factory=list)   # index chunks holding the nodes

    def to_dict(self) -> dict:
        return {"id": self.bit_id, "level": self.level, "height": self.height,
                "count": self.count, "lba_min": self.lba_min, "lba_max": self.lba_max,
                "root": self.root.hex(), "chunks": list(self.chunks)}

    @classmethod
    def from_dict(cls, d: dict) -> "BitMeta":
        return cls(d["id"], d["level"], d["height"], d["count"], d["lba_min"], d["lba_max"],
                   bytes.fromhex(d["root"]), list(d["chunks"]))


class NodeStore:
    """Reads and verifies BIT nodes through a bounded plaintext cache (the BNC)."""

    def __init__(self, meta: BlockDevice, fmt: RecordFormat, cache_bytes: int):
        self.meta = meta
        self.fmt = fmt
        self.capacity = (BLOCK_SIZE - NODE_HEADER.size) // fmt.size
        self.cache: OrderedDict[bytes, tuple[int, np.ndarray]] = OrderedDict()
        self.cache_limit = max(16, cache_bytes // BLOCK_SIZE)
        self.hits = self.misses = 0

    def entries(self) -> int:
        return len(self.cache)

    def node(self, entry: bytes, what: str = "BIT node") -> tuple[int, np.ndarray]:
        """(kind, records) of the node that `entry` (a record value) points to."""
        kind, recs, _ = self.keyed(entry, what)
        return kind, recs

    def keyed(self, entry: bytes, what: str = "BIT node") -> tuple[int, np.ndarray, np.ndarray]:
        """(kind, records, LBAs as a contiguous array) of a node: lookups search the LBAs,
        and a field view of the records would be rebuilt at every search."""
        mac = entry[-crypto.TAG_BYTES:]
        hit = self.cache.get(mac)
        if hit is not None:
            self.cache.move_to_end(mac)
            self.hits += 1
            return hit
        self.misses += 1
        hba, key, nonce, tag = self.fmt.split(entry)
        ct = self.meta.pread(BLOCK_SIZE, hba * BLOCK_SIZE)
        pt = crypto.decrypt(key, nonce, ct, tag, f"{what} at meta block {hba}")
        magic, kind, _height, _r, count, _r2 = NODE_HEADER.unpack_from(pt)
        if magic != NODE_MAGIC or kind not in (LEAF, INTERNAL) or count > self.capacity:
            raise IntegrityError(f"{what} at meta block {hba} is malformed")
        return self._remember(mac, kind, pt, count)

    def _remember(self, mac: bytes, kind: int, pt: bytes, count: int) -> tuple:
        recs = np.frombuffer(pt, self.fmt.dtype, count, NODE_HEADER.size)
        node = (kind, recs, np.ascontiguousarray(recs["lba"]))
        self.cache[mac] = node
        if len(self.cache) > self.cache_limit:
            self.cache.popitem(last=False)
        return node

    def seal(self, kind: int, height: int, recs: np.ndarray) -> tuple[bytes, bytes, bytes, bytes]:
        """Encrypts a node; returns (ciphertext, key, nonce, mac). The plaintext goes into
        the cache as well (write-through): a new BIT replaces the ones it merged, so its
        nodes are the ones the next lookups need, and reading them back would cost a
        device read and a decryption each."""
        pt = bytearray(BLOCK_SIZE)
        NODE_HEADER.pack_into(pt, 0, NODE_MAGIC, kind, height, 0, len(recs), bytes(4))
        raw = recs.tobytes()
        pt[NODE_HEADER.size:NODE_HEADER.size + len(raw)] = raw
        key = crypto.random_bytes(self.fmt.key_bytes)
        nonce = crypto.random_bytes(crypto.NONCE_BYTES)
        pt = bytes(pt)
        ct, mac = crypto.encrypt(key, nonce, pt)
        self._remember(mac, kind, pt, len(recs))
        return ct, key, nonce, mac


class Bit:
    """Read side of one BIT."""

    def __init__(self, meta: BitMeta, store: NodeStore):
        self.meta = meta
        self.store = store

    def _node(self, entry: bytes, expect_leaf: bool) -> np.ndarray:
        return self.keyed(entry, expect_leaf)[0]

    def keyed(self, entry: bytes, expect_leaf: bool) -> tuple[np.ndarray, np.ndarray]:
        """(records, their LBAs) of a node, checked to be of the kind its depth needs."""
        kind, recs, lbas = self.store.keyed(entry, f"BIT {self.meta.bit_id} node")
        if (kind == LEAF) != expect_leaf:
            raise IntegrityError(f"BIT {self.meta.bit_id}: node kind does not match its depth")
        return recs, lbas

    def lookup_many(self, lbas: np.ndarray, found: np.ndarray, out: np.ndarray) -> None:
        """For sorted `lbas` not yet `found`, fills `out` with this BIT's records."""
        want = np.flatnonzero(~found & (lbas >= self.meta.lba_min) & (lbas <= self.meta.lba_max))
        if len(want) == 0:
            return
        value_at = self.store.fmt.value_at
        # Positions travel as Python lists of ints: most nodes below the root see one or
        # two LBAs of a batch, where numpy's per-call overhead would dominate.
        stack = [(self.meta.root, self.meta.height, want.tolist())]
        keys_all = lbas.tolist()
        while stack:
            entry, height, pos = stack.pop()
            recs, keys_here = self.keyed(entry, height == 0)
            if len(pos) == 1:                           # one LBA: scalar search
                p = pos[0]
                key = keys_all[p]
                if height == 0:
                    i = int(keys_here.searchsorted(key))
                    if i < len(keys_here) and keys_here[i] == key:
                        found[p] = True
                        out[p] = recs[i]
                    continue
                c = int(keys_here.searchsorted(key, side="right")) - 1
                if c >= 0:
                    stack.append((value_at(recs, c), height - 1, pos))
                continue
            keys = np.array([keys_all[p] for p in pos], np.uint64)
            if height == 0:
                i = np.minimum(keys_here.searchsorted(keys), len(keys_here) - 1)
                ok = keys_here[i] == keys
                hit = np.asarray(pos)[ok]
                found[hit] = True
                out[hit] = recs[i[ok]]
                continue
            child = (keys_here.searchsorted(keys, side="right") - 1).tolist()
            a = 0
            while a < len(child) and child[a] < 0:      # before this subtree
                a += 1
            while a < len(child):
                b = a + 1
                while b < len(child) and child[b] == child[a]:
                    b += 1
                stack.append((value_at(recs, child[a]), height - 1, pos[a:b]))
                a = b

    def range(self, lo: int, hi: int) -> np.ndarray:
        """Records with lo <= lba < hi, in LBA order."""
        if hi <= self.meta.lba_min or lo > self.meta.lba_max:
            return np.empty(0, self.store.fmt.dtype)
        parts = [r[(r["lba"] >= lo) & (r["lba"] < hi)] for r in self.leaves(lo, hi)]
        return np.concatenate(parts) if parts else np.empty(0, self.store.fmt.dtype)

    def leaves(self, lo: int = 0, hi: int = 1 << 64) -> Iterator[np.ndarray]:
        """Leaf record arrays overlapping [lo, hi), in order (depth-first)."""
        stack = [(self.meta.root, self.meta.height)]
        while stack:
            entry, height = stack.pop()
            recs = self._node(entry, height == 0)
            if height == 0:
                yield recs
                continue
            first = max(0, int(np.searchsorted(recs["lba"], lo, side="right")) - 1)
            last = int(np.searchsorted(recs["lba"], hi, side="left"))
            for c in range(last - 1, first - 1, -1):     # reversed: the stack pops in order
                stack.append((self.store.fmt.value_at(recs, c), height - 1))


class BitBuilder:
    """Writes a BIT from records that arrive in strictly increasing LBA order."""

    def __init__(self, store: NodeStore, alloc_chunk: Callable[[], int],
                 chunk_blocks: int, chunk_start: Callable[[int], int]):
        self.store = store
        self.fmt = store.fmt
        self.alloc_chunk = alloc_chunk
        self.chunk_blocks = chunk_blocks
        self.chunk_start = chunk_start
        self.chunks: list[int] = []
        self.buf = bytearray()
        self.pending: list[list[np.ndarray]] = [[]]   # per height: arrays awaiting a node
        self.pending_n: list[int] = [0]
        self.emitted: list[int] = [0]
        self.count = 0
        self.lba_min = self.lba_max = None
        self.blocks_written = 0

    def add(self, recs: np.ndarray) -> None:
        if len(recs) == 0:
            return
        if self.lba_min is None:
            self.lba_min = int(recs["lba"][0])
        self.lba_max = int(recs["lba"][-1])
        self.count += len(recs)
        self._push(0, recs)

    def _push(self, height: int, recs: np.ndarray) -> None:
        cap = self.store.capacity
        if self.pending_n[height] + len(recs) < cap:
            self.pending[height].append(recs)
            self.pending_n[height] += len(recs)
            return
        allrecs = np.concatenate(self.pending[height] + [recs])
        full = len(allrecs) // cap
        for i in range(full):
            self._emit(height, allrecs[i * cap:(i + 1) * cap])
        rest = allrecs[full * cap:]
        self.pending[height] = [rest] if len(rest) else []
        self.pending_n[height] = len(rest)

    def _emit(self, height: int, recs: np.ndarray) -> bytes:
        ct, key, nonce, mac = self.store.seal(LEAF if height == 0 else INTERNAL, height, recs)
        hba = self._place(ct)
        value = self.fmt.value(hba, key, nonce, mac)
        self.emitted[height] += 1
        if len(self.pending) == height + 1:
            self.pending.append([])
            self.pending_n.append(0)
            self.emitted.append(0)
        entry = self.fmt.array([int(recs["lba"][0])], [value])
        self._push(height + 1, entry)
        return value

    def _place(self, ct: bytes) -> int:
        used = len(self.buf) // BLOCK_SIZE
        if not self.chunks or used == self.chunk_blocks:
            self._write_chunk()
            self.chunks.append(self.alloc_chunk())
            used = 0
        self.buf += ct
        return self.chunk_start(self.chunks[-1]) + used

    def _write_chunk(self) -> None:
        if self.buf:
            self.store.meta.pwrite(bytes(self.buf), self.chunk_start(self.chunks[-1]) * BLOCK_SIZE)
            self.blocks_written += len(self.buf) // BLOCK_SIZE
            self.buf = bytearray()

    def finish(self, bit_id: int, level: int) -> BitMeta | None:
        """Writes the partial nodes bottom-up; the single node at the top is the root."""
        if self.count == 0:
            return None
        h = 0
        root = None
        while root is None:
            higher_empty = all(n == 0 for n in self.pending_n[h + 1:]) and \
                all(e == 0 for e in self.emitted[h + 1:])
            if h > 0 and self.emitted[h] == 0 and self.pending_n[h] == 1 and higher_empty:
                root = self.fmt.value_at(self.pending[h][0], 0)    # a single child: it is the root
                height = h - 1
            elif self.emitted[h] == 0 and higher_empty:
                recs = np.concatenate(self.pending[h])
                # _emit pushes the root's own entry one level up: take it back out.
                root = self._emit(h, recs)
                self.pending[h + 1] = []
                self.pending_n[h + 1] = 0
                self.emitted[h + 1] = 0
                height = h
            elif self.pending_n[h]:
                recs = np.concatenate(self.pending[h])
                self.pending[h], self.pending_n[h] = [], 0
                self._emit(h, recs)
            h = h + 1 if root is None else h
        self._write_chunk()
        self.emitted = self.emitted[:height + 1]
        return BitMeta(bit_id, level, height, self.count, self.lba_min, self.lba_max, root,
                       list(self.chunks))
