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

import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

from . import crypto
from .cryptoworker import BLOCK, CT_STRIDE, HELLO, JOB, NONCE, OP_OPEN, OP_SEAL, REPLY, TAG, \
    Cipher
from .errors import InvalidArgument
from .format import SEGMENT_BLOCKS

LANE_BLOCKS = 256           # blocks of one read job
MIN_OPEN_BLOCKS = 8         # smaller read batches are verified in the calling thread
MIN_SEAL_BLOCKS = 64        # smaller seals (a flush of a few blocks) stay in the thread
MAX_WORKERS = 64
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
    keys_locked: bool               # every live worker mlocked its key pages


def _align(n: int) -> int:
    return (n + _PAGE - 1) // _PAGE * _PAGE


class _Worker:
    """One worker process and its end of the socketpair."""

    def __init__(self, memfd: int, keys_len: int):
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            env = dict(os.environ, SWORNDISK_POOL_PARENT=str(os.getpid()))
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sworndisk.cryptoworker", str(memfd),
                 str(theirs.fileno()), str(keys_len)],
                pass_fds=(memfd, theirs.fileno()), env=env, stdin=subprocess.DEVNULL,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.sock = mine
        self.jobs: set[int] = set()     # sent, not answered
        self.cpu_ns = 0
        hello = mine.recv(64)
        if len(hello) != HELLO.size:
            self.stop()
            raise OSError("a crypto worker failed to start")
        self.pid, self.dumpable, locked = HELLO.unpack(hello)
        self.keys_locked = bool(locked)

    def stop(self) -> float:
        """Ends the process (EOF on its socket, then a kill if it lingers) and reaps it;
        returns its total CPU seconds."""
        self.sock.close()
        deadline = time.monotonic() + 2
        while True:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.proc.kill()
                pid, status, usage = os.wait4(self.proc.pid, 0)
                break
            time.sleep(0.0005)
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
        self.keys_len = _align(lane_mat0 + self.lanes * LANE_BLOCKS * step)
        self.plain = [self.keys_len, self.keys_len + SEGMENT_BLOCKS * BLOCK]
        self.sealed = self.plain[1] + SEGMENT_BLOCKS * BLOCK
        self.seal_tags = self.sealed + _align(SEGMENT_BLOCKS * BLOCK + TAG)
        self.seal_slots = self.seal_tags + SEGMENT_BLOCKS * TAG
        lane0 = _align(self.seal_slots + SEGMENT_BLOCKS * 2)
        lane_len = _align(LANE_BLOCKS * (CT_STRIDE + BLOCK + 1))
        self._lane_at = [(lane_mat0 + i * LANE_BLOCKS * step, lane0 + i * lane_len)
                         for i in range(self.lanes)]
        total = lane0 + self.lanes * lane_len
        self._fd = os.memfd_create("sworndisk-crypto", os.MFD_CLOEXEC)
        self._workers: list[_Worker] = []
        self._views: list[memoryview] = []
        try:
            os.ftruncate(self._fd, total)
            import mmap
            self._map = mmap.mmap(self._fd, total)
            self.mem = memoryview(self._map)
            for _ in range(workers):
                self._workers.append(_Worker(self._fd, self.keys_len))
        except BaseException:
            self.close()
            raise
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
        self._views.append(view)            # released at close, so the mapping can go
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
        spec = (OP_SEAL, kb, 0, n, self.plain[buf], self.sealed, mat, self.seal_tags,
                self.seal_slots)
        if n < MIN_SEAL_BLOCKS:
            self._inline(spec)
            return SealJob(self, n, [])
        per = -(-n // self.size)
        jobs = [self._send(spec[:2] + (f, min(per, n - f)) + spec[4:]) for f in range(0, n, per)]
        return SealJob(self, n, jobs)

    def seal_result(self, n: int, jobs: list[int]) -> tuple[bytes, bytes, memoryview]:
        self._wait(jobs)
        step, mem = self.kb + NONCE, self.mem
        material = bytes(mem[self.seal_mat:self.seal_mat + n * step])
        mem[self.seal_mat:self.seal_mat + n * step] = bytes(n * step)
        return (material, bytes(mem[self.seal_tags:self.seal_tags + n * TAG]),
                mem[self.sealed:self.sealed + n * BLOCK])

    # ------------------------------------------------------------------ opening
    def open_blocks(self, blocks: list[tuple]) -> list[int]:
        """crypto.open_blocks through the workers: (key, nonce, tag, ciphertext, dst)
        tuples, the positions that failed returned. Jobs of up to LANE_BLOCKS blocks go
        to the workers while this thread verifies a share itself; a small batch is all
        done here."""
        n = len(blocks)
        if n < MIN_OPEN_BLOCKS:
            self.blocks_inline += n
            return crypto.open_blocks(blocks)
        per = min(LANE_BLOCKS, -(-n // (self.size + 1)))
        mine = n - per * self.size if n <= per * (self.size + 1) else 0
        chunks = deque((f, min(per, n - f)) for f in range(mine, n, per))
        failed: list[int] = []
        inflight: dict[int, tuple] = {}
        while chunks or inflight:
            while chunks:
                lane = self._take_lane(wait=not inflight and not mine)
                if lane is None:
                    break
                first, count = chunks.popleft()
                inflight[self._send_open(lane, blocks, first, count)] = (lane, first, count)
            if mine:
                failed += crypto.open_blocks(blocks[:mine])
                self.blocks_inline += mine
                mine = 0
                continue
            jid = self._wait_any(list(inflight))
            lane, first, count = inflight.pop(jid)
            failed += self._collect_open(lane, blocks, first, count)
        return sorted(failed)

    def _send_open(self, lane: int, blocks: list, first: int, count: int) -> int:
        mem, kb = self.mem, self.kb
        step = kb + NONCE
        mat, base = self._lane_at[lane]
        src = base
        for j in range(count):
            key, nonce, tag, ct, _dst = blocks[first + j]
            m = mat + j * step
            mem[m:m + kb] = key
            mem[m + kb:m + step] = nonce
            s = src + j * CT_STRIDE
            mem[s:s + BLOCK] = ct
            mem[s + BLOCK:s + CT_STRIDE] = tag
        out = src + LANE_BLOCKS * CT_STRIDE
        return self._send((OP_OPEN, kb, 0, count, src, out, mat, 0, out + LANE_BLOCKS * BLOCK))

    def _collect_open(self, lane: int, blocks: list, first: int, count: int) -> list[int]:
        mem, step = self.mem, self.kb + NONCE
        mat, src = self._lane_at[lane]
        out = src + LANE_BLOCKS * CT_STRIDE
        status = out + LANE_BLOCKS * BLOCK
        failed = []
        for j in range(count):
            if mem[status + j]:
                failed.append(first + j)
            else:
                blocks[first + j][4][:] = mem[out + j * BLOCK:out + (j + 1) * BLOCK]
        mem[mat:mat + count * step] = bytes(count * step)
        with self._cv:
            self._free_lanes.append(lane)
            self._cv.notify_all()
        return failed

    def _take_lane(self, wait: bool) -> int | None:
        with self._cv:
            while not self._free_lanes:
                if not wait:
                    return None
                self._cv.wait()
            return self._free_lanes.pop()

    # ------------------------------------------------------------------ jobs
    def _inline(self, spec: tuple) -> int:
        self.blocks_inline += spec[3]
        return self._cipher.run(self.mem, (0,) + spec)

    def _send(self, spec: tuple) -> int:
        """Sends a job (JOB fields without the id) to the least busy worker; its id."""
        with self._cv:
            jid = self._next_id
            self._next_id = jid % 0xFFFFFFFF + 1
            self._specs[jid] = spec
            w = min(self._workers, key=lambda w: len(w.jobs))
            w.jobs.add(jid)
            self.batches += 1
            self.blocks_in_workers += spec[3]
            try:
                w.sock.send(JOB.pack(jid, *spec))
            except OSError:
                self._replace(w)       # redoes the job here
            return jid

    def _wait(self, jobs: list[int]) -> list[int]:
        """Waits for all `jobs`; their failure counts."""
        for j in jobs:
            self._wait_any([j])
        return []

    def _wait_any(self, jobs: list[int]) -> int:
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
            self.blocks_in_workers -= spec[3]
            self._done[jid] = self._inline(spec)
        w.jobs.clear()
        self._workers[self._workers.index(w)] = _Worker(self._fd, self.keys_len)

    # ------------------------------------------------------------------ life
    def stats(self) -> CryptoStats:
        live = sum(w.cpu_ns for w in self._workers) / 1e9
        return CryptoStats(workers=self.size, worker_pids=self.pids(), batches=self.batches,
                           blocks_in_workers=self.blocks_in_workers,
                           blocks_inline=self.blocks_inline, worker_restarts=self.restarts,
                           worker_cpu_seconds=self._dead_cpu + live,
                           keys_locked=all(w.keys_locked for w in self._workers))

    def pids(self) -> tuple[int, ...]:
        return tuple(w.pid for w in self._workers)

    def dumpable(self) -> tuple[int, ...]:
        """PR_GET_DUMPABLE as each live worker reported it at start (0 expected)."""
        return tuple(w.dumpable for w in self._workers)

    def close(self) -> None:
        """Ends the workers, zeroes the key pages, releases the region and sockets."""
        for w in self._workers:
            self._dead_cpu += w.stop()
        self._workers = []
        if getattr(self, "mem", None) is not None:
            self.mem[:self.keys_len] = bytes(self.keys_len)
            for view in self._views + [self.mem]:
                view.release()
            self.mem = None
            try:
                self._map.close()   # its own duplicate of the memfd goes with it
            except BufferError:     # a view still held (a traceback's frame): the mapping
                pass                # and its descriptor go when that view does
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


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
        self._inline = 0

    def open_blocks(self, blocks: list[tuple]) -> list[int]:
        if self.pool is not None:
            return self.pool.open_blocks(blocks)
        self._inline += len(blocks)
        return crypto.open_blocks(blocks)

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


def open_crypto(workers: int | None, key_bytes: int) -> BlockCrypto:
    """The block crypto for Config.crypto_workers (None: automatic_workers())."""
    return BlockCrypto(resolve_workers(workers), key_bytes)
