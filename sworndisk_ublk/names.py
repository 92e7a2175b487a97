"""Disk names: the stable path /dev/sworndisk/NAME -> /dev/ublkbN.

The kernel numbers ublk devices in the order they are added, so a number cannot go in an
fstab line or a script; a name can. The name lives in the server's state file (state.py),
which is what `list`, `status`, `del` and `recover` resolve it by; the symlink is only for
people and fstab. It is made once the device is live, removed when the device is deleted,
and left alone when a recoverable server dies (the device, and so the link, stays).

The link is never followed: a link left by a killed server may point anywhere by the time
it is replaced (a device number reused by another disk, or nothing), so it is read with
lstat/readlink only, and replaced by renaming a new link over it (atomic: no moment
without a link, no window in which another file could be put in its place and opened).
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from typing import Optional

from .errors import CliError, ExitCode

DEFAULT_LINK_DIR = "/dev/sworndisk"
MAX_NAME_BYTES = 64
_WHITESPACE = re.compile(r"\s")


def link_dir() -> str:
    """The directory of the links; tests point SWORNDISK_LINK_DIR elsewhere."""
    return os.environ.get("SWORNDISK_LINK_DIR") or DEFAULT_LINK_DIR


def link_path(name: str) -> str:
    return os.path.join(link_dir(), name)


def name_problem(name: str) -> Optional[str]:
    """Why `name` cannot name a disk, or None if it can."""
    if not name:
        return "a disk name must not be empty"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"disk name {name!r} is longer than {MAX_NAME_BYTES} bytes"
    if "/" in name:
        return f"disk name {name!r} holds a '/'"
    if _WHITESPACE.search(name):
        return f"disk name {name!r} holds whitespace"
    if name[0] in ".-":
        return f"disk name {name!r} starts with {name[0]!r}"
    if "\0" in name:
        return "a disk name must not hold a NUL byte"
    return None


def validate_name(name: str) -> str:
    """`name`, or a one-line CliError saying what is wrong with it."""
    problem = name_problem(name)
    if problem:
        raise CliError(f"{problem}: use up to {MAX_NAME_BYTES} bytes without '/' or "
                       f"whitespace, not starting with '.' or '-'", ExitCode.USAGE)
    return name


def name_of_path(text: str) -> Optional[str]:
    """NAME if `text` is the link path /dev/sworndisk/NAME (not resolved: never followed)."""
    directory, base = os.path.split(os.path.normpath(text))
    if directory == os.path.normpath(link_dir()) and base and name_problem(base) is None:
        return base
    return None


def _ensure_dir() -> str:
    directory = link_dir()
    os.makedirs(directory, mode=0o755, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):      # a symlink or file in its place: do not follow it
        raise CliError(f"{directory} is not a directory; remove it so that disk names "
                       f"can be made there", ExitCode.FAILED)
    return directory


def read_link(name: str) -> Optional[str]:
    """Where /dev/sworndisk/NAME points (not followed), or None if it is not a symlink."""
    try:
        return os.readlink(link_path(name))
    except (FileNotFoundError, OSError):
        return None


def check_link_free(name: str) -> None:
    """Refuse early a name whose path holds something other than a symlink (make_link would
    refuse it once the device is live)."""
    path = link_path(name)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISLNK(st.st_mode):
        raise CliError(f"{path} exists and is not a symlink; remove it to use the name "
                       f"{name!r}", ExitCode.BUSY)


def make_link(name: str, device: str) -> str:
    """Point /dev/sworndisk/NAME at `device`, replacing whatever link is there by an atomic
    rename. Refuses to replace anything but a symlink (a real file there is not ours)."""
    directory = _ensure_dir()
    path = os.path.join(directory, name)
    check_link_free(name)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(device, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def remove_link(name: str, device: str) -> None:
    """Remove /dev/sworndisk/NAME if it is a symlink to `device` (a newer disk's link of the
    same name, or anything that is not our link, is left alone)."""
    if read_link(name) != device:
        return
    try:
        os.unlink(link_path(name))
    except FileNotFoundError:
        pass


def announce(device: str) -> None:
    """Ask udev to look at `device` again (a change event), so that the rule of
    contrib/udev/99-sworndisk.rules, which reads the name the server just recorded, adds
    /dev/sworndisk/NAME as the device's symlink: systemd then knows the device by that
    name, as an fstab line naming it needs. Nothing happens without udev."""
    udevadm = shutil.which("udevadm")
    if udevadm is None or not os.path.exists("/run/udev/control"):
        return
    try:
        subprocess.run([udevadm, "trigger", "--action=change", device], timeout=10,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError):
        pass
