"""SwornDisk: a log-structured secure block device.

    from sworndisk import SwornDisk
    with SwornDisk.create("data.img", "meta.img", key) as disk:
        disk.write(0, b"x" * 4096)
        disk.flush()
"""
from .config import Config
from .format import BLOCK_SIZE
from .device import BlockDevice, FileDevice, MemoryDevice
from .errors import (AnchorError, DeviceBusyError, DeviceTooSmall, DiskClosedError,
                     IntegrityError, InvalidArgument, KeyKindError, MetadataFullError,
                     NoSpaceError, NotFormattedError, ReadOnlyError, RollbackError,
                     SwornDiskError, UnsupportedFormatError, WrongKeyError)

__all__ = [
    "SwornDisk", "Config", "BLOCK_SIZE", "BlockDevice", "FileDevice", "MemoryDevice",
    "SwornDiskError", "IntegrityError", "WrongKeyError", "NoSpaceError", "NotFormattedError",
    "MetadataFullError", "UnsupportedFormatError", "KeyKindError", "RollbackError",
    "AnchorError", "ReadOnlyError",
    "DiskClosedError", "DeviceBusyError", "InvalidArgument", "DeviceTooSmall",
]


def __getattr__(name):
    # The engine is imported lazily so that `import sworndisk` stays cheap for tools that
    # only need the device layer or the errors.
    if name == "SwornDisk":
        from .disk import SwornDisk
        return SwornDisk
    raise AttributeError(name)
