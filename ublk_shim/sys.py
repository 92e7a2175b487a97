"""Raw kernel ABI: io_uring and ublk UAPI constants, struct layouts and opcode encodings.

Nothing here does I/O. The layouts are written once, as ctypes Structures (the readable
definition, checked against the C sizes at import time like a static_assert), and the hot
paths use `struct.Struct` codecs derived from the same field lists so that one SQE is
written with a single `pack_into` call and a batch of CQEs is read with one `iter_unpack`.

Sources: include/uapi/linux/io_uring.h and include/uapi/linux/ublk_cmd.h.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct
from typing import List, Optional, Tuple, Type

# --------------------------------------------------------------------------------------------
# libc and raw syscalls
# --------------------------------------------------------------------------------------------

# The C library the interpreter itself links (glibc's libc.so.6 on Linux): no
# ctypes.util.find_library, which imports subprocess and runs ldconfig in every process
# that imports this module (crypto workers included).
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

# The io_uring syscalls share one number on every architecture but alpha (asm-generic table).
NR_IO_URING_SETUP = 425
NR_IO_URING_ENTER = 426
NR_IO_URING_REGISTER = 427

PR_SET_IO_FLUSHER = 57


def check_syscall(ret: int, what: str) -> int:
    """Turn a -1/errno syscall return into an OSError naming the call."""
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


# --------------------------------------------------------------------------------------------
# io_uring
# --------------------------------------------------------------------------------------------

IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x08000000
IORING_OFF_SQES = 0x10000000

IORING_SETUP_SQPOLL = 1 << 1
IORING_SETUP_CQSIZE = 1 << 3
IORING_SETUP_COOP_TASKRUN = 1 << 8
IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_CQE32 = 1 << 11
IORING_SETUP_SINGLE_ISSUER = 1 << 12
IORING_SETUP_DEFER_TASKRUN = 1 << 13

IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_NODROP = 1 << 1
IORING_FEAT_EXT_ARG = 1 << 8

IORING_ENTER_GETEVENTS = 1 << 0
IORING_ENTER_EXT_ARG = 1 << 3

IOSQE_FIXED_FILE = 1 << 0

IORING_REGISTER_BUFFERS = 0     # io_uring_register opcodes

IORING_OP_NOP = 0
IORING_OP_READ_FIXED = 4
IORING_OP_ASYNC_CANCEL = 14
IORING_OP_READ = 22
IORING_OP_WRITE = 23
IORING_OP_URING_CMD = 46


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class IoSqringOffsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32),
                ("ring_mask", ctypes.c_uint32), ("ring_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("dropped", ctypes.c_uint32),
                ("array", ctypes.c_uint32), ("resv1", ctypes.c_uint32),
                ("user_addr", ctypes.c_uint64)]


class IoCqringOffsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32),
                ("ring_mask", ctypes.c_uint32), ("ring_entries", ctypes.c_uint32),
                ("overflow", ctypes.c_uint32), ("cqes", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("resv1", ctypes.c_uint32),
                ("user_addr", ctypes.c_uint64)]


class IoUringParams(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("sq_thread_cpu", ctypes.c_uint32),
                ("sq_thread_idle", ctypes.c_uint32), ("features", ctypes.c_uint32),
                ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", IoSqringOffsets), ("cq_off", IoCqringOffsets)]


class KernelTimespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_int64)]


class IoUringGeteventsArg(ctypes.Structure):
    """IORING_ENTER_EXT_ARG argument: lets io_uring_enter wait with a timeout (-ETIME)."""
    _fields_ = [("sigmask", ctypes.c_uint64), ("sigmask_sz", ctypes.c_uint32),
                ("pad", ctypes.c_uint32), ("ts", ctypes.c_uint64)]


# The 48-byte SQE head shared by every opcode. `off` is a union with {cmd_op u32, __pad1 u32}:
# for IORING_OP_URING_CMD the opcode of the driver command goes in its low 32 bits.
SQE_HEAD_FIELDS: List[Tuple[str, str]] = [
    ("opcode", "B"), ("flags", "B"), ("ioprio", "H"), ("fd", "i"),
    ("off", "Q"), ("addr", "Q"), ("len", "I"), ("op_flags", "I"),
    ("user_data", "Q"), ("buf_index", "H"), ("personality", "H"), ("splice_fd_in", "i"),
]
SQE_CMD_OFFSET = 48       # sqe->cmd[]: 16 bytes in a 64-byte SQE, 80 bytes with SQE128
SQE_SIZE = 64
SQE128_SIZE = 128

CQE_FIELDS: List[Tuple[str, str]] = [("user_data", "Q"), ("res", "i"), ("flags", "I")]
CQE_SIZE = 16


def codec(*field_lists: List[Tuple[str, str]]) -> struct.Struct:
    """A native-order, unpadded struct codec for the concatenation of field lists.

    Native byte order with standard sizes ("=") makes every integer a single memcpy, so a
    u32 head/tail written through it is never torn.
    """
    return struct.Struct("=" + "".join(fmt for fields in field_lists for _, fmt in fields))


SQE_HEAD = codec(SQE_HEAD_FIELDS)
CQE = codec(CQE_FIELDS)
assert SQE_HEAD.size == SQE_CMD_OFFSET and CQE.size == CQE_SIZE
# A whole 64-byte SQE for plain READ/WRITE (cmd[] zero): `Ring.prep_packed`'s hot path.
SQE_RW = codec(SQE_HEAD_FIELDS, [("cmd", "16x")])
assert SQE_RW.size == SQE_SIZE

# --------------------------------------------------------------------------------------------
# ublk: control commands
# --------------------------------------------------------------------------------------------

UBLK_CONTROL_PATH = "/dev/ublk-control"
UBLK_CHAR_PATH = "/dev/ublkc{}"
UBLK_BLOCK_PATH = "/dev/ublkb{}"


def block_dev_id(path: str) -> Optional[int]:
    """N of /dev/ublkbN (or of its name, ublkbN); None for any other path."""
    name, prefix = os.path.basename(path), os.path.basename(UBLK_BLOCK_PATH.format(""))
    digits = name[len(prefix):]
    return int(digits) if name.startswith(prefix) and digits.isdigit() else None

_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, type_: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(type_) << 8) | nr


class UblksrvCtrlCmd(ctypes.Structure):
    """The 32-byte control command, at SQE+48 of an SQE128 entry."""
    _fields_ = [("dev_id", ctypes.c_uint32), ("queue_id", ctypes.c_uint16),
                ("len", ctypes.c_uint16), ("addr", ctypes.c_uint64),
                ("data", ctypes.c_uint64), ("dev_path_len", ctypes.c_uint16),
                ("pad", ctypes.c_uint16), ("reserved", ctypes.c_uint32)]


class UblksrvIoCmd(ctypes.Structure):
    """The 16-byte I/O command, at SQE+48 of a normal 64-byte entry."""
    _fields_ = [("q_id", ctypes.c_uint16), ("tag", ctypes.c_uint16),
                ("result", ctypes.c_int32), ("addr", ctypes.c_uint64)]


class UblksrvIoDesc(ctypes.Structure):
    """Per-tag request descriptor, written by the driver into the read-only mmap."""
    _fields_ = [("op_flags", ctypes.c_uint32), ("nr_sectors", ctypes.c_uint32),
                ("start_sector", ctypes.c_uint64), ("addr", ctypes.c_uint64)]


class UblksrvCtrlDevInfo(ctypes.Structure):
    _fields_ = [("nr_hw_queues", ctypes.c_uint16), ("queue_depth", ctypes.c_uint16),
                ("state", ctypes.c_uint16), ("pad0", ctypes.c_uint16),
                ("max_io_buf_bytes", ctypes.c_uint32), ("dev_id", ctypes.c_uint32),
                ("ublksrv_pid", ctypes.c_int32), ("pad1", ctypes.c_uint32),
                ("flags", ctypes.c_uint64), ("ublksrv_flags", ctypes.c_uint64),
                ("owner_uid", ctypes.c_uint32), ("owner_gid", ctypes.c_uint32),
                ("reserved1", ctypes.c_uint64), ("reserved2", ctypes.c_uint64)]


class UblkParamBasic(ctypes.Structure):
    _fields_ = [("attrs", ctypes.c_uint32), ("logical_bs_shift", ctypes.c_uint8),
                ("physical_bs_shift", ctypes.c_uint8), ("io_opt_shift", ctypes.c_uint8),
                ("io_min_shift", ctypes.c_uint8), ("max_sectors", ctypes.c_uint32),
                ("chunk_sectors", ctypes.c_uint32), ("dev_sectors", ctypes.c_uint64),
                ("virt_boundary_mask", ctypes.c_uint64)]


class UblkParamDiscard(ctypes.Structure):
    _fields_ = [("discard_alignment", ctypes.c_uint32), ("discard_granularity", ctypes.c_uint32),
                ("max_discard_sectors", ctypes.c_uint32),
                ("max_write_zeroes_sectors", ctypes.c_uint32),
                ("max_discard_segments", ctypes.c_uint16), ("reserved0", ctypes.c_uint16)]


class UblkParamDevt(ctypes.Structure):
    _fields_ = [("char_major", ctypes.c_uint32), ("char_minor", ctypes.c_uint32),
                ("disk_major", ctypes.c_uint32), ("disk_minor", ctypes.c_uint32)]


class UblkParams(ctypes.Structure):
    """The prefix of `struct ublk_params` this shim uses (basic, discard, devt).

    The kernel copies min(len, sizeof(its struct)), so a shorter userspace struct is fine;
    later members (zoned, dma, segment, integrity) are simply not sent.
    """
    _fields_ = [("len", ctypes.c_uint32), ("types", ctypes.c_uint32),
                ("basic", UblkParamBasic), ("discard", UblkParamDiscard),
                ("devt", UblkParamDevt)]


def _static_assert_layout(cls: Type[ctypes.Structure], size: int, **offsets: int) -> None:
    assert ctypes.sizeof(cls) == size, (cls.__name__, ctypes.sizeof(cls), size)
    for name, off in offsets.items():
        assert getattr(cls, name).offset == off, (cls.__name__, name)


_static_assert_layout(IoUringParams, 120, sq_off=40, cq_off=80, features=20)
_static_assert_layout(IoUringGeteventsArg, 24, ts=16)
_static_assert_layout(UblksrvCtrlCmd, 32, addr=8, data=16, dev_path_len=24)
_static_assert_layout(UblksrvIoCmd, 16, result=4, addr=8)
_static_assert_layout(UblksrvIoDesc, 24, start_sector=8, addr=16)
_static_assert_layout(UblksrvCtrlDevInfo, 64, dev_id=12, ublksrv_pid=16, flags=24, owner_uid=40)
_static_assert_layout(UblkParamBasic, 32, max_sectors=8, dev_sectors=16)
_static_assert_layout(UblkParamDiscard, 20, max_discard_segments=16)
_static_assert_layout(UblkParams, 80, basic=8, discard=40, devt=60)   # 76 + tail padding

# Legacy command numbers (kernels 6.0-6.3 know only these; newer ones only if built with
# CONFIG_BLKDEV_UBLK_LEGACY_OPCODES). Commands added later exist only ioctl-encoded.
UBLK_CMD_GET_QUEUE_AFFINITY = 0x01
UBLK_CMD_GET_DEV_INFO = 0x02
UBLK_CMD_ADD_DEV = 0x04
UBLK_CMD_DEL_DEV = 0x05
UBLK_CMD_START_DEV = 0x06
UBLK_CMD_STOP_DEV = 0x07
UBLK_CMD_SET_PARAMS = 0x08
UBLK_CMD_GET_PARAMS = 0x09
UBLK_CMD_START_USER_RECOVERY = 0x10
UBLK_CMD_END_USER_RECOVERY = 0x11
UBLK_CMD_GET_DEV_INFO2 = 0x12
UBLK_CMD_GET_FEATURES = 0x13       # ioctl encoding only
UBLK_CMD_DEL_DEV_ASYNC = 0x14      # ioctl encoding only

# Which ioctl direction each command is declared with in ublk_cmd.h (_IOR or _IOWR).
_CTRL_READ_ONLY = {UBLK_CMD_GET_QUEUE_AFFINITY, UBLK_CMD_GET_DEV_INFO, UBLK_CMD_GET_PARAMS,
                   UBLK_CMD_GET_DEV_INFO2, UBLK_CMD_GET_FEATURES, UBLK_CMD_DEL_DEV_ASYNC}
LEGACY_CTRL_CMDS = set(range(UBLK_CMD_GET_QUEUE_AFFINITY, UBLK_CMD_GET_DEV_INFO2 + 1))


def ctrl_opcode(nr: int, legacy: bool = False) -> int:
    """The `cmd_op` of control command `nr`: UBLK_U_CMD_* (ioctl-encoded) or the legacy number."""
    if legacy:
        if nr not in LEGACY_CTRL_CMDS:
            raise ValueError(f"ublk control command {nr:#x} has no legacy opcode")
        return nr
    direction = _IOC_READ if nr in _CTRL_READ_ONLY else _IOC_READ | _IOC_WRITE
    return _ioc(direction, "u", nr, ctypes.sizeof(UblksrvCtrlCmd))


# I/O commands.
UBLK_IO_FETCH_REQ = 0x20
UBLK_IO_COMMIT_AND_FETCH_REQ = 0x21
UBLK_IO_NEED_GET_DATA = 0x22


def io_opcode(nr: int, legacy: bool = False) -> int:
    """The `cmd_op` of I/O command `nr`: UBLK_U_IO_* (_IOWR, ioctl-encoded) or legacy."""
    if legacy:
        return nr
    return _ioc(_IOC_READ | _IOC_WRITE, "u", nr, ctypes.sizeof(UblksrvIoCmd))


assert ctrl_opcode(UBLK_CMD_ADD_DEV) == 0xC0207504
assert ctrl_opcode(UBLK_CMD_GET_FEATURES) == 0x80207513
assert io_opcode(UBLK_IO_COMMIT_AND_FETCH_REQ) == 0xC0107521

UBLK_IO_RES_OK = 0
UBLK_IO_RES_NEED_GET_DATA = 1
UBLK_IO_RES_ABORT = -errno.ENODEV

UBLKSRV_CMD_BUF_OFFSET = 0
UBLK_MAX_QUEUE_DEPTH = 4096
UBLK_MAX_NR_QUEUES = 4096
UBLK_MAX_IO_BUF_BYTES = 1 << 25       # UBLK_IO_BUF_BITS: 32 MiB per request buffer
UBLK_DESC_SIZE = ctypes.sizeof(UblksrvIoDesc)
UBLK_FEATURES_LEN = 8

# Feature flags (dev_info.flags).
UBLK_F_SUPPORT_ZERO_COPY = 1 << 0
UBLK_F_URING_CMD_COMP_IN_TASK = 1 << 1
UBLK_F_NEED_GET_DATA = 1 << 2
UBLK_F_USER_RECOVERY = 1 << 3
UBLK_F_USER_RECOVERY_REISSUE = 1 << 4
UBLK_F_UNPRIVILEGED_DEV = 1 << 5
UBLK_F_CMD_IOCTL_ENCODE = 1 << 6
UBLK_F_USER_COPY = 1 << 7
UBLK_F_ZONED = 1 << 8
UBLK_F_USER_RECOVERY_FAIL_IO = 1 << 9
UBLK_F_UPDATE_SIZE = 1 << 10
UBLK_F_AUTO_BUF_REG = 1 << 11
UBLK_F_QUIESCE = 1 << 12
UBLK_F_PER_IO_DAEMON = 1 << 13
UBLK_F_BUF_REG_OFF_DAEMON = 1 << 14

FEATURE_NAMES = {
    UBLK_F_SUPPORT_ZERO_COPY: "ZERO_COPY", UBLK_F_URING_CMD_COMP_IN_TASK: "COMP_IN_TASK",
    UBLK_F_NEED_GET_DATA: "NEED_GET_DATA", UBLK_F_USER_RECOVERY: "USER_RECOVERY",
    UBLK_F_USER_RECOVERY_REISSUE: "RECOVERY_REISSUE", UBLK_F_UNPRIVILEGED_DEV: "UNPRIVILEGED",
    UBLK_F_CMD_IOCTL_ENCODE: "IOCTL_ENCODE", UBLK_F_USER_COPY: "USER_COPY",
    UBLK_F_ZONED: "ZONED", UBLK_F_USER_RECOVERY_FAIL_IO: "RECOVERY_FAIL_IO",
    UBLK_F_UPDATE_SIZE: "UPDATE_SIZE", UBLK_F_AUTO_BUF_REG: "AUTO_BUF_REG",
    UBLK_F_QUIESCE: "QUIESCE", UBLK_F_PER_IO_DAEMON: "PER_IO_DAEMON",
    UBLK_F_BUF_REG_OFF_DAEMON: "BUF_REG_OFF_DAEMON",
}

# Device states (dev_info.state).
UBLK_S_DEV_DEAD = 0
UBLK_S_DEV_LIVE = 1
UBLK_S_DEV_QUIESCED = 2
UBLK_S_DEV_FAIL_IO = 3
STATE_NAMES = {UBLK_S_DEV_DEAD: "dead", UBLK_S_DEV_LIVE: "live",
               UBLK_S_DEV_QUIESCED: "quiesced", UBLK_S_DEV_FAIL_IO: "fail_io"}

# Request ops (low 8 bits of op_flags) and flags (bit positions within op_flags).
UBLK_IO_OP_READ = 0
UBLK_IO_OP_WRITE = 1
UBLK_IO_OP_FLUSH = 2
UBLK_IO_OP_DISCARD = 3
UBLK_IO_OP_WRITE_SAME = 4
UBLK_IO_OP_WRITE_ZEROES = 5
UBLK_IO_OP_MASK = 0xFF

UBLK_IO_F_FAILFAST_DEV = 1 << 8
UBLK_IO_F_FAILFAST_TRANSPORT = 1 << 9
UBLK_IO_F_FAILFAST_DRIVER = 1 << 10
UBLK_IO_F_META = 1 << 11
UBLK_IO_F_FUA = 1 << 13
UBLK_IO_F_NOUNMAP = 1 << 15
UBLK_IO_F_SWAP = 1 << 16

# Parameters.
UBLK_ATTR_READ_ONLY = 1 << 0
UBLK_ATTR_ROTATIONAL = 1 << 1
UBLK_ATTR_VOLATILE_CACHE = 1 << 2
UBLK_ATTR_FUA = 1 << 3

UBLK_PARAM_TYPE_BASIC = 1 << 0
UBLK_PARAM_TYPE_DISCARD = 1 << 1
UBLK_PARAM_TYPE_DEVT = 1 << 2

SECTOR_SHIFT = 9

# Not a kernel constant (ublk takes 512 bytes up to the page size) but this binding's
# choice: the logical and physical block size of every device it serves, so a target's
# size is a multiple of it.
BLOCK_SIZE = 4096

# Hot-path codecs: one FETCH/COMMIT SQE in one pack_into, one descriptor in one unpack_from.
IO_CMD_FIELDS: List[Tuple[str, str]] = [("q_id", "H"), ("tag", "H"), ("result", "i"),
                                        ("addr", "Q")]
IO_DESC_FIELDS: List[Tuple[str, str]] = [("op_flags", "I"), ("nr_sectors", "I"),
                                         ("start_sector", "Q"), ("addr", "Q")]
SQE_IO_CMD = codec(SQE_HEAD_FIELDS, IO_CMD_FIELDS)
IO_DESC = codec(IO_DESC_FIELDS)
assert SQE_IO_CMD.size == SQE_SIZE and IO_DESC.size == UBLK_DESC_SIZE


def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def queue_desc_offset(q_id: int) -> int:
    """mmap offset of queue `q_id`'s descriptor array on /dev/ublkcN.

    The driver divides the offset by the size of the *largest possible* array
    (UBLK_MAX_QUEUE_DEPTH descriptors, page-rounded) to find the queue, whatever the actual
    depth; using the device's own depth here would silently map queue 0 for every queue.
    """
    stride = round_up(UBLK_MAX_QUEUE_DEPTH * UBLK_DESC_SIZE, page_size())
    return UBLKSRV_CMD_BUF_OFFSET + q_id * stride


def queue_desc_size(queue_depth: int) -> int:
    """Length of one queue's descriptor mmap: the driver insists on exactly this value."""
    return round_up(queue_depth * UBLK_DESC_SIZE, page_size())


def flag_names(flags: int) -> str:
    """Human-readable UBLK_F_* set, e.g. 'IOCTL_ENCODE|USER_RECOVERY|0x100000'."""
    names = [name for bit, name in FEATURE_NAMES.items() if flags & bit]
    rest = flags & ~sum(FEATURE_NAMES)
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"
