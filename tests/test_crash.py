"""Crash consistency and flush atomicity (in the spirit of LevelDB's fault_injection_test).

The contract (paper §4 "Atomicity", §5.3.2): after a crash the disk reads exactly as it did
at the last completed flush() -- or, if a flush (or close) was in flight, exactly as
before or exactly as after that flush: never a mix, never a block of a completed flush
lost, never uncommitted data, and never an error on open for an honest crash. An honest
crash may lose or tear (at 4 KiB granularity) any write issued since the device's last
flush(), in any order (see crashdev.CrashDevice).

Crash points are device operations: `arm(after_ops=k)` crashes at the (k+1)-th
pwrite/flush/discard, so sweeping k over the operations of a workload crashes inside
data-segment writes, journal appends, minor and major compactions, checkpoints, and
inside recovery itself. Small MemTables (16 records, ratio 2) make every flush compact.
"""
from __future__ import annotations

import errno
import random

import pytest

from sworndisk import Config, SwornDisk, SwornDiskError

from .conftest import (BS, KEY16, MiB, Model, describe, make_blocks, meta_size_for, read_batch,
                       runs)
from .crashdev import CrashController, crash_pair

CFG = Config(memtable_records=16, level_ratio=2)
NR = 512
DATA_SIZE = 24 * MiB


# ---- workload programs -------------------------------------------------------------------

def gen_program(rng: random.Random, nops: int, flush_p: float, version0: int,
                end: str = "close", max_len: int = 6):
    """A list of ops: ("w", lba, data) / ("d", lba, n) / ("f",) / ("close",)."""
    ops = []
    v = version0
    for _ in range(nops):
        r = rng.random()
        if r < flush_p:
            ops.append(("f",))
        elif r < flush_p + 0.1:
            lba = rng.randrange(NR)
            ops.append(("d", lba, min(rng.randint(1, 8), NR - lba)))
        else:
            lba = rng.randrange(NR)
            n = min(rng.randint(1, max_len), NR - lba)
            v += 1
            ops.append(("w", lba, make_blocks(rng, lba, n, v)))
    if end == "close":
        ops.append(("close",))
    elif end == "flush":
        ops.append(("f",))
    return ops, v


class Outcome:
    def __init__(self, committed: Model):
        self.committed = committed.copy()
        self.current = committed.copy()
        self.failed_at = None       # index of the op that raised
        self.error = None
        self.in_flush = False

    def allowed(self) -> list[Model]:
        """The states the disk may be in after a crash at this point."""
        if self.in_flush:
            return [self.committed, self.current]
        return [self.committed]


def run_program(disk, ops, committed: Model) -> Outcome:
    out = Outcome(committed)
    for i, op in enumerate(ops):
        try:
            if op[0] == "w":
                disk.write(op[1], op[2])
            elif op[0] == "d":
                disk.discard(op[1], op[2])
            elif op[0] == "f":
                disk.flush()
            elif op[0] == "close":
                disk.close()
            elif op[0] == "bg":
                disk.background_step()      # the ublk target's idle hook (cleaning)
        except (OSError, SwornDiskError) as e:
            out.failed_at = i
            out.error = e
            out.in_flush = op[0] in ("f", "close")
            return out
        if op[0] == "w":
            out.current.write(op[1], op[2])
        elif op[0] == "d":
            out.current.discard(op[1], op[2])
        elif op[0] in ("f", "close"):
            out.committed = out.current.copy()
    return out


def matching_states(disk, states: list[Model], ctx: str, rng=None, lbas=None) -> list[int]:
    """Indices of the states that agree with every block read from the disk (default: all
    blocks written in any state, plus random ones); fails (with the first difference
    against each state) when none does."""
    nr = states[0].nr_blocks
    rng = rng or random.Random(0)
    if lbas is None:
        lbas = set()
        for s in states:
            lbas.update(s.blocks)
    lbas = set(lbas)
    lbas.update({0, nr - 1})
    lbas.update(rng.randrange(nr) for _ in range(24))
    alive = set(range(len(states)))
    diffs = {}
    spans = runs(lbas)
    for (start, count), got in zip(spans, read_batch(disk, spans, f"{ctx} (honest crash)")):
        for i in list(alive):
            exp = states[i].read(start, count)
            if exp != got:
                alive.discard(i)
                for j in range(count):
                    e = exp[j * BS:(j + 1) * BS]
                    g = got[j * BS:(j + 1) * BS]
                    if e != g:
                        diffs[i] = f"lba {start + j}: expected {describe(e)} got {describe(g)}"
                        break
        if not alive:
            names = ["pre-flush (last completed flush)", "post-flush (in-flight flush)"]
            detail = "; ".join(f"vs {names[i] if len(states) == 2 else 'last flush'}: {d}"
                               for i, d in sorted(diffs.items()))
            raise AssertionError(f"{ctx}: disk matches none of the allowed states: {detail}")
    return sorted(alive)


def rerun_with_crash(ctrl, images, data, meta, ops, base_model: Model, k: int, rng,
                     keep: str) -> tuple[Outcome, bool]:
    """Reruns `ops` from the saved images with a crash armed at device operation k (or, if
    the program finishes first, right after it); returns the outcome and whether the crash
    hit mid-program. The devices are revived, ready for recovery."""
    ctrl.load(images)
    disk = SwornDisk.open(data, meta, KEY16)
    ctrl.arm(k, rng, keep)
    out = run_program(disk, ops, base_model)
    midway = ctrl.crashed
    if not midway:
        ctrl.crash(rng, keep)
    ctrl.revive()
    return out, midway


def open_after_crash(data, meta, ctx: str):
    try:
        return SwornDisk.open(data, meta, KEY16)
    except Exception as e:
        raise AssertionError(f"{ctx}: open after an honest crash raised "
                             f"{type(e).__name__}: {e}") from e


# ---- base images -------------------------------------------------------------------------

_BASES = {}
# The engines that built the cached bases are abandoned without close (the next open is
# a crash recovery); they are kept referenced so that nothing of theirs ever runs again.
_ZOMBIES = []


def base_image(seed: int):
    """A disk with history (BITs on several levels, a few checkpoints) after a flush:
    (controller, data, meta, images, model, next version)."""
    if seed in _BASES:
        return _BASES[seed]
    rng = random.Random(1000 + seed)
    ctrl, data, meta = crash_pair(DATA_SIZE, meta_size_for(DATA_SIZE, NR, CFG))
    disk = SwornDisk.create(data, meta, KEY16, nr_blocks=NR, config=CFG)
    ops, v = gen_program(rng, 250, 0.12, 0, end="flush")
    out = run_program(disk, ops, Model(NR))
    assert out.failed_at is None, out.error
    stats = disk.stats()
    _ZOMBIES.append(disk)   # abandoned without close: the next open is a crash recovery
    res = (ctrl, data, meta, ctrl.images(), out.committed, v, stats)
    _BASES[seed] = res
    return res


def test_crashdev_semantics():
    """The crash harness itself: flushed writes survive, unflushed ones follow `keep`,
    torn writes keep a subset of 4 KiB blocks, an armed crash fails the (k+1)-th op and
    every later one until revive()."""
    ctrl, a, b = crash_pair(64 * BS, 16 * BS)
    a.pwrite(b"\1" * BS, 0)
    a.flush()
    a.pwrite(b"\2" * BS, 0)
    b.pwrite(b"\3" * 8 * BS, 0)
    assert a.pread(BS, 0) == b"\2" * BS            # reads see the volatile cache
    ctrl.crash(random.Random(0), "none")
    with pytest.raises(OSError) as ei:
        a.pread(BS, 0)
    assert ei.value.errno == errno.EIO
    ctrl.revive()
    assert a.pread(BS, 0) == b"\1" * BS and b.pread(8 * BS, 0) == bytes(8 * BS)
    b.pwrite(b"\4" * 8 * BS, 0)
    ctrl.crash(random.Random(1), "all")
    ctrl.revive()
    assert b.pread(8 * BS, 0) == b"\4" * 8 * BS
    torn = set()
    for seed in range(20):
        b.pwrite(b"\5" * 8 * BS, 0)
        ctrl.crash(random.Random(seed), "random")
        ctrl.revive()
        got = b.pread(8 * BS, 0)
        torn.add(tuple(got[i * BS] for i in range(8)))
        b.pwrite(b"\4" * 8 * BS, 0)
        b.flush()
    assert any(len(set(t)) == 2 for t in torn), "no torn multi-block write in 20 crashes"
    ctrl.arm(2, random.Random(0), "none")
    a.pwrite(b"\6" * BS, BS)
    a.flush()
    with pytest.raises(OSError):
        b.pwrite(b"\7" * BS, 0)
    with pytest.raises(OSError):
        a.flush()
    ctrl.revive()
    assert a.pread(BS, BS) == b"\6" * BS and b.pread(BS, 0) == b"\4" * BS


def test_base_has_history():
    """The base images really contain compacted BITs (else the crash tests are weak)."""
    *_, stats = base_image(0)
    assert stats.lifetime.minor_compactions > 0, stats
    assert stats.lifetime.major_compactions > 0, stats


# ---- the sweep ---------------------------------------------------------------------------

def _program_for(seed: int, v0: int, end: str):
    """~14 ops with at least one flush in the middle (so every program crosses a commit,
    which with 16-record MemTables usually compacts and checkpoints)."""
    rng = random.Random(seed)
    # every 4th program writes big requests: multi-block journal transactions (> ~66
    # records each) and long data-segment writes, so torn multi-block writes happen
    ops, v = gen_program(rng, 14, 0.2, v0, end=end, max_len=64 if seed % 4 == 0 else 8)
    if not any(op[0] == "f" for op in ops[:-1]):
        ops.insert(rng.randrange(3, 10), ("f",))
    return ops, v


def _count_ops(ctrl, data, meta, images, ops, committed):
    ctrl.load(images)
    disk = SwornDisk.open(data, meta, KEY16)
    ctrl.reset_count()
    out = run_program(disk, ops, committed)
    assert out.failed_at is None, f"program failed without a crash: {out.error!r}"
    return ctrl.ops, disk


SWEEP_GROUPS = 8
SEEDS_PER_GROUP = 13           # 8 x 13 = 104 program seeds, each crashed at every device op


COVERED = ("minor_compactions", "major_compactions", "checkpoints")   # lifetime counters


@pytest.mark.parametrize("group", range(SWEEP_GROUPS))
def test_crash_at_every_device_op(group):
    """For each program seed: a program of writes, discards and flushes ending in a close,
    a flush, or unflushed writes, run from a base disk with history; crash at EVERY
    device operation k of it (k = 0 .. total, then after the end), each crash keeping a
    random/none/all/prefix/per-write subset of the unflushed writes. After each crash the
    disk opens, reads as an allowed state, and works (write + close + open)."""
    ctrl, data, meta, images, base_model, v0, base_stats = base_image(group % 2)
    modes = CrashController.KEEP_MODES
    crashes = in_flush = 0
    covered = set()
    for i in range(SEEDS_PER_GROUP):
        pseed = 100 + group * SEEDS_PER_GROUP + i
        end = ("close", "flush", "none")[pseed % 3]
        ops, _ = _program_for(pseed, v0, end)
        total, cdisk = _count_ops(ctrl, data, meta, images, ops, base_model)
        if end != "close":
            cst = cdisk.stats().lifetime
            for key in COVERED:
                if getattr(cst, key) > getattr(base_stats.lifetime, key):
                    covered.add(key)
        assert total >= 4, f"the program did only {total} device operations"
        for k in list(range(total)) + [total + 5]:
            rng = random.Random(pseed * 100003 + k)
            keep = modes[(k + pseed) % len(modes)] if (k + pseed) % 3 else "random"
            out, midway = rerun_with_crash(ctrl, images, data, meta, ops, base_model, k, rng,
                                           keep)
            if not midway:
                # the program finished before op k: crashed after it, with nothing in flight
                assert out.failed_at is None, f"k={k}: op {out.failed_at} failed: {out.error!r}"
            else:
                assert out.failed_at is not None, \
                    (f"program {pseed} k={k}: the devices crashed but every disk call "
                     f"succeeded (an I/O error was swallowed and the op acknowledged)")
                assert isinstance(out.error, (OSError, SwornDiskError)), out.error
                crashes += 1
                in_flush += out.in_flush
            ctx = (f"program seed={pseed} base={group % 2} end={end} k={k}/{total} keep={keep} "
                   f"failed_op={out.failed_at}:"
                   f"{ops[out.failed_at][0] if out.failed_at is not None else '-'}"
                   f" [{ctrl.crash_info}]")
            disk2 = open_after_crash(data, meta, ctx)
            matching_states(disk2, out.allowed(), ctx, rng)
            if k % 4 == 0:
                # the recovered disk works: write, close, reopen
                blk = make_blocks(rng, 1, 1, 999_999)
                disk2.write(1, blk)
                disk2.close()
                disk3 = open_after_crash(data, meta, ctx + " (second open)")
                assert disk3.read(1, 1) == blk, f"{ctx}: write after recovery lost"
    assert crashes and in_flush, (crashes, in_flush)
    assert covered >= set(COVERED), \
        f"no program of group {group} crossed {set(COVERED) - covered}"


# ---- crashes while the data log is under space pressure (cleaning, threaded logging) ----

PNR = 4096
PCFG = Config(memtable_records=64, level_ratio=2)


def pressure_base():
    """24 MiB data device (6 segments, 2 reserved) holding 3000 valid blocks written in
    order: a flush after overwriting most of segment 0 must clean it (greedy, <= 15%
    valid) because only 3 segments are free."""
    if "pressure" in _BASES:
        return _BASES["pressure"]
    rng = random.Random(31337)
    ctrl, data, meta = crash_pair(DATA_SIZE, meta_size_for(DATA_SIZE, PNR, PCFG))
    disk = SwornDisk.create(data, meta, KEY16, nr_blocks=PNR, config=PCFG)
    model = Model(PNR)
    for lba in range(0, 3000, 16):
        buf = make_blocks(rng, lba, 16, 1)
        disk.write(lba, buf)
        model.write(lba, buf)
    disk.flush()
    _ZOMBIES.append(disk)
    res = (ctrl, data, meta, ctrl.images(), model, disk.stats())
    _BASES["pressure"] = res
    return res


def _pressure_program(seed: int):
    rng = random.Random(seed)
    ops = []
    chunks = list(range(0, 896, 64))
    rng.shuffle(chunks)
    for i, lba in enumerate(chunks):
        ops.append(("w", lba, make_blocks(rng, lba, 64, 2 + seed)))
        if rng.random() < 0.15:
            d = rng.randrange(1000, 2990)
            ops.append(("d", d, rng.randint(1, 8)))
    ops.append(("f",))
    for i in range(rng.randint(2, 6)):
        lba = rng.randrange(1024, 2990)
        ops.append(("w", lba, make_blocks(rng, lba, rng.randint(1, 8), 100 + seed * 10 + i)))
    ops.append(rng.choice([("f",), ("close",)]))
    if ops[-1][0] == "f" and rng.random() < 0.5:       # unflushed writes at the crash
        lba = rng.randrange(3000, PNR - 8)
        ops.append(("w", lba, make_blocks(rng, lba, 8, 999)))
    return ops


@pytest.mark.parametrize("seed", range(4))
def test_crash_during_cleaning(seed):
    """Crash at every device op of a program whose flush overwrites most of a segment and
    then cleans it (valid blocks moved, victim freed, threaded logging into holes)."""
    ctrl, data, meta, images, base_model, _ = pressure_base()
    ops = _pressure_program(seed)
    ctrl.load(images)
    disk = SwornDisk.open(data, meta, KEY16)
    ctrl.reset_count()
    out = run_program(disk, ops, base_model)
    assert out.failed_at is None, out.error
    total = ctrl.ops
    st = disk.stats()
    assert st.lifetime.cleaning_runs > 0 and st.lifetime.blocks_moved > 0, \
        f"the program did not clean: {st}"
    step = max(1, total // 24)
    for k in list(range(0, total, step)) + [total + 3]:
        rng = random.Random(seed * 1009 + k)
        keep = CrashController.KEEP_MODES[k % len(CrashController.KEEP_MODES)]
        out, _ = rerun_with_crash(ctrl, images, data, meta, ops, base_model, k, rng, keep)
        ctx = (f"cleaning seed={seed} k={k}/{total} keep={keep} failed_op={out.failed_at} "
               f"[{ctrl.crash_info}]")
        d = open_after_crash(data, meta, ctx)
        # segment 0 (cleaned: LBAs 0..1023), everything the program wrote, and a sample
        lbas = set(range(0, 1100)) | set(rng.sample(range(PNR), 300))
        for st_ in out.allowed():
            lbas.update(l for l in st_.blocks if l >= 1100 and st_.get(l) != base_model.get(l))
        alive = matching_states(d, out.allowed(), ctx, rng, lbas=lbas)
        # keep going on the recovered disk: more overwrites, flush, reopen
        model = out.allowed()[alive[0]].copy()
        for i in range(6):
            lba = rng.randrange(0, 2990)
            buf = make_blocks(rng, lba, 4, 5000 + i)
            d.write(lba, buf)
            model.write(lba, buf)
            lbas.update(range(lba, lba + 4))
        d.close()
        d = open_after_crash(data, meta, ctx + " (after more writes)")
        matching_states(d, [model], ctx + " (after more writes)", rng, lbas=lbas)


@pytest.mark.parametrize("seed", range(3))
def test_crash_big_epoch(seed):
    """~1300 distinct blocks written between two flushes: the segment buffer (1024 blocks)
    is sealed in the middle of write(), i.e. uncommitted data reaches the device long
    before the flush. Crash at every device op of the epoch and of its flush."""
    ctrl, data, meta, images, base_model, _ = pressure_base()
    rng = random.Random(4242 + seed)
    ops = []
    starts = rng.sample(range(0, PNR - 64, 64), 24)
    for i, lba in enumerate(starts):
        ops.append(("w", lba, make_blocks(rng, lba, 64, 10 + i)))
        if i % 7 == 3:
            ops.append(("d", rng.randrange(PNR - 16), 16))
    ops.append(("f",))
    ctrl.load(images)
    disk = SwornDisk.open(data, meta, KEY16)
    ctrl.reset_count()
    out = run_program(disk, ops, base_model)
    assert out.failed_at is None, out.error
    total = ctrl.ops
    touched = set()
    for op in ops:
        if op[0] == "w":
            touched.update(range(op[1], op[1] + len(op[2]) // BS))
        elif op[0] == "d":
            touched.update(range(op[1], op[1] + op[2]))
    for k in list(range(total)) + [total + 1]:
        krng = random.Random(seed * 31 + k)
        keep = CrashController.KEEP_MODES[(k + seed) % len(CrashController.KEEP_MODES)]
        out, _ = rerun_with_crash(ctrl, images, data, meta, ops, base_model, k, krng, keep)
        ctx = (f"big epoch seed={seed} k={k}/{total} keep={keep} failed_op={out.failed_at} "
               f"[{ctrl.crash_info}]")
        d = open_after_crash(data, meta, ctx)
        matching_states(d, out.allowed(), ctx, krng,
                        lbas=touched | set(krng.sample(range(3000), 200)))


@pytest.mark.parametrize("workers", [0, None])
def test_big_epoch_seals_before_flush(workers):
    """The premise of test_crash_big_epoch: data reaches the device before flush(). In the
    thread, the full segment is written as it is sealed; with crypto workers, it is
    written when it is collected: at the next seal, a discard (as in that test's
    program) or the commit."""
    ctrl, data, meta, images, base_model, _ = pressure_base()
    ctrl.load(images)
    disk = SwornDisk.open(data, meta, KEY16, config=Config(crypto_workers=workers))
    ctrl.reset_count()
    rng = random.Random(1)
    for i, lba in enumerate(range(0, 1600, 64)):
        disk.write(lba, make_blocks(rng, lba, 64, 77))
    if workers != 0:
        assert disk.stats().crypto.blocks_in_workers >= 1024
        disk.discard(PNR - 16, 16)
    assert ctrl.ops > 0, "1600 distinct unflushed blocks and nothing was written yet"


@pytest.mark.parametrize("seed", range(3))
def test_crash_during_background_cleaning(seed):
    """background_step() (what the ublk target runs when idle) cleans one segment and
    commits the moves itself: a crash at any of its device ops keeps the flushed state.
    Setup: 2000 valid blocks (4 of 6 segments free, so flush does not clean), then most
    of segment 0 discarded, so segment 0 is a cleaning victim."""
    rng = random.Random(777 + seed)
    ctrl, data, meta = crash_pair(DATA_SIZE, meta_size_for(DATA_SIZE, PNR, PCFG))
    disk = SwornDisk.create(data, meta, KEY16, nr_blocks=PNR, config=PCFG)
    model = Model(PNR)
    for lba in range(0, 2000, 16):
        buf = make_blocks(rng, lba, 16, 1)
        disk.write(lba, buf)
        model.write(lba, buf)
    disk.flush()
    for lba in range(0, 1008, 48):                # ~86% of segment 0 becomes dead
        n = rng.randint(40, 44)
        disk.discard(lba, n)
        model.discard(lba, n)
    disk.flush()
    images = ctrl.images()
    base_model = model
    lba = rng.randrange(3000, PNR - 16)
    ops = [("bg",), ("bg",), ("w", lba, make_blocks(rng, lba, 16, 4)), ("f",), ("bg",)]
    ctrl.load(images)
    disk = SwornDisk.open(data, meta, KEY16)
    moved0 = disk.stats().lifetime.blocks_moved
    ctrl.reset_count()
    out = run_program(disk, ops, base_model)
    assert out.failed_at is None, out.error
    total = ctrl.ops
    assert disk.stats().lifetime.blocks_moved > moved0, \
        f"background_step cleaned nothing: {disk.stats()}"
    lbas = set(range(0, 2800, 2)) | set(range(lba, lba + 16))
    for k in list(range(total)) + [total + 1]:
        krng = random.Random(seed * 97 + k)
        keep = CrashController.KEEP_MODES[k % len(CrashController.KEEP_MODES)]
        out, _ = rerun_with_crash(ctrl, images, data, meta, ops, base_model, k, krng, keep)
        ctx = (f"background cleaning seed={seed} k={k}/{total} keep={keep} "
               f"failed_op={out.failed_at} [{ctrl.crash_info}]")
        d = open_after_crash(data, meta, ctx)
        matching_states(d, out.allowed(), ctx, krng, lbas=lbas)


def _mapped(model: Model) -> int:
    return sum(1 for v in model.blocks.values() if v != bytes(BS))


@pytest.mark.parametrize("seed", range(4))
def test_space_accounting_after_recovery(seed):
    """After a crash in the middle of a cleaning flush, recovery must rebuild exactly the
    free-space accounting that matches the recovered state: keep writing (threaded logging
    and cleaning reuse freed blocks) and nothing valid may ever be overwritten. If the
    engine reports valid_blocks, it equals the number of mapped LBAs after each flush."""
    ctrl, data, meta, images, base_model, _ = pressure_base()
    ops = _pressure_program(10 + seed)
    ctrl.load(images)
    disk = SwornDisk.open(data, meta, KEY16)
    ctrl.reset_count()
    run_program(disk, ops, base_model)
    total = ctrl.ops
    rng = random.Random(seed)
    k = rng.randrange(total // 3, total)
    ctrl.load(images)
    disk = SwornDisk.open(data, meta, KEY16)
    ctrl.arm(k, rng, "random")
    out = run_program(disk, ops, base_model)
    if not ctrl.crashed:
        ctrl.crash(rng, "random")
    ctrl.revive()
    ctx = f"accounting seed={seed} k={k}/{total} [{ctrl.crash_info}]"
    d = open_after_crash(data, meta, ctx)
    lbas = set(range(PNR))
    alive = matching_states(d, out.allowed(), ctx, rng, lbas=set(range(0, PNR, 5)))
    model = out.allowed()[alive[0]].copy()

    def check_count(where):
        vb = d.stats().space.valid_blocks
        assert vb == _mapped(model), f"{ctx} {where}: valid_blocks={vb}, mapped LBAs=" \
                                     f"{_mapped(model)}"

    check_count("after recovery")
    for i in range(300):
        lba = rng.randrange(0, 3000)
        n = rng.randint(1, 8)
        buf = make_blocks(rng, lba, n, 20000 + i)
        d.write(lba, buf)
        model.write(lba, buf)
        if i % 10 == 9:
            d.flush()
            check_count(f"after flush {i}")
    d.close()
    d = open_after_crash(data, meta, ctx + " (after the overwrite workload)")
    matching_states(d, [model], ctx + " (after the overwrite workload)", rng, lbas=lbas)
    d.close()


def _crashed_mid_flush(seed: int):
    """An image crashed in the middle of a flush, plus its allowed states."""
    ctrl, data, meta, images, base_model, v0, _ = base_image(seed % 2)
    ops, _ = _program_for(500 + seed, v0, "flush")
    total, _ = _count_ops(ctrl, data, meta, images, ops, base_model)
    rng = random.Random(seed)
    # crash somewhere in the second half: inside the final flush most of the time
    k = rng.randrange(total // 2, total)
    ctrl.load(images)
    disk = SwornDisk.open(data, meta, KEY16)
    ctrl.arm(k, rng, "random")
    out = run_program(disk, ops, base_model)
    assert ctrl.crashed
    ctrl.revive()
    return ctrl, data, meta, ctrl.images(), out.allowed(), disk


@pytest.mark.parametrize("seed", range(6))
def test_crash_during_recovery(seed):
    """Crash while recovering: during open() and during the first writes and flush after
    it (this engine's open() only reads; the repair -- overwriting the torn journal tail --
    happens with the next journal append). Crash at every device op of open + a program
    ending in a flush, and once more at a random op of the next recovery. The disk must
    show the state the uninterrupted recovery showed, or that state plus the program if
    its flush was in flight."""
    ctrl, data, meta, crashed, allowed, zombie = _crashed_mid_flush(seed)
    ctrl.load(crashed)
    disk = open_after_crash(data, meta, f"seed={seed} first recovery")
    first = matching_states(disk, allowed, f"seed={seed} uninterrupted recovery")
    shown = allowed[first[0]]
    ops, _ = gen_program(random.Random(900 + seed), 10, 0.0, 10**7, end="flush", max_len=8)
    ctrl.load(crashed)
    ctrl.reset_count()
    d = SwornDisk.open(data, meta, KEY16)
    n_open = ctrl.ops
    out = run_program(d, ops, shown)
    assert out.failed_at is None, out.error
    total = ctrl.ops
    assert total > n_open, "the program after recovery did no device I/O"
    step = max(1, total // 40)
    for k in range(0, total + 1, step):
        rng = random.Random(seed * 7919 + k)
        ctrl.load(crashed)
        ctrl.arm(k, rng, "random" if k % 2 else "blocks")
        out = None
        try:
            d = SwornDisk.open(data, meta, KEY16)
        except (OSError, SwornDiskError):
            d = None
        if d is not None:
            out = run_program(d, ops, shown)
        if not ctrl.crashed:
            ctrl.crash(rng, "random")
        ctrl.revive()
        ok = [shown] if out is None else out.allowed()
        # crash during the second recovery too, at a random point of open + one write/flush
        ctrl.arm(rng.randrange(4), rng, "random")
        try:
            d2 = SwornDisk.open(data, meta, KEY16)
            for lba in (0, NR - 1):
                d2.write(lba, d2.read(lba, 1))     # rewrite in place: the state is unchanged
            d2.flush()
        except (OSError, SwornDiskError):
            pass
        crashed_twice = ctrl.crashed
        if not ctrl.crashed:
            ctrl.crash(rng, "random")
        ctrl.revive()
        ctx = (f"seed={seed} recovery crash k={k}/{total} (open={n_open} ops) "
               f"failed_op={None if out is None else out.failed_at} "
               f"second-crash={crashed_twice} [{ctrl.crash_info}]")
        d3 = open_after_crash(data, meta, ctx)
        matching_states(d3, ok, ctx)


@pytest.mark.parametrize("seed", range(4))
def test_repeated_crash_reopen_cycles(seed):
    """Many crash/recover cycles on one disk, each with random ops and a crash at a random
    device op. Once an open has shown a state, later crashes can only move it forward
    through completed flushes: recovery must make the state it chose stick."""
    rng = random.Random(seed)
    ctrl, data, meta = crash_pair(DATA_SIZE, meta_size_for(DATA_SIZE, NR, CFG))
    disk = SwornDisk.create(data, meta, KEY16, nr_blocks=NR, config=CFG)
    disk.flush()
    committed = Model(NR)
    v = 0
    for cycle in range(30):
        end = rng.choice(["none", "flush", "close"])
        ops, v = gen_program(rng, rng.randint(0, 25), 0.15, v, end=end)
        kind = rng.random()
        if kind < 0.15:
            ops = []                  # crash right after open: what open showed must stick
        keep = rng.choice(CrashController.KEEP_MODES)
        ctrl.arm(rng.randrange(0, 40 + 8 * len(ops)), rng, keep)
        out = run_program(disk, ops, committed)
        if not ctrl.crashed:
            ctrl.crash(rng, keep)
        ctx = f"seed={seed} cycle={cycle} ops={len(ops)} failed_at={out.failed_at} " \
              f"[{ctrl.crash_info}]"
        ctrl.revive()
        disk = open_after_crash(data, meta, ctx)
        allowed = out.allowed()
        alive = matching_states(disk, allowed, ctx, rng)
        committed = allowed[alive[-1]] if len(alive) == 1 else allowed[alive[0]]
        if len(alive) == 2:
            assert allowed[0].same_as(allowed[1])
    disk.close()
    disk = SwornDisk.open(data, meta, KEY16)
    matching_states(disk, [committed], f"seed={seed} final clean reopen")
    disk.close()


def test_unflushed_writes_never_appear_even_if_all_persisted():
    """keep='all': every write the engine issued reached the media, but no flush() was
    called: recovery must still show exactly the last flushed state."""
    ctrl, data, meta, images, base_model, v0, _ = base_image(0)
    rng = random.Random(77)
    ops, _ = gen_program(rng, 60, 0.0, v0, end="none", max_len=12)
    ctrl.load(images)
    disk = SwornDisk.open(data, meta, KEY16)
    out = run_program(disk, ops, base_model)
    assert out.failed_at is None
    ctrl.crash(rng, "all")
    ctrl.revive()
    d = open_after_crash(data, meta, "keep=all without flush")
    matching_states(d, [base_model], "keep=all without flush")
    d.close()
    del disk


def test_completed_flush_survives_losing_everything_unflushed():
    """keep='none' right after flush() returned: the flush is durable on its own."""
    ctrl, data, meta, images, base_model, v0, _ = base_image(1)
    rng = random.Random(78)
    ops, _ = gen_program(rng, 40, 0.05, v0, end="flush")
    ctrl.load(images)
    disk = SwornDisk.open(data, meta, KEY16)
    out = run_program(disk, ops, base_model)
    assert out.failed_at is None
    extra, _ = gen_program(rng, 10, 0.0, 10**6, end="none")
    out2 = run_program(disk, extra, out.committed)
    assert out2.failed_at is None
    ctrl.crash(rng, "none")
    ctrl.revive()
    d = open_after_crash(data, meta, "keep=none after flush")
    matching_states(d, [out.committed], "keep=none after flush")
    d.close()


def test_crash_error_is_eio_and_disk_stays_failed():
    """The op that hits the dead device raises an OSError with EIO (or a SwornDiskError);
    the failed instance must not acknowledge a later flush as durable."""
    ctrl, data, meta, images, base_model, v0, _ = base_image(0)
    rng = random.Random(79)
    ctrl.load(images)
    disk = SwornDisk.open(data, meta, KEY16)
    disk.write(3, make_blocks(rng, 3, 2, 5))
    ctrl.arm(0, rng, "none")
    with pytest.raises((OSError, SwornDiskError)) as ei:
        disk.flush()
    if isinstance(ei.value, OSError):
        assert ei.value.errno == errno.EIO, ei.value
    # the devices are still dead: a second flush can not have made anything durable
    with pytest.raises((OSError, SwornDiskError)):
        disk.flush()
    ctrl.revive()
    d = open_after_crash(data, meta, "after failed flush")
    matching_states(d, [base_model], "after failed flush (nothing of it was durable)")
    d.close()


# ---- hypothesis: random programs with crashes anywhere -----------------------------------

from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule  # noqa: E402

HNR = 128


class CrashMachine(RuleBasedStateMachine):
    """write / discard / flush / crash (between ops, or at the k-th device op of a flush
    or a close) / reopen, against the committed and current models."""

    @initialize()
    def setup(self):
        cfg = Config(memtable_records=16, level_ratio=2)
        self.ctrl, self.data, self.meta = crash_pair(DATA_SIZE, meta_size_for(DATA_SIZE, HNR, cfg))
        self.disk = SwornDisk.create(self.data, self.meta, KEY16, nr_blocks=HNR, config=cfg)
        self.disk.flush()
        self.committed = Model(HNR)
        self.current = Model(HNR)
        self.v = 0
        self.rng = random.Random(0)
        self.trace = []

    def _recover(self, allowed, what):
        self.ctrl.revive()
        ctx = f"after {what}; trace={self.trace[-12:]} [{self.ctrl.crash_info}]"
        self.disk = open_after_crash(self.data, self.meta, ctx)
        alive = matching_states(self.disk, allowed, ctx, self.rng)
        self.committed = allowed[alive[0]].copy()
        self.current = self.committed.copy()

    @rule(lba=st.integers(0, HNR - 1), n=st.integers(1, 40))
    def write(self, lba, n):
        n = min(n, HNR - lba)
        self.v += 1
        buf = make_blocks(self.rng, lba, n, self.v)
        self.disk.write(lba, buf)
        self.current.write(lba, buf)
        self.trace.append(("w", lba, n))

    @rule(lba=st.integers(0, HNR - 1), n=st.integers(1, 30))
    def discard(self, lba, n):
        n = min(n, HNR - lba)
        self.disk.discard(lba, n)
        self.current.discard(lba, n)
        self.trace.append(("d", lba, n))

    @rule()
    def flush(self):
        self.disk.flush()
        self.committed = self.current.copy()
        self.trace.append(("f",))

    @rule(keep=st.sampled_from(CrashController.KEEP_MODES), seed=st.integers(0, 2**16))
    def crash(self, keep, seed):
        self.trace.append(("crash", keep))
        self.ctrl.crash(random.Random(seed), keep)
        self._recover([self.committed], "crash between ops")

    @rule(k=st.integers(0, 30), keep=st.sampled_from(CrashController.KEEP_MODES),
          seed=st.integers(0, 2**16), close=st.booleans())
    def crash_in_flush(self, k, keep, seed, close):
        self.trace.append(("crash-in-" + ("close" if close else "flush"), k, keep))
        self.ctrl.arm(k, random.Random(seed), keep)
        try:
            self.disk.close() if close else self.disk.flush()
        except (OSError, SwornDiskError):
            pass
        self.ctrl.disarm()
        if not self.ctrl.crashed:                     # the flush completed before op k
            self.committed = self.current.copy()
            self.ctrl.crash(random.Random(seed), keep)
            self._recover([self.committed], "crash after a completed flush")
        else:
            self._recover([self.committed, self.current], "crash inside flush")

    @rule()
    def reopen(self):
        self.disk.close()
        self.committed = self.current.copy()
        self.disk = SwornDisk.open(self.data, self.meta, KEY16)
        self.trace.append(("reopen",))

    def teardown(self):
        if getattr(self, "disk", None) is not None:
            try:
                self.disk.close()
            except (OSError, SwornDiskError):
                pass
            # Hypothesis keeps failing examples' tracebacks while shrinking: free the
            # device memory explicitly so that a failure cannot exhaust the machine.
            for dev in (self.data, self.meta):
                dev.mem.buf = bytearray(0)
                dev.durable = bytearray(0)


NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]
TestCrashMachine = CrashMachine.TestCase
# No shrinking: every shrink attempt of a failing example would keep a disk's memory
# alive through its traceback (GBs); the unshrunk failing program is printed instead.
TestCrashMachine.settings = settings(phases=NO_SHRINK, max_examples=40,
                                     stateful_step_count=40,
                                     deadline=None, database=None, derandomize=True,
                                     suppress_health_check=list(HealthCheck))
