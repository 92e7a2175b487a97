"""Compaction policy (lsm.py): a merge whose output would be over its level's limit goes
on to the level below in the same merge, so no level above the bottom is left over its
limit by a merge, and every record stays findable."""
from __future__ import annotations

import random

from sworndisk import Config

from .conftest import MiB, Model, make_block, new_disk, verify_disk

NR = 4096


def test_no_merge_leaves_an_upper_level_over_its_limit():
    disk, _, _ = new_disk(64 * MiB, NR, Config(memtable_records=16, level_ratio=2))
    index = disk.debug.index
    assert index.caps, "the test needs levels between L0 and the bottom"
    rng = random.Random(6)
    model = Model(NR)
    deep_merges = 0
    for rnd in range(300):
        for _ in range(12):
            lba = rng.randrange(NR)
            blk = make_block(rng, lba, rnd)
            disk.write(lba, blk)
            model.write(lba, blk)
        before = [[bit.meta.bit_id for bit in level] for level in index.levels]
        disk.flush()
        levels = index.levels
        last = max((i for i, level in enumerate(levels) if level), default=0)
        for i in range(1, min(last, len(index.caps) + 1)):
            for bit in levels[i]:
                assert bit.meta.count <= index.caps[i - 1], (rnd, i, bit.meta.count, index.caps)
        after = [[bit.meta.bit_id for bit in level] for level in levels]
        old_ids = {i for level in before for i in level}
        gone = [lvl for lvl, level in enumerate(before) if set(level) - set(sum(after, []))]
        made = [lvl for lvl, level in enumerate(after) if lvl and set(level) - old_ids]
        if gone and made and made[0] >= gone[0] + 2:
            deep_merges += 1                     # a merge went past the next level
    assert deep_merges > 0, "no merge ever went past the next level"
    verify_disk(disk, model, "after the merges", rng=rng)
    disk.close()
