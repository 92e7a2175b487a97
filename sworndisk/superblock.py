"""The superblock: two copies of one block with the layout and the key slots.

Layout in sworndisk/format.py (SUPERBLOCK_HEADER, KEY_SLOT) and docs/format.md: a
plaintext header, eight key slots, the JSON body (layout and Config) under AES-GCM with
the header and the slots as associated data, and a SHA-256 checksum of it all in the last
32 bytes.

Everything on the disk derives from a random master key made at format. Each active slot
holds that key wrapped (AES-256-GCM) under a key-encryption key from a key file or a
passphrase (kdf.py), so a key is added, changed or removed by rewriting the two copies,
never by re-encrypting the disk. The checksum only tells accidental damage apart (a copy
that fails it is skipped, so one damaged copy is survivable); authenticity comes from the
body's tag under the master key, which also covers every slot.

Key changes bump the generation and write copy 0, then copy 1: after a crash in between
the newer copy wins, and a key that opens only the older copy, while the master key it
gives authenticates the newer one, was removed: it is refused.
"""
from __future__ import annotations

import hashlib
import json
import time
import uuid as uuidlib
from dataclasses import dataclass, field, replace

from . import crypto, kdf as kdfs
from .config import Config
from .errors import (DeviceTooSmall, IntegrityError, InvalidArgument, KeyKindError,
                     NotFormattedError, UnsupportedFormatError, WrongKeyError)
from .format import (BLOCK_SIZE, FORMAT_VERSION, KDF_ARGON2ID, KDF_HMAC_SHA256, KDF_NONE,
                     KEY_SLOT as _SLOT, KEY_SLOTS, KNOWN_INCOMPAT, LABEL_SUPERBLOCK,
                     MASTER_KEY_BYTES, SLOT_AAD_BYTES, SLOT_EMPTY, SLOT_KEY_FILE,
                     SLOT_PASSPHRASE, SUPERBLOCK_BODY_AT, SUPERBLOCK_CHECKSUM_AT,
                     SUPERBLOCK_HEADER as _HDR, SUPERBLOCK_MAGIC as MAGIC, SUPERBLOCK_SLOTS_AT)
from .layout import Layout

KIND_NAMES = {SLOT_KEY_FILE: "key file", SLOT_PASSPHRASE: "passphrase"}
KDF_NAMES = {KDF_NONE: "none", KDF_HMAC_SHA256: "hmac-sha256", KDF_ARGON2ID: "argon2id"}


@dataclass(frozen=True)
class Credential:
    """What a user presents: a key file's key or a passphrase (kept out of repr)."""
    kind: int
    secret: bytes = field(repr=False)

    @classmethod
    def of(cls, key=None, passphrase=None) -> "Credential":
        if (key is None) == (passphrase is None):
            raise InvalidArgument("give exactly one of key= (a 16 or 32-byte key) or passphrase=")
        if key is not None:
            return cls(SLOT_KEY_FILE, crypto.check_root_key(key))
        secret = passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)
        if not secret:
            raise InvalidArgument("the passphrase is empty")
        return cls(SLOT_PASSPHRASE, secret)

    @property
    def name(self) -> str:
        return KIND_NAMES[self.kind]


@dataclass(frozen=True)
class KeySlot:
    """One slot as stored; an empty slot is all zeros."""
    kind: int = SLOT_EMPTY
    kdf: int = KDF_NONE
    memory_kib: int = 0
    iterations: int = 0
    lanes: int = 0
    salt: bytes = bytes(kdfs.SALT_BYTES)
    nonce: bytes = bytes(crypto.NONCE_BYTES)
    wrapped: bytes = field(default=bytes(MASTER_KEY_BYTES), repr=False)
    tag: bytes = field(default=bytes(crypto.TAG_BYTES), repr=False)

    @property
    def active(self) -> bool:
        return self.kind != SLOT_EMPTY

    def pack(self) -> bytes:
        return _SLOT.pack(self.kind, self.kdf, 0, self.memory_kib, self.iterations, self.lanes,
                          self.salt, self.nonce, self.wrapped, self.tag, bytes(20))

    @classmethod
    def unpack(cls, raw: bytes) -> "KeySlot":
        (kind, kdf_id, _r, memory, iterations, lanes, salt, nonce, wrapped, tag,
         _r2) = _SLOT.unpack_from(raw)
        return cls(kind, kdf_id, memory, iterations, lanes, salt, nonce, wrapped, tag)

    @classmethod
    def make(cls, cred: Credential, master: bytes, disk_uuid: bytes, index: int,
             params: kdfs.KdfParams | None = None) -> "KeySlot":
        """A slot that `cred` opens; a passphrase slot costs `params` (default: calibrated)."""
        if cred.kind == SLOT_PASSPHRASE:
            p = (params or kdfs.calibrate()).validate()
            slot = cls(SLOT_PASSPHRASE, KDF_ARGON2ID, p.memory_kib, p.iterations, p.lanes,
                       kdfs.new_salt())
        else:
            slot = cls(SLOT_KEY_FILE, KDF_HMAC_SHA256, salt=kdfs.new_salt())
        nonce = crypto.random_bytes(crypto.NONCE_BYTES)
        wrapped, tag = crypto.encrypt(slot.kek(cred), nonce, master, slot._aad(disk_uuid, index))
        return replace(slot, nonce=nonce, wrapped=wrapped, tag=tag)

    def kek(self, cred: Credential) -> bytes:
        if self.kdf == KDF_ARGON2ID:
            return kdfs.argon2id(cred.secret, self.salt, self.params)
        if self.kdf == KDF_HMAC_SHA256:
            return kdfs.key_file_kek(cred.secret, self.salt)
        raise IntegrityError(f"key slot with unknown KDF {self.kdf}")

    @property
    def params(self) -> kdfs.KdfParams:
        return kdfs.KdfParams(self.memory_kib, self.iterations, self.lanes)

    def _aad(self, disk_uuid: bytes, index: int) -> bytes:
        return disk_uuid + bytes([index]) + self.pack()[:SLOT_AAD_BYTES]

    def unwrap(self, kek: bytes, disk_uuid: bytes, index: int) -> bytes | None:
        try:
            return crypto.decrypt(kek, self.nonce, self.wrapped, self.tag, "key slot",
                                  self._aad(disk_uuid, index))
        except IntegrityError:
            return None

    def describe(self) -> dict:
        """Kind, KDF and its parameters: nothing secret (what `dump` shows)."""
        d = {"kind": KIND_NAMES.get(self.kind, f"unknown ({self.kind})"),
             "kdf": KDF_NAMES.get(self.kdf, f"unknown ({self.kdf})")}
        if self.kdf == KDF_ARGON2ID:
            d.update(memory_kib=self.memory_kib, iterations=self.iterations, lanes=self.lanes)
        return d


EMPTY_SLOT = KeySlot()


@dataclass(frozen=True)
class Superblock:
    uuid: bytes
    layout: Layout
    config: Config
    slots: tuple = (EMPTY_SLOT,) * KEY_SLOTS
    generation: int = 1
    created: int = 0

    @classmethod
    def new(cls, layout: Layout, config: Config, cred: Credential, master: bytes,
            params: kdfs.KdfParams | None = None) -> "Superblock":
        """A fresh disk's superblock: a new uuid, slot 0 opened by `cred`."""
        disk_uuid = uuidlib.uuid4().bytes
        slot0 = KeySlot.make(cred, master, disk_uuid, 0, params)
        return cls(disk_uuid, layout, config, (slot0,) + (EMPTY_SLOT,) * (KEY_SLOTS - 1),
                   1, int(time.time()))

    def next(self, **changes) -> "Superblock":
        """The superblock that replaces this one: `changes` (slots, layout) and the
        generation bumped, so that the newer copy wins at open."""
        return replace(self, generation=self.generation + 1, **changes)

    def with_slot(self, index: int, slot: KeySlot) -> "Superblock":
        slots = list(self.slots)
        slots[index] = slot
        return replace(self, slots=tuple(slots))

    def encode(self, master: bytes) -> bytes:
        body = json.dumps({"layout": self.layout.to_dict(), "config": self.config.to_dict()},
                          sort_keys=True).encode()
        nonce = crypto.random_bytes(crypto.NONCE_BYTES)
        lay = self.layout
        hdr = _HDR.pack(MAGIC, FORMAT_VERSION, 0, 0, self.uuid, self.generation, self.created,
                        lay.nr_blocks, lay.data_blocks, lay.meta_blocks,
                        self.config.cipher_key_bytes, KEY_SLOTS, 0, nonce, len(body))
        aad = hdr + b"".join(s.pack() for s in self.slots)
        ct, tag = crypto.encrypt(crypto.derive(master, LABEL_SUPERBLOCK), nonce, body, aad)
        blk = aad + ct + tag
        if len(blk) > SUPERBLOCK_CHECKSUM_AT:
            raise ValueError("superblock body too large")
        blk += bytes(SUPERBLOCK_CHECKSUM_AT - len(blk))
        return blk + hashlib.sha256(blk).digest()


def write_copies(meta, blk: bytes) -> None:
    """Copy 0, then copy 1, each durable before the next: a crash leaves one whole, and
    the newer one wins at open (key changes, header restore, resize)."""
    for i in (0, 1):
        meta.pwrite(blk, i * BLOCK_SIZE)
        meta.flush()


# ---- reading copies (no key needed) ---------------------------------------------------------

def has_magic(blk: bytes) -> bool:
    return blk[:8] == MAGIC


def header(blk: bytes) -> dict:
    """The plaintext header fields of a copy, by name (format.SUPERBLOCK_HEADER)."""
    return dict(zip((name for name, _ in _HDR.fields), _HDR.unpack_from(blk)))


def unsupported(blk: bytes) -> str | None:
    """Why this code cannot read a copy (another version, an unknown required feature),
    as the end of a sentence; the version and feature words sit where every version has them."""
    version, incompat = int.from_bytes(blk[8:12], "little"), int.from_bytes(blk[12:16], "little")
    if version > FORMAT_VERSION:
        return (f"uses format version {version} (this sworndisk reads version "
                f"{FORMAT_VERSION}): upgrade sworndisk to open it")
    if version != FORMAT_VERSION:
        return (f"uses format version {version}, from an older sworndisk (this one reads "
                f"version {FORMAT_VERSION} only): open it with that version")
    unknown = incompat & ~KNOWN_INCOMPAT
    if unknown:
        return f"uses required features 0x{unknown:x} unknown to this sworndisk: upgrade sworndisk to open it"
    return None


@dataclass(frozen=True)
class Copy:
    """One superblock copy as read, before any key: `problem` says why it cannot be used."""
    index: int
    raw: bytes = field(repr=False)
    problem: str | None

    @property
    def usable(self) -> bool:
        return self.problem is None

    @property
    def fields(self) -> dict:
        return header(self.raw)

    @property
    def uuid(self) -> bytes:
        return self.fields["uuid"]

    @property
    def generation(self) -> int:
        return self.fields["generation"]

    @property
    def slots(self) -> tuple:
        return tuple(KeySlot.unpack(self.raw[SUPERBLOCK_SLOTS_AT + i * _SLOT.size:])
                     for i in range(KEY_SLOTS))

    def superblock(self, master: bytes) -> Superblock | None:
        """The copy verified under `master`, or None if its body does not authenticate."""
        h = self.fields
        n = h["body_length"]
        if n > SUPERBLOCK_CHECKSUM_AT - SUPERBLOCK_BODY_AT - crypto.TAG_BYTES:
            return None
        end = SUPERBLOCK_BODY_AT + n
        try:
            body = crypto.decrypt(crypto.derive(master, LABEL_SUPERBLOCK), h["nonce"],
                                  self.raw[SUPERBLOCK_BODY_AT:end],
                                  self.raw[end:end + crypto.TAG_BYTES], "superblock",
                                  self.raw[:SUPERBLOCK_BODY_AT])
        except IntegrityError:
            return None
        d = json.loads(body)
        sb = Superblock(h["uuid"], Layout.from_dict(d["layout"]), Config.from_dict(d["config"]),
                        self.slots, h["generation"], h["created"])
        lay = sb.layout
        if (h["nr_blocks"], h["data_blocks"], h["meta_blocks"], h["cipher_key_bytes"]) != \
                (lay.nr_blocks, lay.data_blocks, lay.meta_blocks, sb.config.cipher_key_bytes):
            raise IntegrityError("a superblock copy's header disagrees with its authenticated body")
        return sb


def parse(blk: bytes, index: int) -> Copy:
    if not has_magic(blk):
        return Copy(index, blk, "no SwornDisk superblock (magic missing)")
    reason = unsupported(blk)
    if reason:
        return Copy(index, blk, f"this copy {reason}")
    if hashlib.sha256(blk[:SUPERBLOCK_CHECKSUM_AT]).digest() != blk[SUPERBLOCK_CHECKSUM_AT:]:
        return Copy(index, blk, "damaged (its checksum does not match)")
    return Copy(index, blk, None)


def unlock_devices(data, meta, unlock) -> "Unlocked":
    """Unlocks the superblock on `meta` with `unlock` (given both copies' blocks) and
    checks that both devices are still as large as the superblock's layout needs."""
    if meta.size < 2 * BLOCK_SIZE:
        raise DeviceTooSmall(f"meta device is {meta.size} bytes; too small for a SwornDisk")
    unlocked = unlock(read_copies(meta))
    lay = unlocked.superblock.layout
    if data.size < lay.data_blocks * BLOCK_SIZE or meta.size < lay.meta_blocks * BLOCK_SIZE:
        raise DeviceTooSmall(
            f"devices are smaller than when formatted: data needs "
            f"{lay.data_blocks * BLOCK_SIZE} bytes, meta {lay.meta_blocks * BLOCK_SIZE}")
    return unlocked


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


def usable_copies(blocks: list[bytes]) -> list[Copy]:
    """The copies that can be used, newest generation first; the reasons why none can,
    as the exception a caller raises."""
    copies = [parse(b, i) for i, b in enumerate(blocks)]
    present = [c for c in copies if has_magic(c.raw)]
    if not present:
        raise NotFormattedError("the meta device holds no SwornDisk (no superblock magic)")
    usable = sorted((c for c in present if c.usable), key=lambda c: -c.generation)
    if usable:
        return usable
    reasons = [unsupported(c.raw) for c in present]
    if all(reasons):
        raise UnsupportedFormatError(f"this disk {reasons[0]}")
    raise IntegrityError("no superblock copy is intact (both fail their checksum): the meta "
                         "device is damaged; restore the header from a backup (header-restore)")


# ---- unlocking -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unlocked:
    superblock: Superblock
    master: bytes = field(repr=False)
    slot: int                   # the slot the credential opened
    copy: int                   # the copy it was verified in


def unlock(blocks: list[bytes], cred: Credential, *, only: int | None = None,
           exclude: int | None = None) -> Unlocked:
    """The master key and the verified superblock that `cred` opens, trying the slots of
    its kind (only slot `only`, or all but `exclude`) in the newest usable copy first.

    WrongKeyError when no slot takes it (KeyKindError when the disk has no slot of its
    kind at all), IntegrityError when one does but the copy fails to verify."""
    copies = usable_copies(blocks)
    wanted = [i for i in range(KEY_SLOTS) if i != exclude and (only is None or i == only)]
    if not any(c.slots[i].kind == cred.kind for c in copies for i in wanted):
        _no_slot_of_kind(copies, cred)
    keks: dict[tuple, bytes] = {}
    opened_but_unverified = False
    for n, c in enumerate(copies):
        for i in wanted:
            slot = c.slots[i]
            if slot.kind != cred.kind:
                continue
            ident = (slot.kdf, slot.memory_kib, slot.iterations, slot.lanes, slot.salt)
            if ident not in keks:
                try:
                    keks[ident] = slot.kek(cred)
                except (InvalidArgument, IntegrityError):   # unknown KDF, or out of bounds
                    continue
            master = slot.unwrap(keks[ident], c.uuid, i)
            if master is None:
                continue
            sb = c.superblock(master)
            if sb is None:
                opened_but_unverified = True
                continue
            if any(newer.generation > c.generation and newer.uuid == c.uuid
                   and newer.superblock(master) is not None for newer in copies[:n]):
                raise WrongKeyError(f"this {cred.name} was removed from the disk's key slots")
            return Unlocked(sb, master, i, c.index)
    if opened_but_unverified:
        raise IntegrityError("the key opens a key slot but the superblock fails to verify: "
                             "the meta device was tampered with")
    raise WrongKeyError(f"the {cred.name} does not open any key slot of this disk")


def _no_slot_of_kind(copies: list[Copy], cred: Credential) -> None:
    kinds = {s.kind for c in copies for s in c.slots if s.active}
    if cred.kind == SLOT_KEY_FILE and kinds == {SLOT_PASSPHRASE}:
        raise KeyKindError("this disk has only passphrase key slots: give its passphrase, "
                           "not a key file")
    if cred.kind == SLOT_PASSPHRASE and kinds == {SLOT_KEY_FILE}:
        raise KeyKindError("this disk has only key-file key slots: give its key file "
                           "(--key-file), not a passphrase")
    raise WrongKeyError(f"the {cred.name} does not open any key slot of this disk")
