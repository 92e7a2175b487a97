"""Helpers for tests/test_cleaning.py: cheap versioned blocks, a version model, checks.

Aging writes hundreds of thousands of blocks, so the model stores a version number per
LBA instead of 4 KiB of bytes, and a block's bytes are a pure function of (lba, version):
a 16-byte header naming them (so a stale or misplaced block is recognised in a failure
message) followed by 4080 bytes sliced from a fixed random pool at an offset that depends
on both.
"""
from __future__ import annotations

import random
import struct

from sworndisk import Config, MemoryDevice, SwornDisk

from .conftest import BS, KEY16, meta_size_for

SEG = 1024                 # blocks per data segment (sworndisk.config.SEGMENT_BLOCKS)
SEG_BYTES = SEG * BS
ZERO = bytes(BS)
_POOL = random.Random(0x5EED).randbytes(1 << 20)
_HDR = struct.Struct("<QQ")
_MAGIC = 0x5357_4F52_4E00_0000      # "SWORN" tag in the high bytes of the version word


def block(lba: int, ver: int) -> bytes:
    off = ((lba * 2654435761 + ver * 40503) % ((1 << 20) - BS)) & ~7
    return _HDR.pack(lba, _MAGIC | ver) + _POOL[off:off + BS - 16]


def blocks(lba: int, n: int, ver: int) -> bytes:
    return b"".join(block(lba + i, ver) for i in range(n))


def describe(b: bytes) -> str:
    if b == ZERO:
        return "<zeros>"
    lba, ver = _HDR.unpack_from(b)
    if ver & ~0xFFFF_FFFF == _MAGIC and b == block(lba, ver & 0xFFFF_FFFF):
        return f"<lba {lba} v{ver & 0xFFFF_FFFF}>"
    return f"<unknown {b[:12].hex()}..>"


class VModel:
    """lba -> version; absent = zeros (never written or discarded)."""

    def __init__(self, nr_blocks: int, vers: dict | None = None):
        self.nr_blocks = nr_blocks
        self.vers: dict[int, int] = dict(vers or {})

    def write(self, lba: int, n: int, ver: int) -> None:
        for l in range(lba, lba + n):
            self.vers[l] = ver

    def discard(self, lba: int, n: int) -> None:
        for l in range(lba, lba + n):
            self.vers.pop(l, None)

    def get(self, lba: int) -> bytes:
        v = self.vers.get(lba)
        return ZERO if v is None else block(lba, v)

    def read(self, lba: int, n: int) -> bytes:
        return b"".join(self.get(l) for l in range(lba, lba + n))

    def copy(self) -> "VModel":
        return VModel(self.nr_blocks, self.vers)

    def __len__(self) -> int:
        return len(self.vers)


def runs_of(lbas, max_len: int = 256):
    out = []
    for l in sorted(set(lbas)):
        if out and out[-1][0] + out[-1][1] == l and out[-1][1] < max_len:
            out[-1][1] += 1
        else:
            out.append([l, 1])
    return [(a, b) for a, b in out]


def first_diff(lba: int, exp: bytes, got: bytes) -> str:
    for i in range(len(exp) // BS):
        e, g = exp[i * BS:(i + 1) * BS], got[i * BS:(i + 1) * BS]
        if e != g:
            return f"lba {lba + i}: expected {describe(e)} got {describe(g)}"
    return "lengths differ"


def check_reads(disk, model: VModel, ctx: str, lbas=None) -> None:
    """Every LBA in `lbas` (default: the whole disk) reads exactly as in the model."""
    if lbas is None:
        spans = [(a, min(256, model.nr_blocks - a)) for a in range(0, model.nr_blocks, 256)]
    else:
        spans = runs_of(lbas)
    for a, n in spans:
        got = disk.read(a, n)
        exp = model.read(a, n)
        if got != exp:
            raise AssertionError(f"{ctx}: read({a}, {n}) returned wrong data: "
                                 f"{first_diff(a, exp, got)}")


def matching(disk, states: list[VModel], ctx: str, lbas=None) -> list[int]:
    """Indices of the states that agree with every block read; fails when none does.
    A read error (after an honest crash) is a failure too."""
    nr = states[0].nr_blocks
    if lbas is None:
        spans = [(a, min(256, nr - a)) for a in range(0, nr, 256)]
    else:
        spans = runs_of(lbas)
    alive = set(range(len(states)))
    why = {}
    for a, n in spans:
        try:
            got = disk.read(a, n)
        except Exception as e:
            raise AssertionError(f"{ctx}: read({a}, {n}) raised {type(e).__name__}: {e}") from e
        for i in list(alive):
            exp = states[i].read(a, n)
            if exp != got:
                alive.discard(i)
                why[i] = first_diff(a, exp, got)
        if not alive:
            raise AssertionError(f"{ctx}: the disk matches none of the allowed states: "
                                 + "; ".join(f"state {i}: {w}" for i, w in sorted(why.items())))
    return sorted(alive)


def assert_exact(disk, model: VModel, ctx: str) -> None:
    """After a flush (nothing pending): committed mappings == valid blocks, and every
    data block is valid or free (no block stays busy after the commit that owned it)."""
    st = disk.stats()
    assert st.space.valid_blocks == len(model), (
        f"{ctx}: stats().space.valid_blocks = {st.space.valid_blocks} but the model maps "
        f"{len(model)} LBAs (valid blocks must equal committed mappings)")
    data_blocks = st.space.data_segments * SEG
    assert st.space.free_blocks == data_blocks - st.space.valid_blocks, (
        f"{ctx}: free_blocks {st.space.free_blocks} != data blocks {data_blocks} - valid "
        f"{st.space.valid_blocks} with nothing pending (blocks leaked as busy)")


def new_mem_disk(segs: int, nr_blocks: int, config: Config):
    data = MemoryDevice(segs * SEG_BYTES)
    meta = MemoryDevice(meta_size_for(data.size, nr_blocks, config))
    disk = SwornDisk.create(data, meta, KEY16, nr_blocks=nr_blocks, config=config)
    return disk, data, meta


def reopen(disk, data, meta):
    disk.close()
    return SwornDisk.open(data, meta, KEY16)


def hba_of(disk, lba: int):
    """The data block the committed index maps lba to (None if unmapped / discarded)."""
    v = disk.debug.index.get(lba)
    if v is None:
        return None
    h = disk.debug.fmt.hba_of(v)
    return None if h == 0xFFFF_FFFF_FFFF_FFFF else h


def brief_stats(disk) -> dict:
    st = disk.stats()
    return dict(write_amplification=st.session.write_amplification,
                cleaning_runs=st.lifetime.cleaning_runs, blocks_moved=st.lifetime.blocks_moved,
                threaded_segments=st.space.threaded_segments,
                free_segments=st.space.free_segments, valid_blocks=st.space.valid_blocks,
                commits=st.lifetime.commits, checkpoints=st.lifetime.checkpoints)


def assert_rit_consistent(disk, model: VModel, ctx: str) -> None:
    """The reverse map agrees with the index both ways: every LBA the model holds maps to
    a distinct valid block whose RIT entry names that LBA, and there are no other valid
    blocks (with assert_exact's count, a bijection between mappings and valid blocks)."""
    sp = disk.debug.space
    seen = {}
    for l in sorted(model.vers):
        h = hba_of(disk, l)
        assert h is not None, f"{ctx}: LBA {l} holds data but the index does not map it"
        assert h not in seen, f"{ctx}: LBAs {seen[h]} and {l} both map to data block {h}"
        seen[h] = l
        assert bool(sp.valid[h]) and int(sp.rit[h]) == l, (
            f"{ctx}: LBA {l} -> block {h}, but the DST/RIT say valid={bool(sp.valid[h])} "
            f"lba={int(sp.rit[h])}")
    for l in range(model.nr_blocks):
        if l not in model.vers:
            assert hba_of(disk, l) is None, f"{ctx}: LBA {l} (unwritten/discarded) is mapped"
    assert int(sp.seg_valid.sum()) == len(seen), \
        f"{ctx}: {int(sp.seg_valid.sum())} valid blocks for {len(seen)} mapped LBAs"
