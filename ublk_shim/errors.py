"""The shim's exceptions. Each carries a one-line message a CLI can print as is."""
from __future__ import annotations

import errno as _errno
import os

from .sys import UBLK_CONTROL_PATH


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

    def __init__(self, path: str = UBLK_CONTROL_PATH):
        super().__init__(_errno.ENODEV,
                         f"the ublk driver is not available (no {path}): run 'modprobe "
                         "ublk_drv' as root; the kernel needs CONFIG_BLK_DEV_UBLK=m or =y "
                         "(Linux 6.0 or later)")


class NotRoot(UblkError):
    """The caller lacks the privilege ublk requires (root, CAP_SYS_ADMIN)."""

    def __init__(self, message: str = "must be run as root (creating ublk devices needs "
                                      "CAP_SYS_ADMIN)"):
        super().__init__(_errno.EPERM, message)
