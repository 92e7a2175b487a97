"""The flat index (flatindex.py): every BIT's newest record per LBA in one array. It
must answer exactly what a search of the BITs, newest first, answers: checked against a
dict model, through overlays, and through a disk whose lookups use it."""
from __future__ import annotations

import random

import numpy as np
import pytest

from sworndisk import Config, MemoryDevice, SwornDisk, flatindex
from sworndisk.flatindex import FlatIndex
from sworndisk.records import RecordFormat

from .conftest import BS, KEY16, MiB, Model, make_blocks, new_disk

FMT = RecordFormat(16)


def _bit(rng: random.Random, tag: int, span: int, n: int) -> np.ndarray:
    """A BIT's records: n distinct sorted LBAs below `span`, HBA tagging who wrote them."""
    recs = np.zeros(n, FMT.dtype)
    recs["lba"] = sorted(rng.sample(range(span), n))
    recs["hba"] = [tag * 100000 + i for i in range(n)]
    return recs


def _newest(parts: list[np.ndarray]) -> dict[int, int]:
    """LBA -> HBA of the newest record (parts newest first)."""
    want: dict[int, int] = {}
    for recs in parts:
        for lba, hba in zip(recs["lba"].tolist(), recs["hba"].tolist()):
            want.setdefault(lba, hba)
    return want


@pytest.mark.parametrize("seed", range(40))
def test_merged_and_overlaid_equal_the_newest_record_of_each_lba(seed):
    rng = random.Random(seed)
    span = rng.choice([8, 100, 5000])
    parts = [_bit(rng, k, span, rng.randint(0, min(span, 300))) for k in range(rng.randint(2, 6))]
    flat = FlatIndex.merged([(np.ascontiguousarray(p["lba"]), p) for p in parts], FMT)
    want = _newest(parts)
    assert flat.lbas.tolist() == sorted(want)
    assert flat.recs["hba"].tolist() == [want[lba] for lba in sorted(want)]
    assert (flat.recs["lba"] == flat.lbas).all()
    assert flat.owned and flat.nbytes == flat.lbas.nbytes + flat.recs.nbytes

    newer = _bit(rng, 99, span, rng.randint(0, min(span, 300)))
    over = flat.overlay(newer)
    want = _newest([newer] + parts)
    keys = np.arange(span + 3, dtype=np.uint64)       # every LBA, and some past the end
    found, out = over.lookup_sorted(keys)
    assert found.tolist() == [k in want for k in range(span + 3)]
    assert out["hba"][found].tolist() == [want[k] for k in range(span + 3) if k in want]
    assert flat.recs["hba"].tolist() == [_newest(parts)[k] for k in sorted(_newest(parts))]


def test_a_single_bit_is_its_own_flat_index():
    recs = _bit(random.Random(0), 1, 1000, 300)
    lbas = np.ascontiguousarray(recs["lba"])
    flat = FlatIndex.merged([(lbas, recs)], FMT)
    assert flat.lbas is lbas and flat.recs is recs and not flat.owned and flat.nbytes == 0


def test_an_empty_flat_index_finds_nothing():
    flat = FlatIndex.merged([(np.empty(0, np.uint64), np.empty(0, FMT.dtype))] * 2, FMT)
    found, _out = flat.lookup_sorted(np.array([0, 5], np.uint64))
    assert not found.any() and len(flat) == 0


@pytest.mark.parametrize("seed", range(30))
def test_the_direct_table_answers_as_the_search(seed):
    """Dense LBAs get a direct table; its lookups, keys in any order and outside the
    span on both sides, answer what the binary search answers. Sparse ones get none."""
    rng = random.Random(seed)
    n, lo = rng.randint(1024, 3000), rng.choice([0, 7, 1 << 40])
    span = int(n * rng.choice([1, 1.5, 2, 2.5]))
    recs = _bit(rng, 1, span, n)
    recs["lba"] += lo
    plain = FlatIndex(np.ascontiguousarray(recs["lba"]), recs)
    flat = FlatIndex(np.ascontiguousarray(recs["lba"]), recs)
    covered = int(recs["lba"][-1]) - int(recs["lba"][0]) + 1     # what a table must span
    dense = covered <= flatindex.DIRECT_SPAN * n
    assert (flat.direct_nbytes() > 0) == dense
    flat.build_direct()
    assert flat.direct == dense
    if not dense:
        return
    assert flat.nbytes == plain.nbytes + 4 * (covered + 1)
    keys = np.array([rng.randrange(max(0, lo - 5), lo + span + 5) for _ in range(500)]
                    + [0, lo + span + (1 << 20), (1 << 64) - 1], np.uint64)
    found, out = flat.lookup(keys)
    order = np.argsort(keys, kind="stable")
    want_found, want_out = plain.lookup_sorted(keys[order])
    assert found[order].tolist() == want_found.tolist()
    assert (out[order][want_found] == want_out[want_found]).all()


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_reads_through_the_flat_index_match_the_model(seed, direct, monkeypatch):
    """Writes, discards, flushes (a compaction drops the flat index; the lookups of the
    commits after it do not build it again) and reopens, with the flat index built before
    every read; with `direct`, it has its direct table whenever its LBAs are dense (this
    disk's indexes are otherwise too small for one)."""
    if direct:
        monkeypatch.setattr(flatindex, "DIRECT_MIN_RECORDS", 1)
    rng = random.Random(seed)
    cfg = Config(memtable_records=32, level_ratio=4)
    data, meta = MemoryDevice(24 * MiB), MemoryDevice(SwornDisk.min_meta_size(24 * MiB, 256, cfg))
    disk = SwornDisk.create(data, meta, KEY16, nr_blocks=256, config=cfg)
    model = Model(256)
    built = dropped = tables = 0
    for ver in range(300):
        op = rng.choice("wwwwddfcrrrr")
        lba, n = rng.randrange(256), rng.randint(1, 24)
        n = min(n, 256 - lba)
        index = disk.debug.index
        before = disk.stats().lifetime, index.flat_records()
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
            disk = SwornDisk.open(data, meta, KEY16)
            continue
        else:
            if index.bits():
                built += index.flatten()
                tables += index.flat_direct()
                assert index.flat_records() == len(np.unique(np.concatenate(
                    [bit.resident()[0] for bit in index.bits()])))
            spans = [(a, min(k, 256 - a)) for a, k in
                     ((rng.randrange(256), rng.randint(1, 16)) for _ in range(rng.randint(1, 12)))]
            assert disk.read_many(spans) == [model.read(a, k) for a, k in spans]
        after = disk.stats().lifetime
        if before[1] and after.minor_compactions > before[0].minor_compactions \
                and len(index.bits()) > 1:
            assert not index.flat_records()     # dropped; a commit's lookups do not rebuild it
            dropped += 1
    disk.close()
    assert built and dropped            # both paths ran
    assert bool(tables) == direct


def test_a_compaction_frees_the_flat_index_budget_before_the_new_bit_takes_its_share():
    """A flat index of several BITs holds about as much of the resident budget as they
    do: it must be given back before the new BIT reserves its own, or the new BIT is never
    resident and every read after it goes LBA by LBA."""
    cfg = Config(memtable_records=1800, level_ratio=8, node_cache_bytes=1 << 20,
                 lookaside_records=0)
    disk, _data, _meta = new_disk(64 * MiB, config=cfg)
    index, rng, end, merged = disk.debug.index, random.Random(1), 0, 0
    for _ in range(4):
        if end:                                   # reads until the flat index is built
            for _ in range(20):
                disk.read_many([(rng.randrange(end), 1) for _ in range(64)])
            assert index.flat_records()
            merged += len(index.bits()) > 1
        for lba in range(end, end + 1800, 100):
            disk.write_many([(lba + j, bytes(BS)) for j in range(100)])
        end += 1800
        disk.flush()
        assert index.all_resident() and index.batch_lookups()
    assert merged >= 2
    disk.close()
