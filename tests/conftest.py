"""Shared helpers for the engine's correctness tests: keys, disk factory, a dict model.

Everything the tests check goes through the public API of docs/contracts.md.
The long randomized tests have fixed sizes; the soak test is behind `-m slow`.
"""
from __future__ import annotations

import random

import pytest

from sworndisk import Config, MemoryDevice

BS = 4096
MiB = 1 << 20
KEY16 = bytes.fromhex("00112233445566778899aabbccddeeff")
KEY32 = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
OTHER16 = bytes.fromhex("ffeeddccbbaa99887766554433221100")
ZERO = bytes(BS)

def engine():
    from sworndisk import SwornDisk
    return SwornDisk


def meta_size_for(data_size: int, nr_blocks=None, config=None) -> int:
    """SwornDisk.min_meta_size(...), a whole number of blocks."""
    n = engine().min_meta_size(data_size, nr_blocks, config)
    assert n % BS == 0
    return n


def new_devices(data_size=32 * MiB, nr_blocks=None, config=None, meta_extra=0):
    data = MemoryDevice(data_size)
    meta = MemoryDevice(meta_size_for(data_size, nr_blocks, config) + meta_extra)
    return data, meta


def new_disk(data_size=32 * MiB, nr_blocks=None, config=None, key=KEY16, data=None, meta=None):
    """(disk, data device, meta device) on fresh MemoryDevices unless devices are given."""
    if data is None:
        data = MemoryDevice(data_size)
    if meta is None:
        meta = MemoryDevice(meta_size_for(data.size, nr_blocks, config))
    disk = engine().create(data, meta, key, nr_blocks=nr_blocks, config=config)
    return disk, data, meta


# ---- data --------------------------------------------------------------------------------

def make_block(rng: random.Random, lba: int, version: int) -> bytes:
    """A 4 KiB block whose first 24 bytes say which (lba, version) it is, then random."""
    head = b"L%09dV%09d|..." % (lba % 10**9, version % 10**9)
    head = head[:24].ljust(24, b".")
    return head + rng.randbytes(BS - 24)


def make_blocks(rng: random.Random, lba: int, n: int, version: int) -> bytes:
    return b"".join(make_block(rng, lba + i, version) for i in range(n))


def describe(block: bytes) -> str:
    """Short human description of a block for assertion messages."""
    if block == ZERO:
        return "<zeros>"
    if block[:1] == b"L" and block[10:11] == b"V":
        return f"<{block[:20].decode('ascii', 'replace')}..>"
    return f"<{block[:12].hex()}..>"


class Model:
    """The reference: lba -> 4 KiB bytes; never written or discarded reads as zeros."""

    def __init__(self, nr_blocks: int, blocks: dict | None = None):
        self.nr_blocks = nr_blocks
        self.blocks: dict[int, bytes] = dict(blocks or {})

    def write(self, lba: int, data: bytes) -> None:
        assert len(data) % BS == 0 and 0 <= lba and lba + len(data) // BS <= self.nr_blocks
        for i in range(len(data) // BS):
            self.blocks[lba + i] = bytes(data[i * BS:(i + 1) * BS])

    def discard(self, lba: int, n: int) -> None:
        for i in range(lba, lba + n):
            self.blocks.pop(i, None)

    def get(self, lba: int) -> bytes:
        return self.blocks.get(lba, ZERO)

    def read(self, lba: int, n: int) -> bytes:
        return b"".join(self.get(i) for i in range(lba, lba + n))

    def copy(self) -> "Model":
        return Model(self.nr_blocks, self.blocks)

    def same_as(self, other: "Model") -> bool:
        keys = set(self.blocks) | set(other.blocks)
        return all(self.get(k) == other.get(k) for k in keys)


def first_mismatch(lba: int, expected: bytes, got: bytes):
    n = len(expected) // BS
    if len(got) != len(expected):
        return None, f"length {len(got)} != expected {len(expected)}"
    for i in range(n):
        e = expected[i * BS:(i + 1) * BS]
        g = got[i * BS:(i + 1) * BS]
        if e != g:
            return lba + i, f"lba {lba + i}: expected {describe(e)} got {describe(g)}"
    return None, ""


def check_read(disk, model: Model, lba: int, n: int, ctx: str = "") -> None:
    got = disk.read(lba, n)
    exp = model.read(lba, n)
    if got != exp:
        _, msg = first_mismatch(lba, exp, got)
        raise AssertionError(f"{ctx}: read({lba}, {n}) wrong data: {msg}")


def runs(lbas, max_len: int = 64):
    """Group sorted LBAs into (start, count) runs of consecutive blocks."""
    out = []
    for lba in sorted(set(lbas)):
        if out and out[-1][0] + out[-1][1] == lba and out[-1][1] < max_len:
            out[-1][1] += 1
        else:
            out.append([lba, 1])
    return [(a, b) for a, b in out]


def lbas_to_check(model: Model, rng: random.Random | None = None, extra: int = 16):
    """The written LBAs, their neighbours, the last LBA and some random ones."""
    s = set(model.blocks)
    s.update(l + 1 for l in list(s) if l + 1 < model.nr_blocks)
    s.update({0, model.nr_blocks - 1})
    rng = rng or random.Random(0)
    s.update(rng.randrange(model.nr_blocks) for _ in range(extra))
    return s


def read_batch(disk, spans: list, ctx: str = "") -> list[bytes]:
    """read_many of the spans, in batches of 32 (a ublk queue's worth), shuffled so that
    batches mix LBAs from all over the disk; an error in any range fails the test."""
    order = list(range(len(spans)))
    random.Random(len(spans)).shuffle(order)
    got: list = [None] * len(spans)
    for i in range(0, len(order), 32):
        part = order[i:i + 32]
        for j, res in zip(part, disk.read_many([spans[j] for j in part])):
            if isinstance(res, Exception):
                raise AssertionError(f"{ctx}: read_many range {spans[j]} raised "
                                     f"{type(res).__name__}: {res}")
            got[j] = res
    return got


def verify_disk(disk, model: Model, ctx: str = "", lbas=None, rng=None) -> None:
    """Every LBA in `lbas` (default: lbas_to_check) reads exactly as in the model, through
    read_many batches and through read()."""
    if lbas is None:
        lbas = lbas_to_check(model, rng)
    spans = runs(lbas)
    for (start, count), got in zip(spans, read_batch(disk, spans, ctx)):
        exp = model.read(start, count)
        if got != exp:
            _, msg = first_mismatch(start, exp, got)
            raise AssertionError(f"{ctx}: read_many ({start}, {count}) wrong data: {msg}")
    for start, count in spans[::7]:
        check_read(disk, model, start, count, ctx)


@pytest.fixture
def small_config():
    return Config(memtable_records=16, level_ratio=2)
