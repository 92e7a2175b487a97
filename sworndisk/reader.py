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

from bisect import bisect_left

import numpy as np

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
                 data: BlockDevice, data_blocks: int, opener=open_blocks):
        self.opener = opener            # crypto.open_blocks, or a crypto pool's
        self.fmt = fmt
        self.batch = batch
        self.state = state
        self.data = data
        self.data_blocks = data_blocks

    def read_many(self, ranges: list[tuple[int, int]]) -> list:
        """For each (lba, nr_blocks), its bytes or the SwornDiskError it alone raised.
        Arguments are the caller's to check."""
        outs = [bytearray(n * BLOCK_SIZE) for _, n in ranges]
        # The blocks to fetch, as parallel lists: range, index in the range, LBA, record.
        rids: list[int] = []
        idxs: list[int] = []
        lbas: list[int] = []
        values: list = []
        if self.batch.is_empty():                        # nothing pending: all committed
            for r, (lba, n) in enumerate(ranges):
                if n == 1:
                    rids.append(r)
                    idxs.append(0)
                    lbas.append(lba)
                else:
                    rids += [r] * n
                    idxs += range(n)
                    lbas += range(lba, lba + n)
        else:                                            # the batch's records first
            later: list[tuple[int, int, int]] = []
            for r, (lba, n) in enumerate(ranges):
                pending, unknown = self.batch.overlay(lba, n, outs[r])
                for i, l, v in pending:
                    rids.append(r)
                    idxs.append(i)
                    lbas.append(l)
                    values.append(v)
                later += [(r, l - lba, l) for l in unknown]
            for r, i, l in later:
                rids.append(r)
                idxs.append(i)
                lbas.append(l)
        if len(values) < len(lbas):                      # the rest: committed state
            found = self.state.resolve(lbas[len(values):])
            values += [found.get(l) for l in lbas[len(values):]]
        errors: dict[int, SwornDiskError] = {}
        self._fetch(rids, idxs, lbas, values, outs, errors)
        return [errors.get(r) or bytes(out) for r, out in enumerate(outs)]

    def _fetch(self, rids: list, idxs: list, lbas: list, values: list, outs: list,
               errors: dict) -> None:
        """Reads and verifies the blocks that have a record (value not None), coalescing
        runs of consecutive HBAs into one read each."""
        keep = [j for j, v in enumerate(values) if v is not None]
        if not keep:
            return
        if len(keep) < len(values):
            rids, idxs = [rids[j] for j in keep], [idxs[j] for j in keep]
            lbas, values = [lbas[j] for j in keep], [values[j] for j in keep]
        order, hbas = self._by_hba(values)
        # Past the device's end: a forged or corrupt record fails its range alone.
        good = bisect_left(hbas, self.data_blocks)
        for j in order[good:]:
            errors.setdefault(rids[j], IntegrityError(
                f"index record points outside the data device (block {self.fmt.hba_of(values[j])}, "
                f"LBA {lbas[j]})"))
        if not good:
            return
        hbas, order = hbas[:good], order[:good]
        cuts = [c for c in range(1, good) if hbas[c] != hbas[c - 1] + 1] if good <= 8 else \
            (np.flatnonzero(np.diff(np.asarray(hbas, np.uint64)) != 1) + 1).tolist()
        runs = []                                        # (first, end) in sorted order
        for a, b in zip([0] + cuts, cuts + [good]):
            if b - a <= MAX_RUN_BLOCKS:
                runs.append((a, b))
            else:
                runs += [(c, min(b, c + MAX_RUN_BLOCKS)) for c in range(a, b, MAX_RUN_BLOCKS)]
        first = [hbas[a] for a, _ in runs]
        raws = self.data.pread_many([((b - a) * BLOCK_SIZE, h * BLOCK_SIZE)
                                     for (a, b), h in zip(runs, first)])
        k = self.fmt.key_bytes
        views = [memoryview(out) for out in outs]
        blocks = []
        for (a, b), raw in zip(runs, raws):
            raw = memoryview(raw)
            for n, j in enumerate(order[a:b]):
                v, i = values[j], idxs[j]
                blocks.append((v[8:8 + k], v[8 + k:20 + k], v[20 + k:],
                               raw[n * BLOCK_SIZE:(n + 1) * BLOCK_SIZE],
                               views[rids[j]][i * BLOCK_SIZE:(i + 1) * BLOCK_SIZE]))
        for n in self.opener(blocks):
            j = order[n]
            errors.setdefault(rids[j], authentication_error(
                f"data block {self.fmt.hba_of(values[j])} (LBA {lbas[j]})"))

    def _by_hba(self, values: list) -> tuple[list[int], list[int]]:
        """The blocks' order by HBA (stable) and their HBAs in that order: numpy for a
        batch, plain Python for a few blocks (depth 1), where numpy's calls cost more."""
        if len(values) <= 8:
            hbas = [self.fmt.hba_of(v) for v in values]
            order = sorted(range(len(hbas)), key=hbas.__getitem__)
            return order, [hbas[j] for j in order]
        hbas = self.fmt.array([0] * len(values), values)["hba"]
        order = np.argsort(hbas, kind="stable")
        return order.tolist(), hbas[order].tolist()


__all__ = ["Reader"]
