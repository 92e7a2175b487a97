"""The shim's exceptions. Each carries a one-line message a CLI can print as is."""
from __future__ import annotations

import errno as _errno
import os


class UblkError(OSError):
    """A ublk operation failed; `errno` is the kernel's (or ours), str() is one line."""

    def __init__(self, err: int, message: str):
        super().__init__(err, message)

    def __str__(self) -> str:
        return str(self.strerror)

    @classmethod
    def from_result(cls, res: int, what: str) -> "UblkError":
        """The exception for a negative command result `res` of operation `what`."""
        err = -res
        if err == _errno.EPERM:
            return NotRoot(f"{what}: operation not permitted (ublk needs root / CAP_SYS_ADMIN)")
        return cls(err, f"{what}: {os.strerror(err)}")


class DriverMissing(UblkError):
    """/dev/ublk-control does not exist: the ublk driver is not loaded or not built."""

    def __init__(self, path: str = "/dev/ublk-control"):
        super().__init__(_errno.ENODEV,
                         f"{path} not found: load the ublk driver with `modprobe ublk_drv` "
                         "(needs Linux >= 6.0 built with CONFIG_BLK_DEV_UBLK)")


class NotRoot(UblkError):
    """The caller lacks the privilege ublk requires (root, CAP_SYS_ADMIN)."""

    def __init__(self, message: str = "ublk needs root (CAP_SYS_ADMIN): run as root"):
        super().__init__(_errno.EPERM, message)
