"""SwornDisk.write_many: the same as write() for each request in order, whichever path
it takes (the whole batch into the pending batch at once, or one write() at a time when
it does not fit the autocommit budget or the free space), with bad arguments refused
before anything is buffered."""
from __future__ import annotations

import random

import pytest

from sworndisk import Config, DiskClosedError, InvalidArgument, SwornDisk

from .conftest import BS, KEY16, MiB, Model, make_block, make_blocks, new_disk, verify_disk

NR = 1024


def _batches(rng: random.Random, count: int, max_blocks: int, ver: int):
    """Batches of (lba, data) with repeated LBAs inside a batch, single and multi-block."""
    out = []
    for b in range(count):
        batch = []
        for _ in range(rng.randint(1, 40)):
            n = rng.choice([1, 1, 1, 2, max_blocks])
            lba = rng.randrange(NR - n)
            batch.append((lba, make_blocks(rng, lba, n, ver * 1000 + b)))
        if rng.random() < 0.5:                   # the same LBA twice: the later wins
            lba, data = batch[0]
            batch.append((lba, make_blocks(rng, lba, len(data) // BS, ver * 1000 + b + 500)))
        out.append(batch)
    return out


def test_write_many_is_write_in_order():
    disk, data, meta = new_disk(32 * MiB, NR, Config(memtable_records=64, level_ratio=2))
    model = Model(NR)
    rng = random.Random(3)
    for i, batch in enumerate(_batches(rng, 60, 16, 1)):
        disk.write_many(batch)
        for lba, buf in batch:
            model.write(lba, buf)
        if i % 7 == 6:
            disk.flush()
        if i % 5 == 0:
            verify_disk(disk, model, f"batch {i}", rng=rng)
    written = sum(len(d) for b in _batches(random.Random(3), 60, 16, 1) for _, d in b) // BS
    assert disk.stats().lifetime.user_blocks_written == written
    disk.close()
    disk = SwornDisk.open(data, meta, KEY16)
    verify_disk(disk, model, "after reopen", lbas=range(NR))
    disk.close()


def test_a_batch_beyond_the_budget_commits_on_the_way():
    """More than the autocommit budget in one batch: write() at a time, committing as it
    must, and the result is still the batch written in order."""
    cfg = Config(memtable_records=64, level_ratio=2)
    disk, data, meta = new_disk(200 * MiB, 32 * 1024, cfg)     # 128 MiB logical
    budget = cfg.autocommit_bytes // BS
    rng = random.Random(8)
    batch = [(lba, make_blocks(rng, lba, 256, 1)) for lba in range(0, budget + 1024, 256)]
    before = disk.commit_seq
    disk.write_many(batch)
    assert disk.commit_seq > before, "the slow path never committed"
    model = Model(32 * 1024)
    for lba, buf in batch:
        model.write(lba, buf)
    verify_disk(disk, model, "big batch", lbas=range(0, budget + 1024, 97))
    disk.close()


@pytest.mark.parametrize("bad", [(NR - 1, 2 * BS), (-1, BS), (0, BS + 1), (0, 0), (1.0, BS)],
                         ids=["past-the-end", "negative", "partial-block", "empty", "float"])
def test_bad_arguments_raise_before_anything_is_buffered(bad):
    disk, _, _ = new_disk(32 * MiB, NR)
    lba, nbytes = bad
    good = (5, b"g" * BS)
    with pytest.raises(InvalidArgument):
        disk.write_many([good, (lba, b"x" * nbytes)])
    assert disk.stats().buffered_blocks == 0 and disk.read(5, 1) == bytes(BS)
    disk.close()
    with pytest.raises(DiskClosedError):
        disk.write_many([good])


def test_single_block_batches_whichever_path():
    """Batches of single blocks go into the buffer at once when they are all new to it
    and fit it; a repeat inside the batch, an LBA buffered already or a batch across the
    buffer's end takes the block-by-block path. The disk reads the same either way."""
    nr = 8192
    disk, data, meta = new_disk(64 * MiB, nr)
    model = Model(nr)
    rng = random.Random(4)
    recent: list[int] = []                      # written since the last flush
    for i in range(240):
        kind = i % 4
        if kind == 0 or not recent:
            lbas = rng.sample(range(nr), 32)
        elif kind == 1:                         # the same LBA twice: the later wins
            lbas = rng.sample(range(nr), 31)
            lbas.append(lbas[5])
        elif kind == 2:                         # some buffered already
            lbas = rng.sample(recent, min(8, len(recent))) + rng.sample(range(nr), 24)
            lbas = list(dict.fromkeys(lbas))
        else:                                   # 300: the buffer's end comes mid-batch
            lbas = rng.sample(range(nr), 300)
        batch = [(lba, make_block(rng, lba, i)) for lba in lbas]
        disk.write_many(batch)
        for lba, b in batch:
            model.write(lba, b)
        recent += lbas
        if i % 60 == 59:
            disk.flush()
            recent = []
        if i % 40 == 0:
            verify_disk(disk, model, f"batch {i}", rng=rng)
    verify_disk(disk, model, "end", lbas=range(nr))
    disk.close()
    disk = SwornDisk.open(data, meta, KEY16)
    verify_disk(disk, model, "after reopen", lbas=range(nr))
    disk.close()


def test_segments_sealed_together_read_and_commit_their_newest_copies():
    """With a crypto worker, up to two segments are sealed while the next fills: the same
    LBAs in both of them and in the buffer read back as the newest copy, before the
    commit, after it and after a reopen (their records staged oldest first)."""
    nr = 4096
    disk, data, meta = new_disk(64 * MiB, nr, Config(crypto_workers=1))
    model, rng = Model(nr), random.Random(0)
    spans = [(0, 8), (590, 30), (1290, 20), (1990, 20), (2700, 10), (3000, 4)]
    most = 0
    for ver in range(1, 4):                 # 1024 new blocks a round: a segment each
        for lba, n in ((0, 600), (600 + ver * 700, 424)):
            buf = make_blocks(rng, lba, n, ver)
            disk.write(lba, buf)
            model.write(lba, buf)
        most = max(most, disk.debug.batch.sealing)
        assert disk.read_many(spans) == [model.read(a, k) for a, k in spans], ver
    buf = make_blocks(rng, 0, 40, 9)
    disk.write(0, buf)
    model.write(0, buf)
    assert most == 2 and disk.debug.batch.sealing == 2
    assert disk.read_many(spans) == [model.read(a, k) for a, k in spans]
    disk.flush()
    assert disk.debug.batch.sealing == 0
    assert disk.read_many(spans) == [model.read(a, k) for a, k in spans]
    disk.close()
    disk = SwornDisk.open(data, meta, KEY16)
    assert disk.read_many(spans) == [model.read(a, k) for a, k in spans]
    disk.close()
