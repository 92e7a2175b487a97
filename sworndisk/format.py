"""The on-disk format, defined once: every struct, dtype, magic, label and size.

In the order of docs/format.md, which describes the same things in prose and tables;
tests/test_format.py pins each structure here with golden bytes and checks the document's
offset tables against these definitions, so neither can drift. The modules that read and
write a structure (named beside each) import it from here and define nothing of it.
"""
from __future__ import annotations

import struct

import numpy as np

# ---- versions and features (superblock) ------------------------------------------------
FORMAT_VERSION = 2
INCOMPAT_PASSPHRASE = 1 << 0     # the root key is scrypt(passphrase, superblock salt)
KNOWN_INCOMPAT = INCOMPAT_PASSPHRASE
KNOWN_COMPAT = 0                 # none yet; unknown compatible features are ignored

# ---- sizes -------------------------------------------------------------------------------
BLOCK_SIZE = 4096                # every structure, both devices
SECTOR_SIZE = 512
SEGMENT_BLOCKS = 1024            # data segments of 4 MiB
INDEX_CHUNK_BLOCKS = 64          # index space is allocated in 256 KiB chunks
SUPERBLOCK_COPIES = 2            # meta blocks 0 and 1
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_SIZES = (16, 32)             # AES-128 / AES-256 for data blocks and BIT nodes


class Fields:
    """A fixed little-endian layout: named fields with struct codes, in on-disk order."""

    def __init__(self, *fields: tuple[str, str]):
        self.fields = fields
        self.struct = struct.Struct("<" + "".join(code for _, code in fields))
        self.size = self.struct.size
        self.pack, self.pack_into = self.struct.pack, self.struct.pack_into
        self.unpack_from = self.struct.unpack_from

    def offsets(self) -> list[tuple[str, int, int]]:
        """(name, offset, size) per field, as docs/format.md tabulates them."""
        out, off = [], 0
        for name, code in self.fields:
            size = struct.calcsize("<" + code)
            out.append((name, off, size))
            off += size
        return out


# ---- key derivation labels (crypto.derive) ------------------------------------------------
LABEL_KEY_CHECK = b"sworndisk key check"    # HMAC-SHA256(root, label || uuid)
LABEL_SUPERBLOCK = "superblock"             # derive(root, label)
LABEL_DISK = "disk"                         # derive(root, label, uuid as two u64)
LABEL_CHECKPOINT = "checkpoint"             # derive(disk key, label, pack seq)
LABEL_JOURNAL = "journal"                   # journal KDK = derive(disk key, label)
LABEL_JOURNAL_BLOCK = "block"               # derive(journal KDK, label, seq)[0:16]
LABEL_JOURNAL_GENESIS = "genesis"           # derive(journal KDK, label)[0:16]
LABEL_FRONTEND = "frontend:"                # derive(disk key, label + name): front ends


# ---- the index record (records.py) --------------------------------------------------------
TOMBSTONE_HBA = 0xFFFF_FFFF_FFFF_FFFF       # a discarded LBA


def record_dtype(key_bytes: int) -> np.dtype:
    """LBA -> (HBA, key, nonce, MAC): MemTable values, journal W records, BIT entries."""
    return np.dtype([("lba", "<u8"), ("hba", "<u8"), ("key", f"V{key_bytes}"),
                     ("nonce", f"V{NONCE_BYTES}"), ("mac", f"V{TAG_BYTES}")])


# ---- superblock (superblock.py) -------------------------------------------------------------
SUPERBLOCK_MAGIC = b"SWORNDSK"
SUPERBLOCK_HEADER = Fields(           # plaintext; the AAD of the encrypted body after it
    ("magic", "8s"), ("version", "I"), ("incompat", "I"), ("compat", "I"), ("uuid", "16s"),
    ("kdf_salt", "32s"), ("key_check", "32s"), ("nonce", "12s"), ("body_length", "I"))

# ---- BIT nodes (bit.py) ---------------------------------------------------------------------
NODE_MAGIC = b"BITN"
NODE_LEAF, NODE_INTERNAL = 0, 1
NODE_HEADER = Fields(("magic", "4s"), ("kind", "B"), ("height", "B"), ("reserved", "H"),
                     ("count", "I"), ("reserved2", "4s"))

# ---- segment table blocks (segtable.py) ---------------------------------------------------
DETAIL_DTYPE = np.dtype("<u4")               # the LBA each block of a segment holds
DETAIL_NONE = np.uint32(0xFFFF_FFFF)         # ... or nothing valid
NO_BLOCK = np.uint64(0xFFFF_FFFF_FFFF_FFFF)  # directory: the segment has no detail block


def segdir_dtype(key_bytes: int) -> np.dtype:
    """Checkpoint segment directory entry: where a segment's detail block is, its key,
    nonce, MAC and the segment's valid count."""
    return np.dtype([("hba", "<u8"), ("key", f"V{key_bytes}"), ("nonce", f"V{NONCE_BYTES}"),
                     ("mac", f"V{TAG_BYTES}"), ("count", "<u2")])


# ---- journal (journal.py, ops.py) -------------------------------------------------------------
JOURNAL_MAGIC = b"SDJB"
JOURNAL_HEADER = Fields(("magic", "4s"), ("seq", "Q"), ("nonce", "12s"))   # plaintext, AAD
JOURNAL_BODY = BLOCK_SIZE - JOURNAL_HEADER.size - TAG_BYTES
JOURNAL_BODY_HEADER = Fields(("prev_mac", "16s"), ("flags", "B"), ("payload_length", "H"))
JOURNAL_PAYLOAD = JOURNAL_BODY - JOURNAL_BODY_HEADER.size
JOURNAL_FLAG_LAST = 1                        # the last block of a transaction
# Transaction records: a one-byte type, then its body.
OP_WRITE, OP_DISCARD, OP_COMMIT, OP_CHECKPOINT = b"W", b"D", b"C", b"K"
OP_WRITE_COUNT = struct.Struct("<I")         # then that many index records
OP_DISCARD_BODY = struct.Struct("<QQ")       # lba, count
OP_COMMIT_BODY = struct.Struct("<Q")         # commit seq
OP_CHECKPOINT_BODY = struct.Struct("<Q16s")  # pack seq, pack MAC

# ---- checkpoint packs (checkpoint.py) -------------------------------------------------------
PACK_MAGIC = b"SDCP"
PACK_HEADER = Fields(("magic", "4s"), ("seq", "Q"), ("nonce", "12s"), ("body_length", "Q"))
PACK_SECTION = Fields(("name", "8s"), ("length", "Q"))
SECTION_META, SECTION_SEGDIR, SECTION_ICHUNKS = b"meta", b"segdir", b"ichunks"
ICHUNK_FREE, ICHUNK_USED, ICHUNK_RETIRING = 0, 1, 2
