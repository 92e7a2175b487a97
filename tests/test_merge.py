"""Background merges (lsm.py, merge.py): a major compaction runs between writes, a chunk
at a time, and a later checkpoint installs it. What must hold meanwhile: every read is
right, a checkpoint pack never names the chunks of a merge in progress (a crash loses
the merge and nothing else), a merge without room to wait is finished at the
checkpoint, and close() leaves none half done."""
from __future__ import annotations

import random

import numpy as np

from sworndisk import Config, SwornDisk
from sworndisk.check import check
from sworndisk.layout import bit_chunks
from sworndisk.space import CHUNK_BUILDING, CHUNK_FREE, CHUNK_USED, IndexSpace

from .conftest import KEY16, MiB, Model, make_block, meta_size_for, new_disk, verify_disk
from .crashdev import crash_pair

NR = 4096
CFG = Config(memtable_records=64, level_ratio=4)


def _write(disk, model, rng, n, version):
    for _ in range(n):
        lba = rng.randrange(model.nr_blocks)
        blk = make_block(rng, lba, version)
        disk.write(lba, blk)
        model.write(lba, blk)


def _until_merging(disk, model, rng, per_flush=16, placed=False):
    """Writes and flushes until a merge is in progress and has merged records (and,
    if `placed`, been given index chunks: more than NODE_BATCH leaves' worth)."""
    for rnd in range(400):
        _write(disk, model, rng, per_flush, rnd)
        disk.flush()
        merge = disk.debug.index.merge
        if merge is not None and merge.merged and (merge.chunks() or not placed):
            return
    raise AssertionError(f"no merge ever ran in the background: {disk.stats().index}")


def _chunks_named(disk) -> set[int]:
    return {c for bit in disk.debug.index.bits() for c in bit.meta.chunks}


def test_a_merge_runs_between_writes_and_a_checkpoint_installs_it():
    disk, _, _ = new_disk(64 * MiB, NR, CFG)
    rng, model = random.Random(1), Model(NR)
    _until_merging(disk, model, rng)
    index = disk.debug.index
    steps, majors = disk.stats().index.merge_steps, disk.stats().lifetime.major_compactions
    merged = disk.stats().index.merged_records
    commits = disk.stats().lifetime.commits
    for i in range(400):                          # writes alone: the merge moves on
        _write(disk, model, rng, 1, 1000 + i)
        if disk.stats().index.merged_records > merged or not index.merging():
            break
    st = disk.stats()
    assert st.lifetime.commits == commits, "the writes committed"
    assert st.index.merge_steps > steps and st.index.merged_records > merged, st.index
    watched = index.merge
    inputs = {bit.meta.bit_id for bit in watched.inputs}
    verify_disk(disk, model, "while merging", rng=rng)
    for rnd in range(400):
        if index.merge is not watched:
            break
        _write(disk, model, rng, 16, 2000 + rnd)
        disk.flush()
    st = disk.stats()
    assert index.merge is not watched and st.lifetime.major_compactions == majors + 1, st
    assert not inputs & {bit.meta.bit_id for bit in index.bits()}, "inputs still listed"
    building = set(index.merge.chunks()) if index.merging() else set()
    assert set(np.flatnonzero(disk.debug.ispace.state == CHUNK_BUILDING)) == building
    verify_disk(disk, model, "after the install", lbas=range(NR))
    disk.close()


def test_index_space_packs_a_merges_chunks_as_free():
    space = IndexSpace(6)
    assert [space.alloc(), space.alloc_building(), space.alloc_building()] == [0, 1, 2]
    assert space.packed().tolist() == [CHUNK_USED, CHUNK_FREE, CHUNK_FREE, 0, 0, 0]
    assert space.state.tolist()[:3] == [CHUNK_USED, CHUNK_BUILDING, CHUNK_BUILDING]
    space.settle([1])
    assert space.packed().tolist() == [CHUNK_USED, CHUNK_USED, CHUNK_FREE, 0, 0, 0]
    assert space.free() == 3


def test_a_crash_during_a_merge_loses_the_merge_and_nothing_else():
    """A checkpoint is taken while a merge is in progress (its chunks allocated), then
    more is written and the power is cut: recovery returns what was flushed, `check`
    finds the disk clean, and the chunk map marks used exactly the chunks of the BITs
    the pack names (the merge's are free again)."""
    nr = 16384                  # a bottom level of more than NODE_BATCH leaves
    for seed in range(2):
        ctrl, data, meta = crash_pair(128 * MiB, meta_size_for(128 * MiB, nr, CFG))
        disk = SwornDisk.create(data, meta, KEY16, nr_blocks=nr, config=CFG)
        rng, model = random.Random(seed), Model(nr)
        for rnd in range(400):
            _until_merging(disk, model, rng, per_flush=64, placed=True)
            ckpt = disk.stats().lifetime.checkpoints
            _write(disk, model, rng, 16, 4000 + rnd)
            disk.flush()
            index = disk.debug.index
            if disk.stats().lifetime.checkpoints > ckpt and index.merging():
                break
        building = set(index.merge.chunks())
        assert building and not building & _chunks_named(disk)
        _write(disk, Model(nr), rng, 64, 5000)    # not flushed: may be lost
        ctrl.crash(rng)
        ctrl.revive()
        disk = SwornDisk.open(data, meta, KEY16)
        verify_disk(disk, model, f"seed {seed} after the crash", lbas=range(nr))
        used = set(np.flatnonzero(disk.debug.ispace.state != CHUNK_FREE).tolist())
        assert used == _chunks_named(disk), (seed, used ^ _chunks_named(disk))
        assert disk.stats().index.merge_records == 0
        disk.close()
        assert check(data, meta, KEY16).clean


def test_a_merge_without_room_to_wait_is_finished_at_the_checkpoint():
    disk, _, _ = new_disk(64 * MiB, NR, CFG)
    rng, model = random.Random(3), Model(NR)
    _until_merging(disk, model, rng)
    index, space = disk.debug.index, disk.debug.ispace
    majors = disk.stats().lifetime.major_compactions
    # Room for the rest of the merge and the largest MemTable BIT, now: once the next
    # checkpoint's own BIT takes a chunk, not for both, and it must install the merge.
    size = disk.debug.fmt.size
    keep = bit_chunks(index.merge.total, size) - len(index.merge.chunks()) \
        + bit_chunks(index.max_bit, size)
    free = np.flatnonzero(space.state == CHUNK_FREE)
    taken = free[keep:]
    space.state[taken] = CHUNK_USED
    for rnd in range(400):
        _write(disk, model, rng, 16, 3000 + rnd)
        ckpt = disk.stats().lifetime.checkpoints
        disk.flush()
        if disk.stats().lifetime.checkpoints > ckpt:
            break
    st = disk.stats()
    assert st.index.merge_records == 0 and st.lifetime.major_compactions == majors + 1, st
    space.state[taken] = CHUNK_FREE
    verify_disk(disk, model, "after the forced install", lbas=range(NR))


def test_close_finishes_the_merge_in_progress():
    disk, data, meta = new_disk(64 * MiB, NR, CFG)
    rng, model = random.Random(4), Model(NR)
    _until_merging(disk, model, rng)
    majors = disk.stats().lifetime.major_compactions
    disk.close()
    disk = SwornDisk.open(data, meta, KEY16)
    st = disk.stats()
    assert st.lifetime.major_compactions == majors + 1 and st.index.merge_records == 0, st
    used = set(np.flatnonzero(disk.debug.ispace.state != CHUNK_FREE).tolist())
    assert used == _chunks_named(disk)
    verify_disk(disk, model, "reopened", lbas=range(NR))
    disk.close()


def test_an_idle_disk_merges_in_background_step():
    disk, _, _ = new_disk(64 * MiB, NR, CFG)
    rng, model = random.Random(5), Model(NR)
    _until_merging(disk, model, rng)
    majors = disk.stats().lifetime.major_compactions
    watched, steps = disk.debug.index.merge, 0
    while disk.debug.index.merge is watched:
        assert disk.background_step(), "a merge in progress but no background work"
        steps += 1
        assert steps < 1000
    st = disk.stats()
    assert steps > 1 and st.lifetime.major_compactions == majors + 1, (steps, st)
    verify_disk(disk, model, "after background merging", lbas=range(NR))
    disk.close()


def test_level0_stays_bounded_when_the_journal_calls_the_checkpoints():
    """One-block writes, each flushed (fsync after every write): the journal half fills
    long before the MemTable, so checkpoints come faster than the writes pace a merge.
    A merge in progress is finished once the level-0 BITs written since it began fill
    level 0, so level 0 holds at most its inputs and level_ratio BITs more."""
    cfg = Config(memtable_records=4096, level_ratio=4)
    disk, _, _ = new_disk(64 * MiB, NR, cfg)
    rng, model = random.Random(7), Model(NR)
    index, most = disk.debug.index, 0
    for i in range(6000):
        _write(disk, model, rng, 1, i)
        disk.flush()
        most = max(most, len(index.levels[0]) if index.levels else 0)
    st = disk.stats()
    assert st.lifetime.major_compactions > 0 and st.lifetime.checkpoints > 2 * 4 + 1, st
    assert most <= 2 * cfg.level_ratio + 2, f"level 0 grew to {most} BITs"
    verify_disk(disk, model, "after the flushed writes", lbas=range(NR))
    disk.close()
