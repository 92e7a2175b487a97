"""Who is using a block device: mounts, stacked devices, swap and processes with it open.

`del` must never pull a device from under a mounted file system or a program that has it
open (the kernel would let it: STOP_DEV fails their I/O), and must never hang either.  So
it asks first, like fuser(1)/lsof would, and reports the users by name.  Only /proc and
/sys are read: nothing here opens the device, which could block if its server is dead.
The engine names the holder of a busy data or meta device the same way
(`sworndisk.holders`), so this is that code.
"""
from __future__ import annotations

from typing import List


def device_users(path: str) -> List[str]:
    """Human descriptions of everything using block device `path`; empty if unused."""
    from sworndisk.holders import block_users      # late: see cli.py
    return block_users(path)
