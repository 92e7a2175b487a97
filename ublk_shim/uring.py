"""A minimal io_uring: setup, the three mmaps, SQE preparation, batched submit and reap.

This is the part of liburing a ublk server needs, written against the raw syscalls:

    ring = Ring(64)
    for i in range(8):
        ring.prep(IORING_OP_NOP, user_data=i)
    ring.submit(wait_nr=8)              # one io_uring_enter for the whole batch
    for user_data, res, flags in ring.reap():
        ...

A Ring is owned by one thread (the kernel's SINGLE_ISSUER model): nothing here locks.

Memory ordering. The kernel publishes CQEs with a release store on the CQ tail and reads the
SQ tail inside io_uring_enter. Python cannot emit barriers, so the ring is only read and
written around io_uring_enter, which orders everything on x86-64 (TSO) and is a full barrier
for the calling thread elsewhere; in particular reap() is meant to be called after submit().
Shared head/tail words are accessed through ctypes c_uint32 views, i.e. single aligned loads
and stores, never torn.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from typing import Iterable, List, Optional, Tuple

from . import sys as uapi

_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)

# For a ring that one thread uses and always waits on (open_ring tries them in order): task
# work (completions) runs only when that thread enters the kernel to wait. Fallbacks for
# kernels without DEFER_TASKRUN (< 6.1) or COOP_TASKRUN (< 5.19).
TASKRUN_FLAG_SETS = (
    uapi.IORING_SETUP_COOP_TASKRUN | uapi.IORING_SETUP_SINGLE_ISSUER
    | uapi.IORING_SETUP_DEFER_TASKRUN,
    uapi.IORING_SETUP_COOP_TASKRUN,
    0,
)
_U32 = 0xFFFFFFFF

Cqe = Tuple[int, int, int]     # (user_data, res, flags)


class Ring:
    """One io_uring instance with its SQ ring, CQ ring and SQE array mapped.

    `entries` SQ entries (rounded up to a power of two by the kernel); `cq_entries`
    (default 2 * entries) CQ entries; `flags` are IORING_SETUP_* (SQE128 selects 128-byte SQEs,
    needed for ublk control commands). CQE32 and SQPOLL are not supported: ublk needs neither.
    """

    def __init__(self, entries: int, *, flags: int = 0, cq_entries: int = 0):
        if flags & (uapi.IORING_SETUP_CQE32 | uapi.IORING_SETUP_SQPOLL):
            raise ValueError("CQE32 and SQPOLL rings are not supported by this binding")
        self.fd = -1
        self.leaked_maps = 0                 # mappings close() could not unmap (views kept)
        self._maps: List[mmap.mmap] = []
        self._views: list = []
        params = uapi.IoUringParams()
        params.flags = flags
        if cq_entries:
            params.flags |= uapi.IORING_SETUP_CQSIZE
            params.cq_entries = cq_entries
        ret = uapi.libc.syscall(uapi.NR_IO_URING_SETUP, ctypes.c_uint(entries),
                                ctypes.byref(params))
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_setup: {os.strerror(err)}{_setup_hint(err)}")
        self.fd = ret
        try:
            self._map_rings(params)
        except BaseException:
            self.close()
            raise

    # ---- setup --------------------------------------------------------------------------

    def _map_rings(self, p: uapi.IoUringParams) -> None:
        self.flags = p.flags
        self.features = p.features
        self.sq_entries = p.sq_entries
        self.cq_entries = p.cq_entries
        self.sqe_size = uapi.SQE128_SIZE if p.flags & uapi.IORING_SETUP_SQE128 else uapi.SQE_SIZE

        sq_size = p.sq_off.array + p.sq_entries * 4
        cq_size = p.cq_off.cqes + p.cq_entries * uapi.CQE_SIZE
        if p.features & uapi.IORING_FEAT_SINGLE_MMAP:
            sq_size = cq_size = max(sq_size, cq_size)
            sq_map = cq_map = self._mmap(sq_size, uapi.IORING_OFF_SQ_RING)
        else:
            sq_map = self._mmap(sq_size, uapi.IORING_OFF_SQ_RING)
            cq_map = self._mmap(cq_size, uapi.IORING_OFF_CQ_RING)
        self._sqes = self._mmap(p.sq_entries * self.sqe_size, uapi.IORING_OFF_SQES)

        self._sq_head = self._u32(sq_map, p.sq_off.head)
        self._sq_tail = self._u32(sq_map, p.sq_off.tail)
        self._sq_mask = self._u32(sq_map, p.sq_off.ring_mask).value
        self._cq_head = self._u32(cq_map, p.cq_off.head)
        self._cq_tail = self._u32(cq_map, p.cq_off.tail)
        self._cq_mask = self._u32(cq_map, p.cq_off.ring_mask).value
        self._cq_overflow = self._u32(cq_map, p.cq_off.overflow)
        self._cqes_off = p.cq_off.cqes

        # The SQ index array is an indirection we do not need: make it the identity once.
        array = (ctypes.c_uint32 * p.sq_entries).from_buffer(sq_map, p.sq_off.array)
        self._views.append(array)
        for i in range(p.sq_entries):
            array[i] = i

        self._tail = self._sq_tail.value     # local SQ tail, published by submit()
        self._pending = 0                    # SQEs prepared but not yet consumed by the kernel
        self._zero_sqe = bytes(self.sqe_size)
        self._cq_view = memoryview(cq_map)

    def _mmap(self, length: int, offset: int) -> mmap.mmap:
        m = mmap.mmap(self.fd, length, flags=mmap.MAP_SHARED | _MAP_POPULATE,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self._maps.append(m)
        return m

    def _u32(self, m: mmap.mmap, offset: int) -> ctypes.c_uint32:
        view = ctypes.c_uint32.from_buffer(m, offset)
        self._views.append(view)
        return view

    # ---- submission ---------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """SQEs prepared and not yet consumed by the kernel."""
        return self._pending

    def sq_space(self) -> int:
        """Free SQ slots."""
        return self.sq_entries - ((self._tail - self._sq_head.value) & _U32)

    def _next_sqe(self) -> int:
        """Byte offset of the next free SQE; submits what is pending if the SQ is full."""
        if self.sq_space() == 0:
            self.submit()
            if self.sq_space() == 0:
                raise OSError(errno.EBUSY, "io_uring submission queue is full")
        offset = (self._tail & self._sq_mask) * self.sqe_size
        self._tail = (self._tail + 1) & _U32
        self._pending += 1
        return offset

    def _unget_sqe(self) -> None:
        """Take back the SQE just handed out (its preparation failed)."""
        self._tail = (self._tail - 1) & _U32
        self._pending -= 1

    def prep(self, opcode: int, *, fd: int = -1, off: int = 0, addr: int = 0, length: int = 0,
             op_flags: int = 0, user_data: int = 0, flags: int = 0, cmd: bytes = b"") -> None:
        """Queue one SQE. `cmd` fills sqe->cmd[] (16 bytes, 80 with SQE128) for URING_CMD."""
        if len(cmd) > self.sqe_size - uapi.SQE_CMD_OFFSET:
            raise ValueError(f"cmd of {len(cmd)} bytes does not fit a {self.sqe_size}-byte SQE")
        o = self._next_sqe()
        sqes = self._sqes
        try:
            sqes[o:o + self.sqe_size] = self._zero_sqe
            uapi.SQE_HEAD.pack_into(sqes, o, opcode, flags, 0, fd, off, addr, length, op_flags,
                                    user_data, 0, 0, 0)
            start = o + uapi.SQE_CMD_OFFSET
            sqes[start:start + len(cmd)] = cmd
        except BaseException:
            self._unget_sqe()
            raise

    def prep_packed(self, codec: struct.Struct, *values) -> None:
        """Queue one SQE written by a codec that covers the whole entry (the hot path).

        One `pack_into` writes all of it, so nothing needs zeroing first.
        """
        if codec.size != self.sqe_size:
            raise ValueError(f"codec of {codec.size} bytes for a {self.sqe_size}-byte SQE")
        o = self._next_sqe()
        try:
            codec.pack_into(self._sqes, o, *values)
        except BaseException:
            self._unget_sqe()
            raise

    def prep_packed_many(self, codec: struct.Struct, rows: List[tuple]) -> None:
        """prep_packed for many SQEs: one check of free space (submitting first if they do
        not fit) and one tail update for the lot. All or nothing: if a row fails to
        pack, none of them is queued."""
        if codec.size != self.sqe_size:
            raise ValueError(f"codec of {codec.size} bytes for a {self.sqe_size}-byte SQE")
        n = len(rows)
        if self.sq_space() < n:
            self.submit()
            if self.sq_space() < n:
                raise OSError(errno.EBUSY, f"io_uring submission queue has no room for {n}")
        pack, sqes, size, mask, tail = codec.pack_into, self._sqes, self.sqe_size, \
            self._sq_mask, self._tail
        for row in rows:
            pack(sqes, (tail & mask) * size, *row)
            tail = (tail + 1) & _U32
        self._tail = tail
        self._pending += n

    def submit(self, wait_nr: int = 0, timeout: Optional[float] = None) -> int:
        """Submit everything prepared and optionally wait for `wait_nr` completions.

        One io_uring_enter call. With `timeout` (seconds) the wait ends early (ETIME);
        a signal (EINTR) also ends it. Returns the number of SQEs the kernel consumed;
        SQEs it did not consume stay pending for the next call.
        """
        self._sq_tail.value = self._tail
        enter_flags = 0
        arg = None
        argsz = 0
        if wait_nr > 0:
            enter_flags |= uapi.IORING_ENTER_GETEVENTS
            if timeout is not None:
                if not self.features & uapi.IORING_FEAT_EXT_ARG:
                    raise OSError(errno.EOPNOTSUPP, "io_uring without EXT_ARG: no wait timeout")
                ts = uapi.KernelTimespec(int(timeout), int((timeout % 1) * 1e9))
                ext = uapi.IoUringGeteventsArg(ts=ctypes.addressof(ts))
                enter_flags |= uapi.IORING_ENTER_EXT_ARG
                arg, argsz = ctypes.byref(ext), ctypes.sizeof(ext)
        ret = uapi.libc.syscall(uapi.NR_IO_URING_ENTER, self.fd, self._pending, wait_nr,
                                enter_flags, arg, ctypes.c_size_t(argsz))
        if ret < 0:
            err = ctypes.get_errno()
            if err in (errno.ETIME, errno.EINTR, errno.EAGAIN, errno.EBUSY):
                # Timed out, interrupted, or the kernel wants the CQ drained first: nothing
                # was consumed; the caller reaps and calls again.
                return 0
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
        self._pending -= ret
        return ret

    # ---- completion ---------------------------------------------------------------------

    def reap(self, max_nr: int = 0) -> List[Cqe]:
        """Take every available CQE (at most `max_nr` if given) as (user_data, res, flags).

        The CQEs are copied out with one or two `iter_unpack` calls (two when the batch wraps
        around the ring end) and the CQ head is advanced once for the whole batch.
        """
        head = self._cq_head.value
        n = (self._cq_tail.value - head) & _U32
        if max_nr:
            n = min(n, max_nr)
        if not n:
            return []
        start = head & self._cq_mask
        first = min(n, self._cq_mask + 1 - start)
        base = self._cqes_off
        view = self._cq_view
        cqes = list(uapi.CQE.iter_unpack(view[base + start * uapi.CQE_SIZE:
                                              base + (start + first) * uapi.CQE_SIZE]))
        if first < n:
            cqes.extend(uapi.CQE.iter_unpack(view[base:base + (n - first) * uapi.CQE_SIZE]))
        self._cq_head.value = (head + n) & _U32
        return cqes

    @property
    def cq_overflow(self) -> int:
        """CQEs the kernel could not post (should stay 0: it means CQ sizing is wrong)."""
        return self._cq_overflow.value

    def submit_and_wait(self, wait_nr: int = 1, timeout: Optional[float] = None) -> List[Cqe]:
        """submit() then reap(): the one-syscall-per-batch loop body."""
        self.submit(wait_nr, timeout)
        return self.reap()

    def complete(self, count: int) -> List[Cqe]:
        """Submit what is prepared and wait until `count` CQEs were reaped; returns them in
        completion order. For a caller that knows how many of its requests are in flight."""
        cqes: List[Cqe] = []
        while len(cqes) < count:
            cqes += self.submit_and_wait(count - len(cqes))
        return cqes

    # ---- registration -------------------------------------------------------------------

    def register_buffer(self, buf) -> None:
        """Registers one writable buffer (an mmap) as fixed buffer 0, for READ_FIXED: the
        kernel pins its pages once instead of at every request (they count against
        RLIMIT_MEMLOCK for an unprivileged user; OSError if over it). The buffer must
        outlive the ring."""
        iov = uapi.IoVec(buffer_address(buf), len(buf))
        ret = uapi.libc.syscall(uapi.NR_IO_URING_REGISTER, self.fd, uapi.IORING_REGISTER_BUFFERS,
                                ctypes.byref(iov), 1)
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_register(BUFFERS): {os.strerror(err)}")

    # ---- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        """Unmap and close. In-flight commands are cancelled by the kernel (ring teardown)."""
        # Drop every ctypes view first: an mmap with live exports cannot be closed.
        self._views.clear()
        self._sq_head = self._sq_tail = self._cq_head = self._cq_tail = None
        self._cq_overflow = None
        if getattr(self, "_cq_view", None) is not None:
            self._cq_view.release()
            self._cq_view = None
        leaked = 0
        for m in self._maps:
            try:
                m.close()
            except BufferError:     # a view escaped; leave the mapping to the GC, never crash
                leaked += 1
        self._maps.clear()
        self.leaked_maps = leaked
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Ring":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.close()


def _setup_hint(err: int) -> str:
    if err == errno.ENOSYS:
        return " (kernel built without io_uring)"
    if err == errno.EPERM:
        return " (io_uring disabled: see sysctl kernel.io_uring_disabled)"
    return ""


def buffer_address(buf) -> int:
    """The address of a writable buffer's first byte, for an SQE's addr. The caller keeps
    the buffer alive and unmoved (an mmap, or a bytearray it does not resize) until the
    request completed; no export is held, so the buffer can be released afterwards."""
    anchor = ctypes.c_char.from_buffer(buf)
    address = ctypes.addressof(anchor)
    del anchor
    return address


def open_ring(entries: int, flag_sets: Iterable[int], **kwargs) -> Ring:
    """The first ring whose setup flags the kernel accepts (newer flags first, then older)."""
    last: Optional[OSError] = None
    for flags in flag_sets:
        try:
            return Ring(entries, flags=flags, **kwargs)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            last = e
    assert last is not None
    raise last
