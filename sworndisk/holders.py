"""Who holds a device: the holder named in a DeviceBusyError, the users `del` waits for.

The lock (`FileDevice.lock`) is the authority on who owns a device; this module only finds
the owner for a human, on the error path. It reads /proc and /sys and opens no device, so
it cannot block on a device whose server is dead. A holder in another pid namespace, or
hidden by /proc's hidepid, is not found: the message then says only that the device is
taken.
"""
from __future__ import annotations

import os
import re
import stat
from typing import Callable, Iterator

from .errors import DeviceBusyError

_UBLK_CHAR = re.compile(r"/dev/ublkc(\d+)")


def _pids() -> list[int]:
    return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())


def _fds(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def served_ublk(pid: int) -> list[str]:
    """The /dev/ublkbN that process `pid` serves: a ublk server keeps /dev/ublkcN open."""
    found = set()
    for fd in _fds(pid):
        try:
            m = _UBLK_CHAR.fullmatch(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if m:
            found.add(f"/dev/ublkb{m.group(1)}")
    return sorted(found)


def describe(pid: int) -> str:
    """'pid 123 (python3, serving /dev/ublkb0)': enough to find and stop the holder."""
    notes = [_comm(pid)] + [f"serving {dev}" for dev in served_ublk(pid)]
    if pid == os.getpid():
        notes.append("this process")
    return f"pid {pid} ({', '.join(notes)})"


def _open_fds(match: Callable[[os.stat_result], bool]) -> Iterator[tuple[int, str]]:
    """(pid, fd) of every open file descriptor whose target's stat satisfies `match`."""
    for pid in _pids():
        for fd in _fds(pid):
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if match(st):
                yield pid, fd


def _holds_lock(pid: int, fd: str) -> bool:
    """/proc/PID/fdinfo lists the locks owned by the open file behind fd (OFD and flock)."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            return any(line.startswith("lock:") for line in f)
    except OSError:
        return False


def lock_holders(path: str) -> list[int]:
    """Pids that hold a lock on the regular file `path`, whatever name they opened it by."""
    want = os.stat(path)
    same = (lambda st: stat.S_ISREG(st.st_mode) and st.st_dev == want.st_dev
            and st.st_ino == want.st_ino)
    return sorted({pid for pid, fd in _open_fds(same) if _holds_lock(pid, fd)})


def _mounts(rdev: int) -> list[str]:
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            return [f"mounted on {fields[4]}" for fields in map(str.split, f)
                    if len(fields) > 4 and fields[2] == want]
    except OSError:
        return []


def _stacked(rdev: int) -> list[str]:
    """Block devices stacked on this one (device mapper, md, ...)."""
    try:
        names = os.listdir(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/holders")
    except OSError:
        return []
    return [f"held by {name}" for name in sorted(names)]


def _swaps(rdev: int) -> list[str]:
    try:
        with open("/proc/swaps") as f:
            paths = [line.split()[0] for line in f.readlines()[1:] if line.split()]
    except OSError:
        return []
    found = []
    for p in paths:
        try:
            if os.stat(p).st_rdev == rdev:
                found.append("used as swap")
        except OSError:
            continue
    return found


def block_users(path: str, own_fd: int | None = None) -> list[str]:
    """Everything using block device `path`: mounts, stacked devices, swap, and processes
    that have it open (this one included, marked so, unless `own_fd` is its only
    descriptor of it: the caller's own); empty if unused or not a block device."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    if not stat.S_ISBLK(st.st_mode):
        return []
    rdev = st.st_rdev
    mine = (os.getpid(), str(own_fd))
    openers = sorted({pid for pid, fd in _open_fds(
        lambda s: stat.S_ISBLK(s.st_mode) and s.st_rdev == rdev) if (pid, fd) != mine})
    return (_mounts(rdev) + _stacked(rdev) + _swaps(rdev)
            + [f"open by {describe(pid)}" for pid in openers])


def busy_error(path: str, what: str, own_fd: int | None = None) -> DeviceBusyError:
    """The refusal for `what` ('data device', ...) at `path`, naming the holder if found;
    `own_fd` is the refused caller's own descriptor of the device, not a holder."""
    try:
        is_blockdev = stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        is_blockdev = False
    if is_blockdev:
        users = block_users(path, own_fd)
        who = (", ".join(users) if users else
               "claimed exclusively by another user (a mount, device mapper, md or another "
               "SwornDisk)")
    else:
        try:
            pids = lock_holders(path)
        except OSError:
            pids = []
        who = ("locked by " + ", ".join(describe(pid) for pid in pids) if pids else
               "locked by another process (not visible in /proc here)")
    real = os.path.realpath(path)
    name = path if real == os.path.abspath(path) else f"{path} (= {real})"
    return DeviceBusyError(f"{what} {name} is in use: {who}")
