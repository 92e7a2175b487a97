"""SwornDisk.read_many: batches mixing every state a block can be in, one bad block
failing only its range, arguments checked before any I/O, and a lookaside cache that
never answers with a stale record."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sworndisk import (Config, DiskClosedError, IntegrityError, InvalidArgument, MemoryDevice,
                       SwornDisk)
from sworndisk.device import DeviceWrapper

from .conftest import BS, KEY16, MiB, Model, make_block, make_blocks, new_disk
from .crashdev import WrapDevice

CFG = Config(memtable_records=32, level_ratio=2)
NR = 2048


def _hba(disk, lba: int) -> int:
    return int(np.frombuffer(disk.debug.index.get(lba)[:8], "<u8")[0])


def _mixed_disk():
    """A disk whose LBAs are, by range: in BITs after compactions (0..255), in the
    MemTable (256..287), discarded and committed (288..303), sealed but uncommitted
    (512..1535: more than a segment buffer), buffered plaintext (2000..2009), discarded
    but uncommitted (100..109), and never written (the rest)."""
    disk, data, meta = new_disk(32 * MiB, NR, CFG)
    rng = random.Random(1)
    model = Model(NR)
    for rnd in range(4):                        # many checkpoints: records reach the BITs
        for lba in range(0, 256, 16):
            buf = make_blocks(rng, lba, 16, rnd)
            disk.write(lba, buf)
            model.write(lba, buf)
            disk.flush()
    buf = make_blocks(rng, 256, 32, 9)
    disk.write(256, buf)
    model.write(256, buf)
    disk.write(288, make_blocks(rng, 288, 16, 9))
    disk.discard(288, 16)
    disk.flush()
    buf = make_blocks(rng, 512, 1024, 10)
    disk.write(512, buf)
    model.write(512, buf)
    buf = make_blocks(rng, 2000, 10, 11)
    disk.write(2000, buf)
    model.write(2000, buf)
    disk.discard(100, 10)
    model.discard(100, 10)
    st_ = disk.stats()
    assert st_.lifetime.minor_compactions > 0 and st_.index.bits > 0
    assert st_.buffered_blocks > 0 and st_.pending_ops > 0
    return disk, data, meta, model


SPANS = [(0, 8), (100, 12), (250, 40), (286, 20), (510, 4), (1000, 64), (1530, 10),
         (1999, 12), (1800, 3), (NR - 1, 1), (5, 1), (5, 1)]


def test_mixed_batch_matches_read_and_model():
    disk, data, meta, model = _mixed_disk()
    got = disk.read_many(SPANS)
    assert len(got) == len(SPANS)
    for (lba, n), res in zip(SPANS, got):
        assert res == model.read(lba, n), f"range {lba}+{n}"
        assert res == disk.read(lba, n)
    disk.flush()
    assert disk.read_many(SPANS) == [model.read(l, n) for l, n in SPANS]
    disk.close()


def test_one_tampered_block_fails_only_its_range():
    disk, data, meta, model = _mixed_disk()
    disk.flush()
    h = _hba(disk, 260)
    data.buf[h * BS + 9] ^= 0x10
    got = disk.read_many(SPANS)
    for (lba, n), res in zip(SPANS, got):
        if lba <= 260 < lba + n:
            assert isinstance(res, IntegrityError) and res.errno == 5, f"range {lba}+{n}: {res!r}"
        else:
            assert res == model.read(lba, n), f"range {lba}+{n}"
    with pytest.raises(IntegrityError):
        disk.read(250, 40)
    disk.close()


def test_record_pointing_outside_the_data_device_fails_only_its_range():
    disk, data, meta, model = _mixed_disk()
    disk.flush()
    lba = 1900
    disk.write(lba, b"o" * BS)
    disk.flush()
    mt = disk.debug.index.memtable
    v = bytearray(mt.get(lba))
    v[:8] = (10 ** 9).to_bytes(8, "little")
    mt.put(lba, bytes(v))
    got = disk.read_many([(lba - 2, 4), (0, 4)])
    assert isinstance(got[0], IntegrityError) and "outside" in str(got[0])
    assert got[1] == model.read(0, 4)
    disk.close()


def test_bad_arguments_raise_before_any_io():
    disk, data, meta, model = _mixed_disk()

    class NoReads(WrapDevice):
        reads = 0

        def pread(self, nbytes, offset):
            NoReads.reads += 1
            return self.inner.pread(nbytes, offset)

    disk.flush()
    disk.close()
    spy = NoReads(data)
    disk = SwornDisk.open(spy, meta, KEY16)
    NoReads.reads = 0
    for bad in ([(0, 4), (NR - 1, 2)], [(0, 4), (-1, 1)], [(0, 4), (1.5, 1)], [(0, 4), ("1", 1)]):
        with pytest.raises(InvalidArgument):
            disk.read_many(bad)
    assert NoReads.reads == 0
    assert disk.read_many([]) == []
    assert disk.read_many([(3, 0)]) == [b""]
    disk.close()
    with pytest.raises(DiskClosedError):
        disk.read_many([(0, 1)])


# ---- the lookaside cache ----------------------------------------------------------------------

def _no_residency(disk):
    """The cache serves only where some BIT is not resident (committed.resolve)."""
    disk.debug.index.store.resident.limit = 0
    return disk


def _cached_disk():
    cfg = Config(memtable_records=16, level_ratio=2, lookaside_records=64)
    disk, data, meta = new_disk(32 * MiB, NR, cfg)
    _no_residency(disk)
    rng = random.Random(2)
    model = Model(NR)
    for lba in range(0, 512, 8):
        buf = make_blocks(rng, lba, 8, 1)
        disk.write(lba, buf)
        model.write(lba, buf)
        disk.flush()
    assert len(disk.debug.index.memtable) < 512 and disk.stats().index.bits > 0
    return disk, data, meta, model, rng


def _warm(disk, lbas) -> None:
    before = disk.stats().session.lookaside_hits
    disk.read_many([(l, 1) for l in lbas])
    disk.read_many([(l, 1) for l in lbas])
    assert disk.stats().session.lookaside_hits > before, "the cache answered nothing"


def test_cache_is_bounded_and_counted():
    disk, data, meta, model, rng = _cached_disk()
    disk.read_many([(l, 1) for l in range(0, 512)])
    st_ = disk.stats()
    assert st_.index.lookaside_entries <= 64 and st_.index.lookaside_limit == 64
    assert st_.session.lookaside_misses > 0
    disk.close()


@pytest.mark.parametrize("change", ["overwrite", "discard", "clean", "reopen"])
def test_cache_never_answers_stale(change):
    """A cached LBA changes by a committed overwrite, a discard, a cleaning move (then
    compaction pushes the newest record into the BITs): the next read is right."""
    disk, data, meta, model, rng = _cached_disk()
    lbas = list(range(40, 56))
    _warm(disk, lbas)
    if change == "overwrite":
        for l in lbas:
            blk = make_block(rng, l, 7)
            disk.write(l, blk)
            model.write(l, blk)
        disk.flush()
    elif change == "discard":
        disk.discard(40, 16)
        model.discard(40, 16)
        disk.flush()
    elif change == "clean":
        seg = _hba(disk, 40) // 1024
        old = {l: _hba(disk, l) for l in lbas}
        assert disk.debug.clean(seg)
        assert all(_hba(disk, l) != old[l] for l in lbas), "precondition: not moved"
        for l in lbas:                         # the old places now hold garbage
            data.buf[old[l] * BS:(old[l] + 1) * BS] = bytes(BS)
    elif change == "reopen":
        disk.close()
        disk = _no_residency(SwornDisk.open(data, meta, KEY16))
    for lba in range(600, 700, 4):             # many commits: compactions and checkpoints
        disk.write(lba, make_blocks(rng, lba, 4, 3))
        model.write(lba, disk.read(lba, 4))
        disk.flush()
    got = disk.read_many([(l, 1) for l in lbas])
    assert got == [model.get(l) for l in lbas]
    disk.close()


def test_cache_off():
    cfg = Config(memtable_records=16, level_ratio=2, lookaside_records=0)
    disk, data, meta = new_disk(32 * MiB, NR, cfg)
    disk.write(0, b"z" * BS)
    disk.flush()
    for _ in range(3):
        assert disk.read_many([(0, 1)]) == [b"z" * BS]
    assert disk.stats().index.lookaside_entries == 0
    disk.close()


# ---- against the model, at random -------------------------------------------------------------

OPS = st.lists(st.tuples(st.sampled_from(["w", "d", "f", "r", "c"]),
                         st.integers(0, 255), st.integers(1, 24)), min_size=5, max_size=60)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, st.integers(0, 2 ** 16), st.booleans())
def test_read_many_against_the_model(ops, seed, resident):
    """Also without resident BITs: lookups then go through fences, filters and nodes."""
    rng = random.Random(seed)
    cfg = Config(memtable_records=16, level_ratio=2, lookaside_records=32)
    data, meta = MemoryDevice(24 * MiB), MemoryDevice(SwornDisk.min_meta_size(24 * MiB, 256, cfg))
    disk = SwornDisk.create(data, meta, KEY16, nr_blocks=256, config=cfg)

    def keep(d):
        if not resident:
            d.debug.index.store.resident.limit = 0
        return d
    disk = keep(disk)
    model = Model(256)
    ver = 0
    for op, lba, n in ops:
        n = min(n, 256 - lba)
        ver += 1
        if op == "w":
            buf = make_blocks(rng, lba, n, ver)
            disk.write(lba, buf)
            model.write(lba, buf)
        elif op == "d":
            disk.discard(lba, n)
            model.discard(lba, n)
        elif op == "f":
            disk.flush()
        elif op == "c":
            disk.close()
            disk = keep(SwornDisk.open(data, meta, KEY16))
        else:
            spans = [(a, min(k, 256 - a)) for a, k in
                     ((rng.randrange(256), rng.randint(1, 16)) for _ in range(rng.randint(1, 12)))]
            assert disk.read_many(spans) == [model.read(a, k) for a, k in spans]
    disk.close()


def test_cache_is_bypassed_while_every_bit_is_resident_and_kept_exact():
    """Resident BITs: the cache is neither asked nor filled; writes still invalidate it,
    so when BITs stop being resident it answers right."""
    disk, data, meta, model, rng = _cached_disk()
    index = disk.debug.index
    _warm(disk, list(range(40, 56)))             # cached while nothing is resident
    index.store.resident.limit = 1 << 30
    for bit in index.bits():                     # now everything may be resident
        bit.release()
    assert index.all_resident()
    before = disk.stats().session
    for l in range(40, 56):                      # overwritten while the cache is bypassed
        blk = make_block(rng, l, 9)
        disk.write(l, blk)
        model.write(l, blk)
    disk.flush()
    assert disk.read_many([(l, 1) for l in range(40, 56)]) == [model.get(l) for l in range(40, 56)]
    after = disk.stats().session
    assert (after.lookaside_hits, after.lookaside_misses) == \
        (before.lookaside_hits, before.lookaside_misses)
    index.store.resident.limit = 0               # back to the cache
    for bit in index.bits():
        bit.release()
    assert not index.all_resident()
    assert disk.read_many([(l, 1) for l in range(40, 56)]) == [model.get(l) for l in range(40, 56)]
    disk.close()


class _ShortRead(DeviceWrapper):
    """The next batch read comes back one byte short in its last run, as a failing
    network volume may return it."""
    armed = False
    fired = 0

    def pread_many(self, items):
        out = self.inner.pread_many(items)
        if self.armed and out:
            out[-1] = out[-1][:-1]
            self.armed, self.fired = False, self.fired + 1
        return out


@pytest.mark.parametrize("workers", [0, 1])
def test_a_short_device_read_fails_its_range_alone(workers):
    """The blocks a short read left out fail authentication (an IntegrityError for their
    range, never other bytes), and the other ranges of the batch read right."""
    cfg = Config(crypto_workers=workers)
    disk, data, meta = new_disk(32 * MiB, 2048, cfg)
    blocks = make_blocks(random.Random(1), 0, 64, 1)
    disk.write(0, blocks)
    disk.close()
    dev = _ShortRead(data)
    disk = SwornDisk.open(dev, meta, KEY16, config=cfg)
    lbas = list(range(0, 64, 2))                # 32 runs of one block
    dev.armed = True
    got = disk.read_many([(lba, 1) for lba in lbas])
    assert dev.fired == 1
    assert isinstance(got[-1], IntegrityError) and "failed authentication" in str(got[-1])
    assert got[:-1] == [blocks[lba * BS:(lba + 1) * BS] for lba in lbas[:-1]]
    disk.close()
