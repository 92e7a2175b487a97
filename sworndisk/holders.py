"""The refusal of a device that has another owner: a DeviceBusyError naming the holder.

The lock (`FileDevice.lock`) is the authority on who owns a device; this only finds the
owner for a human, on the error path, through the shim's `ublk_shim.holders` (/proc and
/sys, no device opened). A holder it cannot see (another pid namespace, hidepid) leaves
the message saying only that the device is taken.
"""
from __future__ import annotations

import os
import stat

from ublk_shim import holders

from .errors import DeviceBusyError


def busy_error(path: str, what: str, own_fd: int | None = None) -> DeviceBusyError:
    """The refusal for `what` ('data device', ...) at `path`, naming the holder if found;
    `own_fd` is the refused caller's own descriptor of the device, not a holder."""
    try:
        is_blockdev = stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        is_blockdev = False
    if is_blockdev:
        users = holders.block_users(path, own_fd=own_fd)
        who = (", ".join(users) if users else
               "claimed exclusively by another user (a mount, device mapper, md or another "
               "SwornDisk)")
    else:
        try:
            pids = holders.lock_holders(path)
        except OSError:
            pids = []
        who = ("locked by " + ", ".join(holders.describe(pid) for pid in pids) if pids else
               "locked by another process (not visible in /proc here)")
    real = os.path.realpath(path)
    name = path if real == os.path.abspath(path) else f"{path} (= {real})"
    return DeviceBusyError(f"{what} {name} is in use: {who}")
