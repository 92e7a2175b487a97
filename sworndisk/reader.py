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
from .crypto import authentication_error
from .device import BlockDevice
from .errors import IntegrityError, SwornDiskError
from .format import BLOCK_SIZE
from .records import RecordFormat

MAX_RUN_BLOCKS = 256          # one pread covers at most 1 MiB of consecutive blocks


class Reader:
    def __init__(self, fmt: RecordFormat, batch: PendingBatch, state: CommittedState,
                 data: BlockDevice, data_blocks: int, opener):
        self.opener = opener            # BlockCrypto.open_start: in the thread or the pool
        self.fmt = fmt
        self.batch = batch
        self.state = state
        self.data = data
        self.data_blocks = data_blocks

    def read_many(self, ranges: list[tuple[int, int]]) -> list:
        """For each (lba, nr_blocks), its bytes or the SwornDiskError it alone raised.
        Arguments are the caller's to check."""
        return self.start(ranges).result()

    def start(self, ranges: list[tuple[int, int]]) -> "PendingReads":
        """read_many up to the verification: the index looked up, the ciphertext read,
        the crypto started. What is left (PendingReads.result) touches no engine state,
        so a caller may let other requests into the engine meanwhile."""
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
        return PendingReads(self.fmt, outs, errors,
                            self._fetch(rids, idxs, lbas, values, outs, errors))

    def _fetch(self, rids: list, idxs: list, lbas: list, values: list, outs: list,
               errors: dict) -> tuple | None:
        """Reads the blocks that have a record (value not None), coalescing runs of
        consecutive HBAs into one read each, and starts verifying them: returns the
        verification and, in its order, each block's range, LBA and value."""
        keep = [j for j, v in enumerate(values) if v is not None]
        if not keep:
            return None
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
            return None
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
        views = [memoryview(out) for out in outs]
        ordered = [values[j] for j in order]
        job = self.opener(ordered, self.fmt.key_at, raws,
                          [views[rids[j]][idxs[j] * BLOCK_SIZE:(idxs[j] + 1) * BLOCK_SIZE]
                           for j in order])
        return job, [rids[j] for j in order], [lbas[j] for j in order], ordered

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


class PendingReads:
    """A read_many whose blocks are being verified; result() finishes it."""

    def __init__(self, fmt: RecordFormat, outs: list, errors: dict, fetch: tuple | None):
        self.fmt, self.outs, self.errors, self.fetch = fmt, outs, errors, fetch

    def result(self) -> list:
        """Each range's bytes, or the SwornDiskError it alone raised."""
        errors = self.errors
        if self.fetch is not None:
            job, rids, lbas, values = self.fetch
            for n in job.result():
                errors.setdefault(rids[n], authentication_error(
                    f"data block {self.fmt.hba_of(values[n])} (LBA {lbas[n]})"))
        return [errors.get(r) or bytes(out) for r, out in enumerate(self.outs)]


__all__ = ["Reader", "PendingReads"]
