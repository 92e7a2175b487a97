"""Host-side tests of the batch data plane (no ublk needed).

Queue.serve_batch is driven with hand-made descriptors (as the kernel would leave them) and
page-aligned tag buffers, and LoopTarget.handle_batch with a real file: together they check
that one completion batch reaches the target as one call, that every request gets exactly
one result whatever the target does, and that the loop target's READs/WRITEs go to the file
together through io_uring. The real device at depth is tests/e2e/test_ublk_targets.py.
"""
import errno
import mmap
import os

import pytest

from ublk_shim import sys as uapi
from ublk_shim import target as target_mod
from ublk_shim.queue import Queue
from ublk_shim.target import (OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE, OP_WRITE_ZEROES,
                              LoopTarget, Request, Target)
from ublk_shim.uring import Ring

BS = 4096


class Recorder(Target):
    """Answers like a tiny RAM disk and records what it was handed."""

    def __init__(self):
        self.size = 1 << 20
        self.calls = []              # one list of (op, offset, length, fua, data) per call

    def handle_batch(self, batch):
        self.calls.append([(r.op, r.offset, r.length, r.fua, bytes(b)) for r, b in batch])
        for r, b in batch:
            if r.op == OP_READ:
                b[:] = bytes([r.offset // BS % 251]) * r.length
        return [None] * len(batch)


def make_queue(target, depth=8, max_io=64 * 1024):
    q = Queue(0, 0, -1, depth, max_io, target)
    q._descs = mmap.mmap(-1, uapi.queue_desc_size(depth))    # writable, unlike the real one
    q._map_buffers()
    return q


def put(q, tag, op, sector=0, nr_sectors=8, flags=0, data=b""):
    """What the kernel does before completing a FETCH: descriptor, and a WRITE's data."""
    uapi.IO_DESC.pack_into(q._descs, tag * uapi.UBLK_DESC_SIZE, op | flags, nr_sectors,
                           sector, q._buf_addrs[tag])
    q._bufs[tag][:len(data)] = data


def test_one_target_call_per_batch_and_answers_in_tag_order():
    t = Recorder()
    q = make_queue(t)
    put(q, 5, OP_READ, sector=8 * 3)
    put(q, 2, OP_WRITE, sector=8, flags=uapi.UBLK_IO_F_FUA, data=b"w" * BS)
    put(q, 7, OP_FLUSH, nr_sectors=0)
    put(q, 0, 9)                                     # an op the shim does not know
    put(q, 3, OP_READ, nr_sectors=(64 * 1024 >> 9) + 8)   # longer than the tag's buffer
    put(q, 1, OP_DISCARD, sector=16, nr_sectors=16)
    try:
        results = q.serve_batch([5, 2, 7, 0, 3, 1])
        assert results == [BS, BS, 0, -errno.EOPNOTSUPP, -errno.EIO, 0]
        assert t.calls == [[(OP_READ, 3 * BS, BS, False, bytes(BS)),
                            (OP_WRITE, BS, BS, True, b"w" * BS),
                            (OP_FLUSH, 0, 0, False, b""),
                            (OP_DISCARD, 2 * BS, 2 * BS, False, b"")]]
        assert bytes(q._bufs[5][:BS]) == b"\3" * BS   # what the kernel copies to the bio
        assert (q.batches, q.max_batch, q.failed) == (1, 4, 2)
        assert q.counts[OP_READ] == q.counts[OP_WRITE] == q.counts[OP_FLUSH] == 1
        q.serve_batch([5])
        assert (q.batches, q.max_batch) == (2, 4)
        assert q.serve_batch([0]) == [-errno.EOPNOTSUPP] and q.batches == 2   # none for it
    finally:
        q._teardown()


def test_buffers_are_released_after_the_batch():
    kept = []

    class Keeper(Target):
        def handle(self, req, buf):
            kept.append(buf)
            return None

    q = make_queue(Keeper())
    put(q, 0, OP_WRITE, data=b"x" * BS)
    put(q, 1, OP_READ)
    try:
        assert q.serve_batch([0, 1]) == [BS, BS]
        for buf in kept:
            with pytest.raises(ValueError):         # released: a kept view cannot be used
                buf[0]
    finally:
        q._teardown()


def test_default_handle_batch_fails_only_the_raising_request(caplog):
    seen = []

    class OneByOne(Target):
        def handle(self, req, buf):
            seen.append(req.tag)
            if req.tag == 1:
                raise OSError(errno.ENOSPC, "full")
            if req.tag == 2:
                raise ValueError("target bug")
            return -errno.EROFS if req.tag == 3 else None

    q = make_queue(OneByOne())
    for tag in range(5):
        put(q, tag, OP_WRITE, sector=8 * tag, data=b"d" * BS)
    try:
        assert q.serve_batch([4, 1, 2, 3, 0]) == [BS, -errno.ENOSPC, -errno.EIO, -errno.EROFS,
                                                  BS]
        assert seen == [4, 1, 2, 3, 0]               # in batch order, one by one
        assert q.failed == 3 and "target bug" in caplog.text
    finally:
        q._teardown()


@pytest.mark.parametrize("behaviour, expected", [
    ("raise-oserror", -errno.ENOSPC),
    ("raise-bug", -errno.EIO),
    ("short-answer", -errno.EIO),
])
def test_a_batch_that_fails_as_a_whole_still_answers_every_request(behaviour, expected):
    class Broken(Target):
        def handle_batch(self, batch):
            if behaviour == "raise-oserror":
                raise OSError(errno.ENOSPC, "full")
            if behaviour == "raise-bug":
                raise RuntimeError("bug")
            return [None]                            # one answer for a batch of three

    q = make_queue(Broken())
    for tag in range(3):
        put(q, tag, OP_READ, sector=8 * tag)
    try:
        assert q.serve_batch([0, 1, 2]) == [expected] * 3
        assert q.failed == 3
    finally:
        q._teardown()


def test_duck_typed_target_without_handle_batch():
    class Duck:
        size = 1 << 20

        def handle(self, req, buf):
            return req.length

    q = make_queue(Duck())
    put(q, 0, OP_READ)
    put(q, 1, OP_FLUSH, nr_sectors=0)
    try:
        assert q.serve_batch([0, 1]) == [BS, 0] and q.max_batch == 2
    finally:
        q._teardown()


# ---- LoopTarget: a batch's READs and WRITEs go to the file together ------------------------

class CountingRing(Ring):
    enters = 0

    def submit(self, wait_nr=0, timeout=None):
        CountingRing.enters += 1
        return super().submit(wait_nr, timeout)


@pytest.fixture
def loop(tmp_path, monkeypatch):
    """A LoopTarget on a 1 MiB file whose rings count their io_uring_enter calls, and
    page-aligned request buffers (O_DIRECT)."""
    path = tmp_path / "backing"
    path.write_bytes(bytes(1 << 20))
    monkeypatch.setattr(target_mod, "open_ring", lambda n, flag_sets: CountingRing(n))
    CountingRing.enters = 0
    t = LoopTarget(str(path))
    t.open()
    area = mmap.mmap(-1, 64 * BS)
    whole = memoryview(area)
    bufs = [whole[i * BS:(i + 1) * BS] for i in range(64)]
    yield t, bufs, path
    t.close()
    for b in bufs:
        b.release()
    whole.release()
    area.close()


def req(op, block, tag=0, fua=False, blocks=1):
    return Request(op, block * BS, blocks * BS if op != OP_FLUSH else 0, fua, tag, 0, 0)


def test_loop_batch_of_writes_then_reads_in_one_enter_each(loop):
    t, bufs, path = loop
    writes = []
    for i in range(16):
        bufs[i][:] = bytes([i + 1]) * BS
        writes.append((req(OP_WRITE, 3 * i, i, fua=i == 5), bufs[i]))
    assert t.handle_batch(writes) == [BS] * 16
    assert CountingRing.enters == 1          # all 16 submitted and waited for together
    reads = [(req(OP_READ, 3 * i, i), bufs[16 + i]) for i in range(16)]
    assert t.handle_batch(reads) == [BS] * 16
    assert CountingRing.enters == 2
    assert [bytes(bufs[16 + i]) for i in range(16)] == [bytes([i + 1]) * BS for i in range(16)]
    data = path.read_bytes()
    assert all(data[3 * i * BS:(3 * i + 1) * BS] == bytes([i + 1]) * BS for i in range(16))


def test_loop_batch_larger_than_the_ring_goes_in_chunks(loop):
    t, bufs, _ = loop
    t.RING_ENTRIES = 4
    for i in range(10):
        bufs[i][:] = bytes([0x40 + i]) * BS
    assert t.handle_batch([(req(OP_WRITE, i, i), bufs[i]) for i in range(10)]) == [BS] * 10
    assert CountingRing.enters == 3          # 4 + 4 + 2
    assert t.handle_batch([(req(OP_READ, i, i), bufs[20 + i]) for i in range(10)]) == [BS] * 10
    assert [bytes(bufs[20 + i][:1]) for i in range(10)] == [bytes([0x40 + i]) for i in range(10)]


def test_loop_other_ops_wait_for_the_data_before_them(loop):
    """A WRITE_ZEROES after a WRITE to the same block in one batch leaves zeros; a WRITE
    after a DISCARD leaves its data: the batch's order holds across non-data ops."""
    t, bufs, path = loop
    bufs[0][:] = b"a" * BS
    bufs[1][:] = b"b" * BS
    bufs[2][:] = b"c" * BS
    batch = [(req(OP_WRITE, 0, 0), bufs[0]), (req(OP_WRITE, 1, 1), bufs[1]),
             (req(OP_WRITE_ZEROES, 0, 2), memoryview(b"")),
             (req(OP_DISCARD, 1, 3), memoryview(b"")),
             (req(OP_WRITE, 1, 4), bufs[2]), (req(OP_WRITE, 2, 5), bufs[2]),
             (req(OP_FLUSH, 0, 6), memoryview(b""))]
    assert t.handle_batch(batch) == [BS, BS, 0, 0, BS, BS, 0]
    data = path.read_bytes()
    assert data[:BS] == bytes(BS) and data[BS:3 * BS] == b"c" * 2 * BS


def test_loop_error_fails_only_its_request(loop):
    t, bufs, path = loop
    readonly = os.open(path, os.O_RDONLY)            # writes through it fail with EBADF
    os.dup2(readonly, t.file.fd)
    os.close(readonly)
    batch = [(req(OP_READ, 0, 0), bufs[0]), (req(OP_WRITE, 1, 1), bufs[1]),
             (req(OP_READ, 2, 2), bufs[2])]
    assert t.handle_batch(batch) == [BS, -errno.EBADF, BS]


def test_loop_without_io_uring_serves_one_by_one(tmp_path, monkeypatch):
    def unavailable(n, flag_sets):
        raise OSError(errno.ENOSYS, "no io_uring")

    monkeypatch.setattr(target_mod, "open_ring", unavailable)
    path = tmp_path / "backing"
    path.write_bytes(b"z" * 8 * BS)
    t = LoopTarget(str(path))
    t.open()
    area = mmap.mmap(-1, 4 * BS)
    bufs = [memoryview(area)[i * BS:(i + 1) * BS] for i in range(4)]
    try:
        assert t.handle_batch([(req(OP_READ, i, i), bufs[i]) for i in range(4)]) == [BS] * 4
        assert all(bytes(b) == b"z" * BS for b in bufs)
    finally:
        t.close()
        for b in bufs:
            b.release()
        area.close()
