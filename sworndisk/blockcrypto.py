"""A disk's door to its block crypto: the crypto pool's workers, or the calling thread.

`Config.crypto_workers` 0 keeps everything in the thread (as before the pool existed);
otherwise the pool (`cryptopool.py`) seals segments and verifies read batches, and where
the data device is a plain O_DIRECT file or block device, its workers also read the
blocks they verify (fetch jobs). Small batches and lone requests stay in the thread,
where a round trip would cost more than the work.
"""
from __future__ import annotations

from . import crypto
from .cryptopool import (LANE_BLOCKS, MIN_OPEN_BLOCKS, MIN_SHARED_SEAL, CryptoPool, CryptoStats,
                         FetchJob, joined, open_inline, resolve_workers)
from .cryptoworker import BLOCK, NONCE, TAG
from .device import direct_file


class _InlineOpen:
    """open_start's work, done in the calling thread at result()."""

    def __init__(self, values: list[bytes], key_at: int, kb: int, raws: list, dsts: list):
        self.args = values, key_at, kb, raws, dsts

    def result(self) -> list[int]:
        values, key_at, kb, raws, dsts = self.args
        ct = joined(raws)
        return open_inline(values, key_at, kb, ct, dsts)


class BlockCrypto:
    """A disk's door to its block crypto: the pool when it has workers, else this thread
    (crypto_workers=0, as before the pool existed). Counts what it did either way."""

    def __init__(self, workers: int, key_bytes: int, data=None):
        # The workers read the data device themselves where it is a plain O_DIRECT file
        # or block device (not a wrapper that must see every read, as in the tests).
        self._data, self._counters = direct_file(data) if data is not None else (None, [])
        self.pool = (CryptoPool(workers, key_bytes,
                                self._data.fd if self._data is not None else -1)
                     if workers else None)
        if self.pool is not None and self._data is not None:
            self._data.fence_writes(self.pool.wait_fetches)
        self.key_bytes = key_bytes
        self._inline = self._nodes = 0

    @property
    def can_fetch(self) -> bool:
        """The workers read blocks from the data device themselves (fetch_start)."""
        return self.pool is not None and self.pool.can_fetch

    def fetch_start(self, records, key_at: int) -> FetchJob:
        """CryptoPool.fetch_start, once the writes left in flight are on the device; its
        reads (by the workers or on the pool's descriptor) are counted in the devices
        around the data file."""
        self._data.settle()
        for layer in self._counters:
            layer.note_reads(-(-len(records) // LANE_BLOCKS), len(records) * BLOCK)
        return self.pool.fetch_start(records, key_at)

    def open_start(self, values: list[bytes], key_at: int, raws: list, dsts: list,
                   lone: bool = False):
        """CryptoPool.open_start, or the same in this thread (no pool, a batch too small
        to be worth a round trip, or a `lone` request, whose caller has nothing to do
        meanwhile: at depth 1 a worker only adds its copies and round trip, measured
        0.76x for 1 MiB reads); result() on what it returns finishes."""
        if self.pool is not None and not lone and len(values) >= MIN_OPEN_BLOCKS:
            return self.pool.open_start(values, key_at, raws, dsts)
        if self.pool is not None:
            self.pool.count_inline(len(values))
        else:
            self._inline += len(values)
        return _InlineOpen(values, key_at, self.key_bytes, raws, dsts)

    def seal_blocks(self, plain: memoryview, n: int, share: bool = True
                    ) -> tuple[bytes, bytes, bytearray]:
        """Seals n consecutive 4 KiB blocks of `plain` under fresh keys (a batch of BIT
        nodes): (key || nonce material, tags, ciphertext), as crypto.seal_blocks makes
        them. Shared with the workers when the batch is worth a round trip and `share`
        (not for a merge running between writes: the workers are sealing the writes'
        segments then, and a share would wait behind them)."""
        if self.pool is not None and share and n >= MIN_SHARED_SEAL:
            return self.pool.seal_blocks(plain, n)
        material = crypto.random_bytes(n * (self.key_bytes + NONCE))
        out, tags = bytearray(n * BLOCK + TAG), bytearray(n * TAG)
        crypto.seal_blocks(material, self.key_bytes, plain, range(n), out, tags, 0)
        if self.pool is not None:
            self.pool.count_nodes(n)
        else:
            self._nodes += n
        return material, bytes(tags), out

    def count_inline(self, n: int) -> None:
        """n blocks sealed in the thread (the pending batch's own path)."""
        self._inline += n

    def stats(self) -> CryptoStats:
        if self.pool is not None:
            return self.pool.stats()
        return CryptoStats(workers=0, worker_pids=(), batches=0, blocks_in_workers=0,
                           blocks_inline=self._inline, blocks_fetched=0, blocks_taken_over=0,
                           nodes_sealed=self._nodes, nodes_in_workers=0,
                           worker_restarts=0,
                           worker_cpu_seconds=0.0, keys_locked=False)

    def close(self) -> None:
        if self.pool is not None:
            if self._data is not None:
                self._data.fence_writes(None)
            self.pool.close()




def open_crypto(workers: int | None, key_bytes: int, data=None) -> BlockCrypto:
    """The block crypto for Config.crypto_workers (None: automatic_workers()); `data`, the
    disk's data device, lets the workers read the blocks they verify."""
    return BlockCrypto(resolve_workers(workers), key_bytes, data)


__all__ = ["BlockCrypto", "open_crypto"]
