"""Backing-store faults at every device call of write, flush, cleaning and checkpoint.

The storage under a disk is often a network volume (NBD, iSCSI, RBD) that can fail at any
moment: a request returns EIO, a thin or full store returns ENOSPC, a read comes back
short. Whatever the call and whichever device (data or meta), the operation that hit the
fault must fail (never claim success), the fault must have fired, the disk must stop
accepting writes (its failure latch), and the devices reopened without the fault must show
the disk at its last completed flush: the state before the operation or, where the
operation was itself a flush whose commit got through, after it (checked against a model).

Each case: one dry run counts the operation's calls of that kind on that device, then the
operation runs once per call position with that call failing. Small disk, small config:
a reopen from memory images costs milliseconds.

The matrix runs with the crypto in the calling thread (crypto_workers=0), where every
device call happens inside the operation that causes it. With crypto workers a full
segment is sealed in the background and written at the next seal or commit: the
"pool-flush" cases fail each call of the flush that writes such a segment.
"""
from __future__ import annotations

import errno
import random
from dataclasses import dataclass
from typing import Callable

import pytest

from sworndisk import Config, DiskClosedError, MemoryDevice, SwornDisk, SwornDiskError

from .conftest import KEY16, Model, make_blocks, meta_size_for
from .crashdev import FaultyDevice
from .test_crash import matching_states

DATA = 24 << 20          # 6 data segments, 2 of them reserved for cleaning
NR = 4096
CFG = Config(memtable_records=64, level_ratio=2, node_cache_bytes=1 << 20)
FILLED = 3000            # blocks written (in order) before every operation


@dataclass
class Base:
    images: tuple
    model: Model


_BASE: list = []


def base() -> Base:
    """The disk every case starts from: FILLED blocks in segments 0-2, flushed, closed."""
    if not _BASE:
        data, meta = MemoryDevice(DATA), MemoryDevice(meta_size_for(DATA, NR, CFG))
        disk = SwornDisk.create(data, meta, KEY16, nr_blocks=NR, config=CFG)
        rng, model = random.Random(17), Model(NR)
        for lba in range(0, FILLED, 16):
            buf = make_blocks(rng, lba, 16, 1)
            disk.write(lba, buf)
            model.write(lba, buf)
        disk.close()
        _BASE.append(Base((bytes(data.buf), bytes(meta.buf)), model))
    return _BASE[0]


@dataclass
class Scenario:
    """`prepare` brings an opened disk (and the model) to just before the operation and
    returns the states a reopen may show after the operation failed; `run` is the
    operation; `did` checks, on the dry run's disk, that the operation did its kind of
    work (a cleaning that cleans nothing would test nothing)."""
    prepare: Callable
    run: Callable
    did: Callable = lambda before, after: True


def _write(disk, model, lba, n, version, rng):
    buf = make_blocks(rng, lba, n, version)
    disk.write(lba, buf)
    model.write(lba, buf)


def prep_write(disk, model, rng):
    return [model.copy()]                   # write() alone commits nothing: the last flush


def run_write(disk, rng):
    disk.write(FILLED, make_blocks(rng, FILLED, 1090, 2))   # fills and seals a segment


def prep_pool_flush(disk, model, rng):
    """A segment's worth of writes: with crypto workers it is being sealed in the
    background, and the flush writes it."""
    pre = model.copy()
    _write(disk, model, FILLED, 1090, 2, rng)
    return [pre, model.copy()]


def prep_flush(disk, model, rng):
    pre = model.copy()
    _write(disk, model, FILLED, 20, 2, rng)
    return [pre, model.copy()]


def prep_cleaning(disk, model, rng):
    """Overwrites most of segment 0: the flush after it commits, then must clean (greedy)."""
    pre = model.copy()
    for lba in range(0, 900, 64):
        _write(disk, model, lba, 64, 3, rng)
    return [pre, model.copy()]


def prep_background(disk, model, rng):
    """As prep_cleaning, flushed (no fault), and segment 1 overwritten to 30% valid:
    more than foreground cleaning takes, so background_step cleans it."""
    prep_cleaning(disk, model, rng)
    disk.flush()
    for lba in range(1024, 1024 + 704, 64):
        _write(disk, model, lba, 64, 4, rng)
    disk.flush()
    return [model.copy()]


def prep_checkpoint(disk, model, rng):
    """A flush that leaves the journal longer than a block: close() then checkpoints."""
    _write(disk, model, FILLED, 20, 2, rng)
    disk.flush()
    return [model.copy()]


def prep_merge(disk, model, rng):
    """Flushed random overwrites until a merge is in progress (lsm.py): background_step
    then merges (its inputs resident: index nodes written, none read) and installs it
    with a checkpoint."""
    for rnd in range(200):
        for _ in range(16):
            _write(disk, model, rng.randrange(FILLED), 1, 5 + rnd, rng)
        disk.flush()
        if disk.debug.index.merging():
            return [model.copy()]
    raise AssertionError("no merge started")


def run_merge(disk, rng):
    while disk.debug.index.merging():
        assert disk.background_step(), "a merge in progress but no background work"


def merged(before, after):
    return after.lifetime.major_compactions > before.lifetime.major_compactions


def cleaned(before, after):
    return after.lifetime.cleaning_runs > before.lifetime.cleaning_runs


def checkpointed(before, after):
    return after.checkpoint_seq > before.checkpoint_seq


SCENARIOS = {
    "write": Scenario(prep_write, run_write),
    "flush": Scenario(prep_flush, lambda disk, rng: disk.flush()),
    "cleaning": Scenario(prep_cleaning, lambda disk, rng: disk.flush(), cleaned),
    "background-cleaning": Scenario(prep_background,
                                    lambda disk, rng: disk.background_step(), cleaned),
    "checkpoint": Scenario(prep_checkpoint, lambda disk, rng: disk.close(), checkpointed),
    "background-merge": Scenario(prep_merge, run_merge, merged),
}
POOL_SCENARIOS = {"pool-flush": Scenario(prep_pool_flush, lambda disk, rng: disk.flush(),
                                         lambda before, after: after.crypto.batches > 0)}
WORKERS = {**{s: 0 for s in SCENARIOS}, **{s: None for s in POOL_SCENARIOS}}

# (counter on FaultyDevice, how to arm the fault at call k)
FAULTS = {
    "write-EIO": ("writes", lambda dev, k: dev.fail_write_after(k)),
    "write-ENOSPC": ("writes", lambda dev, k: dev.fail_write_after(k, err=errno.ENOSPC)),
    "flush-EIO": ("flushes", lambda dev, k: dev.fail_flush_after(k)),
    "read-EIO": ("reads", lambda dev, k: dev.fail_read_after(k)),
    "read-short": ("reads", lambda dev, k: dev.fail_read_after(k, short=True)),
}


class Run:
    """One run of a scenario on fresh copies of the base images."""

    def __init__(self, scenario: Scenario, seed: int, workers: int | None = 0):
        b = base()
        self.inner = [MemoryDevice(len(img)) for img in b.images]
        for dev, img in zip(self.inner, b.images):
            dev.buf[:] = img
        self.dev = {"data": FaultyDevice(self.inner[0]), "meta": FaultyDevice(self.inner[1])}
        self.disk = SwornDisk.open(self.dev["data"], self.dev["meta"], KEY16,
                                   config=Config(crypto_workers=workers))
        self.rng = random.Random(seed)
        self.model = b.model.copy()
        self.allowed = scenario.prepare(self.disk, self.model, self.rng)
        self.scenario = scenario
        for dev in self.dev.values():
            dev.reads = dev.writes = dev.flushes = 0

    def operate(self) -> None:
        self.scenario.run(self.disk, self.rng)

    def lbas_to_check(self) -> set:
        """Every LBA the operation touched (where the allowed states differ from the base)
        and a sample of the rest, written or never written (the unflushed writes of a
        failed operation must read as before): reading all 4096 per case would dominate."""
        b = base().model
        touched = {lba for st in self.allowed for lba in st.blocks if st.get(lba) != b.get(lba)}
        return (touched | set(self.rng.sample(range(FILLED), 96))
                | set(self.rng.sample(range(FILLED, NR), 96)))

    def reopen(self) -> SwornDisk:
        return SwornDisk.open(self.inner[0], self.inner[1], KEY16)


def calls_made(name: str, dev_name: str, counter: str) -> int:
    """How many calls of that kind the operation makes on that device, fault-free; checks
    that the operation did its work."""
    scenario = {**SCENARIOS, **POOL_SCENARIOS}[name]
    run = Run(scenario, seed=1, workers=WORKERS[name])
    before = run.disk.stats()
    run.operate()
    n = getattr(run.dev[dev_name], counter)
    after = run.reopen().stats() if name == "checkpoint" else run.disk.stats()
    assert scenario.did(before, after), f"{name}: the operation did not do its work"
    return n


# The calls an operation never makes (checked below, so the matrix notices a change):
# a write only seals data; a flush reads index nodes, not data; a checkpoint writes meta.
NO_CALLS = {("write", "data", "reads"), ("write", "data", "flushes"),
            ("write", "meta", "reads"), ("write", "meta", "writes"),
            ("write", "meta", "flushes"), ("flush", "data", "reads"),
            ("background-cleaning", "meta", "reads"), ("checkpoint", "data", "reads"),
            ("checkpoint", "data", "writes"), ("checkpoint", "data", "flushes"),
            ("checkpoint", "meta", "reads"), ("background-merge", "data", "reads"),
            ("background-merge", "data", "writes"), ("background-merge", "data", "flushes"),
            ("background-merge", "meta", "reads")}
DEVICES = ("data", "meta")
CASES = [(s, d, f) for s in SCENARIOS for d in DEVICES for f in FAULTS
         if (s, d, FAULTS[f][0]) not in NO_CALLS] + \
    [("pool-flush", "data", f) for f in ("write-EIO", "write-ENOSPC", "flush-EIO")]


def test_operations_make_the_calls_the_matrix_assumes():
    for s in SCENARIOS:
        for d in DEVICES:
            for counter in ("reads", "writes", "flushes"):
                n = calls_made(s, d, counter)
                assert (n == 0) == ((s, d, counter) in NO_CALLS), \
                    f"{s} makes {n} {counter} on the {d} device"


@pytest.mark.parametrize("scenario,dev_name,fault", CASES,
                         ids=[f"{s}-{d}-{f}" for s, d, f in CASES])
def test_fault_at_every_call(scenario, dev_name, fault):
    counter, arm = FAULTS[fault]
    n = calls_made(scenario, dev_name, counter)
    assert n > 0, f"{scenario} makes no {counter} on the {dev_name} device"
    for k in range(n):
        ctx = f"{scenario}: {fault} on the {dev_name} device at call {k + 1} of {n}"
        run = Run({**SCENARIOS, **POOL_SCENARIOS}[scenario], seed=1, workers=WORKERS[scenario])
        arm(run.dev[dev_name], k)
        with pytest.raises((OSError, SwornDiskError)) as raised:
            run.operate()
        assert run.dev[dev_name].failures == 1, f"{ctx}: the fault never fired"
        assert run.disk.failure, f"{ctx}: the disk does not say it failed"
        if isinstance(raised.value, OSError) and not isinstance(raised.value, SwornDiskError):
            assert raised.value.errno in (errno.EIO, errno.ENOSPC), f"{ctx}: {raised.value!r}"
        # the failure latch: nothing more is accepted (close() just lets go of it)
        with pytest.raises(DiskClosedError):
            run.disk.write(0, bytes(4096))
        run.disk.close()
        disk = run.reopen()
        alive = matching_states(disk, run.allowed, ctx, run.rng, lbas=run.lbas_to_check())
        # and the reopened disk works on: a write, a flush, a reopen
        model = run.allowed[alive[0]].copy()
        _write(disk, model, 3500, 4, 9, run.rng)
        disk.close()
        matching_states(run.reopen(), [model], ctx + " (after more writes)", run.rng,
                        lbas=range(3496, 3508))
