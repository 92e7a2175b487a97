"""FileDevice on real files (O_DIRECT where the filesystem allows it, buffered otherwise),
and a SwornDisk created on file paths."""
from __future__ import annotations

import gc
import os
import random

import pytest

from sworndisk import Config, FileDevice, InvalidArgument, MemoryDevice, SwornDisk
from sworndisk.device import create_image

from .conftest import BS, KEY16, MiB, Model, make_blocks, verify_disk

CFG = Config(memtable_records=64, level_ratio=2)


@pytest.fixture(params=["direct", "buffered"])
def direct(request):
    return request.param == "direct"


def test_pread_pwrite_flush_size(tmp_path, direct):
    p = tmp_path / "dev.img"
    create_image(str(p), 1 * MiB)
    dev = FileDevice(str(p), direct=direct)
    try:
        assert dev.size == 1 * MiB
        assert dev.pread(BS, 0) == bytes(BS)
        rng = random.Random(0)
        blobs = {}
        for off in (0, BS, 17 * BS, MiB - BS):
            blobs[off] = rng.randbytes(BS)
            dev.pwrite(blobs[off], off)
        big = rng.randbytes(16 * BS)
        dev.pwrite(memoryview(big), 32 * BS)          # memoryview and multi-block
        dev.flush()
        for off, b in blobs.items():
            assert dev.pread(BS, off) == b, f"offset {off}"
        assert dev.pread(16 * BS, 32 * BS) == big
        assert isinstance(dev.pread(BS, 0), bytes)
        with pytest.raises(InvalidArgument):
            dev.pread(BS, MiB)
        with pytest.raises(InvalidArgument):
            dev.pwrite(b"x" * BS, MiB - 100)
        with pytest.raises(InvalidArgument):
            dev.pread(BS, -BS)
        dev.discard(17 * BS, BS)                      # a hint: zeros or old data
        assert dev.pread(BS, 17 * BS) in (bytes(BS), blobs[17 * BS])
    finally:
        dev.close()
    # the data is really in the file
    with open(p, "rb") as f:
        f.seek(BS)
        assert f.read(BS) == blobs[BS]
    dev = FileDevice(str(p), direct=direct)
    assert dev.pread(BS, MiB - BS) == blobs[MiB - BS]
    dev.close()


def test_readonly(tmp_path):
    p = tmp_path / "ro.img"
    create_image(str(p), 64 * 1024)
    dev = FileDevice(str(p), readonly=True)
    try:
        assert dev.pread(BS, 0) == bytes(BS)
        with pytest.raises(OSError):
            dev.pwrite(b"x" * BS, 0)
    finally:
        dev.close()


def test_bad_paths(tmp_path):
    with pytest.raises(InvalidArgument):
        FileDevice(str(tmp_path / "missing.img"))
    with pytest.raises(InvalidArgument):
        FileDevice(str(tmp_path))                     # a directory


def test_create_image_sparse_and_extend(tmp_path):
    p = str(tmp_path / "sparse.img")
    create_image(p, 8 * MiB)
    assert os.path.getsize(p) == 8 * MiB
    create_image(p, 4 * MiB)                          # never shrinks
    assert os.path.getsize(p) == 8 * MiB
    create_image(p, 16 * MiB)
    assert os.path.getsize(p) == 16 * MiB


def _open_fds() -> int:
    """Open descriptors, once the garbage of earlier tests is collected: a disk an earlier
    test dropped unclosed releases its crypto pool's descriptors when collected, and that
    must not land between the two counts of this test."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_sworndisk_on_file_paths(tmp_path):
    data_p, meta_p = str(tmp_path / "data.img"), str(tmp_path / "meta.img")
    data_size = 24 * MiB
    create_image(data_p, data_size)
    create_image(meta_p, SwornDisk.min_meta_size(data_size, 2048, CFG))
    fds = _open_fds()
    disk = SwornDisk.create(data_p, meta_p, KEY16, nr_blocks=2048, config=CFG)
    rng = random.Random(3)
    model = Model(2048)
    for i in range(300):
        lba = rng.randrange(2048)
        n = min(rng.randint(1, 16), 2048 - lba)
        buf = make_blocks(rng, lba, n, i)
        disk.write(lba, buf)
        model.write(lba, buf)
        if i % 25 == 0:
            disk.flush()
        if i % 60 == 0:
            disk.discard(lba, n)
            model.discard(lba, n)
    disk.close()
    assert _open_fds() == fds, "close() left file descriptors open"
    assert SwornDisk.probe(meta_p)
    assert not SwornDisk.probe(data_p)
    disk = SwornDisk.open(data_p, meta_p, KEY16)
    verify_disk(disk, model, "file-backed reopen", lbas=range(2048))
    disk.close()
    # flushed-but-not-closed data survives the death of the process that wrote it (whose
    # lock on the images dies with it)
    buf = make_blocks(rng, 5, 2, 10**6)
    model.write(5, buf)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            writer = SwornDisk.open(data_p, meta_p, KEY16)
            writer.write(5, buf)
            writer.flush()
            code = 0
        finally:
            os._exit(code)                  # no close(): a process that dies
    assert os.waitpid(pid, 0)[1] == 0, "the writer process failed"
    disk = SwornDisk.open(data_p, meta_p, KEY16)
    verify_disk(disk, model, "file-backed recovery", lbas=range(0, 2048, 3))
    disk.close()


def test_sworndisk_on_filedevice_objects(tmp_path, direct):
    data_p, meta_p = str(tmp_path / "d.img"), str(tmp_path / "m.img")
    create_image(data_p, 24 * MiB)
    create_image(meta_p, SwornDisk.min_meta_size(24 * MiB, 512, CFG))
    d, m = FileDevice(data_p, direct=direct), FileDevice(meta_p, direct=direct)
    disk = SwornDisk.create(d, m, KEY16, nr_blocks=512, config=CFG)
    blk = b"f" * BS
    disk.write(511, blk)
    disk.close()
    # devices passed in are the caller's: still usable after close
    assert d.pread(BS, 0) is not None
    disk = SwornDisk.open(d, m, KEY16)
    assert disk.read(511, 1) == blk
    disk.close()
    d.close()
    m.close()


def test_open_missing_path_is_invalid_argument(tmp_path):
    with pytest.raises(InvalidArgument):
        SwornDisk.open(str(tmp_path / "nope"), str(tmp_path / "nope2"), KEY16)


def test_pwrite_many_scattered(tmp_path, direct):
    """Scattered writes in one call (io_uring batches with O_DIRECT): all land."""
    p = tmp_path / "many.img"
    create_image(str(p), 4 * MiB)
    dev = FileDevice(str(p), direct=direct)
    try:
        rng = random.Random(9)
        offs = rng.sample(range(0, 4 * MiB - 4 * BS, BS), 600)  # > one 256-entry batch
        items = [(rng.randbytes(BS), o) for o in offs]
        items.append((rng.randbytes(3 * BS), 4 * MiB - 3 * BS))   # a multi-block item
        dev.pwrite_many(items)
        dev.flush()
        for data, off in items:
            assert dev.pread(len(data), off) == data, f"offset {off}"
        with pytest.raises((InvalidArgument, OSError)):
            dev.pwrite_many([(b"x" * BS, 0), (b"y" * BS, 4 * MiB)])
    finally:
        dev.close()


def test_pread_many_scattered(tmp_path, direct):
    """Scattered reads in one call (io_uring with O_DIRECT, more than one ring batch): each
    returns exactly what pread returns, in order, after a write batch still in flight."""
    p = tmp_path / "reads.img"
    create_image(str(p), 4 * MiB)
    dev = FileDevice(str(p), direct=direct)
    try:
        rng = random.Random(11)
        offs = rng.sample(range(0, 4 * MiB - 4 * BS, BS), 600)
        items = [(rng.randbytes(BS), o) for o in offs] + [(rng.randbytes(3 * BS), 4 * MiB - 3 * BS)]
        dev.pwrite_many(items)                  # left in flight: pread_many must wait for it
        got = dev.pread_many([(len(d), o) for d, o in items])
        assert got == [d for d, _ in items]
        assert dev.pread_many([]) == []
        with pytest.raises((InvalidArgument, OSError)):
            dev.pread_many([(BS, 0), (BS, 4 * MiB)])
    finally:
        dev.close()


def test_pread_many_default_goes_through_pread():
    """The base class answers pread_many with pread, so a device that overrides pread
    (a fault injector, a counter) sees every read of a batch."""
    seen = []

    class Watching(MemoryDevice):
        def pread(self, nbytes, offset):
            seen.append(offset)
            return super().pread(nbytes, offset)

    dev = Watching(1 * MiB)
    dev.pwrite(b"a" * BS, BS)
    assert dev.pread_many([(BS, BS), (BS, 0)]) == [b"a" * BS, bytes(BS)]
    assert seen == [BS, 0]


def test_sworndisk_on_files_under_space_pressure(tmp_path):
    """Overwrites on a nearly full file-backed disk: threaded logging and cleaning write
    scattered blocks (batched writes on O_DIRECT files); everything reads back."""
    data_p, meta_p = str(tmp_path / "pd.img"), str(tmp_path / "pm.img")
    nr = 4096
    create_image(data_p, 24 * MiB)
    create_image(meta_p, SwornDisk.min_meta_size(24 * MiB, nr, CFG))
    disk = SwornDisk.create(data_p, meta_p, KEY16, nr_blocks=nr, config=CFG)
    rng = random.Random(10)
    model = Model(nr)
    for lba in range(0, 3000, 32):
        buf = make_blocks(rng, lba, 32, 0)
        disk.write(lba, buf)
        model.write(lba, buf)
    disk.flush()
    for i in range(1500):
        lba = rng.randrange(3000)
        buf = make_blocks(rng, lba, 1, i + 1)
        disk.write(lba, buf)
        model.write(lba, buf)
        if i % 50 == 49:
            disk.flush()
    st = disk.stats()
    disk.close()
    assert st.space.threaded_segments + st.lifetime.cleaning_runs > 0, st
    disk = SwornDisk.open(data_p, meta_p, KEY16)
    verify_disk(disk, model, "file-backed, under pressure", lbas=range(nr))
    disk.close()


def test_pwrite_many_in_flight_batch_is_ordered_before_every_other_call(tmp_path):
    """pwrite_many may leave its last batch in flight: pread, flush and close must wait for
    it, so that flush() stays a barrier for every write issued before it."""
    from sworndisk import FileDevice
    from sworndisk.device import create_image
    path = str(tmp_path / "img")
    create_image(path, 8 << 20)
    dev = FileDevice(path)
    blocks = [os.urandom(3 * 4096) for _ in range(5)]
    dev.pwrite_many([(b, i * 7 * 4096) for i, b in enumerate(blocks)])
    assert dev.pread(3 * 4096, 2 * 7 * 4096) == blocks[2]        # read after in-flight write
    dev.pwrite_many([(blocks[0], 4096)])
    dev.flush()
    dev.pwrite_many([(blocks[1], 1 << 20)])
    dev.close()                                                  # close waits too
    dev = FileDevice(path)
    assert dev.pread(3 * 4096, 4096) == blocks[0]
    assert dev.pread(3 * 4096, 1 << 20) == blocks[1]
    dev.close()


def _failing_the_second_write(tmp_path):
    """(path, device, its ring, the ring's own complete, failures seen): a FileDevice on
    an image whose ring reports the second write of each batch failed (EIO), so that the
    device redoes it; the test puts ring.complete back."""
    path = str(tmp_path / "img")
    create_image(path, 8 << 20)
    dev = FileDevice(path)
    if not dev.direct or dev._uring() is None:
        dev.close()
        pytest.skip("needs O_DIRECT and io_uring (the in-flight path)")
    ring = dev._uring()
    real_complete = ring.complete
    failed = []

    def complete_failing_the_second(count):
        cqes = real_complete(count)
        out = [(u, -5 if u == 1 else r, f) for u, r, f in cqes]
        failed.extend(u for u, r, _ in out if r < 0)
        return out
    ring.complete = complete_failing_the_second
    return path, dev, ring, real_complete, failed


def test_writes_in_flight_do_not_depend_on_the_callers_buffer(tmp_path):
    """pwrite_many returns with its last batch in flight; the caller may reuse its buffer
    at once (the engine seals each segment into one reused buffer). A write the kernel
    failed is redone from the device's own copy, so it still writes what was given."""
    path, dev, ring, real_complete, failed = _failing_the_second_write(tmp_path)
    data = bytearray(os.urandom(4 * 4096))
    expect = bytes(data)
    view = memoryview(data)
    dev.pwrite_many([(view[i * 4096:(i + 1) * 4096], i * 2 * 4096) for i in range(4)])
    data[:] = bytes(len(data))                   # reused before the batch completed
    dev.flush()
    ring.complete = real_complete
    assert failed == [1], "the injected failure never fired"
    assert b"".join(dev.pread(4096, i * 2 * 4096) for i in range(4)) == expect
    dev.close()


def test_stable_writes_go_from_the_callers_pages(tmp_path):
    """pwrite_many_stable of page-aligned buffers (the engine's sealed segments)
    writes from them in place, with no copy into the bounce buffer; a write the kernel
    failed is redone from the same pages. Unaligned buffers are still copied."""
    import mmap
    path, dev, ring, real_complete, failed = _failing_the_second_write(tmp_path)
    area = mmap.mmap(-1, 4 * 4096)
    area[:] = os.urandom(4 * 4096)
    view = memoryview(area)
    dev.pwrite_many_stable([(view[i * 4096:(i + 1) * 4096], i * 2 * 4096) for i in range(4)])
    assert dev.bytes_bounced == 0
    dev.flush()
    ring.complete = real_complete
    assert failed == [1], "the injected failure never fired"
    assert b"".join(dev.pread(4096, i * 2 * 4096) for i in range(4)) == bytes(area)
    other = mmap.mmap(-1, 2 * 4096)
    other[:] = os.urandom(2 * 4096)
    unaligned = memoryview(other)[1:4097]                   # one byte off a page
    dev.pwrite_many_stable([(unaligned, 1 << 20)])
    assert dev.bytes_bounced == 4096
    assert dev.pread(4096, 1 << 20) == bytes(unaligned)
    view.release()
    unaligned.release()
    dev.close()
    empty = FileDevice(path)
    empty.pwrite_many([(b"", 0), (bytes(4096), 4096)])     # an empty item is no write
    empty.pwrite_many_stable([(b"", 0)])
    empty.close()


_LOST_WRITE = r"""
import os, resource, signal, sys
from sworndisk import FileDevice
path = sys.argv[1]
dev = FileDevice(path)
if not dev.direct or dev._uring() is None:
    print("no-uring")
    sys.exit(0)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))   # writes past 1 MiB: EFBIG
block = os.urandom(4096)
dev.pwrite_many([(block, 0), (block, 2 << 20)])        # left in flight; the second fails
for name, call in [("read", lambda: dev.pread(4096, 0)), ("flush", dev.flush),
                   ("write", lambda: dev.pwrite(block, 4096)),
                   ("write_many", lambda: dev.pwrite_many([(block, 8192)])),
                   ("discard", lambda: dev.discard(0, 4096))]:
    try:
        call()
        print(name, "ok")
    except OSError as e:
        print(name, "raised", e.errno)
"""


def test_a_failed_write_in_flight_fails_every_later_write_and_flush(tmp_path):
    """A write pwrite_many left in flight fails for real (the kernel refuses it: past the
    process's RLIMIT_FSIZE). The call that meets the error first is a read; every later
    write, flush and discard of the device fails too, so that no flush can return as if
    the lost write were durable (a merge's index chunk, a data segment)."""
    import errno
    import subprocess
    import sys
    path = str(tmp_path / "img")
    create_image(path, 8 << 20)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # its sworndisk
    out = subprocess.run([sys.executable, "-c", _LOST_WRITE, path], capture_output=True,
                         text=True, timeout=60, check=True, cwd=repo).stdout.split("\n")
    if out[0] == "no-uring":
        pytest.skip("needs O_DIRECT and io_uring (the in-flight path)")
    e = errno.EFBIG
    assert out[:5] == [f"read raised {e}", f"flush raised {e}", f"write raised {e}",
                       f"write_many raised {e}", f"discard raised {e}"], out


def test_writes_whose_completion_is_not_seen_count_as_lost(tmp_path):
    """Waiting for a batch in flight fails in the ring itself (io_uring_enter, or an
    interrupt): the writes' outcome is unknown, so they count as lost (every later write
    and flush fails), and the ring, out of step with its calls, is no longer used: reads
    (of other blocks: what the lost writes left is unknown) still work, one at a time."""
    path, dev, ring, real_complete, _ = _failing_the_second_write(tmp_path)
    calls = []

    def interrupted(count):
        calls.append(count)
        raise KeyboardInterrupt
    ring.complete = interrupted
    block = os.urandom(4096)
    dev.pwrite_many([(block, 0), (block, 8192)])
    with pytest.raises(KeyboardInterrupt):
        dev.pread(4096, 0)
    assert calls == [2]
    ring.complete = real_complete
    for call in (dev.flush, lambda: dev.pwrite(block, 4096),
                 lambda: dev.pwrite_many([(block, 4096)])):
        with pytest.raises(OSError, match="not seen through"):
            call()
    assert dev.pread_many([(4096, 1 << 20), (4096, 2 << 20)]) == [bytes(4096)] * 2
    dev.close()


def test_close_lets_go_of_a_device_whose_writes_in_flight_failed(tmp_path):
    """close() raises the error of the writes it waited for, and still closes the ring,
    the claim and the file, so that the same process can open the device again (a disk
    reopened after a failure)."""
    import time
    from sworndisk import DeviceBusyError
    path, dev, ring, real_complete, _ = _failing_the_second_write(tmp_path)
    dev.lock("data device")

    def interrupted(count):
        raise KeyboardInterrupt
    ring.complete = interrupted
    dev.pwrite_many([(os.urandom(4096), 0), (os.urandom(4096), 8192)])
    with pytest.raises(KeyboardInterrupt):
        dev.close()
    again = FileDevice(path)
    for _ in range(100):                # the exclusive lock is let go once the ring's
        try:                            # teardown, which the kernel finishes in the
            again.lock("data device")   # background, drops its hold on the file
            break
        except DeviceBusyError:
            time.sleep(0.05)
    else:
        raise AssertionError("the device is still locked after close()")
    again.close()
