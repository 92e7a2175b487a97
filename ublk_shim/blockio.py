"""Block I/O on the host: a regular file or a block device opened for direct I/O.

The one layer under the engine's FileDevice and the shim's LoopTarget (and the CLI's size
check). A file and a block device differ in exactly these places, so they are written once
here: how to open one (O_DIRECT, buffered where the filesystem refuses it, e.g. tmpfs), its
size (BLKGETSIZE64 or st_size), what it is (identity), and the range operations (discard:
BLKDISCARD or a punched hole; zeroing: BLKZEROOUT or a zeroed range, else written zeros).
Reading and writing stay with the callers: each has buffers and batching of its own.

Standard library only; nothing here knows about ublk or the engine.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct

from . import sys as uapi

DIRECT_ALIGN = 4096             # buffer, offset and length alignment that O_DIRECT accepts
                                # on any device (the page size: mmap buffers have it)
_BLKGETSIZE64 = 0x80081272
_BLKDISCARD = 0x1277
_BLKZEROOUT = 0x127F
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL)   # the store cannot do it
_ZERO_CHUNK = 1 << 20

uapi.libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class NotStorageError(OSError):
    """The path names neither a regular file nor a block device (EINVAL)."""

    def __init__(self, path: str):
        super().__init__(errno.EINVAL, f"{path}: not a regular file or block device")

    def __str__(self) -> str:
        return str(self.strerror)


def storage_stat(path: str) -> os.stat_result:
    """stat() of a path that must be a regular file or a block device; FileNotFoundError
    and PermissionError come from os.stat as they are, NotStorageError for anything else."""
    st = os.stat(path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise NotStorageError(path)
    return st


def identity(st: os.stat_result) -> tuple:
    """What a stat result names: ('blk', rdev) or ('file', st_dev, st_ino), so that two
    paths to one device or file (a symlink, a hard link) compare equal."""
    return ("blk", st.st_rdev) if stat.S_ISBLK(st.st_mode) else ("file", st.st_dev, st.st_ino)


def size_of(fd: int) -> int:
    """Size in bytes of an open regular file or block device."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        return struct.unpack("=Q", fcntl.ioctl(fd, _BLKGETSIZE64, bytes(8)))[0]
    return os.fstat(fd).st_size


def path_size(path: str) -> int:
    """Size in bytes of the regular file or block device at `path` (opened read-only)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return size_of(fd)
    finally:
        os.close(fd)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    uapi.check_syscall(uapi.libc.fallocate(fd, mode, offset, length), "fallocate")


class BlockFile:
    """A regular file or block device, open for block I/O: `fd`, `size` (bytes, at open),
    `direct` (O_DIRECT in effect), `is_blockdev`, `readonly`.

    With direct=True the file is opened O_DIRECT, and buffered where the filesystem
    refuses it at open (EINVAL, EOPNOTSUPP) or at the first read (EINVAL): durability is
    the same (the callers fdatasync), only the page cache is used. With O_DIRECT every
    buffer, offset and length must be DIRECT_ALIGN-aligned.
    """

    def __init__(self, path: str, *, readonly: bool = False, direct: bool = True):
        self.path = os.fspath(path)
        self.is_blockdev = stat.S_ISBLK(storage_stat(self.path).st_mode)
        self.readonly = readonly
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        self.fd = -1
        self.direct = False
        if direct:
            try:
                self.fd = os.open(self.path, flags | os.O_DIRECT)
                self.direct = True
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        try:
            if self.fd < 0:
                self.fd = os.open(self.path, flags)
            self.size = size_of(self.fd)
            if self.direct and not self._direct_reads():
                os.close(self.fd)
                self.fd = -1
                self.fd = os.open(self.path, flags)
                self.direct = False
        except BaseException:
            self.close()
            raise

    def _direct_reads(self) -> bool:
        """Some filesystems accept O_DIRECT at open but fail the first read with EINVAL."""
        if self.size < DIRECT_ALIGN:
            return True
        with mmap.mmap(-1, DIRECT_ALIGN) as buf:
            try:
                os.preadv(self.fd, [buf], 0)
                return True
            except OSError as e:
                if e.errno == errno.EINVAL:
                    return False
                raise

    @property
    def identity(self) -> tuple:
        """What the path names (see `identity`): equal for two paths to one device."""
        return identity(os.fstat(self.fd))

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range: BLKDISCARD, or a punched hole in a file. Where the store
        cannot discard, nothing happens; other errors (EIO, ...) are raised."""
        try:
            if self.is_blockdev:
                fcntl.ioctl(self.fd, _BLKDISCARD, struct.pack("=QQ", offset, length))
            else:
                _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = True) -> None:
        """Make a range read as zeros: BLKZEROOUT, or a punched (unmap) or zeroed (keep the
        blocks allocated) range of a file; where the store has neither, zeros are written."""
        try:
            if self.is_blockdev:
                fcntl.ioctl(self.fd, _BLKZEROOUT, struct.pack("=QQ", offset, length))
            else:
                mode = _FALLOC_FL_PUNCH_HOLE if unmap else _FALLOC_FL_ZERO_RANGE
                _fallocate(self.fd, mode | _FALLOC_FL_KEEP_SIZE, offset, length)
            return
        except OSError as e:
            if e.errno not in _UNSUPPORTED or length <= 0:
                raise
        with mmap.mmap(-1, min(length, _ZERO_CHUNK)) as zeros:   # page aligned, zero filled
            view = memoryview(zeros)
            try:
                end = offset + length
                while offset < end:
                    offset += os.pwritev(self.fd, [view[:min(len(view), end - offset)]], offset)
            finally:
                view.release()

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


__all__ = ["DIRECT_ALIGN", "BlockFile", "NotStorageError", "identity", "path_size",
           "size_of", "storage_stat"]
