"""Who uses a device: mounts, stacked block devices, swap, processes that have it open or
hold a lock on an image file; and whether a process is alive.

One implementation for every caller: the engine names the holder in a DeviceBusyError,
the CLI refuses `del` of a device in use, the control plane names who keeps a deleted
device open. Deciding what a use forbids is the callers' business; this module only finds
and names the users. It reads /proc and /sys and never opens a device, which could block
if the device's server is dead. A process in another pid namespace, or hidden by /proc's
hidepid, is not seen; mounts are those of this process's mount namespace.
"""
from __future__ import annotations

import os
import re
import stat
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from . import sys as uapi

_UBLK_CHAR = re.compile(uapi.UBLK_CHAR_PATH.format(r"(\d+)"))      # /dev/ublkcN


# --- processes ------------------------------------------------------------------------------

def _proc_stat(pid: int) -> Optional[Tuple[str, int]]:
    """(state letter, start time in clock ticks since boot) from /proc/PID/stat, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[19])       # fields 3 and 22 overall


def start_time(pid: int) -> Optional[int]:
    """When `pid` started (clock ticks since boot), or None if there is no such process.
    A pid alone is no proof of identity (pids are reused); a pid and its start time are."""
    found = _proc_stat(pid) if pid > 0 else None
    return None if found is None else found[1]


def pid_alive(pid: int, started: Optional[int] = None) -> bool:
    """True if `pid` runs and is not a zombie (which has already released its files), and,
    given `started`, is the process that started then."""
    found = _proc_stat(pid) if pid > 0 else None
    return (found is not None and found[0] != "Z"
            and (started is None or found[1] == started))


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _fds(pid: int) -> List[str]:
    try:
        return os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []


def served_devices(pid: int) -> List[str]:
    """The /dev/ublkbN that process `pid` serves: a ublk server keeps /dev/ublkcN open."""
    found = set()
    for fd in _fds(pid):
        try:
            m = _UBLK_CHAR.fullmatch(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
        if m:
            found.add(uapi.UBLK_BLOCK_PATH.format(m.group(1)))
    return sorted(found)


def describe(pid: int) -> str:
    """'pid 123 (python3, serving /dev/ublkb0)': enough to find and stop the holder."""
    notes = [_comm(pid)] + [f"serving {dev}" for dev in served_devices(pid)]
    if pid == os.getpid():
        notes.append("this process")
    return f"pid {pid} ({', '.join(notes)})"


def _open_fds(match: Callable[[os.stat_result], bool]) -> Iterator[Tuple[int, str]]:
    """(pid, fd) of every open file descriptor whose target's stat satisfies `match`."""
    pids = sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
    for pid in pids:
        for fd in _fds(pid):
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if match(st):
                yield pid, fd


# --- image files ----------------------------------------------------------------------------

def _holds_lock(pid: int, fd: str) -> bool:
    """/proc/PID/fdinfo lists the locks owned by the open file behind fd (OFD and flock)."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            return any(line.startswith("lock:") for line in f)
    except OSError:
        return False


def lock_holders(path: str) -> List[int]:
    """Pids that hold a lock on the regular file `path`, whatever name they opened it by."""
    want = os.stat(path)
    same = (lambda st: stat.S_ISREG(st.st_mode) and st.st_dev == want.st_dev
            and st.st_ino == want.st_ino)
    return sorted({pid for pid, fd in _open_fds(same) if _holds_lock(pid, fd)})


# --- block devices --------------------------------------------------------------------------

def block_devices(path: str) -> Dict[int, str]:
    """The block device at `path` and its partitions, as {rdev: name}, the device itself
    named ''; empty if `path` is not a block device. Taken before a device is removed,
    it still finds the processes that keep the removed device open (`openers`)."""
    try:
        st = os.stat(path)
    except OSError:
        return {}
    if not stat.S_ISBLK(st.st_mode):
        return {}
    found = {st.st_rdev: ""}
    sysdir = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    try:
        names = sorted(os.listdir(sysdir))
    except OSError:
        return found
    for name in names:
        if not os.path.exists(f"{sysdir}/{name}/partition"):
            continue
        try:
            with open(f"{sysdir}/{name}/dev") as f:
                major, minor = f.read().split(":")
        except (OSError, ValueError):
            continue
        found[os.makedev(int(major), int(minor))] = name
    return found


def _unescape(path: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are octal escapes there."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _mounts(rdev: int) -> List[str]:
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    try:
        with open("/proc/self/mountinfo") as f:
            return [f"mounted on {_unescape(fields[4])}" for fields in map(str.split, f)
                    if len(fields) > 4 and fields[2] == want]
    except OSError:
        return []


def _stacked(rdev: int) -> List[str]:
    """Block devices stacked on this one (device mapper, md, ...)."""
    try:
        names = os.listdir(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/holders")
    except OSError:
        return []
    return [f"held by {name}" for name in sorted(names)]


def _swaps(rdev: int) -> List[str]:
    try:
        with open("/proc/swaps") as f:
            paths = [line.split()[0] for line in f.readlines()[1:] if line.split()]
    except OSError:
        return []
    found = []
    for p in paths:
        try:
            if os.stat(_unescape(p)).st_rdev == rdev:
                found.append("used as swap")
        except OSError:
            continue
    return found


def openers(devices: Dict[int, str], own_fd: Optional[int] = None) -> List[int]:
    """Pids with one of `devices` (see block_devices) open, this process included unless
    `own_fd` is its only descriptor of them (the caller's own open is not a user)."""
    mine = (os.getpid(), str(own_fd))
    return sorted({pid for pid, fd in _open_fds(
        lambda s: stat.S_ISBLK(s.st_mode) and s.st_rdev in devices) if (pid, fd) != mine})


def transport(devices: Dict[int, str]) -> List[int]:
    """The pids that carry `devices` (see block_devices) rather than use them: the client
    of a network block device. `qemu-nbd -c` (and nbd-client in ioctl mode) keeps its
    /dev/nbdN open for as long as the connection lasts, in the process whose thread runs
    the NBD_DO_IT ioctl; the kernel names that thread in /sys/block/nbdN/pid."""
    pids = set()
    for rdev, part in devices.items():
        if part:
            continue
        try:
            with open(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/pid") as f:
                tid = int(f.read())
            with open(f"/proc/{tid}/status") as f:
                pids.update(int(line.split()[1]) for line in f if line.startswith("Tgid:"))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(pids)


def block_users(path: str, *, with_openers: bool = True,
                own_fd: Optional[int] = None) -> List[str]:
    """Everything using block device `path` or a partition of it, one phrase each:
    'mounted on /mnt', 'held by dm-0', 'used as swap', 'open by pid 123 (dd)' (a
    partition's prefixed with its name: 'ublkb0p1 mounted on /mnt'); with_openers=False
    leaves out the processes (the /proc scan). The device's own transport (`transport`:
    an NBD client) is not a user. Empty if unused or not a block device."""
    devices = block_devices(path)
    found = []
    for rdev, part in devices.items():
        prefix = f"{part} " if part else ""
        found += [prefix + use for use in _mounts(rdev) + _stacked(rdev) + _swaps(rdev)]
    if with_openers:
        carriers = transport(devices)
        found += [f"open by {describe(pid)}" for pid in openers(devices, own_fd)
                  if pid not in carriers]
    return found


__all__ = ["block_devices", "block_users", "describe", "lock_holders", "openers",
           "pid_alive", "served_devices", "start_time", "transport"]
