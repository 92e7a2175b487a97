"""Issue 7's engine items: no false ENOSPC, a sane meta device, one damaged block or copy
never costs the whole disk, internal regions are never "disk full".

Each test here failed on the engine before the fix it names."""
from __future__ import annotations

import random

import numpy as np
import pytest

from sworndisk import (BLOCK_SIZE, Config, DiskClosedError, IntegrityError, MemoryDevice,
                       MetadataFullError, NoSpaceError, SwornDisk, WrongKeyError)
from sworndisk.layout import plan
from sworndisk.space import CHUNK_USED, IndexSpace

from .conftest import KEY16, Model, make_block, make_blocks, verify_disk
from .crashdev import WrapDevice

BS = BLOCK_SIZE
MiB = 1 << 20


def min_meta_disk(data_size: int, nr_blocks: int | None = None, config: Config | None = None):
    """A disk whose meta device is exactly SwornDisk.min_meta_size."""
    data = MemoryDevice(data_size)
    meta = MemoryDevice(SwornDisk.min_meta_size(data_size, nr_blocks, config))
    return SwornDisk.create(data, meta, KEY16, nr_blocks=nr_blocks, config=config), data, meta


# ---- 3. a disk that fits never says ENOSPC -------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_aging_at_85_percent_never_enospc(seed):
    """The aging run that failed: logical size 85% of a 64 MiB data device, random
    overwrites, a flush on about 1% of writes, 5x the device written. Never NoSpaceError,
    and every block reads back as last written (after a reopen too)."""
    rng = random.Random(seed)
    data_size = 64 * MiB
    nr = int(data_size // BS * 0.85)
    assert nr <= SwornDisk.usable_blocks(data_size), "the run must be on a non-thin disk"
    disk, data, meta = min_meta_disk(data_size, nr)
    model = Model(nr)
    for lba in range(0, nr, 256):                      # fill it first: 85% live
        n = min(256, nr - lba)
        buf = make_blocks(rng, lba, n, 0)
        disk.write(lba, buf)
        model.write(lba, buf)
    disk.flush()
    for i in range(5 * data_size // BS):
        lba = rng.randrange(nr)
        blk = make_block(rng, lba, i + 1)
        disk.write(lba, blk)
        model.write(lba, blk)
        if rng.random() < 0.01:
            disk.flush()
    disk.flush()
    verify_disk(disk, model, f"seed {seed}", rng=rng)
    assert disk.stats().space.valid_blocks == nr
    disk.close()
    disk = SwornDisk.open(data, meta, KEY16)
    verify_disk(disk, model, f"seed {seed} after reopen", rng=rng)
    disk.close()


def test_whole_disk_overwrite_without_flush():
    """A full non-thin disk overwritten entirely in one write() call, twice, with no
    flush: the engine commits early as free space runs out instead of ENOSPC."""
    disk, data, meta = min_meta_disk(64 * MiB)
    nr = disk.nr_blocks
    for version in (1, 2, 3):
        disk.write(0, bytes([version]) * (nr * BS))
    assert disk.stats().lifetime.commits >= 2, "early commits should have made the room"
    disk.flush()
    assert disk.read(nr - 1, 1) == bytes([3]) * BS and disk.read(0, 1) == bytes([3]) * BS
    disk.close()


def test_early_commit_is_a_prefix_of_the_write_history():
    """The state after a crash following an early commit is the state at that commit:
    every LBA shows a version at least as new as the last flush, and the versions shown
    are a prefix of the writes (a later write visible implies every earlier one is)."""
    data_size = 64 * MiB
    disk, data, meta = min_meta_disk(data_size)
    nr = disk.nr_blocks
    disk.write(0, b"\0" * (nr * BS))
    disk.flush()
    commits = disk.stats().lifetime.commits
    order = list(range(nr))
    random.Random(5).shuffle(order)
    for i, lba in enumerate(order):                   # one pass, no flush: early commits
        disk.write(lba, i.to_bytes(4, "little") + b"\1" * (BS - 4))
    assert disk.stats().lifetime.commits > commits, "no early commit happened"
    snapshot = (bytes(data.buf), bytes(meta.buf))      # the process dies here
    disk.close()
    d2, m2 = MemoryDevice(data_size), MemoryDevice(len(snapshot[1]))
    d2.buf[:], m2.buf[:] = snapshot
    disk = SwornDisk.open(d2, m2, KEY16)
    seen = [disk.read(lba, 1) for lba in order]
    disk.close()
    written = [blk[4:8] == b"\1" * 4 for blk in seen]
    k = written.index(False) if False in written else len(written)
    assert all(written[:k]) and not any(written[k:]), "not a prefix of the write history"
    assert all(int.from_bytes(seen[i][:4], "little") == i for i in range(k))


THIN = 66 * MiB     # 16 segments and a 2 MiB tail: a logical size beyond what can be valid


def _fill_thin_until_enospc(disk, rng) -> int:
    """Writes sequentially from LBA 0 until NoSpaceError; returns how many LBAs fit."""
    lba = 0
    while True:
        try:
            disk.write(lba, make_blocks(rng, lba, 64, 1))
        except NoSpaceError:
            return lba
        lba += 64


def test_thin_disk_discard_serves_writes_before_flush():
    """A thin disk filled to ENOSPC; discard half of it and write a quarter back with a
    flush only at the end: the discarded space serves the writes at once."""
    rng = random.Random(9)
    disk, data, meta = min_meta_disk(THIN, THIN // BS)
    filled = _fill_thin_until_enospc(disk, rng)
    assert filled >= disk.layout.data_blocks - 64
    disk.flush()
    disk.discard(0, filled // 2)
    for lba in range(0, filled // 4, 64):
        disk.write(lba, make_blocks(rng, lba, 64, 2))
    disk.flush()
    disk.close()


def test_thin_disk_enospc_only_when_live_data_fills_it():
    """On a thin disk NoSpaceError comes only with nothing unflushed left to commit:
    live data then fills every block of the data device."""
    rng = random.Random(10)
    disk, data, meta = min_meta_disk(THIN, THIN // BS)
    _fill_thin_until_enospc(disk, rng)
    st = disk.stats()
    assert st.space.valid_blocks + st.buffered_blocks == disk.layout.data_blocks
    assert st.pending_ops == 0
    disk.flush()
    disk.close()


def test_enospc_is_not_latched():
    """NoSpaceError is the user's condition: the disk stays usable after it."""
    rng = random.Random(11)
    disk, data, meta = min_meta_disk(THIN, THIN // BS)
    filled = _fill_thin_until_enospc(disk, rng)
    disk.discard(0, 64)
    disk.write(0, make_blocks(rng, 0, 64, 3))
    disk.flush()
    assert disk.read(filled - 1, 1) != bytes(BS)
    disk.close()


# ---- internal regions are not "disk full" ---------------------------------------------------

def test_index_region_exhaustion_is_internal_and_latches():
    """An internal region running out is MetadataFullError (never NoSpaceError) and
    latches the disk as failed; reopening recovers to the last flush."""
    assert not issubclass(MetadataFullError, NoSpaceError)
    space = IndexSpace(1)
    space.alloc()
    with pytest.raises(MetadataFullError):
        space.alloc()
    cfg = Config(memtable_records=16, level_ratio=2)
    disk, data, meta = min_meta_disk(32 * MiB, 2048, cfg)
    disk.write(0, b"a" * BS)
    disk.flush()
    disk.debug.ispace.state[:] = CHUNK_USED       # the index region is exhausted
    with pytest.raises(MetadataFullError):
        for lba in range(64):               # the next checkpoint needs an index chunk
            disk.write(lba, b"b" * BS)
            disk.flush()
    with pytest.raises(DiskClosedError):
        disk.write(0, b"c" * BS)
    disk.close()
    disk = SwornDisk.open(data, meta, KEY16)
    assert disk.read(0, 1) in (b"a" * BS, b"b" * BS)
    disk.close()


def test_checkpoint_too_large_does_not_advance_the_pack_sequence():
    """A pack that outgrows its slot is MetadataFullError, and nothing of it (no K record,
    no sequence number) is left behind: the disk reopens at its last flush."""
    cfg = Config(memtable_records=16, level_ratio=2)
    disk, data, meta = min_meta_disk(32 * MiB, 2048, cfg)
    disk.write(0, b"a" * BS)
    disk.flush()
    seq = disk.stats().checkpoint_seq
    slot_blocks = disk.layout.checkpoint_blocks
    protocol = disk.debug.protocol          # as if the pack had outgrown its slot
    protocol.layout = type(disk.layout)(**dict(disk.layout.to_dict(), checkpoint_blocks=1))
    with pytest.raises(MetadataFullError):
        for lba in range(64):
            disk.write(lba, b"b" * BS)
            disk.flush()
    assert disk.stats().checkpoint_seq == seq
    assert slot_blocks > 1
    disk.close()
    disk = SwornDisk.open(data, meta, KEY16)
    assert disk.read(0, 1) in (b"a" * BS, b"b" * BS)
    disk.close()


# ---- 4. small disks need a sane meta device -------------------------------------------------

SIZES = [64 * MiB, 96 * MiB, 256 * MiB, 512 * MiB, 1 << 30, 2 << 30, 4 << 30, 16 << 30,
         64 << 30, 256 << 30, 1 << 40]


@pytest.mark.parametrize("data_size", SIZES)
def test_min_meta_size_is_at_most_4_percent_plus_24_mib(data_size):
    limit = 0.04 * data_size + 24 * MiB
    for nr in (None, data_size // BS):             # default and thin
        assert SwornDisk.min_meta_size(data_size, nr) <= limit, \
            f"{data_size >> 20} MiB data (nr_blocks={nr}) needs more than {limit / MiB:.1f} MiB"


def test_user_story_512_mib_data_96_mib_meta():
    data_size = 512 * MiB
    assert SwornDisk.min_meta_size(data_size) <= 96 * MiB
    assert plan(data_size, None, Config()).meta_blocks * BS <= 96 * MiB


@pytest.mark.parametrize("seed,memtable", [(21, None), (22, 1024)])
def test_thin_disk_at_minimum_meta_survives_churn(seed, memtable):
    """A thin disk (logical = whole data device) on exactly the minimum meta: fill,
    discard, rewrite, with few flushes, through checkpoints and compactions; with the
    default Config (the MemTable then holds the whole live index) and with a small
    MemTable (many compactions into deeper levels)."""
    cfg = Config() if memtable is None else Config(memtable_records=memtable)
    rng = random.Random(seed)
    data_size = 64 * MiB
    nr = data_size // BS
    disk, data, meta = min_meta_disk(data_size, nr, cfg)
    model = Model(nr)
    live = int(disk.layout.data_blocks * 0.9)
    for rnd in range(4):
        for lba in range(0, live, 128):
            n = min(128, live - lba)
            buf = make_blocks(rng, lba, n, rnd)
            disk.write(lba, buf)
            model.write(lba, buf)
            if rng.random() < 0.05:
                disk.flush()
        lo = rng.randrange(live // 2)
        disk.discard(lo, live // 4)
        model.discard(lo, live // 4)
        disk.flush()
    verify_disk(disk, model, f"seed {seed}", rng=rng)
    life = disk.stats().lifetime
    assert life.checkpoints >= 2 and life.minor_compactions >= 1, life
    if memtable is not None:
        assert life.major_compactions >= 2, life
    disk.close()
    disk = SwornDisk.open(data, meta, KEY16)
    verify_disk(disk, model, f"seed {seed} after reopen", rng=rng)
    disk.close()


# ---- 5. one damaged block must not lose the disk --------------------------------------------

def test_damaged_slot_salt_in_one_superblock_copy():
    """A passphrase disk with a byte of copy 0's slot salt flipped opens with its
    passphrase: the damaged copy fails its checksum and copy 1 is used."""
    from sworndisk.format import KEY_SLOT, SUPERBLOCK_SLOTS_AT
    from sworndisk.kdf import KdfParams
    data, meta = MemoryDevice(64 * MiB), MemoryDevice(SwornDisk.min_meta_size(64 * MiB))
    disk = SwornDisk.create(data, meta, passphrase=b"correct horse", kdf=KdfParams(64, 1))
    disk.write(3, b"p" * BS)
    disk.close()
    salt_at = SUPERBLOCK_SLOTS_AT + {n: o for n, o, _ in KEY_SLOT.offsets()}["salt"]
    meta.buf[salt_at + 5] ^= 0x40
    disk = SwornDisk.open(data, meta, passphrase="correct horse")
    assert disk.read(3, 1) == b"p" * BS
    disk.close()
    with pytest.raises(WrongKeyError):
        SwornDisk.open(data, meta, passphrase="wrong horse")


class TornSlotWrite(WrapDevice):
    """Tears the first write into a byte range: half of it lands, then EIO (a crash in
    the middle of writing a checkpoint pack)."""

    def __init__(self, inner, lo: int, hi: int):
        super().__init__(inner)
        self.lo, self.hi, self.fired = lo, hi, 0

    def pwrite(self, data, offset: int) -> None:
        if not self.fired and self.lo <= offset < self.hi:
            self.fired += 1
            half = bytes(data)[:len(data) // 2]
            self.inner.pwrite(half[:len(half) // BS * BS] or bytes(data)[:BS], offset)
            raise OSError(5, "injected torn write")
        self.inner.pwrite(data, offset)


def test_swapped_checkpoint_slots_then_torn_checkpoint():
    """Swapping the two checkpoint slots is accepted (the data is right); the next
    checkpoint must then not overwrite the pack that was loaded, so a crash while writing
    it leaves the disk openable with everything flushed."""
    cfg = Config(memtable_records=16, level_ratio=2)
    disk, data, meta = min_meta_disk(32 * MiB, 2048, cfg)
    model = Model(2048)
    rng = random.Random(3)
    for i in range(40):
        buf = make_block(rng, i, 1)
        disk.write(i, buf)
        model.write(i, buf)
        disk.flush()
    disk.close()
    lay = disk.layout
    s0, s1 = (lay.checkpoint_slot(s) * BS for s in (0, 1))
    n = lay.checkpoint_blocks * BS
    a, b = bytes(meta.buf[s0:s0 + n]), bytes(meta.buf[s1:s1 + n])
    meta.buf[s0:s0 + n], meta.buf[s1:s1 + n] = b, a
    disk = SwornDisk.open(data, meta, KEY16)
    verify_disk(disk, model, "after the swap")
    disk.close()
    # The first pack written after the swap is torn (a crash while writing it): it must
    # not have been written over the pack that was loaded.
    dev = TornSlotWrite(meta, min(s0, s1), max(s0, s1) + n)
    disk = SwornDisk.open(data, dev, KEY16)
    pending = None
    with pytest.raises(OSError):
        for i in range(40, 400):
            pending = (i, make_block(rng, i, 2))
            disk.write(*pending)
            disk.flush()
            model.write(*pending)
    assert dev.fired == 1
    disk = SwornDisk.open(data, meta, KEY16)             # the trusted pack is intact
    assert disk.read(pending[0], 1) in (model.get(pending[0]), pending[1])
    model.write(pending[0], disk.read(pending[0], 1))    # its commit may be durable
    verify_disk(disk, model, "after a torn checkpoint")
    disk.close()


def test_cleaner_verifies_before_moving():
    """A block tampered with while the disk is online is not moved by the cleaner: it is
    reported, its segment is not reused, and its LBA still reads as IntegrityError, while
    everything else in the segment moves and reads back."""
    cfg = Config(memtable_records=1024, level_ratio=4)
    disk, data, meta = min_meta_disk(64 * MiB, 8192, cfg)
    rng = random.Random(4)
    model = Model(8192)
    buf = make_blocks(rng, 0, 1024, 1)                  # one segment's worth
    disk.write(0, buf)
    model.write(0, buf)
    disk.flush()
    hba_of = lambda lba: int(np.frombuffer(disk.debug.index.get(lba)[:8], "<u8")[0])
    seg = hba_of(0) // 1024
    assert all(hba_of(lba) // 1024 == seg for lba in range(1024))
    disk.discard(0, 1024)                               # leave 10% of the segment valid
    for lba in range(0, 1024, 10):
        disk.write(lba, model.get(lba))
    for lba in range(1024):
        if lba % 10:
            model.discard(lba, 1)
    disk.flush()
    # ... re-written blocks went elsewhere; keep the old ones valid instead
    disk.close()
    disk, data, meta = min_meta_disk(64 * MiB, 8192, cfg)
    model = Model(8192)
    disk.write(0, buf)
    model.write(0, buf)
    disk.flush()
    seg = hba_of(0) // 1024
    for lba in range(1024):
        if lba % 10:
            disk.discard(lba, 1)
            model.discard(lba, 1)
    disk.flush()
    assert disk.debug.space.seg_valid[seg] == 103
    bad = 10
    data.buf[hba_of(bad) * BS + 7] ^= 0x80              # tampered with while online
    before = disk.stats().lifetime
    assert disk.debug.clean(seg)
    after = disk.stats().lifetime
    assert after.blocks_moved - before.blocks_moved == 102
    assert after.cleaning_unverified_blocks == before.cleaning_unverified_blocks + 1
    assert disk.debug.space.seg_valid[seg] == 1, "the bad block stays; its segment is not freed"
    assert disk.debug.cleaner.pick_victim(greedy=True) != seg
    with pytest.raises(IntegrityError):
        disk.read(bad, 1)
    for lba in range(1024):
        if lba != bad:
            assert disk.read(lba, 1) == model.get(lba), f"LBA {lba}"
    disk.close()
