"""What BITs keep in memory to answer lookups (bit.py, bloom.py): the Bloom filter never
says "absent" of a key it holds; fence and filter, or a BIT held whole (resident), answer
exactly what a walk from the root answers; they are really used (a lookup reads one node
per BIT, none of a BIT the filter rules out, none at all of a resident BIT); and their
memory is charged to, and given back to, the node store's budgets."""
from __future__ import annotations

import random

import numpy as np

from sworndisk import Config, SwornDisk
from sworndisk.bit import Bit, NodeStore
from sworndisk.bloom import BloomFilter

from .conftest import KEY16, MiB, make_block, new_disk


def _mapped(disk, records: dict) -> dict:
    """`records` without tombstones: a merge into the bottom level drops them, and the
    close before a reopen finishes the merge in progress."""
    return {l: v for l, v in records.items() if v != disk.debug.fmt.tombstone}

CFG = Config(memtable_records=64, level_ratio=2)
NR = 4096


def test_bloom_has_no_false_negatives_and_few_false_positives():
    rng = np.random.default_rng(3)
    keys = np.unique(rng.integers(0, 1 << 40, 30000, dtype=np.int64).astype(np.uint64))
    inside, outside = keys[:10000], keys[10000:]
    f = BloomFilter(len(inside))
    f.add(inside[:4000])
    f.add(inside[4000:])                        # added in pieces, as a builder does
    assert f.may_contain(inside).all()
    fp = f.may_contain(outside).mean()
    assert 0 < fp < 0.02, fp                    # 0 would mean the test proves nothing
    # The one-key path computes the same positions.
    sample = np.concatenate([inside[:300], outside[:3000]])
    assert [f.may_contain_one(int(k)) for k in sample] == f.may_contain(sample).tolist()


def _aged_disk(resident: bool = False):
    """A disk whose index has several levels: random writes and some discards over many
    commits, so compactions ran (minor and major). Unless `resident`, no BIT may be
    held whole, so lookups go through fences and filters."""
    disk, data, meta = new_disk(48 * MiB, NR, CFG)
    if not resident:
        disk.debug.index.store.resident.limit = 0
    rng = random.Random(5)
    for rnd in range(40):
        for _ in range(60):
            lba = rng.randrange(NR)
            disk.write(lba, make_block(rng, lba, rnd))
        if rnd % 7 == 3:
            lo = rng.randrange(NR - 40)
            disk.discard(lo, rng.randrange(1, 40))
        disk.flush()
    st = disk.stats()
    assert st.lifetime.major_compactions > 0 and len(st.index.levels) >= 2, st.index
    return disk, data, meta


def _unsummarised(disk) -> list[Bit]:
    """The same BITs read through a store with no summary budget: lookups walk from the
    root, as before summaries existed (the reference)."""
    dbg = disk.debug
    store = NodeStore(dbg.meta, dbg.fmt, 1 << 20)
    store.summaries.limit = store.resident.limit = 0
    return [Bit(b.meta, store, want_filter=True) for b in dbg.index.bits()]


def _walked(bits: list[Bit], lbas) -> dict[int, bytes]:
    out = {}
    for l in lbas:
        for bit in bits:
            v = bit.get(l)
            if v is not None:
                out[l] = v
                break
    return out


def test_summarised_lookups_answer_what_root_walks_answer():
    disk, _, _ = _aged_disk()
    index = disk.debug.index
    ref_bits = _unsummarised(disk)
    assert all(b.fence() is None and b.bloom is None for b in ref_bits)
    everything = list(range(NR))
    expected = _walked(ref_bits, everything)
    assert len(expected) > NR // 3
    assert index.lookup_bits(everything) == expected
    rng = random.Random(9)
    for _ in range(50):                          # batches of every size, LBAs unsorted
        lbas = rng.sample(everything, rng.choice([1, 2, 3, 17, 64]))
        assert index.lookup_bits(lbas) == {l: expected[l] for l in lbas if l in expected}
        assert index.lookup_each(lbas) == {l: expected[l] for l in lbas if l in expected}
    bits = index.bits()
    assert all(b.fence() is not None for b in bits)
    assert all(b.bloom is not None for b in bits if b.meta.level < bits[-1].meta.level)
    assert bits[-1].bloom is None                # the bottom level needs none
    disk.close()


def test_a_lookup_reads_one_node_per_bit_and_none_where_the_filter_says_absent():
    disk, _, _ = _aged_disk()
    index, store = disk.debug.index, disk.debug.index.store
    bottom = index.bits()[-1]
    assert bottom.meta.height >= 1, "the test needs a BIT with internal nodes"
    fence_first, _ = bottom.fence()
    lba = int(fence_first[len(fence_first) // 2])     # a leaf's first LBA: in the BIT
    before = store.hits + store.misses
    assert bottom.get(lba) is not None
    assert store.hits + store.misses - before == 1    # the leaf alone, not the path to it
    upper = next(b for b in index.bits() if b.bloom is not None and b.meta.height >= 0)
    absent = [l for l in range(upper.meta.lba_min, upper.meta.lba_max + 1)
              if not upper.bloom.may_contain_one(l)]
    assert absent
    before = store.hits + store.misses
    found = np.zeros(len(absent), bool)
    upper.lookup_many(np.array(absent, np.uint64), found, np.empty(len(absent), disk.debug.fmt.dtype))
    assert store.hits + store.misses == before and not found.any()
    disk.close()


def test_summary_memory_is_accounted_and_given_back():
    disk, data, meta = _aged_disk()
    index, store = disk.debug.index, disk.debug.index.store
    index.lookup_bits(list(range(NR)))           # every fence built
    held = sum(b.summary_bytes() for b in index.bits())
    assert held > 0 and store.summaries.used == held <= store.summaries.limit
    st = disk.stats().index
    assert st.summary_bytes == held and st.summary_limit == store.summaries.limit
    rng = random.Random(2)
    for rnd in range(12):                        # more compactions retire these BITs
        for _ in range(80):
            lba = rng.randrange(NR)
            disk.write(lba, make_block(rng, lba, 100 + rnd))
        disk.flush()
    index.lookup_bits(list(range(NR)))
    assert store.summaries.used == sum(b.summary_bytes() for b in index.bits())
    disk.close()


def test_a_reopened_disk_builds_its_summaries_on_first_use():
    disk, data, meta = _aged_disk()
    before = disk.debug.index.get_many_exact(list(range(NR)))   # MemTable and BITs
    disk.close()                                 # the checkpoint moves the MemTable
    disk = SwornDisk.open(data, meta, KEY16)
    index = disk.debug.index
    index.store.resident.limit = 0
    assert disk.stats().index.summary_bytes == 0
    assert len(index.memtable) == 0
    assert _mapped(disk, index.lookup_bits(list(range(NR)))) == _mapped(disk, before)
    bits = index.bits()
    assert all(b.fence() is not None for b in bits)
    assert all(b.bloom is not None for b in bits if b.meta.level < bits[-1].meta.level)
    assert disk.stats().index.summary_bytes > 0
    disk.close()


def test_lookups_are_right_when_nothing_fits_the_budget():
    disk, _, _ = _aged_disk()
    index = disk.debug.index
    expected = index.lookup_bits(list(range(NR)))
    dbg = disk.debug
    store = NodeStore(dbg.meta, dbg.fmt, 1 << 20)
    store.summaries.limit = 64                   # not even one fence
    store.resident.limit = 0
    bits = [Bit(b.meta, store, want_filter=True) for b in index.bits()]
    assert _walked(bits, range(NR)) == expected
    assert all(b.fence() is None for b in bits if b.meta.height > 0)
    assert store.summaries.used <= 64
    disk.close()


def test_resident_bits_answer_what_root_walks_answer_and_read_no_node():
    disk, data, meta = _aged_disk(resident=True)
    index, store = disk.debug.index, disk.debug.index.store
    expected = _walked(_unsummarised(disk), range(NR))
    assert index.lookup_bits(list(range(NR))) == expected
    bits = index.bits()
    assert all(b.resident() is not None for b in bits)
    assert all(b.fence() is None and b.bloom is None for b in bits)   # of no more use
    held = sum(b.meta.count * (disk.debug.fmt.size + 8) for b in bits)
    if len(bits) > 1:                            # the flat index merged from them (lsm.py)
        held += index.flat_records() * (disk.debug.fmt.size + 8)
    assert store.resident.used == held == disk.stats().index.resident_bytes
    assert store.cache_limit == max(16, (store.cache_bytes - held) // 4096)
    before = store.hits + store.misses
    rng = random.Random(4)
    for _ in range(40):
        lbas = rng.sample(range(NR), rng.choice([1, 2, 9, 33]))
        assert index.lookup_bits(lbas) == {l: expected[l] for l in lbas if l in expected}
        assert index.lookup_each(lbas) == {l: expected[l] for l in lbas if l in expected}
    assert store.hits + store.misses == before
    for lo, hi in [(0, NR), (100, 140), (NR - 7, NR)]:  # range() and merges read it too
        for bit, ref in zip(bits, _unsummarised(disk)):
            assert bit.range(lo, hi).tobytes() == ref.range(lo, hi).tobytes()
    before = index.get_many_exact(list(range(NR)))
    disk.close()
    disk = SwornDisk.open(data, meta, KEY16)     # resident again, from the device
    index = disk.debug.index
    assert disk.stats().index.resident_bytes == 0
    assert _mapped(disk, index.lookup_bits(list(range(NR)))) == _mapped(disk, before)
    assert all(b.resident() is not None for b in index.bits())
    disk.close()


def test_residency_stays_within_its_budget():
    disk, _, _ = _aged_disk(resident=True)
    index = disk.debug.index
    store = NodeStore(disk.debug.meta, disk.debug.fmt, 1 << 20)
    bits = [Bit(b.meta, store) for b in index.bits()]
    sizes = sorted(b.meta.count * (disk.debug.fmt.size + 8) for b in bits)
    store.resident.limit = sizes[0]               # room for the smallest BIT alone
    expected = index.lookup_bits(list(range(NR)))
    assert _walked(bits, range(NR)) == expected
    assert sum(b.resident() is not None for b in bits) == 1
    assert store.resident.used == sizes[0]
    for b in bits:
        b.release()
    assert store.resident.used == 0 and store.summaries.used == 0
    disk.close()
