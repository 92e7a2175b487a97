"""Who is using a block device: mounts, stacked devices, swap and processes with it open.

`del` must never pull a device from under a mounted file system or a program that has it
open (the kernel would let it: STOP_DEV fails their I/O), and must never hang either.  So
it asks first, like fuser(1)/lsof would, and reports the users by name.  Only /proc and
/sys are read: nothing here opens the device, which could block if its server is dead.
"""
from __future__ import annotations

import os
import stat
from typing import List, Optional


def _rdev(path: str) -> Optional[int]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def _mounts(rdev: int) -> List[str]:
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[2] == want:
                    found.append(f"mounted on {fields[4]}")
    except OSError:
        pass
    return found


def _holders(name: str) -> List[str]:
    try:
        return [f"held by {h}" for h in sorted(os.listdir(f"/sys/block/{name}/holders"))]
    except OSError:
        return []


def _swaps(path: str) -> List[str]:
    try:
        with open("/proc/swaps") as f:
            return ["used as swap" for line in f if line.split()[:1] == [path]]
    except OSError:
        return []


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _openers(rdev: int) -> List[str]:
    me = os.getpid()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode) and st.st_rdev == rdev:
                found.append(f"open by pid {pid} ({_comm(pid)})")
                break
    return found


def device_users(path: str) -> List[str]:
    """Human descriptions of everything using block device `path`; empty if unused."""
    rdev = _rdev(path)
    if rdev is None:
        return []
    return (_mounts(rdev) + _holders(os.path.basename(path)) + _swaps(path)
            + _openers(rdev))
