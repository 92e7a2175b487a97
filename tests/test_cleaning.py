"""Segment cleaning, space accounting and threaded logging.

The invariants under test (sworndisk/space.py, sworndisk/cleaner.py, disk.py):
* A data block is valid iff the committed index maps some LBA to it, so after every
  flush `stats().space.valid_blocks` equals the number of LBAs holding data, and every other
  block is free (nothing stays busy once its commit is done) -- across overwrites,
  discards, cleaning and reopen.
* Cleaning and threaded logging never change what reads return; an aged disk with ~15%
  spare space never runs out of space when flushed regularly.
* A crash anywhere inside migration or segment freeing recovers to the last completed
  flush (or the flush in flight): no block lost, none stale.
* A migrated block's old copy is useless to an adversary: replayed anywhere, a read gives
  the right data or IntegrityError; a corrupted block is not laundered by migration.
* Discard frees space; a thin disk (logical size == data device) fails with ENOSPC when
  full and keeps everything it flushed before.
* background_step() does bounded work only when nothing is pending, and reclaims
  low-utilisation segments without changing what reads return.

Aging prints the write amplification and cleaning counters (run pytest with -s to see).
"""
from __future__ import annotations

import errno
import math
import random

import pytest

from sworndisk import Config, IntegrityError, MemoryDevice, NoSpaceError, SwornDisk, SwornDiskError

from .cleaning_helpers import (SEG, SEG_BYTES, VModel, assert_exact, assert_rit_consistent, block,
                               blocks, brief_stats, check_reads, describe, hba_of, matching,
                               new_mem_disk, reopen)
from .conftest import BS, KEY16, meta_size_for
from .crashdev import CrashController, TamperDevice, crash_pair

# Keeps engine instances abandoned at a crash alive for the session (see test_crash.py).
_ZOMBIES = []


# ==========================================================================================
# Aging
# ==========================================================================================

AGE_SEGS = 40
AGE_CFG = Config(memtable_records=2048, level_ratio=4)


def _age(seed: int, mixed: bool, rounds: float, spare: float = 1.15, config=AGE_CFG):
    """Fill a disk whose data device is ~15% larger than its logical size, then overwrite
    at random for `rounds` x the data device size, flushing every 0.5-2k blocks and
    closing/reopening every 2 data-device sizes. Checks exactness after every flush,
    spot reads after every flush, and the whole disk at every reopen."""
    rng = random.Random(seed)
    data_blocks = AGE_SEGS * SEG
    nr = int(data_blocks / spare)
    disk, data, meta = new_mem_disk(AGE_SEGS, nr, config)
    model = VModel(nr)
    ver = 0
    ctx = f"aging seed={seed} mixed={mixed} spare={spare}"
    # fill
    for a in range(0, nr, 1024):
        n = min(1024, nr - a)
        ver += 1
        disk.write(a, blocks(a, n, ver))
        model.write(a, n, ver)
        disk.flush()
    assert_exact(disk, model, ctx + " after fill")

    target = int(rounds * data_blocks)
    hot = nr // 5
    written = since_flush = nflush = 0
    flush_every = rng.randint(512, 2048)
    next_reopen = 2 * data_blocks
    sessions = []
    recent: list[int] = []
    totals = dict(dev_bytes=0, user_blocks=0, cleaning_runs=0, blocks_moved=0, threaded=0)

    def end_session(d):
        st = d.stats()
        wa = st.session.write_amplification
        assert wa is not None and math.isfinite(wa) and wa >= 1.0, \
            f"{ctx}: write amplification {wa!r} is not a finite number >= 1"
        sessions.append(wa)
        totals["dev_bytes"] += st.session.data_bytes_written + st.session.meta_bytes_written
        totals["threaded"] += st.space.threaded_segments
        return st

    while written < target:
        if mixed:
            n = 1 if rng.random() < 0.4 else rng.randint(1, 16)
            lba = rng.randrange(hot) if rng.random() < 0.8 else rng.randrange(nr)
            lba = min(lba, nr - n)
        else:
            n = 1
            lba = rng.randrange(nr)
        if mixed and rng.random() < 0.01:
            k = rng.randint(1, 64)
            lba = min(lba, nr - k)
            disk.discard(lba, k)
            model.discard(lba, k)
        else:
            ver += 1
            disk.write(lba, blocks(lba, n, ver))
            model.write(lba, n, ver)
            written += n
            since_flush += n
            recent.append(lba)
        if since_flush >= flush_every:
            disk.flush()
            assert_exact(disk, model, f"{ctx} after flush at {written} blocks")
            probe = recent[-8:] + [rng.randrange(nr) for _ in range(24)]
            check_reads(disk, model, f"{ctx} at {written} blocks", lbas=probe)
            recent.clear()
            since_flush = 0
            nflush += 1
            if mixed and nflush % 3 == 0:
                # an idle front end: background cleaning between bursts of writes
                for _ in range(2):
                    if not disk.background_step():
                        break
                assert_exact(disk, model, f"{ctx} after background steps at {written}")
                check_reads(disk, model, f"{ctx} after background steps",
                            lbas=[rng.randrange(nr) for _ in range(32)])
            flush_every = rng.randint(512, 2048)
        if written >= next_reopen and written < target:
            disk.flush()
            check_reads(disk, model, f"{ctx} before reopen at {written} blocks")
            end_session(disk)
            disk.close()
            disk = SwornDisk.open(data, meta, KEY16)
            assert_exact(disk, model, f"{ctx} after reopen at {written} blocks")
            check_reads(disk, model, f"{ctx} after reopen at {written} blocks")
            next_reopen += 2 * data_blocks
    disk.flush()
    assert_exact(disk, model, ctx + " at the end")
    st = end_session(disk)
    totals["cleaning_runs"] = st.lifetime.cleaning_runs      # persisted counters: cumulative
    totals["blocks_moved"] = st.lifetime.blocks_moved
    user = st.lifetime.user_blocks_written * BS
    overall = totals["dev_bytes"] / user
    print(f"\n[aging {'mixed 1-16 blocks, 80/20 hot/cold' if mixed else 'random 4 KiB'} "
          f"seed={seed}] data={AGE_SEGS} segs, nr_blocks={nr} (data/{spare}), user writes "
          f"{st.lifetime.user_blocks_written} blocks ({st.lifetime.user_blocks_written / data_blocks:.1f}x "
          f"the data device); WA per session {[round(w, 3) for w in sessions]}, overall "
          f"{overall:.3f}; cleaning_runs={st.lifetime.cleaning_runs} "
          f"blocks_moved={st.lifetime.blocks_moved} threaded_segments(sum)={totals['threaded']} "
          f"free_segments={st.space.free_segments} commits={st.lifetime.commits} "
          f"checkpoints={st.lifetime.checkpoints}")
    disk = reopen(disk, data, meta)
    check_reads(disk, model, ctx + " final reopen")
    assert_exact(disk, model, ctx + " final reopen")
    disk.close()
    return st, overall


def test_aging_random_4k():
    """Random 4 KiB overwrites, 10x the data device, ~15% spare space."""
    st, overall = _age(seed=1, mixed=False, rounds=10)
    assert math.isfinite(overall) and overall >= 1.0


def test_aging_mixed_sizes_hot_cold():
    """Writes of 1-16 blocks, 80% of them to 20% of the disk, a few discards; 10x."""
    st, overall = _age(seed=2, mixed=True, rounds=10)
    assert math.isfinite(overall) and overall >= 1.0


def test_aging_half_full_cleans():
    """At 50% utilisation (random 4 KiB and 1-16 block writes, hot/cold) the log runs
    out of free segments while old segments are mostly invalid: cleaning must run (in
    flush and in background_step) and never change what reads return; 5x."""
    st, overall = _age(seed=4, mixed=True, rounds=5, spare=2.0)
    assert st.lifetime.cleaning_runs > 0 and st.lifetime.blocks_moved > 0, \
        f"no cleaning at 50% utilisation: cleaning_runs={st.lifetime.cleaning_runs}"
    assert math.isfinite(overall) and overall >= 1.0


# The segment table (DST + RIT) is paged: node_cache_bytes // 4 bounds the cached
# segment details; the minimum (64 blocks) caches 16 segments of a 40-segment disk.
TINY_CACHE_CFG = Config(memtable_records=2048, level_ratio=4, node_cache_bytes=64 * BS)


def test_space_accounting_with_paged_segment_table():
    """The same accounting when the segment table does not fit its cache: one commit
    that invalidates blocks in 20 segments (more than the 16 cached), then aging at 50%
    utilisation with cleaning; exact after every flush, reads right, also after reopen."""
    disk, data, meta = new_mem_disk(AGE_SEGS, 30 * SEG, TINY_CACHE_CFG)
    model = VModel(30 * SEG)
    for a in range(0, 20 * SEG, SEG):
        disk.write(a, blocks(a, SEG, 1))
        model.write(a, SEG, 1)
        disk.flush()
    for sg in range(20):
        disk.write(sg * SEG + 5, blocks(sg * SEG + 5, 1, 2))
        model.write(sg * SEG + 5, 1, 2)
    disk.flush()
    assert_exact(disk, model, "one commit touching 20 segments, 16 cached")
    check_reads(disk, model, "one commit touching 20 segments")
    disk = reopen(disk, data, meta)
    assert_exact(disk, model, "reopen")
    check_reads(disk, model, "reopen")
    disk.close()
    _age(seed=7, mixed=True, rounds=2, spare=2.0,
         config=TINY_CACHE_CFG)


@pytest.mark.slow
def test_aging_long():
    """Soak: 40x the data device with mixed sizes. Deselected by default (pytest.ini);
    run it with `pytest -m slow`."""
    _age(seed=3, mixed=True, rounds=40)




# ==========================================================================================
# Exactness of the space accounting
# ==========================================================================================

SMALL_CFG = Config(memtable_records=1024, level_ratio=4)


def test_valid_blocks_exact_under_overwrites_discards_cleaning_and_reopen():
    """Random writes (1-16 blocks, mostly to a hot region), discards (1-128 blocks),
    same-batch overwrite/discard/rewrite sequences, batches larger than a segment
    buffer, background_step() calls: after every flush valid_blocks == LBAs in the
    model and no block stays busy; the same after each reopen. Runs on a disk small
    enough that threaded logging and cleaning happen."""
    rng = random.Random(11)
    segs, nr = 8, 5 * SEG
    disk, data, meta = new_mem_disk(segs, nr, SMALL_CFG)
    model = VModel(nr)
    ver = 0
    ctx = "exactness seed=11"
    nflush = 0
    unflushed = 0      # blocks written since the last flush: they occupy space until it
    for step in range(1500):
        r = rng.random()
        if unflushed > 1200:
            r = 0.99                      # flush (the disk has ~3000 spare blocks)
        if r < 0.70:
            unflushed += 16
            n = rng.randint(1, 16)
            lba = min(rng.randrange(SEG) if rng.random() < 0.7 else rng.randrange(nr), nr - n)
            ver += 1
            disk.write(lba, blocks(lba, n, ver))
            model.write(lba, n, ver)
        elif r < 0.80:
            n = rng.randint(1, 128)
            lba = min(rng.randrange(nr), nr - n)
            disk.discard(lba, n)
            model.discard(lba, n)
        elif r < 0.84:
            # write, discard part of it, rewrite part of that, all in one batch
            lba = rng.randrange(nr - 32)
            ver += 1
            disk.write(lba, blocks(lba, 32, ver))
            model.write(lba, 32, ver)
            unflushed += 36
            disk.discard(lba + 4, 16)
            model.discard(lba + 4, 16)
            ver += 1
            disk.write(lba + 8, blocks(lba + 8, 4, ver))
            model.write(lba + 8, 4, ver)
        elif r < 0.86:
            # a batch larger than the segment buffer: LBAs overwritten across a seal
            disk.flush()
            assert_exact(disk, model, f"{ctx} before a big batch (step {step})")
            lba = rng.randrange(nr - 1100)
            for _ in range(2):
                ver += 1
                disk.write(lba, blocks(lba, 1100, ver))
                model.write(lba, 1100, ver)
            unflushed = 2200
            disk.discard(lba + 600, 8)
            model.discard(lba + 600, 8)
        elif r < 0.88:
            before = disk.stats()
            did = disk.background_step()
            if before.pending_ops or before.buffered_blocks:
                assert did is False, f"{ctx} step {step}: background_step worked with " \
                                     f"unflushed data pending"
        else:
            disk.flush()
            unflushed = 0
            nflush += 1
            assert_exact(disk, model, f"{ctx} after flush #{nflush} (step {step})")
            if nflush % 25 == 0:
                check_reads(disk, model, f"{ctx} before reopen #{nflush}")
                assert_rit_consistent(disk, model, f"{ctx} before reopen #{nflush}")
                disk = reopen(disk, data, meta)
                assert_exact(disk, model, f"{ctx} after reopen (flush #{nflush})")
                check_reads(disk, model, f"{ctx} after reopen #{nflush}")
                assert_rit_consistent(disk, model, f"{ctx} after reopen #{nflush}")
    disk.flush()
    assert_exact(disk, model, ctx + " final flush")
    st = disk.stats()
    assert st.space.threaded_segments + st.lifetime.cleaning_runs > 0 or nflush < 10, \
        f"{ctx}: the workload never reached threaded logging or cleaning: {brief_stats(disk)}"
    check_reads(disk, model, ctx + " final")
    assert_rit_consistent(disk, model, ctx + " final")
    disk = reopen(disk, data, meta)
    assert_exact(disk, model, ctx + " final reopen")
    assert_rit_consistent(disk, model, ctx + " final reopen")
    check_reads(disk, model, ctx + " final reopen")
    disk.close()


def _overwrite_fraction(disk, model, lo: int, nblocks_over: int, ver: int, rng, run=8):
    """Overwrite `nblocks_over` blocks of [lo, lo+SEG) in runs of `run` (random places)."""
    picks = rng.sample(range(SEG // run), nblocks_over // run)
    for r in picks:
        a = lo + r * run
        disk.write(a, blocks(a, run, ver))
        model.write(a, run, ver)
    return picks


def test_cleaning_during_flush_moves_blocks_and_keeps_data():
    """A segment left 12% valid is cleaned by flush() when free segments reach the
    reserve: its blocks move (the index points elsewhere, the RIT names the LBA at the
    new place), it becomes free, and every read is unchanged, also after reopen."""
    rng = random.Random(21)
    disk, data, meta = new_mem_disk(8, 5 * SEG, SMALL_CFG)
    model = VModel(5 * SEG)
    for a in range(0, 5 * SEG, SEG):
        disk.write(a, blocks(a, SEG, 1))
        model.write(a, SEG, 1)
        disk.flush()
    assert_exact(disk, model, "fill")
    where = {l: hba_of(disk, l) for l in range(SEG)}
    victim = where[0] // SEG
    assert all(h // SEG == victim for h in where.values()), "LBAs 0..1023 not in one segment"
    picks = _overwrite_fraction(disk, model, 0, 896, 2, rng)
    over = {r * 8 + i for r in picks for i in range(8)}
    runs0 = disk.stats().lifetime.cleaning_runs
    disk.flush()
    st = disk.stats()
    assert st.lifetime.cleaning_runs > runs0 and st.lifetime.blocks_moved >= SEG - 896, \
        f"flush with free segments at the reserve did not clean: {brief_stats(disk)}"
    sp = disk.debug.space
    assert sp.seg_valid[victim] == 0, f"victim segment {victim} still has valid blocks"
    for l in range(SEG):
        if l in over:
            continue
        h2 = hba_of(disk, l)
        assert h2 != where[l] and h2 // SEG != victim, f"LBA {l} was not moved off the victim"
        assert bool(sp.valid[h2]) and int(sp.rit[h2]) == l, \
            f"LBA {l} moved to {h2} but DST/RIT say valid={sp.valid[h2]} rit={sp.rit[h2]}"
    assert_exact(disk, model, "after cleaning")
    check_reads(disk, model, "after cleaning")
    disk = reopen(disk, data, meta)
    assert_exact(disk, model, "after cleaning + reopen")
    check_reads(disk, model, "after cleaning + reopen")
    assert disk.debug.space.seg_valid[victim] == 0
    disk.close()


# ==========================================================================================
# Discard frees space
# ==========================================================================================

def test_discard_frees_space():
    """Write N blocks (3 whole segments), flush, discard them, flush: valid_blocks drops
    by exactly N, the segments become free (all of them once the log head moves on or
    after reopen), and the LBAs read as zeros."""
    disk, data, meta = new_mem_disk(8, 6 * SEG, SMALL_CFG)
    model = VModel(6 * SEG)
    for a in range(0, 4 * SEG, SEG):
        disk.write(a, blocks(a, SEG, 1))
        model.write(a, SEG, 1)
        disk.flush()
    st0 = disk.stats()
    n = 3 * SEG
    disk.discard(SEG, n)
    model.discard(SEG, n)
    disk.flush()
    st1 = disk.stats()
    assert st1.space.valid_blocks == st0.space.valid_blocks - n, \
        f"valid_blocks {st0.space.valid_blocks} -> {st1.space.valid_blocks} after discarding {n}"
    assert st1.space.free_segments >= st0.space.free_segments + 2, \
        f"free_segments {st0.space.free_segments} -> {st1.space.free_segments} after discarding " \
        f"3 whole segments"
    assert_exact(disk, model, "after discard")
    check_reads(disk, model, "after discard")
    disk = reopen(disk, data, meta)
    st2 = disk.stats()
    assert st2.space.free_segments == 8 - 1, \
        f"after reopen {st2.space.free_segments} free segments, expected 7 (one holds data)"
    assert_exact(disk, model, "after discard + reopen")
    check_reads(disk, model, "after discard + reopen")
    disk.close()


def test_partial_discard_space_comes_back_by_cleaning():
    """Discard 3 of every 4 blocks of two segments: their space comes back as free
    segments through background_step() (or flush) cleaning; reads unchanged."""
    disk, data, meta = new_mem_disk(8, 6 * SEG, SMALL_CFG)
    model = VModel(6 * SEG)
    for a in range(0, 4 * SEG, SEG):
        disk.write(a, blocks(a, SEG, 1))
        model.write(a, SEG, 1)
        disk.flush()
    for a in range(0, 2 * SEG, 4):
        disk.discard(a + 1, 3)
        model.discard(a + 1, 3)
    disk.flush()
    st0 = disk.stats()
    assert st0.space.valid_blocks == 2 * SEG + SEG // 2, st0.space.valid_blocks
    for _ in range(8):
        if not disk.background_step():
            break
    disk.flush()
    st1 = disk.stats()
    assert st1.space.free_segments >= st0.space.free_segments + 1 and st1.lifetime.blocks_moved > 0, \
        f"discarded space did not come back: before {st0.space.free_segments} free segments, " \
        f"after {st1.space.free_segments}; {brief_stats(disk)}"
    assert_exact(disk, model, "after cleaning discarded segments")
    check_reads(disk, model, "after cleaning discarded segments")
    disk = reopen(disk, data, meta)
    check_reads(disk, model, "reopen")
    disk.close()


# ==========================================================================================
# background_step()
# ==========================================================================================

def _bg_disk(nr=5 * SEG, seed=31, victims=1):
    """Fill 5 segments; overwrite 752 of the 1024 blocks of `victims` of them (a hot
    region), flush. 9 + victims data segments: free segments end between reserve+2 and
    reserve+3, so flush() does not clean but background_step() has victims at 27%."""
    rng = random.Random(seed)
    disk, data, meta = new_mem_disk(9 + victims, nr, SMALL_CFG)
    model = VModel(nr)
    for a in range(0, nr, SEG):
        disk.write(a, blocks(a, SEG, 1))
        model.write(a, SEG, 1)
        disk.flush()
    ver = 2
    for v in range(victims):
        _overwrite_fraction(disk, model, v * SEG, 752, ver, rng)
        ver += 1
        disk.flush()
    st = disk.stats()
    assert st.lifetime.cleaning_runs == 0, f"precondition: flush already cleaned: {brief_stats(disk)}"
    return disk, data, meta, model, ver


def test_background_step_refuses_with_pending_data():
    disk, data, meta, model, ver = _bg_disk()
    disk.write(5, blocks(5, 1, 99))
    model.write(5, 1, 99)
    st = disk.stats()
    assert disk.background_step() is False, "background_step ran with unflushed writes"
    st2 = disk.stats()
    assert (st2.lifetime.cleaning_runs, st2.lifetime.commits, st2.pending_ops, st2.buffered_blocks) == \
        (st.lifetime.cleaning_runs, st.lifetime.commits, st.pending_ops, st.buffered_blocks), \
        "background_step changed state although it returned False"
    disk.flush()
    disk.discard(7, 3)
    model.discard(7, 3)
    assert disk.background_step() is False, "background_step ran with an unflushed discard"
    disk.flush()
    check_reads(disk, model, "after refused background steps")
    disk.close()


def test_background_step_reclaims_low_utilisation_segments():
    """Repeated calls with free segments low raise free_segments, each call does at most
    one segment's work, reads never change, exactness holds; it stops (False) when
    nothing is left to do."""
    disk, data, meta, model, ver = _bg_disk(victims=2)
    st0 = disk.stats()
    low = int((disk.debug.space.seg_valid[disk.debug.space.seg_valid > 0] <= 0.35 * SEG).sum())
    assert low >= 1 and st0.space.free_segments < st0.space.reserve_segments + 4, \
        f"precondition: low-utilisation segments {low}, free {st0.space.free_segments}"
    prev = st0
    true_calls = 0
    for i in range(20):
        did = disk.background_step()
        st = disk.stats()
        assert st.lifetime.cleaning_runs - prev.lifetime.cleaning_runs <= 1, \
            f"call {i}: more than one segment cleaned in one background_step"
        assert st.lifetime.blocks_moved - prev.lifetime.blocks_moved <= SEG, \
            f"call {i}: moved {st.lifetime.blocks_moved - prev.lifetime.blocks_moved} blocks (> a segment)"
        assert st.pending_ops == 0 and st.buffered_blocks == 0, \
            f"call {i}: background_step left uncommitted work behind"
        assert_exact(disk, model, f"background_step call {i}")
        check_reads(disk, model, f"background_step call {i}")
        prev = st
        if not did:
            break
        true_calls += 1
    else:
        pytest.fail("background_step kept returning True for 20 calls")
    assert true_calls >= 1 and prev.space.free_segments > st0.space.free_segments, \
        f"free segments {st0.space.free_segments} -> {prev.space.free_segments} after " \
        f"{true_calls} background steps"
    disk = reopen(disk, data, meta)
    assert_exact(disk, model, "reopen after background steps")
    check_reads(disk, model, "reopen after background steps")
    disk.close()


# ==========================================================================================
# Thin disk and ENOSPC
# ==========================================================================================

THIN_SEGS = 8
THIN_NR = THIN_SEGS * SEG


def _thin_fill_discard_overwrite(rng, rounds=3):
    """Thin disk: fill 90%, discard half (every other 64-block run), overwrite the rest
    for `rounds` x the data device with flushes every <= 512 blocks."""
    disk, data, meta = new_mem_disk(THIN_SEGS, THIN_NR, SMALL_CFG)
    model = VModel(THIN_NR)
    ver = 1
    fill = int(THIN_NR * 0.9)
    for a in range(0, fill, 512):
        n = min(512, fill - a)
        disk.write(a, blocks(a, n, ver))
        model.write(a, n, ver)
        disk.flush()
    assert_exact(disk, model, "thin: filled 90%")
    for a in range(0, fill, 128):
        n = min(64, fill - a)
        disk.discard(a, n)
        model.discard(a, n)
    disk.flush()
    assert_exact(disk, model, "thin: discarded half")
    live = sorted(model.vers)
    written = since = 0
    while written < rounds * THIN_NR:
        l = rng.choice(live)
        n = min(rng.randint(1, 16), THIN_NR - l)
        ver += 1
        disk.write(l, blocks(l, n, ver))
        model.write(l, n, ver)
        written += n
        since += n
        if since >= 384:
            disk.flush()
            since = 0
            assert_exact(disk, model, f"thin: overwriting, {written} blocks")
    disk.flush()
    assert_exact(disk, model, "thin: after overwriting")
    check_reads(disk, model, "thin: after overwriting")
    return disk, data, meta, model, ver


def _fill_until_enospc(disk, model, ver, rng, batch=256):
    """Write fresh LBAs, then overwrite at random, flushing every `batch` blocks, until
    NoSpaceError. Returns (error, where, committed model, LBAs touched since the last
    successful flush -> versions written since, ver)."""
    committed = model.copy()
    touched: dict[int, list[int]] = {}
    fresh = [l for l in range(THIN_NR) if l not in model.vers]
    i = 0
    limit = THIN_NR * 4
    while i < limit:
        l = fresh[i] if i < len(fresh) else rng.randrange(THIN_NR)
        i += 1
        ver += 1
        try:
            disk.write(l, block(l, ver))
        except NoSpaceError as e:
            return e, "write", committed, touched, ver
        model.write(l, 1, ver)
        touched.setdefault(l, []).append(ver)
        if i % batch == 0:
            try:
                disk.flush()
            except NoSpaceError as e:
                return e, "flush", committed, touched, ver
            committed = model.copy()
            touched = {}
            assert_exact(disk, model, f"thin: filling beyond, {i} writes")
    pytest.fail(f"no NoSpaceError after {limit} one-block writes on a full thin disk "
                f"({brief_stats(disk)})")


def _check_after_enospc(disk, committed: VModel, touched: dict, ctx: str):
    """LBAs untouched since the last successful flush read exactly as committed; touched
    ones read as committed or as one of the versions written since."""
    for a in range(0, THIN_NR, 256):
        got = disk.read(a, 256)
        for j in range(256):
            l = a + j
            g = got[j * BS:(j + 1) * BS]
            ok = [committed.get(l)] + [block(l, v) for v in touched.get(l, [])]
            assert g in ok, (f"{ctx}: lba {l} reads {describe(g)}, expected "
                             f"{describe(ok[0])}" + (" or a version written since the last "
                                                     "flush" if len(ok) > 1 else ""))


def test_thin_disk_works_then_enospc_keeps_flushed_data():
    """Logical size == data device. Fill 90%, discard half, keep overwriting (works);
    then fill beyond what fits: NoSpaceError (ENOSPC), and everything flushed before is
    still readable, also after reopen; the reopened disk works after freeing space."""
    rng = random.Random(41)
    disk, data, meta, model, ver = _thin_fill_discard_overwrite(rng)
    err, where, committed, touched, ver = _fill_until_enospc(disk, model, ver, rng)
    assert err.errno == errno.ENOSPC, f"NoSpaceError with errno {err.errno}"
    assert isinstance(err, OSError)
    _check_after_enospc(disk, committed, touched, f"thin: after ENOSPC in {where}")
    # reopen from the devices as they are: a crash at this point shows the last flushed
    # state, or the state at the early commit the engine made when space ran out (every
    # write before the failing one: a prefix of the write history)
    _ZOMBIES.append(disk)
    disk2 = SwornDisk.open(data, meta, KEY16)
    after = committed.copy()
    for l, vs in touched.items():
        after.write(l, 1, vs[-1])
    states = [committed, after]
    alive = matching(disk2, states, f"thin: reopen after ENOSPC in {where}")
    shown = states[alive[0]]
    assert_exact(disk2, shown, "thin: reopen after ENOSPC")
    # free a quarter of the disk: writing works again
    disk2.discard(0, THIN_NR // 4)
    shown.discard(0, THIN_NR // 4)
    disk2.flush()
    assert_exact(disk2, shown, "thin: discard after ENOSPC")
    ver = _write_flushed_runs(disk2, shown, 0, THIN_NR // 8, ver)
    assert_exact(disk2, shown, "thin: writes after ENOSPC + discard")
    disk2 = reopen(disk2, data, meta)
    check_reads(disk2, shown, "thin: final reopen")
    disk2.close()


def _write_flushed_runs(disk, shown, lo: int, hi: int, ver: int) -> int:
    """Writes [lo, hi) in 256-block runs, each a new version and flushed; returns the last
    version used."""
    for a in range(lo, hi, 256):
        ver += 1
        disk.write(a, blocks(a, 256, ver))
        shown.write(a, 256, ver)
        disk.flush()
    return ver


def test_enospc_leaves_no_space_leaked():
    """After NoSpaceError the same instance recovers once space is freed: discard what
    was written since the last flush and a quarter of the disk, flush: the flush works
    and the accounting is exact again (the failed allocation must not leave blocks
    'busy' forever), and new writes succeed."""
    rng = random.Random(42)
    disk, data, meta, model, ver = _thin_fill_discard_overwrite(rng, rounds=1)
    err, where, committed, touched, ver = _fill_until_enospc(disk, model, ver, rng)
    assert err.errno == errno.ENOSPC
    shown = committed.copy()
    for l in touched:                     # the unflushed writes are dropped by discard
        disk.discard(l, 1)
        shown.discard(l, 1)
    disk.discard(THIN_NR // 2, THIN_NR // 4)
    shown.discard(THIN_NR // 2, THIN_NR // 4)
    try:
        disk.flush()
    except NoSpaceError as e:
        pytest.fail(f"flush of discards after ENOSPC (in {where}) raised NoSpaceError: {e}")
    assert_exact(disk, shown, f"after ENOSPC in {where}, discard and flush")
    check_reads(disk, shown, "after ENOSPC + discard")
    ver = _write_flushed_runs(disk, shown, THIN_NR // 2, THIN_NR // 2 + THIN_NR // 8, ver)
    assert_exact(disk, shown, "writes after ENOSPC recovery")
    disk = reopen(disk, data, meta)
    check_reads(disk, shown, "reopen after ENOSPC recovery")
    disk.close()


def test_flush_of_discards_on_full_disk_never_enospc():
    """A full thin disk; discard most of one segment and a little of another, flush. The
    flush needs no space, so it must not raise NoSpaceError -- even if the cleaning it
    triggers cannot place the victim's blocks -- and must not leak space."""
    disk, data, meta = new_mem_disk(THIN_SEGS, THIN_NR, SMALL_CFG)
    model = VModel(THIN_NR)
    for a in range(0, THIN_NR, 512):
        disk.write(a, blocks(a, 512, 1))
        model.write(a, 512, 1)
        disk.flush()
    assert_exact(disk, model, "full thin disk")
    disk.discard(120, SEG - 120)          # segment 0 keeps 120 valid blocks (< 15%)
    model.discard(120, SEG - 120)
    disk.discard(SEG, 100)                # only 100 free blocks elsewhere
    model.discard(SEG, 100)
    try:
        disk.flush()
    except NoSpaceError as e:
        pytest.fail(f"flush() of discards only raised NoSpaceError: {e} "
                    f"(stats: {brief_stats(disk)}, busy blocks "
                    f"{int(disk.debug.space.seg_busy.sum())})")
    assert_exact(disk, model, "after discard flush on a full disk")
    disk.flush()                          # and again: nothing pending, must not fail
    check_reads(disk, model, "after discard flush on a full disk")
    for a in range(120, 520, 100):        # the discarded space is usable
        disk.write(a, blocks(a, 100, 2))
        model.write(a, 100, 2)
        disk.flush()
    assert_exact(disk, model, "writes into discarded space")
    disk = reopen(disk, data, meta)
    check_reads(disk, model, "reopen")
    disk.close()


def test_flush_never_enospc_after_write_accepted_head_holes():
    """write() refuses with ENOSPC up front, so that whatever it accepted can always be
    sealed by the next flush. Corner case: the only free blocks are in the current log
    head segment, half of them behind the head's offset (freed after the head passed
    them). Deterministic: full thin disk; discard 64 blocks of one segment; write 32 of
    them (the threaded head fills the hole's first half); discard those 32 again; write
    all 64. free_blocks says 64, so write() accepts; flush() must then place them."""
    disk, data, meta = new_mem_disk(THIN_SEGS, THIN_NR, SMALL_CFG)
    model = VModel(THIN_NR)
    for a in range(0, THIN_NR, 512):
        disk.write(a, blocks(a, 512, 1))
        model.write(a, 512, 1)
        disk.flush()
    a = 3 * SEG
    disk.discard(a, 64)
    model.discard(a, 64)
    disk.flush()
    disk.write(a, blocks(a, 32, 2))
    model.write(a, 32, 2)
    disk.flush()
    disk.discard(a, 32)
    model.discard(a, 32)
    disk.flush()
    assert_exact(disk, model, "before the 64-block write")
    try:
        disk.write(a, blocks(a, 64, 3))
    except NoSpaceError:
        pass                                   # refusing up front is fine
    else:
        model.write(a, 64, 3)
        try:
            disk.flush()
        except NoSpaceError as e:
            pytest.fail(f"write() accepted 64 blocks with {64} free, then flush() raised "
                        f"NoSpaceError: {e} (heads at {disk.debug.space.head_segments()})")
    assert_exact(disk, model, "after the 64-block write")
    check_reads(disk, model, "after the 64-block write")
    disk = reopen(disk, data, meta)
    check_reads(disk, model, "reopen")
    disk.close()


@pytest.mark.parametrize("seed", [91, 96])
def test_full_thin_disk_random_edge_flush_never_enospc(seed):
    """A thin disk kept at the edge of full: random writes (fresh and overwrites, 1-16
    blocks) and discards, flushes every few operations. Its logical size is exactly the
    data device, so live data always fits and neither write() nor flush() may raise
    ENOSPC (the engine commits early instead); the accounting is exact after every flush
    and reads match the model."""
    rng = random.Random(seed)
    disk, data, meta = new_mem_disk(THIN_SEGS, THIN_NR, SMALL_CFG)
    model = VModel(THIN_NR)
    for a in range(0, THIN_NR - 256, 512):
        n = min(512, THIN_NR - 256 - a)
        disk.write(a, blocks(a, n, 1))
        model.write(a, n, 1)
        disk.flush()
    ver = 1
    enospc = flushes = 0
    edge = THIN_NR
    for step in range(3000):
        edge = min(edge, disk.debug.space.free_blocks())
        r = rng.random()
        if r < 0.75:
            n = rng.randint(1, 16)
            lba = rng.randrange(THIN_NR - n + 1)
            for _ in range(30):              # mostly fresh LBAs: the live data grows
                if lba not in model.vers or rng.random() < 0.3:
                    break
                lba = rng.randrange(THIN_NR - n + 1)
            ver += 1
            try:
                disk.write(lba, blocks(lba, n, ver))
            except NoSpaceError as e:
                assert e.errno == errno.ENOSPC
                enospc += 1
                # write() refused: nothing of it may be visible
                check_reads(disk, model, f"step {step}: after a refused write",
                            lbas=range(lba, lba + n))
                k = rng.randint(16, 128)
                a = rng.randrange(THIN_NR - k + 1)
                disk.discard(a, k)
                model.discard(a, k)
                continue
            model.write(lba, n, ver)
        elif r < 0.78:
            k = rng.randint(1, 24)
            a = rng.randrange(THIN_NR - k + 1)
            disk.discard(a, k)
            model.discard(a, k)
        elif r < 0.88:
            try:
                disk.flush()
            except NoSpaceError as e:
                pytest.fail(f"seed {seed} step {step}: flush() raised NoSpaceError after write() had "
                            f"accepted the data: {e} ({brief_stats(disk)}; head segment "
                            f"{disk.debug.space.head_segments()})")
            flushes += 1
            assert_exact(disk, model, f"edge step {step}")
            if flushes % 40 == 0:
                check_reads(disk, model, f"edge step {step}")
        else:
            # a large write: the batch needs room for old and new versions until the flush
            n = rng.randint(32, 200)
            lba = rng.randrange(THIN_NR - n + 1)
            ver += 1
            try:
                disk.write(lba, blocks(lba, n, ver))
            except NoSpaceError:
                enospc += 1
                check_reads(disk, model, f"step {step}: after a refused write",
                            lbas=range(lba, lba + n))
                continue
            model.write(lba, n, ver)
    disk.flush()
    assert enospc == 0, "ENOSPC on a disk whose live data always fits"
    assert edge < SEG, f"the workload never came within a segment of full (min free {edge})"
    check_reads(disk, model, "edge final")
    disk = reopen(disk, data, meta)
    assert_exact(disk, model, "edge final reopen")
    check_reads(disk, model, "edge final reopen")
    disk.close()


# ==========================================================================================
# Crashes inside cleaning
# ==========================================================================================

CR_CFG = Config(memtable_records=1024, level_ratio=4)
_CR_BASES: dict = {}


def _crash_disk(segs: int, nr: int):
    ctrl, data, meta = crash_pair(segs * SEG_BYTES, meta_size_for(segs * SEG_BYTES, nr, CR_CFG))
    disk = SwornDisk.create(data, meta, KEY16, nr_blocks=nr, config=CR_CFG)
    return ctrl, data, meta, disk


def _prog_writes(rng, lo: int, nruns: int, ver: int, run: int = 8):
    return [(lo + r * run, run, ver) for r in rng.sample(range(SEG // run), nruns)]


def _flush_base():
    """8 segments, 6 of them full; segments 1 and 2 have 480 holes each, 3-5 64 in all
    (in runs of 8).
    The program then overwrites 896 blocks of segment 0 and flushes: free segments being
    at the reserve, the writes fill holes (threaded logging); the commit leaves segment 0
    12.5% valid and the same flush cleans it, moving its 128 blocks into the remaining
    scattered holes (many device writes); that commit fills the MemTable: checkpoint."""
    if "flush" in _CR_BASES:
        return _CR_BASES["flush"]
    rng = random.Random(51)
    nr = 6 * SEG
    ctrl, data, meta, disk = _crash_disk(8, nr)
    model = VModel(nr)
    for a in range(0, nr, SEG):
        disk.write(a, blocks(a, SEG, 1))
        model.write(a, SEG, 1)
        disk.flush()
    hole_writes = _prog_writes(rng, SEG, 60, 2) + _prog_writes(rng, 2 * SEG, 60, 2)
    hole_writes += [(a + 3 * SEG, n, v) for a, n, v in _prog_writes(rng, 0, 8, 2)]
    for a, n, v in hole_writes:
        disk.write(a, blocks(a, n, v))
        model.write(a, n, v)
    disk.flush()       # 1024 records: checkpoints, so the cleaning commit checkpoints next
    assert disk.stats().lifetime.cleaning_runs == 0
    _ZOMBIES.append(disk)
    prog = _prog_writes(rng, 0, 112, 3)
    post = model.copy()
    for a, n, v in prog:
        post.write(a, n, v)
    res = (ctrl, data, meta, ctrl.images(), model, post, prog)
    _CR_BASES["flush"] = res
    return res


def _run_prog(disk, prog):
    for a, n, v in prog:
        disk.write(a, blocks(a, n, v))


def _instrument_cleaner(disk, ctrl, marks: list):
    """Record the device-op count at which each cleaning starts (test-side wrapper)."""
    orig = disk.debug.cleaner.clean

    def clean(victim):
        marks.append(ctrl.ops)
        return orig(victim)
    disk.debug.cleaner.clean = clean


def _open(data, meta, ctx):
    try:
        return SwornDisk.open(data, meta, KEY16)
    except Exception as e:
        raise AssertionError(f"{ctx}: open after an honest crash raised "
                             f"{type(e).__name__}: {e}") from e


def _sweep(ctrl, data, meta, images, action, states, ks, label, reopen_every=3):
    """For each k: from `images`, open, arm a crash at the (k+1)-th device op, run
    `action(disk)`; recover; the disk must read as one of `states` (every LBA), and a
    second open (after a clean close) must show the same state."""
    modes = CrashController.KEEP_MODES
    crashed = 0
    for i, k in enumerate(ks):
        keep = modes[i % len(modes)]
        rng = random.Random(k * 7919 + i)
        ctrl.load(images)
        disk = SwornDisk.open(data, meta, KEY16)
        _ZOMBIES.append(disk)
        ctrl.arm(k, rng, keep)
        err = None
        try:
            action(disk)
        except (OSError, SwornDiskError) as e:
            err = e
        if ctrl.crashed:
            crashed += 1
            assert err is not None, f"{label} k={k}: the device crashed but the call succeeded"
        else:
            assert err is None, f"{label} k={k}: failed without a crash: {err!r}"
            ctrl.crash(rng, keep)
        ctx = f"{label} k={k} keep={keep} [{ctrl.crash_info}]"
        ctrl.revive()
        d2 = _open(data, meta, ctx)
        alive = matching(d2, states, ctx)
        if i % reopen_every == 0:
            shown = states[alive[0]]
            assert_exact(d2, shown, ctx + " after recovery")
            d2.close()
            d3 = _open(data, meta, ctx + " (second open)")
            matching(d3, [shown], ctx + " (second open)")
            assert_rit_consistent(d3, shown, ctx + " (second open)")
            d3.close()
        else:
            _ZOMBIES.append(d2)
    return crashed


def _sample_ks(start: int, end: int, want: int) -> list[int]:
    if end <= start:
        return []
    step = max(1, (end - start) // want)
    return list(range(start, end, step))


def test_crash_during_flush_that_cleans():
    """Crash at many device operations of a flush whose commit triggers cleaning (user
    segment writes, threaded hole fills, journal, checkpoint, then migration into
    scattered holes, its journal commit and checkpoint): after recovery the disk reads
    exactly as before or after the flush, and a second open agrees."""
    ctrl, data, meta, images, pre, post, prog = _flush_base()
    ctrl.load(images)
    disk = SwornDisk.open(data, meta, KEY16)
    _ZOMBIES.append(disk)
    _run_prog(disk, prog)
    ck0 = disk.stats().lifetime.checkpoints
    marks: list = []
    _instrument_cleaner(disk, ctrl, marks)
    ctrl.reset_count()
    disk.flush()
    total = ctrl.ops
    st = disk.stats()
    assert marks and st.lifetime.cleaning_runs >= 1 and st.lifetime.blocks_moved >= 100, \
        f"precondition: the flush did not clean ({brief_stats(disk)})"
    c0 = marks[0]
    assert total - c0 >= 6, f"cleaning did only {total - c0} device ops"
    assert st.lifetime.checkpoints > ck0, "precondition: no checkpoint in the flush"
    check_reads(disk, post, "uncrashed flush with cleaning")
    # every op of the cleaning part, with several keep modes each (>= ~50 crashes there)
    reps = min(len(CrashController.KEEP_MODES), max(1, -(-50 // (total - c0))))
    ks = (_sample_ks(0, c0, 12)
          + [k for k in range(c0, total) for _ in range(reps)] + [total + 3])
    crashed = _sweep(ctrl, data, meta, images, lambda d: (_run_prog(d, prog), d.flush()),
                     [pre, post], ks, "crash in flush+cleaning")
    assert crashed >= min(len(ks) - 1, 50), crashed
    print(f"\n[crash in flush+cleaning] {len(ks)} crash points, {total} device ops "
          f"(cleaning from op {c0}), {crashed} crashed mid-flush")


def _bg_base():
    """10 segments; segment 0 left 27% valid by a hot-region overwrite; free segments
    one above flush()'s cleaning threshold: background_step() has work."""
    if "bg" in _CR_BASES:
        return _CR_BASES["bg"]
    rng = random.Random(61)
    nr = 5 * SEG
    ctrl, data, meta, disk = _crash_disk(10, nr)
    model = VModel(nr)
    for a in range(0, nr, SEG):
        disk.write(a, blocks(a, SEG, 1))
        model.write(a, SEG, 1)
        disk.flush()
    for a, n, v in _prog_writes(rng, 0, 94, 2):
        disk.write(a, blocks(a, n, v))
        model.write(a, n, v)
    disk.flush()
    st = disk.stats()
    assert st.lifetime.cleaning_runs == 0 and st.space.free_segments < st.space.reserve_segments + 4, st
    _ZOMBIES.append(disk)
    res = (ctrl, data, meta, ctrl.images(), model)
    _CR_BASES["bg"] = res
    return res


def _bg_until_done(disk):
    for _ in range(4):
        if not disk.background_step():
            break


def test_crash_during_background_step():
    """Crash at every device operation of background cleaning (victim read, migration
    writes, data flush, journal commit, checkpoint), with every keep mode: recovery
    shows exactly the last flushed state (cleaning never changes it)."""
    ctrl, data, meta, images, model = _bg_base()
    ctrl.load(images)
    disk = SwornDisk.open(data, meta, KEY16)
    _ZOMBIES.append(disk)
    ctrl.reset_count()
    victim = hba_of(disk, next(l for l in range(SEG) if model.vers[l] == 1)) // SEG
    _bg_until_done(disk)
    total = ctrl.ops
    st = disk.stats()
    assert st.lifetime.cleaning_runs >= 1 and disk.debug.space.seg_valid[victim] == 0, \
        f"precondition: background_step did not clean ({brief_stats(disk)})"
    check_reads(disk, model, "uncrashed background cleaning")
    modes = len(CrashController.KEEP_MODES)
    reps = max(1, -(-50 // max(1, total)))
    ks = [k for k in range(total) for _ in range(min(reps, modes))] + [total + 2]
    crashed = _sweep(ctrl, data, meta, images, _bg_until_done, [model], ks,
                     "crash in background_step")
    assert crashed >= len(ks) - 1, (crashed, len(ks))
    print(f"\n[crash in background_step] {total} device ops, {len(ks)} crash points")


def test_crash_while_reusing_a_cleaned_segment():
    """After a cleaning flush, new writes reuse the freed victim segment; crash at many
    points of the flush that commits them: the moved blocks (whose old copies are being
    overwritten) and everything else read as before or after that flush."""
    ctrl, data, meta, images0, pre, post, prog = _flush_base()
    ctrl.load(images0)
    disk = SwornDisk.open(data, meta, KEY16)
    _ZOMBIES.append(disk)
    _run_prog(disk, prog)
    victim = hba_of(disk, next(l for l in range(SEG) if post.vers[l] == 1)) // SEG
    disk.flush()
    assert disk.stats().lifetime.cleaning_runs >= 1
    assert disk.debug.space.seg_valid[victim] == 0, "precondition: the victim was not freed"
    images = ctrl.images()
    rng = random.Random(71)
    prog2 = []
    post2 = post.copy()
    for _ in range(3):
        prog2 += _prog_writes(rng, 3 * SEG, 48, 4)   # cold data elsewhere, 3 x 384 blocks
    for a, n, v in prog2:
        post2.write(a, n, v)
    ctrl.load(images)
    disk = SwornDisk.open(data, meta, KEY16)
    _ZOMBIES.append(disk)
    _run_prog(disk, prog2)
    ctrl.log = []
    ctrl.reset_count()
    disk.flush()
    log, ctrl.log = ctrl.log, None
    total = ctrl.ops
    lo, hi = victim * SEG_BYTES, (victim + 1) * SEG_BYTES
    assert any(dev == "data" and op == "write" and lo <= off < hi for dev, op, off, _ in log), \
        f"precondition: the flush wrote nothing into the freed victim segment {victim}"
    check_reads(disk, post2, "uncrashed reuse")
    ks = _sample_ks(0, total, 25) + [total + 1]
    crashed = _sweep(ctrl, data, meta, images, lambda d: (_run_prog(d, prog2), d.flush()),
                     [post, post2], ks, "crash while reusing the cleaned segment")
    assert crashed >= len(ks) - 1


# ==========================================================================================
# Tamper / replay around migration
# ==========================================================================================

def _migrated_disk(data_dev=None):
    """8 segments; LBAs 0..1023 first written (v1) then rewritten (v2) -- the v1 copies are
    stale ciphertexts -- then 896 of them overwritten (v3) so that their segment is 12%
    valid and the next flush migrates the 128 survivors.
    Returns disk, data, meta, model, survivors {lba: (old hba, old ciphertext)},
    stale {lba: v1 ciphertext}, the data image before the cleaning flush."""
    rng = random.Random(81)
    nr = 5 * SEG
    data = data_dev if data_dev is not None else MemoryDevice(8 * SEG_BYTES)
    meta = MemoryDevice(meta_size_for(8 * SEG_BYTES, nr, SMALL_CFG))
    disk = SwornDisk.create(data, meta, KEY16, nr_blocks=nr, config=SMALL_CFG)
    model = VModel(nr)
    raw = data.inner if hasattr(data, "inner") else data
    disk.write(0, blocks(0, SEG, 1))
    disk.flush()
    stale = {l: bytes(raw.buf[hba_of(disk, l) * BS:(hba_of(disk, l) + 1) * BS])
             for l in range(SEG)}
    for a in range(0, nr, SEG):
        disk.write(a, blocks(a, SEG, 2))
        model.write(a, SEG, 2)
        disk.flush()
    picks = _overwrite_fraction(disk, model, 0, 896, 3, rng)
    over = {r * 8 + i for r in picks for i in range(8)}
    survivors = {}
    for l in range(SEG):
        if l not in over:
            h = hba_of(disk, l)
            survivors[l] = (h, bytes(raw.buf[h * BS:(h + 1) * BS]))
    image = bytes(raw.buf)
    return disk, data, meta, model, survivors, stale, image, raw


def _right_or_eio(disk, model, ctx, lbas=None):
    """Reads each LBA alone: right data or IntegrityError. Returns the set that raised."""
    bad = set()
    for l in (range(model.nr_blocks) if lbas is None else lbas):
        try:
            got = disk.read(l, 1)
        except IntegrityError:
            bad.add(l)
            continue
        assert got == model.get(l), \
            f"{ctx}: lba {l} returned WRONG data {describe(got)}, expected {describe(model.get(l))}"
    return bad


def test_replay_of_migrated_blocks_old_copy():
    """After cleaning moved LBA l from h to h2 and h was reused: the old ciphertext
    written back at h, or over h2, or a stale version over h2, or the whole data device
    rolled back to before the cleaning: every read is right or IntegrityError (and the
    LBAs whose blocks were replaced do raise), also after reopen."""
    disk, data, meta, model, survivors, stale, pre_image, raw = _migrated_disk()
    disk.flush()                                   # commits the overwrite and cleans
    assert disk.stats().lifetime.cleaning_runs >= 1
    moved = {}
    for l, (h, ct) in survivors.items():
        h2 = hba_of(disk, l)
        assert h2 != h, f"precondition: LBA {l} was not migrated"
        moved[l] = (h, h2, ct)
    # reuse the old places: write until most of them hold other LBAs' blocks
    rng = random.Random(82)
    ver = 10
    sp = disk.debug.space
    for _ in range(12):
        if sum(bool(sp.valid[h]) for h, _, _ in moved.values()) > len(moved) // 2:
            break
        for a, n, v in _prog_writes(rng, 3 * SEG, 64, ver):
            disk.write(a, blocks(a, n, v))
            model.write(a, n, v)
        ver += 1
        disk.flush()
    reused = {h: int(sp.rit[h]) for h, _, _ in moved.values() if bool(sp.valid[h])}
    assert len(reused) > len(moved) // 2, f"precondition: only {len(reused)} old places reused"
    check_reads(disk, model, "after cleaning and reuse")
    good_image = bytes(raw.buf)
    disk.close()

    def attack(name, mutate, must_fail=()):
        raw.buf[:] = good_image
        mutate()
        d = SwornDisk.open(data, meta, KEY16)
        bad = _right_or_eio(d, model, name)
        missing = set(must_fail) - bad
        assert not missing, f"{name}: LBAs {sorted(missing)[:8]} read without IntegrityError"
        d.close()
        d = SwornDisk.open(data, meta, KEY16)      # and after reopen
        bad2 = _right_or_eio(d, model, name + " (reopen)")
        assert set(must_fail) <= bad2
        return bad

    def old_at_old():
        for h, h2, ct in moved.values():
            raw.buf[h * BS:(h + 1) * BS] = ct
    attack("old ciphertext replayed at its old place", old_at_old, must_fail=reused.values())

    def old_at_new():
        for h, h2, ct in moved.values():
            raw.buf[h2 * BS:(h2 + 1) * BS] = ct
    bad = attack("old ciphertext written over the new place", old_at_new)
    assert not bad, f"the moved ciphertext is the same block; reads failed for {sorted(bad)[:8]}"

    def stale_at_new():
        for l, (h, h2, ct) in moved.items():
            raw.buf[h2 * BS:(h2 + 1) * BS] = stale[l]
    attack("stale version of the LBA written over the new place", stale_at_new,
           must_fail=moved.keys())

    def rollback_data():
        raw.buf[:] = pre_image
    attack("data device rolled back to before the cleaning", rollback_data)
    raw.buf[:] = good_image


def test_corrupt_block_is_not_laundered_by_migration():
    """A survivor's ciphertext is corrupted on the device before the cleaning flush: the
    cleaner must not make it readable as anything else. Reads of that LBA raise
    IntegrityError afterwards (the flush itself may raise IntegrityError instead of
    moving it); every other LBA reads right; also after reopen."""
    disk, data, meta, model, survivors, stale, pre_image, raw = _migrated_disk()
    victim_l = sorted(survivors)[len(survivors) // 2]
    h, _ = survivors[victim_l]
    raw.buf[h * BS + 100] ^= 0x40
    try:
        disk.flush()
        flushed = True
    except IntegrityError:
        flushed = False
        _ZOMBIES.append(disk)
        disk = SwornDisk.open(data, meta, KEY16)
    if flushed:
        assert disk.stats().lifetime.cleaning_runs >= 1
        with pytest.raises(IntegrityError):
            disk.read(victim_l, 1)
        bad = _right_or_eio(disk, model, "after migrating a corrupted block")
        assert bad == {victim_l}, f"IntegrityError for {sorted(bad)[:8]}, expected {victim_l}"
        disk.close()
        disk = SwornDisk.open(data, meta, KEY16)
    # the user's overwrite committed before the cleaning started: the model holds either way
    bad = _right_or_eio(disk, model, "reopen after migrating a corrupted block")
    assert victim_l in bad, f"LBA {victim_l} (corrupted) read without IntegrityError"
    assert bad == {victim_l}, f"IntegrityError for {sorted(bad)[:8]}, expected {victim_l}"
    disk.close()


def test_tamper_during_migration_read():
    """An online adversary changes what the cleaner reads from the victim segment: one
    survivor replaced by its stale (older) ciphertext, one with a flipped byte. The
    cleaner verifies before it moves: those two are reported and left in place (where
    the device still holds them intact), so every LBA reads right, also after reopen."""
    mdata = MemoryDevice(8 * SEG_BYTES)
    state = {"armed": False, "hits": 0}
    tdev = TamperDevice(mdata)
    disk, data, meta, model, survivors, stale, pre_image, raw = _migrated_disk(tdev)
    ls = sorted(survivors)
    l_stale, l_flip = ls[3], ls[-4]
    h_stale, h_flip = survivors[l_stale][0], survivors[l_flip][0]
    victim = h_stale // SEG
    assert h_flip // SEG == victim

    def on_read(offset, buf):
        if not state["armed"] or len(buf) < SEG_BYTES or offset != victim * SEG_BYTES:
            return None
        b = bytearray(buf)
        o = (h_stale - victim * SEG) * BS
        b[o:o + BS] = stale[l_stale]
        o = (h_flip - victim * SEG) * BS
        b[o + 7] ^= 1
        state["hits"] += 1
        return bytes(b)
    tdev.on_read = on_read
    state["armed"] = True
    try:
        disk.flush()
        flushed = True
    except IntegrityError:
        flushed = False
    state["armed"] = False
    assert state["hits"] >= 1, "precondition: the cleaner did not read the victim segment"
    if not flushed:
        _ZOMBIES.append(disk)
        disk = SwornDisk.open(data, meta, KEY16)
    else:
        assert disk.stats().lifetime.cleaning_unverified_blocks == 2
        bad = _right_or_eio(disk, model, "after tampered migration")
        assert bad == set(), f"IntegrityError for {sorted(bad)[:8]}"
        disk.close()
        disk = SwornDisk.open(data, meta, KEY16)
        bad = _right_or_eio(disk, model, "reopen after tampered migration")
        assert bad == set(), f"IntegrityError for {sorted(bad)[:8]}"
    disk.close()
