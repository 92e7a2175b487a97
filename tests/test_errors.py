"""Error contract: every misuse and every failure maps to the documented exception."""
from __future__ import annotations

import errno
import random
import re

import pytest

from sworndisk import (Config, DeviceTooSmall, DiskClosedError, IntegrityError, InvalidArgument,
                       MemoryDevice, NoSpaceError, NotFormattedError, SwornDisk, SwornDiskError,
                       WrongKeyError)

from .conftest import (BS, KEY16, KEY32, OTHER16, MiB, Model, ZERO, check_read, make_blocks,
                       meta_size_for, new_disk, verify_disk)
from .crashdev import FaultyDevice

DATA = 24 * MiB
NR = 256
SMALL = Config(memtable_records=256)     # keeps the meta device small (~17 MiB)


# ---- keys ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key", [KEY16, KEY32], ids=["aes128-key", "aes256-key"])
def test_wrong_key(key):
    disk, data, meta = new_disk(DATA, NR, SMALL, key=key)
    disk.write(0, b"k" * BS)
    disk.close()
    wrong = bytes(b ^ 0x5A for b in key)
    with pytest.raises(WrongKeyError):
        SwornDisk.open(data, meta, wrong)
    other_len = KEY32 if len(key) == 16 else KEY16
    with pytest.raises(WrongKeyError):
        SwornDisk.open(data, meta, other_len)
    # a key differing in one bit
    with pytest.raises(WrongKeyError):
        SwornDisk.open(data, meta, key[:-1] + bytes([key[-1] ^ 1]))
    # nothing was damaged by the failed attempts
    d = SwornDisk.open(data, meta, key)
    assert d.read(0, 1) == b"k" * BS
    d.close()


def test_wrong_key_is_not_integrity_error():
    disk, data, meta = new_disk(DATA, NR, SMALL)
    disk.close()
    with pytest.raises(WrongKeyError) as ei:
        SwornDisk.open(data, meta, OTHER16)
    assert not isinstance(ei.value, IntegrityError)
    assert isinstance(ei.value, SwornDiskError)


@pytest.mark.parametrize("n", [0, 1, 8, 15, 17, 24, 31, 33, 64])
def test_bad_key_length(n):
    data = MemoryDevice(DATA)
    meta = MemoryDevice(meta_size_for(DATA, NR, SMALL))
    with pytest.raises(InvalidArgument) as ei:
        SwornDisk.create(data, meta, bytes(n), nr_blocks=NR, config=SMALL)
    assert "16" in str(ei.value) and "32" in str(ei.value), str(ei.value)
    # the failed create wrote nothing
    assert not SwornDisk.probe(meta)
    disk, data, meta = new_disk(DATA, NR, SMALL)
    disk.close()
    with pytest.raises(InvalidArgument):
        SwornDisk.open(data, meta, bytes(n))


def test_key_of_wrong_type():
    data = MemoryDevice(DATA)
    meta = MemoryDevice(meta_size_for(DATA, NR, SMALL))
    with pytest.raises(InvalidArgument):
        SwornDisk.create(data, meta, "0123456789abcdef", nr_blocks=NR, config=SMALL)


# ---- formatting / sizes -------------------------------------------------------------------

def test_open_unformatted():
    data = MemoryDevice(DATA)
    meta = MemoryDevice(meta_size_for(DATA, NR, SMALL))
    assert not SwornDisk.probe(meta)
    with pytest.raises(NotFormattedError):
        SwornDisk.open(data, meta, KEY16)
    meta.buf[:BS] = random.Random(0).randbytes(BS)     # garbage, no magic
    with pytest.raises(NotFormattedError):
        SwornDisk.open(data, meta, KEY16)


def test_probe():
    disk, data, meta = new_disk(DATA, NR, SMALL)
    assert SwornDisk.probe(meta)
    assert not SwornDisk.probe(data)
    disk.close()


def _numbers(msg: str):
    return [int(x) for x in re.findall(r"\d+", msg.replace(",", ""))]


def test_meta_too_small_names_minimum():
    need = SwornDisk.min_meta_size(DATA, NR, SMALL)
    assert need > 0 and need % BS == 0
    data = MemoryDevice(DATA)
    with pytest.raises(DeviceTooSmall) as ei:
        SwornDisk.create(data, MemoryDevice(need - BS), KEY16, nr_blocks=NR, config=SMALL)
    assert isinstance(ei.value, InvalidArgument)
    assert need in _numbers(str(ei.value)), f"minimum {need} not in message: {ei.value}"
    # exactly the minimum works
    d = SwornDisk.create(data, MemoryDevice(need), KEY16, nr_blocks=NR, config=SMALL)
    d.write(NR - 1, b"m" * BS)
    d.close()


@pytest.mark.parametrize("cfg", [None, Config(memtable_records=16, level_ratio=2),
                                 Config(cipher_key_bytes=32)], ids=["default", "small", "aes256"])
def test_min_meta_size_is_enough(cfg):
    """A meta device of exactly min_meta_size holds a disk worked hard."""
    need = SwornDisk.min_meta_size(DATA, NR, cfg)
    data, meta = MemoryDevice(DATA), MemoryDevice(need)
    disk = SwornDisk.create(data, meta, KEY16, nr_blocks=NR, config=cfg)
    rng = random.Random(1)
    model = Model(NR)
    for i in range(400):
        lba = rng.randrange(NR)
        n = min(rng.randint(1, 16), NR - lba)
        buf = make_blocks(rng, lba, n, i)
        disk.write(lba, buf)
        model.write(lba, buf)
        if i % 5 == 0:
            disk.flush()
    disk.close()
    disk = SwornDisk.open(data, meta, KEY16)
    verify_disk(disk, model, "min meta size", lbas=range(NR))
    disk.close()


def test_data_too_small_names_minimum():
    for size in (4 * MiB, 8 * MiB, 64 * 1024):
        with pytest.raises(DeviceTooSmall) as ei:
            SwornDisk.create(MemoryDevice(size), MemoryDevice(16 * MiB), KEY16)
        nums = _numbers(str(ei.value))
        assert any(n > size for n in nums) or any(n * MiB > size for n in nums), \
            f"no minimum in the message: {ei.value}"


def test_devices_shrunk_since_format():
    disk, data, meta = new_disk(DATA, NR, SMALL)
    disk.close()
    small = MemoryDevice(DATA - 4 * MiB)
    small.buf[:] = data.buf[:len(small.buf)]
    with pytest.raises(DeviceTooSmall):
        SwornDisk.open(small, meta, KEY16)


def test_nr_blocks_limits():
    data = MemoryDevice(DATA)
    meta = MemoryDevice(16 * MiB)
    for bad in (0, -1, DATA // BS + 1):
        with pytest.raises(InvalidArgument) as ei:
            SwornDisk.create(data, meta, KEY16, nr_blocks=bad)
        assert _numbers(str(ei.value)), str(ei.value)


def test_bad_config():
    with pytest.raises(InvalidArgument):
        SwornDisk.create(MemoryDevice(DATA), MemoryDevice(16 * MiB), KEY16, nr_blocks=NR,
                         config=Config(memtable_records=1))
    with pytest.raises(InvalidArgument):
        SwornDisk.create(MemoryDevice(DATA), MemoryDevice(16 * MiB), KEY16, nr_blocks=NR,
                         config=Config(cipher_key_bytes=24))


def test_config_is_recorded_not_reread():
    cfg = Config(memtable_records=16, level_ratio=3)
    disk, data, meta = new_disk(DATA, NR, cfg)
    disk.close()
    d = SwornDisk.open(data, meta, KEY16)
    assert d.nr_blocks == NR
    st = d.stats()
    if "memtable_limit" in st:
        assert st["memtable_limit"] == 16
    d.close()


# ---- argument checks ----------------------------------------------------------------------

@pytest.fixture
def disk():
    d, _, _ = new_disk(DATA, NR, SMALL)
    yield d
    try:
        d.close()
    except SwornDiskError:
        pass


def _limit_in(msg: str, *limits) -> bool:
    nums = _numbers(msg)
    return any(l in nums for l in limits)


@pytest.mark.parametrize("lba,n", [(NR, 1), (NR - 1, 2), (-1, 1), (0, NR + 1), (10**12, 1)])
def test_read_out_of_range(disk, lba, n):
    with pytest.raises(InvalidArgument) as ei:
        disk.read(lba, n)
    assert _limit_in(str(ei.value), NR, NR - 1), f"limit not named: {ei.value}"


@pytest.mark.parametrize("lba,n", [(NR, 1), (NR - 1, 2), (-1, 1)])
def test_write_out_of_range(disk, lba, n):
    with pytest.raises(InvalidArgument) as ei:
        disk.write(lba, b"x" * (n * BS))
    assert _limit_in(str(ei.value), NR, NR - 1), f"limit not named: {ei.value}"
    assert disk.read(NR - 1, 1) == ZERO, "a rejected write changed the disk"


@pytest.mark.parametrize("lba,n", [(NR, 1), (NR - 1, 2), (-1, 1), (0, -1), (0, NR + 1)])
def test_discard_out_of_range(disk, lba, n):
    with pytest.raises(InvalidArgument) as ei:
        disk.discard(lba, n)
    assert _limit_in(str(ei.value), NR, NR - 1, 0), f"limit not named: {ei.value}"


def test_negative_count(disk):
    with pytest.raises(InvalidArgument):
        disk.read(0, -1)
    with pytest.raises(InvalidArgument):
        disk.discard(0, -5)


@pytest.mark.parametrize("nbytes", [1, 512, 4095, 4097, 6000, 8191])
def test_unaligned_write(disk, nbytes):
    with pytest.raises(InvalidArgument) as ei:
        disk.write(0, b"u" * nbytes)
    assert "4096" in str(ei.value), f"block size not named: {ei.value}"
    assert disk.read(0, 2) == bytes(2 * BS)


def test_empty_write(disk):
    try:
        disk.write(0, b"")
    except InvalidArgument:
        pass
    assert disk.read(0, 1) == ZERO


def test_bad_lba_types(disk):
    for bad in (1.0, "3", None):
        with pytest.raises((InvalidArgument, TypeError)):
            disk.read(bad, 1)
    with pytest.raises((InvalidArgument, TypeError)):
        disk.read(0, 1.5)


def test_rejected_calls_leave_disk_usable(disk):
    disk.write(5, b"a" * BS)
    for call in (lambda: disk.write(NR, b"b" * BS), lambda: disk.write(0, b"b" * 100),
                 lambda: disk.read(-1, 1), lambda: disk.discard(0, NR + 1)):
        with pytest.raises(InvalidArgument):
            call()
    disk.flush()
    assert disk.read(5, 1) == b"a" * BS


# ---- closed disk ----------------------------------------------------------------------------

def test_calls_after_close():
    disk, data, meta = new_disk(DATA, NR, SMALL)
    disk.write(0, b"c" * BS)
    disk.close()
    for name, call in (("read", lambda: disk.read(0, 1)),
                       ("write", lambda: disk.write(0, b"x" * BS)),
                       ("discard", lambda: disk.discard(0, 1)),
                       ("flush", lambda: disk.flush())):
        with pytest.raises(DiskClosedError):
            call()
    disk.close()                      # idempotent
    d = SwornDisk.open(data, meta, KEY16)
    assert d.read(0, 1) == b"c" * BS
    d.close()


def test_context_manager_closes():
    data = MemoryDevice(DATA)
    meta = MemoryDevice(meta_size_for(DATA, NR, SMALL))
    with SwornDisk.create(data, meta, KEY16, nr_blocks=NR, config=SMALL) as d:
        d.write(3, b"w" * BS)
    with pytest.raises(DiskClosedError):
        d.read(3, 1)
    with SwornDisk.open(data, meta, KEY16) as d:
        assert d.read(3, 1) == b"w" * BS


# ---- errno mapping ---------------------------------------------------------------------------

def test_exception_hierarchy():
    e = IntegrityError("x")
    assert isinstance(e, OSError) and e.errno == errno.EIO and isinstance(e, SwornDiskError)
    e = NoSpaceError("x")
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and isinstance(e, SwornDiskError)
    assert issubclass(InvalidArgument, ValueError)
    assert issubclass(DeviceTooSmall, InvalidArgument)
    for cls in (WrongKeyError, NotFormattedError, DiskClosedError):
        assert issubclass(cls, SwornDiskError)


def test_integrity_error_from_read_is_eio():
    disk, data, meta = new_disk(DATA, NR, SMALL)
    before = bytes(data.buf)
    disk.write(7, b"i" * BS)
    disk.close()
    changed = [o for o in range(0, DATA, BS) if data.buf[o:o + BS] != before[o:o + BS]]
    assert changed
    for o in changed:
        data.buf[o + 10] ^= 0xFF
    d = SwornDisk.open(data, meta, KEY16)
    with pytest.raises(IntegrityError) as ei:
        d.read(7, 1)
    assert ei.value.errno == errno.EIO
    assert isinstance(ei.value, OSError)
    assert d.read(8, 1) == ZERO            # other blocks still readable
    d.close()


def test_fill_until_no_space():
    """Logical size = the whole data device: write unique data (first every LBA, then
    overwrites) until NoSpaceError (errno ENOSPC). Everything flushed before it remains
    readable, also after reopen; discarding frees space so that writes work again."""
    data_size = 24 * MiB
    nr = data_size // BS
    disk, data, meta = new_disk(data_size, nr, Config(memtable_records=1024))
    model = Model(nr)
    flushed = Model(nr)
    rng = random.Random(4)
    err = None
    seq = [(i * 16, 16) for i in range(nr // 16)] + \
          [(rng.randrange(nr - 4), 4) for _ in range(nr // 4)]
    for i, (lba, n) in enumerate(seq):
        try:
            buf = make_blocks(rng, lba, n, i)
            disk.write(lba, buf)
            model.write(lba, buf)
            if i % 8 == 7:
                disk.flush()
                flushed = model.copy()
        except NoSpaceError as e:
            err = e
            break
    assert err is not None, f"wrote {2 * nr} unique blocks onto a {nr}-block device " \
                            f"without NoSpaceError"
    assert err.errno == errno.ENOSPC and isinstance(err, OSError)
    assert "ENOSPC" in repr(err) or "full" in str(err) or "space" in str(err).lower(), str(err)
    # reads still work; what was flushed is there (or newer acknowledged data)
    for l in range(0, nr, 13):
        got = disk.read(l, 1)
        assert got in (flushed.get(l), model.get(l)), f"lba {l} after ENOSPC: {got[:24]!r}"
    try:
        disk.close()
    except (NoSpaceError, DiskClosedError):
        pass
    d = SwornDisk.open(data, meta, KEY16)
    for l in range(0, nr, 7):
        got = d.read(l, 1)
        assert got in (flushed.get(l), model.get(l)), f"lba {l} after reopen: {got[:24]!r}"
    for l in set(flushed.blocks) & set(range(0, nr, 7)):
        if flushed.get(l) == model.get(l):
            check_read(d, flushed, l, 1, "flushed block after ENOSPC + reopen")
    # freeing space (discard) makes room again
    d.discard(0, 2048)
    d.flush()
    blk = b"n" * BS
    d.write(0, blk)
    d.write(4000, blk)
    d.flush()
    assert d.read(0, 1) == blk and d.read(4000, 1) == blk and d.read(1, 1) == ZERO
    d.close()
    d = SwornDisk.open(data, meta, KEY16)
    assert d.read(0, 1) == blk and d.read(4000, 1) == blk and d.read(2047, 1) == ZERO
    d.close()


# ---- device errors -------------------------------------------------------------------------

def test_device_read_error_surfaces():
    """A failing data device: the read raises an OSError (EIO), never returns zeros."""
    disk, data, meta = new_disk(DATA, NR, SMALL)
    before = bytes(data.buf)
    disk.write(9, b"r" * BS)
    disk.close()
    changed = [o for o in range(0, DATA, BS) if data.buf[o:o + BS] != before[o:o + BS]]
    fdata = FaultyDevice(data)
    for o in changed:
        fdata.fail_read(o, o + BS)
    d = SwornDisk.open(fdata, meta, KEY16)
    with pytest.raises(OSError) as ei:
        d.read(9, 1)
    assert ei.value.errno == errno.EIO
    fdata.clear()
    assert d.read(9, 1) == b"r" * BS
    d.close()


@pytest.mark.parametrize("fail_at", range(0, 8))
def test_device_write_error_during_flush(fail_at):
    """A write error in the middle of flush: flush raises, the disk refuses to continue
    (or never acknowledges a flush it could not make durable), and a reopen shows the
    state before or after that flush -- nothing else."""
    rng = random.Random(fail_at)
    cfg = Config(memtable_records=16, level_ratio=2)
    inner_data = MemoryDevice(DATA)
    inner_meta = MemoryDevice(meta_size_for(DATA, NR, cfg))
    fdata, fmeta = FaultyDevice(inner_data), FaultyDevice(inner_meta)
    disk = SwornDisk.create(fdata, fmeta, KEY16, nr_blocks=NR, config=cfg)
    pre = Model(NR)
    for i in range(10):
        buf = make_blocks(rng, i * 3, 3, i)
        disk.write(i * 3, buf)
        pre.write(i * 3, buf)
    disk.flush()
    post = pre.copy()
    for i in range(12):
        buf = make_blocks(rng, 100 + i * 2, 2, 50 + i)
        disk.write(100 + i * 2, buf)
        post.write(100 + i * 2, buf)
    # the k-th write across both devices fails
    dev = fdata if fail_at % 2 == 0 else fmeta
    dev.fail_write_after(fail_at // 2)
    try:
        disk.flush()
        flushed = True
    except (OSError, SwornDiskError):
        flushed = False
    if not flushed:
        assert dev.failures == 1
        fdata.clear()
        fmeta.clear()
        # the failed instance must not now claim durability it cannot have checked
        try:
            disk.flush()
            later_ok = True
        except (OSError, SwornDiskError):
            later_ok = False
        if later_ok:
            allowed = [post]          # it re-did the flush: must really be durable
        else:
            allowed = [pre, post]
    else:
        assert dev.failures == 0, "flush succeeded although a device write failed"
        allowed = [post]
    d = SwornDisk.open(inner_data, inner_meta, KEY16)
    ok = [s for s in allowed if all(d.read(l, 1) == s.get(l) for l in
                                    set(pre.blocks) | set(post.blocks))]
    assert ok, f"fail_at={fail_at} flushed={flushed}: state is neither pre- nor post-flush"
    d.close()


def test_swapped_devices():
    disk, data, meta = new_disk(DATA, NR, SMALL)
    disk.write(0, b"s" * BS)
    disk.close()
    with pytest.raises(NotFormattedError):
        SwornDisk.open(meta, data, KEY16)
    d = SwornDisk.open(data, meta, KEY16)
    assert d.read(0, 1) == b"s" * BS
    d.close()


@pytest.mark.parametrize("fail_at", range(0, 6))
def test_device_flush_error(fail_at):
    """The device's flush (the durability barrier) fails: the disk flush raises, and the
    disk never later reports success for data that may not be durable."""
    rng = random.Random(100 + fail_at)
    cfg = Config(memtable_records=16, level_ratio=2)
    inner_data = MemoryDevice(DATA)
    inner_meta = MemoryDevice(meta_size_for(DATA, NR, cfg))
    fdata, fmeta = FaultyDevice(inner_data), FaultyDevice(inner_meta)
    disk = SwornDisk.create(fdata, fmeta, KEY16, nr_blocks=NR, config=cfg)
    pre = Model(NR)
    for i in range(8):
        buf = make_blocks(rng, i * 4, 4, i)
        disk.write(i * 4, buf)
        pre.write(i * 4, buf)
    disk.flush()
    post = pre.copy()
    for i in range(20):
        buf = make_blocks(rng, 64 + i, 1, 100 + i)
        disk.write(64 + i, buf)
        post.write(64 + i, buf)
    dev = fdata if fail_at % 2 == 0 else fmeta
    dev.fail_flush_after(fail_at // 2)
    try:
        disk.flush()
        failed = False
    except (OSError, SwornDiskError):
        failed = True
    assert failed == (dev.failures == 1), \
        f"fail_at={fail_at}: device flush failures={dev.failures} but disk flush failed={failed}"
    allowed = [post]
    if failed:
        # a retry may only succeed if it really made everything durable
        try:
            disk.flush()
        except (OSError, SwornDiskError):
            allowed = [pre, post]
    d = SwornDisk.open(inner_data, inner_meta, KEY16)
    lbas = set(pre.blocks) | set(post.blocks)
    ok = [s for s in allowed
          if all(d.read(l, 1) == s.get(l) for l in lbas)]
    assert ok, f"fail_at={fail_at} failed={failed}: state is neither pre- nor post-flush"
    d.close()
