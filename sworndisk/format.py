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
FORMAT_VERSION = 3               # 3: a random master key wrapped in key slots
KNOWN_INCOMPAT = 0               # none yet; an unknown required feature is refused
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
LABEL_KEY_FILE_KEK = b"sworndisk key slot"  # HMAC-SHA256(key file key, label || slot salt)
LABEL_SUPERBLOCK = "superblock"             # derive(master, label)
LABEL_DISK = "disk"                         # derive(master, label, uuid as two u64)
LABEL_ANCHOR = "anchor"                     # derive(disk key, label): the anchor file's MAC key
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
# One 4 KiB block: header | key slots | encrypted body | tag | ... | checksum (last 32 bytes).
SUPERBLOCK_MAGIC = b"SWORNDSK"
SUPERBLOCK_HEADER = Fields(           # plaintext; with the slots, the AAD of the body
    ("magic", "8s"), ("version", "I"), ("incompat", "I"), ("compat", "I"), ("uuid", "16s"),
    ("generation", "Q"), ("created", "Q"), ("nr_blocks", "Q"), ("data_blocks", "Q"),
    ("meta_blocks", "Q"), ("cipher_key_bytes", "B"), ("key_slots", "B"), ("reserved", "H"),
    ("nonce", "12s"), ("body_length", "I"))
MASTER_KEY_BYTES = 32                 # random at format; every disk key derives from it
KEY_SLOTS = 8
KEY_SLOT = Fields(                    # the master key wrapped under a key-encryption key
    ("kind", "B"), ("kdf", "B"), ("reserved", "H"), ("memory_kib", "I"), ("iterations", "I"),
    ("lanes", "I"), ("salt", "32s"), ("nonce", "12s"), ("wrapped_key", "32s"), ("tag", "16s"),
    ("reserved2", "20s"))
SLOT_EMPTY, SLOT_KEY_FILE, SLOT_PASSPHRASE = 0, 1, 2
KDF_NONE, KDF_HMAC_SHA256, KDF_ARGON2ID = 0, 1, 2
SLOT_AAD_BYTES = 48                   # kind .. salt: bound to the wrapped key with uuid, index
SUPERBLOCK_SLOTS_AT = SUPERBLOCK_HEADER.size
SUPERBLOCK_BODY_AT = SUPERBLOCK_SLOTS_AT + KEY_SLOTS * KEY_SLOT.size
SUPERBLOCK_CHECKSUM_AT = BLOCK_SIZE - 32     # SHA-256 of every byte before it
HEADER_BACKUP_BYTES = SUPERBLOCK_COPIES * BLOCK_SIZE     # header-backup: both copies

# ---- rollback anchor (anchor.py): a file on storage the user trusts -------------------------
ANCHOR_MAGIC = b"SDANCHOR"
ANCHOR_VERSION = 1
ANCHOR = Fields(("magic", "8s"), ("version", "I"), ("reserved", "I"), ("uuid", "16s"),
                ("commit_seq", "Q"), ("mac", "32s"))   # mac: HMAC-SHA256 of the bytes before it

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
