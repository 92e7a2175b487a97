"""Model-based tests: the disk must read exactly like a dict lba -> block.

A never-written or discarded block reads as zeros. Small MemTables and level ratios make
the workloads below cross many minor and major compactions, and enough overwrites to make
the data log wrap and need segment cleaning.
"""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from sworndisk import Config, MemoryDevice, SwornDisk

from .conftest import (BS, KEY16, MiB, ZERO, Model, check_read, make_blocks, meta_size_for,
                       new_disk, verify_disk)



def reopen(disk, data, meta, key=KEY16):
    disk.close()
    return SwornDisk.open(data, meta, key)


def _stats_text(disk) -> str:
    return repr(disk.stats())


# ---- seeded long random runs -----------------------------------------------------------

def no_residency(disk) -> SwornDisk:
    """No BIT held whole in memory: lookups go through fences, filters and node walks
    (on the small disks of these tests, every BIT would otherwise be resident)."""
    disk.debug.index.store.resident.limit = 0
    return disk


def random_run(seed: int, config: Config, nr_blocks: int, nops: int, data_size=32 * MiB,
               max_len=16, hot=None, resident=True):
    """Random writes/reads/discards/flushes/reopens against the model; returns the disk
    (open) and its devices for the caller's final checks."""
    rng = random.Random(seed)
    disk, data, meta = new_disk(data_size, nr_blocks, config)
    keep = (lambda d: d) if resident else no_residency
    disk = keep(disk)
    model = Model(nr_blocks)
    version = 0
    ctx = f"seed={seed} cfg={config.memtable_records}/{config.level_ratio}"
    for step in range(nops):
        r = rng.random()
        if hot and rng.random() < 0.5:
            lo, hi = 0, hot
        else:
            lo, hi = 0, nr_blocks
        n = rng.randint(1, max_len)
        lba = rng.randrange(lo, hi)
        n = min(n, nr_blocks - lba)
        where = f"{ctx} step={step}"
        if r < 0.50:
            version += 1
            buf = make_blocks(rng, lba, n, version)
            disk.write(lba, buf)
            model.write(lba, buf)
        elif r < 0.72:
            check_read(disk, model, lba, n, where)
        elif r < 0.80:
            disk.discard(lba, n)
            model.discard(lba, n)
        elif r < 0.97:
            disk.flush()
        else:
            disk = keep(reopen(disk, data, meta))
            verify_disk(disk, model, where + " after reopen", rng=rng)
    if not resident:
        assert disk.stats().index.resident_bytes == 0 and disk.stats().index.summary_bytes > 0
    return disk, data, meta, model, ctx


@pytest.mark.parametrize("seed,mem,ratio,resident",
                         [(1, 64, 2, True), (2, 128, 3, True), (3, 256, 4, True),
                          (5, 64, 2, False)],
                         ids=["seed1-m64-r2", "seed2-m128-r3", "seed3-m256-r4",
                              "seed5-m64-r2-not-resident"])
def test_random_long_run(seed, mem, ratio, resident):
    cfg = Config(memtable_records=mem, level_ratio=ratio)
    nr = 2048
    disk, data, meta, model, ctx = random_run(seed, cfg, nr, 4000, hot=64, resident=resident)
    verify_disk(disk, model, ctx + " final")
    minor = disk.stats().lifetime.minor_compactions
    major = disk.stats().lifetime.major_compactions
    assert minor > 0, f"{ctx}: no minor compaction happened; stats={_stats_text(disk)}"
    if ratio <= 3:
        assert major > 0, f"{ctx}: no major compaction happened; stats={_stats_text(disk)}"
    st = disk.stats()
    assert st.lifetime.cleaning_runs + st.space.threaded_segments > 0, \
        f"{ctx}: the data log never had to reuse space: {st}"
    disk = reopen(disk, data, meta)
    verify_disk(disk, model, ctx + " final reopen", lbas=range(nr))
    disk.close()


def test_random_run_aes256_records():
    """cipher_key_bytes=32: bigger index records, different BIT shapes; same contract."""
    cfg = Config(memtable_records=64, level_ratio=3, cipher_key_bytes=32)
    disk, data, meta, model, ctx = random_run(4, cfg, 1024, 600, hot=128)
    verify_disk(disk, model, ctx + " final", lbas=range(1024))
    disk = reopen(disk, data, meta)
    verify_disk(disk, model, ctx + " reopen", lbas=range(1024))
    assert disk.stats().lifetime.major_compactions > 0
    disk.close()


def test_large_unflushed_epochs():
    """Thousands of blocks between flushes: the segment buffer fills and is sealed in the
    middle of write(); overwrites and discards then hit sealed-but-uncommitted blocks and
    buffered ones, and reads must see the newest of buffer / sealed / committed."""
    cfg = Config(memtable_records=128, level_ratio=2)
    nr = 4096
    rng = random.Random(21)
    disk, data, meta = new_disk(40 * MiB, nr, cfg)
    model = Model(nr)
    v = 0
    for epoch in range(4):
        for i in range(120):
            r = rng.random()
            lba = rng.randrange(nr - 64)
            n = rng.randint(1, 64)
            if r < 0.7:
                v += 1
                buf = make_blocks(rng, lba, n, v)
                disk.write(lba, buf)
                model.write(lba, buf)
            elif r < 0.85:
                disk.discard(lba, n)
                model.discard(lba, n)
            else:
                check_read(disk, model, lba, n, f"large epoch {epoch} op {i}")
        verify_disk(disk, model, f"large epoch {epoch} before flush", lbas=range(nr))
        disk.flush()
        if epoch % 2:
            disk = reopen(disk, data, meta)
        verify_disk(disk, model, f"large epoch {epoch} after flush", lbas=range(nr))
    disk.close()


def test_wraps_data_log_and_cleans():
    """Overwrite a quarter of a small disk many times: far more is written than the data
    device holds, so segments must be cleaned and reused; everything stays readable."""
    cfg = Config(memtable_records=64, level_ratio=2)
    data_size = 24 * MiB                        # 6 segments
    nr = 1024                                   # 4 MiB logical
    rng = random.Random(7)
    disk, data, meta = new_disk(data_size, nr, cfg)
    model = Model(nr)
    written = 0
    version = 0
    total = 3 * data_size // BS   # >= 2x the device
    while written < total:
        lba = rng.randrange(nr)
        n = min(rng.randint(1, 32), nr - lba)
        version += 1
        buf = make_blocks(rng, lba, n, version)
        disk.write(lba, buf)
        model.write(lba, buf)
        written += n
        if rng.random() < 0.1:
            disk.flush()
    verify_disk(disk, model, "wrap", lbas=range(nr))
    disk = reopen(disk, data, meta)
    verify_disk(disk, model, "wrap after reopen", lbas=range(nr))
    st = disk.stats()
    cleaned = st.lifetime.cleaning_runs + st.space.threaded_segments
    assert cleaned > 0, \
        f"wrote {written} blocks on a {data_size // BS}-block device without cleaning: {st}"
    disk.close()


# ---- hypothesis state machine ------------------------------------------------------------

NR_SM = 192


class DiskMachine(RuleBasedStateMachine):
    """Random programs of write/read/discard/flush/reopen on a small disk with a tiny
    MemTable (16 records, ratio 2): compactions happen every few writes."""

    def __init__(self):
        super().__init__()
        self.disk = None

    @initialize()
    def setup(self):
        self.cfg = Config(memtable_records=16, level_ratio=2)
        self.disk, self.data, self.meta = new_disk(24 * MiB, NR_SM, self.cfg)
        self.model = Model(NR_SM)
        self.version = 0
        self.rng = random.Random(0)

    def _clip(self, lba, n):
        return lba, max(1, min(n, NR_SM - lba))

    @rule(lba=st.integers(0, NR_SM - 1), n=st.integers(1, 12))
    def write(self, lba, n):
        lba, n = self._clip(lba, n)
        self.version += 1
        buf = make_blocks(self.rng, lba, n, self.version)
        self.disk.write(lba, buf)
        self.model.write(lba, buf)

    @rule(lba=st.integers(0, NR_SM - 1), n=st.integers(1, 40))
    def read(self, lba, n):
        lba, n = self._clip(lba, n)
        check_read(self.disk, self.model, lba, n, "state machine")

    @rule(lba=st.integers(0, NR_SM - 1), n=st.integers(1, 40))
    def discard(self, lba, n):
        lba, n = self._clip(lba, n)
        self.disk.discard(lba, n)
        self.model.discard(lba, n)

    @rule()
    def flush(self):
        self.disk.flush()

    @rule()
    def reopen(self):
        self.disk = reopen(self.disk, self.data, self.meta)

    @invariant()
    def last_lba(self):
        if self.disk is not None:
            check_read(self.disk, self.model, NR_SM - 1, 1, "state machine (last lba)")

    def teardown(self):
        try:
            if self.disk is not None:
                verify_disk(self.disk, self.model, "state machine teardown",
                            lbas=range(NR_SM))
                self.disk = reopen(self.disk, self.data, self.meta)
                verify_disk(self.disk, self.model, "state machine teardown reopen",
                            lbas=range(NR_SM))
                self.disk.close()
        finally:
            # Hypothesis keeps the tracebacks of failing examples while it shrinks, and
            # they reference the devices: free the device memory explicitly.
            if self.disk is not None:
                self.data.buf = bytearray(0)
                self.meta.buf = bytearray(0)


NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]
TestDiskMachine = DiskMachine.TestCase
# No shrinking: every shrink attempt of a failing example would keep a disk's memory
# alive through its traceback (GBs); the unshrunk failing program is printed instead.
TestDiskMachine.settings = settings(phases=NO_SHRINK, max_examples=60,
                                    stateful_step_count=60,
                                    deadline=None, database=None, derandomize=True,
                                    suppress_health_check=list(HealthCheck))


# ---- targeted patterns -------------------------------------------------------------------

@pytest.fixture
def disk_env(small_config):
    nr = 1024
    disk, data, meta = new_disk(32 * MiB, nr, small_config)
    env = {"disk": disk, "data": data, "meta": meta, "model": Model(nr), "nr": nr,
           "rng": random.Random(11), "v": 0}
    yield env
    env["disk"].close()


def _w(env, lba, n):
    env["v"] += 1
    buf = make_blocks(env["rng"], lba, n, env["v"])
    env["disk"].write(lba, buf)
    env["model"].write(lba, buf)
    return buf


def _reopen(env):
    env["disk"] = reopen(env["disk"], env["data"], env["meta"])
    return env["disk"]


def test_fresh_disk_reads_zeros(disk_env):
    d, nr = disk_env["disk"], disk_env["nr"]
    assert d.block_size == 4096 and d.nr_blocks == nr
    for lba in range(0, nr, 64):
        got = d.read(lba, 64)
        assert got == bytes(64 * BS), f"fresh disk lba {lba}: not zeros"
    assert isinstance(d.read(0, 1), bytes)


def test_sequential_whole_disk(disk_env):
    d, nr = disk_env["disk"], disk_env["nr"]
    for lba in range(0, nr, 32):
        _w(disk_env, lba, 32)
    d.flush()
    verify_disk(d, disk_env["model"], "sequential", lbas=range(nr))
    d = _reopen(disk_env)
    verify_disk(d, disk_env["model"], "sequential reopen", lbas=range(nr))
    # whole-disk reads in one request
    check_read(d, disk_env["model"], 0, nr, "sequential single read")


def test_overwrite_heavy_small_range(disk_env):
    d = disk_env["disk"]
    rng = random.Random(5)
    for i in range(1500):
        lba = rng.randrange(8)
        _w(disk_env, lba, rng.randint(1, 8 - lba))
        if i % 40 == 39:
            d.flush()
        if i % 300 == 299:
            d = _reopen(disk_env)
        if i % 17 == 0:
            check_read(d, disk_env["model"], 0, 8, f"overwrite-heavy step {i}")
    verify_disk(d, disk_env["model"], "overwrite-heavy", lbas=range(16))
    assert d.stats().lifetime.minor_compactions > 0, f"no minor compaction: {_stats_text(d)}"
    assert d.stats().lifetime.major_compactions > 0, f"no major compaction: {_stats_text(d)}"
    d = _reopen(disk_env)
    verify_disk(d, disk_env["model"], "overwrite-heavy reopen", lbas=range(16))


def test_discard_never_written(disk_env):
    d, nr = disk_env["disk"], disk_env["nr"]
    d.discard(0, nr)
    d.discard(100, 5)
    check_read(d, disk_env["model"], 0, 64, "discard never written")
    d.flush()
    d = _reopen(disk_env)
    check_read(d, disk_env["model"], 90, 30, "discard never written, reopened")
    _w(disk_env, 100, 3)
    d.discard(50, 10)
    d.flush()
    d = _reopen(disk_env)
    check_read(d, disk_env["model"], 40, 70, "discard never written then write")


def test_discard_then_write(disk_env):
    d, model = disk_env["disk"], disk_env["model"]
    _w(disk_env, 10, 10)
    d.flush()
    d.discard(12, 4)
    model.discard(12, 4)
    check_read(d, model, 8, 14, "after discard (unflushed)")
    _w(disk_env, 13, 2)
    check_read(d, model, 8, 14, "discard then write (unflushed)")
    d.flush()
    d = _reopen(disk_env)
    check_read(d, model, 8, 14, "discard then write, reopened")
    # write then discard in the same flush epoch: zeros win
    _w(disk_env, 30, 4)
    d.discard(30, 4)
    model.discard(30, 4)
    d = _reopen(disk_env)       # close flushes
    check_read(d, model, 28, 8, "write+discard same epoch, reopened")


def test_reads_across_discarded_ranges(disk_env):
    d, model = disk_env["disk"], disk_env["model"]
    _w(disk_env, 0, 64)
    d.flush()
    for lba, n in ((16, 16), (40, 1), (63, 1), (0, 1)):
        d.discard(lba, n)
        model.discard(lba, n)
    check_read(d, model, 0, 64, "across discards")
    check_read(d, model, 15, 3, "edge of discarded range")
    d.flush()
    d = _reopen(disk_env)
    check_read(d, model, 0, 64, "across discards reopened")


def test_discard_survives_compactions(disk_env):
    """A discard (tombstone) must not let an older version of the block resurface when
    the MemTable is compacted into L0 and L0 merged into lower levels."""
    d, model, nr = disk_env["disk"], disk_env["model"], disk_env["nr"]
    _w(disk_env, 0, 256)
    d.flush()
    d.discard(0, 128)
    model.discard(0, 128)
    d.flush()
    rng = random.Random(3)
    for i in range(300):
        lba = rng.randrange(256, nr - 8)
        _w(disk_env, lba, rng.randint(1, 8))
        if i % 10 == 0:
            d.flush()
    check_read(d, model, 0, 256, "tombstones after compactions")
    assert d.stats().lifetime.major_compactions > 0, f"no major compaction: {_stats_text(d)}"
    d = _reopen(disk_env)
    check_read(d, model, 0, 256, "tombstones after compactions, reopened")


def test_last_lba(disk_env):
    d, model, nr = disk_env["disk"], disk_env["model"], disk_env["nr"]
    _w(disk_env, nr - 1, 1)
    check_read(d, model, nr - 1, 1, "last lba")
    check_read(d, model, nr - 4, 4, "ending at last lba")
    d.flush()
    d = _reopen(disk_env)
    check_read(d, model, nr - 4, 4, "ending at last lba, reopened")
    _w(disk_env, nr - 3, 3)
    d.discard(nr - 1, 1)
    model.discard(nr - 1, 1)
    check_read(d, model, nr - 5, 5, "discard last lba")
    d = _reopen(disk_env)
    check_read(d, model, nr - 5, 5, "discard last lba, reopened")


def test_multi_block_reads_span_written_and_unwritten(disk_env):
    d, model = disk_env["disk"], disk_env["model"]
    for lba in (3, 5, 6, 20, 21, 22, 40):
        _w(disk_env, lba, 1)
    _w(disk_env, 60, 10)
    check_read(d, model, 0, 80, "sparse span (memtable)")
    d.flush()
    check_read(d, model, 2, 5, "sparse span after flush")
    d = _reopen(disk_env)
    check_read(d, model, 0, 80, "sparse span reopened")
    for lba, n in ((0, 1), (4, 3), (19, 5), (39, 3), (58, 14), (69, 2)):
        check_read(d, model, lba, n, "sparse sub-span")


def test_versions_across_levels(disk_env):
    """The same LBA rewritten in many epochs: versions end up in the MemTable, L0 and
    deeper levels at once; reads must always take the newest."""
    d, model = disk_env["disk"], disk_env["model"]
    rng = random.Random(9)
    for epoch in range(40):
        _w(disk_env, 0, 16)                       # hot range, every epoch
        for _ in range(6):
            _w(disk_env, rng.randrange(16, 900), rng.randint(1, 4))
        if epoch % 3 == 0:
            lba, n = rng.randrange(12), 1 + rng.randrange(4)
            d.discard(lba, n)
            model.discard(lba, n)
        d.flush()
        check_read(d, model, 0, 16, f"versions epoch {epoch}")
    d = _reopen(disk_env)
    verify_disk(d, model, "versions reopened")


def test_read_your_writes_before_flush_and_after_close(disk_env):
    d, model = disk_env["disk"], disk_env["model"]
    _w(disk_env, 7, 3)
    check_read(d, model, 7, 3, "unflushed read-your-writes")
    d = _reopen(disk_env)            # close() flushes
    check_read(d, model, 7, 3, "close flushed")


def test_write_accepts_bytearray_and_memoryview(disk_env):
    d = disk_env["disk"]
    blk = bytes(range(256)) * 16
    d.write(1, bytearray(blk))
    d.write(2, memoryview(blk))
    assert d.read(1, 2) == blk + blk
    assert d.read(0, 1) == ZERO


def test_big_disk_default_size():
    """nr_blocks=None gives usable_blocks(data_size); the last LBA of that works."""
    data_size = 48 * MiB
    data = MemoryDevice(data_size)
    meta = MemoryDevice(meta_size_for(data_size))
    disk = SwornDisk.create(data, meta, KEY16)
    assert disk.nr_blocks == SwornDisk.usable_blocks(data_size)
    last = disk.nr_blocks - 1
    blk = b"\xa5" * BS
    disk.write(last, blk)
    disk.close()
    disk = SwornDisk.open(data, meta, KEY16)
    assert disk.nr_blocks == SwornDisk.usable_blocks(data_size)
    assert disk.read(last, 1) == blk
    assert disk.read(last - 1, 1) == ZERO
    disk.close()


def test_tiny_node_cache():
    """The smallest BIT node cache (64 nodes): lookups constantly miss and evict."""
    cfg = Config(memtable_records=32, level_ratio=2, node_cache_bytes=64 * BS)
    disk, data, meta, model, ctx = random_run(8, cfg, 2048, 1500, hot=256)
    verify_disk(disk, model, ctx + " final", lbas=range(2048))
    disk = reopen(disk, data, meta)
    verify_disk(disk, model, ctx + " reopen", lbas=range(2048))
    st = disk.stats()
    assert st.session.node_cache_misses > 0, st
    disk.close()


def test_discard_spanning_a_large_range():
    """A discard of ~70000 blocks (longer than any internal batching window) tombstones
    every mapped block in it, at both ends and across 2^16 boundaries."""
    nr = 70000
    cfg = Config(memtable_records=64, level_ratio=2)
    data_size = (nr // 1024 + 4) * 4 * MiB
    disk, data, meta = new_disk(data_size, nr, cfg)
    model = Model(nr)
    rng = random.Random(12)
    marks = [0, 1, 2, 65534, 65535, 65536, 65537, 2 * 4096, nr - 2, nr - 1]
    for lba in marks:
        buf = make_blocks(rng, lba, 1, 1)
        disk.write(lba, buf)
        model.write(lba, buf)
    disk.flush()
    disk.discard(1, nr - 2)                # keeps 0 and nr-1
    model.discard(1, nr - 2)
    for lba in marks:
        check_read(disk, model, lba, 1, "large discard (unflushed)")
    disk.flush()
    for lba in marks:
        check_read(disk, model, lba, 1, "large discard (flushed)")
    disk = reopen(disk, data, meta)
    for lba in marks:
        check_read(disk, model, lba, 1, "large discard (reopened)")
    check_read(disk, model, 65530, 12, "large discard span")
    disk.close()


def test_reformat_over_an_old_disk_reads_zeros():
    """create() on devices that hold an older SwornDisk (same key): a brand-new, empty disk;
    nothing of the old one (journal, checkpoints, BITs, data) leaks into it."""
    cfg = Config(memtable_records=32, level_ratio=2)
    rng = random.Random(13)
    disk, data, meta = new_disk(24 * MiB, 512, cfg)
    for lba in range(0, 512, 4):
        disk.write(lba, make_blocks(rng, lba, 3, 1))
        if lba % 64 == 0:
            disk.flush()
    disk.flush()                           # no close: a journal tail is left behind
    disk2 = SwornDisk.create(data, meta, KEY16, nr_blocks=512, config=cfg)
    assert disk2.read(0, 512) == bytes(512 * BS)
    disk2.write(5, b"n" * BS)
    disk2.close()
    disk3 = SwornDisk.open(data, meta, KEY16)
    model = Model(512)
    model.write(5, b"n" * BS)
    verify_disk(disk3, model, "re-formatted disk", lbas=range(512))
    disk3.close()


def test_single_request_larger_than_a_segment():
    """One write() of 3000 blocks (the segment buffer holds 1024) and one read() of all."""
    cfg = Config(memtable_records=256, level_ratio=2)
    nr = 4096
    disk, data, meta = new_disk(40 * MiB, nr, cfg)
    rng = random.Random(14)
    model = Model(nr)
    buf = make_blocks(rng, 500, 3000, 1)
    disk.write(500, buf)
    model.write(500, buf)
    check_read(disk, model, 0, nr, "huge request, unflushed")
    buf2 = make_blocks(rng, 1000, 1500, 2)          # overwrite the middle, still unflushed
    disk.write(1000, buf2)
    model.write(1000, buf2)
    check_read(disk, model, 400, 3200, "huge overwrite, unflushed")
    disk.flush()
    check_read(disk, model, 0, nr, "huge request, flushed")
    disk = reopen(disk, data, meta)
    check_read(disk, model, 0, nr, "huge request, reopened")
    disk.close()
