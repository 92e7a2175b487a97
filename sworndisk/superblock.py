"""The superblock: written twice at format time, never again.

Layout in sworndisk/format.py (SUPERBLOCK_HEADER) and docs/format.md: a plaintext header
(magic, format version, incompatible and compatible feature flags, uuid, KDF salt, key
check, nonce, body length), then the JSON body (layout and Config) under AES-GCM with the
header as associated data.

The key check lets `open` tell a wrong key (WrongKeyError) from a damaged superblock
(IntegrityError) before anything else is trusted. A copy of a newer format version, or
with an incompatible feature this code does not know, is refused (UnsupportedFormatError)
rather than misread.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import uuid as uuidlib
from dataclasses import dataclass

from . import crypto
from .config import Config
from .errors import IntegrityError, NotFormattedError, UnsupportedFormatError, WrongKeyError
from .format import (BLOCK_SIZE, FORMAT_VERSION, INCOMPAT_PASSPHRASE, KNOWN_INCOMPAT,
                     LABEL_KEY_CHECK, LABEL_SUPERBLOCK, SUPERBLOCK_HEADER as _HDR,
                     SUPERBLOCK_MAGIC as MAGIC)
from .layout import Layout


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
        incompat = INCOMPAT_PASSPHRASE if self.kdf_salt else 0
        hdr = _HDR.pack(MAGIC, FORMAT_VERSION, incompat, 0, self.uuid,
                        self.kdf_salt or bytes(32), key_check(root, self.uuid), nonce, len(body))
        ct, tag = crypto.encrypt(crypto.derive(root, LABEL_SUPERBLOCK), nonce, body, hdr)
        blk = hdr + ct + tag
        if len(blk) > BLOCK_SIZE:
            raise ValueError("superblock body too large")
        return blk + bytes(BLOCK_SIZE - len(blk))

    @staticmethod
    def new_uuid() -> bytes:
        return uuidlib.uuid4().bytes


def key_check(root: bytes, disk_uuid: bytes) -> bytes:
    return hmac.new(root, LABEL_KEY_CHECK + disk_uuid, hashlib.sha256).digest()


def has_magic(blk: bytes) -> bool:
    return blk[:8] == MAGIC


def header(blk: bytes) -> dict:
    """The plaintext header fields of a copy, by name (format.SUPERBLOCK_HEADER)."""
    return dict(zip((name for name, _ in _HDR.fields), _HDR.unpack_from(blk)))


def read_salt(blk: bytes) -> bytes | None:
    """The KDF salt from a superblock copy's plaintext header (None for a raw key)."""
    if not has_magic(blk):
        return None
    h = header(blk)
    return h["kdf_salt"] if h["incompat"] & INCOMPAT_PASSPHRASE else None


def unsupported(blk: bytes) -> str | None:
    """Why this code cannot read a copy (a newer version, an unknown required feature)."""
    h = header(blk)
    if h["version"] != FORMAT_VERSION:
        return f"format version {h['version']} (this sworndisk reads version {FORMAT_VERSION})"
    unknown = h["incompat"] & ~KNOWN_INCOMPAT
    if unknown:
        return f"required features 0x{unknown:x} that this sworndisk does not know"
    return None


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
    return any(has_magic(blk) and hmac.compare_digest(
        header(blk)["key_check"], key_check(root, header(blk)["uuid"])) for blk in copies)


def decode(copies: list[bytes], root: bytes) -> Superblock:
    """Verifies the first copy that authenticates; the other copy is a spare."""
    present = [b for b in copies if has_magic(b)]
    if not present:
        raise NotFormattedError("the meta device holds no SwornDisk (no superblock magic)")
    reasons = [unsupported(b) for b in present]
    if all(reasons):
        raise UnsupportedFormatError(f"this disk uses {reasons[0]}: upgrade sworndisk to open it")
    wrong_key = 0
    for blk, reason in zip(present, reasons):
        if reason:
            continue
        h = header(blk)
        if not hmac.compare_digest(h["key_check"], key_check(root, h["uuid"])):
            wrong_key += 1
            continue
        n = h["body_length"]
        if n > BLOCK_SIZE - _HDR.size - crypto.TAG_BYTES:
            continue
        try:
            body = crypto.decrypt(crypto.derive(root, LABEL_SUPERBLOCK), h["nonce"],
                                  blk[_HDR.size:_HDR.size + n],
                                  blk[_HDR.size + n:_HDR.size + n + crypto.TAG_BYTES],
                                  "superblock", blk[:_HDR.size])
        except IntegrityError:
            continue
        d = json.loads(body)
        return Superblock(h["uuid"], Layout.from_dict(d["layout"]), Config.from_dict(d["config"]),
                          read_salt(blk))
    if wrong_key and wrong_key == sum(1 for r in reasons if not r):
        raise WrongKeyError("the key does not match this disk")
    raise IntegrityError("no superblock copy verifies: the meta device is damaged or tampered")
