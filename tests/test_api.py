"""Small guarantees of the public API that front ends rely on."""
import os

from sworndisk import Config, MemoryDevice, SwornDisk

SEG = 4 << 20


def _disk():
    cfg = Config(memtable_records=64)
    data = MemoryDevice(8 * SEG)
    meta = MemoryDevice(SwornDisk.min_meta_size(8 * SEG, config=cfg))
    return SwornDisk.create(data, meta, os.urandom(16), config=cfg)


def test_write_copies_its_argument_before_returning():
    # The ublk target passes the shim's request buffer, which is reused at once.
    disk = _disk()
    buf = bytearray(os.urandom(3 * 4096))
    want = bytes(buf)
    disk.write(10, memoryview(buf))
    buf[:] = bytes(len(buf))                 # the shim reuses its buffer
    assert disk.read(10, 3) == want
    disk.flush()
    assert disk.read(10, 3) == want


def test_write_accepts_any_buffer():
    disk = _disk()
    block = os.urandom(4096)
    disk.write(0, block)
    disk.write(1, bytearray(block))
    disk.write(2, memoryview(block))
    disk.flush()
    assert disk.read(0, 3) == block * 3
