"""The superblock: written twice at format time, never again.

Block layout (4096 bytes, little-endian):

    0   8  magic "SWORNDSK"         plaintext
    8   4  format version           plaintext
    12  4  flags (bit 0: kdf salt present)
    16 16  disk uuid
    32 32  kdf salt (scrypt; zeros when the key is raw)
    64 32  key check: HMAC-SHA256(root, "sworndisk key check" || uuid)
    96 12  nonce
    108 4  body length n
    112 n  body: AES-GCM(derive(root, "superblock"), nonce, JSON, aad=bytes 0..111)
    112+n 16 tag

The key check lets `open` tell a wrong key (WrongKeyError) from a damaged superblock
(IntegrityError) before anything else is trusted.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import struct
import uuid as uuidlib
from dataclasses import dataclass

from . import crypto
from .config import BLOCK_SIZE, Config
from .errors import IntegrityError, NotFormattedError, WrongKeyError
from .layout import Layout

MAGIC = b"SWORNDSK"
VERSION = 1
_HDR = struct.Struct("<8sII16s32s32s12sI")
FLAG_KDF = 1


@dataclass(frozen=True)
class Superblock:
    uuid: bytes
    layout: Layout
    config: Config
    kdf_salt: bytes | None = None

    def encode(self, root: bytes) -> bytes:
        body = json.dumps({"layout": self.layout.to_dict(), "config": self.config.to_dict()},
                          sort_keys=True).encode()
        nonce = crypto.random_bytes(crypto.NONCE_BYTES)
        flags = FLAG_KDF if self.kdf_salt else 0
        hdr = _HDR.pack(MAGIC, VERSION, flags, self.uuid, self.kdf_salt or bytes(32),
                        key_check(root, self.uuid), nonce, len(body))
        ct, tag = crypto.encrypt(crypto.derive(root, "superblock"), nonce, body, hdr)
        blk = hdr + ct + tag
        if len(blk) > BLOCK_SIZE:
            raise ValueError("superblock body too large")
        return blk + bytes(BLOCK_SIZE - len(blk))

    @staticmethod
    def new_uuid() -> bytes:
        return uuidlib.uuid4().bytes


def key_check(root: bytes, disk_uuid: bytes) -> bytes:
    return hmac.new(root, b"sworndisk key check" + disk_uuid, hashlib.sha256).digest()


def has_magic(blk: bytes) -> bool:
    return blk[:8] == MAGIC


def read_salt(blk: bytes) -> bytes | None:
    """The KDF salt from a superblock copy's plaintext header (None for a raw key)."""
    if not has_magic(blk):
        return None
    _, _, flags, _, salt, *_ = _HDR.unpack_from(blk)
    return salt if flags & FLAG_KDF else None


def read_copies(meta) -> list[bytes]:
    """Both superblock copies of a meta device (a path or a BlockDevice); blank blocks
    where the device is too small to hold them."""
    from .device import as_device
    m = as_device(meta, "the meta device")
    try:
        if m.size < 2 * BLOCK_SIZE:
            return [bytes(BLOCK_SIZE), bytes(BLOCK_SIZE)]
        return [m.pread(BLOCK_SIZE, i * BLOCK_SIZE) for i in (0, 1)]
    finally:
        if m is not meta:
            m.close()


def salts(copies: list[bytes]) -> list[bytes]:
    """Every distinct KDF salt the copies hold, copy 0's first."""
    out: list[bytes] = []
    for blk in copies:
        salt = read_salt(blk)
        if salt and salt not in out:
            out.append(salt)
    return out


def passphrase_key(copies: list[bytes], passphrase) -> bytes:
    """The root key a passphrase gives: tries the salt of every copy and keeps the key
    whose key check verifies, so one damaged salt does not read as a wrong passphrase."""
    from . import kdf
    candidates = salts(copies)
    if not candidates:
        raise WrongKeyError("this disk has no passphrase (it was formatted with a key file)")
    for salt in candidates:
        key = kdf.derive_key(passphrase, salt)
        if key_verifies(copies, key):
            return key
    raise WrongKeyError("the passphrase does not match this disk")


def key_verifies(copies: list[bytes], root: bytes) -> bool:
    """True if the key check of some superblock copy accepts `root`."""
    for blk in copies:
        if has_magic(blk):
            _, _, _, disk_uuid, _, check, _, _ = _HDR.unpack_from(blk)
            if hmac.compare_digest(check, key_check(root, disk_uuid)):
                return True
    return False


def decode(copies: list[bytes], root: bytes) -> Superblock:
    """Verifies the first copy that authenticates; the other copy is a spare."""
    if not any(has_magic(b) for b in copies):
        raise NotFormattedError("the meta device holds no SwornDisk (no superblock magic)")
    wrong_key = 0
    for blk in copies:
        if not has_magic(blk):
            continue
        magic, version, flags, disk_uuid, salt, check, nonce, n = _HDR.unpack_from(blk)
        if version != VERSION:
            continue
        if not hmac.compare_digest(check, key_check(root, disk_uuid)):
            wrong_key += 1
            continue
        if n > BLOCK_SIZE - _HDR.size - crypto.TAG_BYTES:
            continue
        try:
            body = crypto.decrypt(crypto.derive(root, "superblock"), nonce,
                                  blk[_HDR.size:_HDR.size + n],
                                  blk[_HDR.size + n:_HDR.size + n + crypto.TAG_BYTES],
                                  "superblock", blk[:_HDR.size])
        except IntegrityError:
            continue
        d = json.loads(body)
        return Superblock(disk_uuid, Layout.from_dict(d["layout"]), Config.from_dict(d["config"]),
                          salt if flags & FLAG_KDF else None)
    if wrong_key and wrong_key == sum(1 for b in copies if has_magic(b)):
        raise WrongKeyError("the key does not match this disk")
    raise IntegrityError("no superblock copy verifies: the meta device is damaged or tampered")
