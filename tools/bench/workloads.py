"""The I/O patterns, and how one run of a pattern is timed.

Every function here drives anything with the engine's surface (read_many/write/flush), so
SwornDisk and CryptDisk run byte-for-byte the same requests in the same order, `depth`
requests at a time (a batch, as a ublk queue hands them over at that depth): LBAs come
from a seeded generator, and every 4 KiB block written starts with its own LBA so that
reads can check they got the right block back (a benchmark of a disk returning wrong data
would be worse than none). The checks cost the same on both disks.
"""
from __future__ import annotations

import errno
import mmap
import time
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ublk_shim.sys import IORING_OP_READ, SQE_RW
from ublk_shim.uring import Ring, buffer_address

from .disks import BLOCK_SIZE, BenchDisk

WORDS_PER_BLOCK = BLOCK_SIZE // 8


class WorkloadError(RuntimeError):
    """A workload failed part way; `ops_done` says how far it got (e.g. ENOSPC when aging)."""

    def __init__(self, workload: str, ops_done: int, cause: BaseException):
        super().__init__(f"{workload}: {type(cause).__name__}: {cause} (after {ops_done} ops)")
        self.workload = workload
        self.ops_done = ops_done
        self.cause = cause


class VerifyError(AssertionError):
    """A read returned a block other than the one written at that LBA."""


class Payload:
    """Write buffers of random (incompressible) bytes in which every block starts with its LBA."""

    def __init__(self, max_blocks: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self._words = rng.integers(0, 2**63, size=max_blocks * WORDS_PER_BLOCK, dtype=np.uint64)
        self._stamps = self._words[::WORDS_PER_BLOCK]   # a view: the first word of each block
        self._tail = self._words[1:WORDS_PER_BLOCK].tobytes()

    def blocks(self, lba: int, nr_blocks: int) -> bytes:
        """Fresh immutable bytes (a disk may keep a reference to what it was given)."""
        if nr_blocks == 1:
            return lba.to_bytes(8, "little") + self._tail
        self._stamps[:nr_blocks] = np.arange(lba, lba + nr_blocks, dtype=np.uint64)
        return self._words[:nr_blocks * WORDS_PER_BLOCK].tobytes()

    @staticmethod
    def check(lba: int, data: bytes) -> None:
        nr_blocks = len(data) // BLOCK_SIZE
        if nr_blocks == 1:
            ok = int.from_bytes(data[:8], "little") == lba
        else:
            stamps = np.frombuffer(data, dtype="<u8")[::WORDS_PER_BLOCK]
            ok = bool(np.array_equal(stamps, np.arange(lba, lba + nr_blocks, dtype=np.uint64)))
        if not ok:
            raise VerifyError(f"read of {nr_blocks} block(s) at LBA {lba} returned other blocks")


@dataclass
class WorkloadResult:
    """One timed workload on one disk. `cpu_seconds` is the whole process's (engine
    threads too); `thread_cpu_seconds` the thread's that drove the disk (the engine's
    thread: it runs the index, the commit and the I/O submission); `worker_cpu_seconds`
    what SwornDisk's crypto worker processes spent meanwhile; `client_cpu_seconds` what
    the same loop costs the thread against a disk that does nothing (NullDisk): the
    benchmark's own share of the thread, which `engine_us_per_block` leaves out."""
    name: str
    ops: int
    user_bytes: int
    seconds: float
    cpu_seconds: float
    device_bytes_written: int
    device_bytes_read: int
    error: Optional[str] = None
    thread_cpu_seconds: float = 0.0
    worker_cpu_seconds: float = 0.0
    client_cpu_seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.user_bytes / self.seconds / 1e6 if self.seconds > 0 else 0.0

    @property
    def iops(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def blocks(self) -> int:
        return self.user_bytes // BLOCK_SIZE

    @property
    def cpu_us_per_block(self) -> float:
        return self.cpu_seconds * 1e6 / self.blocks if self.blocks else 0.0

    @property
    def thread_us_per_block(self) -> float:
        return self.thread_cpu_seconds * 1e6 / self.blocks if self.blocks else 0.0

    @property
    def client_us_per_block(self) -> float:
        return self.client_cpu_seconds * 1e6 / self.blocks if self.blocks else 0.0

    @property
    def engine_us_per_block(self) -> float:
        """The thread's CPU per block without the benchmark's own (client) share."""
        return max(0.0, self.thread_us_per_block - self.client_us_per_block)

    @property
    def worker_us_per_block(self) -> float:
        return self.worker_cpu_seconds * 1e6 / self.blocks if self.blocks else 0.0

    @property
    def write_amplification(self) -> float:
        """Device bytes written per user byte (meaningful for write workloads)."""
        return self.device_bytes_written / self.user_bytes if self.user_bytes else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(mb_per_s=self.mb_per_s, iops=self.iops,
                 cpu_us_per_block=self.cpu_us_per_block,
                 thread_us_per_block=self.thread_us_per_block,
                 client_us_per_block=self.client_us_per_block,
                 engine_us_per_block=self.engine_us_per_block,
                 worker_us_per_block=self.worker_us_per_block,
                 write_amplification=self.write_amplification)
        return d


# (ops, user bytes) done by a workload body
Body = Callable[[], Tuple[int, int]]


def timed(name: str, bench: BenchDisk, body: Body) -> WorkloadResult:
    """Run `body` once, measuring wall time, CPU time (the process's, this thread's and
    the crypto workers') and device traffic."""
    before, pool0 = bench.counts(), bench.pool().cpu_seconds
    cpu0, thread0, t0 = time.process_time(), time.thread_time(), time.perf_counter()
    ops, nbytes = body()
    seconds, thread = time.perf_counter() - t0, time.thread_time() - thread0
    cpu = time.process_time() - cpu0
    delta = bench.counts() - before
    return WorkloadResult(name, ops, nbytes, seconds, cpu, delta.bytes_written, delta.bytes_read,
                          thread_cpu_seconds=thread,
                          worker_cpu_seconds=bench.pool().cpu_seconds - pool0)


class NullDisk:
    """A disk that does nothing: writes are dropped, reads answered with blocks that pass
    the checks (the LBA stamp, the rest of the block any bytes). Run through the same
    workload loop, it measures what the loop itself (building requests and payloads,
    checking answers) costs the thread, so that the engine's share can be told apart."""

    def __init__(self):
        self._tail = bytes(BLOCK_SIZE - 8)
        self._words = np.zeros(0, np.uint64)

    def write_many(self, items) -> None:
        pass

    def flush(self) -> None:
        pass

    def read_many(self, ranges) -> list:
        return [self._blocks(lba, n) for lba, n in ranges]

    def _blocks(self, lba: int, n: int) -> bytes:
        if n == 1:
            return lba.to_bytes(8, "little") + self._tail
        if len(self._words) < n * WORDS_PER_BLOCK:
            self._words = np.zeros(n * WORDS_PER_BLOCK, np.uint64)
        self._words[:n * WORDS_PER_BLOCK:WORDS_PER_BLOCK] = np.arange(lba, lba + n,
                                                                      dtype=np.uint64)
        return self._words[:n * WORDS_PER_BLOCK].tobytes()


class RawDisk(NullDisk):
    """The device alone: each batch of reads goes to the image file at the LBAs' own
    offsets (where CryptDisk keeps them), every read of the batch in flight at once on one
    io_uring (O_DIRECT, into one reused buffer, nothing copied), answered like a NullDisk.
    Run through the same loop, it measures what a batch costs with no index, no crypto and
    no copy: the device's time plus the loop's.

    It also notes when a batch's first read completes, as a share of the whole batch's
    time (`together`, the median over batches). Near 1, the completions arrive together:
    no work on the data can overlap the device's time, so no number of crypto workers can
    take that time off a batch-synchronous read."""

    RING = 256

    def __init__(self, fd: int):
        super().__init__()
        self._fd, self._ring, self._buf = fd, Ring(self.RING), mmap.mmap(-1, BLOCK_SIZE)
        self._first_shares: List[float] = []

    @property
    def together(self) -> float:
        return float(np.median(self._first_shares)) if self._first_shares else 0.0

    def read_many(self, ranges) -> list:
        need = sum(n for _, n in ranges) * BLOCK_SIZE
        if len(self._buf) < need:
            self._buf.close()
            self._buf = mmap.mmap(-1, need)
        base, pos, rows = buffer_address(self._buf), 0, []
        for i, (lba, n) in enumerate(ranges):
            # opcode, flags, ioprio, fd, off, addr, len, op_flags, user_data, buf_index,
            # personality, splice_fd_in
            rows.append((IORING_OP_READ, 0, 0, self._fd, lba * BLOCK_SIZE, base + pos,
                         n * BLOCK_SIZE, 0, i, 0, 0, 0))
            pos += n * BLOCK_SIZE
        start, first = time.perf_counter(), None
        for i in range(0, len(rows), self.RING):
            chunk = rows[i:i + self.RING]
            self._ring.prep_packed_many(SQE_RW, chunk)
            cqes = self._ring.submit_and_wait(1)
            first = first or time.perf_counter()
            cqes += self._ring.complete(len(chunk) - len(cqes))
            for user_data, res, _flags in cqes:
                if res != chunk[user_data - i][6]:
                    raise OSError(-res if res < 0 else errno.EIO, "raw device read failed")
        self._first_shares.append((first - start) / (time.perf_counter() - start))
        return super().read_many(ranges)

    def close(self) -> None:
        self._ring.close()
        self._buf.close()


@dataclass
class DeviceReads:
    """A read workload run again on the device alone (RawDisk)."""
    result: WorkloadResult
    together: float             # RawDisk.together: near 1, a batch's reads complete at once

    @property
    def mb_per_s(self) -> float:
        return self.result.mb_per_s

    def to_dict(self) -> dict:
        return {**self.result.to_dict(), "together": self.together}


def client_seconds(body: Body) -> float:
    """The thread CPU of one run of `body` (built on a NullDisk)."""
    t0 = time.thread_time()
    body()
    return time.thread_time() - t0


def random_lbas(seed: int, count: int, lo: int, hi: int) -> List[int]:
    """`count` random LBAs in [lo, hi), the same for every disk given the same seed.

    Like fio's default random map, each pass visits every LBA once in a random order (a
    fresh permutation per pass): no LBA repeats until all were visited, so a disk cannot
    look better by absorbing repeated writes to one block in its buffer."""
    rng, n, chunks = np.random.default_rng(seed), hi - lo, []
    for start in range(0, count, n):
        chunks.append(rng.choice(n, size=min(n, count - start), replace=False))
    return (np.concatenate(chunks) + lo).tolist() if chunks else []


def batches(items: Sequence, depth: int):
    """`items` in consecutive slices of `depth` (the last may be shorter)."""
    for i in range(0, len(items), depth):
        yield items[i:i + depth]


def batch_writer(disk) -> Callable[[List[Tuple[int, bytes]]], None]:
    """How a batch of (lba, data) writes reaches `disk`: its `write_many`, as the ublk
    target hands a batch's WRITEs on (CryptDisk: one io_uring submission; SwornDisk: the
    engine buffers them). A batch ends with nothing more (no flush), just as a ublk batch
    completes its writes without one."""
    return disk.write_many


def read_checked(disk, ranges: List[Tuple[int, int]]) -> None:
    """One batch of reads through `read_many`, each range checked; a range the disk
    failed (SwornDisk returns its error in its place) raises that error."""
    for (lba, _), data in zip(ranges, disk.read_many(ranges)):
        if isinstance(data, BaseException):
            raise data
        Payload.check(lba, data)


def _write_requests(name: str, disk, requests: Sequence[Tuple[int, int]], payload: Payload,
                    depth: int, flush_every: int = 0) -> int:
    """Writes (lba, nr_blocks) requests of payload in batches of `depth`, a flush after
    every `flush_every` requests (0: none; at a batch boundary) and one at the end: the
    final flush is part of the work, or a write-back disk would look infinitely fast.
    So is the merge the writes left in progress (`settle`)."""
    write, done, flushed = batch_writer(disk), 0, 0
    try:
        for batch in batches(requests, depth):
            write([(lba, payload.blocks(lba, n)) for lba, n in batch])
            done += len(batch)
            if flush_every and done // flush_every > flushed:
                flushed = done // flush_every
                disk.flush()
        disk.flush()
        settle(disk)
    except Exception as e:
        raise WorkloadError(name, done, e) from e
    return done


def settle(disk) -> None:
    """Runs a SwornDisk's merge in progress to its end (background_step, as when idle):
    a merge runs between writes, and one a run leaves unfinished is still its cost."""
    debug = getattr(disk, "debug", None)
    if debug is not None:
        while debug.index.merging() and disk.background_step():
            pass


def random_write(disk, lbas: Sequence[int], payload: Payload, flush_every: int = 0,
                 name: str = "randwrite", depth: int = 1) -> Body:
    """4 KiB writes at `lbas`, `depth` at a time (see _write_requests)."""
    requests = [(lba, 1) for lba in lbas]

    def body():
        done = _write_requests(name, disk, requests, payload, depth, flush_every)
        return done, done * BLOCK_SIZE
    return body


def random_read(disk, lbas: Sequence[int], name: str = "randread", depth: int = 1) -> Body:
    """4 KiB reads at `lbas`, `depth` at a time, each checked against the LBA stamped in it."""
    requests = [(lba, 1) for lba in lbas]

    def body():
        for batch in batches(requests, depth):
            read_checked(disk, batch)
        return len(requests), len(requests) * BLOCK_SIZE
    return body


def _extents(start: int, nr_blocks: int, request_blocks: int) -> List[Tuple[int, int]]:
    return [(lba, min(request_blocks, start + nr_blocks - lba))
            for lba in range(start, start + nr_blocks, request_blocks)]


def sequential_write(disk, start: int, nr_blocks: int, request_blocks: int,
                     payload: Payload, name: str = "seqwrite", depth: int = 1) -> Body:
    """Ascending writes of `request_blocks` each over [start, start+nr_blocks), `depth`
    at a time, then flush."""
    requests = _extents(start, nr_blocks, request_blocks)

    def body():
        return _write_requests(name, disk, requests, payload, depth), nr_blocks * BLOCK_SIZE
    return body


def sequential_read(disk, start: int, nr_blocks: int, request_blocks: int,
                    name: str = "seqread", depth: int = 1) -> Body:
    """Ascending reads of `request_blocks` each over [start, start+nr_blocks), `depth`
    at a time, checked."""
    requests = _extents(start, nr_blocks, request_blocks)

    def body():
        for batch in batches(requests, depth):
            read_checked(disk, batch)
        return len(requests), nr_blocks * BLOCK_SIZE
    return body
