"""The secure journal: a ring of MAC-chained, encrypted 4 KiB blocks.

Each block carries the MAC of the block before it inside its encrypted body, and is
encrypted under a key derived from the root key and its sequence number; the sequence
number is in the plaintext header and bound as associated data. Recovery follows the
chain from a checkpoint's anchor and stops at the first block that does not verify, so a
forged, reordered, stale or spliced block ends the history there; it can never insert one.

Blocks group into transactions (one per commit): the last block of a transaction has the
LAST flag. Only whole transactions count; their payloads are encoded by ops.py. Block
layout in docs/format.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from . import crypto
from .format import BLOCK_SIZE
from .device import BlockDevice
from .errors import IntegrityError, MetadataFullError

from .format import JOURNAL_BODY as BODY_BYTES, JOURNAL_BODY_HEADER as _BODY_HDR
from .format import JOURNAL_FLAG_LAST as FLAG_LAST, JOURNAL_HEADER as _HDR
from .format import JOURNAL_MAGIC as BLOCK_MAGIC, JOURNAL_PAYLOAD as PAYLOAD_BYTES
from .format import LABEL_JOURNAL, LABEL_JOURNAL_BLOCK, LABEL_JOURNAL_GENESIS
_READ_BATCH = 64


@dataclass(frozen=True)
class Txn:
    first_seq: int
    end_seq: int          # one past the last block
    payload: bytes
    end_mac: bytes        # MAC of the last block: the chain continues from it


class Journal:
    def __init__(self, meta: BlockDevice, root: bytes, start: int, nblocks: int):
        self.meta = meta
        self.kdk = crypto.derive(root, LABEL_JOURNAL)
        self.start = start
        self.nblocks = nblocks
        self.head_seq = 1                 # next block to write
        self.last_mac = self.genesis_mac()
        self.anchor_seq = 1               # oldest block recovery may still need
        self.blocks_written = 0

    def genesis_mac(self) -> bytes:
        return crypto.derive(self.kdk, LABEL_JOURNAL_GENESIS, nbytes=crypto.TAG_BYTES)

    def _key(self, seq: int) -> bytes:
        return crypto.derive(self.kdk, LABEL_JOURNAL_BLOCK, seq, nbytes=16)

    def used(self) -> int:
        return self.head_seq - self.anchor_seq

    def blocks_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // PAYLOAD_BYTES))

    def append(self, payload: bytes) -> int:
        """Writes one transaction and flushes the meta device; returns its first seq."""
        n = self.blocks_for(len(payload))
        if self.used() + n > self.nblocks:
            raise MetadataFullError("the journal region is full before a checkpoint was due")
        first = self.head_seq
        blocks = []
        mac = self.last_mac
        for i in range(n):
            seq = first + i
            chunk = payload[i * PAYLOAD_BYTES:(i + 1) * PAYLOAD_BYTES]
            flags = FLAG_LAST if i == n - 1 else 0
            body = _BODY_HDR.pack(mac, flags, len(chunk)) + chunk
            body += bytes(BODY_BYTES - len(body))
            nonce = crypto.random_bytes(crypto.NONCE_BYTES)
            hdr = _HDR.pack(BLOCK_MAGIC, seq, nonce)
            ct, mac = crypto.encrypt(self._key(seq), nonce, body, hdr)
            blocks.append(hdr + ct + mac)
        self._write(first, blocks)
        self.meta.flush()
        self.head_seq = first + n
        self.last_mac = mac
        self.blocks_written += n
        return first

    def _write(self, first: int, blocks: list[bytes]) -> None:
        i = 0
        while i < len(blocks):
            pos = (first + i) % self.nblocks
            run = min(len(blocks) - i, self.nblocks - pos)
            self.meta.pwrite(b"".join(blocks[i:i + run]), (self.start + pos) * BLOCK_SIZE)
            i += run

    def _read(self, seq: int, count: int) -> list[bytes]:
        pos = seq % self.nblocks
        count = min(count, self.nblocks - pos)
        raw = self.meta.pread(count * BLOCK_SIZE, (self.start + pos) * BLOCK_SIZE)
        return [raw[i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE] for i in range(count)]

    def _open_block(self, blk: bytes, seq: int,
                    prev_mac: bytes | None) -> tuple[int, bytes, bytes] | None:
        magic, bseq, nonce = _HDR.unpack_from(blk)
        if magic != BLOCK_MAGIC or bseq != seq:
            return None
        tag = blk[-crypto.TAG_BYTES:]
        try:
            body = crypto.decrypt(self._key(seq), nonce, blk[_HDR.size:-crypto.TAG_BYTES], tag,
                                  "journal block", blk[:_HDR.size])
        except IntegrityError:
            return None
        prev, flags, n = _BODY_HDR.unpack_from(body)
        if (prev_mac is not None and prev != prev_mac) or n > PAYLOAD_BYTES:
            return None
        return flags, body[_BODY_HDR.size:_BODY_HDR.size + n], tag

    def block(self, seq: int) -> bytes:
        """The raw block at `seq`'s position, whatever it holds now (for check)."""
        return self._read(seq, 1)[0]

    def verifies(self, blk: bytes, seq: int) -> bool:
        """True if `blk` is block `seq`, intact by its own tag; the chain is not followed
        (for check, which looks at blocks recovery does not read)."""
        return self._open_block(blk, seq, None) is not None

    def scan(self, seq: int, prev_mac: bytes) -> Iterator[Txn]:
        """Whole transactions from `seq` on, following the chain until it breaks."""
        start_seq, parts, txn_first = seq, [], seq
        batch: list[bytes] = []
        while seq - start_seq < self.nblocks:
            if not batch:
                batch = self._read(seq, min(_READ_BATCH, self.nblocks - (seq - start_seq)))
            opened = self._open_block(batch.pop(0), seq, prev_mac)
            if opened is None:
                return
            flags, payload, prev_mac = opened
            parts.append(payload)
            seq += 1
            if flags & FLAG_LAST:
                yield Txn(txn_first, seq, b"".join(parts), prev_mac)
                parts, txn_first = [], seq

    def set_anchor(self, seq: int) -> None:
        """The oldest block recovery may still need (a durable checkpoint's anchor);
        blocks before it may be overwritten."""
        self.anchor_seq = seq

    def restore_count(self, blocks_written: int) -> None:
        """The lifetime count of blocks written, from a checkpoint pack."""
        self.blocks_written = blocks_written

    def resume(self, seq: int, mac: bytes) -> None:
        """Continue writing after the last accepted transaction (overwriting anything later)."""
        self.head_seq = seq
        self.last_mac = mac
