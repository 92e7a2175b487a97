"""A crypto worker process: seals and opens 4 KiB blocks in shared memory for its pool.

Started by `cryptopool.CryptoPool` as `python -I .../cryptoworker.py SOCK KEYS PARENT` (exec,
not a fork of the threaded engine; the file, not the package), it imports only the standard
library, `cryptography` and, to read the data device, `ublk_shim.uring`. It first makes
itself die with its parent (PR_SET_PDEATHSIG, then a getppid() check for the race) and
non-dumpable, and says so (READY). Only then does the pool send it the region (an anonymous
memfd holding plaintext and keys) and the data device's descriptor, over the socket: a
process is dumpable from its exec until its prctl, and in that window another process of
the same user could open its descriptors through /proc. The worker maps the region, locks
its key pages in memory where RLIMIT_MEMLOCK allows, and sends its hello. Then it answers
jobs, one SOCK_SEQPACKET message each (docs/modules.md, "Crypto workers"): a job names
places in the region, the worker does the cipher work there and replies with the job's
id, how many blocks failed and its own CPU time so far.

The job functions are also what the pool runs in its own thread when a job must be
redone (its worker died) or is too small to send: same code, same bytes.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time

# Job: id, op, key bytes, material stride and key offset in it, first block, count, then
# offsets in the region of the blocks' input, output, material, tags and aux. Seal: key ||
# nonce per block, tags out, aux a u16 buffer slot per block. Open: each material entry is
# a record value (key at the offset, then nonce and tag), aux a u8 status per block (1 =
# failed). Fetch: as open, but each material entry is a whole index record (its HBA at
# RECORD_HBA, its key at the key offset) and the worker first reads the ciphertext from the
# data device into the input place, runs of consecutive HBAs as one read; a block whose
# read failed gets status IO_FAILED. Last, a seal job's claim byte (0: none): the worker
# sets it before sealing and skips the job if it is set already, as it is when the engine's
# thread, rather than wait, sealed that chunk itself (into its own buffer, copied in once
# every reply is in: both seals give the same bytes, and only one writes the region).
# Reply: job id, failures, worker CPU nanoseconds.
JOB = struct.Struct("<IBBHHxxII6Q")
REPLY = struct.Struct("<IIQ")
READY = struct.Struct("<ii")        # pid, PR_GET_DUMPABLE: hardened, asks for the region
HELLO = struct.Struct("<iiiQ")      # pid, PR_GET_DUMPABLE, key pages locked (1/0), CPU ns
OP_SEAL, OP_OPEN, OP_FETCH = 1, 2, 3
NONCE, TAG, BLOCK = 12, 16, 4096
AUTH_FAILED, IO_FAILED = 1, 2       # a block's status after open or fetch (0: good)
RECORD_HBA = 8                      # offset of the HBA in an index record (records.py)
MAX_RUN = 256                       # blocks of one device read (1 MiB)
_HBA = struct.Struct("<Q")

PR_SET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_DUMPABLE = 1, 3, 4


class Cipher:
    """AES-GCM over the region with `cryptography`, the engine's default backend; reads
    for fetch jobs from `data_fd` (-1: none)."""

    def __init__(self, data_fd: int = -1):
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        self.aesgcm, self.invalid = AESGCM, InvalidTag
        self.data_fd = data_fd

    def seal(self, mem: memoryview, kb: int, mstride: int, moff: int, first: int, count: int,
             src: int, out: int, mat: int, tags: int, aux: int, claim: int = 0) -> int:
        """Encrypts blocks first..first+count: block j is buffer slot aux[j] of `src`, its
        ciphertext goes to out + j*4096 and its tag to tags + j*16. Nothing is done if the
        claim byte is set."""
        if claim:
            if mem[claim]:
                return 0
            mem[claim] = 1
        self.seal_into(mem, kb, mstride, first, count, src, mat, aux,
                       mem[out + first * BLOCK:out + (first + count) * BLOCK],
                       mem[tags + first * TAG:tags + (first + count) * TAG])
        return 0

    def seal_into(self, mem: memoryview, kb: int, mstride: int, first: int, count: int,
                  src: int, mat: int, aux: int, ct: memoryview, tg: memoryview) -> None:
        """seal's work with its output in `ct` (count blocks) and `tg` (count tags), which
        the caller may keep private. Each block's tag spills over the next block's place
        and is read back from there, so nothing else may write `ct` meanwhile; the last
        block goes through a scratch buffer, so nothing is written past `ct`."""
        if not count:
            return
        aesgcm = self.aesgcm
        slots = mem[aux:aux + (first + count) * 2].cast("H")
        scratch = memoryview(bytearray(BLOCK + TAG))
        for i in range(count):
            s = src + slots[first + i] * BLOCK
            m = mat + (first + i) * mstride
            dst = scratch if i == count - 1 else ct[i * BLOCK:(i + 1) * BLOCK + TAG]
            aesgcm(mem[m:m + kb]).encrypt_into(mem[m + kb:m + mstride], mem[s:s + BLOCK],
                                               None, dst)
            tg[i * TAG:(i + 1) * TAG] = dst[BLOCK:]
        ct[(count - 1) * BLOCK:] = scratch[:BLOCK]

    def open(self, mem: memoryview, kb: int, mstride: int, moff: int, first: int, count: int,
             src: int, out: int, mat: int, tags: int, aux: int, _claim: int = 0) -> int:
        """Decrypts and verifies blocks first..first+count (ciphertext at src + j*4096,
        record value at mat + j*mstride, plaintext to out + j*4096); a failed block gets
        status 1 at aux + j and nothing meaningful in its output. Returns how many failed."""
        aesgcm, invalid, failed = self.aesgcm, self.invalid, 0
        for j in range(first, first + count):
            k = mat + j * mstride + moff
            n = k + kb
            s = src + j * BLOCK
            o = out + j * BLOCK
            try:
                aesgcm(mem[k:n]).decrypt_into(mem[n:n + NONCE],
                                              b"".join((mem[s:s + BLOCK], mem[n + NONCE:n + NONCE + TAG])),
                                              None, mem[o:o + BLOCK])
                mem[aux + j] = 0
            except invalid:
                mem[aux + j] = AUTH_FAILED
                failed += 1
        return failed

    @staticmethod
    def runs(mem: memoryview, mstride: int, first: int, count: int, mat: int) -> list:
        """A fetch job's device reads: [first block, blocks, HBA] per run of consecutive
        HBAs (in job order, at most MAX_RUN blocks each)."""
        out: list = []
        last = None
        for j in range(first, first + count):
            hba = _HBA.unpack_from(mem, mat + j * mstride + RECORD_HBA)[0]
            if last is not None and hba == last[2] + last[1] and last[1] < MAX_RUN:
                last[1] += 1
            else:
                last = [j, 1, hba]
                out.append(last)
        return out

    def opened(self, mem: memoryview, job: tuple, unread: list) -> int:
        """A fetch job after its reads: every block opened, then those of the `unread`
        runs marked IO_FAILED. Returns how many blocks failed."""
        _jid, _op, kb, mstride, moff, first, count, src, out, mat, _tags, aux, _claim = job
        self.open(mem, kb, mstride, moff, first, count, src, out, mat, 0, aux)
        for j, n, _hba in unread:
            mem[aux + j:aux + j + n] = bytes([IO_FAILED]) * n
        return count - bytes(mem[aux + first:aux + first + count]).count(0)

    def fetch(self, mem: memoryview, job: tuple) -> int:
        """A fetch job done here, one synchronous read per run (the pool's own thread, for
        a job its worker died with; the worker has an io_uring of its own)."""
        return self.opened(mem, job, self.read(mem, job))

    def read(self, mem: memoryview, job: tuple) -> list:
        """A fetch job's reads, done here: the runs that could not be read whole."""
        _jid, _op, _kb, mstride, _moff, first, count, src, _out, mat, _tags, _aux, _claim = job
        unread = []
        for run in self.runs(mem, mstride, first, count, mat):
            j, n, hba = run
            try:
                ok = os.preadv(self.data_fd, [mem[src + j * BLOCK:src + (j + n) * BLOCK]],
                               hba * BLOCK) == n * BLOCK
            except OSError:
                ok = False
            if not ok:
                unread.append(run)
        return unread

    def run(self, mem: memoryview, job: tuple) -> int:
        """One job (JOB's fields); returns how many blocks failed."""
        if job[1] == OP_FETCH:
            return self.fetch(mem, job)
        fn = self.seal if job[1] == OP_SEAL else self.open
        return fn(mem, *job[2:])


class Fetches:
    """The worker's fetch jobs in flight: their reads on one io_uring, a job opened as
    soon as all its reads completed, so that one job's reads overlap another's decryption
    (one open() call per job: per-block calls cost more than the overlap within a job)."""

    RING = 512
    ADMIT = RING // 2           # runs in flight above which no new job is taken

    def __init__(self, cipher: Cipher, region: mmap.mmap, mem: memoryview):
        from ublk_shim.sys import IORING_OP_READ, IORING_OP_READ_FIXED, SQE_RW
        from ublk_shim.uring import Ring, buffer_address
        self.ring = Ring(self.RING)
        self.cipher, self.mem, self.base = cipher, mem, buffer_address(region)
        self.sqe = SQE_RW
        # The region as a fixed buffer: its pages pinned once (and so never swapped),
        # not at every read; where RLIMIT_MEMLOCK refuses, plain reads.
        try:
            self.ring.register_buffer(region)
            self.op_read = IORING_OP_READ_FIXED
        except OSError:
            self.op_read = IORING_OP_READ
        self.jobs: dict[int, list] = {}     # job id -> [job, runs left, failed runs]
        self.reads: dict[int, tuple] = {}   # user_data -> (job id, run)
        self._next = 0

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    @property
    def room(self) -> bool:
        return len(self.reads) < self.ADMIT

    def start(self, job: tuple) -> None:
        """Submits the job's reads."""
        runs = self.cipher.runs(self.mem, job[3], job[5], job[6], job[9])
        self.jobs[job[0]] = [job, len(runs), []]
        rows = []
        fd, src = self.cipher.data_fd, self.base + job[7]
        for run in runs:
            j, n, hba = run
            self._next += 1
            self.reads[self._next] = (job[0], run)
            # opcode, flags, ioprio, fd, off, addr, len, op_flags, user_data, buf_index,
            # personality, splice_fd_in
            rows.append((self.op_read, 0, 0, fd, hba * BLOCK, src + j * BLOCK, n * BLOCK,
                         0, self._next, 0, 0, 0))
        for i in range(0, len(rows), self.RING):
            self.ring.prep_packed_many(self.sqe, rows[i:i + self.RING])
            self.ring.submit()

    def complete(self, wait: bool) -> list[tuple[int, int]]:
        """Opens the runs whose reads completed (waiting for one if `wait`); returns the
        (job id, failures) of the jobs now done."""
        if wait or self.ring.pending:
            self.ring.submit(1 if wait else 0)
        done = []
        for user_data, res, _flags in self.ring.reap():
            jid, run = self.reads.pop(user_data)
            state = self.jobs[jid]
            if res != run[1] * BLOCK:
                state[2].append(run)
            state[1] -= 1
            if not state[1]:
                del self.jobs[jid]
                done.append((jid, self.cipher.opened(self.mem, state[0], state[2])))
        return done


def _harden(libc, parent: int) -> int:
    """Dies with the parent and is not dumpable, before it holds anything secret; returns
    PR_GET_DUMPABLE (0 expected)."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:          # the parent died before the prctl took effect
        os._exit(1)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    return libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)


def _receive_region(sock: socket.socket) -> tuple[mmap.mmap, int] | None:
    """The region and the data device's descriptor (or -1), which the pool sends in
    answer to READY; None if it sent nothing (it refused, or went away)."""
    _msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 2, socket.MSG_CMSG_CLOEXEC)
    if not fds:
        return None
    try:
        region = mmap.mmap(fds[0], 0)
    finally:
        os.close(fds[0])
    return region, fds[1] if len(fds) > 1 else -1


def _lock_keys(libc, region: mmap.mmap, keys_len: int) -> int:
    """Locks the key pages (the region's first keys_len bytes) in memory where
    RLIMIT_MEMLOCK allows, as cryptsetup locks its keys; 1 if they are."""
    buf = (ctypes.c_char * keys_len).from_buffer(region)
    locked = libc.mlock(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(keys_len)) == 0
    del buf
    return int(locked)


def _fetches(cipher: Cipher, region: mmap.mmap, mem: memoryview) -> Fetches | None:
    """The io_uring for fetch jobs, or None (no data device; io_uring refused: fetch jobs
    are then read synchronously)."""
    if cipher.data_fd < 0:
        return None
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        return Fetches(cipher, region, mem)
    except OSError:
        return None


def serve(sock: socket.socket, cipher: Cipher, mem: memoryview,
          fetches: Fetches | None) -> None:
    """Answers jobs until the pool closes its end. Seal and open jobs are done on
    arrival; fetch jobs are started on arrival and answered as their reads complete,
    while the socket is still watched for the next job."""
    def reply(jid: int, failed: int) -> None:
        sock.send(REPLY.pack(jid, failed, time.process_time_ns()))

    watch = select.poll()
    if fetches is not None:
        watch.register(fetches.ring.fd, select.POLLIN)
    while True:
        if fetches is None or not fetches.busy:
            ready = True                            # nothing in flight: wait for a job
        else:
            for jid, failed in fetches.complete(wait=False):
                reply(jid, failed)
            if not fetches.busy:
                continue
            watching = fetches.room             # else new jobs wait in the socket
            if watching:
                watch.register(sock.fileno(), select.POLLIN)
            # Reads the kernel has not taken yet (it wanted the CQ drained) are submitted
            # again at the next turn: do not sleep on completions that cannot come.
            events = dict(watch.poll(1 if fetches.ring.pending else None))
            if watching:
                watch.unregister(sock.fileno())
            ready = sock.fileno() in events
        if not ready:
            continue
        msg = sock.recv(JOB.size)
        if not msg:
            return
        job = JOB.unpack(msg)
        if job[1] == OP_FETCH and fetches is not None:
            fetches.start(job)
        else:
            reply(job[0], cipher.run(mem, job))


def main(argv: list[str]) -> None:
    sockfd, keys_len, parent = (int(a) for a in argv[1:4])
    libc = ctypes.CDLL(None, use_errno=True)
    dumpable = _harden(libc, parent)
    sock = socket.socket(fileno=sockfd)
    try:
        sock.send(READY.pack(os.getpid(), dumpable))
        got = _receive_region(sock)
        if got is None:
            return
        region, data_fd = got
        locked = _lock_keys(libc, region, keys_len)
        sock.send(HELLO.pack(os.getpid(), dumpable, locked, time.process_time_ns()))
        cipher, mem = Cipher(data_fd), memoryview(region)
        serve(sock, cipher, mem, _fetches(cipher, region, mem))
    except OSError:             # the pool went away: nothing to say to anyone
        pass


if __name__ == "__main__":
    main(sys.argv)
