"""Control plane: commands on /dev/ublk-control, and module-level helpers for tools.

    from ublk_shim import ctrl
    ctrl.driver_available() -> bool
    ctrl.list_devices() -> [DevInfo, ...]
    ctrl.get_dev_info(dev_id) -> DevInfo
    ctrl.get_params(dev_id) -> DeviceParams
    ctrl.stop_device(dev_id)
    ctrl.delete_device(dev_id, timeout=10)   # never hangs: see delete()

Mechanism only: nothing here refuses a device that is mounted or open; whether that is
allowed is the caller's policy (`holders.block_users` says who uses a device).

Every command is an IORING_OP_URING_CMD on a private 128-byte-SQE ring (the 32-byte
`ublksrv_ctrl_cmd` does not fit a 64-byte SQE, and the driver rejects it with EINVAL).
Commands are issued one at a time under a lock and waited for with a timeout: START_DEV,
END_USER_RECOVERY and DEL_DEV block in the kernel (io_uring runs them on an io-wq worker),
and a timed-out command is cancelled with IORING_OP_ASYNC_CANCEL, which interrupts the
worker's interruptible wait.

Opcode encoding: kernels >= 6.4 take ioctl-encoded opcodes (UBLK_U_CMD_*), 6.0-6.3 only the
legacy numbers, and newer kernels accept legacy numbers only with
CONFIG_BLKDEV_UBLK_LEGACY_OPCODES. A Control starts undecided, settles on ioctl encoding as
soon as an ioctl-encoded command succeeds (GET_FEATURES is tried first), and falls back to the
legacy number once if an ioctl-encoded command fails while undecided. A failed command has
no effect in the driver, so trying it twice is harmless.
"""
from __future__ import annotations

import ctypes
import errno
import glob
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

from . import holders
from . import sys as uapi
from .errors import DriverMissing, NotRoot, UblkError
from .uring import Ring

DEFAULT_TIMEOUT = 30.0     # seconds; START_DEV reads the partition table through the server
CANCEL_GRACE = 5.0         # seconds to wait for a cancelled command to come back
_ENOTSUPP = 524            # kernel-internal "not supported", returned by early ublk drivers
_NOT_SUPPORTED = (errno.EOPNOTSUPP, _ENOTSUPP)
_ANY_QUEUE = 0xFFFF
_NEW_DEV_ID = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Decoded structures
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DevInfo:
    """`struct ublksrv_ctrl_dev_info`, decoded."""
    dev_id: int
    nr_queues: int
    queue_depth: int
    state: int               # UBLK_S_DEV_*: see state_name
    max_io_bytes: int
    pid: int                 # ublksrv_pid: the serving process (0 or stale when none)
    flags: int               # UBLK_F_* the kernel granted
    owner_uid: int
    owner_gid: int

    @classmethod
    def from_raw(cls, raw: uapi.UblksrvCtrlDevInfo) -> "DevInfo":
        return cls(dev_id=raw.dev_id, nr_queues=raw.nr_hw_queues, queue_depth=raw.queue_depth,
                   state=raw.state, max_io_bytes=raw.max_io_buf_bytes, pid=raw.ublksrv_pid,
                   flags=raw.flags, owner_uid=raw.owner_uid, owner_gid=raw.owner_gid)

    @property
    def state_name(self) -> str:
        return uapi.STATE_NAMES.get(self.state, f"state{self.state}")

    @property
    def recoverable(self) -> bool:
        return bool(self.flags & uapi.UBLK_F_USER_RECOVERY)

    @property
    def ioctl_encode(self) -> bool:
        """Whether FETCH/COMMIT use ioctl-encoded opcodes on this device."""
        return bool(self.flags & uapi.UBLK_F_CMD_IOCTL_ENCODE)

    @property
    def char_path(self) -> str:
        return uapi.UBLK_CHAR_PATH.format(self.dev_id)

    @property
    def block_path(self) -> str:
        return uapi.UBLK_BLOCK_PATH.format(self.dev_id)

    def describe(self) -> str:
        return (f"ublk {self.dev_id}: {self.state_name}, {self.nr_queues} queue(s) x "
                f"{self.queue_depth}, max io {self.max_io_bytes // 1024} KiB, pid {self.pid}, "
                f"flags {uapi.flag_names(self.flags)}")


@dataclass(frozen=True)
class DeviceParams:
    """The subset of `struct ublk_params` this shim sets: basic + discard (+ devt on read).

    Defaults are the SwornDisk device: 4 KiB blocks, a volatile write cache (so the kernel
    sends FLUSH) with FUA, DISCARD and WRITE_ZEROES in single-segment requests.
    """
    size: int                              # bytes
    logical_block_size: int = uapi.BLOCK_SIZE
    physical_block_size: int = uapi.BLOCK_SIZE
    max_io_bytes: int = 512 * 1024         # largest READ/WRITE the kernel sends
    volatile_cache: bool = True
    fua: bool = True
    read_only: bool = False
    rotational: bool = False
    discard: bool = True
    write_zeroes: bool = True
    max_discard_bytes: int = 256 << 20     # bounds the work one DISCARD/WRITE_ZEROES asks for
    disk_devt: Optional[tuple] = None      # (major, minor) of /dev/ublkbN, read back only

    def to_raw(self) -> uapi.UblkParams:
        p = uapi.UblkParams()
        p.types = uapi.UBLK_PARAM_TYPE_BASIC
        b = p.basic
        b.attrs = ((uapi.UBLK_ATTR_VOLATILE_CACHE if self.volatile_cache else 0)
                   | (uapi.UBLK_ATTR_FUA if self.fua and self.volatile_cache else 0)
                   | (uapi.UBLK_ATTR_READ_ONLY if self.read_only else 0)
                   | (uapi.UBLK_ATTR_ROTATIONAL if self.rotational else 0))
        b.logical_bs_shift = _log2(self.logical_block_size)
        b.physical_bs_shift = _log2(self.physical_block_size)
        b.io_min_shift = b.logical_bs_shift
        b.io_opt_shift = b.physical_bs_shift
        b.max_sectors = self.max_io_bytes >> uapi.SECTOR_SHIFT
        b.dev_sectors = self.size >> uapi.SECTOR_SHIFT
        if self.discard or self.write_zeroes:
            p.types |= uapi.UBLK_PARAM_TYPE_DISCARD
            d = p.discard
            sectors = self.max_discard_bytes >> uapi.SECTOR_SHIFT
            d.discard_granularity = self.logical_block_size
            d.max_discard_sectors = sectors if self.discard else 0
            d.max_write_zeroes_sectors = sectors if self.write_zeroes else 0
            d.max_discard_segments = 1
        # SET_PARAMS sends basic + discard; devt is read-only and must not be set.
        p.len = uapi.UblkParams.devt.offset
        return p

    @classmethod
    def from_raw(cls, p: uapi.UblkParams) -> "DeviceParams":
        b, d = p.basic, p.discard
        has_discard = bool(p.types & uapi.UBLK_PARAM_TYPE_DISCARD)
        devt = None
        if p.types & uapi.UBLK_PARAM_TYPE_DEVT and p.devt.disk_major:
            devt = (p.devt.disk_major, p.devt.disk_minor)
        return cls(size=b.dev_sectors << uapi.SECTOR_SHIFT,
                   logical_block_size=1 << b.logical_bs_shift,
                   physical_block_size=1 << b.physical_bs_shift,
                   max_io_bytes=b.max_sectors << uapi.SECTOR_SHIFT,
                   volatile_cache=bool(b.attrs & uapi.UBLK_ATTR_VOLATILE_CACHE),
                   fua=bool(b.attrs & uapi.UBLK_ATTR_FUA),
                   read_only=bool(b.attrs & uapi.UBLK_ATTR_READ_ONLY),
                   rotational=bool(b.attrs & uapi.UBLK_ATTR_ROTATIONAL),
                   discard=has_discard and d.max_discard_sectors > 0,
                   write_zeroes=has_discard and d.max_write_zeroes_sectors > 0,
                   max_discard_bytes=max(d.max_discard_sectors,
                                         d.max_write_zeroes_sectors) << uapi.SECTOR_SHIFT,
                   disk_devt=devt)


def _log2(n: int) -> int:
    if n <= 0 or n & (n - 1):
        raise ValueError(f"{n} is not a power of two")
    return n.bit_length() - 1


# --------------------------------------------------------------------------------------------
# The control device
# --------------------------------------------------------------------------------------------

class Control:
    """An open /dev/ublk-control with its command ring. Thread-safe (one command at a time)."""

    def __init__(self, path: str = uapi.UBLK_CONTROL_PATH):
        self.path = path
        if not os.path.exists(path):
            raise DriverMissing(path)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except PermissionError:
            raise NotRoot(f"cannot open {path}: ublk needs root (CAP_SYS_ADMIN)") from None
        except FileNotFoundError:
            raise DriverMissing(path) from None
        try:
            self._ring = Ring(4, flags=uapi.IORING_SETUP_SQE128)
        except BaseException:
            os.close(self.fd)
            raise
        self._lock = threading.Lock()
        self._seq = 0
        self._legacy: Optional[bool] = None     # None: encoding not known yet
        self.features: Optional[int] = self._probe_features()

    # ---- command transport ---------------------------------------------------------------

    def _probe_features(self) -> Optional[int]:
        """GET_FEATURES (Linux >= 6.5, ioctl-encoded only); None on older kernels."""
        buf = ctypes.c_uint64(0)
        try:
            self.command(uapi.UBLK_CMD_GET_FEATURES, _NEW_DEV_ID, addr=ctypes.addressof(buf),
                         length=uapi.UBLK_FEATURES_LEN, what="GET_FEATURES")
        except NotRoot:
            raise
        except UblkError:       # EOPNOTSUPP, ENOTSUPP, or ENODEV from 6.0-6.3 drivers
            return None
        return buf.value

    def command(self, nr: int, dev_id: int, *, addr: int = 0, length: int = 0, data: int = 0,
                timeout: float = DEFAULT_TIMEOUT, what: str = "") -> int:
        """Issue control command `nr` (a UBLK_CMD_* number) and return its result (>= 0).

        Raises UblkError (NotRoot for EPERM) naming `what` on failure, or ETIMEDOUT if the
        command did not complete within `timeout` seconds (it is cancelled then).
        """
        what = what or f"ublk control command {nr:#x}"
        with self._lock:
            legacy = bool(self._legacy)
            if nr not in uapi.LEGACY_CTRL_CMDS:
                legacy = False
            res = self._issue(uapi.ctrl_opcode(nr, legacy), dev_id, addr, length, data,
                              timeout, what)
            if res >= 0:
                if not legacy:
                    self._legacy = False
            elif self._legacy is None and not legacy and nr in uapi.LEGACY_CTRL_CMDS \
                    and res != -errno.ETIMEDOUT:
                res2 = self._issue(uapi.ctrl_opcode(nr, True), dev_id, addr, length, data,
                                   timeout, what)
                if -res2 not in _NOT_SUPPORTED:
                    self._legacy = True      # the kernel speaks legacy opcodes only
                    res = res2
        if res == -errno.ETIMEDOUT:
            raise UblkError(errno.ETIMEDOUT, f"{what}: no answer from the ublk driver within "
                                             f"{timeout:g} s (command cancelled)")
        if res < 0:
            raise UblkError.from_result(res, what)
        return res

    def _issue(self, cmd_op: int, dev_id: int, addr: int, length: int, data: int,
               timeout: float, what: str) -> int:
        """One round trip on the ring; -ETIMEDOUT after cancelling a command that hung."""
        cmd = uapi.UblksrvCtrlCmd(dev_id=dev_id & 0xFFFFFFFF, queue_id=_ANY_QUEUE,
                                  len=length, addr=addr, data=data)
        self._seq += 1
        tag = self._seq
        ring = self._ring
        ring.prep(uapi.IORING_OP_URING_CMD, fd=self.fd, off=cmd_op, user_data=tag,
                  cmd=bytes(cmd))
        res = self._wait_for(tag, timeout)
        if res is not None:
            return res
        # Timed out: cancel it. The cancel interrupts an interruptible wait in the driver
        # (START_DEV, DEL_DEV, END_USER_RECOVERY), and the command then completes.
        ring.prep(uapi.IORING_OP_ASYNC_CANCEL, addr=tag, user_data=0)
        if self._wait_for(tag, CANCEL_GRACE) is None:
            # Still stuck in the kernel: this ring can no longer be trusted. Closing it makes
            # io_uring cancel the command on teardown; later commands get a fresh ring.
            self._ring.close()
            self._ring = Ring(4, flags=uapi.IORING_SETUP_SQE128)
        return -errno.ETIMEDOUT

    def _wait_for(self, tag: int, timeout: float) -> Optional[int]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            for user_data, res, _ in self._ring.submit_and_wait(1, min(left, 1.0)):
                if user_data == tag:
                    return res

    def close(self) -> None:
        if getattr(self, "_ring", None) is not None:
            self._ring.close()
            self._ring = None
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Control":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- commands ------------------------------------------------------------------------

    @property
    def ioctl_encode(self) -> bool:
        """True unless the kernel turned out to speak legacy opcodes only."""
        return self._legacy is not True

    def add_dev(self, dev_id: int, nr_queues: int, queue_depth: int, max_io_bytes: int,
                flags: int) -> DevInfo:
        """ADD_DEV; returns what the kernel granted (queues may be clamped to the CPU count,
        max_io_bytes rounded down to a page, flags masked and forced)."""
        info = uapi.UblksrvCtrlDevInfo(
            nr_hw_queues=nr_queues, queue_depth=queue_depth, max_io_buf_bytes=max_io_bytes,
            dev_id=dev_id & 0xFFFFFFFF, ublksrv_pid=os.getpid(),
            flags=flags | (uapi.UBLK_F_CMD_IOCTL_ENCODE if self.ioctl_encode else 0))
        self.command(uapi.UBLK_CMD_ADD_DEV, dev_id, addr=ctypes.addressof(info),
                     length=ctypes.sizeof(info), what="ADD_DEV")
        return DevInfo.from_raw(info)

    def del_dev(self, dev_id: int, timeout: float = 10.0, *, wait: bool = True) -> None:
        """DEL_DEV: stops the device if needed, removes it, then waits for the last user.

        The removal happens at once; only the wait for every opener of /dev/ublkbN and
        /dev/ublkcN to let go can take long. After `timeout` the wait is cancelled and
        UblkError(EBUSY) names who still holds the device; its number is freed when they
        close it. wait=False uses DEL_DEV_ASYNC (Linux >= 6.9; DEL_DEV with the timeout
        before that), which returns right after the removal.
        """
        what = f"delete ublk {dev_id}"
        devices = holders.block_devices(uapi.UBLK_BLOCK_PATH.format(dev_id))   # while it exists
        if not wait:
            try:
                self.command(uapi.UBLK_CMD_DEL_DEV_ASYNC, dev_id, timeout=timeout, what=what)
                return
            except UblkError as e:
                if e.errno not in _NOT_SUPPORTED + (errno.EINVAL,):
                    raise
        try:
            self.command(uapi.UBLK_CMD_DEL_DEV, dev_id, timeout=timeout, what=what)
        except UblkError as e:
            if e.errno not in (errno.ETIMEDOUT, errno.EINTR):
                raise
            users = [holders.describe(pid) for pid in holders.openers(devices)] or ["a program"]
            raise UblkError(errno.EBUSY,
                            f"ublk {dev_id} was removed, but {', '.join(users)} still holds "
                            "it open; its number is freed when that is closed") from None

    def start_dev(self, dev_id: int, pid: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.command(uapi.UBLK_CMD_START_DEV, dev_id, data=pid, timeout=timeout,
                     what=f"start ublk {dev_id}")

    def stop_dev(self, dev_id: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.command(uapi.UBLK_CMD_STOP_DEV, dev_id, timeout=timeout,
                     what=f"stop ublk {dev_id}")

    def set_params(self, dev_id: int, params: DeviceParams) -> None:
        raw = params.to_raw()
        self.command(uapi.UBLK_CMD_SET_PARAMS, dev_id, addr=ctypes.addressof(raw),
                     length=raw.len, what=f"set parameters of ublk {dev_id}")

    def get_params(self, dev_id: int) -> DeviceParams:
        raw = uapi.UblkParams()
        raw.len = uapi.UblkParams.devt.offset + ctypes.sizeof(uapi.UblkParamDevt)
        raw.types = (uapi.UBLK_PARAM_TYPE_BASIC | uapi.UBLK_PARAM_TYPE_DISCARD
                     | uapi.UBLK_PARAM_TYPE_DEVT)
        self.command(uapi.UBLK_CMD_GET_PARAMS, dev_id, addr=ctypes.addressof(raw),
                     length=raw.len, what=f"get parameters of ublk {dev_id}")
        return DeviceParams.from_raw(raw)

    def get_dev_info(self, dev_id: int) -> DevInfo:
        raw = uapi.UblksrvCtrlDevInfo()
        self.command(uapi.UBLK_CMD_GET_DEV_INFO, dev_id, addr=ctypes.addressof(raw),
                     length=ctypes.sizeof(raw), what=f"ublk {dev_id}")
        return DevInfo.from_raw(raw)

    def start_user_recovery(self, dev_id: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        """START_USER_RECOVERY, retried while the old server's files are still being released
        (the driver answers EBUSY until the dead process's io_uring and /dev/ublkcN are gone)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.command(uapi.UBLK_CMD_START_USER_RECOVERY, dev_id, timeout=timeout,
                             what=f"start recovery of ublk {dev_id}")
                return
            except UblkError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def end_user_recovery(self, dev_id: int, pid: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.command(uapi.UBLK_CMD_END_USER_RECOVERY, dev_id, data=pid, timeout=timeout,
                     what=f"end recovery of ublk {dev_id}")


# --------------------------------------------------------------------------------------------
# Module-level helpers (each opens /dev/ublk-control for one call)
# --------------------------------------------------------------------------------------------

def driver_available() -> bool:
    """True if /dev/ublk-control exists (the driver is loaded)."""
    return os.path.exists(uapi.UBLK_CONTROL_PATH)


def device_exists(dev_id: int) -> bool:
    """The kernel still has ublk device N: its disk, or its char device while it has none
    (added but not started, or stopped but not deleted)."""
    return (os.path.exists(f"/sys/block/ublkb{dev_id}")
            or os.path.exists(f"/sys/class/ublk-char/ublkc{dev_id}"))


def device_ids() -> List[int]:
    """Numbers of the ublk devices that exist (added, started or not)."""
    names = os.listdir("/sys/class/ublk-char") if os.path.isdir("/sys/class/ublk-char") \
        else [os.path.basename(p) for p in glob.glob("/dev/ublkc*")]
    return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"ublkc(\d+)", n)))


def list_devices() -> List[DevInfo]:
    """DevInfo of every ublk device, by number (devices vanishing meanwhile are skipped)."""
    out = []
    with Control() as c:
        for dev_id in device_ids():
            try:
                out.append(c.get_dev_info(dev_id))
            except UblkError as e:
                if e.errno != errno.ENODEV:
                    raise
    return out


def get_dev_info(dev_id: int) -> DevInfo:
    with Control() as c:
        return c.get_dev_info(dev_id)


def get_params(dev_id: int) -> DeviceParams:
    with Control() as c:
        return c.get_params(dev_id)


def stop_device(dev_id: int, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """STOP_DEV: /dev/ublkbN disappears and its server's queues wind down. A file system
    mounted on it, and programs that have it open, get I/O errors afterwards."""
    with Control() as c:
        c.stop_dev(dev_id, timeout)


def delete_device(dev_id: int, *, timeout: float = 10.0, wait: bool = True) -> None:
    """DEL_DEV (stops the device first if needed; its server then winds down and exits).

    Waits at most `timeout` seconds for the server and other openers to let go and then
    raises UblkError(EBUSY) naming them (the device is gone by then, only its number stays
    reserved). wait=False: DEL_DEV_ASYNC.
    """
    with Control() as c:
        c.del_dev(dev_id, timeout, wait=wait)
