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

import errno
import logging
import os
import threading
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from . import sys as uapi
from .blockio import BlockFile
from .uring import TASKRUN_FLAG_SETS, Ring, buffer_address, open_ring

log = logging.getLogger("ublk_shim")

OP_READ = uapi.UBLK_IO_OP_READ
OP_WRITE = uapi.UBLK_IO_OP_WRITE
OP_FLUSH = uapi.UBLK_IO_OP_FLUSH
OP_DISCARD = uapi.UBLK_IO_OP_DISCARD
OP_WRITE_ZEROES = uapi.UBLK_IO_OP_WRITE_ZEROES
OP_NAMES = {OP_READ: "read", OP_WRITE: "write", OP_FLUSH: "flush", OP_DISCARD: "discard",
            OP_WRITE_ZEROES: "write_zeroes"}

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


class LoopTarget(Target):
    """A regular file or block device, read and written with O_DIRECT straight from the
    request buffers (no copy); buffered I/O where the filesystem refuses O_DIRECT (tmpfs).

    FLUSH is fdatasync, FUA writes use RWF_DSYNC, DISCARD and WRITE_ZEROES are the backing
    store's (blockio.BlockFile: BLKDISCARD or a punched hole, BLKZEROOUT or a zeroed range).
    The size is the backing size rounded down to the device's block size (sys.BLOCK_SIZE).
    Stateless apart from the open file and a ring per queue thread, so safe for any number
    of queues.

    The READs and WRITEs of a batch go to the backing store together, through an io_uring of
    the queue thread's own, so it sees the device's queue depth; a FLUSH, DISCARD or
    WRITE_ZEROES in the batch waits for the data requests before it and is done alone.
    """

    RING_ENTRIES = 64       # backing I/O in flight per queue thread; larger batches in chunks

    def __init__(self, path: str, *, direct: bool = True):
        self.path = os.fspath(path)
        self._direct = direct                # asked for; self.file.direct: in effect
        self.file: Optional[BlockFile] = None
        self._local = threading.local()      # .ring: this thread's ring, None if unavailable
        self._rings: List[Ring] = []
        self._rings_lock = threading.Lock()

    def open(self) -> None:
        self.file = BlockFile(self.path, direct=self._direct)
        self.size = self.file.size // uapi.BLOCK_SIZE * uapi.BLOCK_SIZE
        if self.size == 0:
            self.close()
            raise OSError(errno.EINVAL,
                          f"{self.path}: smaller than one {uapi.BLOCK_SIZE}-byte block")

    def close(self) -> None:
        """After the queue threads ended: their rings, then the backing fd."""
        with self._rings_lock:
            rings, self._rings = self._rings, []
        for ring in rings:
            ring.close()
        if self.file is not None:
            self.file.close()

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
                ring.prep(uapi.IORING_OP_WRITE if write else uapi.IORING_OP_READ,
                          fd=self.file.fd, off=req.offset, addr=buffer_address(buf),
                          length=req.length, op_flags=os.RWF_DSYNC if write and req.fua else 0,
                          user_data=i)
            for i, res, _flags in ring.complete(len(chunk)):
                out[i] = res

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
            return os.preadv(self.file.fd, [buf], req.offset)
        if op == OP_WRITE:
            return os.pwritev(self.file.fd, [buf], req.offset, os.RWF_DSYNC if req.fua else 0)
        if op == OP_FLUSH:
            os.fdatasync(self.file.fd)
            return 0
        if op == OP_DISCARD:            # a hint: nothing happens where it is unsupported
            self.file.discard(req.offset, req.length)
            return 0
        if op == OP_WRITE_ZEROES:
            self.file.write_zeroes(req.offset, req.length, unmap=not req.nounmap)
            return 0
        return -errno.EOPNOTSUPP
