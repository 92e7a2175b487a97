"""ublk_shim.holders: who uses a device or an image, and whether a process is alive."""
from __future__ import annotations

import fcntl
import os
import struct
import subprocess

from ublk_shim import holders
from ublk_shim.sys import UBLK_BLOCK_PATH, block_dev_id


def test_pid_alive_knows_reused_pids_and_zombies():
    me = os.getpid()
    assert holders.pid_alive(me) and holders.pid_alive(me, holders.start_time(me))
    assert not holders.pid_alive(me, holders.start_time(me) + 1)      # the pid was reused
    assert not holders.pid_alive(2 ** 22 + 12345) and not holders.pid_alive(0)
    assert holders.start_time(2 ** 22 + 12345) is None
    child = subprocess.Popen(["true"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)           # exited, not reaped
    try:
        assert holders.start_time(child.pid) is not None
        assert not holders.pid_alive(child.pid)                      # a zombie
    finally:
        child.wait()


def test_lock_holders_and_describe(tmp_path):
    img = tmp_path / "img"
    img.write_bytes(bytes(4096))
    os.link(img, tmp_path / "other-name")
    assert holders.lock_holders(str(img)) == []
    fd = os.open(img, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
        assert holders.lock_holders(str(tmp_path / "other-name")) == [os.getpid()]
    finally:
        os.close(fd)
    assert holders.describe(os.getpid()).endswith(", this process)")


def test_block_users_of_what_is_not_a_block_device_is_nobody(tmp_path):
    img = tmp_path / "img"
    img.write_bytes(b"")
    assert holders.block_devices(str(img)) == {} and holders.block_users(str(img)) == []
    assert holders.block_users(str(tmp_path / "missing")) == []


def test_block_device_numbers():
    assert UBLK_BLOCK_PATH.format(3) == "/dev/ublkb3"
    assert [block_dev_id(p) for p in ("/dev/ublkb3", "ublkb12", "/dev/ublkc3", "/dev/sda",
                                      "/dev/ublkb", "3")] == [3, 12, None, None, None, None]
