"""Tampering, replay and confidentiality (in the spirit of LevelDB's corruption_test).

The adversary controls both devices between (and during) runs (paper §4). Whatever it
does, every read returns the right data or raises IntegrityError; open may raise
IntegrityError. Never wrong data, never a stray exception type.

Scope decisions (see the paper's threat model, §4):
* In scope, detected or harmless -- flipped/garbage/zeroed bytes in any region; a data
  block replayed at its own or another address; two data blocks swapped; old BIT nodes
  or old checkpoint packs put back after the disk moved on; one checkpoint slot copied
  over the other; both checkpoint slots wiped; the index region wiped.
* Journal blocks are special. Recovery replays the journal from the checkpoint's anchor
  and stops at the first block that does not verify: a block lost or torn by a crash
  looks exactly like a block the adversary corrupted or rolled back. So damage to the
  journal tail (after the last checkpoint) may roll the disk back to an earlier flush.
  That is truncation, i.e. a rollback to a complete earlier state, which the paper puts
  out of scope ("complete rollback attacks ... can be prevented with trusted monotonic
  counters"). What we do require: the disk then reads exactly as ONE earlier completed
  flush did (never a mix of states, never data that was not flushed) or raises
  IntegrityError.
* Out of scope, documented by test_complete_rollback_is_out_of_scope: rolling the meta
  and data devices back together to an older consistent image (complete rollback), and
  rolling back the whole meta device; for the latter we still check that what is read is
  exactly one earlier flushed state or IntegrityError.
* Superblock: the two copies exist for robustness. Decision: with ONE copy damaged, open
  must succeed from the other copy and read correctly; with both damaged, open raises
  IntegrityError (or WrongKeyError if the key-check field was hit, or NotFormattedError if
  both magics were destroyed) -- never opens with a wrong layout.
"""
from __future__ import annotations

import random

import pytest

from sworndisk import (Config, IntegrityError, MemoryDevice, NotFormattedError, SwornDisk,
                       WrongKeyError)

from .conftest import BS, KEY16, MiB, ZERO, Model, describe, make_blocks, meta_size_for, runs
from .crashdev import RecordingDevice, TamperDevice

CFG = Config(memtable_records=32, level_ratio=2)
NR = 1024
DATA_SIZE = 24 * MiB


def _layout_region_names():
    data = MemoryDevice(DATA_SIZE)
    meta = MemoryDevice(meta_size_for(DATA_SIZE, NR, CFG))
    disk = SwornDisk.create(data, meta, KEY16, nr_blocks=NR, config=CFG)
    names = sorted(disk.layout.regions())
    disk.close()
    return names


REGION_NAMES = _layout_region_names()
# Every region but the journal (truncation semantics) and the superblocks (own tests) is
# held to the strict rule, including regions added after this file was written.
STRICT_REGIONS = [n for n in REGION_NAMES if n not in ("journal", "superblock0", "superblock1")]
TRIALS = {"data": 24, "index": 30}


def test_contract_region_names():
    for name in ("superblock0", "superblock1", "checkpoint0", "checkpoint1", "journal",
                 "index", "data"):
        assert name in REGION_NAMES, f"layout.regions() lacks {name}: {REGION_NAMES}"


# ---- a disk with history -------------------------------------------------------------------

class History:
    pass


def _workload(disk, rng, model, snaps, nops, v, nr=NR, hot=None):
    for i in range(nops):
        r = rng.random()
        lba = rng.randrange(hot or nr)
        n = min(rng.randint(1, 8), nr - lba)
        if r < 0.75:
            v += 1
            buf = make_blocks(rng, lba, n, v)
            disk.write(lba, buf)
            model.write(lba, buf)
        elif r < 0.85:
            disk.discard(lba, n)
            model.discard(lba, n)
        else:
            disk.flush()
            snaps.append(model.copy())
    disk.flush()
    snaps.append(model.copy())
    return v


@pytest.fixture(scope="module")
def hist():
    """T1: after a first workload and flush. T2: after overwriting much of it -- more
    than the data device holds (blocks are reused), enough commits to wrap the journal
    ring, many compactions and checkpoints -- and then four one-block flushes, so that
    recovery has journal transactions to replay after the last checkpoint. `dirty` = T2
    without close, `clean` = T2 after close."""
    rng = random.Random(2024)
    mdata = MemoryDevice(DATA_SIZE)
    mmeta = MemoryDevice(meta_size_for(DATA_SIZE, NR, CFG))
    clock = [0]
    data, meta = RecordingDevice(mdata, "data", clock), RecordingDevice(mmeta, "meta", clock)
    disk = SwornDisk.create(data, meta, KEY16, nr_blocks=NR, config=CFG)
    h = History()
    h.regions = disk.layout.regions()
    model = Model(NR)
    snaps = [model.copy()]
    v = _workload(disk, rng, model, snaps, 250, 0)
    h.t1 = (bytes(mdata.buf), bytes(mmeta.buf))
    h.model_t1 = model.copy()
    t1_clock = clock[0]
    v = _workload(disk, rng, model, snaps, 2600, v, hot=300)
    for i in range(700):              # many small commits: the journal ring wraps
        lba = rng.randrange(300)
        v += 1
        buf = make_blocks(rng, lba, 1, v)
        disk.write(lba, buf)
        model.write(lba, buf)
        disk.flush()
        snaps.append(model.copy())
    tail_clock = clock[0]
    for i in range(4):
        v += 1
        buf = make_blocks(rng, 900 + i, 1, v)
        disk.write(900 + i, buf)
        model.write(900 + i, buf)
        disk.flush()
        snaps.append(model.copy())
    h.dirty = (bytes(mdata.buf), bytes(mmeta.buf))
    h.model = model.copy()
    h.snaps = snaps
    h.stats = disk.stats()
    jdev, joff, jlen = h.regions["journal"]
    h.journal_tail = sorted({b * BS for b in meta.written_blocks(tail_clock)
                             if joff <= b * BS < joff + jlen})
    h.journal_written_t2 = len([1 for seq, op, off, n in meta.log
                                if seq > t1_clock and op == "write" and joff <= off < joff + jlen])
    h.data_written_t2 = sum(n // BS for seq, op, off, n in data.log
                            if seq > t1_clock and op == "write")
    disk.close()
    h.clean = (bytes(mdata.buf), bytes(mmeta.buf))
    h.data_dev = MemoryDevice(DATA_SIZE)
    h.meta_dev = MemoryDevice(len(h.clean[1]))
    return h


def test_history_is_rich(hist):
    """The images the tamper tests start from exercise block reuse, journal wrap,
    compactions and checkpoints (otherwise replays would be trivially harmless)."""
    st = hist.stats
    _, _, jlen = hist.regions["journal"]
    assert hist.data_written_t2 > DATA_SIZE // BS, (hist.data_written_t2, DATA_SIZE // BS)
    assert hist.journal_written_t2 > jlen // BS, (hist.journal_written_t2, jlen // BS)
    assert st.lifetime.major_compactions > 0 and st.lifetime.checkpoints > 0, st
    assert hist.journal_tail, "the last flushes wrote no journal block"


def _region_blocks(h, name, img_pair, nonzero=True):
    dev, off, nbytes = h.regions[name]
    img = img_pair[0] if dev == "data" else img_pair[1]
    out = []
    for o in range(off, off + nbytes, BS):
        if not nonzero or img[o:o + BS] != ZERO:
            out.append(o)
    return dev, out


class Checker:
    """Opens tampered images and checks that what is read is right (or IntegrityError)."""

    def __init__(self, h):
        self.h = h
        self.outcomes = {"open-detected": 0, "read-detected": 0, "undetected-harmless": 0}

    def run(self, data_img, meta_img, states, ctx, open_errors=(IntegrityError,),
            lbas=None, exercise=True):
        h = self.h
        h.data_dev.buf[:] = data_img
        h.meta_dev.buf[:] = meta_img
        try:
            disk = SwornDisk.open(h.data_dev, h.meta_dev, KEY16)
        except open_errors:
            self.outcomes["open-detected"] += 1
            return "open-detected"
        except Exception as e:
            raise AssertionError(f"{ctx}: open raised {type(e).__name__}: {e} (only "
                                 f"{[c.__name__ for c in open_errors]} is acceptable)") from e
        if lbas is None:
            lbas = set()
            for s in states:
                lbas.update(s.blocks)
            lbas.update(range(0, NR, 97))
            lbas.add(NR - 1)
        alive = set(range(len(states)))
        why = {}
        detected = 0

        def filt(lba0, got):
            for i in list(alive):
                exp = states[i].read(lba0, len(got) // BS)
                if exp != got:
                    alive.discard(i)
                    for j in range(len(got) // BS):
                        e, g = exp[j * BS:(j + 1) * BS], got[j * BS:(j + 1) * BS]
                        if e != g:
                            why[i] = f"lba {lba0 + j}: expected {describe(e)} got {describe(g)}"
                            break

        for start, count in runs(lbas):
            try:
                filt(start, disk.read(start, count))
            except IntegrityError:
                for lba in range(start, start + count):
                    try:
                        filt(lba, disk.read(lba, 1))
                    except IntegrityError:
                        detected += 1
            except Exception as e:
                raise AssertionError(f"{ctx}: read({start}, {count}) raised "
                                     f"{type(e).__name__}: {e} (expected data or "
                                     f"IntegrityError)") from e
            if not alive:
                kind = "the latest state" if len(states) == 1 else \
                    f"any of {len(states)} earlier flushed states"
                raise AssertionError(f"{ctx}: WRONG DATA returned (matches {kind}); "
                                     f"first differences: {list(why.values())[:3]}")
        res = "read-detected" if detected else "undetected-harmless"
        if 0 not in alive:
            res = "rolled-back"         # an earlier flushed state (journal truncation)
        elif exercise and len(states) == 1:
            ex = self._exercise(disk, states[0], lbas, ctx)
            if ex and res == "undetected-harmless":
                res = ex
        self.outcomes[res] = self.outcomes.get(res, 0) + 1
        return res

    def _exercise(self, disk, state, lbas, ctx):
        """Keep using the tampered disk: overwrites, discards, flushes, reopen. Whatever
        the damage did to the engine's bookkeeping, nothing may ever read wrong: each read
        is the newest data or IntegrityError. Returns "write-detected" if a write, flush,
        close or open raised IntegrityError."""
        h = self.h
        rng = random.Random(len(ctx))
        model = state.copy()
        lbas = set(lbas)
        try:
            for i in range(40):
                lba = rng.randrange(NR - 8)
                n = rng.randint(1, 8)
                if i % 10 == 9:
                    disk.discard(lba, n)
                    model.discard(lba, n)
                else:
                    buf = make_blocks(rng, lba, n, 10**8 + i)
                    disk.write(lba, buf)
                    model.write(lba, buf)
                lbas.update(range(lba, lba + n))
                if i % 8 == 7:
                    disk.flush()
            disk.close()
            disk = SwornDisk.open(h.data_dev, h.meta_dev, KEY16)
        except IntegrityError:
            return "write-detected"
        except Exception as e:
            raise AssertionError(f"{ctx}: writing to the tampered disk raised "
                                 f"{type(e).__name__}: {e}") from e
        for lba in sorted(lbas):
            try:
                got = disk.read(lba, 1)
            except IntegrityError:
                continue
            if got != model.get(lba):
                raise AssertionError(f"{ctx}: WRONG DATA after writing to the tampered disk: "
                                     f"lba {lba}: expected {describe(model.get(lba))} got "
                                     f"{describe(got)}")
        disk.close()
        return None


def _flip(rng, img: bytearray, off: int, style: str) -> None:
    if style == "bit":
        pos = off + (rng.randrange(128) if rng.random() < 0.5 else rng.randrange(BS))
        img[pos] ^= 1 << rng.randrange(8)
    elif style == "bytes":
        pos = off + rng.randrange(BS - 16)
        img[pos:pos + 16] = rng.randbytes(16)
    elif style == "zero":
        img[off:off + BS] = ZERO
    elif style == "random":
        img[off:off + BS] = rng.randbytes(BS)


STYLES = ("bit", "bit", "bytes", "zero", "random")


def _tamper_trials(h, chk, name, base, states, ntrials, seed, open_errors=(IntegrityError,)):
    rng = random.Random(seed)
    dev, blocks = _region_blocks(h, name, base)
    assert blocks, f"region {name} holds no data in this image"
    for t in range(ntrials):
        data_img, meta_img = bytearray(base[0]), bytearray(base[1])
        img = data_img if dev == "data" else meta_img
        off = rng.choice(blocks)
        style = STYLES[t % len(STYLES)]
        _flip(rng, img, off, style)
        chk.run(data_img, meta_img, states,
                f"{name} trial {t} ({style} at {dev} offset {off}, seed {seed})", open_errors)


# ---- corruption of each region ------------------------------------------------------------

@pytest.mark.parametrize("which", ["clean", "dirty"])
@pytest.mark.parametrize("region", STRICT_REGIONS)
def test_corrupt_region_strict(hist, which, region):
    """Bytes flipped in data blocks, BIT nodes or checkpoint packs: right data or
    IntegrityError, for the latest state."""
    base = getattr(hist, which)
    chk = Checker(hist)
    ntrials = TRIALS.get(region, 12)
    _tamper_trials(hist, chk, region, base, [hist.model], ntrials,
                   seed=sum(map(ord, which + region)))
    if region in ("data", "index"):
        assert sum(v for k, v in chk.outcomes.items() if k.endswith("detected")) > 0, \
            f"{region}: {ntrials} corruptions and none was noticed: {chk.outcomes}"


@pytest.mark.parametrize("which", ["clean", "dirty"])
def test_corrupt_journal(hist, which):
    """Journal blocks flipped: right data, IntegrityError, or exactly one earlier flushed
    state (journal truncation, see the module docstring)."""
    base = getattr(hist, which)
    chk = Checker(hist)
    _tamper_trials(hist, chk, "journal", base, list(reversed(hist.snaps)), 30, seed=5)


def test_corrupt_journal_newest_blocks_dirty(hist):
    """Target the journal blocks of the last four flushes (those recovery must replay):
    IntegrityError, or exactly one earlier flushed state."""
    rng = random.Random(6)
    chk = Checker(hist)
    for t in range(24):
        meta_img = bytearray(hist.dirty[1])
        o = hist.journal_tail[t % len(hist.journal_tail)]
        _flip(rng, meta_img, o, STYLES[t % len(STYLES)])
        chk.run(hist.dirty[0], meta_img, list(reversed(hist.snaps)),
                f"newest journal block trial {t} at meta offset {o}")


@pytest.mark.parametrize("copy", [0, 1])
def test_one_superblock_copy_damaged_still_opens(hist, copy):
    """Decision: one damaged superblock copy is survived (that is what the second copy is
    for): open succeeds and every read is right."""
    name = f"superblock{copy}"
    _, off, _ = hist.regions[name]
    rng = random.Random(copy)
    for t, style in enumerate(("bit", "bit", "bit", "bytes", "zero", "random")):
        meta_img = bytearray(hist.clean[1])
        if style == "bit":
            # header fields (magic, version, uuid, salt, key check, nonce, length), body, tag
            pos = off + [0, 9, 20, 70, 100, 110, 300][rng.randrange(7)]
            meta_img[pos] ^= 0x10
        else:
            _flip(rng, meta_img, off, style)
        chk = Checker(hist)
        res = chk.run(hist.clean[0], meta_img, [hist.model],
                      f"{name} damaged ({style}), other copy intact", open_errors=())
        assert res != "open-detected"


def test_both_superblocks_damaged(hist):
    rng = random.Random(9)
    for t in range(12):
        meta_img = bytearray(hist.clean[1])
        for name in ("superblock0", "superblock1"):
            _, off, _ = hist.regions[name]
            _flip(rng, meta_img, off, STYLES[(t + len(name)) % len(STYLES)])
        Checker(hist).run(hist.clean[0], meta_img, [hist.model], f"both superblocks trial {t}",
                          open_errors=(IntegrityError, WrongKeyError, NotFormattedError))


def test_superblock_body_damaged_in_both_is_integrity_error(hist):
    meta_img = bytearray(hist.clean[1])
    for name in ("superblock0", "superblock1"):
        _, off, _ = hist.regions[name]
        meta_img[off + 200] ^= 1          # inside the encrypted body
    hist.meta_dev.buf[:] = meta_img
    hist.data_dev.buf[:] = hist.clean[0]
    with pytest.raises(IntegrityError):
        SwornDisk.open(hist.data_dev, hist.meta_dev, KEY16)


def test_superblock_copies_swapped_or_duplicated(hist):
    meta_img = bytearray(hist.clean[1])
    a = hist.regions["superblock0"][1]
    b = hist.regions["superblock1"][1]
    s0, s1 = bytes(meta_img[a:a + BS]), bytes(meta_img[b:b + BS])
    for x, y, what in ((s1, s0, "swapped"), (s0, s0, "0 over 1"), (s1, s1, "1 over 0")):
        meta_img[a:a + BS] = x
        meta_img[b:b + BS] = y
        Checker(hist).run(hist.clean[0], bytes(meta_img), [hist.model], f"superblocks {what}")


def test_superblock_from_another_disk(hist):
    """A superblock of another disk formatted with the same key (different uuid/layout
    nonce) spliced in: must not open with wrong data."""
    data = MemoryDevice(DATA_SIZE)
    meta = MemoryDevice(len(hist.clean[1]))
    other = SwornDisk.create(data, meta, KEY16, nr_blocks=NR, config=CFG)
    other.close()
    meta_img = bytearray(hist.clean[1])
    for name in ("superblock0", "superblock1"):
        _, off, n = hist.regions[name]
        meta_img[off:off + n] = meta.buf[off:off + n]
    Checker(hist).run(hist.clean[0], bytes(meta_img), [hist.model], "foreign superblocks")


# ---- replay / rollback of parts of the disk ------------------------------------------------

def _rollback(h, names, fraction, rng, base, old):
    """Copy `fraction` of the blocks that differ between old and base, within the named
    regions, from old into (copies of) base."""
    data_img, meta_img = bytearray(base[0]), bytearray(base[1])
    n = 0
    for name in names:
        dev, off, nbytes = h.regions[name]
        cur = data_img if dev == "data" else meta_img
        src = old[0] if dev == "data" else old[1]
        for o in range(off, off + nbytes, BS):
            if src[o:o + BS] != cur[o:o + BS] and rng.random() < fraction:
                cur[o:o + BS] = src[o:o + BS]
                n += 1
    return data_img, meta_img, n


@pytest.mark.parametrize("which", ["clean", "dirty"])
@pytest.mark.parametrize("names", [(n,) for n in STRICT_REGIONS] + [
    ("checkpoint0", "checkpoint1"), ("index", "data"), ("index", "checkpoint0", "checkpoint1"),
    tuple(STRICT_REGIONS)], ids=lambda n: "+".join(n))
def test_partial_rollback_strict(hist, which, names):
    """Old (T1) copies of data blocks, BIT nodes and/or checkpoint packs put back after
    the disk moved on: right (latest) data or IntegrityError -- never stale data."""
    base = getattr(hist, which)
    rng = random.Random(sum(map(ord, which + "+".join(names))))
    chk = Checker(hist)
    total = 0
    for fraction in (1.0, 0.5, 0.1, 0.02):
        data_img, meta_img, n = _rollback(hist, names, fraction, rng, base, hist.t1)
        total += n
        chk.run(data_img, meta_img, [hist.model],
                f"rollback of {'+'.join(names)} ({which}), {n} blocks ({fraction:.0%})")
    assert total > 0, f"nothing in {names} changed between T1 and T2"


@pytest.mark.parametrize("which", ["clean", "dirty"])
def test_journal_rollback(hist, which):
    """Old journal blocks put back: latest state, IntegrityError, or exactly one earlier
    flushed state (truncation; see the module docstring)."""
    base = getattr(hist, which)
    rng = random.Random(17)
    chk = Checker(hist)
    for fraction in (1.0, 0.5, 0.1, 0.02):
        data_img, meta_img, n = _rollback(hist, ("journal",), fraction, rng, base, hist.t1)
        chk.run(data_img, meta_img, list(reversed(hist.snaps)),
                f"journal rollback ({which}) of {n} blocks ({fraction:.0%})")


def test_whole_meta_rollback_reads_one_old_state(hist):
    """Meta device rolled back to T1 while the data device is at T2: effectively a
    complete rollback (out of scope), but reads must still be exactly T1's state or
    IntegrityError -- never a mix with T2 data, never garbage."""
    Checker(hist).run(hist.clean[0], hist.t1[1], [hist.model_t1], "meta rolled back to T1")


def test_complete_rollback_is_out_of_scope(hist):
    """Both devices rolled back together to T1: SwornDisk cannot tell (no trusted
    counter; paper §4). Documented here: the disk opens and reads exactly T1."""
    Checker(hist).run(hist.t1[0], hist.t1[1], [hist.model_t1], "complete rollback to T1",
                      open_errors=())


@pytest.mark.parametrize("which", ["clean", "dirty"])
def test_copy_checkpoint_slot_over_other(hist, which):
    base = getattr(hist, which)
    _, a, n = hist.regions["checkpoint0"]
    _, b, _ = hist.regions["checkpoint1"]
    for src, dst, what in ((a, b, "0->1"), (b, a, "1->0")):
        meta_img = bytearray(base[1])
        meta_img[dst:dst + n] = base[1][src:src + n]
        Checker(hist).run(base[0], bytes(meta_img), [hist.model],
                          f"checkpoint slot {what} ({which})")
    # an old (T1) pack copied into both slots
    for src in (a, b):
        meta_img = bytearray(base[1])
        meta_img[a:a + n] = hist.t1[1][src:src + n]
        meta_img[b:b + n] = hist.t1[1][src:src + n]
        Checker(hist).run(base[0], bytes(meta_img), [hist.model],
                          f"T1 checkpoint slot at {src} into both slots ({which})")


@pytest.mark.parametrize("which", ["clean", "dirty"])
@pytest.mark.parametrize("names", [("checkpoint0", "checkpoint1"), ("index",), ("data",),
                                   ("journal", "checkpoint0", "checkpoint1")] +
                         [(n,) for n in STRICT_REGIONS
                          if n not in ("index", "data", "checkpoint0", "checkpoint1")],
                         ids=lambda n: "+".join(n))
def test_wiped_regions(hist, which, names):
    """Regions zeroed (a wiper is out of scope for availability, but must never make the
    disk read as blank or stale): IntegrityError or right data."""
    base = getattr(hist, which)
    data_img, meta_img = bytearray(base[0]), bytearray(base[1])
    for name in names:
        dev, off, nbytes = hist.regions[name]
        img = data_img if dev == "data" else meta_img
        img[off:off + nbytes] = bytes(nbytes)
    res = Checker(hist).run(data_img, meta_img, [hist.model], f"wiped {'+'.join(names)}")
    assert res != "undetected-harmless", \
        f"wiping {names} went unnoticed: the disk read correctly without that region?"


# ---- targeted replays of a single data block ---------------------------------------------

def _fresh(nr=256):
    data = MemoryDevice(DATA_SIZE)
    meta = MemoryDevice(meta_size_for(DATA_SIZE, nr, CFG))
    disk = SwornDisk.create(data, meta, KEY16, nr_blocks=nr, config=CFG)
    disk.flush()
    return disk, data, meta


def _changed_data_blocks(before: bytes, after: bytes):
    return [o for o in range(0, len(after), BS) if before[o:o + BS] != after[o:o + BS]]


def _write_and_locate(disk, data, lba, blk):
    before = bytes(data.buf)
    disk.write(lba, blk)
    disk.flush()
    return _changed_data_blocks(before, bytes(data.buf))


def test_old_version_replayed_at_new_address():
    rng = random.Random(1)
    disk, data, meta = _fresh()
    v1, v2 = make_blocks(rng, 5, 1, 1), make_blocks(rng, 5, 1, 2)
    c1 = _write_and_locate(disk, data, 5, v1)
    old = bytes(data.buf)
    c2 = _write_and_locate(disk, data, 5, v2)
    assert c1 and c2, "writing a block changed nothing on the data device"
    disk.close()
    for src in c1:
        for dst in c2:
            img = bytearray(data.buf)
            img[dst:dst + BS] = old[src:src + BS]
            dev = MemoryDevice(len(img))
            dev.buf[:] = img
            d = SwornDisk.open(dev, meta, KEY16)
            try:
                got = d.read(5, 1)
            except IntegrityError:
                continue
            assert got == v2, (f"replayed old ciphertext (data offset {src} -> {dst}): "
                               f"read returned {describe(got)}, expected v2 or IntegrityError")
            assert len(c2) > 1, "replay of the only changed block went unnoticed"


def test_swap_two_data_blocks():
    rng = random.Random(2)
    disk, data, meta = _fresh()
    a, b = make_blocks(rng, 10, 1, 1), make_blocks(rng, 20, 1, 1)
    before = bytes(data.buf)
    disk.write(10, a)
    disk.write(20, b)
    disk.close()
    changed = _changed_data_blocks(before, bytes(data.buf))
    assert len(changed) >= 2, changed
    x, y = changed[0], changed[1]
    img = bytearray(data.buf)
    img[x:x + BS], img[y:y + BS] = data.buf[y:y + BS], data.buf[x:x + BS]
    dev = MemoryDevice(len(img))
    dev.buf[:] = img
    d = SwornDisk.open(dev, meta, KEY16)
    detected = 0
    for lba, exp in ((10, a), (20, b)):
        try:
            got = d.read(lba, 1)
        except IntegrityError:
            detected += 1
            continue
        assert got == exp, f"swapped blocks: lba {lba} read {describe(got)}"
    assert detected == 2 or len(changed) > 2, "swapping the two data blocks went unnoticed"


def test_online_tamper_on_read():
    """The adversary rewrites data-device reads while the disk is open."""
    rng = random.Random(3)
    data0 = MemoryDevice(DATA_SIZE)
    target = {"off": None}

    def evil(offset, buf):
        o = target["off"]
        if o is not None and offset <= o < offset + len(buf):
            b = bytearray(buf)
            b[o - offset + 100] ^= 4
            return bytes(b)
        return None

    tdev = TamperDevice(data0, evil)
    meta = MemoryDevice(meta_size_for(DATA_SIZE, 256, CFG))
    disk = SwornDisk.create(tdev, meta, KEY16, nr_blocks=256, config=CFG)
    blocks = {}
    for lba in range(0, 64):
        blocks[lba] = make_blocks(rng, lba, 1, 1)
        before = bytes(data0.buf)
        disk.write(lba, blocks[lba])
        disk.flush()
        if lba == 30:
            target_offs = _changed_data_blocks(before, bytes(data0.buf))
    assert target_offs
    target["off"] = target_offs[0]
    detected = 0
    for lba in range(64):
        try:
            got = disk.read(lba, 1)
        except IntegrityError:
            detected += 1
            continue
        assert got == blocks[lba], f"online tamper: lba {lba} read {describe(got)}"
    try:
        got = disk.read(28, 5)
        assert got == b"".join(blocks[l] for l in range(28, 33))
    except IntegrityError:
        detected += 1
    assert detected >= 1 or tdev.tampered_reads == 0
    assert tdev.tampered_reads > 0, "the tampered block was never read"


# ---- confidentiality ----------------------------------------------------------------------

def test_no_plaintext_on_devices():
    marker = b"SWORNDISK-PLAINTEXT-MARKER-0123456789"
    blk = (marker * (BS // len(marker) + 1))[:BS]
    disk, data, meta = _fresh()
    for lba in range(0, 200, 3):
        disk.write(lba, blk)
    disk.flush()
    disk.discard(0, 10)
    disk.close()
    for name, dev in (("data", data), ("meta", meta)):
        assert bytes(dev.buf).find(marker[:16]) < 0, f"plaintext found on the {name} device"


def test_same_plaintext_different_ciphertext():
    blk = b"\x42" * BS
    disk, data, meta = _fresh()
    before = bytes(data.buf)
    disk.write(1, blk)
    disk.write(2, blk)
    disk.close()
    changed = _changed_data_blocks(before, bytes(data.buf))
    cts = {bytes(data.buf[o:o + BS]) for o in changed}
    assert len(cts) == len(changed) >= 2, "identical blocks encrypt identically"


# ---- online / transient corruption and foreign devices ---------------------------------

def test_transient_index_corruption_does_not_poison_the_cache(hist):
    """While the disk is open, reads of the index region are corrupted at random (a flaky
    or malicious host). Every read returns right data or IntegrityError; once the
    corruption stops, every read succeeds again -- nothing bad was cached, the disk did not
    wedge itself."""
    rng = random.Random(44)
    _, ioff, ilen = hist.regions["index"]
    state = {"on": False, "p": 0.3}

    def evil(offset, buf):
        if not state["on"] or not (ioff <= offset < ioff + ilen):
            return None
        if rng.random() >= state["p"]:
            return None
        b = bytearray(buf)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)

    hist.data_dev.buf[:] = hist.clean[0]
    hist.meta_dev.buf[:] = hist.clean[1]
    tmeta = TamperDevice(hist.meta_dev, evil)
    disk = SwornDisk.open(hist.data_dev, tmeta, KEY16)
    model = hist.model
    state["on"] = True
    detected = 0
    for i in range(300):
        lba = rng.randrange(NR - 8)
        n = rng.randint(1, 8)
        try:
            got = disk.read(lba, n)
        except IntegrityError:
            detected += 1
            continue
        exp = model.read(lba, n)
        assert got == exp, f"transient corruption: read({lba}, {n}) returned wrong data"
    assert tmeta.tampered_reads > 0 and detected > 0, (tmeta.tampered_reads, detected)
    state["on"] = False
    for start, count in runs(range(NR)):
        got = disk.read(start, count)
        assert got == model.read(start, count), f"after the corruption stopped: read({start})"
    disk.close()


def test_transient_data_corruption_then_recovery():
    rng = random.Random(45)
    disk, data, meta = _fresh()
    model = Model(256)
    for lba in range(0, 256, 4):
        buf = make_blocks(rng, lba, 4, 1)
        disk.write(lba, buf)
        model.write(lba, buf)
    disk.flush()
    state = {"on": True}

    def evil(offset, buf):
        if state["on"] and rng.random() < 0.5:
            b = bytearray(buf)
            b[rng.randrange(len(b))] ^= 0x80
            return bytes(b)
        return None

    disk.close()
    tdata = TamperDevice(data, evil)
    d = SwornDisk.open(tdata, meta, KEY16)
    for i in range(100):
        lba = rng.randrange(250)
        try:
            got = d.read(lba, 4)
        except IntegrityError:
            continue
        assert got == model.read(lba, 4)
    state["on"] = False
    for start, count in runs(range(256)):
        assert d.read(start, count) == model.read(start, count)
    # the disk still takes writes and flushes after the IntegrityErrors
    d.write(3, b"z" * BS)
    d.flush()
    d.close()


def test_data_device_of_another_disk():
    """Two disks with the same key: A's meta with B's data device never yields B's (or
    any wrong) data."""
    rng = random.Random(46)
    disks = []
    for which in range(2):
        disk, data, meta = _fresh()
        model = Model(256)
        for lba in range(0, 200, 5):
            buf = make_blocks(rng, lba, 5, which)
            disk.write(lba, buf)
            model.write(lba, buf)
        disk.close()
        disks.append((data, meta, model))
    (da, ma, mod_a), (db, mb, mod_b) = disks
    d = SwornDisk.open(db, ma, KEY16)
    for lba in range(0, 200):
        try:
            got = d.read(lba, 1)
        except IntegrityError:
            continue
        raise AssertionError(f"foreign data device: lba {lba} read {describe(got)} "
                             f"(A has {describe(mod_a.get(lba))}, B has {describe(mod_b.get(lba))})")
