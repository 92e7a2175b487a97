"""Host-side tests of ublk_shim's io_uring binding and UAPI layouts (no ublk needed).

The ring is exercised with plain opcodes (NOP, READ) to check the one-syscall-per-batch
contract: N SQEs submitted by one io_uring_enter, N CQEs reaped in one call with the right
user_data and res. Skipped where io_uring is unavailable (disabled by sysctl, seccomp).
"""
import ctypes
import errno
import mmap
import os
from contextlib import contextmanager

import pytest

from ublk_shim import sys as uapi
from ublk_shim.ctrl import DeviceParams
from ublk_shim.queue import request_result
from ublk_shim.target import OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE, NullTarget, Request
from ublk_shim.uring import Ring


def _ring(entries=32, cls=Ring, **kw):
    try:
        return cls(entries, **kw)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EPERM):
            pytest.skip(f"io_uring unavailable: {e}")
        raise


class CountingRing(Ring):
    """Counts io_uring_enter calls."""
    enters = 0

    def submit(self, wait_nr=0, timeout=None):
        self.enters += 1
        return super().submit(wait_nr, timeout)


def test_nop_batch_one_enter():
    with _ring(64, cls=CountingRing) as ring:
        n = 48
        for i in range(n):
            ring.prep(uapi.IORING_OP_NOP, user_data=0xABC00000 + i)
        assert ring.pending == n
        assert ring.submit(wait_nr=n) == n
        assert ring.enters == 1
        cqes = ring.reap()
        assert sorted(c[0] for c in cqes) == [0xABC00000 + i for i in range(n)]
        assert all(res == 0 for _, res, _ in cqes)
        assert ring.reap() == []
        assert ring.cq_overflow == 0


def test_cq_wraps_around(tmp_path):
    """Many rounds through a small ring: head/tail wrap and the two-slice reap path."""
    with _ring(8) as ring:
        seen = []
        for rnd in range(25):
            for i in range(5):
                ring.prep(uapi.IORING_OP_NOP, user_data=rnd * 10 + i)
            ring.submit(wait_nr=5)
            seen += [c[0] for c in ring.reap()]
        assert sorted(seen) == sorted(r * 10 + i for r in range(25) for i in range(5))


@contextmanager
def _file_and_buffer(tmp_path, blocks: list):
    """(fd of a file holding `blocks`, a 16-page mmap, its address), closed after."""
    path = tmp_path / "data"
    path.write_bytes(b"".join(blocks))
    buf = mmap.mmap(-1, 16 * 4096)
    anchor = ctypes.c_char.from_buffer(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd, buf, ctypes.addressof(anchor)
    finally:
        os.close(fd)
        del anchor
        buf.close()


def test_read_batch(tmp_path):
    """IORING_OP_READ of 16 blocks of a file in one enter: data and res per user_data."""
    blocks = [bytes([i]) * 4096 for i in range(16)]
    with _file_and_buffer(tmp_path, blocks) as (fd, buf, base):
        with _ring(16) as ring:
            for i in reversed(range(16)):
                ring.prep(uapi.IORING_OP_READ, fd=fd, off=i * 4096, addr=base + i * 4096,
                          length=4096, user_data=1000 + i)
            assert ring.submit(wait_nr=16) == 16
            cqes = []
            while len(cqes) < 16:      # completions may trickle in from io-wq
                cqes += ring.reap()
                if len(cqes) < 16:
                    ring.submit(wait_nr=1, timeout=5)
            assert sorted((u, r) for u, r, _ in cqes) == [(1000 + i, 4096) for i in range(16)]
        assert buf[:] == b"".join(blocks)


def test_read_fixed_into_a_registered_buffer(tmp_path):
    """READ_FIXED into buffer 0 (register_buffer): the data lands in the buffer, at any
    address inside it; a ring with no buffer registered refuses READ_FIXED (EFAULT)."""
    blocks = [bytes([i + 1]) * 4096 for i in range(8)]
    with _file_and_buffer(tmp_path, blocks) as (fd, buf, base):
        with _ring(16) as plain:
            plain.prep(uapi.IORING_OP_READ_FIXED, fd=fd, off=0, addr=base, length=4096)
            (_, res, _), = plain.complete(1)
            assert res < 0
        with _ring(16) as ring:
            ring.register_buffer(buf)
            for i in range(8):      # block i to page 8 + i: an offset inside the buffer
                ring.prep(uapi.IORING_OP_READ_FIXED, fd=fd, off=i * 4096,
                          addr=base + (8 + i) * 4096, length=4096, user_data=i)
            cqes = ring.complete(8)
            assert sorted((u, r) for u, r, _ in cqes) == [(i, 4096) for i in range(8)]
        assert buf[8 * 4096:] == b"".join(blocks) and not any(buf[:8 * 4096])


def _nop(user_data):
    # opcode, flags, ioprio, fd, off, addr, len, op_flags, user_data, buf_index,
    # personality, splice_fd_in
    return (uapi.IORING_OP_NOP, 0, 0, -1, 0, 0, 0, 0, user_data, 0, 0, 0)


def test_prep_packed_many_is_one_batch_and_all_or_nothing():
    with _ring(16, cls=CountingRing) as ring:
        ring.prep_packed_many(uapi.SQE_RW, [_nop(500 + i) for i in range(12)])
        assert ring.pending == 12 and ring.enters == 0
        with pytest.raises(Exception):   # a row that cannot be packed: nothing is queued
            ring.prep_packed_many(uapi.SQE_RW, [_nop(1), _nop(2), _nop(-1)])
        assert ring.pending == 12
        # more than the free slots: what is pending is submitted first
        ring.prep_packed_many(uapi.SQE_RW, [_nop(600 + i) for i in range(8)])
        assert ring.enters == 1 and ring.pending == 8
        ring.submit(wait_nr=8)
        seen = []
        while len(seen) < 20:
            seen += [u for u, res, _ in ring.reap() if res == 0]
            if len(seen) < 20:
                ring.submit(wait_nr=1, timeout=5)
        assert sorted(seen) == [500 + i for i in range(12)] + [600 + i for i in range(8)]
        with pytest.raises(OSError):
            ring.prep_packed_many(uapi.SQE_RW, [_nop(i) for i in range(17)])


def test_read_error_result(tmp_path):
    """A failing op reports -errno in its CQE, not an exception."""
    with _ring(4) as ring:
        ring.prep(uapi.IORING_OP_READ, fd=-1, addr=0, length=8, user_data=7)
        ring.submit(wait_nr=1)
        assert ring.reap() == [(7, -errno.EBADF, 0)]


def test_wait_timeout_returns_empty():
    with _ring(4) as ring:
        assert ring.submit_and_wait(1, timeout=0.05) == []


def test_sqe128_ring_and_cmd_area():
    with _ring(4, flags=uapi.IORING_SETUP_SQE128) as ring:
        assert ring.sqe_size == 128
        ring.prep(uapi.IORING_OP_NOP, user_data=5, cmd=bytes(range(80)))
        assert ring.submit_and_wait(1) == [(5, 0, 0)]
        with pytest.raises(ValueError):
            ring.prep(uapi.IORING_OP_NOP, cmd=bytes(81))
        assert ring.pending == 0


def test_auto_submit_when_sq_full():
    """Preparing more SQEs than the SQ holds submits the full SQ first, transparently."""
    with _ring(4) as ring:                    # 4 SQ entries, 8 CQ entries
        for i in range(8):
            ring.prep(uapi.IORING_OP_NOP, user_data=i)
        assert ring.pending == 4              # the first four went in when the SQ filled
        ring.submit(wait_nr=4)
        assert sorted(u for u, _, _ in ring.reap()) == list(range(8))


def test_close_unmaps_everything():
    ring = _ring(8, flags=uapi.IORING_SETUP_SQE128)
    maps = list(ring._maps)
    ring.prep(uapi.IORING_OP_NOP, user_data=1)
    ring.submit_and_wait(1)
    ring.close()
    assert all(m.closed for m in maps) and ring.leaked_maps == 0 and ring.fd == -1
    ring.close()                              # idempotent


# ---- UAPI layouts: the struct codecs agree with the ctypes definitions ---------------------

def test_io_cmd_sqe_codec_matches_ctypes():
    raw = bytearray(uapi.SQE_SIZE)
    uapi.SQE_IO_CMD.pack_into(raw, 0, uapi.IORING_OP_URING_CMD, 0, 0, 9,
                              uapi.io_opcode(uapi.UBLK_IO_COMMIT_AND_FETCH_REQ), 0, 0, 0,
                              0x1234, 0, 0, 0, 3, 77, -5, 0xDEAD000)
    assert raw[0] == uapi.IORING_OP_URING_CMD
    assert int.from_bytes(raw[4:8], "little", signed=True) == 9
    assert int.from_bytes(raw[8:12], "little") == 0xC0107521
    assert int.from_bytes(raw[12:16], "little") == 0          # __pad1
    assert int.from_bytes(raw[32:40], "little") == 0x1234     # user_data
    cmd = uapi.UblksrvIoCmd.from_buffer_copy(bytes(raw[48:64]))
    assert (cmd.q_id, cmd.tag, cmd.result, cmd.addr) == (3, 77, -5, 0xDEAD000)


def test_desc_codec_matches_ctypes():
    d = uapi.UblksrvIoDesc(op_flags=uapi.UBLK_IO_OP_WRITE | uapi.UBLK_IO_F_FUA, nr_sectors=8,
                           start_sector=123456789, addr=42)
    assert uapi.IO_DESC.unpack(bytes(d)) == (d.op_flags, 8, 123456789, 42)


def test_opcodes_both_encodings():
    assert uapi.ctrl_opcode(uapi.UBLK_CMD_GET_DEV_INFO) == 0x80207502
    assert uapi.ctrl_opcode(uapi.UBLK_CMD_START_DEV) == 0xC0207506
    assert uapi.ctrl_opcode(uapi.UBLK_CMD_END_USER_RECOVERY) == 0xC0207511
    assert uapi.ctrl_opcode(uapi.UBLK_CMD_DEL_DEV_ASYNC) == 0x80207514
    assert uapi.ctrl_opcode(uapi.UBLK_CMD_ADD_DEV, legacy=True) == 0x04
    with pytest.raises(ValueError):
        uapi.ctrl_opcode(uapi.UBLK_CMD_GET_FEATURES, legacy=True)
    assert uapi.io_opcode(uapi.UBLK_IO_FETCH_REQ) == 0xC0107520
    assert uapi.io_opcode(uapi.UBLK_IO_FETCH_REQ, legacy=True) == 0x20


def test_queue_desc_offsets_use_max_depth_stride():
    stride = uapi.round_up(4096 * 24, uapi.page_size())
    assert uapi.queue_desc_offset(0) == 0
    assert uapi.queue_desc_offset(3) == 3 * stride
    assert uapi.queue_desc_size(64) == uapi.page_size()


def test_device_params_roundtrip():
    p = DeviceParams(size=256 << 20)
    raw = p.to_raw()
    assert raw.len == 60
    assert raw.types == uapi.UBLK_PARAM_TYPE_BASIC | uapi.UBLK_PARAM_TYPE_DISCARD
    assert raw.basic.attrs == uapi.UBLK_ATTR_VOLATILE_CACHE | uapi.UBLK_ATTR_FUA
    assert (raw.basic.logical_bs_shift, raw.basic.physical_bs_shift) == (12, 12)
    assert raw.basic.max_sectors == 1024 and raw.basic.dev_sectors == (256 << 20) >> 9
    assert raw.discard.max_discard_segments == 1 and raw.discard.discard_granularity == 4096
    assert DeviceParams.from_raw(raw) == p


# ---- request results and the null target ---------------------------------------------------

def test_request_result_normalisation():
    assert request_result(OP_READ, None, 4096) == 4096
    assert request_result(OP_WRITE, 1 << 20, 4096) == 4096
    assert request_result(OP_FLUSH, None, 0) == 0
    assert request_result(OP_DISCARD, 3 << 30, 3 << 30) == 0     # never overflows s32
    assert request_result(OP_READ, -errno.EIO, 4096) == -errno.EIO


def test_null_target_reads_zeros():
    t = NullTarget(1 << 20)
    buf = bytearray(b"x" * 8192)
    req = Request(OP_READ, 0, 8192, False, 0, 0, 0)
    assert t.handle(req, memoryview(buf)) == 8192
    assert buf == bytes(8192)
