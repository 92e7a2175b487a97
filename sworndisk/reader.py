"""The read path: many ranges at once, each answered or failed on its own.

For a batch of ranges (what a ublk queue hands over at depth):
1. the pending batch answers what it holds: buffered plaintext, sealed but uncommitted
   records, pending discards;
2. every other LBA of the whole batch is resolved in the committed state at once
   (MemTable, lookaside cache, then the BITs per node over the sorted LBAs);
3. the blocks to fetch are sorted by HBA, runs of consecutive HBAs coalesced, and all runs
   read with one `pread_many`, so the device works on them together (io_uring);
4. each block is verified (decrypted) with its record. A block that fails verification
   fails its own range, with the IntegrityError; the other ranges still return data.
"""
from __future__ import annotations

from .batch import PendingBatch
from .committed import CommittedState
from .crypto import authentication_error, open_blocks
from .device import BlockDevice
from .errors import IntegrityError, SwornDiskError
from .format import BLOCK_SIZE
from .records import RecordFormat

MAX_RUN_BLOCKS = 256          # one pread covers at most 1 MiB of consecutive blocks


class Reader:
    def __init__(self, fmt: RecordFormat, batch: PendingBatch, state: CommittedState,
                 data: BlockDevice, data_blocks: int):
        self.fmt = fmt
        self.batch = batch
        self.state = state
        self.data = data
        self.data_blocks = data_blocks

    def read_many(self, ranges: list[tuple[int, int]]) -> list:
        """For each (lba, nr_blocks), its bytes or the SwornDiskError it alone raised.
        Arguments are the caller's to check."""
        outs = [bytearray(n * BLOCK_SIZE) for _, n in ranges]
        fetch: list[tuple[int, int, int, bytes]] = []    # (range, index in range, lba, value)
        rest: list[tuple[int, int, int]] = []            # (range, index in range, lba)
        if self.batch.is_empty():                        # nothing pending: all committed
            for r, (lba, n) in enumerate(ranges):
                if n == 1:
                    rest.append((r, 0, lba))
                else:
                    rest.extend(zip([r] * n, range(n), range(lba, lba + n)))
        else:
            for r, (lba, n) in enumerate(ranges):
                pending, unknown = self.batch.overlay(lba, n, outs[r])
                fetch.extend((r, i, l, v) for i, l, v in pending)
                rest.extend((r, l - lba, l) for l in unknown)
        if rest:
            found = self.state.resolve([l for _, _, l in rest])
            fetch.extend((r, i, l, found[l]) for r, i, l in rest if l in found)
        errors: dict[int, SwornDiskError] = {}
        self._fetch(fetch, outs, errors)
        return [errors.get(r) or bytes(out) for r, out in enumerate(outs)]

    def _fetch(self, fetch: list, outs: list, errors: dict) -> None:
        """Reads and verifies the blocks, coalescing runs of consecutive HBAs."""
        if not fetch:
            return
        hba_of = self.fmt.hba_of
        items = sorted([(hba_of(v), r, i, l, v) for r, i, l, v in fetch])
        runs: list[tuple[int, int]] = []                 # (first item, count)
        j = 0
        while j < len(items):
            k = j + 1
            while (k < len(items) and items[k][0] == items[k - 1][0] + 1
                   and k - j < MAX_RUN_BLOCKS):
                k += 1
            runs.append((j, k - j))
            j = k
        reads = []
        for j, count in runs:
            start = items[j][0]
            if start + count > self.data_blocks:
                for hba, r, _, l, _ in items[j:j + count]:
                    errors.setdefault(r, IntegrityError(
                        f"index record points outside the data device (block {hba}, LBA {l})"))
                continue
            reads.append((j, count))
        raws = self.data.pread_many([(count * BLOCK_SIZE, items[j][0] * BLOCK_SIZE)
                                     for j, count in reads])
        k = self.fmt.key_bytes
        views = [memoryview(out) for out in outs]
        blocks, where = [], []
        for (j, count), raw in zip(reads, raws):
            raw = memoryview(raw)
            for n, (hba, r, i, l, v) in enumerate(items[j:j + count]):
                blocks.append((v[8:8 + k], v[8 + k:20 + k], v[20 + k:],
                               raw[n * BLOCK_SIZE:(n + 1) * BLOCK_SIZE],
                               views[r][i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]))
                where.append((hba, r, l))
        for n in open_blocks(blocks):
            hba, r, l = where[n]
            errors.setdefault(r, authentication_error(f"data block {hba} (LBA {l})"))


__all__ = ["Reader"]
