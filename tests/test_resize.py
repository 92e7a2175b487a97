"""Growing a disk offline (sworndisk.resize.grow, `sworndisk-ublk resize`).

Devices are made larger under the disk as a cloud volume is: a GrowDevice shows only a
prefix of a larger device, and grows. Every test reopens the grown disk and reads back
what was flushed before; crash tests cut power at every device call of a resize.
"""
from __future__ import annotations

import os
import random

import pytest

from sworndisk import (Config, DeviceBusyError, FileDevice, InvalidArgument, MemoryDevice,
                       SwornDisk)
from sworndisk.check import check
from sworndisk.errors import MetaTooSmall
from sworndisk.resize import grow

from .conftest import BS, KEY16, MiB, Model, describe, make_blocks
from .crashdev import WrapDevice, crash_pair

CFG = Config(memtable_records=16, level_ratio=2)
SEG = 4 * MiB


class GrowDevice(WrapDevice):
    """The first `size` bytes of a larger device: enlarged by setting `size`."""

    def __init__(self, inner, size: int):
        super().__init__(inner)
        self.size = size

    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        assert value <= self.inner.size
        self._size = value


def fill(disk, rng: random.Random, model: Model, n: int, version: int, lo: int = 0,
         hi: int | None = None) -> int:
    hi = disk.nr_blocks if hi is None else hi
    for _ in range(n):
        lba = rng.randrange(lo, hi - 4)
        k = rng.randint(1, 4)
        version += 1
        data = make_blocks(rng, lba, k, version)
        disk.write(lba, data)
        model.write(lba, data)
    disk.flush()
    return version


def assert_reads(disk, model: Model) -> None:
    for lba in range(0, model.nr_blocks, 64):
        n = min(64, model.nr_blocks - lba)
        got = disk.read(lba, n)
        want = model.read(lba, n)
        if got != want:
            bad = next(i for i in range(n) if got[i * BS:(i + 1) * BS] != want[i * BS:(i + 1) * BS])
            raise AssertionError(f"LBA {lba + bad}: {describe(got[bad * BS:(bad + 1) * BS])}, "
                                 f"wanted {describe(want[bad * BS:(bad + 1) * BS])}")


def small_disk(data_inner: int, meta_inner: int, data_size: int, meta_size: int | None = None,
               max_blocks=None, config=CFG):
    data = GrowDevice(MemoryDevice(data_inner), data_size)
    if meta_size is None:
        meta_size = SwornDisk.min_meta_size(data_size, None, config, max_blocks)
    meta = GrowDevice(MemoryDevice(meta_inner), meta_size)
    disk = SwornDisk.create(data, meta, KEY16, config=config, max_blocks=max_blocks)
    return disk, data, meta


def grown_model(model: Model, nr_blocks: int) -> Model:
    bigger = Model(nr_blocks)
    for lba in range(model.nr_blocks):
        blk = model.read(lba, 1)
        if blk != bytes(BS):
            bigger.write(lba, blk)
    return bigger


def exercise_new_space(data, meta, model: Model, rng: random.Random, version: int) -> None:
    """Writes across the grown disk, above all its new LBAs, and reads all back reopened."""
    with SwornDisk.open(data, meta, KEY16) as disk:
        assert disk.nr_blocks == model.nr_blocks
        assert_reads(disk, model)
        version = fill(disk, rng, model, 150, version, lo=model.nr_blocks // 2)
        last = model.nr_blocks - 1
        disk.write(last, make_blocks(rng, last, 1, version + 1))
        model.write(last, disk.read(last, 1))
        disk.flush()
    with SwornDisk.open(data, meta, KEY16) as disk:
        assert_reads(disk, model)


@pytest.mark.parametrize("reserve", [False, True], ids=["regions-move", "max-sectors"])
def test_grow_reads_back_and_uses_new_space(reserve):
    rng = random.Random(1)
    max_blocks = 40 * 1024 if reserve else None
    disk, data, meta = small_disk(64 * MiB, 64 * MiB, 6 * SEG, max_blocks=max_blocks)
    model = Model(disk.nr_blocks)
    v = fill(disk, rng, model, 300, 0)
    disk.close()
    old_nr, meta_before = model.nr_blocks, bytes(meta.inner.buf)
    data.size = 48 * MiB
    if not reserve:
        meta.size = 64 * MiB
    res = grow(data, meta, key=KEY16)
    assert res.changed and res.old_nr_blocks == old_nr
    assert res.nr_blocks == SwornDisk.usable_blocks(48 * MiB, CFG) > old_nr
    assert res.data_blocks == 12 * 1024
    assert res.moved is (not reserve)
    if reserve:   # only the superblock copies changed
        after = bytes(meta.inner.buf)
        assert after[2 * BS:] == meta_before[2 * BS:] and after[:2 * BS] != meta_before[:2 * BS]
    model = grown_model(model, res.nr_blocks)
    exercise_new_space(data, meta, model, rng, v)
    report = check(data, meta, KEY16)
    assert report.clean, report.problems


def test_grow_twice_moves_regions_again_and_explicit_size():
    rng = random.Random(2)
    disk, data, meta = small_disk(96 * MiB, 64 * MiB, 8 * SEG)
    model = Model(disk.nr_blocks)
    v = fill(disk, rng, model, 200, 0)
    disk.close()
    data.size, meta.size = 16 * SEG, 64 * MiB
    res = grow(data, meta, key=KEY16, nr_blocks=12 * 1024)
    assert (res.nr_blocks, res.moved) == (12 * 1024, True)
    model = grown_model(model, res.nr_blocks)
    with SwornDisk.open(data, meta, KEY16) as disk:
        v = fill(disk, rng, model, 200, v)
    data.size = 96 * MiB
    res2 = grow(data, meta, key=KEY16)
    assert res2.moved and res2.old_nr_blocks == 12 * 1024
    assert res2.meta_blocks > res.meta_blocks
    model = grown_model(model, res2.nr_blocks)
    exercise_new_space(data, meta, model, rng, v)
    # Nothing more to grow: unchanged.
    assert not grow(data, meta, key=KEY16).changed


def test_meta_too_small_changes_nothing_and_says_how_large():
    disk, data, meta = small_disk(64 * MiB, 64 * MiB, 8 * SEG)
    disk.close()
    data.size = 64 * MiB
    before = (bytes(data.inner.buf), bytes(meta.inner.buf))
    with pytest.raises(MetaTooSmall) as e:
        grow(data, meta, key=KEY16)
    assert (bytes(data.inner.buf), bytes(meta.inner.buf)) == before
    msg = str(e.value)
    assert "\n" not in msg and f"{e.value.needed} bytes" in msg and "truncate -s" in msg
    assert e.value.needed > meta.size
    meta.size = e.value.needed                 # exactly what it said is enough
    assert grow(data, meta, key=KEY16).changed
    with SwornDisk.open(data, meta, KEY16) as d:
        assert d.nr_blocks == SwornDisk.usable_blocks(64 * MiB, CFG)


def test_max_sectors_grows_in_place_up_to_it_and_moves_beyond():
    max_blocks = 20 * 1024
    disk, data, meta = small_disk(128 * MiB, 64 * MiB, 8 * SEG, max_blocks=max_blocks)
    disk.close()
    reserved = meta.size
    assert reserved > SwornDisk.min_meta_size(8 * SEG, None, CFG)
    data.size = 22 * SEG
    res = grow(data, meta, key=KEY16, nr_blocks=max_blocks)
    assert not res.moved and res.meta_blocks * BS <= reserved
    data.size = 128 * MiB
    with pytest.raises(MetaTooSmall):          # beyond the reservation: needs more meta
        grow(data, meta, key=KEY16)


@pytest.mark.parametrize("how", ["sectors", "data-device"])
def test_shrink_refused(how):
    disk, data, meta = small_disk(64 * MiB, 64 * MiB, 12 * SEG)
    nr = disk.nr_blocks
    disk.close()
    before = bytes(meta.inner.buf)
    if how == "sectors":
        call = lambda: grow(data, meta, key=KEY16, nr_blocks=nr - 8)   # noqa: E731
    else:
        data.size = 10 * SEG
        call = lambda: grow(data, meta, key=KEY16)                      # noqa: E731
    with pytest.raises(InvalidArgument, match="shrinking is not supported"):
        call()
    assert bytes(meta.inner.buf) == before


def test_busy_refused(tmp_path):
    data, meta = tmp_path / "data.img", tmp_path / "meta.img"
    data.write_bytes(b""), meta.write_bytes(b"")
    os.truncate(data, 8 * SEG)
    os.truncate(meta, 64 * MiB)
    with SwornDisk.create(str(data), str(meta), KEY16, config=CFG):
        os.truncate(data, 16 * SEG)
        os.truncate(meta, 128 * MiB)
        with pytest.raises(DeviceBusyError):
            grow(str(data), str(meta), key=KEY16)
    assert grow(str(data), str(meta), key=KEY16).changed
    with SwornDisk.open(FileDevice(str(data)), str(meta), KEY16) as d:
        assert d.nr_blocks == SwornDisk.usable_blocks(16 * SEG, CFG)


# ---- crash at every device call ------------------------------------------------------------

def _crash_setup(reserve: bool):
    rng = random.Random(7)
    ctrl, cdata, cmeta = crash_pair(48 * MiB, 64 * MiB)
    max_blocks = 30 * 1024 if reserve else None
    data = GrowDevice(cdata, 6 * SEG)
    meta = GrowDevice(cmeta, SwornDisk.min_meta_size(6 * SEG, None, CFG, max_blocks))
    disk = SwornDisk.create(data, meta, KEY16, config=CFG, max_blocks=max_blocks)
    model = Model(disk.nr_blocks)
    v = fill(disk, rng, model, 120, 0)
    v = fill(disk, rng, model, 40, v)       # a journal tail after the last checkpoint
    disk.write(3, make_blocks(rng, 3, 2, v + 1))
    model.write(3, disk.read(3, 2))
    disk.flush()
    # Left open-but-unclosed state: the devices hold a journal tail, as after a crash.
    data.size, meta.size = 10 * SEG, 64 * MiB
    return ctrl, data, meta, model, v


@pytest.mark.parametrize("reserve", [False, True], ids=["regions-move", "max-sectors"])
def test_crash_at_every_device_call_of_resize(reserve):
    ctrl, data, meta, model, v = _crash_setup(reserve)
    images = ctrl.images()
    ctrl.reset_count()
    res = grow(data, meta, key=KEY16)
    total = ctrl.ops
    assert res.changed and res.moved is (not reserve) and total >= 4
    outcomes = {"old": 0, "new": 0}
    for k in range(total):
        for keep in ("random", "none", "all"):
            ctrl.load(images)
            ctrl.arm(k, random.Random(k), keep)
            with pytest.raises(OSError):
                grow(data, meta, key=KEY16)
            assert ctrl.crashes and ctrl.crashed, "the armed crash did not fire"
            ctrl.revive()
            with SwornDisk.open(data, meta, KEY16) as disk:
                assert disk.nr_blocks in (res.old_nr_blocks, res.nr_blocks), k
                grown = disk.nr_blocks == res.nr_blocks
                outcomes["new" if grown else "old"] += 1
                assert_reads(disk, grown_model(model, disk.nr_blocks) if grown else model)
            # A resize after the crash completes it (or its second superblock copy).
            assert grow(data, meta, key=KEY16).nr_blocks == res.nr_blocks
            gens = {int.from_bytes(bytes(meta.inner.visible[i * BS + 36:i * BS + 44]), "little")
                    for i in (0, 1)}
            assert len(gens) == 1, gens
            with SwornDisk.open(data, meta, KEY16) as disk:
                assert disk.nr_blocks == res.nr_blocks
                assert_reads(disk, grown_model(model, res.nr_blocks))
    assert outcomes["old"] and outcomes["new"], outcomes
