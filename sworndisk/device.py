"""Block devices the engine stores onto, and who owns them.

The engine performs all of its device I/O through the public methods of BlockDevice
(pread, pwrite, flush, discard, size), so a subclass that overrides just those sees
every byte: that is how the crash and tamper tests interpose.

Host plumbing (opening a file or block device with O_DIRECT, its size, discard) is the
shim's block-I/O layer, `ublk_shim.blockio`, shared with its loop target; batches go
through the shim's io_uring (`ublk_shim.uring`).

A disk has one owner at a time: two writers on the same images destroy it. `open_pair`
locks both devices (`BlockDevice.lock`) before the engine reads or writes them, and the
lock lives as long as the device stays open: a regular file gets an OFD write lock, which
belongs to the open file and so meets every other path to the same inode (symlinks, hard
links) and dies with the process; a block device gets an O_EXCL claim, which a mounted
file system or a device-mapper holder already has.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
import threading
from contextlib import contextmanager
from itertools import accumulate

from ublk_shim import blockio
from ublk_shim.sys import IORING_OP_READ, IORING_OP_WRITE, SQE_RW
from ublk_shim.uring import Ring, buffer_address

from .errors import InvalidArgument
from .holders import busy_error

_ALIGN = blockio.DIRECT_ALIGN
_RING_BATCH = 256
_LOCK_BUSY = (errno.EAGAIN, errno.EACCES)


def _flock(kind: int) -> bytes:
    """A struct flock for the whole file (l_pid is 0, as OFD locks require)."""
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)


class BlockDevice:
    """Base class: subclasses implement pread, pwrite, flush and size; discard is optional."""

    @property
    def size(self) -> int:
        raise NotImplementedError

    def pread(self, nbytes: int, offset: int) -> bytes:
        raise NotImplementedError

    def pwrite(self, data, offset: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Durability barrier: every completed pwrite is on stable storage after this returns."""
        raise NotImplementedError

    def pwrite_many(self, items: list) -> None:
        """Several (data, offset) writes that may complete in any order; the default calls
        pwrite for each, so a subclass that overrides pwrite sees them all."""
        for data, offset in items:
            self.pwrite(data, offset)

    def pwrite_many_stable(self, items: list) -> None:
        """pwrite_many, the caller leaving every buffer unchanged until its next call to
        this device: a device that leaves writes in flight may write from them in place,
        uncopied. The default is pwrite_many (so a subclass that overrides that, or
        pwrite, sees these writes too)."""
        self.pwrite_many(items)

    def pread_many(self, items: list) -> list:
        """Several (nbytes, offset) reads, their bytes in order; the default calls pread
        for each, so a subclass that overrides pread sees them all."""
        return [self.pread(nbytes, offset) for nbytes, offset in items]

    def discard(self, offset: int, nbytes: int) -> None:
        """Hint that a range no longer holds data; the default does nothing."""

    def close(self) -> None:
        """Release OS resources; the default does nothing."""

    def lock(self, what: str) -> None:
        """Own the device until close(), or raise DeviceBusyError naming `what` (e.g.
        'data device') and the holder. The default has nothing to lock: a device in
        memory, or a wrapper the caller owns outright."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MemoryDevice(BlockDevice):
    """A device in RAM: for tests and for measuring the engine without a disk."""

    def __init__(self, size: int):
        if size <= 0 or size % _ALIGN:
            raise InvalidArgument(f"MemoryDevice size must be a positive multiple of {_ALIGN}")
        self.buf = bytearray(size)

    @property
    def size(self) -> int:
        return len(self.buf)

    def pread(self, nbytes: int, offset: int) -> bytes:
        _check_range(self, nbytes, offset)
        return bytes(self.buf[offset:offset + nbytes])

    def pwrite(self, data, offset: int) -> None:
        _check_range(self, len(data), offset)
        self.buf[offset:offset + len(data)] = data

    def flush(self) -> None:
        pass

    def discard(self, offset: int, nbytes: int) -> None:
        _check_range(self, nbytes, offset)
        self.buf[offset:offset + nbytes] = bytes(nbytes)


def _check_ranges(dev: BlockDevice, items: list) -> None:
    """_check_range of every (nbytes, offset), one pass for a whole batch."""
    size = dev.size
    for nbytes, offset in items:
        if offset < 0 or nbytes < 0 or offset + nbytes > size:
            _check_range(dev, nbytes, offset)


def _check_range(dev: BlockDevice, nbytes: int, offset: int) -> None:
    if offset < 0 or nbytes < 0 or offset + nbytes > dev.size:
        raise InvalidArgument(
            f"I/O [{offset}, {offset + nbytes}) is outside the device (size {dev.size} bytes)")


class DeviceWrapper(BlockDevice):
    """Passes every call through to `inner`: the base of devices that watch or restrict
    another (counting, read-only, fault injection in the tests). The batch calls
    (pread_many, pwrite_many) are not forwarded but go through this object's pread and
    pwrite, so a subclass that overrides those sees every block."""

    def __init__(self, inner: BlockDevice):
        self.inner = inner

    @property
    def size(self) -> int:
        return self.inner.size

    def pread(self, nbytes: int, offset: int) -> bytes:
        return self.inner.pread(nbytes, offset)

    def pwrite(self, data, offset: int) -> None:
        self.inner.pwrite(data, offset)

    def flush(self) -> None:
        self.inner.flush()

    def discard(self, offset: int, nbytes: int) -> None:
        self.inner.discard(offset, nbytes)

    def lock(self, what: str) -> None:
        self.inner.lock(what)

    def close(self) -> None:
        self.inner.close()


class CountingDevice(DeviceWrapper):
    """Passes every call through to `inner` (batches too, so that io_uring still gets
    them whole) and counts calls and bytes on the way: how the engine and the benchmark
    measure device traffic (write amplification)."""

    def __init__(self, inner: BlockDevice):
        super().__init__(inner)
        self.bytes_written = self.bytes_read = 0
        self.writes = self.reads = self.flushes = 0

    def pread(self, nbytes: int, offset: int) -> bytes:
        self.reads += 1
        self.bytes_read += nbytes
        return self.inner.pread(nbytes, offset)

    def pwrite(self, data, offset: int) -> None:
        self.inner.pwrite(data, offset)
        self.writes += 1
        self.bytes_written += len(data)

    def pwrite_many(self, items: list) -> None:
        self.inner.pwrite_many(items)
        self._count_writes(items)

    def pwrite_many_stable(self, items: list) -> None:
        self.inner.pwrite_many_stable(items)
        self._count_writes(items)

    def _count_writes(self, items: list) -> None:
        self.writes += len(items)
        self.bytes_written += sum(len(d) for d, _ in items)

    def pread_many(self, items: list) -> list:
        self.reads += len(items)
        self.bytes_read += sum(n for n, _ in items)
        return self.inner.pread_many(items)

    def flush(self) -> None:
        self.flushes += 1
        self.inner.flush()

    def note_reads(self, reads: int, nbytes: int) -> None:
        """Counts reads another process made of `inner` for the engine (crypto workers)."""
        self.reads += reads
        self.bytes_read += nbytes


def direct_file(dev: BlockDevice) -> tuple["FileDevice | None", list[CountingDevice]]:
    """The O_DIRECT FileDevice under `dev` and the CountingDevices around it (they pass
    batches through whole), for a reader in another process that must count its reads
    in those layers; (None, []) if `dev` is anything else, or wraps it in a device that
    must see every read itself (read-only guards, fault injection)."""
    layers = []
    while type(dev) is CountingDevice:
        layers.append(dev)
        dev = dev.inner
    if isinstance(dev, FileDevice) and dev.direct and type(dev).pread is FileDevice.pread:
        return dev, layers
    return None, []


def _aligned_view(data) -> memoryview | None:
    """`data` as a byte view O_DIRECT can write from (writable, page-aligned, whole
    pages), or None."""
    try:
        view = memoryview(data).cast("B")
        if view.readonly or not view or len(view) % _ALIGN or buffer_address(view) % _ALIGN:
            return None
    except (TypeError, ValueError):
        return None
    return view


class _AlignedBuffers(threading.local):
    """One page-aligned bounce buffer per thread, grown on demand (O_DIRECT needs alignment)."""

    def get(self, nbytes: int) -> mmap.mmap:
        buf = getattr(self, "buf", None)
        if buf is None or len(buf) < nbytes:
            if buf is not None:
                buf.close()
            size = max(_ALIGN, (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN)
            buf = mmap.mmap(-1, size)
            self.buf = buf
        return buf


class FileDevice(BlockDevice):
    """A regular file or a block device (a `blockio.BlockFile`), opened with O_DIRECT where
    the filesystem allows it. Where it does not (tmpfs), the file is buffered and flush()
    still calls fdatasync: durability is the same, only the page cache is used.

    pwrite_many and pread_many go through an io_uring; where the kernel refuses io_uring
    (disabled by sysctl or seccomp: an OSError at ring setup) they are plain writes/reads.
    """

    def __init__(self, path: str, *, direct: bool = True, readonly: bool = False):
        try:
            self.file = blockio.BlockFile(os.fspath(path), readonly=readonly, direct=direct)
        except FileNotFoundError:
            raise InvalidArgument(f"{path}: no such file or device") from None
        except blockio.NotStorageError as e:
            raise InvalidArgument(str(e)) from None
        self._claim = -1                    # block device: the O_EXCL descriptor of lock()
        self._locked = False
        self._bufs = _AlignedBuffers()
        self._ring = False                  # io_uring for the *_many calls, made on first use
        self._ring_lock = threading.Lock()
        self._inflight = None               # the batch pwrite_many left in flight
        self._lost: OSError | None = None   # why a write left in flight failed, if one did
        self.bytes_bounced = 0              # pwrite_many bytes copied to the bounce buffer
        self._fence = None                  # waits for reads issued by other processes

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def fd(self) -> int:
        """The open descriptor, for a process that reads this device on the engine's
        behalf (crypto workers); see settle() and fence_writes()."""
        return self.file.fd

    def settle(self) -> None:
        """Waits for the writes pwrite_many left in flight: after this, a read issued on
        `fd` elsewhere sees every write issued here before."""
        self._drain()

    def fence_writes(self, wait) -> None:
        """`wait()` (or None: no more) is called before every write and discard: it
        returns once the reads other processes issued on `fd` are done, so that no block
        is overwritten while one of them reads it."""
        self._fence = wait

    @property
    def direct(self) -> bool:
        """O_DIRECT in effect (False where the filesystem refused it)."""
        return self.file.direct

    @property
    def size(self) -> int:
        return self.file.size

    def lock(self, what: str) -> None:
        """Own the device until close(): an OFD lock on this open file (a write lock, or a
        read lock for a read-only device), or an O_EXCL claim on a block device. Never
        waits: a device someone else owns raises DeviceBusyError at once. Idempotent."""
        if self._locked:
            return
        if self.file.is_blockdev:
            try:        # the same device node, reopened through this descriptor
                self._claim = os.open(f"/proc/self/fd/{self.file.fd}",
                                      os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                raise busy_error(self.path, what, own_fd=self.file.fd) from None
        else:
            kind = fcntl.F_RDLCK if self.file.readonly else fcntl.F_WRLCK
            try:
                fcntl.fcntl(self.file.fd, fcntl.F_OFD_SETLK, _flock(kind))
            except OSError as e:
                if e.errno not in _LOCK_BUSY:
                    raise
                raise busy_error(self.path, what) from None
        self._locked = True

    def pread(self, nbytes: int, offset: int) -> bytes:
        _check_range(self, nbytes, offset)
        self._drain()
        if not self.direct:
            data = os.pread(self.file.fd, nbytes, offset)
        else:
            buf = self._bufs.get(nbytes)
            n = os.preadv(self.file.fd, [memoryview(buf)[:nbytes]], offset)
            data = buf[:n]
        if len(data) != nbytes:
            raise OSError(errno.EIO, f"{self.path}: short read at {offset} ({len(data)}/{nbytes})")
        return data

    def pwrite(self, data, offset: int) -> None:
        _check_range(self, len(data), offset)
        self._drain()
        self._check_lost()
        if self._fence is not None:
            self._fence()
        self._pwrite_now(data, offset)

    def _pwrite_now(self, data, offset: int) -> None:
        nbytes = len(data)
        if self.direct:
            buf = self._bufs.get(nbytes)
            mv = memoryview(buf)[:nbytes]
            mv[:] = data
            n = os.pwritev(self.file.fd, [mv], offset)
        else:
            n = os.pwrite(self.file.fd, data, offset)
        if n != nbytes:
            raise OSError(errno.EIO, f"{self.path}: short write at {offset} ({n}/{nbytes})")

    def flush(self) -> None:
        self._drain()
        self._check_lost()
        os.fdatasync(self.file.fd)

    def pwrite_many(self, items: list) -> None:
        self._pwrite_many(items, stable=False)

    def pwrite_many_stable(self, items: list) -> None:
        self._pwrite_many(items, stable=True)

    def _pwrite_many(self, items: list, stable: bool) -> None:
        """Writes as io_uring batches. With O_DIRECT each write is a device round trip:
        threaded logging writes many short runs per segment, and a whole segment write can
        overlap the encryption of the next one. So the last batch is left in flight: every
        other method of this device (pread, pwrite, flush, discard, close, and the next
        pwrite_many) first waits for it and checks its results, which keeps flush() a
        barrier for every write issued before it. Writes are copied into a bounce buffer
        first, unless `stable` and page-aligned: then written from where they are."""
        ring = self._uring() if (self.direct and type(self).pwrite is FileDevice.pwrite) else None
        if ring is None:
            return BlockDevice.pwrite_many(self, items)
        for data, offset in items:
            _check_range(self, len(data), offset)
        if self._fence is not None:
            self._fence()
        with self._ring_lock:
            self._drain_locked()
            self._check_lost()
            for i in range(0, len(items), _RING_BATCH):
                self._submit_locked(ring, items[i:i + _RING_BATCH], stable)
                if i + _RING_BATCH < len(items):
                    self._drain_locked()

    def pread_many(self, items: list) -> list:
        """Reads submitted together through io_uring (O_DIRECT), so that the device works
        on all of them at once: at depth, a random-read batch costs about one device
        round trip instead of one per read. Ordered after any write left in flight."""
        ring = self._uring() if (self.direct and type(self).pread is FileDevice.pread) else None
        if ring is None or len(items) < 2:
            return super().pread_many(items)
        _check_ranges(self, items)
        out: list = []
        with self._ring_lock:
            self._drain_locked()
            for i in range(0, len(items), _RING_BATCH):
                out += self._read_batch_locked(ring, items[i:i + _RING_BATCH])
        return out

    def _read_batch_locked(self, ring: Ring, items: list) -> list:
        places = list(accumulate([n for n, _ in items], initial=0))
        buf = self._bufs.get(places.pop())
        base, fd = buffer_address(buf), self.file.fd
        # opcode, flags, ioprio, fd, off, addr, len, op_flags, user_data, buf_index,
        # personality, splice_fd_in
        ring.prep_packed_many(SQE_RW, [(IORING_OP_READ, 0, 0, fd, offset, base + pos, nbytes,
                                        0, i, 0, 0, 0)
                                       for i, ((nbytes, offset), pos)
                                       in enumerate(zip(items, places))])
        results = [0] * len(items)
        for user_data, res, _flags in ring.complete(len(items)):
            results[user_data] = res
        out = []
        for (nbytes, offset), pos, res in zip(items, places, results):
            if res == nbytes:
                out.append(buf[pos:pos + nbytes])
            else:                               # error or short read: redo it plainly,
                out.append(self.pread(nbytes, offset))   # so a real error is raised here
        return out

    def _submit_locked(self, ring: Ring, items: list, stable: bool) -> None:
        """Submits the writes: from the caller's buffers where they are `stable` and
        page-aligned, else copied into the bounce buffer first (the caller may then reuse
        its buffers as soon as pwrite_many returns). What stays in flight is remembered
        as (buffer, offset) pairs, so a failed write can be redone from the same bytes."""
        views = [_aligned_view(data) if stable else None for data, _ in items]
        copied = sum(len(d) for (d, _), v in zip(items, views) if v is None)
        if None in views:
            buf = self._bufs.get(copied)                    # stays alive in self._bufs
            base = buffer_address(buf)
        self.bytes_bounced += copied
        pos, rows, places = 0, [], []
        for i, ((data, offset), view) in enumerate(zip(items, views)):
            if view is None:
                view = memoryview(buf)[pos:pos + len(data)]
                view[:] = data
                address = base + pos
                pos += len(data)
            else:
                address = buffer_address(view)
            rows.append((IORING_OP_WRITE, 0, 0, self.file.fd, offset, address, len(view),
                         0, i, 0, 0, 0))
            places.append((view, offset))
        ring.prep_packed_many(SQE_RW, rows)
        self._inflight = places
        while ring.pending:
            ring.submit()

    def _drain(self) -> None:
        if self._inflight is not None:
            with self._ring_lock:
                self._drain_locked()

    def _drain_locked(self) -> None:
        if self._inflight is None:
            return
        places = self._inflight
        self._inflight = None
        try:
            done = self._ring.complete(len(places))
        except BaseException as e:
            # The writes' outcome is unknown and the ring is out of step with its calls:
            # they count as lost, and the ring is dropped (reads go one at a time).
            self._lost = e if isinstance(e, OSError) else OSError(
                errno.EIO, f"{self.path}: writes in flight were not seen through ({e!r})")
            self._ring.close()
            self._ring = None
            raise
        failed = [user_data for user_data, res, _flags in done
                  if res != len(places[user_data][0])]
        for i in failed:                        # error or short write: redo it plainly
            view, offset = places[i]            # from the same bytes (every call drains
            try:                                # before the buffers are used again), so a
                n = os.pwritev(self.file.fd, [view], offset)    # real error is raised here
            except OSError as e:
                self._lost = e
                raise
            if n != len(view):
                self._lost = OSError(errno.EIO, f"{self.path}: short write at {offset} "
                                                f"({n}/{len(view)})")
                raise self._lost

    def _check_lost(self) -> None:
        """A write left in flight that failed fails every later write, flush and discard
        too: whichever call met the error first (a read, perhaps, that its caller
        reports alone), no flush may then return as if that write were durable."""
        if self._lost is not None:
            raise OSError(self._lost.errno or errno.EIO,
                          f"{self.path}: a write failed earlier ({self._lost.strerror or self._lost}); "
                          f"nothing written since is durable: reopen the disk")

    def _uring(self) -> Ring | None:
        """The ring of the *_many calls; None where the kernel refuses io_uring."""
        if self._ring is False:
            try:
                self._ring = Ring(_RING_BATCH)
            except OSError:
                self._ring = None
        return self._ring

    def discard(self, offset: int, nbytes: int) -> None:
        _check_range(self, nbytes, offset)
        self._drain()
        self._check_lost()
        if self._fence is not None:
            self._fence()
        try:
            self.file.discard(offset, nbytes)
        except OSError:     # a hint: the engine no longer refers to the range, and what
            pass            # stays there is ciphertext under keys it has dropped

    def close(self) -> None:
        """Waits for the writes in flight (raising their error, if any) and always lets
        go of the ring, the claim and the file: a disk that failed is then reopened."""
        try:
            if self.file.fd >= 0:
                self._drain()
        finally:
            if self._ring:
                self._ring.close()
                self._ring = None
            if self._claim >= 0:
                os.close(self._claim)
                self._claim = -1
            self.file.close()           # releases the OFD lock with the open file
            self._locked = False


def as_device(dev, what: str) -> BlockDevice:
    """A path becomes a FileDevice; a BlockDevice is used as is."""
    if isinstance(dev, BlockDevice):
        return dev
    if isinstance(dev, (str, os.PathLike)):
        return FileDevice(os.fspath(dev))
    raise InvalidArgument(f"{what} must be a path or a BlockDevice, not {type(dev).__name__}")


def open_pair(data, meta) -> tuple[BlockDevice, BlockDevice, list[BlockDevice]]:
    """The data and meta devices of one disk, as (data, meta, owned), both locked
    (BlockDevice.lock) before anything is read or written: a DeviceBusyError here means
    another owner, and nothing was touched. `owned` are the devices opened here from
    paths; closing them (SwornDisk.close, or process death) releases their locks. A
    device passed in stays locked until its caller closes it."""
    owned: list[BlockDevice] = []
    devs: list[BlockDevice] = []
    try:
        for dev, what in ((data, "data"), (meta, "meta")):
            try:
                d = as_device(dev, f"the {what} device")
            except OSError as e:    # a kernel that refuses writers on a mounted device
                if e.errno != errno.EBUSY or isinstance(dev, BlockDevice):
                    raise
                raise busy_error(os.fspath(dev), f"{what} device") from None
            if d is not dev:
                owned.append(d)
            devs.append(d)
        d, m = devs
        if (isinstance(d, FileDevice) and isinstance(m, FileDevice)
                and d.file.identity == m.file.identity):
            raise InvalidArgument(f"data and meta devices must differ ({d.path} and {m.path} "
                                  f"are the same {'device' if d.file.is_blockdev else 'file'})")
        for dev, what in ((d, "data"), (m, "meta")):
            dev.lock(f"{what} device")
    except BaseException:
        for d in owned:
            d.close()
        raise
    return devs[0], devs[1], owned


@contextmanager
def closing_on_error(owned: list[BlockDevice]):
    """Closes the devices `open_pair` opened if the block raises (they stay open, and
    owned by what the block made of them, if it does not)."""
    try:
        yield
    except BaseException:
        for dev in owned:
            dev.close()
        raise


def check_unowned(path: str, what: str) -> None:
    """Raise DeviceBusyError if the device at `path` is owned now (by an open SwornDisk,
    a mount, ...), so a front end can refuse before it asks questions or forks. Only a
    hint: the owner may change right after; `open_pair` is the check that counts. A
    regular file is tested without being locked (F_OFD_GETLK); a block device is claimed
    with O_EXCL for a moment."""
    if stat.S_ISBLK(os.stat(path).st_mode):
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            raise busy_error(path, what) from None
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        held = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK))
    finally:
        os.close(fd)
    if struct.unpack("hhqqi4x", held)[0] != fcntl.F_UNLCK:
        raise busy_error(path, what)


def create_image(path: str, size: int) -> None:
    """Create (or extend) a sparse regular file of `size` bytes."""
    with open(path, "ab") as f:
        if os.fstat(f.fileno()).st_size < size:
            f.truncate(size)


__all__ = ["BlockDevice", "CountingDevice", "FileDevice", "MemoryDevice", "as_device", "direct_file",
           "check_unowned", "closing_on_error", "create_image", "open_pair"]
