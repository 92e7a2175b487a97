"""The on-disk format is pinned: golden bytes for every structure sworndisk/format.py
defines, and docs/format.md's offset tables checked against those definitions.

A change that alters any byte of the format fails here; so does a document that no longer
says what the code writes. Changing the format means bumping FORMAT_VERSION, updating the
golden bytes and the document, together."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from sworndisk import (MemoryDevice, NotFormattedError, SwornDisk, UnsupportedFormatError,
                       WrongKeyError)
from sworndisk import format as F
from sworndisk.ops import Checkpoint, Commit, Discard, Writes, decode, encode
from sworndisk.records import RecordFormat
from sworndisk.superblock import header

from .conftest import KEY16

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "format.md")
MiB = 1 << 20


def _record(fmt: RecordFormat, lba: int, hba: int) -> np.ndarray:
    kn = np.frombuffer(bytes(range(fmt.key_bytes + 12)), np.uint8).reshape(1, -1)
    mac = np.frombuffer(bytes(range(100, 116)), np.uint8).reshape(1, -1)
    return fmt.records([lba], [hba], kn, mac)


# ---- golden bytes ----------------------------------------------------------------------

def test_version():
    assert F.FORMAT_VERSION == 3
    assert (F.BLOCK_SIZE, F.SEGMENT_BLOCKS, F.INDEX_CHUNK_BLOCKS) == (4096, 1024, 64)


def test_index_record_golden():
    rec = _record(RecordFormat(16), 5, 7)
    assert rec.tobytes().hex() == (
        "0500000000000000" "0700000000000000"
        "000102030405060708090a0b0c0d0e0f" "101112131415161718191a1b"
        "6465666768696a6b6c6d6e6f70717273")
    assert RecordFormat(16).size == 60 and RecordFormat(32).size == 76
    assert RecordFormat(16).tombstone.hex() == "ff" * 8 + "00" * 44


def test_superblock_header_golden():
    hdr = F.SUPERBLOCK_HEADER.pack(F.SUPERBLOCK_MAGIC, 3, 0, 0, bytes(range(16)), 2, 1700000000,
                                   16384, 16384, 3000, 16, 8, 0, b"\x33" * 12, 200)
    assert hdr.hex() == (
        "53574f524e44534b" "03000000" "00000000" "00000000"
        "000102030405060708090a0b0c0d0e0f" "0200000000000000" "00f1536500000000"
        "0040000000000000" "0040000000000000" "b80b000000000000" "10" "08" "0000"
        + "33" * 12 + "c8000000")
    assert F.SUPERBLOCK_HEADER.size == 96


def test_key_slot_golden():
    slot = F.KEY_SLOT.pack(F.SLOT_PASSPHRASE, F.KDF_ARGON2ID, 0, 65536, 4, 2, b"\x11" * 32,
                           b"\x22" * 12, b"\x44" * 32, b"\x55" * 16, bytes(20))
    assert slot.hex() == (
        "02" "02" "0000" "00000100" "04000000" "02000000" + "11" * 32 + "22" * 12
        + "44" * 32 + "55" * 16 + "00" * 20)
    assert (F.KEY_SLOT.size, F.KEY_SLOTS, F.SLOT_AAD_BYTES) == (128, 8, 48)
    assert (F.SUPERBLOCK_SLOTS_AT, F.SUPERBLOCK_BODY_AT, F.SUPERBLOCK_CHECKSUM_AT) == \
        (96, 1120, 4064)
    assert (F.SLOT_EMPTY, F.SLOT_KEY_FILE, F.SLOT_PASSPHRASE) == (0, 1, 2)
    assert (F.KDF_NONE, F.KDF_HMAC_SHA256, F.KDF_ARGON2ID) == (0, 1, 2)


def test_anchor_golden():
    raw = F.ANCHOR.pack(F.ANCHOR_MAGIC, F.ANCHOR_VERSION, 0, bytes(range(16)), 7, b"\x66" * 32)
    assert raw.hex() == ("5344414e43484f52" "01000000" "00000000"
                         "000102030405060708090a0b0c0d0e0f" "0700000000000000" + "66" * 32)
    assert F.ANCHOR.size == 72


def test_superblock_as_written():
    """What format writes: both copies carry the header above, version 3, no features,
    slot 0 a key-file slot and the rest empty, a checksum that matches, and the body is
    not plaintext."""
    import hashlib
    data, meta = MemoryDevice(64 * MiB), MemoryDevice(SwornDisk.min_meta_size(64 * MiB))
    disk = SwornDisk.create(data, meta, KEY16)
    lay = disk.layout
    disk.close()
    for copy in (0, 1):
        blk = bytes(meta.buf[copy * 4096:(copy + 1) * 4096])
        h = header(blk)
        assert (h["magic"], h["version"], h["incompat"], h["compat"], h["generation"]) == \
            (b"SWORNDSK", 3, 0, 0, 1)
        assert (h["nr_blocks"], h["data_blocks"], h["meta_blocks"], h["cipher_key_bytes"],
                h["key_slots"]) == (lay.nr_blocks, lay.data_blocks, lay.meta_blocks, 16, 8)
        slots = [F.KEY_SLOT.unpack_from(blk, F.SUPERBLOCK_SLOTS_AT + i * 128) for i in range(8)]
        assert slots[0][:2] == (F.SLOT_KEY_FILE, F.KDF_HMAC_SHA256)
        assert all(s == F.KEY_SLOT.unpack_from(bytes(128)) for s in slots[1:])
        assert hashlib.sha256(blk[:4064]).digest() == blk[4064:]
        assert b"layout" not in blk and b"nr_blocks" not in blk


def test_bit_node_header_golden():
    assert F.NODE_HEADER.pack(F.NODE_MAGIC, F.NODE_INTERNAL, 3, 0, 67, bytes(4)).hex() == \
        "4249544e" "01" "03" "0000" "43000000" "00000000"


def test_segment_table_golden():
    assert F.DETAIL_DTYPE.itemsize * F.SEGMENT_BLOCKS == F.BLOCK_SIZE
    assert np.array([7, F.DETAIL_NONE], F.DETAIL_DTYPE).tobytes().hex() == "07000000ffffffff"
    d = np.zeros(1, F.segdir_dtype(16))
    d["hba"], d["count"] = 0x1234, 1024
    raw = d.tobytes()
    assert len(raw) == 54 and raw[:8].hex() == "3412000000000000" and raw[-2:].hex() == "0004"


def test_journal_block_golden():
    assert F.JOURNAL_HEADER.pack(F.JOURNAL_MAGIC, 9, b"\x01" * 12).hex() == \
        "53444a42" "0900000000000000" + "01" * 12
    assert F.JOURNAL_BODY_HEADER.pack(b"\x02" * 16, F.JOURNAL_FLAG_LAST, 300).hex() == \
        "02" * 16 + "01" "2c01"
    assert (F.JOURNAL_BODY, F.JOURNAL_PAYLOAD) == (4056, 4037)


def test_journal_operations_golden():
    fmt = RecordFormat(16)
    ops = [Writes(_record(fmt, 5, 7)), Discard(10, 3), Commit(7), Checkpoint(2, b"\x44" * 16)]
    payload = encode(ops)
    assert payload.hex() == (
        "57" "01000000" + _record(fmt, 5, 7).tobytes().hex()
        + "44" "0a00000000000000" "0300000000000000"
        + "43" "0700000000000000"
        + "4b" "0200000000000000" + "44" * 16)
    assert decode(fmt, payload) == ops


def test_checkpoint_pack_golden():
    assert F.PACK_HEADER.pack(F.PACK_MAGIC, 3, b"\x05" * 12, 4096).hex() == \
        "53444350" "0300000000000000" + "05" * 12 + "0010000000000000"
    assert F.PACK_SECTION.pack(F.SECTION_SEGDIR, 54).hex() == \
        "7365676469720000" "3600000000000000"
    assert (F.ICHUNK_FREE, F.ICHUNK_USED, F.ICHUNK_RETIRING) == (0, 1, 2)


# ---- versions and features ----------------------------------------------------------------

def _formatted():
    data, meta = MemoryDevice(64 * MiB), MemoryDevice(SwornDisk.min_meta_size(64 * MiB))
    SwornDisk.create(data, meta, KEY16).close()
    return data, meta


def _set_header(meta: MemoryDevice, copies, **fields) -> None:
    """Sets header fields and recomputes the checksum, as a newer sworndisk would write."""
    import hashlib
    offsets = {name: (off, size) for name, off, size in F.SUPERBLOCK_HEADER.offsets()}
    for copy in copies:
        base = copy * 4096
        for name, value in fields.items():
            off, size = offsets[name]
            meta.buf[base + off:base + off + size] = value.to_bytes(size, "little")
        meta.buf[base + 4064:base + 4096] = hashlib.sha256(meta.buf[base:base + 4064]).digest()


@pytest.mark.parametrize("field,value,says", [("version", 4, "upgrade sworndisk"),
                                              ("incompat", 1 << 7, "upgrade sworndisk"),
                                              ("version", 2, "older sworndisk")])
def test_unknown_version_or_required_feature_is_refused(field, value, says):
    data, meta = _formatted()
    _set_header(meta, (0, 1), **{field: value})
    with pytest.raises(UnsupportedFormatError, match=says):
        SwornDisk.open(data, meta, KEY16)


def test_unknown_feature_in_one_copy_falls_back_to_the_other():
    data, meta = _formatted()
    _set_header(meta, (0,), incompat=1 << 7)
    SwornDisk.open(data, meta, KEY16).close()


def test_wrong_key_and_blank_device_still_say_so():
    data, meta = _formatted()
    with pytest.raises(WrongKeyError):
        SwornDisk.open(data, meta, b"\x01" * 16)
    with pytest.raises(NotFormattedError):
        SwornDisk.open(data, MemoryDevice(len(meta.buf)), KEY16)


# ---- docs/format.md agrees with format.py ----------------------------------------------------

def _doc_tables() -> dict[str, list[list[tuple[str, str]]]]:
    """heading -> its offset tables, each a list of (offset, size) cells as written."""
    tables: dict[str, list] = {}
    heading, current = None, None
    for line in open(DOC, encoding="utf-8"):
        if line.startswith("#"):
            heading, current = line.strip("# \n"), None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if cells and cells[:3] == ["offset", "size", "field"]:
            current = []
            tables.setdefault(heading, []).append(current)
        elif cells and current is not None and not set(cells[0]) <= set("-"):
            current.append((cells[0], cells[1]))
        elif not cells:
            current = None
    return tables


def _value(cell: str, k: int) -> int | None:
    """A table cell as a number (k = key size), None for sizes like 'count x record'."""
    cell = cell.replace("k", str(k))
    return int(eval(cell, {})) if re.fullmatch(r"[0-9+ ]+", cell) else None


CASES = [
    ("The index record (`sworndisk/records.py`)", 0,
     F.Fields(("lba", "Q"), ("hba", "Q"), ("key", "16s"), ("nonce", "12s"), ("mac", "16s"))),
    ("Superblock (`sworndisk/superblock.py`)", 0, F.SUPERBLOCK_HEADER),
    ("Superblock (`sworndisk/superblock.py`)", 1, F.KEY_SLOT),
    ("Rollback anchor (`sworndisk/anchor.py`)", 0, F.ANCHOR),
    ("BIT nodes (`sworndisk/bit.py`)", 0, F.NODE_HEADER),
    ("Journal (`sworndisk/journal.py`)", 0, F.JOURNAL_HEADER),
    ("Journal (`sworndisk/journal.py`)", 1, F.JOURNAL_BODY_HEADER),
    ("Checkpoint packs (`sworndisk/checkpoint.py`)", 0, F.PACK_HEADER),
]


@pytest.mark.parametrize("heading,index,fields", CASES, ids=[f"{c[0][:20]}-{c[1]}" for c in CASES])
def test_doc_offset_tables_match_the_structs(heading, index, fields):
    tables = _doc_tables()
    assert heading in tables, f"docs/format.md has no offset table under '{heading}'"
    rows = tables[heading][index]
    want = [(off, size) for _, off, size in fields.offsets()]
    got = [(_value(o, 16), _value(s, 16)) for o, s in rows[:len(want)]]
    assert got == want, f"{heading}: the document says {got}, format.py says {want}"


def test_doc_tails_match_the_block_sizes():
    """The rows after the headers: the journal body and tag, the pack's MAC."""
    tables = _doc_tables()
    journal = tables["Journal (`sworndisk/journal.py`)"][0]
    assert (_value(journal[3][0], 0), _value(journal[3][1], 0)) == \
        (F.JOURNAL_HEADER.size, F.JOURNAL_BODY)
    assert (_value(journal[4][0], 0), _value(journal[4][1], 0)) == \
        (F.BLOCK_SIZE - F.TAG_BYTES, F.TAG_BYTES)
    pack = tables["Checkpoint packs (`sworndisk/checkpoint.py`)"][0]
    assert (_value(pack[4][0], 0), _value(pack[4][1], 0)) == (F.PACK_HEADER.size, F.TAG_BYTES)
    sb = tables["Superblock (`sworndisk/superblock.py`)"][0]
    tail = [(_value(o, 0), _value(n, 0)) for o, n in sb[len(F.SUPERBLOCK_HEADER.fields):]]
    assert tail[0] == (F.SUPERBLOCK_SLOTS_AT, F.KEY_SLOTS * F.KEY_SLOT.size)
    assert tail[1][0] == F.SUPERBLOCK_BODY_AT
    assert tail[-1] == (F.SUPERBLOCK_CHECKSUM_AT, 32)
    assert "version 3" in open(DOC, encoding="utf-8").readline()


# ---- resize (sworndisk/resize.py, docs/format.md "Resize") ------------------------------------

def test_resize_layouts_golden():
    """The layouts --max-sectors reserves and a resize writes (the superblock body's
    "layout"): a reservation sizes the regions for the larger disk; growing within it
    changes only the sizes; growing beyond moves the checkpoint slots, journal and
    segment table behind everything in use, and the index region grows over the gap."""
    from sworndisk import Config
    from sworndisk.layout import grown, plan_devices
    reserved, cfg = plan_devices(64 * MiB, 14774 * 4096, None, Config(), 1 << 18)
    assert reserved.to_dict() == {
        "nr_blocks": 14336, "data_segments": 16, "reserve_segments": 2, "checkpoint_start": 2,
        "checkpoint_blocks": 12, "journal_start": 26, "journal_blocks": 1024,
        "segtable_start": 1050, "segtable_blocks": 540, "index_start": 1590,
        "index_chunks": 206}
    assert cfg.memtable_records == 8192 and reserved.meta_blocks == 14774
    assert grown(reserved, cfg, 1 << 30, 14774 * 4096).to_dict() == dict(
        reserved.to_dict(), nr_blocks=256000, data_segments=256, reserve_segments=6)
    old, cfg = plan_devices(24 * MiB, 3054 * 4096, None, Config())
    assert (old.index_start, old.index_chunks, old.meta_blocks) == (1070, 31, 3054)
    moved = grown(old, cfg, 64 * MiB, 64 * MiB)
    assert moved.to_dict() == {
        "nr_blocks": 14336, "data_segments": 16, "reserve_segments": 2,
        "checkpoint_start": 4782, "checkpoint_blocks": 8, "journal_start": 4798,
        "journal_blocks": 1024, "segtable_start": 5822, "segtable_blocks": 48,
        "index_start": 1070, "index_chunks": 58}
    assert moved.meta_blocks == 5870     # the header's "meta device blocks in use"


def test_resized_superblock_as_written():
    """After a resize: generation 2 in both copies, the header's sizes the new layout's,
    and the authenticated body's layout the one grown() computed."""
    from sworndisk import superblock as sbmod
    from sworndisk.layout import grown
    from sworndisk.resize import grow

    class Grow(MemoryDevice):
        def __init__(self, size, visible):
            super().__init__(size)
            self.visible = visible

        @property
        def size(self):
            return self.visible
    data = Grow(64 * MiB, 24 * MiB)
    meta = Grow(64 * MiB, SwornDisk.min_meta_size(24 * MiB))
    disk = SwornDisk.create(data, meta, KEY16)
    old, cfg = disk.layout, disk.config
    disk.close()
    data.visible = meta.visible = 64 * MiB
    grow(data, meta, key=KEY16)
    blocks = [bytes(meta.buf[i * 4096:(i + 1) * 4096]) for i in (0, 1)]
    want = grown(old, cfg, 64 * MiB, 64 * MiB)
    for blk in blocks:
        h = header(blk)
        assert (h["generation"], h["nr_blocks"], h["data_blocks"], h["meta_blocks"]) == \
            (2, want.nr_blocks, want.data_blocks, want.meta_blocks)
    assert sbmod.unlock(blocks, sbmod.Credential.of(KEY16)).superblock.layout == want
