"""Crypto workers (cryptopool.py, cryptoworker.py): real worker processes, no mocks.

Same bytes whichever path seals; nothing left behind by open/close; a worker killed with
SIGKILL during writes and during reads costs nothing that was acknowledged and is
replaced; workers are not dumpable and their region is not a named file."""
from __future__ import annotations

import errno
import gc
import os
import random
import signal
import threading
import time

import pytest

from sworndisk import Config, IntegrityError, InvalidArgument, SwornDisk
from sworndisk import crypto, cryptopool
from sworndisk.cryptopool import CryptoPool, automatic_workers
from sworndisk.device import FileDevice, create_image
from sworndisk.format import SEGMENT_BLOCKS

from .conftest import (BS, KEY16, MiB, Model, make_block, meta_size_for, new_devices, new_disk,
                       verify_disk)


def _children() -> list[int]:
    """Live child processes of this process (from /proc, zombies included)."""
    me, kids = os.getpid(), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                kids.append(int(name))
    return kids


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_config_crypto_workers_is_runtime_only():
    assert "crypto_workers" not in Config(crypto_workers=3).to_dict()
    assert Config.from_dict(Config(crypto_workers=3).to_dict()).crypto_workers is None
    for bad in (-1, 65, "2", 1.5):
        with pytest.raises(InvalidArgument, match="crypto_workers"):
            Config(crypto_workers=bad).validate()
    assert automatic_workers() == max(0, min(8, len(os.sched_getaffinity(0)) - 1))


def test_workers_zero_is_in_thread():
    kids = _children()
    disk, _, _ = new_disk(config=Config(crypto_workers=0))
    assert _children() == kids
    rng = random.Random(3)
    model = Model(disk.nr_blocks)
    for lba in rng.sample(range(disk.nr_blocks), 2000):
        b = make_block(rng, lba, 0)
        disk.write(lba, b)
        model.write(lba, b)
    disk.flush()
    verify_disk(disk, model)
    st = disk.stats().crypto
    assert (st.workers, st.worker_pids, st.batches, st.blocks_in_workers) == (0, (), 0, 0)
    assert st.blocks_inline >= 4000
    disk.close()


def test_pool_seals_the_same_bytes_as_the_thread():
    """The ciphertext format is unchanged: a worker's seal equals crypto.seal_blocks' with
    the same keys and nonces, and opens with crypto.decrypt."""
    pool = CryptoPool(2, 16)
    try:
        rng = random.Random(5)
        plain = pool.plaintext(1)
        plain[:] = rng.randbytes(SEGMENT_BLOCKS * BS)
        slots = sorted(rng.sample(range(SEGMENT_BLOCKS), 700))
        assert pool.dumpable() == (0, 0)            # both workers up
        job = pool.seal_start(1, slots)
        time.sleep(0.5)                             # ~2 ms of work: the workers do it all
        material, tags, sealed = job.result()
        sealed = bytes(sealed)
        st = pool.stats()
        assert st.blocks_in_workers == 700 and st.batches == 6 and st.blocks_taken_over == 0
        out = bytearray(len(slots) * BS + 16)
        tags2 = bytearray(len(slots) * 16)
        crypto.seal_blocks(material, 16, bytes(plain), slots, out, tags2, 0)
        assert sealed == bytes(out[:len(slots) * BS]) and tags == bytes(tags2)
        j = 699
        key, nonce = material[j * 28:j * 28 + 16], material[j * 28 + 16:j * 28 + 28]
        assert crypto.decrypt(key, nonce, sealed[j * BS:(j + 1) * BS], tags[j * 16:j * 16 + 16],
                              "block") == bytes(plain[slots[j] * BS:(slots[j] + 1) * BS])
        # the region's copy of the keys is zeroed once the seal is collected
        assert not any(pool.mem[:len(material)])
    finally:
        pool.close()


def _stopped_worker_seal(again: bool):
    """Seals half a segment with the one worker stopped: the calling thread takes over
    every chunk. While the worker is stopped, the region's ciphertext and tag places stay
    as they were (the thread seals into its own buffers); `again` clears the claim bytes
    before the worker resumes, so it seals every chunk too, in the region. Returns the
    stats and whether the region was untouched while the worker was stopped."""
    pool = CryptoPool(1, 16)
    try:
        rng = random.Random(6)
        plain = pool.plaintext(0)
        plain[:] = rng.randbytes(SEGMENT_BLOCKS * BS)
        slots = list(range(0, SEGMENT_BLOCKS, 2))
        assert pool.dumpable() == (0,)
        area = pool.seal_areas[0]
        region = pool.mem[area.out:area.out + len(slots) * BS]
        region[:] = bytes(len(region))
        pid = pool.pids()[0]
        os.kill(pid, signal.SIGSTOP)
        seen = {}

        def resume():
            seen["untouched"] = not any(region)
            if again:
                pool.mem[area.claims:area.claims + 4] = bytes(4)
            os.kill(pid, signal.SIGCONT)
        resumed = threading.Timer(0.5, resume)
        resumed.start()
        t0 = time.monotonic()
        material, tags, sealed = pool.seal_start(0, slots).result()
        assert time.monotonic() - t0 >= 0.4         # it waited for the stopped worker's reply
        out = bytearray(len(slots) * BS + 16)
        tags2 = bytearray(len(slots) * 16)
        crypto.seal_blocks(material, 16, bytes(plain), slots, out, tags2, 0)
        assert bytes(sealed) == bytes(out[:len(slots) * BS]) and tags == bytes(tags2)
        resumed.join()
        region.release()
        return pool.stats(), seen["untouched"]
    finally:
        pool.close()


def test_engine_takes_over_a_stopped_worker_seal_in_its_own_buffer():
    """The calling thread seals the chunks no worker has started instead of waiting, but
    writes the region only once every reply is in: a worker sealing the same chunk reads
    each tag back from the region, where the thread's next ciphertext would go."""
    st, untouched = _stopped_worker_seal(again=False)
    assert untouched
    assert st.blocks_taken_over == SEGMENT_BLOCKS // 2 and st.blocks_in_workers == 0


def test_a_chunk_sealed_twice_gives_the_same_bytes():
    """The claim byte is not atomic across processes: when the worker seals the chunks
    the thread took over, the result is still the one seal (same keys, same bytes)."""
    st, untouched = _stopped_worker_seal(again=True)
    assert untouched and st.blocks_taken_over == SEGMENT_BLOCKS // 2


def test_pool_open_fails_only_the_bad_block():
    pool = CryptoPool(1, 16)
    try:
        rng = random.Random(6)
        values, raws, plains = [], [], []
        for i in range(40):
            key, nonce, pt = rng.randbytes(16), rng.randbytes(12), rng.randbytes(BS)
            ct, tag = crypto.encrypt(key, nonce, pt)
            if i == 17:
                ct = bytes([ct[0] ^ 1]) + ct[1:]
            values.append(bytes(8) + key + nonce + tag)
            raws.append(ct)
            plains.append(pt)
        dsts = [memoryview(bytearray(BS)) for _ in values]
        assert pool.open_start(values, 8, [b"".join(raws[:5])] + raws[5:], dsts).result() == [17]
        assert all(bytes(d) == p for i, (d, p) in enumerate(zip(dsts, plains)) if i != 17)
        assert pool.stats().blocks_in_workers > 0
    finally:
        pool.close()


def test_workers_not_dumpable_and_region_not_a_named_file():
    shm = set(os.listdir("/dev/shm"))
    disk, _, _ = new_disk(config=Config(crypto_workers=2))
    try:
        pool = disk.debug.pool
        assert pool.pids() == ()                # started at the first job, or here:
        assert pool.dumpable() == (0, 0)
        assert len(pool.pids()) == 2 and set(pool.pids()) <= set(_children())
        with open("/proc/self/maps") as f:
            maps = f.read()
        assert "/memfd:sworndisk-crypto (deleted)" in maps
        assert set(os.listdir("/dev/shm")) == shm
        for pid in pool.pids():            # no descriptor of the worker is a named file
            for target in _fd_targets(pid):
                assert not target.startswith("/dev/shm"), target
    finally:
        disk.close()


def _fd_targets(pid: int) -> list[str]:
    """What the descriptors of process `pid` name now."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:           # closed meanwhile
            pass
    return out


def test_a_worker_gets_the_region_only_once_it_is_not_dumpable(tmp_path, monkeypatch):
    """A process is dumpable from its exec until its prctl, and in that window another
    process of the same user may open its descriptors through /proc: a worker must not
    hold the region (plaintext and keys) or the data device before it said it is not
    dumpable. It is started with its socket alone and sent the rest afterwards."""
    started = []
    popen = cryptopool.subprocess.Popen

    def spawn(*args, **kwargs):
        proc = popen(*args, **kwargs)           # exec done: what the worker starts with
        started.append((proc.pid, _fd_targets(proc.pid)))
        return proc
    monkeypatch.setattr(cryptopool.subprocess, "Popen", spawn)
    disk, _, _ = _file_disk(tmp_path, 1)
    try:
        pool = disk.debug.pool
        assert pool.dumpable() == (0,)
        (pid, at_exec), = started
        assert not any("memfd:" in t or t.endswith(".img") for t in at_exec), at_exec
        assert sum(t.startswith("socket:") for t in at_exec) == 1
        with open(f"/proc/{pid}/maps") as f:    # and now it has them
            assert "/memfd:sworndisk-crypto (deleted)" in f.read()
        assert any(t.endswith("data.img") for t in _fd_targets(pid))
    finally:
        disk.close()


def test_a_traced_worker_is_not_given_the_region(monkeypatch):
    """A worker something traces (attached in its dumpable window) is stopped, not sent
    the region: starting the pool fails instead, and no process is left behind."""
    kids = _children()
    monkeypatch.setattr(cryptopool, "_tracer", lambda pid: 4242)
    pool = CryptoPool(1, 16)
    try:
        with pytest.raises(OSError) as e:
            pool.start()
        assert e.value.errno == errno.EPERM
        assert pool.pids() == () and _children() == kids
    finally:
        pool.close()


def test_a_worker_killed_during_its_start_up_is_started_again(monkeypatch):
    """The first worker dies before READY (SIGKILL right after its exec): the pool starts
    another, and the job it was started for is done."""
    spawned = []
    popen = cryptopool.subprocess.Popen

    def spawn(*args, **kwargs):
        proc = popen(*args, **kwargs)
        if not spawned:
            os.kill(proc.pid, signal.SIGKILL)
        spawned.append(proc.pid)
        return proc
    monkeypatch.setattr(cryptopool.subprocess, "Popen", spawn)
    kids = _children()
    disk, _, _ = new_disk(config=Config(crypto_workers=1))
    try:
        rng = random.Random(3)
        blocks = [make_block(rng, lba, 1) for lba in range(2 * SEGMENT_BLOCKS)]
        disk.write(0, b"".join(blocks))
        disk.flush()
        assert disk.read_many([(lba, 1) for lba in range(64)]) == blocks[:64]
        pool = disk.debug.pool
        assert len(spawned) == 2 and pool.pids() == (spawned[1],)
        assert disk.stats().crypto.blocks_in_workers > 0
    finally:
        disk.close()
    assert _children() == kids                  # the killed one was reaped too


def test_workers_start_together(monkeypatch):
    """Every worker of a pool is started before the first one is waited for: their
    Python start-ups overlap instead of adding up at the disk's first job."""
    spawned, at_first_share = [], []
    popen, share = cryptopool.subprocess.Popen, cryptopool._Worker.share

    def spawn(*args, **kwargs):
        proc = popen(*args, **kwargs)
        spawned.append(proc.pid)
        return proc

    def first_share(self, memfd, data_fd):
        if not at_first_share:
            at_first_share.append(len(spawned))
        share(self, memfd, data_fd)
    monkeypatch.setattr(cryptopool.subprocess, "Popen", spawn)
    monkeypatch.setattr(cryptopool._Worker, "share", first_share)
    kids = _children()
    pool = CryptoPool(4, 16)
    try:
        pool.start()
        assert at_first_share == [4] and sorted(pool.pids()) == sorted(spawned)
        assert pool.dumpable() == (0, 0, 0, 0)
    finally:
        pool.close()
    assert _children() == kids


def test_open_close_cycles_leave_nothing():
    """100 open/close cycles with the default (automatic) pool: no child process, no
    descriptor left over."""
    data, meta = new_devices()
    SwornDisk.create(data, meta, KEY16, config=Config(crypto_workers=0)).close()
    gc.collect()                # disks earlier tests dropped unclosed end their pools now
    kids, fds = _children(), _fds()
    workers = automatic_workers()
    for i in range(100):
        disk = SwornDisk.open(data, meta, KEY16)
        disk.write(i, bytes([i]) * BS)
        disk.flush()
        disk.read_many([(lba, 1) for lba in range(max(0, i - 9), i + 1)])   # a pool job
        assert len(disk.stats().crypto.worker_pids) == (workers if i >= 7 else 0)
        disk.close()
    assert _children() == kids
    assert _fds() == fds
    disk = SwornDisk.open(data, meta, KEY16, config=Config(crypto_workers=0))
    assert [disk.read(i, 1) for i in range(100)] == [bytes([i]) * BS for i in range(100)]
    disk.close()


class _Killer(threading.Thread):
    """SIGKILLs a worker of the disk every `every` seconds, `times` different ones (a
    killed worker stays in the pool until the pool notices, at its next job)."""

    def __init__(self, pool, times: int, every: float):
        super().__init__(daemon=True)
        self.pool, self.times, self.every = pool, times, every
        self.killed: list[int] = []

    def run(self):
        while len(self.killed) < self.times:
            time.sleep(self.every)
            alive = [p for p in self.pool.pids() if p not in self.killed]
            if alive:                   # else the pool has not noticed the last kill yet
                pid = random.choice(alive)
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)


def test_worker_killed_during_writes_and_flushes():
    disk, data, meta = new_disk(64 * MiB, config=Config(crypto_workers=2))
    rng = random.Random(7)
    model = Model(disk.nr_blocks)
    killer = _Killer(disk.debug.pool, 4, 0.15)
    killer.start()
    version = 0
    while killer.is_alive() or version < 3:
        version += 1
        for lba in rng.sample(range(disk.nr_blocks), 3000):
            b = make_block(rng, lba, version)
            disk.write(lba, b)
            model.write(lba, b)
        disk.flush()
    killer.join()
    # One more round, so that a kill during the last round is noticed (at a job) too.
    for lba in rng.sample(range(disk.nr_blocks), 3000):
        b = make_block(rng, lba, version + 1)
        disk.write(lba, b)
        model.write(lba, b)
    disk.flush()
    assert len(killer.killed) == 4
    st = disk.stats().crypto
    assert st.worker_restarts >= 1 and len(st.worker_pids) == 2
    assert not set(killer.killed) & set(st.worker_pids)
    verify_disk(disk, model)
    disk.close()
    disk = SwornDisk.open(data, meta, KEY16, config=Config(crypto_workers=0))
    verify_disk(disk, model)                # what reached the device is right too
    disk.close()


def _read_while_killing(disk, lbas: list, model: Model) -> None:
    """read_many of `lbas` in batches of 64, each block checked against the model, while
    4 workers are SIGKILLed one after another (and two more rounds)."""
    killer = _Killer(disk.debug.pool, 4, 0.1)
    killer.start()
    rounds = 0
    while killer.is_alive() or rounds < 2:
        rounds += 1
        for i in range(0, len(lbas), 64):
            batch = lbas[i:i + 64]
            got = disk.read_many([(lba, 1) for lba in batch])
            for lba, g in zip(batch, got):
                assert g == model.get(lba), f"LBA {lba} wrong after a worker died"
    killer.join()
    assert len(killer.killed) == 4


def test_worker_killed_during_read_many():
    disk, _, _ = new_disk(64 * MiB, config=Config(crypto_workers=2))
    rng = random.Random(8)
    model = Model(disk.nr_blocks)
    lbas = rng.sample(range(disk.nr_blocks), 6000)
    for lba in lbas:
        b = make_block(rng, lba, 1)
        disk.write(lba, b)
        model.write(lba, b)
    disk.flush()
    _read_while_killing(disk, lbas, model)
    assert disk.stats().crypto.worker_restarts >= 1
    disk.close()


def _kill_and_wait(pid: int) -> None:
    """SIGKILLs a worker and waits until it has exited (not reaping it: the pool does)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_stats_survives_a_worker_that_cannot_be_replaced(monkeypatch):
    """A dead worker whose replacement is refused (here: traced) leaves the pool one
    short; stats() says so rather than raise (the ublk server calls it from its main
    loop), and the next job starts the missing worker."""
    disk, _, _ = new_disk(config=Config(crypto_workers=2))
    try:
        pool = disk.debug.pool
        assert pool.dumpable() == (0, 0)
        victim, other = pool.pids()
        _kill_and_wait(victim)
        monkeypatch.setattr(cryptopool, "_tracer", lambda pid: 4242)
        st = disk.stats().crypto
        assert st.worker_restarts == 1 and st.worker_pids == (other,)
        assert victim not in _children()
        monkeypatch.undo()
        rng = random.Random(5)
        disk.write(0, b"".join(make_block(rng, lba, 1) for lba in range(2 * SEGMENT_BLOCKS)))
        disk.flush()
        assert len(disk.stats().crypto.worker_pids) == 2
    finally:
        disk.close()


def test_a_worker_killed_while_idle_is_replaced_by_the_next_stats():
    """stats() shows a pool that is whole: a worker that died with nothing in flight is
    replaced (and reaped) there, not only when the next job would meet it."""
    disk, _, _ = new_disk(config=Config(crypto_workers=2))
    try:
        pool = disk.debug.pool
        assert pool.dumpable() == (0, 0)
        victim = pool.pids()[0]
        _kill_and_wait(victim)
        st = disk.stats().crypto
        assert st.worker_restarts == 1
        assert victim not in st.worker_pids and len(st.worker_pids) == 2
        assert victim not in _children()        # reaped, not left a zombie
        assert pool.dumpable() == (0, 0)
    finally:
        disk.close()


def test_tampered_block_fails_its_range_through_the_pool():
    disk, data, _ = new_disk(config=Config(crypto_workers=1))
    rng = random.Random(9)
    blocks = {lba: make_block(rng, lba, 0) for lba in range(64)}
    for lba, b in blocks.items():
        disk.write(lba, b)
    disk.flush()
    hba = int.from_bytes(disk.debug.index.get(10)[:8], "little")
    data.buf[hba * BS] ^= 1
    before = disk.stats().crypto.blocks_in_workers
    got = disk.read_many([(lba, 1) for lba in range(64)])
    assert disk.stats().crypto.blocks_in_workers > before
    assert isinstance(got[10], IntegrityError)
    assert all(got[l] == blocks[l] for l in range(64) if l != 10)
    disk.close()


# ---- fetch jobs: the workers read the data device themselves (file-backed disks) ----------

def _file_disk(tmp_path, workers: int, data_size: int = 64 * MiB):
    """A disk on image files (O_DIRECT), so that its workers can read the data device."""
    data, meta = str(tmp_path / "data.img"), str(tmp_path / "meta.img")
    create_image(data, data_size)
    create_image(meta, meta_size_for(data_size))
    disk = SwornDisk.create(data, meta, KEY16, config=Config(crypto_workers=workers))
    return disk, data, meta


def _fill(disk, rng: random.Random, n: int, model: Model) -> list[int]:
    lbas = rng.sample(range(disk.nr_blocks), n)
    for i in range(0, n, 32):
        items = [(lba, make_block(rng, lba, 1)) for lba in lbas[i:i + 32]]
        disk.write_many(items)
        for lba, b in items:
            model.write(lba, b)
    disk.flush()
    return lbas


@pytest.mark.parametrize("workers", [0, 1])
def test_empty_ranges_in_a_batch_read_as_nothing(tmp_path, workers):
    """Ranges of no block among ranges of one or two (read_many's fast paths for batches
    of single blocks must not take them for one-block ranges)."""
    disk, _, _ = _file_disk(tmp_path, workers)
    rng = random.Random(7)
    model = Model(disk.nr_blocks)
    _fill(disk, rng, 64, model)
    buf = make_block(rng, 5, 3) * 2
    disk.write(5, buf)
    model.write(5, buf)
    disk.flush()
    for ranges in ([(0, 0)] + [(lba, 1) for lba in range(1, 10)],
                   [(0, 0)] * 5 + [(5, 2)] * 5,
                   [(0, 0), (5, 2)] + [(20, 0)] * 8):
        assert disk.read_many(ranges) == [model.read(l, n) for l, n in ranges]
    disk.close()


def _filled_with_a_worker(tmp_path, seed: int):
    """(disk, rng, model, the 200 LBAs written and flushed, its one worker's pid)."""
    disk, _, _ = _file_disk(tmp_path, 1)
    rng = random.Random(seed)
    model = Model(disk.nr_blocks)
    lbas = _fill(disk, rng, 200, model)
    disk.debug.pool.start()
    return disk, rng, model, lbas, disk.debug.pool.pids()[0]


def test_fetch_reads_through_the_workers(tmp_path):
    disk, data, meta = _file_disk(tmp_path, 1)
    rng = random.Random(21)
    model = Model(disk.nr_blocks)
    lbas = _fill(disk, rng, 3000, model)
    long_run = make_block(rng, 100, 2) * 600                # several lanes' worth
    disk.write(100, long_run)
    model.write(100, long_run)
    disk.close()
    disk = SwornDisk.open(data, meta, KEY16, config=Config(crypto_workers=1))
    assert disk.debug.pool.can_fetch
    before = disk.stats()
    for i in range(0, len(lbas), 32):
        batch = lbas[i:i + 32]
        assert disk.read_many([(lba, 1) for lba in batch]) == [model.get(l) for l in batch]
    ranges = [(90, 620), (5, 3), (disk.nr_blocks - 40, 40), (2000, 300)]    # holes too
    assert disk.read_many(ranges) == [model.read(l, n) for l, n in ranges]
    after = disk.stats()
    # a batch larger than the lanes (2 of 256 blocks): its chunks go as lanes free up
    assert after.crypto.blocks_fetched - before.crypto.blocks_fetched >= 3000 + 600
    assert after.crypto.batches > before.crypto.batches
    # the workers' reads are counted as the disk's own, with the thread's
    assert after.session.data_bytes_read - before.session.data_bytes_read >= (3000 + 600) * BS
    disk.close()


def test_reads_started_then_overwritten_return_the_data_of_their_start(tmp_path):
    """A started batch whose chunks wait for a lane (every lane held by another started
    read) has them read by the first write's fence, before anything is written: blocks
    overwritten, freed and reused before its result() do not turn into errors."""
    disk, _, _ = _file_disk(tmp_path, 1, 16 * MiB)
    old, new = b"A" * BS, b"B" * BS
    disk.write_many([(lba, old) for lba in range(1024)])
    disk.flush()
    hold = disk.start_reads([(0, 256), (256, 256)])         # both lanes held
    pending = disk.start_reads([(0, 512), (512, 512)])

    def reads_inline():             # blocks verified in the thread, seals aside
        c = disk.stats().crypto
        return c.blocks_inline - c.blocks_taken_over
    inline = reads_inline()
    disk.write_many([(lba, new) for lba in range(1024)])
    disk.flush()
    assert reads_inline() == inline                         # read, not verified yet
    for k in range(3):                                      # the freed blocks reused
        disk.write_many([(1024 + lba, bytes([67 + k]) * BS) for lba in range(1024)])
        disk.flush()
    assert pending.result() == [old * 512, old * 512]
    assert reads_inline() - inline == 1024                  # the fence read them all
    assert hold.result() == [old * 256, old * 256]
    assert disk.read_many([(0, 512), (512, 512)]) == [new * 512, new * 512]
    disk.close()


def test_fetch_tampered_block_fails_its_range_alone(tmp_path):
    disk, data, meta = _file_disk(tmp_path, 1)
    rng = random.Random(22)
    blocks = {lba: make_block(rng, lba, 0) for lba in range(64)}
    disk.write_many(list(blocks.items()))
    disk.flush()
    hba = int.from_bytes(disk.debug.index.get(10)[:8], "little")
    fd = os.open(data, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, hba * BS + 7)
        os.pwrite(fd, bytes([byte[0] ^ 1]), hba * BS + 7)
        os.fsync(fd)
    finally:
        os.close(fd)
    before = disk.stats().crypto.blocks_in_workers
    got = disk.read_many([(lba, 1) for lba in range(64)])
    assert disk.stats().crypto.blocks_in_workers - before == 64
    assert isinstance(got[10], IntegrityError)
    assert all(got[l] == blocks[l] for l in range(64) if l != 10)
    disk.close()


def test_fetch_read_error_raises_eio(tmp_path):
    """A block the worker cannot read (here: the image cut short under the open disk)
    fails the call with EIO, never with wrong data; blocks still there read fine."""
    disk, data, _ = _file_disk(tmp_path, 1)
    rng = random.Random(23)
    model = Model(disk.nr_blocks)
    disk.write_many([(lba, make_block(rng, lba, 0)) for lba in range(64)])
    disk.flush()
    disk.write_many([(lba, make_block(rng, lba, 1)) for lba in range(1000, 1100)])
    disk.flush()
    for lba in range(64):
        model.write(lba, disk.read(lba, 1))
    last = int.from_bytes(disk.debug.index.get(1099)[:8], "little")
    first = int.from_bytes(disk.debug.index.get(0)[:8], "little")
    assert last > first + 64
    os.truncate(data, last * BS)                # the last block's place is gone
    with pytest.raises(OSError) as e:
        disk.read_many([(lba, 1) for lba in range(1000, 1100)])
    assert e.value.errno == errno.EIO
    assert disk.read_many([(lba, 1) for lba in range(64)]) == [model.get(l) for l in range(64)]
    disk.close()


def test_worker_killed_during_fetches(tmp_path):
    disk, data, meta = _file_disk(tmp_path, 2)
    rng = random.Random(24)
    model = Model(disk.nr_blocks)
    lbas = _fill(disk, rng, 6000, model)
    assert disk.debug.pool.can_fetch
    _read_while_killing(disk, lbas, model)
    assert disk.stats().crypto.worker_restarts >= 1
    disk.close()


def test_device_writes_wait_for_reads_in_flight(tmp_path):
    """A worker's read must not see its block overwritten under it: the data device's
    writes wait until no fetch is in flight (here the worker is stopped mid-job)."""
    disk, rng, model, lbas, pid = _filled_with_a_worker(tmp_path, 25)
    os.kill(pid, signal.SIGSTOP)
    try:
        pending = disk.start_reads([(lba, 1) for lba in lbas[:32]])     # in flight
        for lba in range(10):                   # a few blocks: sealed in this thread
            b = make_block(rng, lba, 9)
            disk.write(lba, b)
            model.write(lba, b)
        flusher = threading.Thread(target=disk.flush, daemon=True)
        flusher.start()
        flusher.join(0.5)
        assert flusher.is_alive(), "the flush wrote data blocks while a read was in flight"
    finally:
        os.kill(pid, signal.SIGCONT)
    flusher.join(30)
    assert not flusher.is_alive()
    assert pending.result() == [model.get(l) for l in lbas[:32]]
    verify_disk(disk, model)
    disk.close()


def test_more_reads_started_than_lanes_finish_in_any_order(tmp_path):
    """One thread holding more started reads than the pool has lanes, finishing them
    last first: the reads that found no free lane are done in the thread, none waits."""
    disk, _, _ = _file_disk(tmp_path, 1)
    rng = random.Random(26)
    model = Model(disk.nr_blocks)
    lbas = _fill(disk, rng, 400, model)
    inline = disk.stats().crypto.blocks_inline
    batches = [lbas[i:i + 32] for i in range(0, 192, 32)]          # 6 batches, 2 lanes
    out: dict = {}

    def run():
        pending = [disk.start_reads([(lba, 1) for lba in b]) for b in batches]
        for i in reversed(range(len(batches))):
            out[i] = pending[i].result()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "reads waiting for lanes held by reads not yet finished"
    assert [out[i] for i in range(len(batches))] == [[model.get(l) for l in b] for b in batches]
    assert disk.stats().crypto.blocks_inline - inline >= 4 * 32
    disk.close()


def test_fence_is_called_before_every_device_write(tmp_path):
    path = str(tmp_path / "f.img")
    create_image(path, MiB)
    dev = FileDevice(path)
    calls = []
    dev.fence_writes(lambda: calls.append(1))
    dev.pwrite(bytes(BS), 0)
    dev.pwrite_many([(bytes(BS), BS), (bytes(BS), 2 * BS)])
    dev.discard(0, BS)
    assert len(calls) == 3
    dev.fence_writes(None)
    dev.pwrite(bytes(BS), 0)
    assert len(calls) == 3
    dev.close()


def test_fetched_reads_leave_no_garbage_cycles(tmp_path):
    """A read's results must be freed when the caller drops them, not at the next
    garbage collection: at depth 32 one 1 MiB batch is 32 MiB (a cycle through the
    results once let the engine's RSS grow past 1 GiB on sequential reads)."""
    disk, _, _ = _file_disk(tmp_path, 1)
    rng = random.Random(27)
    disk.write(0, make_block(rng, 0, 1) * 2048)
    disk.flush()
    disk.read_many([(lba, 1) for lba in range(64)])
    gc.collect()
    gc.disable()
    try:
        fetched = disk.stats().crypto.blocks_fetched
        for i in range(8):
            disk.read_many([(lba, 1) for lba in range(i * 64, i * 64 + 64)])
            disk.read_many([(lba, 256) for lba in range(0, 256 * 8, 256)])
        assert disk.stats().crypto.blocks_fetched - fetched == 8 * (64 + 256 * 8)
        assert gc.collect() == 0
    finally:
        gc.enable()
    disk.close()


def test_a_failed_respawn_leaves_the_pool_working(tmp_path, monkeypatch):
    """A worker dies and its replacement cannot start (fork or descriptor limits): the
    call that met it fails, with nothing of its work lost or stranded, and the next call
    starts a worker; writes are not held up by a fence waiting on nobody."""
    disk, rng, model, lbas, dead = _filled_with_a_worker(tmp_path, 28)
    pool = disk.debug.pool
    os.kill(dead, signal.SIGKILL)
    os.waitid(os.P_PID, dead, os.WEXITED | os.WNOWAIT)     # dead, not reaped yet
    spawn, failures = pool._spawner.workers, []

    def fail_once(n):
        if not failures:
            failures.append(1)
            raise OSError(errno.EMFILE, "Too many open files")
        return spawn(n)
    monkeypatch.setattr(pool._spawner, "workers", fail_once)
    batch = [(lba, 1) for lba in lbas[:32]]
    try:
        got = disk.read_many(batch)     # may still be answered (the job redone here)
        assert got == [model.get(l) for l in lbas[:32]]
    except OSError as e:
        assert e.errno == errno.EMFILE
    assert failures == [1]
    assert disk.read_many(batch) == [model.get(l) for l in lbas[:32]]
    b = make_block(rng, 7, 3)
    disk.write(7, b)
    model.write(7, b)
    disk.flush()
    verify_disk(disk, model)
    st = disk.stats().crypto
    assert st.worker_restarts >= 1 and dead not in st.worker_pids and len(st.worker_pids) == 1
    disk.close()


def test_bit_nodes_are_sealed_by_the_workers_and_the_thread_together():
    """A compaction's leaves are sealed in batches shared by the workers and the thread;
    the index they make reads back right after a reopen (every node read from the device
    and verified) and the thread's share is counted apart from the data blocks."""
    disk, data, meta = new_disk(data_size=64 * MiB,
                                config=Config(crypto_workers=1, memtable_records=8192))
    rng = random.Random(31)
    model = Model(disk.nr_blocks)
    _fill(disk, rng, 12000, model)              # a minor compaction: ~120 leaves
    st = disk.stats().crypto
    assert st.nodes_in_workers >= 64 and st.nodes_sealed > st.nodes_in_workers
    disk.close()
    disk = SwornDisk.open(data, meta, KEY16, config=Config(crypto_workers=0))
    verify_disk(disk, model)
    disk.close()


def test_a_node_batch_whose_worker_died_is_sealed_here():
    """seal_blocks' jobs meet a killed worker: they are redone in the thread, the bytes
    are the ones crypto.seal_blocks makes with the same keys, and they stay node counts."""
    pool = CryptoPool(1, 16)
    try:
        rng = random.Random(32)
        n = 3 * 256
        plain = memoryview(bytearray(rng.randbytes(n * BS)))
        assert pool.dumpable() == (0,)
        os.kill(pool.pids()[0], signal.SIGKILL)
        material, tags, out = pool.seal_blocks(plain, n)
        st = pool.stats()
        assert st.worker_restarts == 1 and st.nodes_sealed == n
        # the worker's share is 384 nodes: a lane of 256 went to the dead one and was
        # redone here, the other 128 to the dead one or its replacement
        assert st.nodes_in_workers in (0, 128) and st.blocks_inline == st.blocks_in_workers == 0
        ref, ref_tags = bytearray(n * BS + 16), bytearray(n * 16)
        crypto.seal_blocks(material, 16, plain, range(n), ref, ref_tags, 0)
        assert bytes(out[:n * BS]) == bytes(ref[:n * BS]) and tags == bytes(ref_tags)
        # the lanes came back: a batch after the restart goes to the new worker
        pool.seal_blocks(plain, n)
        assert pool.stats().nodes_in_workers > 0
    finally:
        pool.close()


def test_a_seal_redone_after_a_death_is_not_taken_over_again():
    """Chunks redone in the thread because their worker died are claimed: the take-over
    does not seal them a second time, and every block is counted once."""
    pool = CryptoPool(1, 16)
    try:
        rng = random.Random(33)
        plain = pool.plaintext(0)
        plain[:] = rng.randbytes(SEGMENT_BLOCKS * BS)
        slots = list(range(SEGMENT_BLOCKS))
        assert pool.dumpable() == (0,)
        pid = pool.pids()[0]
        os.kill(pid, signal.SIGKILL)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)     # dead before the seal starts
        material, tags, sealed = pool.seal_start(0, slots).result()
        st = pool.stats()
        assert st.worker_restarts == 1
        assert st.blocks_inline + st.blocks_in_workers == SEGMENT_BLOCKS, st
        out = bytearray(SEGMENT_BLOCKS * BS + 16)
        tags2 = bytearray(SEGMENT_BLOCKS * 16)
        crypto.seal_blocks(material, 16, bytes(plain), slots, out, tags2, 0)
        assert bytes(sealed) == bytes(out[:SEGMENT_BLOCKS * BS]) and tags == bytes(tags2)
    finally:
        pool.close()
