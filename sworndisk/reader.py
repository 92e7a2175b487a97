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

With crypto workers that can read the data device (BlockCrypto.can_fetch), a batch of
several ranges with nothing pending hands steps 3 and 4 to the workers whole: this thread
resolves the records and sends them; the workers read each block straight into shared
memory and verify it there, and the plaintext is copied once, into the result.
"""
from __future__ import annotations

from bisect import bisect_left

import errno

import numpy as np

from .batch import PendingBatch
from .committed import CommittedState
from .crypto import authentication_error
from .blockcrypto import BlockCrypto
from .cryptoworker import AUTH_FAILED
from .device import BlockDevice
from .errors import IntegrityError, SwornDiskError
from .format import BLOCK_SIZE
from .records import RecordFormat, u64

MAX_RUN_BLOCKS = 256          # one pread covers at most 1 MiB of consecutive blocks
SMALL_BATCH = 8               # blocks up to which a read goes LBA by LBA (no numpy)


class Reader:
    def __init__(self, fmt: RecordFormat, batch: PendingBatch, state: CommittedState,
                 data: BlockDevice, data_blocks: int, crypto: BlockCrypto):
        self.crypto = crypto            # open_start (in the thread or the pool), fetch_start
        self.opener = crypto.open_start
        self.fmt = fmt
        self.batch = batch
        self.state = state
        self.data = data
        self.data_blocks = data_blocks

    def read_many(self, ranges: list[tuple[int, int]]) -> list:
        """For each (lba, nr_blocks), its bytes or the SwornDiskError it alone raised.
        Arguments are the caller's to check."""
        return self.start(ranges).result()

    def start(self, ranges: list[tuple[int, int]]):
        """read_many up to the verification: the index looked up, the ciphertext read,
        the crypto started. What is left (PendingReads.result) touches no engine state,
        so a caller may let other requests into the engine meanwhile."""
        committed = self.batch.is_empty() and (len(ranges) > SMALL_BATCH
                                               or sum(n for _, n in ranges) > SMALL_BATCH)
        if committed and len(ranges) > 1 and self.crypto.can_fetch:
            return self._fetch_committed(ranges)
        outs = [bytearray(n * BLOCK_SIZE) for _, n in ranges]
        errors: dict[int, SwornDiskError] = {}
        if committed:
            fetch = self._read_committed(ranges, outs, errors)
        else:
            fetch = self._read_each(ranges, outs, errors)
        return PendingReads(self.fmt, outs, errors, fetch)

    def _read_committed(self, ranges: list, outs: list, errors: dict) -> tuple | None:
        """A batch with nothing pending, as arrays from the ranges to the device runs:
        no Python per LBA until the blocks are verified. A 1 MiB range is one run of
        LBAs, found together, and (when its records name consecutive blocks) one read."""
        rid, idx, lba = _expand(ranges)
        recs, have = self.state.resolve_records(lba)
        if not have.all():
            keep = np.flatnonzero(have)
            rid, idx, lba, recs = rid[keep], idx[keep], lba[keep], recs[keep]
        if not len(recs):
            return None
        return self._fetch(rid.tolist(), idx.tolist(), lba.tolist(), self.fmt.values_of(recs),
                           recs["hba"], outs, errors)

    def _fetch_committed(self, ranges: list) -> "FetchedReads":
        """A batch with nothing pending, read and verified by the workers: its records
        found as in _read_committed, then sent whole (one lane per 256 blocks)."""
        rid, idx, lba = _expand(ranges)
        single = _single_blocks(ranges)
        recs, have = self.state.resolve_records(lba)
        errors: dict[int, SwornDiskError] = {}
        keep = have & (recs["hba"] < u64(self.data_blocks))
        if not keep.all():
            for j in np.flatnonzero(have & ~keep).tolist():
                # Past the device's end: a forged or corrupt record fails its range alone.
                errors.setdefault(int(rid[j]), IntegrityError(
                    f"index record points outside the data device (block "
                    f"{int(recs['hba'][j])}, LBA {int(lba[j])})"))
            keep = np.flatnonzero(keep)
            rid, idx, recs = rid[keep], idx[keep], recs[keep]
        job = self.crypto.fetch_start(recs, self.fmt.key_at + 8) if len(recs) else None
        return FetchedReads(ranges, rid, idx, recs, job, errors, single)

    def _read_each(self, ranges: list, outs: list, errors: dict) -> tuple | None:
        """A few blocks (where numpy's per-call cost outweighs the Python it saves), or a
        batch the pending batch answers in part: LBA by LBA."""
        # The blocks to fetch, as parallel lists: range, index in the range, LBA, record.
        rids: list[int] = []
        idxs: list[int] = []
        lbas: list[int] = []
        values: list = []
        if self.batch.is_empty():                        # nothing pending: all committed
            for r, (lba, n) in enumerate(ranges):
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
        keep = [j for j, v in enumerate(values) if v is not None]
        if not keep:
            return None
        if len(keep) < len(values):
            rids, idxs = [rids[j] for j in keep], [idxs[j] for j in keep]
            lbas, values = [lbas[j] for j in keep], [values[j] for j in keep]
        return self._fetch(rids, idxs, lbas, values, [self.fmt.hba_of(v) for v in values],
                           outs, errors)

    def _fetch(self, rids: list, idxs: list, lbas: list, values: list, hbas, outs: list,
               errors: dict) -> tuple | None:
        """Reads the blocks (each with its record value and HBA, a list or an array),
        coalescing runs of consecutive HBAs into one read each, and starts verifying them:
        returns the verification and, in its order, each block's range, LBA and value."""
        order, hbas, cuts, good = self._runs(hbas)
        # Past the device's end: a forged or corrupt record fails its range alone.
        for j in order[good:]:
            errors.setdefault(rids[j], IntegrityError(
                f"index record points outside the data device (block {self.fmt.hba_of(values[j])}, "
                f"LBA {lbas[j]})"))
        if not good:
            return None
        order = order[:good]
        runs = []                                        # (first, end) in sorted order
        for a, b in zip([0] + cuts, cuts + [good]):
            if b - a <= MAX_RUN_BLOCKS:
                runs.append((a, b))
            else:
                runs += [(c, min(b, c + MAX_RUN_BLOCKS)) for c in range(a, b, MAX_RUN_BLOCKS)]
        first = [hbas[a] for a, _ in runs]
        reads = [((b - a) * BLOCK_SIZE, h * BLOCK_SIZE) for (a, b), h in zip(runs, first)]
        raws = _whole(self.data.pread_many(reads), reads)
        views = [memoryview(out) for out in outs]
        ordered = [values[j] for j in order]
        job = self.opener(ordered, self.fmt.key_at, raws,
                          [views[rids[j]][idxs[j] * BLOCK_SIZE:(idxs[j] + 1) * BLOCK_SIZE]
                           for j in order], lone=len(outs) == 1)
        return job, [rids[j] for j in order], [lbas[j] for j in order], ordered

    def _runs(self, hbas) -> tuple[list[int], list[int], list[int], int]:
        """The blocks' order by HBA (stable), their HBAs in that order, where runs of
        consecutive HBAs break (positions in that order), and how many lie inside the
        data device. Numpy for a batch, plain Python for a few blocks (depth 1), where
        numpy's calls cost more."""
        if len(hbas) <= SMALL_BATCH:
            hbas = hbas if isinstance(hbas, list) else hbas.tolist()
            order = sorted(range(len(hbas)), key=hbas.__getitem__)
            hbas = [hbas[j] for j in order]
            good = bisect_left(hbas, self.data_blocks)
            return order, hbas, [c for c in range(1, good) if hbas[c] != hbas[c - 1] + 1], good
        hbas = np.asarray(hbas, np.uint64)
        order = np.argsort(hbas, kind="stable")
        hbas = hbas[order]
        good = int(hbas.searchsorted(u64(self.data_blocks)))
        cuts = (np.flatnonzero(np.diff(hbas[:good]) != 1) + 1).tolist()
        return order.tolist(), hbas.tolist(), cuts, good


def _whole(raws: list, reads: list) -> list:
    """The runs a device read, a short one padded with zeros to its length: its missing
    blocks then fail authentication (their range gets an IntegrityError), and the blocks
    of the other runs keep their places."""
    if sum(map(len, raws)) == sum(n for n, _ in reads):
        return raws
    return [raw if len(raw) == n else bytes(raw) + bytes(n - len(raw))
            for raw, (n, _) in zip(raws, reads)]


def _expand(ranges: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every block of the ranges as arrays: its range, its index in the range, its LBA."""
    m = len(ranges)
    firsts, sizes = zip(*ranges)
    if min(sizes) == 1 == max(sizes):
        return np.arange(m), np.zeros(m, np.int64), np.array(firsts, np.uint64)
    starts, counts = np.fromiter(firsts, np.uint64, m), np.fromiter(sizes, np.int64, m)
    rid = np.repeat(np.arange(m), counts)
    idx = np.arange(len(rid)) - np.repeat(np.cumsum(counts) - counts, counts)
    return rid, idx, starts[rid] + idx.astype(np.uint64)


def _single_blocks(ranges: list) -> bool:
    """Every range one block (not none, not several): random 4 KiB reads."""
    sizes = [n for _, n in ranges]
    return min(sizes) == 1 == max(sizes)


class FetchedReads:
    """A read_many whose blocks the workers are reading and verifying; result() copies
    each range's plaintext out of shared memory as its blocks come back."""

    def __init__(self, ranges: list, rid: np.ndarray, idx: np.ndarray, recs: np.ndarray,
                 job, errors: dict, single: bool):
        self.ranges, self.rid, self.idx, self.recs = ranges, rid, idx, recs
        self.job, self.errors = job, errors
        self.single = single            # every range one block (random 4 KiB reads)

    def result(self) -> list:
        """Each range's bytes, or the SwornDiskError it alone raised. A block the data
        device failed to read raises OSError (EIO), as the thread's own read would."""
        results: list = [None] * len(self.ranges)
        partial: dict[int, bytearray] = {}      # ranges with holes or split over lanes
        failed: list[tuple[int, int]] = []
        if self.job is not None:
            job, self.job = self.job, None
            job.result(lambda first, plain, status: self._take(
                first, plain, status, results, partial, failed))
        errors = self.errors
        for j, status in failed:
            r = int(self.rid[j])
            hba, lba = int(self.recs["hba"][j]), int(self.recs["lba"][j])
            if status != AUTH_FAILED:
                raise OSError(errno.EIO, f"data device: reading block {hba} (LBA {lba}) failed")
            errors.setdefault(r, authentication_error(f"data block {hba} (LBA {lba})"))
        for r, out in partial.items():
            results[r] = bytes(out)
        if not errors and None not in results:      # every range read (the usual case)
            return results
        for r, (_lba, n) in enumerate(self.ranges):
            if r in errors:
                results[r] = errors[r]
            elif results[r] is None:                # nothing written there: zeros
                results[r] = bytes(n * BLOCK_SIZE)
        return results

    def _take(self, first: int, plain: memoryview, status: bytes, results: list,
              partial: dict, failed: list) -> None:
        """One lane's blocks (first.. in the batch's order) into the results."""
        n = len(status)
        B = BLOCK_SIZE
        if self.single:                         # no range spans blocks: one copy each
            for a, r in enumerate(self.rid[first:first + n].tolist()):
                results[r] = bytes(plain[a * B:(a + 1) * B])
        else:
            self._take_runs(first, plain, n, results, partial)
        if status.count(0) != n:
            failed += [(first + j, s) for j, s in enumerate(status) if s]

    def _take_runs(self, first: int, plain: memoryview, n: int, results: list,
                   partial: dict) -> None:
        """_take for ranges of several blocks: a range whose blocks all lie together here
        is one copy; one split over lanes (or with holes) is put together in `partial`."""
        rid, idx = self.rid[first:first + n], self.idx[first:first + n]
        cuts = np.flatnonzero((rid[1:] != rid[:-1]) | (idx[1:] != idx[:-1] + 1)) + 1
        starts = [0] + cuts.tolist()
        ends = starts[1:] + [n]
        B = BLOCK_SIZE
        for a, b, r, i in zip(starts, ends, rid[starts].tolist(), idx[starts].tolist()):
            size = self.ranges[r][1]
            if i == 0 and b - a == size:
                results[r] = bytes(plain[a * B:b * B])
            else:
                out = partial.get(r)
                if out is None:
                    out = partial[r] = bytearray(size * B)
                out[i * B:(i + b - a) * B] = plain[a * B:b * B]


class PendingReads:
    """A read_many whose blocks are being verified; result() finishes it."""

    def __init__(self, fmt: RecordFormat, outs: list, errors: dict, fetch: tuple | None):
        self.fmt, self.outs, self.errors, self.fetch = fmt, outs, errors, fetch

    def result(self) -> list:
        """Each range's bytes, or the SwornDiskError it alone raised."""
        errors = self.errors
        _verified(self.fetch, errors)
        return [errors.get(r) or bytes(out) for r, out in enumerate(self.outs)]


def _verified(fetch: tuple | None, errors: dict) -> None:
    """Finishes a verification started by Reader._fetch: each block that failed fails
    its range (the first error of a range stands)."""
    if fetch is None:
        return
    job, rids, lbas, values = fetch
    for n in job.result():
        errors.setdefault(rids[n], authentication_error(
            f"data block {RecordFormat.hba_of(values[n])} (LBA {lbas[n]})"))


__all__ = ["Reader", "PendingReads", "FetchedReads"]
