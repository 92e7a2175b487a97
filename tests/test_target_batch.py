"""The SwornDisk ublk target's batch path, natively (the e2e suite drives it for real):
a completion batch's READs go to the engine in one read_many, a tampered block fails its
own READ only, runs of plain WRITEs go in one write_many, and writes, discards and flushes
keep their order."""
from __future__ import annotations

import errno

import numpy as np

from sworndisk import Config, MemoryDevice, SwornDisk
from sworndisk_ublk.target import SwornDiskTarget
from ublk_shim import OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE, Request

from .conftest import KEY16, MiB

BS = 4096


def _req(op, block, blocks=1, fua=False, tag=0):
    return Request(op, block * BS, blocks * BS if op != OP_FLUSH else 0, fua, tag, 0, 0)


class CountingDisk(SwornDisk):
    """Counts read_many and write_many calls, to see the batch reach the engine as one."""
    read_many_calls = 0
    write_many_calls = 0

    def start_reads(self, ranges):       # read_many's first step; the target's entry
        CountingDisk.read_many_calls += 1
        return super().start_reads(ranges)

    def write_many(self, items):
        CountingDisk.write_many_calls += 1
        return super().write_many(items)


def _target():
    cfg = Config(memtable_records=32, level_ratio=2)
    data, meta = MemoryDevice(32 * MiB), MemoryDevice(SwornDisk.min_meta_size(32 * MiB, 1024, cfg))
    disk = CountingDisk.create(data, meta, KEY16, nr_blocks=1024, config=cfg)
    return SwornDiskTarget(disk), disk, data


def test_batch_reads_go_to_the_engine_together_and_fail_alone():
    t, disk, data = _target()
    for i in range(8):
        disk.write(10 * i, bytes([i + 1]) * BS)
    disk.flush()
    bad = 30                                     # LBA 30 holds 4s; tamper with its block
    hba = int(np.frombuffer(disk.debug.index.get(bad)[:8], "<u8")[0])
    data.buf[hba * BS + 3] ^= 1
    bufs = [memoryview(bytearray(BS)) for _ in range(8)]
    CountingDisk.read_many_calls = 0
    out = t.handle_batch([(_req(OP_READ, 10 * i, tag=i), bufs[i]) for i in range(8)])
    assert CountingDisk.read_many_calls == 1
    assert out == [BS, BS, BS, -errno.EIO, BS, BS, BS, BS]
    assert [bytes(bufs[i][:1]) for i in range(8) if i != 3] == \
        [bytes([i + 1]) for i in range(8) if i != 3]
    t.close()


def test_batch_keeps_order_of_writes_discards_and_flushes():
    t, disk, data = _target()
    a, b, c = (memoryview(bytearray(x * BS)) for x in (b"a", b"b", b"c"))
    out = t.handle_batch([(_req(OP_WRITE, 5), a), (_req(OP_DISCARD, 5), memoryview(b"")),
                          (_req(OP_WRITE, 6), b), (_req(OP_FLUSH, 0), memoryview(b"")),
                          (_req(OP_WRITE, 7, fua=True), c)])
    assert out == [BS, 0, BS, 0, BS]
    assert disk.read(5, 3) == bytes(BS) + b"b" * BS + b"c" * BS
    assert disk.stats().lifetime.commits >= 2    # the FLUSH and the FUA write committed
    t.close()


def test_a_batch_past_the_end_is_served_request_by_request():
    t, disk, data = _target()
    disk.write(0, b"z" * BS)
    bufs = [memoryview(bytearray(BS)) for _ in range(2)]
    out = t.handle_batch([(_req(OP_READ, 0), bufs[0]), (_req(OP_READ, 5000), bufs[1])])
    assert out[0] == BS and bytes(bufs[0]) == b"z" * BS
    assert out[1] < 0 or isinstance(out[1], Exception)
    t.close()


def test_runs_of_plain_writes_go_in_one_write_many_in_order():
    t, disk, data = _target()
    bufs = [memoryview(bytearray(bytes([65 + i]) * BS)) for i in range(6)]
    CountingDisk.write_many_calls = 0
    out = t.handle_batch([(_req(OP_WRITE, 9), bufs[0]), (_req(OP_WRITE, 9), bufs[1]),
                          (_req(OP_WRITE, 10), bufs[2]),
                          (_req(OP_DISCARD, 10), memoryview(b"")),
                          (_req(OP_WRITE, 11), bufs[3]), (_req(OP_WRITE, 12), bufs[4]),
                          (_req(OP_WRITE, 13, fua=True), bufs[5])])
    assert out == [BS, BS, BS, 0, BS, BS, BS]
    assert CountingDisk.write_many_calls == 2    # [9, 9, 10] and [11, 12]; FUA alone
    assert disk.read(9, 5) == b"B" * BS + bytes(BS) + b"D" * BS + b"E" * BS + b"F" * BS
    t.close()


def test_a_write_many_the_engine_refuses_is_served_request_by_request():
    t, disk, data = _target()
    bufs = [memoryview(bytearray(b"q" * BS)) for _ in range(3)]
    out = t.handle_batch([(_req(OP_WRITE, 1), bufs[0]), (_req(OP_WRITE, 5000), bufs[1]),
                          (_req(OP_WRITE, 2), bufs[2])])
    assert out[0] == BS and out[2] == BS
    assert out[1] < 0                            # as handle() answers it alone
    assert disk.read(1, 2) == b"q" * 2 * BS
    t.close()
