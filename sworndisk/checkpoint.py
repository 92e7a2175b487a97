"""Checkpoint packs: the whole persistent state but the journal tail, in one AEAD unit.

Two slots alternate (pack seq % 2). A pack is only trusted when the journal confirms it:
the transaction at its anchor must be a checkpoint record naming its seq and MAC (see
disk.py, recovery). Layout of a slot:

    block 0:  magic "SDCP" | seq u64 | nonce 12 | body length u64 | tag 16   (header = AAD)
    block 1+: AES-GCM(derive(root, "checkpoint", seq), nonce, body)

The body is a list of sections (name, length, bytes): "meta" (JSON: anchor, counters,
BIT catalog), "segdir" (the segment table directory: per data segment, where its
DST/RIT detail block is, its key, nonce, MAC and valid count), "ichunks" (u8 state per
index chunk). See docs/format.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from . import crypto
from .format import BLOCK_SIZE
from .device import BlockDevice
from .errors import IntegrityError

from .format import LABEL_CHECKPOINT, PACK_HEADER as _HDR, PACK_MAGIC as MAGIC
from .format import PACK_SECTION as _SECTION, SECTION_ICHUNKS, SECTION_META, SECTION_SEGDIR


@dataclass
class Pack:
    seq: int
    anchor_seq: int           # journal block holding this pack's checkpoint record
    anchor_prev_mac: bytes    # MAC of the block before it
    meta: dict                # JSON-able scalars and the BIT catalog
    segdir: np.ndarray        # segment table directory (segtable.dir_dtype), one per segment
    ichunks: np.ndarray       # u8 state per index chunk
    mac: bytes = field(default=b"")

    def encode(self, root: bytes) -> tuple[bytes, bytes]:
        """Returns (slot bytes, mac)."""
        meta = dict(self.meta, anchor_seq=self.anchor_seq,
                    anchor_prev_mac=self.anchor_prev_mac.hex())
        sections = [(SECTION_META, json.dumps(meta, sort_keys=True).encode()),
                    (SECTION_SEGDIR, self.segdir.tobytes()),
                    (SECTION_ICHUNKS, self.ichunks.astype(np.uint8).tobytes())]
        body = b"".join(_SECTION.pack(name, len(data)) + data for name, data in sections)
        nonce = crypto.random_bytes(crypto.NONCE_BYTES)
        hdr = _HDR.pack(MAGIC, self.seq, nonce, len(body))
        ct, mac = crypto.encrypt(crypto.derive(root, LABEL_CHECKPOINT, self.seq), nonce, body, hdr)
        head = hdr + mac
        head += bytes(BLOCK_SIZE - len(head))
        pad = -len(ct) % BLOCK_SIZE
        return head + ct + bytes(pad), mac


def slot_blocks_needed(body_len: int) -> int:
    return 1 + -(-body_len // BLOCK_SIZE)


def read_pack(meta_dev: BlockDevice, root: bytes, slot_start: int, slot_blocks: int,
              segdir_dtype: np.dtype) -> Pack | None:
    """The pack in one slot, or None if the slot holds nothing that verifies."""
    head = meta_dev.pread(BLOCK_SIZE, slot_start * BLOCK_SIZE)
    magic, seq, nonce, body_len = _HDR.unpack_from(head)
    if magic != MAGIC or slot_blocks_needed(body_len) > slot_blocks:
        return None
    mac = head[_HDR.size:_HDR.size + crypto.TAG_BYTES]
    nblk = -(-body_len // BLOCK_SIZE)
    ct = meta_dev.pread(nblk * BLOCK_SIZE, (slot_start + 1) * BLOCK_SIZE)[:body_len]
    try:
        body = crypto.decrypt(crypto.derive(root, LABEL_CHECKPOINT, seq), nonce, ct, mac,
                              "checkpoint pack", head[:_HDR.size])
    except IntegrityError:
        return None
    sections, off = {}, 0
    while off < len(body):
        name, n = _SECTION.unpack_from(body, off)
        off += _SECTION.size
        sections[name.rstrip(b"\0")] = body[off:off + n]
        off += n
    meta = json.loads(sections[SECTION_META])
    segdir = np.frombuffer(sections[SECTION_SEGDIR], segdir_dtype).copy()
    ichunks = np.frombuffer(sections[SECTION_ICHUNKS], np.uint8).copy()
    return Pack(seq, meta.pop("anchor_seq"), bytes.fromhex(meta.pop("anchor_prev_mac")), meta,
                segdir, ichunks, mac)
