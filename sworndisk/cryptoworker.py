"""A crypto worker process: seals and opens 4 KiB blocks in shared memory for its pool.

Started by `cryptopool.CryptoPool` as `python -I .../cryptoworker.py MEMFD SOCK KEYS PARENT`
(exec, not a fork of the threaded engine; the file, not the package), it imports only
the standard library and `cryptography`. It first makes itself die with its parent (PR_SET_PDEATHSIG, then a
getppid() check for the race), non-dumpable (the region holds plaintext and keys), and
locks its key pages in memory where RLIMIT_MEMLOCK allows. Then it answers jobs, one
SOCK_SEQPACKET message each (docs/modules.md, "Crypto workers"): a job names places in
the region (`MEMFD`, an anonymous memfd), the worker does the cipher work there and
replies with the job's id, how many blocks failed and its own CPU time so far.

The job functions are also what the pool runs in its own thread when a job must be
redone (its worker died) or is too small to send: same code, same bytes.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import signal
import socket
import struct
import sys
import time

# Job: id, op, key bytes, material stride and key offset in it, first block, count, then
# offsets in the region of the blocks' input, output, material, tags and aux. Seal: key ||
# nonce per block, tags out, aux a u16 buffer slot per block. Open: each material entry is
# a record value (key at the offset, then nonce and tag), aux a u8 status per block (1 =
# failed). Reply: job id, failures, worker CPU nanoseconds.
JOB = struct.Struct("<IBBHHxxII5Q")
REPLY = struct.Struct("<IIQ")
HELLO = struct.Struct("<iiiQ")      # pid, PR_GET_DUMPABLE, key pages locked (1/0), CPU ns
OP_SEAL, OP_OPEN = 1, 2
NONCE, TAG, BLOCK = 12, 16, 4096

PR_SET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_DUMPABLE = 1, 3, 4


class Cipher:
    """AES-GCM over the region with `cryptography`, the engine's default backend."""

    def __init__(self):
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        self.aesgcm, self.invalid = AESGCM, InvalidTag

    def seal(self, mem: memoryview, kb: int, mstride: int, moff: int, first: int, count: int,
             src: int, out: int, mat: int, tags: int, aux: int) -> int:
        """Encrypts blocks first..first+count: block j is buffer slot aux[j] of `src`, its
        ciphertext goes to out + j*4096 and its tag to tags + j*16. The last block goes
        through a scratch buffer so that its tag never spills over a neighbour's place,
        which another worker may be writing."""
        aesgcm, step = self.aesgcm, mstride
        slots = mem[aux:aux + (first + count) * 2].cast("H")
        scratch = memoryview(bytearray(BLOCK + TAG))
        for j in range(first, first + count):
            s = src + slots[j] * BLOCK
            m = mat + j * step
            o = out + j * BLOCK
            dst = scratch if j == first + count - 1 else mem[o:o + BLOCK + TAG]
            aesgcm(mem[m:m + kb]).encrypt_into(mem[m + kb:m + step], mem[s:s + BLOCK],
                                               None, dst)
            mem[tags + j * TAG:tags + (j + 1) * TAG] = dst[BLOCK:]
            if dst is scratch:
                mem[o:o + BLOCK] = scratch[:BLOCK]
        return 0

    def open(self, mem: memoryview, kb: int, mstride: int, moff: int, first: int, count: int,
             src: int, out: int, mat: int, tags: int, aux: int) -> int:
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
                mem[aux + j] = 1
                failed += 1
        return failed

    def run(self, mem: memoryview, job: tuple) -> int:
        """One job (JOB's fields); returns how many blocks failed."""
        fn = self.seal if job[1] == OP_SEAL else self.open
        return fn(mem, *job[2:])


def _harden(libc, region: mmap.mmap, keys_len: int, parent: int) -> tuple[int, int]:
    """Dies with the parent, not dumpable, the key pages (the region's first keys_len
    bytes) locked in memory where RLIMIT_MEMLOCK allows, as cryptsetup locks its keys."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:          # the parent died before the prctl took effect
        os._exit(1)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    dumpable = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    buf = (ctypes.c_char * keys_len).from_buffer(region)
    locked = libc.mlock(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(keys_len)) == 0
    del buf
    return dumpable, int(locked)


def main(argv: list[str]) -> None:
    memfd, sockfd, keys_len, parent = (int(a) for a in argv[1:5])
    libc = ctypes.CDLL(None, use_errno=True)
    region = mmap.mmap(memfd, 0)
    os.close(memfd)
    dumpable, locked = _harden(libc, region, keys_len, parent)
    sock = socket.socket(fileno=sockfd)
    sock.send(HELLO.pack(os.getpid(), dumpable, locked, time.process_time_ns()))
    cipher, mem = Cipher(), memoryview(region)
    try:
        while True:
            msg = sock.recv(64)
            if not msg:
                break
            job = JOB.unpack(msg)
            failed = cipher.run(mem, job)
            sock.send(REPLY.pack(job[0], failed, time.process_time_ns()))
    except OSError:             # the pool went away: nothing to say to anyone
        pass


if __name__ == "__main__":
    main(sys.argv)
