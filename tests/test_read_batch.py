"""The batched read path (reader.py, CommittedState.resolve_records, NodeStore.records_many):
a batch with nothing pending goes from its ranges to the device runs in arrays, and a BIT
on a reopened disk loads whole with one read per run of nodes. Both must answer exactly
what the LBA-by-LBA path answers, verify every node they load, and really be the path a
batch takes."""
from __future__ import annotations

import random

import numpy as np
import pytest

from sworndisk import Config, IntegrityError, SwornDisk
from sworndisk.committed import CommittedState
from sworndisk.device import CountingDevice

from .conftest import BS, KEY16, MiB, Model, make_block, make_blocks, new_disk

CFG = Config(memtable_records=64, level_ratio=2)
NR = 4096


def _aged(resident: bool):
    """A disk with several BIT levels, a MemTable, committed discards (tombstones) and
    never-written LBAs, with its model; no BIT resident unless `resident`."""
    disk, data, meta = new_disk(48 * MiB, NR, CFG)
    if not resident:
        disk.debug.index.store.resident.limit = 0
    rng = random.Random(11)
    model = Model(NR)
    for rnd in range(30):
        for _ in range(50):
            lba = rng.randrange(NR - 300)
            blk = make_block(rng, lba, rnd)
            disk.write(lba, blk)
            model.write(lba, blk)
        if rnd % 6 == 2:
            lo = rng.randrange(NR - 340)
            n = rng.randrange(1, 40)
            disk.discard(lo, n)
            model.discard(lo, n)
        disk.flush()
    buf = make_blocks(rng, NR - 300, 40, 99)           # a run written at once
    disk.write(NR - 300, buf)
    model.write(NR - 300, buf)
    disk.flush()
    st = disk.stats()
    assert len(st.index.levels) >= 2 and st.index.memtable_records > 0, st.index
    assert all(b.resident() is not None for b in disk.debug.index.bits()) == resident
    return disk, data, meta, model


@pytest.mark.parametrize("resident", [True, False])
def test_resolve_records_answers_what_resolve_answers(resident):
    disk, _, _, _ = _aged(resident)
    state = disk.debug.state
    rng = random.Random(3)
    everything = list(range(NR))
    for size in [1, 2, 9, 33, 200, NR]:
        lbas = rng.sample(everything, min(size, NR)) if size < NR else everything
        lbas = lbas + lbas[: size // 3]                 # repeats, unsorted
        expected = state.resolve(lbas)
        recs, have = state.resolve_records(np.asarray(lbas, np.uint64))
        assert have.tolist() == [l in expected for l in lbas]
        got = disk.debug.fmt.values_of(recs[have])
        assert got == [expected[l] for l, h in zip(lbas, have.tolist()) if h]
    assert len(expected) > NR // 4                     # the test saw records...
    assert len(expected) < NR - 300                    # ...and LBAs without one
    disk.close()


@pytest.mark.parametrize("resident", [True, False])
def test_a_batch_reads_what_the_model_holds_through_the_batched_path(resident, monkeypatch):
    disk, data, meta, model = _aged(resident)
    calls = []
    real = CommittedState.resolve_records
    monkeypatch.setattr(CommittedState, "resolve_records",
                        lambda self, lbas: calls.append(len(lbas)) or real(self, lbas))
    rng = random.Random(8)
    for _ in range(20):
        ranges = [(l, 1) for l in rng.sample(range(NR), 32)]
        ranges += [(rng.randrange(NR - 300), rng.randrange(2, 300)), (NR - 301, 42), (5, 0)]
        ranges.append(ranges[0])                        # the same LBA twice in a batch
        got = disk.read_many(ranges)
        assert got == [model.read(l, n) for l, n in ranges]
    assert len(calls) == 20                             # every batch went the batched way
    assert disk.read_many([(7, 1)]) == [model.read(7, 1)]   # a lone block: LBA by LBA
    assert len(calls) == 20
    disk.close()


def test_a_reopened_disk_loads_a_bit_with_few_reads_and_verifies_every_node():
    disk, data, meta, model = _aged(True)
    disk.close()
    counting = CountingDevice(meta)
    disk = SwornDisk.open(data, counting, KEY16)
    index = disk.debug.index
    bits = index.bits()
    leaves = sum(-(-b.meta.count // index.store.capacity) for b in bits)
    before = counting.reads
    lbas = list(range(NR))
    assert disk.read_many([(l, 1) for l in lbas]) == [model.read(l, 1) for l in lbas]
    assert all(b.resident() is not None for b in bits)
    assert leaves > 12 and counting.reads - before < leaves // 4, (leaves, counting.reads - before)
    disk.close()
    # One leaf of the deepest BIT changed on the device: loading that BIT fails, and so
    # does the read that needed it (never wrong data).
    disk = SwornDisk.open(data, meta, KEY16)
    bottom = disk.debug.index.bits()[-1]
    assert bottom.meta.height >= 1
    leaf = disk.debug.fmt.hba_of(bottom.fence()[1][len(bottom.fence()[1]) // 2])
    meta.buf[leaf * BS + 100] ^= 1
    budget = disk.debug.index.store.resident
    used = budget.used
    with pytest.raises(IntegrityError, match=f"meta block {leaf} failed authentication"):
        bottom.resident()
    assert budget.used == used               # the failed load gave its share back
    with pytest.raises(IntegrityError):
        disk.read_many([(l, 1) for l in range(NR)])
    assert bottom.resident() is None
    disk.close()


def test_a_bit_loaded_whole_with_some_leaves_cached_holds_the_same_records():
    """Loading a BIT whole takes the leaves the node cache holds from it and verifies the
    rest in one batch: the records come out in the same order as a load from the device
    alone, and a cached leaf is not read again."""
    disk, data, meta, _model = _aged(True)
    disk.close()
    fresh = SwornDisk.open(data, meta, KEY16)
    want = fresh.debug.index.bits()[-1].resident()[1]
    fresh.close()
    disk = SwornDisk.open(data, meta, KEY16)
    store, bottom = disk.debug.index.store, disk.debug.index.bits()[-1]
    leaves = bottom.fence()[1]
    assert len(leaves) >= 6
    for entry in leaves[1::3]:                          # some leaves in the cache
        store.node(entry)
    misses = store.misses
    got = bottom.resident()[1]
    assert store.misses - misses == len(leaves) - len(leaves[1::3])
    assert got.tobytes() == want.tobytes() and len(got) == bottom.meta.count
    disk.close()
