"""Block Index Tables: immutable, encrypted B+trees that are also Merkle trees.

A BIT node is one 4 KiB meta block, AES-GCM encrypted under its own random key. Its
parent entry (a record: first LBA, node HBA, key, nonce, MAC) is the only place that
key and MAC live, so a node that is tampered with, stale or moved fails verification.
The root's entry lives in the BIT catalog (BITC) of the checkpoint.

Nodes are written as the records stream in, sequentially over index chunks, each parent
after its last child (leaves in batches of NODE_BATCH, sealed together). See docs/format.md.
"""
from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from . import crypto
from .blockcrypto import BlockCrypto
from .bloom import BloomFilter
from .format import BLOCK_SIZE
from .device import BlockDevice
from .errors import IntegrityError
from .records import RecordFormat, u64

from .format import NODE_HEADER, NODE_INTERNAL as INTERNAL, NODE_LEAF as LEAF, NODE_MAGIC

_BYTES_OVERHEAD = 33 + 8     # a bytes object's header and its list slot, per fence entry
LAZY_FILTER_RECORDS = 1 << 18     # a loaded BIT up to this size is scanned for a filter
_RESIDENT_SLICE = 4096            # records per array a resident BIT's leaves() yields
_READ_RUN = 256                   # nodes one read of a BIT being loaded whole covers at most
NODE_BATCH = 64                   # leaves a BIT builder seals together
WRITE_CHUNKS = 4                  # index chunks a BIT builder writes together (1 MiB)


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


def _held_whole(recs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A resident BIT's (LBAs, records), read-only: a flat index may share them."""
    lbas = np.ascontiguousarray(recs["lba"])
    lbas.flags.writeable = recs.flags.writeable = False
    return lbas, recs


class Budget:
    """Bytes of memory some derived state may hold, reserved before it is built."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def room(self) -> int:
        return self.limit - self.used

    def reserve(self, nbytes: int) -> bool:
        if nbytes > self.room():
            return False
        self.used += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used -= nbytes


class NodeStore:
    """Reads and verifies BIT nodes through a bounded plaintext cache (the BNC).

    `cache_bytes` is shared: BITs held whole in memory (resident, see Bit.resident) take
    up to three quarters of it, and the node cache what they leave; the BITs' summaries
    (fences and filters) have a quarter of it again of their own. New nodes are sealed
    through `block_crypto` (the disk's: its workers share a batch), by default in the
    calling thread."""

    def __init__(self, meta: BlockDevice, fmt: RecordFormat, cache_bytes: int,
                 block_crypto: BlockCrypto | None = None):
        self.meta = meta
        self.fmt = fmt
        self.crypto = block_crypto or BlockCrypto(0, fmt.key_bytes)
        self.capacity = (BLOCK_SIZE - NODE_HEADER.size) // fmt.size
        self.cache: OrderedDict[bytes, tuple[int, np.ndarray]] = OrderedDict()
        self.cache_bytes = cache_bytes
        self.cache_limit = max(16, cache_bytes // BLOCK_SIZE)
        self.hits = self.misses = 0
        self.summaries = Budget(cache_bytes // 4)
        self.resident = Budget(cache_bytes * 3 // 4)

    def reserve_resident(self, nbytes: int) -> bool:
        """Room for a resident BIT, taken from the node cache (which shrinks to match)."""
        if not self.resident.reserve(nbytes):
            return False
        self._resize()
        return True

    def release_resident(self, nbytes: int) -> None:
        self.resident.release(nbytes)
        self._resize()

    def _resize(self) -> None:
        self.cache_limit = max(16, (self.cache_bytes - self.resident.used) // BLOCK_SIZE)
        while len(self.cache) > self.cache_limit:
            self.cache.popitem(last=False)

    def entries(self) -> int:
        return len(self.cache)

    def node(self, entry: bytes, what: str = "BIT node") -> tuple[int, np.ndarray]:
        """(kind, records) of the node that `entry` (a record value) points to."""
        kind, recs, _ = self.keyed(entry, what)
        return kind, recs

    def keyed(self, entry: bytes, what: str = "BIT node",
              remember: bool = True) -> tuple[int, np.ndarray, array]:
        """(kind, records, their LBAs) of a node. The LBAs are kept apart, as an
        array.array: a lookup of one LBA bisects them in a fraction of what a numpy
        search costs, and a field view of the records would be rebuilt at every search
        (numpy views them with frombuffer, without a copy, for a batch). A node read
        from the device goes into the cache unless `remember` is False."""
        mac = entry[-crypto.TAG_BYTES:]
        hit = self.cache.get(mac)
        if hit is not None:
            self.cache.move_to_end(mac)
            self.hits += 1
            return hit
        self.misses += 1
        hba = self.fmt.hba_of(entry)
        kind, pt, count = self._open(entry, self.meta.pread(BLOCK_SIZE, hba * BLOCK_SIZE), what)
        return self._remember(mac, kind, pt, count, remember)

    def _open(self, entry: bytes, ct, what: str) -> tuple[int, bytes, int]:
        """(kind, plaintext, record count) of the node `entry` points to, from its
        ciphertext `ct`: verified against the entry's key and MAC, header checked."""
        hba, key, nonce, tag = self.fmt.split(entry)
        pt = crypto.decrypt(key, nonce, ct, tag, f"{what} at meta block {hba}")
        magic, kind, _height, _r, count, _r2 = NODE_HEADER.unpack_from(pt)
        if magic != NODE_MAGIC or kind not in (LEAF, INTERNAL) or count > self.capacity:
            raise IntegrityError(f"{what} at meta block {hba} is malformed")
        return kind, pt, count

    def records_many(self, entries: list[bytes], kind: int, what: str = "BIT node") -> np.ndarray:
        """The records of many nodes of one `kind`, concatenated in the order of
        `entries`: for loading a BIT whole. Nodes the cache holds come from it; the others
        are read with one `pread_many` (runs of consecutive meta blocks coalesced, as
        a BIT's nodes mostly are) and verified a run at a time (crypto.open_blocks) into
        one reused buffer, without filling the cache. One read per run instead of one per
        node is what makes loading a BIT on a reopened disk cheap."""
        hbas = [self.fmt.hba_of(e) for e in entries]
        cached: dict[int, np.ndarray] = {}
        todo = []
        for i, e in enumerate(entries):
            hit = self.cache.get(e[-crypto.TAG_BYTES:])
            if hit is None:
                todo.append(i)
            else:
                self.hits += 1
                if hit[0] != kind:
                    raise IntegrityError(f"{what} at meta block {hbas[i]}: node kind does not match its depth")
                cached[i] = hit[1]
        runs: list[list[int]] = []                  # consecutive entries read together
        for i in todo:
            if runs and i == runs[-1][-1] + 1 and hbas[i] == hbas[i - 1] + 1 \
                    and len(runs[-1]) < _READ_RUN:
                runs[-1].append(i)
            else:
                runs.append([i])
        raws = self.meta.pread_many([(len(r) * BLOCK_SIZE, hbas[r[0]] * BLOCK_SIZE)
                                     for r in runs])
        self.misses += len(todo)
        # Filled in order, as bytes (numpy copies a structured dtype field by field); at
        # most `capacity` records a node, the unused end cut off.
        out = np.empty(len(entries) * self.capacity, self.fmt.dtype)
        dst, n = out.view(self.fmt.opaque), 0
        scratch = bytearray(min(len(todo), _READ_RUN) * BLOCK_SIZE)
        run_at = {r[0]: (r, raw) for r, raw in zip(runs, raws)}
        i = 0
        while i < len(entries):
            if i in cached:
                recs, i = cached[i], i + 1
            else:
                r, raw = run_at[i]
                recs = self._open_run([entries[j] for j in r], raw, kind,
                                      [hbas[j] for j in r], what, scratch)
                i = r[-1] + 1
            dst[n:n + len(recs)] = recs.view(self.fmt.opaque)
            n += len(recs)
        return out[:n]

    def _open_run(self, entries: list[bytes], cts, kind: int, hbas: list[int], what: str,
                  scratch: bytearray) -> np.ndarray:
        """The records of the nodes `entries` point to (their ciphertexts one after the
        other in `cts`), each verified and checked as _open does, decrypted into
        `scratch`; IntegrityError for the first one that fails."""
        n = len(entries)
        view, ctv = memoryview(scratch), memoryview(cts)
        k, t = 8 + self.fmt.key_bytes, 8 + self.fmt.key_bytes + crypto.NONCE_BYTES
        failed = crypto.open_blocks([
            (e[8:k], e[k:t], e[t:], ctv[j * BLOCK_SIZE:(j + 1) * BLOCK_SIZE],
             view[j * BLOCK_SIZE:(j + 1) * BLOCK_SIZE]) for j, e in enumerate(entries)])
        if failed:
            raise crypto.authentication_error(f"{what} at meta block {hbas[failed[0]]}")
        counts = np.empty(n, np.int64)
        for j in range(n):
            magic, got, _height, _r, count, _r2 = NODE_HEADER.unpack_from(scratch, j * BLOCK_SIZE)
            if magic != NODE_MAGIC or got not in (LEAF, INTERNAL) or count > self.capacity:
                raise IntegrityError(f"{what} at meta block {hbas[j]} is malformed")
            if got != kind:
                raise IntegrityError(f"{what} at meta block {hbas[j]}: node kind does not match its depth")
            counts[j] = count
        size, cap = self.fmt.size, self.capacity
        pages = np.frombuffer(scratch, np.uint8, n * BLOCK_SIZE).reshape(n, BLOCK_SIZE)
        body = pages[:, NODE_HEADER.size:NODE_HEADER.size + cap * size].reshape(n, cap, size)
        rows = body[np.arange(cap) < counts[:, None]]          # each node's first count[j]
        return np.ascontiguousarray(rows).view(self.fmt.dtype).reshape(-1)

    def _remember(self, mac: bytes, kind: int, pt: bytes, count: int,
                  remember: bool = True) -> tuple:
        recs = np.frombuffer(pt, self.fmt.dtype, count, NODE_HEADER.size)
        node = (kind, recs, array("Q", recs["lba"].astype(np.uint64).tobytes()))
        if not remember:
            return node
        self.cache[mac] = node
        if len(self.cache) > self.cache_limit:
            self.cache.popitem(last=False)
        return node

    def seal(self, kind: int, height: int, recs: np.ndarray, n: int,
             remember: bool = True, share: bool = True) -> tuple[bytes, bytes, bytearray]:
        """Encrypts n nodes, recs split evenly over them, each under a fresh key, in one
        batch (`crypto`'s workers share it); returns (key || nonce material, MACs,
        ciphertexts), n of each. The plaintexts go into the cache as well
        (write-through) if `remember`: a new BIT replaces the ones it merged, so its
        nodes are the ones the next lookups need, and reading them back would cost a
        device read and a decryption each. `share`: see BlockCrypto.seal_blocks."""
        per = len(recs) // n
        pts = np.zeros((n, BLOCK_SIZE), np.uint8)
        pts[:, :NODE_HEADER.size] = np.frombuffer(
            NODE_HEADER.pack(NODE_MAGIC, kind, height, 0, per, bytes(4)), np.uint8)
        pts[:, NODE_HEADER.size:NODE_HEADER.size + per * self.fmt.size] = \
            np.ascontiguousarray(recs).view(np.uint8).reshape(n, per * self.fmt.size)
        plain = memoryview(pts).cast("B")
        material, macs, cts = self.crypto.seal_blocks(plain, n, share)
        if remember:
            t = crypto.TAG_BYTES
            for j in range(n):
                self._remember(bytes(macs[j * t:(j + 1) * t]), kind,
                               plain[j * BLOCK_SIZE:(j + 1) * BLOCK_SIZE].tobytes(), per)
        return material, macs, cts


class Bit:
    """Read side of one BIT, with what it keeps in memory to answer lookups quickly:

    - the fence: each leaf's first LBA and entry (the records of the nodes just above
      the leaves), so a lookup goes straight to its leaf instead of down from the root;
    - above the bottom level, a Bloom filter of its LBAs, so that a lookup of an LBA
      this BIT does not hold (most of them, above the bottom) reads nothing at all.

    Both are derived from the immutable BIT, so they never go stale. They are charged to
    the node store's summary budget; a BIT that does not fit walks from the root."""

    def __init__(self, meta: BitMeta, store: NodeStore, fence: tuple | None = None,
                 bloom: BloomFilter | None = None, want_filter: bool = False,
                 records: np.ndarray | None = None):
        """A BIT just built brings its records (to be resident at once), or its fence
        and filter; one loaded from a checkpoint builds its fence on first use, and its
        filter (`want_filter`, above the bottom) too if it is small enough to scan
        quickly (LAZY_FILTER_RECORDS)."""
        self.meta = meta
        self.store = store
        self._what = f"BIT {meta.bit_id} node"
        self._resident: tuple[np.ndarray, np.ndarray] | None = None
        self._resident_bytes = 0
        self._resident_tried = records is not None
        if records is not None and store.reserve_resident(self._resident_cost()):
            self._resident = _held_whole(records)
            self._resident_bytes = self._resident_cost()
            fence = bloom = None
            want_filter = False
        self.bloom = bloom if bloom is not None and store.summaries.reserve(bloom.nbytes) else None
        self._filter_wanted = want_filter and bloom is None and meta.count <= LAZY_FILTER_RECORDS
        self._fence: tuple[np.ndarray, list[bytes]] | None = None
        self._fence_bytes = 0
        self._fence_tried = self._resident is not None      # a resident BIT needs none
        if fence is not None:
            self._fence_tried = self._keep_fence(*fence)

    # ---- summaries ----
    def _fence_cost(self, leaves: int) -> int:
        return leaves * (8 + self.store.fmt.value_size + _BYTES_OVERHEAD)

    def _keep_fence(self, first: np.ndarray, entries: list[bytes]) -> bool:
        cost = self._fence_cost(len(entries))
        if not self.store.summaries.reserve(cost):
            return False
        self._fence, self._fence_bytes = (first, entries), cost
        return True

    def fence(self) -> tuple[np.ndarray, list[bytes]] | None:
        """(first LBA of each leaf, its entry), built on first use from the nodes above
        the leaves (about one node in `capacity`); None if over the budget."""
        if self._fence is None and not self._fence_tried:
            self._fence_tried = True
            m = self.meta
            if m.height == 0:
                self._keep_fence(np.array([m.lba_min], np.uint64), [m.root])
            elif self.store.summaries.room() >= self._fence_cost(-(-m.count // self.store.capacity)):
                parts = list(self._nodes_at(1))
                recs = self.store.fmt.concat(parts)
                self._keep_fence(np.ascontiguousarray(recs["lba"]), self.store.fmt.values_of(recs))
        return self._fence

    def _filter(self) -> BloomFilter | None:
        if self._filter_wanted:
            self._filter_wanted = False
            bloom = BloomFilter(self.meta.count)
            if self.store.summaries.reserve(bloom.nbytes):
                for recs in self.leaves():
                    bloom.add(recs["lba"])
                self.bloom = bloom
        return self.bloom

    def summary_bytes(self) -> int:
        return self._fence_bytes + (self.bloom.nbytes if self.bloom is not None else 0)

    def _drop_summaries(self) -> None:
        self.store.summaries.release(self.summary_bytes())
        self._fence, self._fence_bytes, self.bloom = None, 0, None
        self._fence_tried, self._filter_wanted = True, False

    def release(self) -> None:
        """Gives the memory of summaries and residency back: for a BIT merged away. One
        still in use builds its fence and residency again, as budgets allow, when next
        used."""
        self._drop_summaries()
        self.store.release_resident(self._resident_bytes)
        self._resident, self._resident_bytes = None, 0
        self._resident_tried = self._fence_tried = False

    def _resident_cost(self) -> int:
        return self.meta.count * (self.store.fmt.size + 8)

    def resident(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(every LBA, every record) of a BIT held whole in memory, or None.

        A BIT becomes resident on first use if its records fit what is left of the
        store's resident budget: its lookups are then one numpy search over the whole
        batch, with no node per LBA, and merges read it without decrypting. Its leaves
        are read once (from the node cache where they are, as after a compaction, or
        from the device, verified, without filling the cache); fence and filter are
        then of no use and are dropped."""
        if self._resident is None and not self._resident_tried:
            self._resident_tried = True
            cost = self._resident_cost()
            if self.store.reserve_resident(cost):
                m = self.meta
                try:
                    leaves = [m.root] if m.height == 0 else \
                        self.store.fmt.values_of(self.store.fmt.concat(
                            list(self._nodes_at(1, remember=False))))
                    recs = self.store.records_many(leaves, LEAF, self._what)
                except BaseException:           # a node failed: its share goes back
                    self.store.release_resident(cost)
                    raise
                self._resident = _held_whole(recs)
                self._resident_bytes = cost
                self._drop_summaries()
        return self._resident

    # ---- nodes ----
    def _node(self, entry: bytes, expect_leaf: bool, remember: bool = True) -> np.ndarray:
        return self.keyed(entry, expect_leaf, remember)[0]

    def keyed(self, entry: bytes, expect_leaf: bool,
              remember: bool = True) -> tuple[np.ndarray, array]:
        """(records, their LBAs) of a node, checked to be of the kind its depth needs."""
        kind, recs, lbas = self.store.keyed(entry, self._what, remember)
        if (kind == LEAF) != expect_leaf:
            raise IntegrityError(f"BIT {self.meta.bit_id}: node kind does not match its depth")
        return recs, lbas

    def _nodes_at(self, height: int, lo: int = 0, hi: int = 1 << 64,
                  remember: bool = True) -> Iterator[np.ndarray]:
        """Record arrays of the nodes at `height` overlapping [lo, hi), in LBA order."""
        stack = [(self.meta.root, self.meta.height)]
        fmt = self.store.fmt
        while stack:
            entry, h = stack.pop()
            recs = self._node(entry, h == 0, remember)
            if h == height:
                yield recs
                continue
            first = max(0, int(np.searchsorted(recs["lba"], u64(lo), side="right")) - 1)
            last = int(np.searchsorted(recs["lba"], u64(hi), side="left"))
            for c in range(last - 1, first - 1, -1):     # reversed: the stack pops in order
                stack.append((fmt.value_at(recs, c), h - 1))

    # ---- lookups ----
    def get(self, lba: int) -> bytes | None:
        """The record value of one LBA in this BIT, or None."""
        m = self.meta
        if lba < m.lba_min or lba > m.lba_max:
            return None
        res = self.resident()
        if res is not None:
            i = int(res[0].searchsorted(u64(lba)))
            return self.store.fmt.value_at(res[1], i) if res[0][i] == lba else None
        bloom = self._filter()
        if bloom is not None and not bloom.may_contain_one(lba):
            return None
        fence = self.fence()
        if fence is not None:
            first, entries = fence
            entry, height = entries[int(first.searchsorted(u64(lba), side="right")) - 1], 0
        else:
            entry, height = m.root, m.height
        value_at = self.store.fmt.value_at
        while True:
            recs, lbas = self.keyed(entry, height == 0)
            if height == 0:
                i = bisect_left(lbas, lba)
                return value_at(recs, i) if i < len(recs) and lbas[i] == lba else None
            c = bisect_right(lbas, lba) - 1
            if c < 0:
                return None
            entry, height = value_at(recs, c), height - 1

    def lookup_many(self, lbas: np.ndarray, found: np.ndarray, out: np.ndarray) -> None:
        """For sorted `lbas` not yet `found`, fills `out` with this BIT's records."""
        m = self.meta
        want = np.flatnonzero(~found & (lbas >= m.lba_min) & (lbas <= m.lba_max))
        if len(want) == 0:
            return
        res = self.resident()
        if res is not None:
            all_lbas, all_recs = res
            keys = lbas[want]
            i = all_lbas.searchsorted(keys)         # keys <= lba_max: i is in range
            ok = all_lbas[i] == keys
            found[want[ok]] = True
            out[want[ok]] = all_recs[i[ok]]
            return
        bloom = self._filter()
        if bloom is not None:
            want = want[bloom.may_contain(lbas[want])]
        if len(want) == 0:
            return
        fence = self.fence()
        if fence is None:
            return self._walk(lbas, want, found, out)
        first, entries = fence
        keys = lbas[want]
        leaf = (first.searchsorted(keys, side="right") - 1).tolist()
        # Per leaf (the LBAs are sorted, so a leaf's LBAs are adjacent). Python ints, not
        # numpy calls, for the common case of one LBA per leaf.
        keys_l, want_l = keys.tolist(), want.tolist()
        j, n = 0, len(leaf)
        while j < n:
            k = j + 1
            while k < n and leaf[k] == leaf[j]:
                k += 1
            recs, here = self.keyed(entries[leaf[j]], True)
            if k == j + 1:
                i = bisect_left(here, keys_l[j])
                if i < len(here) and here[i] == keys_l[j]:
                    found[want_l[j]] = True
                    out[want_l[j]] = recs[i]
            else:
                ks = keys[j:k]
                here = np.frombuffer(here, np.uint64)
                i = np.minimum(here.searchsorted(ks), len(here) - 1)
                ok = here[i] == ks
                hit = want[j:k][ok]
                found[hit] = True
                out[hit] = recs[i[ok]]
            j = k

    def _walk(self, lbas: np.ndarray, want: np.ndarray, found: np.ndarray,
              out: np.ndarray) -> None:
        """lookup_many from the root, per node over the batch (no fence)."""
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
                    i = bisect_left(keys_here, key)
                    if i < len(keys_here) and keys_here[i] == key:
                        found[p] = True
                        out[p] = recs[i]
                    continue
                c = bisect_right(keys_here, key) - 1
                if c >= 0:
                    stack.append((value_at(recs, c), height - 1, pos))
                continue
            keys = np.array([keys_all[p] for p in pos], np.uint64)
            keys_here = np.frombuffer(keys_here, np.uint64)
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
        if self._resident is not None:
            lbas, recs = self._resident
            return recs[lbas.searchsorted(u64(lo)):lbas.searchsorted(u64(hi))]
        parts = [r[(r["lba"] >= lo) & (r["lba"] < hi)] for r in self.leaves(lo, hi)]
        return self.store.fmt.concat(parts)

    def leaves(self, lo: int = 0, hi: int = 1 << 64) -> Iterator[np.ndarray]:
        """Leaf record arrays overlapping [lo, hi), in order (depth-first); a resident
        BIT's records, in slices, instead."""
        if self._resident is not None:
            lbas, recs = self._resident
            a, b = int(lbas.searchsorted(u64(lo))), int(lbas.searchsorted(u64(hi)))
            return (recs[i:min(b, i + _RESIDENT_SLICE)] for i in range(a, b, _RESIDENT_SLICE))
        return self._nodes_at(0, lo, hi)


class BitBuilder:
    """Writes a BIT from records that arrive in strictly increasing LBA order."""

    def __init__(self, store: NodeStore, alloc_chunk: Callable[[], int],
                 chunk_blocks: int, chunk_start: Callable[[int], int],
                 expect: int = 0, filtered: bool = False):
        """`expect`: at most how many records will come (what the inputs hold). A BIT
        that small enough to be resident keeps its records for Bit.resident (and its
        nodes stay out of the node cache: lookups will not read them); any other keeps
        its fence and, if `filtered` (above the bottom level), a Bloom filter, and
        writes its nodes through the cache."""
        self.store = store
        self.records: list[np.ndarray] | None = \
            [] if 0 < expect * (store.fmt.size + 8) <= store.resident.limit else None
        self.bloom = BloomFilter(expect) if filtered and self.records is None else None
        # The fence as the leaves are written, while it fits the summary budget.
        self._fence_first: list[int] | None = [] if self.records is None else None
        self._fence_entries: list[bytes] = []
        self.fmt = store.fmt
        self.alloc_chunk = alloc_chunk
        self.chunk_blocks = chunk_blocks
        self.chunk_start = chunk_start
        self.chunks: list[int] = []
        self.buf = bytearray()
        self._done: list[tuple[bytearray, int]] = []   # chunks built, not yet written
        self.pending: list[list[np.ndarray]] = [[]]   # per height: arrays awaiting a node
        self.pending_n: list[int] = [0]
        self.emitted: list[int] = [0]
        self.count = 0
        self.lba_min = self.lba_max = None
        self.blocks_written = 0
        self.share_seals = True         # NodeStore.seal's `share`, for the nodes to come

    def add(self, recs: np.ndarray) -> None:
        if len(recs) == 0:
            return
        if self.lba_min is None:
            self.lba_min = int(recs["lba"][0])
        self.lba_max = int(recs["lba"][-1])
        self.count += len(recs)
        if self.bloom is not None:
            self.bloom.add(recs["lba"])
        if self.records is not None:
            self.records.append(recs)
        self._push(0, recs)

    def _push(self, height: int, recs: np.ndarray) -> None:
        """Adds entries at `height`. Full nodes go out NODE_BATCH at a time at the leaves
        (one batch to seal, shared with the crypto workers), one at a time above."""
        self.pending[height].append(recs)
        self.pending_n[height] += len(recs)
        if self.pending_n[height] >= self.store.capacity * (NODE_BATCH if height == 0 else 1):
            self._drain(height)

    def _drain(self, height: int) -> None:
        """Writes the full nodes of what is pending at `height`; less than a node stays."""
        cap = self.store.capacity
        allrecs = self.fmt.concat(self.pending[height])
        full = len(allrecs) // cap
        rest = allrecs[full * cap:]
        self.pending[height] = [rest] if len(rest) else []
        self.pending_n[height] = len(rest)
        for first in range(0, full, NODE_BATCH):
            n = min(NODE_BATCH, full - first)
            self._emit(height, allrecs[first * cap:(first + n) * cap], n)

    def _emit(self, height: int, recs: np.ndarray, n: int = 1) -> np.ndarray:
        """Seals and places n nodes (recs split evenly over them), pushes their entries
        one level up and returns them."""
        kb = self.fmt.key_bytes
        material, macs, cts = self.store.seal(LEAF if height == 0 else INTERNAL, height, recs,
                                              n, remember=self.records is None,
                                              share=self.share_seals)
        entries = self.fmt.records(
            recs["lba"][::len(recs) // n], self._place(cts, n),
            np.frombuffer(material, np.uint8).reshape(n, kb + crypto.NONCE_BYTES),
            np.frombuffer(macs, np.uint8).reshape(n, crypto.TAG_BYTES))
        if height == 0 and self._fence_first is not None:
            had = len(self._fence_entries)
            self._fence_first.extend(entries["lba"].tolist())
            self._fence_entries.extend(self.fmt.values_of(entries))
            if had // 1024 != len(self._fence_entries) // 1024 and self.store.summaries.room() \
                    < len(self._fence_entries) * (8 + self.fmt.value_size + _BYTES_OVERHEAD):
                self._fence_first, self._fence_entries = None, []
        self.emitted[height] += n
        if len(self.pending) == height + 1:
            self.pending.append([])
            self.pending_n.append(0)
            self.emitted.append(0)
        self._push(height + 1, entries)
        return entries

    def _place(self, cts: bytearray, n: int) -> np.ndarray:
        """Appends n nodes to the index chunks (a new chunk whenever one fills); their
        meta blocks."""
        hbas, done = np.empty(n, np.uint64), 0
        while done < n:
            used = len(self.buf) // BLOCK_SIZE
            if not self.chunks or used == self.chunk_blocks:
                self._write_chunk()
                self.chunks.append(self.alloc_chunk())
                used = 0
            k = min(n - done, self.chunk_blocks - used)
            self.buf += memoryview(cts)[done * BLOCK_SIZE:(done + k) * BLOCK_SIZE]
            start = self.chunk_start(self.chunks[-1]) + used
            hbas[done:done + k] = np.arange(start, start + k, dtype=np.uint64)
            done += k
        return hbas

    def _write_chunk(self) -> None:
        """A full (or the last) chunk, to the meta device with the ones before it once
        WRITE_CHUNKS are done (or at finish), left in flight where the device can
        (pwrite_many): the next chunks are built meanwhile, and the device's next call,
        at the latest the checkpoint's pack write, waits for them. A merge running
        between writes shares the device with the data segments: fewer, larger writes
        wait less for the one before."""
        if self.buf:
            self._done.append((self.buf, self.chunk_start(self.chunks[-1]) * BLOCK_SIZE))
            self.blocks_written += len(self.buf) // BLOCK_SIZE
            self.buf = bytearray()
        if len(self._done) >= WRITE_CHUNKS:
            self._write_done()

    def _write_done(self) -> None:
        if self._done:
            self.store.meta.pwrite_many(self._done)
            self._done = []

    def finish(self, bit_id: int, level: int) -> BitMeta | None:
        """Writes the partial nodes bottom-up; the single node at the top is the root."""
        if self.count == 0:
            return None
        self._drain(0)          # the leaf batch's full nodes; less than a node stays
        h = 0
        root = None
        while root is None:
            higher_empty = all(n == 0 for n in self.pending_n[h + 1:]) and \
                all(e == 0 for e in self.emitted[h + 1:])
            if h > 0 and self.emitted[h] == 0 and self.pending_n[h] == 1 and higher_empty:
                root = self.fmt.value_at(self.pending[h][0], 0)    # a single child: it is the root
                height = h - 1
            elif self.emitted[h] == 0 and higher_empty:
                recs = self.fmt.concat(self.pending[h])
                # _emit pushes the root's own entry one level up: take it back out.
                root = self.fmt.value_at(self._emit(h, recs), 0)
                self.pending[h + 1] = []
                self.pending_n[h + 1] = 0
                self.emitted[h + 1] = 0
                height = h
            elif self.pending_n[h]:
                recs = self.fmt.concat(self.pending[h])
                self.pending[h], self.pending_n[h] = [], 0
                self._emit(h, recs)
            h = h + 1 if root is None else h
        self._write_chunk()
        self._write_done()
        self.emitted = self.emitted[:height + 1]
        return BitMeta(bit_id, level, height, self.count, self.lba_min, self.lba_max, root,
                       list(self.chunks))

    def all_records(self) -> np.ndarray | None:
        """Every record of the finished BIT, if it kept them (see __init__)."""
        return None if self.records is None else self.fmt.concat(self.records)

    def fence(self) -> tuple[np.ndarray, list[bytes]] | None:
        """The finished BIT's fence (see Bit), or None if it outgrew the budget."""
        if self._fence_first is None:
            return None
        return np.array(self._fence_first, np.uint64), self._fence_entries
