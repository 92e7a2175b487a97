"""The exceptions of the public API.

Everything the engine raises on purpose derives from SwornDiskError; those that
correspond to an errno (EIO, ENOSPC, EBUSY) are also OSErrors so that a front end can
turn them into a request result or an exit status without a lookup table.
"""
from __future__ import annotations

import errno


class SwornDiskError(Exception):
    """Base class: the disk cannot do what was asked."""


class IntegrityError(SwornDiskError, OSError):
    """Authenticated data failed to verify: tampering, replay or corruption."""

    def __init__(self, message: str):
        SwornDiskError.__init__(self, message)
        OSError.__init__(self, errno.EIO, message)

    def __str__(self) -> str:
        return self.strerror


class WrongKeyError(SwornDiskError):
    """The key or passphrase opens none of the disk's key slots."""


class KeyKindError(WrongKeyError):
    """The disk has no key slot of the kind given: a key file for a disk with passphrase
    slots only, or the reverse. The message says which kind it wants."""


class RollbackError(SwornDiskError):
    """The disk's committed state is older than its anchor says it was: the data and meta
    devices were rolled back to an earlier consistent state (or replaced by an old copy).
    `disk_seq` and `anchor_seq` are the two commit sequence numbers."""

    def __init__(self, message: str, disk_seq: int | None = None, anchor_seq: int | None = None):
        super().__init__(message)
        self.disk_seq, self.anchor_seq = disk_seq, anchor_seq


class AnchorError(RollbackError):
    """The anchor cannot vouch for the disk: the file is missing, is not an anchor, belongs
    to another disk or fails authentication. Rollback detection never passes silently, so
    this refuses the open like a rollback does (accept_rollback=True replaces the anchor)."""


class NoSpaceError(SwornDiskError, OSError):
    """The data or meta device is full: live data plus the cleaning reserve do not fit."""

    def __init__(self, message: str):
        SwornDiskError.__init__(self, message)
        OSError.__init__(self, errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


class MetadataFullError(SwornDiskError):
    """An internal region of the meta device (journal, index, segment table, checkpoint
    slot) ran out. Never a user's "disk full": the layout sizes these regions for the
    worst case, so this means a sizing defect or a damaged layout; the disk stops (it
    latches as failed) and reopening recovers to the last flush."""


class DeviceBusyError(SwornDiskError, OSError):
    """A data or meta device is owned by someone else: another open SwornDisk (any path to
    the same file), a mounted file system or another exclusive user of a block device. Two
    writers on one disk destroy it, so the engine refuses; the message names the device
    and, where it could be found, the holder."""

    def __init__(self, message: str):
        SwornDiskError.__init__(self, message)
        OSError.__init__(self, errno.EBUSY, message)

    def __str__(self) -> str:
        return self.strerror


class UnsupportedFormatError(SwornDiskError):
    """The meta device holds a SwornDisk of a format version, or with a required feature,
    that this code does not know: it is refused rather than misread."""


class NotFormattedError(SwornDiskError):
    """The meta device holds no SwornDisk at all (no superblock magic)."""


class DiskClosedError(SwornDiskError):
    """The disk was closed, or failed and was shut down."""


class ReadOnlyError(SwornDiskError, OSError):
    """A write reached a disk opened read-only (`open(..., read_only=True)`, for `check`)."""

    def __init__(self, message: str):
        SwornDiskError.__init__(self, message)
        OSError.__init__(self, errno.EROFS, message)

    def __str__(self) -> str:
        return self.strerror


class InvalidArgument(ValueError):
    """A caller's argument is out of range or misaligned; the message names the limit."""


class DeviceTooSmall(InvalidArgument):
    """A data or meta device cannot hold the requested disk; the message gives the minimum."""


class MetaTooSmall(DeviceTooSmall):
    """The meta device cannot hold the regions a grown disk needs (resize.py)."""

    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = needed          # bytes the meta device must have
