"""Passphrase to root key, with a memory-hard KDF (scrypt).

The salt is stored in the superblock's plaintext header so that a passphrase alone opens
the disk; the parameters (N=2^15, r=8, p=1: 32 MiB, ~0.1 s) follow the scrypt paper's
interactive-login recommendation and are recorded beside the salt.
"""
import hashlib
import os

SALT_BYTES = 32
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1


def new_salt() -> bytes:
    return os.urandom(SALT_BYTES)


def derive_key(passphrase: bytes, salt: bytes, key_bytes: int = 32,
               n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> bytes:
    if isinstance(passphrase, str):
        passphrase = passphrase.encode()
    return hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p,
                          maxmem=2 * 128 * r * n + (1 << 20), dklen=key_bytes)
