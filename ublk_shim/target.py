"""What a ublk device does with its requests: the Target interface and two reference targets.

A target is the device-mapper idea (ctr / dtr / map) in Python:

    open()              ctr: acquire resources; `size` must be known afterwards
    close()             dtr: release them, after the device stopped
    handle(req, buf)    map: perform one request, return bytes done / 0 / -errno
    handle_batch(batch) map for every request one io_uring_enter delivered; the default
                        calls handle() for each in order
    idle()              optional: background work, called by an idle queue thread

`handle` and `handle_batch` run on the queue threads, concurrently when there are several
queues, and must not keep `buf` after they return (the memory is the request's
kernel-visible buffer and is reused for the tag's next request). A handler that raises
OSError fails the request with that errno; any other exception fails it with EIO (and is
logged): a target bug must never leave a request unanswered, because the kernel would wait
for it forever.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
import logging
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from . import sys as uapi
from .uring import TASKRUN_FLAG_SETS, Ring, open_ring

log = logging.getLogger("ublk_shim")

OP_READ = uapi.UBLK_IO_OP_READ
OP_WRITE = uapi.UBLK_IO_OP_WRITE
OP_FLUSH = uapi.UBLK_IO_OP_FLUSH
OP_DISCARD = uapi.UBLK_IO_OP_DISCARD
OP_WRITE_ZEROES = uapi.UBLK_IO_OP_WRITE_ZEROES
OP_NAMES = {OP_READ: "read", OP_WRITE: "write", OP_FLUSH: "flush", OP_DISCARD: "discard",
            OP_WRITE_ZEROES: "write_zeroes"}

BLOCK_SIZE = 4096

# What handle_batch answers per request: like handle's return value (None = all done, bytes
# done, or -errno), or the exception that request alone raised.
Outcome = Union[int, None, BaseException]


@dataclass
class Request:
    """One ublk I/O descriptor, decoded. `flags` holds the raw UBLK_IO_F_* bits."""
    __slots__ = ("op", "offset", "length", "fua", "tag", "q_id", "flags")
    op: int            # OP_READ / OP_WRITE / OP_FLUSH / OP_DISCARD / OP_WRITE_ZEROES
    offset: int        # bytes (start_sector * 512)
    length: int        # bytes (nr_sectors * 512); 0 for FLUSH
    fua: bool          # WRITE must be durable before it completes
    tag: int
    q_id: int
    flags: int

    @property
    def nounmap(self) -> bool:
        """WRITE_ZEROES must not deallocate (keep the range provisioned)."""
        return bool(self.flags & uapi.UBLK_IO_F_NOUNMAP)


class Target:
    """Base class of ublk targets. Subclasses set `size` (bytes) and implement `handle`.

    `buf` is a writable memoryview of exactly `req.length` bytes for READ and WRITE (page
    aligned, so usable for O_DIRECT) and an empty view for FLUSH, DISCARD and WRITE_ZEROES.
    Return `req.length` (or the bytes done) for READ/WRITE, 0 for the others, or -errno.
    A subclass may define `idle(self) -> None`; keep its work short (tens of milliseconds):
    a queue thread does not serve requests while it runs.
    """

    size: int = 0

    def open(self) -> None:
        """ctr: called once, before the device is added."""

    def close(self) -> None:
        """dtr: called once, after the device stopped."""

    def handle(self, req: Request, buf: memoryview) -> int:
        raise NotImplementedError

    def handle_batch(self, batch: Sequence[Tuple[Request, memoryview]]) -> List[Outcome]:
        """Serve every request one io_uring_enter delivered; one outcome per request, in order.

        The requests were all in flight at once, so the kernel expects no order among them;
        a FLUSH must cover the writes completed (answered) before it, i.e. those of earlier
        batches. The default serves them one by one with handle(), so that an exception
        fails only its own request. Override it to overlap the requests' I/O or to share
        work between them; the queue commits all the results with one io_uring_enter.
        """
        return [handle_one(self, req, buf) for req, buf in batch]


def handle_one(target: Target, req: Request, buf: memoryview) -> Outcome:
    """target.handle(), with its exception as the outcome (the queue makes it -errno, logged)."""
    try:
        return target.handle(req, buf)
    except Exception as e:
        return e


class NullTarget(Target):
    """Reads return zeros, writes are discarded: measures the shim and the kernel alone."""

    def __init__(self, size: int):
        self.size = size
        self._zeros = b""
        self._lock = threading.Lock()

    def _zero_bytes(self, n: int) -> bytes:
        zeros = self._zeros
        if len(zeros) < n:
            with self._lock:
                if len(self._zeros) < n:
                    self._zeros = bytes(n)
                zeros = self._zeros
        return zeros

    def handle(self, req: Request, buf: memoryview) -> int:
        if req.op == OP_READ:
            buf[:] = memoryview(self._zero_bytes(req.length))[:req.length]
        return req.length if req.op in (OP_READ, OP_WRITE) else 0


def buffer_address(buf) -> int:
    """The address of a writable buffer's first byte (for an SQE), holding no export."""
    anchor = ctypes.c_char.from_buffer(buf)
    address = ctypes.addressof(anchor)
    del anchor                      # releases the export, so the buffer can be released
    return address


_BLKGETSIZE64 = 0x80081272
_BLKDISCARD = 0x1277
_BLKZEROOUT = 0x127F
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

uapi.libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if uapi.libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class LoopTarget(Target):
    """A regular file or block device, read and written with O_DIRECT straight from the
    request buffers (no copy); buffered I/O where the filesystem refuses O_DIRECT (tmpfs).

    FLUSH is fdatasync, FUA writes use RWF_DSYNC, DISCARD is BLKDISCARD or a punched hole,
    WRITE_ZEROES is BLKZEROOUT or a zeroed range. The size is the backing size rounded down
    to 4 KiB. Stateless apart from the fd and a ring per queue thread, so safe for any
    number of queues.

    The READs and WRITEs of a batch go to the backing store together, through an io_uring of
    the queue thread's own, so it sees the device's queue depth; a FLUSH, DISCARD or
    WRITE_ZEROES in the batch waits for the data requests before it and is done alone.
    """

    RING_ENTRIES = 64       # backing I/O in flight per queue thread; larger batches in chunks

    def __init__(self, path: str, *, direct: bool = True):
        self.path = os.fspath(path)
        self.direct = direct
        self.fd = -1
        self.is_blockdev = False
        self._local = threading.local()      # .ring: this thread's ring, None if unavailable
        self._rings: List[Ring] = []
        self._rings_lock = threading.Lock()

    def open(self) -> None:
        st = os.stat(self.path)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise OSError(errno.EINVAL, f"{self.path}: not a regular file or block device")
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
        flags = os.O_RDWR | os.O_CLOEXEC
        fd = -1
        if self.direct:
            try:
                fd = os.open(self.path, flags | os.O_DIRECT)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        if fd < 0:
            self.direct = False
            fd = os.open(self.path, flags)
        self.fd = fd
        if self.is_blockdev:
            raw = fcntl.ioctl(fd, _BLKGETSIZE64, bytes(8))
            size = struct.unpack("=Q", raw)[0]
        else:
            size = os.fstat(fd).st_size
        self.size = size // BLOCK_SIZE * BLOCK_SIZE
        if self.size == 0:
            self.close()
            raise OSError(errno.EINVAL, f"{self.path}: smaller than one {BLOCK_SIZE}-byte block")

    def close(self) -> None:
        """After the queue threads ended: their rings, then the backing fd."""
        with self._rings_lock:
            rings, self._rings = self._rings, []
        for ring in rings:
            ring.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def handle_batch(self, batch: Sequence[Tuple[Request, memoryview]]) -> List[Outcome]:
        """Runs of READ/WRITE are submitted together; other ops are done alone, in order."""
        out: List[Outcome] = [None] * len(batch)
        run: List[int] = []                  # indices of the current READ/WRITE run
        for i, (req, buf) in enumerate(batch):
            if req.op == OP_READ or req.op == OP_WRITE:
                run.append(i)
                continue
            self._data_run(batch, run, out)
            run = []
            out[i] = handle_one(self, req, buf)
        self._data_run(batch, run, out)
        return out

    def _data_run(self, batch: Sequence[Tuple[Request, memoryview]], run: List[int],
                  out: List[Outcome]) -> None:
        """READs and WRITEs in flight together, RING_ENTRIES at a time; res is bytes or
        -errno. A lone one (depth 1) is a plain preadv/pwritev: one syscall either way."""
        ring = self._ring() if len(run) > 1 else None
        if ring is None:
            for i in run:
                out[i] = handle_one(self, *batch[i])
            return
        for start in range(0, len(run), ring.sq_entries):
            chunk = run[start:start + ring.sq_entries]
            for i in chunk:
                req, buf = batch[i]
                write = req.op == OP_WRITE
                ring.prep(uapi.IORING_OP_WRITE if write else uapi.IORING_OP_READ, fd=self.fd,
                          off=req.offset, addr=buffer_address(buf), length=req.length,
                          op_flags=os.RWF_DSYNC if write and req.fua else 0, user_data=i)
            left = len(chunk)
            while left:
                ring.submit(wait_nr=left)
                for i, res, _flags in ring.reap():
                    out[i] = res
                    left -= 1

    def _ring(self) -> Optional[Ring]:
        """This queue thread's ring, made on first use (io_uring's single issuer); None where
        io_uring is unavailable (then requests are done one by one)."""
        ring = getattr(self._local, "ring", False)
        if ring is False:
            try:
                ring = open_ring(self.RING_ENTRIES, TASKRUN_FLAG_SETS)
            except OSError as e:
                log.warning("loop %s: no io_uring (%s): serving one request at a time",
                            self.path, e)
                ring = None
            else:
                with self._rings_lock:
                    self._rings.append(ring)
            self._local.ring = ring
        return ring

    def handle(self, req: Request, buf: memoryview) -> int:
        op = req.op
        if op == OP_READ:
            return os.preadv(self.fd, [buf], req.offset)
        if op == OP_WRITE:
            return os.pwritev(self.fd, [buf], req.offset, os.RWF_DSYNC if req.fua else 0)
        if op == OP_FLUSH:
            os.fdatasync(self.fd)
            return 0
        if op == OP_DISCARD:
            self._discard(req.offset, req.length)
            return 0
        if op == OP_WRITE_ZEROES:
            self._write_zeroes(req.offset, req.length, req.nounmap)
            return 0
        return -errno.EOPNOTSUPP

    def _discard(self, offset: int, length: int) -> None:
        """A hint: where the backing store cannot discard, nothing happens."""
        try:
            if self.is_blockdev:
                fcntl.ioctl(self.fd, _BLKDISCARD, struct.pack("=QQ", offset, length))
            else:
                _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise

    def _write_zeroes(self, offset: int, length: int, nounmap: bool) -> None:
        """Must leave zeros: the cheap way if the backing store has one, else write them."""
        try:
            if self.is_blockdev:
                fcntl.ioctl(self.fd, _BLKZEROOUT, struct.pack("=QQ", offset, length))
            else:
                mode = _FALLOC_FL_ZERO_RANGE if nounmap else _FALLOC_FL_PUNCH_HOLE
                _fallocate(self.fd, mode | _FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                raise
        self._write_zero_blocks(offset, length)

    def _write_zero_blocks(self, offset: int, length: int) -> None:
        chunk = min(length, 1 << 20)
        zeros = mmap.mmap(-1, chunk)        # page aligned, zero filled: fine for O_DIRECT
        try:
            view = memoryview(zeros)
            try:
                end = offset + length
                while offset < end:
                    n = min(chunk, end - offset)
                    offset += os.pwritev(self.fd, [view[:n]], offset)
            finally:
                view.release()
        finally:
            zeros.close()
