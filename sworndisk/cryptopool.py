"""Crypto workers: sealing and verifying blocks in other processes, so that every core works.

CPython threads do not run AES-GCM calls in parallel usefully (the per-block Python around
each call holds the GIL), so the parallel part lives in worker processes
(`cryptoworker.py`). They share one anonymous memfd region with the engine, mapped in
every process and never named in the file system; small job messages go over one
SOCK_SEQPACKET socketpair per worker. Layout of the region (docs/modules.md, "Crypto
workers"): the key/nonce material first (page-aligned, mlocked by the workers, zeroed as
soon as a job is done), then two plaintext segment buffers (the pending batch fills one
while the other is sealed), the sealed segment's ciphertext and tags, and read lanes
(one read job each: ciphertext || tag in, plaintext out, a status byte per block).

A worker that dies (SIGKILL, OOM) is noticed when its socket reports EOF: its jobs are
redone in the calling thread from the region, which still holds their inputs, the worker
is replaced and `restarts` counted. Nothing a job produced is used before its reply, so a
death costs time, never data.
"""
from __future__ import annotations

import mmap
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

from . import crypto
from .cryptoworker import BLOCK, HELLO, JOB, NONCE, OP_OPEN, OP_SEAL, REPLY, TAG, Cipher
from .errors import InvalidArgument
from .format import SEGMENT_BLOCKS

LANE_BLOCKS = 256           # blocks of one read job
VALUE_MAX = 72              # room per block for its record value (key, nonce, tag, ...)
MIN_OPEN_BLOCKS = 8         # smaller read batches are verified in the calling thread
MIN_SEAL_BLOCKS = 64        # smaller seals (a flush of a few blocks) stay in the thread
MAX_WORKERS = 64
_WORKER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cryptoworker.py")
ENGINE_SHARE = 0            # a read batch's share the calling thread verifies, in workers' shares
_PAGE = 4096


def automatic_workers() -> int:
    """One worker per CPU beyond the first (the engine's thread has that one), at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(0, min(8, cpus - 1))


def resolve_workers(n: int | None) -> int:
    """Config.crypto_workers as a count: None is automatic."""
    return automatic_workers() if n is None else n


@dataclass(frozen=True)
class CryptoStats:
    """The pool's figures (`SwornDisk.stats().crypto`)."""
    workers: int                    # configured pool size (0: everything in the thread)
    worker_pids: tuple[int, ...]
    batches: int                    # jobs sent to workers
    blocks_in_workers: int
    blocks_inline: int              # sealed or verified in the engine's threads
    worker_restarts: int            # workers replaced after dying
    worker_cpu_seconds: float       # all workers', live and dead
    keys_locked: bool               # every live worker reported its key pages mlocked


def _align(n: int) -> int:
    return (n + _PAGE - 1) // _PAGE * _PAGE


class _Worker:
    """One worker process and its end of the socketpair."""

    def __init__(self, memfd: int, keys_len: int):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # the file itself, isolated (-I): not the sworndisk package and what it imports
            self.proc = subprocess.Popen(
                [sys.executable, "-I", _WORKER_FILE, str(memfd), str(theirs.fileno()),
                 str(keys_len), str(os.getpid())],
                pass_fds=(memfd, theirs.fileno()), stdin=subprocess.DEVNULL, cwd="/")
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.sock = mine
        self.pid = self.proc.pid
        self.jobs: set[int] = set()     # sent, not answered
        self.cpu_ns = 0
        # From its hello, the worker's first message (read when the pool first hears
        # from it, so that opening a disk does not wait for the workers' start-up).
        self.dumpable: int | None = None
        self.keys_locked = False

    def hello(self, msg: bytes) -> None:
        _pid, self.dumpable, locked, self.cpu_ns = HELLO.unpack(msg)
        self.keys_locked = bool(locked)

    def stop(self) -> float:
        """Ends the process and reaps it; returns its total CPU seconds. It holds nothing
        to clean up (the keys it saw are in the region, which the pool zeroes)."""
        if self.proc.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.sock.close()
        _pid, status, usage = os.wait4(self.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here (rusage)
        return usage.ru_utime + usage.ru_stime


class CryptoPool:
    """Worker processes and their shared region, for one open disk (key_bytes: its data
    key size). close() ends every worker and releases the region and sockets."""

    def __init__(self, workers: int, key_bytes: int):
        if not 0 < workers <= MAX_WORKERS:
            raise InvalidArgument(f"a crypto pool needs 1..{MAX_WORKERS} workers (got {workers})")
        self.size, self.kb = workers, key_bytes
        step = key_bytes + NONCE
        self.lanes = 2 * workers
        # key material first (the workers mlock it), then the data areas
        self.seal_mat = 0
        lane_mat0 = _align(SEGMENT_BLOCKS * step)
        self.keys_len = _align(lane_mat0 + self.lanes * LANE_BLOCKS * VALUE_MAX)
        self.plain = [self.keys_len, self.keys_len + SEGMENT_BLOCKS * BLOCK]
        self.sealed = self.plain[1] + SEGMENT_BLOCKS * BLOCK
        self.seal_tags = self.sealed + _align(SEGMENT_BLOCKS * BLOCK + TAG)
        self.seal_slots = self.seal_tags + SEGMENT_BLOCKS * TAG
        lane0 = _align(self.seal_slots + SEGMENT_BLOCKS * 2)
        lane_len = _align(LANE_BLOCKS * (2 * BLOCK + 1))
        self._lane_at = [(lane_mat0 + i * LANE_BLOCKS * VALUE_MAX, lane0 + i * lane_len)
                         for i in range(self.lanes)]
        self._region = _Region(lane0 + self.lanes * lane_len, self.keys_len)
        self.mem = self._region.mem
        self._fd = self._region.fd
        self._workers: list[_Worker] = []
        # Workers start at the first job (a disk that never needs them has none), from a
        # thread of the pool's own: PR_SET_PDEATHSIG fires when the thread that started a
        # worker ends, so not a caller's (a ublk queue's) but one that lives as long as
        # the pool does.
        self._spawner = _Spawner(self._fd, self.keys_len)
        # A disk dropped without close() still ends its workers when collected.
        self._finalizer = weakref.finalize(self, _release, self._workers, self._region,
                                           self._spawner)
        self._cipher = Cipher()
        self._cv = threading.Condition()
        self._polling = False
        self._done: dict[int, int] = {}         # job id -> failures, until collected
        self._specs: dict[int, tuple] = {}      # job id -> JOB fields, until answered
        self._next_id = 1
        self._free_lanes = list(range(self.lanes))
        self._dead_cpu = 0.0
        self.batches = self.blocks_in_workers = self.blocks_inline = self.restarts = 0

    # ------------------------------------------------------------------ buffers
    def plaintext(self, i: int) -> memoryview:
        """Plaintext segment buffer i (0 or 1), which the pending batch fills in place."""
        view = self.mem[self.plain[i]:self.plain[i] + SEGMENT_BLOCKS * BLOCK]
        self._region.views.append(view)     # released at close, so the mapping can go
        return view

    # ------------------------------------------------------------------ sealing
    def seal_start(self, buf: int, slots: list[int]) -> "SealJob":
        """Starts sealing `slots` of plaintext buffer `buf` under fresh keys: split over
        the workers (or done here for a few blocks). The buffer must stay unchanged until
        the job's result() returns."""
        n, kb, mem = len(slots), self.kb, self.mem
        step = kb + NONCE
        mat = self.seal_mat
        mem[mat:mat + n * step] = crypto.random_bytes(n * step)
        sl = mem[self.seal_slots:self.seal_slots + n * 2].cast("H")
        for j, s in enumerate(slots):
            sl[j] = s
        spec = (OP_SEAL, kb, step, 0, 0, n, self.plain[buf], self.sealed, mat, self.seal_tags,
                self.seal_slots)
        if n < MIN_SEAL_BLOCKS:
            self._inline(spec)
            return SealJob(self, n, [])
        per = -(-n // self.size)
        jobs = [self._send(spec[:4] + (f, min(per, n - f)) + spec[6:]) for f in range(0, n, per)]
        return SealJob(self, n, jobs)

    def seal_result(self, n: int, jobs: list[int]) -> tuple[bytes, bytes, memoryview]:
        self._wait(jobs)
        step, mem = self.kb + NONCE, self.mem
        material = bytes(mem[self.seal_mat:self.seal_mat + n * step])
        mem[self.seal_mat:self.seal_mat + n * step] = bytes(n * step)
        return (material, bytes(mem[self.seal_tags:self.seal_tags + n * TAG]),
                mem[self.sealed:self.sealed + n * BLOCK])

    # ------------------------------------------------------------------ opening
    def open_start(self, values: list[bytes], key_at: int, raws: list,
                   dsts: list) -> "OpenJob":
        """Starts verifying and decrypting blocks: block j's record value is values[j]
        (its key at key_at, then nonce and tag), its ciphertext the j-th 4 KiB of the
        concatenated `raws`, its plaintext goes to dsts[j]. Jobs of up to LANE_BLOCKS
        blocks go to the workers now (as many as free lanes allow); the rest, and this
        thread's share (ENGINE_SHARE), when result() is called."""
        return OpenJob(self, values, key_at, raws, dsts)

    def send_open(self, lane: int, values: list, key_at: int, ct: memoryview, first: int,
                   count: int) -> int:
        mem = self.mem
        mat, src = self._lane_at[lane]
        vals = b"".join(values[first:first + count])
        mem[mat:mat + len(vals)] = vals
        mem[src:src + count * BLOCK] = ct[first * BLOCK:(first + count) * BLOCK]
        out = src + LANE_BLOCKS * BLOCK
        return self._send((OP_OPEN, self.kb, len(values[0]), key_at, 0, count, src, out, mat,
                           0, out + LANE_BLOCKS * BLOCK))

    def collect_open(self, lane: int, dsts: list, first: int, count: int) -> list[int]:
        mem = self.mem
        mat, src = self._lane_at[lane]
        out = src + LANE_BLOCKS * BLOCK
        status = bytes(mem[out + LANE_BLOCKS * BLOCK:out + LANE_BLOCKS * BLOCK + count])
        for j, dst in enumerate(dsts[first:first + count]):
            dst[:] = mem[out + j * BLOCK:out + (j + 1) * BLOCK]
        mem[mat:mat + count * VALUE_MAX] = bytes(count * VALUE_MAX)
        with self._cv:
            self._free_lanes.append(lane)
            self._cv.notify_all()
        if not status.count(1):
            return []
        return [first + j for j, bad in enumerate(status) if bad]

    def take_lane(self, wait: bool) -> int | None:
        with self._cv:
            while not self._free_lanes:
                if not wait:
                    return None
                self._cv.wait()
            return self._free_lanes.pop()

    # ------------------------------------------------------------------ jobs
    def count_inline(self, n: int) -> None:
        with self._cv:
            self.blocks_inline += n

    def _inline(self, spec: tuple) -> int:
        self.count_inline(spec[5])
        return self._cipher.run(self.mem, (0,) + spec)

    def _send(self, spec: tuple) -> int:
        """Sends a job (JOB fields without the id) to the least busy worker; its id."""
        with self._cv:
            jid = self._next_id
            self._next_id = jid % 0xFFFFFFFF + 1
            self._specs[jid] = spec
            self._start_locked()
            w = min(self._workers, key=lambda w: len(w.jobs))
            w.jobs.add(jid)
            self.batches += 1
            self.blocks_in_workers += spec[5]
            try:
                w.sock.send(JOB.pack(jid, *spec))
            except OSError:
                self._replace(w)       # redoes the job here
            return jid

    def _wait(self, jobs: list[int]) -> list[int]:
        """Waits for all `jobs`; their failure counts."""
        for j in jobs:
            self.wait_any([j])
        return []

    def wait_any(self, jobs: list[int]) -> int:
        """Waits until one of `jobs` is answered (or redone here); returns it. Any thread
        may read the sockets for everyone: the others are woken to look."""
        with self._cv:
            while True:
                for j in jobs:
                    if j in self._done:
                        del self._done[j]
                        return j
                if self._polling:
                    self._cv.wait()
                    continue
                self._polling = True
                socks = {w.sock.fileno(): w for w in self._workers if w.jobs}
                self._cv.release()
                try:
                    ready = select.poll()
                    for fd in socks:
                        ready.register(fd, select.POLLIN)
                    events = ready.poll()
                finally:
                    self._cv.acquire()
                    self._polling = False
                for fd, _ev in events:
                    self._receive(socks[fd])
                self._cv.notify_all()

    def _receive(self, w: "_Worker") -> None:
        """Takes one reply from w, or replaces w if it died (called with the lock held)."""
        try:
            msg = w.sock.recv(64)
        except OSError:
            msg = b""
        if len(msg) == HELLO.size:
            w.hello(msg)
            return
        if len(msg) != REPLY.size:
            self._replace(w)
            return
        jid, failed, cpu_ns = REPLY.unpack(msg)
        w.cpu_ns = cpu_ns
        w.jobs.discard(jid)
        self._specs.pop(jid, None)
        self._done[jid] = failed

    def _replace(self, w: "_Worker") -> None:
        """w died: redo its jobs here (their inputs are still in the region), start a
        replacement (called with the lock held)."""
        self._dead_cpu += w.stop()
        self.restarts += 1
        for jid in sorted(w.jobs):
            spec = self._specs.pop(jid)
            self.blocks_in_workers -= spec[5]
            self._done[jid] = self._inline(spec)
        w.jobs.clear()
        self._workers[self._workers.index(w)] = self._spawner.worker()

    # ------------------------------------------------------------------ life
    def stats(self) -> CryptoStats:
        live = sum(w.cpu_ns for w in self._workers) / 1e9
        return CryptoStats(workers=self.size, worker_pids=self.pids(), batches=self.batches,
                           blocks_in_workers=self.blocks_in_workers,
                           blocks_inline=self.blocks_inline, worker_restarts=self.restarts,
                           worker_cpu_seconds=self._dead_cpu + live,
                           keys_locked=bool(self._workers)
                           and all(w.keys_locked for w in self._workers))

    def pids(self) -> tuple[int, ...]:
        return tuple(w.pid for w in self._workers)

    def start(self) -> None:
        """Starts the workers now (they start at the first job otherwise)."""
        with self._cv:
            self._start_locked()

    def _start_locked(self) -> None:
        while len(self._workers) < self.size:
            self._workers.append(self._spawner.worker())

    def dumpable(self) -> tuple[int, ...]:
        """PR_GET_DUMPABLE as each worker reported it at start (0 expected); starts them
        if need be and waits for their hellos."""
        with self._cv:
            self._start_locked()
            for i in range(len(self._workers)):
                while self._workers[i].dumpable is None:     # (a replacement's, if it died)
                    if self._polling:
                        self._cv.wait()
                        continue
                    self._receive(self._workers[i])
            return tuple(w.dumpable for w in self._workers)

    def close(self) -> None:
        """Ends the workers, zeroes the key pages, releases the region and sockets."""
        self._finalizer()
        self.mem = None


class _Region:
    """The anonymous memfd shared with the workers, mapped here; its first keys_len bytes
    hold key material."""

    def __init__(self, size: int, keys_len: int):
        self.keys_len = keys_len
        self.views: list[memoryview] = []       # long-lived views handed out
        self.fd = os.memfd_create("sworndisk-crypto", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self.mem = memoryview(self.map)

    def close(self) -> None:
        """Zeroes the key pages, unmaps, closes the memfd."""
        if self.mem is None:
            return
        self.mem[:self.keys_len] = bytes(self.keys_len)
        for view in self.views + [self.mem]:
            view.release()
        self.mem = None
        try:
            self.map.close()        # its own duplicate of the memfd goes with it
        except BufferError:         # a view still held (a traceback's frame): the mapping
            pass                    # and its descriptor go when that view does
        os.close(self.fd)


def _release(workers: list, region: _Region, spawner: "_Spawner") -> None:
    """A pool's end (close() or collection): workers first, then the region."""
    for w in workers:
        w.stop()
    workers.clear()
    spawner.stop()
    region.close()


class _Spawner:
    """The thread that starts a pool's workers (see CryptoPool.__init__), started with
    the first of them and ended by the pool's end."""

    def __init__(self, memfd: int, keys_len: int):
        self.memfd, self.keys_len = memfd, keys_len
        self.requests: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None

    def worker(self) -> _Worker:
        if self.thread is None:
            self.thread = threading.Thread(target=_spawn_loop, name="sworndisk-crypto-spawner",
                                           args=(self.requests, self.memfd, self.keys_len),
                                           daemon=True)
            self.thread.start()
        reply: queue.Queue = queue.Queue(1)
        self.requests.put(reply)
        got = reply.get()
        if isinstance(got, BaseException):
            raise got
        return got

    def stop(self) -> None:
        if self.thread is not None:
            self.requests.put(None)
            self.thread.join()
            self.thread = None


def _spawn_loop(requests: queue.Queue, memfd: int, keys_len: int) -> None:
    while True:
        reply = requests.get()
        if reply is None:
            return
        try:
            reply.put(_Worker(memfd, keys_len))
        except BaseException as e:      # noqa: BLE001 - raised in the asking thread
            reply.put(e)


class OpenJob:
    """Blocks being verified by the pool (CryptoPool.open_start); result() finishes."""

    def __init__(self, pool: CryptoPool, values: list[bytes], key_at: int, raws: list,
                 dsts: list):
        n = len(values)
        self.pool, self.values, self.key_at, self.dsts = pool, values, key_at, dsts
        self.ct = _joined(raws)
        share = pool.size + ENGINE_SHARE
        per = min(LANE_BLOCKS, -(-n // share))
        self.mine = max(0, n - per * pool.size) if ENGINE_SHARE and n <= per * share else 0
        self.chunks = deque((f, min(per, n - f)) for f in range(self.mine, n, per))
        self.inflight: dict[int, tuple] = {}
        self._send(wait=False)

    def _send(self, wait: bool) -> None:
        pool = self.pool
        while self.chunks:
            lane = pool.take_lane(wait=wait and not self.inflight)
            if lane is None:
                return
            first, count = self.chunks.popleft()
            jid = pool.send_open(lane, self.values, self.key_at, self.ct, first, count)
            self.inflight[jid] = (lane, first, count)

    def result(self) -> list[int]:
        """The positions j that failed authentication (their dsts hold nothing meaningful)."""
        pool, failed = self.pool, []
        if self.mine:
            failed += open_inline(self.values[:self.mine], self.key_at, pool.kb, self.ct,
                                  self.dsts)
            pool.count_inline(self.mine)
        while self.chunks or self.inflight:
            self._send(wait=True)
            jid = pool.wait_any(list(self.inflight))
            lane, first, count = self.inflight.pop(jid)
            failed += pool.collect_open(lane, self.dsts, first, count)
        return sorted(failed)


class _InlineOpen:
    """open_start's work, done in the calling thread at result()."""

    def __init__(self, values: list[bytes], key_at: int, kb: int, raws: list, dsts: list):
        self.args = values, key_at, kb, raws, dsts

    def result(self) -> list[int]:
        values, key_at, kb, raws, dsts = self.args
        ct = _joined(raws)
        return open_inline(values, key_at, kb, ct, dsts)


class SealJob:
    """A segment being sealed; result() waits for it."""

    def __init__(self, pool: CryptoPool, n: int, jobs: list[int]):
        self.pool, self.n, self.jobs = pool, n, jobs

    def result(self) -> tuple[bytes, bytes, memoryview]:
        """(key/nonce material, tags, ciphertext view) of the n sealed blocks; the
        region's copy of the keys is zeroed."""
        return self.pool.seal_result(self.n, self.jobs)



class BlockCrypto:
    """A disk's door to its block crypto: the pool when it has workers, else this thread
    (crypto_workers=0, as before the pool existed). Counts what it did either way."""

    def __init__(self, workers: int, key_bytes: int):
        self.pool = CryptoPool(workers, key_bytes) if workers else None
        self.key_bytes = key_bytes
        self._inline = 0

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

    def count_inline(self, n: int) -> None:
        """n blocks sealed in the thread (the pending batch's own path)."""
        self._inline += n

    def stats(self) -> CryptoStats:
        if self.pool is not None:
            return self.pool.stats()
        return CryptoStats(workers=0, worker_pids=(), batches=0, blocks_in_workers=0,
                           blocks_inline=self._inline, worker_restarts=0,
                           worker_cpu_seconds=0.0, keys_locked=False)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


def _joined(raws: list) -> memoryview:
    """The ciphertext runs of a read batch as one buffer (no copy for a single run)."""
    return memoryview(raws[0] if len(raws) == 1 else b"".join(raws))


def open_inline(values: list[bytes], key_at: int, kb: int, ct: memoryview,
                dsts: list) -> list[int]:
    """open_start's work in this thread, for the first len(values) blocks."""
    n, t = key_at + kb, key_at + kb + NONCE
    return crypto.open_blocks([(v[key_at:n], v[n:t], v[t:t + TAG], ct[j * BLOCK:(j + 1) * BLOCK],
                                dst) for j, (v, dst) in enumerate(zip(values, dsts))])


def open_crypto(workers: int | None, key_bytes: int) -> BlockCrypto:
    """The block crypto for Config.crypto_workers (None: automatic_workers())."""
    return BlockCrypto(resolve_workers(workers), key_bytes)
