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
    assert st.index.memtable_limit == 16
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


def _flush_scenario(seed: int, n_pre: int, n_post: int, size: int):
    """A disk on fault-injecting devices with one flushed state (`pre`) and unflushed
    writes on top of it (`post`); returns (disk, {"data": dev, "meta": dev}, inner
    devices, pre, post)."""
    rng = random.Random(seed)
    cfg = Config(memtable_records=16, level_ratio=2)
    inner = (MemoryDevice(DATA), MemoryDevice(meta_size_for(DATA, NR, cfg)))
    faulty = {"data": FaultyDevice(inner[0]), "meta": FaultyDevice(inner[1])}
    disk = SwornDisk.create(faulty["data"], faulty["meta"], KEY16, nr_blocks=NR, config=cfg)
    pre = Model(NR)
    for i in range(n_pre):
        buf = make_blocks(rng, i * size, size, i)
        disk.write(i * size, buf)
        pre.write(i * size, buf)
    disk.flush()
    post = pre.copy()
    for i in range(n_post):
        buf = make_blocks(rng, 100 + i * size, size, 50 + i)
        disk.write(100 + i * size, buf)
        post.write(100 + i * size, buf)
    return disk, faulty, inner, pre, post


def _ops_in_flush(scenario: dict, dev_name: str, counter: str) -> int:
    """How many writes (or flushes) `dev_name` sees during the scenario's flush."""
    disk, faulty, *_ = _flush_scenario(**scenario)
    setattr(faulty[dev_name], counter, 0)
    disk.flush()
    return getattr(faulty[dev_name], counter)


def _flush_with_fault(scenario: dict, dev_name: str, k: int, inject: str) -> None:
    """The scenario's flush with the k-th device write (or flush) failing: the flush
    raises, the fault fired, and a reopen shows the state before or after the flush. The
    failed instance must not claim durability it cannot have checked: if a retry of the
    flush succeeds once the fault is cleared, everything must really be durable."""
    disk, faulty, inner, pre, post = _flush_scenario(**scenario)
    getattr(faulty[dev_name], inject)(k)
    with pytest.raises((OSError, SwornDiskError)):
        disk.flush()
    assert faulty[dev_name].failures == 1, f"{dev_name} {inject}({k}) never fired"
    for dev in faulty.values():
        dev.clear()
    try:
        disk.flush()
        allowed = [post]
    except (OSError, SwornDiskError):
        allowed = [pre, post]
    d = SwornDisk.open(inner[0], inner[1], KEY16)
    lbas = set(pre.blocks) | set(post.blocks)
    ok = [s for s in allowed if all(d.read(l, 1) == s.get(l) for l in lbas)]
    assert ok, f"{dev_name} {inject}({k}): state is neither pre- nor post-flush"
    d.close()


def _fail_each(scenario: dict, dev_name: str, counter: str, inject: str) -> None:
    """Runs the scenario once per device write (or flush) its flush makes, failing that one."""
    n = _ops_in_flush(scenario, dev_name, counter)
    assert n >= 1, f"a flush made no {counter} on the {dev_name} device"
    for k in range(n):
        _flush_with_fault(scenario, dev_name, k, inject)


WRITE_SCENARIO = dict(seed=7, n_pre=10, n_post=12, size=2)


@pytest.mark.parametrize("dev_name", ["data", "meta"])
def test_device_write_error_during_flush(dev_name):
    """Every write a flush makes to the device, in turn, fails."""
    _fail_each(WRITE_SCENARIO, dev_name, "writes", "fail_write_after")


def test_swapped_devices():
    disk, data, meta = new_disk(DATA, NR, SMALL)
    disk.write(0, b"s" * BS)
    disk.close()
    with pytest.raises(NotFormattedError):
        SwornDisk.open(meta, data, KEY16)
    d = SwornDisk.open(data, meta, KEY16)
    assert d.read(0, 1) == b"s" * BS
    d.close()


FLUSH_SCENARIO = dict(seed=100, n_pre=8, n_post=20, size=1)


@pytest.mark.parametrize("dev_name", ["data", "meta"])
def test_device_flush_error(dev_name):
    """Every device flush (the durability barrier) a disk flush makes, in turn, fails."""
    _fail_each(FLUSH_SCENARIO, dev_name, "flushes", "fail_flush_after")
