"""Key administration on a meta device, as cryptsetup does it for LUKS.

Adding, changing and removing a key rewrites the two superblock copies (superblock.py)
with one slot changed and the generation bumped; the data, the index and the master key
stay as they are, so it takes a fraction of a second whatever the disk's size. Every
change is authorised by an existing key, and the last slot is never removed.

`read_header` (dump) needs no key and shows nothing secret. A header backup holds what
unlocking needs, the superblock with its slots; restoring it brings back the slots as
they were at the backup, including keys removed since (as with LUKS): keep backups as
safe as the keys.

Writers lock the meta device like the engine does (DeviceBusyError while a SwornDisk has
it open); readers do not.
"""
from __future__ import annotations

import os
import uuid as uuidlib
from dataclasses import asdict, dataclass, field
from typing import Union

from . import superblock as sbmod
from .device import BlockDevice, as_device
from .errors import InvalidArgument, SwornDiskError, WrongKeyError
from .format import BLOCK_SIZE, HEADER_BACKUP_BYTES, KEY_SLOTS
from .kdf import KdfParams
from .superblock import Copy, Credential, KeySlot, Superblock

Dev = Union[str, BlockDevice]


# ---- reading ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SlotInfo:
    slot: int
    kind: str                         # "key file" | "passphrase"
    kdf: str                          # "hmac-sha256" | "argon2id"
    memory_kib: int | None = None     # Argon2id only
    iterations: int | None = None
    lanes: int | None = None


@dataclass(frozen=True)
class CopyInfo:
    copy: int                         # 0 or 1 (meta block)
    state: str                        # "ok", or why it cannot be used
    generation: int | None


@dataclass(frozen=True)
class HeaderInfo:
    """What `dump` shows: read from the newest intact copy, without a key (so unverified)."""
    version: int
    incompat: int
    compat: int
    uuid: str
    generation: int
    created: int                      # unix time of format
    nr_blocks: int                    # logical size, 4 KiB blocks
    data_blocks: int                  # data device blocks in use
    meta_blocks: int
    cipher_key_bytes: int
    copies: list[CopyInfo] = field(default_factory=list)
    slots: list[SlotInfo] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _slot_infos(slots) -> list[SlotInfo]:
    return [SlotInfo(i, **s.describe()) for i, s in enumerate(slots) if s.active]


def header_info(blocks: list[bytes]) -> HeaderInfo:
    copies = [sbmod.parse(b, i) for i, b in enumerate(blocks)]
    newest = sbmod.usable_copies(blocks)[0]
    h = newest.fields
    return HeaderInfo(
        version=h["version"], incompat=h["incompat"], compat=h["compat"],
        uuid=str(uuidlib.UUID(bytes=h["uuid"])), generation=h["generation"],
        created=h["created"], nr_blocks=h["nr_blocks"], data_blocks=h["data_blocks"],
        meta_blocks=h["meta_blocks"], cipher_key_bytes=h["cipher_key_bytes"],
        copies=[CopyInfo(c.index, c.problem or "ok", c.generation if c.usable else None)
                for c in copies],
        slots=_slot_infos(newest.slots))


def read_header(meta: Dev) -> HeaderInfo:
    """The superblock's plaintext: version, uuid, sizes, slots (kind, KDF, parameters)."""
    return header_info(sbmod.read_copies(meta))


# ---- changing slots ----------------------------------------------------------------------------

class _LockedMeta:
    """The meta device, locked as the engine locks it, for the time of one change."""

    def __init__(self, meta: Dev):
        self.dev = as_device(meta, "the meta device")
        self._owned = self.dev is not meta
        try:
            self.dev.lock("meta device")
        except BaseException:
            self.close()
            raise

    def blocks(self) -> list[bytes]:
        if self.dev.size < HEADER_BACKUP_BYTES:
            raise InvalidArgument("the meta device is too small to hold a SwornDisk")
        return [self.dev.pread(BLOCK_SIZE, i * BLOCK_SIZE) for i in (0, 1)]

    def write_copies(self, blk: bytes) -> None:
        """Copy 0, then copy 1, each durable before the next: a crash leaves one whole."""
        sbmod.write_copies(self.dev, blk)

    def close(self) -> None:
        if self._owned:
            self.dev.close()

    def __enter__(self) -> "_LockedMeta":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rewrite(m: _LockedMeta, sb: Superblock, master: bytes) -> None:
    m.write_copies(sb.next().encode(master))


def add_key(meta: Dev, *, key=None, passphrase=None, new_key=None, new_passphrase=None,
            kdf: KdfParams | None = None, slot: int | None = None) -> int:
    """Adds a slot for the new key (`new_key` raw, or `new_passphrase` through Argon2id
    with `kdf`, calibrated when None), authorised by an existing key; returns its number
    (the lowest free one, or `slot`)."""
    cred, new = Credential.of(key, passphrase), Credential.of(new_key, new_passphrase)
    with _LockedMeta(meta) as m:
        un = sbmod.unlock(m.blocks(), cred)
        free = [i for i, s in enumerate(un.superblock.slots) if not s.active]
        if slot is None:
            if not free:
                raise InvalidArgument(f"all {KEY_SLOTS} key slots are in use: remove one first")
            slot = free[0]
        elif not 0 <= slot < KEY_SLOTS or slot not in free:
            raise InvalidArgument(f"key slot {slot} is not a free slot (free: "
                                  f"{', '.join(map(str, free)) or 'none'})")
        new_slot = KeySlot.make(new, un.master, un.superblock.uuid, slot, kdf)
        _rewrite(m, un.superblock.with_slot(slot, new_slot), un.master)
        return slot


def change_key(meta: Dev, *, key=None, passphrase=None, new_key=None, new_passphrase=None,
               kdf: KdfParams | None = None) -> int:
    """Replaces the slot that the old key opens with one for the new key; returns its
    number. The old key no longer opens the disk."""
    cred, new = Credential.of(key, passphrase), Credential.of(new_key, new_passphrase)
    with _LockedMeta(meta) as m:
        un = sbmod.unlock(m.blocks(), cred)
        new_slot = KeySlot.make(new, un.master, un.superblock.uuid, un.slot, kdf)
        _rewrite(m, un.superblock.with_slot(un.slot, new_slot), un.master)
        return un.slot


def remove_key(meta: Dev, slot: int, *, key=None, passphrase=None) -> None:
    """Empties `slot`, authorised by the key of another slot; never the last slot."""
    cred = Credential.of(key, passphrase)
    with _LockedMeta(meta) as m:
        blocks = m.blocks()
        active = [i for i, s in enumerate(sbmod.usable_copies(blocks)[0].slots) if s.active]
        if slot not in active:
            raise InvalidArgument(f"key slot {slot} is not in use (in use: "
                                  f"{', '.join(map(str, active))})")
        if active == [slot]:
            raise InvalidArgument(f"key slot {slot} is the last one: removing it would lock "
                                  f"the disk away for good")
        try:
            un = sbmod.unlock(blocks, cred, exclude=slot)
        except WrongKeyError:
            _opens_only(blocks, cred, slot)
            raise
        _rewrite(m, un.superblock.with_slot(slot, sbmod.EMPTY_SLOT), un.master)


def _opens_only(blocks: list[bytes], cred: Credential, slot: int) -> None:
    """Say so when the key given is the very one being removed."""
    try:
        sbmod.unlock(blocks, cred, only=slot)
    except SwornDiskError:
        return
    raise WrongKeyError(f"the {cred.name} given opens slot {slot} itself: removing a slot "
                        f"needs the key of another slot")


# ---- header backup and restore -----------------------------------------------------------------

def backup_header(meta: Dev, path: str) -> HeaderInfo:
    """Writes what unlocking needs (the newest intact superblock copy, twice) to a new
    file `path`, mode 600. Never overwrites a file."""
    blocks = sbmod.read_copies(meta)
    newest = sbmod.usable_copies(blocks)[0]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise InvalidArgument(f"{path} already exists: a header backup never overwrites a "
                              f"file; choose a new name") from None
    try:
        data = newest.raw * 2
        if os.write(fd, data) != len(data):
            raise OSError(f"{path}: short write")
        os.fsync(fd)
    finally:
        os.close(fd)
    return header_info(blocks)


@dataclass(frozen=True)
class RestoreReport:
    uuid: str
    generation: int                   # of the restored header
    disk_generation: int | None       # of the header it replaced (None: unreadable)
    slots_back: list[int]             # slots that differ from the replaced header's

    def as_dict(self) -> dict:
        return asdict(self)


def read_backup(path: str) -> Copy:
    """The newest usable copy in a header backup file; InvalidArgument if it is none."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BACKUP_BYTES + 1)
    if len(raw) != HEADER_BACKUP_BYTES:
        raise InvalidArgument(f"{path} is not a SwornDisk header backup ({len(raw)} bytes, "
                              f"a backup has {HEADER_BACKUP_BYTES})")
    try:
        return sbmod.usable_copies([raw[:BLOCK_SIZE], raw[BLOCK_SIZE:]])[0]
    except SwornDiskError as e:
        raise InvalidArgument(f"{path} is not a usable header backup: {e}") from None


def _sizes(c: Copy) -> tuple:
    f = c.fields
    return f["nr_blocks"], f["data_blocks"], f["meta_blocks"]


def restore_header(meta: Dev, path: str) -> RestoreReport:
    """Writes a header backup back to both superblock copies. Refuses a backup of another
    disk (another uuid); slots removed or changed since the backup come back."""
    backup = read_backup(path)
    with _LockedMeta(meta) as m:
        current = [c for c in (sbmod.parse(b, i) for i, b in enumerate(m.blocks())) if c.usable]
        for c in current:
            if c.uuid != backup.uuid:
                raise InvalidArgument(
                    f"{path} is the header of another disk (uuid "
                    f"{uuidlib.UUID(bytes=backup.uuid)}); the disk on this meta device is "
                    f"{uuidlib.UUID(bytes=c.uuid)}")
        newest = max(current, key=lambda c: c.generation, default=None)
        if newest is not None and _sizes(newest) != _sizes(backup):
            raise InvalidArgument(
                f"{path} is a header from before the disk was resized (its sizes differ): "
                f"restoring it would take the disk back to its old layout; make a new "
                f"header-backup after a resize")
        back = [i for i, s in enumerate(backup.slots)
                if s.active and (newest is None or newest.slots[i] != s)]
        m.write_copies(backup.raw)
    return RestoreReport(str(uuidlib.UUID(bytes=backup.uuid)), backup.generation,
                         newest.generation if newest else None, back)


__all__ = ["HeaderInfo", "SlotInfo", "CopyInfo", "RestoreReport", "read_header", "add_key",
           "change_key", "remove_key", "backup_header", "restore_header", "read_backup"]
