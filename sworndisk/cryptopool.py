"""Crypto workers: sealing and verifying blocks in other processes, so that every core works.

CPython threads do not run AES-GCM calls in parallel usefully (the per-block Python around
each call holds the GIL), so the parallel part lives in worker processes
(`cryptoworker.py`). They share one anonymous memfd region with the engine, mapped in
every process and never named in the file system; small job messages go over one
SOCK_SEQPACKET socketpair per worker. Layout of the region (docs/modules.md, "Crypto
workers"): the key/nonce material first (page-aligned, mlocked by the workers, zeroed as
soon as a job is done), then SEAL_DEPTH plaintext segment buffers (the pending batch
fills one while the others are sealed) and as many seal areas (ciphertext, tags, slots,
claims; one seal each in turn: the device may still be writing an earlier segment from
one), and read lanes
(one read job each: ciphertext || tag in, plaintext out, a status byte per block).

A worker that dies (SIGKILL, OOM) is noticed when its socket reports EOF: its jobs are
redone in the calling thread from the region, which still holds their inputs, the worker
is replaced and `restarts` counted. Nothing a job produced is used before its reply, so a
death costs time, never data.
"""
from __future__ import annotations

import errno
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
from array import array
from collections import deque
from dataclasses import dataclass

from . import crypto
from .cryptoworker import (BLOCK, HELLO, JOB, NONCE, OP_FETCH, OP_OPEN, OP_SEAL, READY, REPLY,
                           TAG, Cipher)
from .errors import InvalidArgument
from .format import SEGMENT_BLOCKS

LANE_BLOCKS = 256           # blocks of one read job
VALUE_MAX = 80              # room per block for its record (lba, hba, key, nonce, tag)
MIN_OPEN_BLOCKS = 8         # smaller read batches are verified in the calling thread
MIN_SEAL_BLOCKS = 64        # smaller seals (a flush of a few blocks) stay in the thread
MIN_SHARED_SEAL = 16        # smaller batches of BIT nodes are sealed in the thread
SEAL_CHUNK = 128            # blocks of one seal job: what the engine's thread may take over
SEAL_DEPTH = 3              # plaintext segment buffers: one filling, the others sealing
TAKE_OVER = True            # see seal_result
QUARANTINE_SECONDS = 5.0    # a lane a dead worker was reading into rests this long: its
                            # io_uring reads may still land after the process is reaped
MAX_WORKERS = 64
# A seal job in a read lane (seal_blocks): the ciphertext goes where a read's plaintext
# does; the lane's record area holds key || nonce per block, then the tags, then the u16
# buffer slots (0, 1, 2, ...), all within LANE_BLOCKS * VALUE_MAX bytes.
_LANE_TAGS = LANE_BLOCKS * (32 + NONCE)
_LANE_SLOTS = _LANE_TAGS + LANE_BLOCKS * TAG
assert _LANE_SLOTS + LANE_BLOCKS * 2 <= LANE_BLOCKS * VALUE_MAX
_IDENTITY = array("H", range(LANE_BLOCKS)).tobytes()
START_SECONDS = 120          # a worker's start-up, until READY (slow under emulation)
_WORKER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cryptoworker.py")
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
    blocks_fetched: int             # of blocks_in_workers, read by the workers themselves
    nodes_sealed: int               # BIT nodes sealed (in the thread or the workers; not
                                    # counted in the blocks_* figures, which are data blocks)
    nodes_in_workers: int           # of nodes_sealed
    blocks_taken_over: int          # of blocks_inline: seal chunks the engine's thread
                                    # sealed itself rather than wait for a worker
    worker_restarts: int            # workers replaced after dying
    worker_cpu_seconds: float       # all workers', live and dead
    keys_locked: bool               # every live worker reported its key pages mlocked


def _tracer(pid: int) -> int:
    """The TracerPid of process `pid` (0: none, or no /proc to tell)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("TracerPid:")), 0)
    except OSError:
        return 0


def _align(n: int) -> int:
    return (n + _PAGE - 1) // _PAGE * _PAGE


class _Worker:
    """One worker process and its end of the socketpair."""

    def __init__(self, keys_len: int):
        """Starts the process; it has nothing until share()."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # the file itself, isolated (-I): not the sworndisk package and what it imports
            self.proc = subprocess.Popen(
                [sys.executable, "-I", _WORKER_FILE, str(theirs.fileno()), str(keys_len),
                 str(os.getpid())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, cwd="/")
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self.sock = mine
        self.pid = self.proc.pid
        self.jobs: set[int] = set()     # sent, not answered
        self.cpu_ns = 0
        # From its hello, the worker's first message once it has the region (read when
        # the pool first hears from it, so that a job does not wait for it).
        self.dumpable: int | None = None
        self.keys_locked = False

    def share(self, memfd: int, data_fd: int) -> None:
        """Sends the worker the region and the data device once it said (READY) that it is
        not dumpable, and nothing traces it: until then it holds nothing that another
        process of the same user could take through /proc (a process is dumpable from
        its exec until its prctl). If it cannot, the worker is stopped and OSError raised."""
        try:
            self._share(memfd, data_fd)
        except BaseException:
            self.stop()
            raise

    def _share(self, memfd: int, data_fd: int) -> None:
        self.sock.settimeout(START_SECONDS)
        try:
            msg = self.sock.recv(64)
        except socket.timeout:
            msg = b""
        finally:
            self.sock.settimeout(None)
        if len(msg) != READY.size:
            raise OSError(errno.EIO, f"crypto worker {self.pid} did not start")
        _pid, dumpable = READY.unpack(msg)
        if dumpable != 0 or _tracer(self.pid) != 0:
            raise OSError(errno.EPERM, f"crypto worker {self.pid} is dumpable or traced: "
                                       f"the region is not shared with it")
        socket.send_fds(self.sock, [b"R"], [memfd] + ([data_fd] if data_fd >= 0 else []))

    def hello(self, msg: bytes) -> None:
        _pid, self.dumpable, locked, self.cpu_ns = HELLO.unpack(msg)
        self.keys_locked = bool(locked)

    def exited(self) -> bool:
        """Whether the process has ended (it stays a zombie until stop() reaps it)."""
        if self.proc.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

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
    key size; data_fd: the data device's O_DIRECT descriptor, which the workers read for
    fetch jobs, or -1). close() ends every worker and releases the region and sockets."""

    def __init__(self, workers: int, key_bytes: int, data_fd: int = -1):
        if not 0 < workers <= MAX_WORKERS:
            raise InvalidArgument(f"a crypto pool needs 1..{MAX_WORKERS} workers (got {workers})")
        self.size, self.kb = workers, key_bytes
        step = key_bytes + NONCE
        self.lanes = 2 * workers
        # key material first (the workers mlock it), then the data areas
        mat_len = _align(SEGMENT_BLOCKS * step)
        lane_mat0 = SEAL_DEPTH * mat_len
        self.keys_len = _align(lane_mat0 + self.lanes * LANE_BLOCKS * VALUE_MAX)
        self.plain = [self.keys_len + i * SEGMENT_BLOCKS * BLOCK for i in range(SEAL_DEPTH)]
        # A seal area per buffer, used in turn: up to SEAL_DEPTH - 1 seals in flight,
        # and the device may still be writing the segment before them from the next
        # area (pwrite_many_stable) while they are sealed.
        sealed_len = _align(SEGMENT_BLOCKS * BLOCK + TAG)
        at = self.plain[-1] + SEGMENT_BLOCKS * BLOCK
        self.seal_areas = []
        for i in range(SEAL_DEPTH):
            tags = at + sealed_len
            slots = tags + SEGMENT_BLOCKS * TAG
            claims = slots + SEGMENT_BLOCKS * 2
            self.seal_areas.append(SealArea(at, i * mat_len, tags, slots, claims))
            at = _align(claims + SEGMENT_BLOCKS // SEAL_CHUNK)
        self._sealing = 0                       # the area the next seal uses
        lane0 = at
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
        self._spawner = _Spawner(self._fd, self.keys_len, data_fd)
        # A disk dropped without close() still ends its workers when collected.
        self._finalizer = weakref.finalize(self, _release, self._workers, self._region,
                                           self._spawner)
        self._cipher = Cipher(data_fd)
        self.can_fetch = data_fd >= 0
        self._cv = threading.Condition()
        self._polling = False
        self._done: dict[int, int] = {}         # job id -> failures, until collected
        self._specs: dict[int, tuple] = {}      # job id -> JOB fields, until answered
        self._fetching: set[int] = set()        # fetch jobs whose reads may be in flight
        self._taken: set[int] = set()           # seal jobs this thread took over, unanswered
        self._held: set = set()                 # fetch jobs with chunks not sent yet
        self._tainted: set[int] = set()         # lanes a dead worker was reading into
        self._resting: deque = deque()          # (until, lane): tainted lanes, collected
        self._next_id = 1
        self._free_lanes = list(range(self.lanes))
        self._dead_cpu = 0.0
        self.batches = self.blocks_in_workers = self.blocks_inline = self.restarts = 0
        self.blocks_fetched = self.blocks_taken_over = 0
        self.nodes_sealed = self.nodes_in_workers = 0
        self._node_jobs: set[int] = set()       # seal_blocks' jobs, unanswered

    # ------------------------------------------------------------------ buffers
    def plaintext(self, i: int) -> memoryview:
        """Plaintext segment buffer i (below SEAL_DEPTH), which the pending batch fills
        in place."""
        view = self.mem[self.plain[i]:self.plain[i] + SEGMENT_BLOCKS * BLOCK]
        self._region.views.append(view)     # released at close, so the mapping can go
        return view

    # ------------------------------------------------------------------ sealing
    def seal_start(self, buf: int, slots: list[int]) -> "SealJob":
        """Starts sealing `slots` of plaintext buffer `buf` under fresh keys: split over
        the workers (or done here for a few blocks), in the next seal area. The buffer
        must stay unchanged until the job's result() returns; at most SEAL_DEPTH - 1
        seals may be in flight, their results taken in the order they started."""
        n, kb, mem = len(slots), self.kb, self.mem
        step = kb + NONCE
        area = self.seal_areas[self._sealing]
        self._sealing = (self._sealing + 1) % SEAL_DEPTH
        mem[area.mat:area.mat + n * step] = crypto.random_bytes(n * step)
        mem[area.slots:area.slots + n * 2] = array("H", slots).tobytes()
        spec = (OP_SEAL, kb, step, 0, 0, n, self.plain[buf], area.out, area.mat, area.tags,
                area.slots, 0)
        if n < MIN_SEAL_BLOCKS:
            self._inline(spec)
            return SealJob(self, n, [], area)
        # In chunks, each with a claim byte: at result() this thread seals the chunks no
        # worker has started yet instead of waiting for them (work taken from the back).
        claims = area.claims
        mem[claims:claims + SEGMENT_BLOCKS // SEAL_CHUNK] = bytes(SEGMENT_BLOCKS // SEAL_CHUNK)
        jobs = []
        for f in range(0, n, SEAL_CHUNK):
            chunk = spec[:4] + (f, min(SEAL_CHUNK, n - f)) + spec[6:11] + (claims + f // SEAL_CHUNK,)
            jobs.append((self._send(chunk), chunk))
        return SealJob(self, n, jobs, area)

    def seal_result(self, n: int, jobs: list[tuple], area: "SealArea"
                    ) -> tuple[bytes, bytes, memoryview]:
        # Rather than wait, this thread seals the chunks no worker has started (from the
        # back). The claim byte is not atomic across processes: a worker may seal the
        # same chunk too. Both give the same bytes, but each reads a block's tag back from
        # where the next block's ciphertext goes, so only one may write the region: this
        # thread seals into its own buffers and copies them in once every reply is in.
        mem, step, own = self.mem, self.kb + NONCE, []
        for jid, spec in reversed(jobs) if TAKE_OVER else ():
            claim, first, count = spec[11], spec[4], spec[5]
            with self._cv:          # a job redone after its worker died is claimed too
                if mem[claim] or jid not in self._specs:
                    continue
                mem[claim] = 1
            ct, tg = memoryview(bytearray(count * BLOCK)), memoryview(bytearray(count * TAG))
            self._cipher.seal_into(mem, self.kb, step, first, count, spec[6], spec[8],
                                   spec[10], ct, tg)
            own.append((first, count, ct, tg))
            with self._cv:
                if jid in self._specs:      # else its worker died meanwhile: redone, counted
                    self.blocks_inline += count
                    self._taken.add(jid)
                    self.blocks_in_workers -= count
                    self.blocks_taken_over += count
        self._wait([jid for jid, _spec in jobs])
        with self._cv:
            self._taken.difference_update(jid for jid, _spec in jobs)
        out, tags, mat = area.out, area.tags, area.mat
        for first, count, ct, tg in own:
            mem[out + first * BLOCK:out + (first + count) * BLOCK] = ct
            mem[tags + first * TAG:tags + (first + count) * TAG] = tg
        material = bytes(mem[mat:mat + n * step])
        mem[mat:mat + n * step] = bytes(n * step)
        return material, bytes(mem[tags:tags + n * TAG]), mem[out:out + n * BLOCK]

    def seal_blocks(self, plain: memoryview, n: int) -> tuple[bytes, bytes, bytearray]:
        """Seals n consecutive 4 KiB blocks of `plain` under fresh keys (BIT nodes), as
        crypto.seal_blocks would: (key || nonce material, tags, ciphertext). The workers
        take whole lanes from the front, as many as are free, for their share; this
        thread seals the rest meanwhile, then collects theirs."""
        kb, step, mem = self.kb, self.kb + NONCE, self.mem
        material = crypto.random_bytes(n * step)
        out, tags = bytearray(n * BLOCK + TAG), bytearray(n * TAG)
        share, first, sent = n * self.size // (self.size + 1), 0, []
        try:
            while first < share:
                lane = self.take_lane()
                if lane is None:
                    break
                count = min(LANE_BLOCKS, share - first)
                mat, src = self._lane_at[lane]
                mem[mat:mat + count * step] = material[first * step:(first + count) * step]
                mem[mat + _LANE_SLOTS:mat + _LANE_SLOTS + count * 2] = _IDENTITY[:count * 2]
                mem[src:src + count * BLOCK] = plain[first * BLOCK:(first + count) * BLOCK]
                try:
                    jid = self._send((OP_SEAL, kb, step, 0, 0, count, src,
                                      src + LANE_BLOCKS * BLOCK, mat, mat + _LANE_TAGS,
                                      mat + _LANE_SLOTS, 0), nodes=True)
                except BaseException:
                    self.release_lane(lane, count)
                    raise
                sent.append((lane, first, count, jid))
                first += count
            crypto.seal_blocks(material, kb, plain, range(first, n),
                               memoryview(out)[first * BLOCK:], tags, first)
            self.count_nodes(n - first)
            while sent:
                lane, f, count, jid = sent[0]
                self.wait_any([jid])
                mat, src = self._lane_at[lane]
                ct = src + LANE_BLOCKS * BLOCK
                out[f * BLOCK:(f + count) * BLOCK] = mem[ct:ct + count * BLOCK]
                tags[f * TAG:(f + count) * TAG] = mem[mat + _LANE_TAGS:mat + _LANE_TAGS + count * TAG]
                mem[src:src + count * BLOCK] = bytes(count * BLOCK)    # leaves hold keys
                self.release_lane(lane, count)
                sent.pop(0)
        finally:
            # A job not collected (an error while waiting) keeps its lane: its worker
            # may still write there. Its keys are zeroed all the same.
            for lane, _f, count, _jid in sent:
                mat, _src = self._lane_at[lane]
                mem[mat:mat + count * step] = bytes(count * step)
        return material, bytes(tags), out

    # ------------------------------------------------------------------ opening
    def open_start(self, values: list[bytes], key_at: int, raws: list,
                   dsts: list) -> "OpenJob":
        """Starts verifying and decrypting blocks: block j's record value is values[j]
        (its key at key_at, then nonce and tag), its ciphertext the j-th 4 KiB of the
        concatenated `raws`, its plaintext goes to dsts[j]. Jobs of up to LANE_BLOCKS
        blocks go to the workers now (as many as free lanes allow), the rest when
        result() is called."""
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
                           0, out + LANE_BLOCKS * BLOCK, 0))

    def collect_open(self, lane: int, dsts: list, first: int, count: int) -> list[int]:
        mem = self.mem
        _mat, src = self._lane_at[lane]
        out = src + LANE_BLOCKS * BLOCK
        status = bytes(mem[out + LANE_BLOCKS * BLOCK:out + LANE_BLOCKS * BLOCK + count])
        for j, dst in enumerate(dsts[first:first + count]):
            dst[:] = mem[out + j * BLOCK:out + (j + 1) * BLOCK]
        self.release_lane(lane, count)
        if not status.count(1):
            return []
        return [first + j for j, bad in enumerate(status) if bad]

    # ------------------------------------------------------------------ fetching
    def fetch_start(self, records, key_at: int) -> "FetchJob":
        """Starts reading and verifying blocks in the workers: block j's index record is
        records[j] (a record array: its HBA says where the ciphertext is; key, nonce and
        tag from key_at on). The caller has made sure every write to those blocks is on
        the device (FileDevice.settle) and that none is overwritten before the reads are
        done (FileDevice.fence_writes with wait_fetches, which also has the reads of a
        job's chunks not sent yet done at once)."""
        return FetchJob(self, records, key_at)

    def send_fetch(self, lane: int, records, key_at: int, first: int, count: int) -> int:
        mat, src = self._lane_at[lane]
        raw = records[first:first + count].tobytes()
        self.mem[mat:mat + len(raw)] = raw
        out = src + LANE_BLOCKS * BLOCK
        return self._send((OP_FETCH, self.kb, records.itemsize, key_at, 0, count, src, out,
                           mat, 0, out + LANE_BLOCKS * BLOCK, 0), fetch=True)

    def collect_fetch(self, lane: int, count: int, consume) -> None:
        """Hands the lane's plaintext and statuses to consume(plain, status), then frees
        the lane (its records zeroed: they hold the blocks' keys)."""
        _mat, src = self._lane_at[lane]
        out = src + LANE_BLOCKS * BLOCK
        status = out + LANE_BLOCKS * BLOCK
        try:
            consume(self.mem[out:out + count * BLOCK], bytes(self.mem[status:status + count]))
        finally:
            self.release_lane(lane, count)

    def release_lane(self, lane: int, count: int) -> None:
        """Frees a lane whose job is answered without collecting it (its records zeroed)."""
        mat, _src = self._lane_at[lane]
        self.mem[mat:mat + count * VALUE_MAX] = bytes(count * VALUE_MAX)
        self._free_lane(lane)

    def _free_lane(self, lane: int) -> None:
        with self._cv:
            if lane in self._tainted:
                self._tainted.discard(lane)
                self._resting.append((time.monotonic() + QUARANTINE_SECONDS, lane))
            else:
                self._free_lanes.append(lane)
            self._cv.notify_all()

    def wait_fetches(self) -> None:
        """What a write to the data device waits for, so that no block is overwritten
        while, or before, a started read reads it: the chunks of fetch jobs not sent yet
        are read now, in this thread (FetchJob.move_out), then the workers' reads in
        flight are waited for."""
        with self._cv:
            held = list(self._held)
        for job in held:
            job.move_out()
        if self._fetching:
            self._wait_until(lambda: not self._fetching)

    def hold(self, job: "FetchJob", held: bool) -> None:
        """Registers (or not) a fetch job with chunks not sent yet, for wait_fetches."""
        with self._cv:
            (self._held.add if held else self._held.discard)(job)

    def read_chunk(self, records, key_at: int, first: int, count: int) -> tuple:
        """A fetch chunk's reads, done now in this thread into a scratch mapping of its
        own (the same reader code as a worker's); open_chunk verifies it later."""
        stride = records.itemsize
        src = _align(count * stride)
        out, status = src + count * BLOCK, src + 2 * count * BLOCK
        scratch = mmap.mmap(-1, status + count)
        mem = memoryview(scratch)
        mem[:count * stride] = records[first:first + count].tobytes()
        spec = (0, OP_FETCH, self.kb, stride, key_at, 0, count, src, out, 0, 0, status, 0)
        return scratch, mem, spec, self._cipher.read(mem, spec)

    def open_chunk(self, chunk: tuple, consume) -> None:
        """Verifies a chunk read_chunk read and hands it to consume(plain, status); the
        scratch mapping, its keys zeroed, is released."""
        _scratch, mem, spec, unread = chunk
        count, out, status = spec[6], spec[8], spec[11]
        try:
            self._cipher.opened(mem, spec, unread)
            self.count_inline(count)
            consume(mem[out:out + count * BLOCK], bytes(mem[status:status + count]))
        finally:
            _discard(chunk)

    def _refetch(self, spec: tuple) -> int:
        """A dead worker's fetch job, redone in this thread (called with the lock held) in
        a scratch mapping, not in its lane, where the dead worker's reads may still land:
        the same reads and cipher code; then its plaintext and statuses are copied into
        the lane, which rests once collected (QUARANTINE_SECONDS). Returns the failures."""
        _op, kb, stride, key_at, _f, count, src, out, mat, _t, status, _c = spec
        s_src = _align(count * stride)
        s_out, s_status = s_src + count * BLOCK, s_src + 2 * count * BLOCK
        with mmap.mmap(-1, s_status + count) as scratch:
            mem = memoryview(scratch)
            try:
                mem[:count * stride] = self.mem[mat:mat + count * stride]
                failed = self._cipher.fetch(mem, (0, OP_FETCH, kb, stride, key_at, 0, count,
                                                  s_src, s_out, 0, 0, s_status, 0))
                self.mem[out:out + count * BLOCK] = mem[s_out:s_out + count * BLOCK]
                self.mem[status:status + count] = mem[s_status:s_status + count]
                mem[:count * stride] = bytes(count * stride)
            finally:
                mem.release()
        self.blocks_inline += count
        self._tainted.add(next(i for i, (_m, s) in enumerate(self._lane_at) if s == src))
        return failed

    def take_lane(self) -> int | None:
        """A free lane, or None: a job never waits for one (the lanes may all be held by
        jobs whose result() this thread has yet to call)."""
        with self._cv:
            if self._resting and self._resting[0][0] <= time.monotonic():
                self._free_lanes.append(self._resting.popleft()[1])
            return self._free_lanes.pop() if self._free_lanes else None

    # ------------------------------------------------------------------ jobs
    def count_inline(self, n: int) -> None:
        with self._cv:
            self.blocks_inline += n

    def count_nodes(self, n: int) -> None:
        """n BIT nodes sealed in a calling thread."""
        with self._cv:
            self.nodes_sealed += n

    def _inline(self, spec: tuple) -> int:
        """A job done in this thread (its claim byte ignored: a worker that died may have
        set it)."""
        self.count_inline(spec[5])
        return self._cipher.run(self.mem, (0,) + spec[:11] + (0,))

    def _send(self, spec: tuple, fetch: bool = False, nodes: bool = False) -> int:
        """Sends a job (JOB fields without the id) to the least busy worker; its id.
        `nodes`: a seal of BIT nodes (seal_blocks), counted apart from data blocks."""
        with self._cv:
            self._start_locked()        # may raise (no worker could start): nothing is held
            jid = self._next_id
            self._next_id = jid % 0xFFFFFFFF + 1
            self._specs[jid] = spec
            if fetch:
                self._fetching.add(jid)
                self.blocks_fetched += spec[5]
            w = min(self._workers, key=lambda w: len(w.jobs))
            w.jobs.add(jid)
            self.batches += 1
            if nodes:
                self._node_jobs.add(jid)
                self.nodes_sealed += spec[5]
                self.nodes_in_workers += spec[5]
            else:
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
        """Waits until one of `jobs` is answered (or redone here); returns it."""
        def answered():
            for j in jobs:
                if j in self._done:
                    del self._done[j]
                    return j
            return None
        return self._wait_until(answered)

    def _wait_until(self, done):
        """Waits until done() (called with the lock held) returns something other than
        None or False; returns that. Any thread may read the sockets for everyone: the
        others are woken to look."""
        with self._cv:
            while True:
                got = done()
                if got is not None and got is not False:
                    return got
                if self._polling:
                    self._cv.wait()
                    continue
                socks = {w.sock.fileno(): w for w in self._workers if w.jobs}
                if not socks:           # a bookkeeping slip: fail rather than hang
                    raise OSError(errno.EIO, "crypto pool: waiting for a job no worker holds")
                self._polling = True
                self._cv.release()
                try:
                    ready = select.poll()
                    for fd in socks:
                        ready.register(fd, select.POLLIN)
                    events = ready.poll()
                finally:
                    self._cv.acquire()
                    self._polling = False
                try:
                    for fd, _ev in events:
                        self._receive(socks[fd])
                finally:
                    self._cv.notify_all()       # answers may be in, whatever else happened

    def _receive(self, w: "_Worker") -> None:
        """Takes one reply from w, or replaces w if it died (called with the lock held)."""
        if w not in self._workers:      # replaced meanwhile (by a failed send)
            return
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
        self._fetching.discard(jid)
        self._node_jobs.discard(jid)
        self._done[jid] = failed

    def _replace(self, w: "_Worker") -> None:
        """w died: redo its jobs here (their inputs are still in the region), start a
        replacement (called with the lock held)."""
        self._dead_cpu += w.stop()
        self.restarts += 1
        for jid in sorted(w.jobs):
            spec = self._specs.pop(jid)
            if jid in self._taken:              # this thread sealed it already
                self._done[jid] = 0
                continue
            if spec[0] == OP_SEAL and spec[11]:
                self.mem[spec[11]] = 1          # claimed: the thread does not seal it again
            if jid in self._node_jobs:
                self._node_jobs.discard(jid)
                self.nodes_in_workers -= spec[5]
                self._done[jid] = self._cipher.run(self.mem, (0,) + spec[:11] + (0,))
                continue
            self.blocks_in_workers -= spec[5]
            if spec[0] == OP_FETCH:
                self.blocks_fetched -= spec[5]
                self._done[jid] = self._refetch(spec)
            else:
                self._done[jid] = self._inline(spec)
            self._fetching.discard(jid)
        w.jobs.clear()
        # Out of the list first: if no replacement can start now, the next job starts one
        # (_start_locked, which raises to that job's caller) rather than meet the dead one.
        # Not raised here: the jobs just redone are answered, and their waiters (and a
        # stats() call) must hear so.
        self._workers.remove(w)
        try:
            self._workers += self._spawner.workers(1)
        except OSError:
            pass

    # ------------------------------------------------------------------ life
    def stats(self) -> CryptoStats:
        """The pool's figures; a worker that died while idle (nothing to redo) is noticed
        and replaced here too, not only at its next job."""
        with self._cv:
            dead = [w for w in self._workers if w.exited()]
            for w in dead:
                self._replace(w)
            if dead:
                self._cv.notify_all()           # jobs it held may have been redone here
            return self._stats_locked()

    def _stats_locked(self) -> CryptoStats:
        live = sum(w.cpu_ns for w in self._workers) / 1e9
        return CryptoStats(workers=self.size, worker_pids=self.pids(), batches=self.batches,
                           blocks_in_workers=self.blocks_in_workers,
                           blocks_inline=self.blocks_inline,
                           blocks_fetched=self.blocks_fetched,
                           blocks_taken_over=self.blocks_taken_over,
                           nodes_sealed=self.nodes_sealed,
                           nodes_in_workers=self.nodes_in_workers,
                           worker_restarts=self.restarts,
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
        if len(self._workers) < self.size:
            self._workers += self._spawner.workers(self.size - len(self._workers))

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

    def __init__(self, memfd: int, keys_len: int, data_fd: int):
        self.memfd, self.keys_len, self.data_fd = memfd, keys_len, data_fd
        self.requests: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None

    def workers(self, n: int) -> list[_Worker]:
        """n workers that have the region (see _start_workers), or the error."""
        if self.thread is None:
            self.thread = threading.Thread(target=_spawn_loop, name="sworndisk-crypto-spawner",
                                           args=(self.requests, self.memfd, self.keys_len,
                                                 self.data_fd),
                                           daemon=True)
            self.thread.start()
        reply: queue.Queue = queue.Queue(1)
        self.requests.put((reply, n))
        got = reply.get()
        if isinstance(got, BaseException):
            raise got
        return got

    def stop(self) -> None:
        if self.thread is not None:
            self.requests.put(None)
            self.thread.join()
            self.thread = None


def _spawn_loop(requests: queue.Queue, memfd: int, keys_len: int, data_fd: int) -> None:
    while True:
        request = requests.get()
        if request is None:
            return
        reply, n = request
        try:
            reply.put(_start_workers(n, memfd, keys_len, data_fd))
        except BaseException as e:      # noqa: BLE001 - raised in the asking thread
            reply.put(e)


def _start_workers(n: int, memfd: int, keys_len: int, data_fd: int,
                   attempts: int = 3) -> list[_Worker]:
    """n workers that have the region, all started before any is waited for, so that
    their start-ups overlap (eight one after another took 0.33 s). One that dies during
    its start-up (killed, say) is started again, in up to `attempts` rounds; one refused
    the region (EPERM) ends it. On any error, every worker started here is stopped."""
    done: list[_Worker] = []
    pending: list[_Worker] = []
    try:
        failure: OSError | None = None
        for _attempt in range(attempts):
            while len(done) + len(pending) < n:
                pending.append(_Worker(keys_len))
            failure = None
            while pending:
                w = pending.pop(0)
                try:
                    w.share(memfd, data_fd)         # stops w if it fails
                except OSError as e:
                    if e.errno == errno.EPERM:
                        raise
                    failure = e
                else:
                    done.append(w)
            if failure is None:
                return done
        assert failure is not None
        raise failure
    except BaseException:
        for w in done + pending:
            w.stop()
        raise


class _LaneJob:
    """Work in chunks of up to `per` blocks, each sent to a free lane of the pool (as
    many at once as lanes are free) or, when none is, done in the calling thread: a job
    never waits for a lane, since they may all be held by jobs whose result() this very
    thread has yet to call."""

    def __init__(self, pool: CryptoPool, n: int, per: int = LANE_BLOCKS):
        self.pool = pool
        self.chunks = deque((f, min(per, n - f)) for f in range(0, n, per))
        self.inflight: dict[int, tuple] = {}
        self._send()

    def _send(self) -> None:
        while self.chunks:
            lane = self.pool.take_lane()
            if lane is None:
                return
            first, count = self.chunks.popleft()
            try:
                jid = self._post(lane, first, count)
            except BaseException:
                self.chunks.appendleft((first, count))
                self.pool.release_lane(lane, count)
                raise
            self.inflight[jid] = (lane, first, count)

    def _finish(self) -> None:
        """Sends, waits for and collects chunks until every one is done. If collecting
        raises, the chunks still in flight are waited for and their lanes freed (their
        key material zeroed) before the error goes on."""
        try:
            while self.chunks or self.inflight:
                self._send()
                if not self.inflight:               # no lane free: this thread does one
                    self._one_here()
                    continue
                jid = self.pool.wait_any(list(self.inflight))
                self._collect(*self.inflight.pop(jid))
        except BaseException:
            self._abandon()
            for jid, (lane, _first, count) in list(self.inflight.items()):
                self.pool.wait_any([jid])
                self.pool.release_lane(lane, count)
            self.inflight.clear()
            raise

    def _one_here(self) -> None:
        self._here(*self.chunks.popleft())

    def _abandon(self) -> None:
        """The chunks not sent yet are dropped (result() is failing)."""
        self.chunks.clear()

    def _post(self, lane: int, first: int, count: int) -> int:
        """Sends a chunk on `lane`; its job id."""
        raise NotImplementedError

    def _collect(self, lane: int, first: int, count: int) -> None:
        raise NotImplementedError

    def _here(self, first: int, count: int) -> None:
        raise NotImplementedError


class OpenJob(_LaneJob):
    """Blocks being verified by the pool (CryptoPool.open_start); result() finishes."""

    def __init__(self, pool: CryptoPool, values: list[bytes], key_at: int, raws: list,
                 dsts: list):
        self.values, self.key_at, self.dsts = values, key_at, dsts
        self.ct = joined(raws)
        self.failed: list[int] = []
        super().__init__(pool, len(values), min(LANE_BLOCKS, -(-len(values) // pool.size)))

    def _post(self, lane: int, first: int, count: int) -> int:
        return self.pool.send_open(lane, self.values, self.key_at, self.ct, first, count)

    def _collect(self, lane: int, first: int, count: int) -> None:
        self.failed += self.pool.collect_open(lane, self.dsts, first, count)

    def _here(self, first: int, count: int) -> None:
        self.failed += [first + j for j in open_inline(
            self.values[first:first + count], self.key_at, self.pool.kb,
            self.ct[first * BLOCK:], self.dsts[first:first + count])]
        self.pool.count_inline(count)

    def result(self) -> list[int]:
        """The positions j that failed authentication (their dsts hold nothing meaningful)."""
        self._finish()
        return sorted(self.failed)


class FetchJob(_LaneJob):
    """Blocks being read and verified by the workers (CryptoPool.fetch_start), in chunks
    sent as lanes free up. A chunk not sent yet has not been read: under the job's lock
    it is either sent (its reads then count in the pool's fetches in flight), read here
    by result() when no lane is free, or read at once by a writer's fence (move_out),
    whichever comes first, so no write lands before a started read has read."""

    def __init__(self, pool: CryptoPool, records, key_at: int):
        self.records, self.key_at = records, key_at
        self.consume = None
        self._lock = threading.RLock()
        self._moved: list[tuple] = []           # (first, read_chunk's result)
        self._registered = False                # in the pool's held jobs (pool.hold)
        with self._lock:                        # (a fence may come before __init__ ends)
            super().__init__(pool, len(records))
            self._hold(bool(self.chunks))

    def _hold(self, held: bool) -> None:
        """pool.hold, where that changes anything (called with the job's lock held)."""
        if held != self._registered:
            self._registered = held
            self.pool.hold(self, held)

    def _send(self) -> None:
        with self._lock:
            super()._send()
            if not self.chunks:
                self._hold(False)

    def _one_here(self) -> None:
        with self._lock:
            if not self.chunks:                 # moved out by a fence meanwhile
                return
            first, count = self.chunks.popleft()
            chunk = self.pool.read_chunk(self.records, self.key_at, first, count)
            if not self.chunks:
                self._hold(False)
        self._open(first, chunk)

    def move_out(self) -> None:
        """Reads every chunk not sent yet, now (a writer's fence)."""
        with self._lock:
            while self.chunks:
                first, count = self.chunks.popleft()
                self._moved.append((first, self.pool.read_chunk(self.records, self.key_at,
                                                                first, count)))
            self._hold(False)

    def _open(self, first: int, chunk: tuple) -> None:
        self.pool.open_chunk(chunk, lambda plain, status: self.consume(first, plain, status))

    def _abandon(self) -> None:
        with self._lock:
            self.chunks.clear()
            self._hold(False)
            moved, self._moved = self._moved, []
        for _first, chunk in moved:
            _discard(chunk)

    def _post(self, lane: int, first: int, count: int) -> int:
        return self.pool.send_fetch(lane, self.records, self.key_at, first, count)

    def _collect(self, lane: int, first: int, count: int) -> None:
        self.pool.collect_fetch(lane, count,
                                lambda plain, status: self.consume(first, plain, status))

    def result(self, consume) -> None:
        """Calls consume(first, plain, status) for each chunk as it is done: the
        plaintext of blocks first.. (a view, valid during the call) and a status byte per
        block (0 good, AUTH_FAILED, IO_FAILED: the read failed)."""
        self.consume = consume
        try:
            self._finish()
            while True:                         # the chunks a fence moved out
                with self._lock:
                    if not self._moved:
                        break
                    first, chunk = self._moved.pop()
                self._open(first, chunk)
        except BaseException:
            self._abandon()
            raise
        finally:
            self.consume = None     # no cycle through the caller's results (32 MiB at depth)


def _discard(chunk: tuple) -> None:
    """A chunk read_chunk read that will not be opened: its keys zeroed, its mapping gone."""
    scratch, mem, spec, _unread = chunk
    mem[:spec[7]] = bytes(spec[7])
    mem.release()
    scratch.close()


@dataclass(frozen=True)
class SealArea:
    """Where one segment's seal lives in the region: its ciphertext (`out`), key ||
    nonce material (`mat`, among the locked key pages), tags, u16 buffer slots and the
    claim byte of each chunk."""
    out: int
    mat: int
    tags: int
    slots: int
    claims: int


class SealJob:
    """A segment being sealed; result() waits for it."""

    def __init__(self, pool: CryptoPool, n: int, jobs: list[int], area: SealArea):
        self.pool, self.n, self.jobs, self.area = pool, n, jobs, area

    def result(self) -> tuple[bytes, bytes, memoryview]:
        """(key/nonce material, tags, ciphertext view) of the n sealed blocks; the
        region's copy of the keys is zeroed. The ciphertext stays unchanged until its
        area's next seal, SEAL_DEPTH seals later."""
        return self.pool.seal_result(self.n, self.jobs, self.area)



def joined(raws: list) -> memoryview:
    """The ciphertext runs of a read batch as one buffer (no copy for a single run)."""
    return memoryview(raws[0] if len(raws) == 1 else b"".join(raws))


def open_inline(values: list[bytes], key_at: int, kb: int, ct: memoryview,
                dsts: list) -> list[int]:
    """open_start's work in this thread, for the first len(values) blocks."""
    n, t = key_at + kb, key_at + kb + NONCE
    return crypto.open_blocks([(v[key_at:n], v[n:t], v[t:t + TAG], ct[j * BLOCK:(j + 1) * BLOCK],
                                dst) for j, (v, dst) in enumerate(zip(values, dsts))])
