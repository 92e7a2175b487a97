"""Authenticated encryption and key derivation: the engine's only door to cryptography.

Every encryption unit (data block, BIT node, journal block, checkpoint pack, superblock
body) is AES-GCM with a 12-byte nonce and a 16-byte tag kept apart from the ciphertext, so
a 4 KiB block encrypts to exactly 4 KiB and its tag lives in whoever references it. Two
backends produce the same bytes (standard AES-GCM): OpenSSL through `cryptography` (default,
fast) and `pycryptodome` (optional).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct

from .errors import IntegrityError, InvalidArgument

from .format import NONCE_BYTES, TAG_BYTES  # noqa: E402,F401 (re-exported)


class _Backend:
    """What both backends share: sealing a run of blocks through encrypt_into, and
    opening many blocks through decrypt."""

    def open_blocks(self, blocks) -> list[int]:
        failed = []
        for j, (key, nonce, tag, ct, dst) in enumerate(blocks):
            pt = self.decrypt(key, nonce, ct, tag)
            if pt is None:
                failed.append(j)
            else:
                dst[:] = pt
        return failed

    def seal_blocks(self, material, kb, src, slots, out, tags, first) -> None:
        step = kb + NONCE_BYTES
        srcv, tagv = memoryview(src), memoryview(tags)
        for j, slot in enumerate(slots):
            m = (first + j) * step
            o = j * 4096
            tag = self.encrypt_into(material[m:m + kb], material[m + kb:m + step],
                                    srcv[slot * 4096:(slot + 1) * 4096], out, o)
            tagv[(first + j) * TAG_BYTES:(first + j + 1) * TAG_BYTES] = tag


class _OpenSSLBackend(_Backend):
    name = "cryptography"

    def __init__(self):
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        self._aesgcm = AESGCM
        self._invalid = InvalidTag

    def encrypt(self, key: bytes, nonce: bytes, data, aad: bytes | None = None):
        out = self._aesgcm(key).encrypt(nonce, data, aad)
        return out[:-TAG_BYTES], out[-TAG_BYTES:]

    def decrypt(self, key: bytes, nonce: bytes, ct, tag: bytes, aad: bytes | None = None):
        try:
            return self._aesgcm(key).decrypt(nonce, bytes(ct) + tag, aad)
        except self._invalid:
            return None

    def seal_blocks(self, material, kb, src, slots, out, tags, first) -> None:
        aesgcm = self._aesgcm
        if not hasattr(aesgcm, "encrypt_into"):
            return super().seal_blocks(material, kb, src, slots, out, tags, first)
        step = kb + NONCE_BYTES
        srcv, outv, tagv = memoryview(src), memoryview(out), memoryview(tags)
        m = first * step
        t = first * TAG_BYTES
        o = 0
        for slot in slots:
            s0 = slot * 4096
            aesgcm(material[m:m + kb]).encrypt_into(material[m + kb:m + step],
                                                    srcv[s0:s0 + 4096], None, outv[o:o + 4112])
            tagv[t:t + TAG_BYTES] = outv[o + 4096:o + 4112]
            m += step
            t += TAG_BYTES
            o += 4096

    def open_blocks(self, blocks) -> list[int]:
        aesgcm, invalid = self._aesgcm, self._invalid
        if not hasattr(aesgcm, "decrypt_into"):                # cryptography < 45
            return super().open_blocks(blocks)
        failed = []
        for j, (key, nonce, tag, ct, dst) in enumerate(blocks):
            if len(ct) != len(dst):             # a short read: it cannot authenticate
                failed.append(j)
                continue
            try:
                aesgcm(key).decrypt_into(nonce, b"".join((ct, tag)), None, dst)
            except invalid:
                failed.append(j)
        return failed

    def encrypt_into(self, key: bytes, nonce: bytes, data, out: bytearray, offset: int) -> bytes:
        n = len(data)
        aes = self._aesgcm(key)
        if hasattr(aes, "encrypt_into"):           # cryptography >= 43
            aes.encrypt_into(nonce, data, None, memoryview(out)[offset:offset + n + TAG_BYTES])
            return bytes(out[offset + n:offset + n + TAG_BYTES])
        ct, tag = self.encrypt(key, nonce, data)
        out[offset:offset + n] = ct
        return tag


class _PyCryptodomeBackend(_Backend):
    name = "pycryptodome"

    def __init__(self):
        from Crypto.Cipher import AES
        self._aes = AES

    def encrypt(self, key: bytes, nonce: bytes, data, aad: bytes | None = None):
        c = self._aes.new(key, self._aes.MODE_GCM, nonce=nonce)
        if aad:
            c.update(aad)
        return c.encrypt_and_digest(bytes(data))

    def decrypt(self, key: bytes, nonce: bytes, ct, tag: bytes, aad: bytes | None = None):
        c = self._aes.new(key, self._aes.MODE_GCM, nonce=nonce)
        if aad:
            c.update(aad)
        try:
            return c.decrypt_and_verify(bytes(ct), tag)
        except ValueError:
            return None

    def encrypt_into(self, key: bytes, nonce: bytes, data, out: bytearray, offset: int) -> bytes:
        ct, tag = self.encrypt(key, nonce, data)
        out[offset:offset + len(ct)] = ct
        return tag


_BACKENDS = {"cryptography": _OpenSSLBackend, "pycryptodome": _PyCryptodomeBackend}
_backend = None


def set_backend(name: str) -> None:
    """Select the AEAD implementation for this process (the on-disk format is the same)."""
    global _backend
    if name not in _BACKENDS:
        raise InvalidArgument(f"unknown AEAD backend {name!r}; choose one of {sorted(_BACKENDS)}")
    try:
        _backend = _BACKENDS[name]()
    except ImportError:
        raise InvalidArgument(f"AEAD backend {name!r} is not installed "
                              f"(pip install 'sworndisk[{name}]')") from None


def backend_name() -> str:
    return _get().name


def _get():
    if _backend is None:
        set_backend(os.environ.get("SWORNDISK_AEAD", "cryptography"))
    return _backend


def encrypt(key: bytes, nonce: bytes, data, aad: bytes | None = None) -> tuple[bytes, bytes]:
    """Returns (ciphertext, tag); the ciphertext has the plaintext's length."""
    return _get().encrypt(key, nonce, data, aad)


def seal_blocks(material: bytes, key_bytes: int, src: bytearray, slots: list[int],
                out: bytearray, tags: bytearray, first: int) -> None:
    """Encrypts 4 KiB blocks src[slot] into consecutive places of `out` (which has 16 spare
    bytes at the end). Block i uses key/nonce number first+i of `material` (key || nonce
    each) and its tag goes to tags[(first+i)*16:]. One call per run keeps the per-block
    work to the cipher itself."""
    _get().seal_blocks(material, key_bytes, src, slots, out, tags, first)


def open_blocks(blocks: list[tuple]) -> list[int]:
    """Decrypts and verifies many blocks at once: `blocks` holds (key, nonce, tag,
    ciphertext, destination) tuples, each destination a writable buffer of its
    ciphertext's length that receives the plaintext. Returns the positions of the blocks
    that failed authentication; their destinations hold nothing meaningful. One call for
    a whole batch keeps the per-block work to the cipher itself."""
    return _get().open_blocks(blocks)


def decrypt(key: bytes, nonce: bytes, ct, tag: bytes, what: str, aad: bytes | None = None) -> bytes:
    """Decrypts and verifies, or raises IntegrityError naming `what` failed."""
    pt = _get().decrypt(key, nonce, ct, tag, aad)
    if pt is None:
        raise authentication_error(what)
    return pt


def authentication_error(what: str) -> IntegrityError:
    """The error of a unit (named by `what`) that failed verification."""
    return IntegrityError(f"{what} failed authentication (tampered, replayed or corrupt)")


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def derive(kdk: bytes, label: str, *numbers: int, nbytes: int = 32) -> bytes:
    """Deterministic subkey: HMAC-SHA256(kdk, label || numbers), truncated.

    Used for keys that must be recomputable from the root key alone (superblock body,
    checkpoint packs, journal blocks), so that only the root key needs safekeeping.
    """
    msg = label.encode() + b"".join(struct.pack("<Q", n) for n in numbers)
    return hmac.new(kdk, msg, hashlib.sha256).digest()[:nbytes]


def check_root_key(key) -> bytes:
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise InvalidArgument(f"the root key must be bytes, not {type(key).__name__}")
    key = bytes(key)
    if len(key) not in (16, 32):
        raise InvalidArgument(f"the root key must be 16 or 32 bytes (got {len(key)})")
    return key
