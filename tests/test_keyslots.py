"""Key slots (sworndisk/keyslots.py, superblock.py): a random master key wrapped in up to 8
slots, each opened by a key file or an Argon2id passphrase; adding, changing and removing
keys; a damaged copy; header backup and restore. Argon2id runs with tiny parameters here
(64 KiB, one pass) so the tests stay fast; the calibration itself is tested on its own."""
from __future__ import annotations

import hashlib
import os

import pytest

from sworndisk import (IntegrityError, InvalidArgument, KeyKindError, MemoryDevice, SwornDisk,
                       WrongKeyError)
from sworndisk import keyslots
from sworndisk.device import create_image
from sworndisk.format import KEY_SLOT, KEY_SLOTS, SUPERBLOCK_SLOTS_AT
from sworndisk.kdf import KdfParams, calibrate

from .conftest import KEY16, KEY32, OTHER16

MiB = 1 << 20
BS = 4096
TINY = KdfParams(64, 1)


@pytest.fixture
def disk(tmp_path):
    """(data, meta) image paths of a disk formatted with KEY16 in slot 0, block 3 written."""
    data, meta = str(tmp_path / "data.img"), str(tmp_path / "meta.img")
    create_image(data, 64 * MiB)
    create_image(meta, SwornDisk.min_meta_size(64 * MiB))
    d = SwornDisk.create(data, meta, KEY16)
    d.write(3, b"s" * BS)
    d.close()
    return data, meta


def reads(data, meta, **key) -> int:
    """Opens the disk with `key`, checks block 3, returns the slot that opened it."""
    d = SwornDisk.open(data, meta, **key)
    try:
        assert d.read(3, 1) == b"s" * BS
        return d.key_slot
    finally:
        d.close()


def test_the_slot_life_cycle(disk):
    data, meta = disk
    slot = keyslots.add_key(meta, key=KEY16, new_passphrase="correct horse", kdf=TINY)
    assert slot == 1
    assert reads(data, meta, key=KEY16) == 0
    assert reads(data, meta, passphrase="correct horse") == 1
    assert keyslots.change_key(meta, passphrase="correct horse", new_passphrase="battery staple",
                               kdf=TINY) == 1
    with pytest.raises(WrongKeyError):
        SwornDisk.open(data, meta, passphrase="correct horse")
    assert reads(data, meta, passphrase="battery staple") == 1
    keyslots.remove_key(meta, 0, passphrase="battery staple")
    with pytest.raises(WrongKeyError):
        SwornDisk.open(data, meta, KEY16)
    with pytest.raises(InvalidArgument, match="last one"):
        keyslots.remove_key(meta, 1, passphrase="battery staple")
    assert reads(data, meta, passphrase="battery staple") == 1
    assert [s.slot for s in keyslots.read_header(meta).slots] == [1]


def test_a_key_file_on_a_passphrase_disk_says_so():
    data, meta = MemoryDevice(64 * MiB), MemoryDevice(SwornDisk.min_meta_size(64 * MiB))
    SwornDisk.create(data, meta, passphrase="pw", kdf=TINY).close()
    with pytest.raises(KeyKindError, match="only passphrase key slots"):
        SwornDisk.open(data, meta, KEY16)
    with pytest.raises(WrongKeyError, match="does not open"):
        SwornDisk.open(data, meta, passphrase="not it")
    SwornDisk.open(data, meta, passphrase=b"pw").close()


def test_every_slot_and_both_key_sizes(disk):
    data, meta = disk
    for n in range(1, KEY_SLOTS):
        assert keyslots.add_key(meta, key=KEY16, new_key=bytes([n]) * 32) == n
    with pytest.raises(InvalidArgument, match="all 8 key slots are in use"):
        keyslots.add_key(meta, key=KEY16, new_key=KEY32)
    assert reads(data, meta, key=bytes([7]) * 32) == 7
    keyslots.remove_key(meta, 4, key=KEY16)
    assert keyslots.add_key(meta, key=bytes([7]) * 32, new_key=OTHER16) == 4
    assert reads(data, meta, key=OTHER16) == 4


def test_remove_needs_another_slots_key(disk):
    data, meta = disk
    keyslots.add_key(meta, key=KEY16, new_key=OTHER16)
    with pytest.raises(WrongKeyError, match="opens slot 0 itself"):
        keyslots.remove_key(meta, 0, key=KEY16)
    with pytest.raises(InvalidArgument, match="not in use"):
        keyslots.remove_key(meta, 5, key=KEY16)
    keyslots.remove_key(meta, 0, key=OTHER16)
    assert reads(data, meta, key=OTHER16) == 1


def test_a_damaged_slot_area_in_one_copy_locks_no_one_out(disk):
    data, meta = disk
    keyslots.add_key(meta, key=KEY16, new_passphrase="pw", kdf=TINY)
    with open(meta, "r+b") as f:                 # garble every slot of copy 0
        f.seek(SUPERBLOCK_SLOTS_AT)
        f.write(os.urandom(KEY_SLOTS * KEY_SLOT.size))
    assert reads(data, meta, key=KEY16) == 0
    assert reads(data, meta, passphrase="pw") == 1
    info = keyslots.read_header(meta)
    assert info.copies[0].state.startswith("damaged") and info.copies[1].state == "ok"
    keyslots.add_key(meta, key=KEY16, new_key=OTHER16)     # a key change rewrites both
    assert [c.state for c in keyslots.read_header(meta).copies] == ["ok", "ok"]


def test_a_forged_slot_is_not_trusted(disk):
    """Slots are authenticated by the superblock's tag: a slot swapped in from another disk
    (with the checksum recomputed) opens nothing."""
    data, meta = disk
    other_data, other_meta = MemoryDevice(64 * MiB), MemoryDevice(SwornDisk.min_meta_size(64 * MiB))
    SwornDisk.create(other_data, other_meta, OTHER16).close()
    slot1 = slice(SUPERBLOCK_SLOTS_AT + KEY_SLOT.size, SUPERBLOCK_SLOTS_AT + 2 * KEY_SLOT.size)
    with open(meta, "r+b") as f:
        for copy in (0, 1):
            f.seek(copy * BS)
            blk = bytearray(f.read(BS))
            blk[slot1] = other_meta.buf[SUPERBLOCK_SLOTS_AT:SUPERBLOCK_SLOTS_AT + KEY_SLOT.size]
            blk[4064:] = hashlib.sha256(blk[:4064]).digest()
            f.seek(copy * BS)
            f.write(blk)
    with pytest.raises(WrongKeyError):
        SwornDisk.open(data, meta, OTHER16)
    with pytest.raises(IntegrityError, match="tampered"):     # KEY16's slot 0 is intact,
        SwornDisk.open(data, meta, KEY16)                     # the copy it is in is not


def test_an_interrupted_key_change_leaves_the_newer_copy_in_charge(disk):
    """Copy 0 holds the change, copy 1 is older (a crash between the two writes): the
    removed key stays removed, though it still opens copy 1's slot."""
    data, meta = disk
    keyslots.add_key(meta, key=KEY16, new_key=OTHER16)
    with open(meta, "rb") as f:
        before = f.read(2 * BS)
    keyslots.remove_key(meta, 0, key=OTHER16)
    with open(meta, "r+b") as f:                 # put back the old copy 1
        f.seek(BS)
        f.write(before[BS:])
    with pytest.raises(WrongKeyError, match="removed"):
        SwornDisk.open(data, meta, KEY16)
    assert reads(data, meta, key=OTHER16) == 1


def test_header_backup_and_restore(disk, tmp_path):
    data, meta = disk
    backup = str(tmp_path / "header.bak")
    info = keyslots.backup_header(meta, backup)
    assert os.stat(backup).st_size == 2 * BS and os.stat(backup).st_mode & 0o777 == 0o600
    with pytest.raises(InvalidArgument, match="already exists"):
        keyslots.backup_header(meta, backup)
    keyslots.change_key(meta, key=KEY16, new_key=OTHER16)
    with open(meta, "r+b") as f:                 # both copies destroyed
        f.write(bytes(2 * BS))
    with pytest.raises(Exception):
        SwornDisk.open(data, meta, OTHER16)
    report = keyslots.restore_header(meta, backup)
    assert report.uuid == info.uuid and report.disk_generation is None
    assert reads(data, meta, key=KEY16) == 0      # the key of the backup's time is back
    keyslots.change_key(meta, key=KEY16, new_key=OTHER16)
    report = keyslots.restore_header(meta, backup)
    assert report.slots_back == [0]


def test_a_foreign_backup_is_refused(disk, tmp_path):
    data, meta = disk
    other = str(tmp_path / "other-meta.img")
    create_image(other, SwornDisk.min_meta_size(64 * MiB))
    SwornDisk.create(MemoryDevice(64 * MiB), other, KEY16).close()
    backup = str(tmp_path / "other.bak")
    keyslots.backup_header(other, backup)
    with open(meta, "rb") as f:
        before = f.read(2 * BS)
    with pytest.raises(InvalidArgument, match="header of another disk"):
        keyslots.restore_header(meta, backup)
    with open(meta, "rb") as f:
        assert f.read(2 * BS) == before
    (tmp_path / "junk.bak").write_bytes(b"x" * 100)
    with pytest.raises(InvalidArgument, match="not a SwornDisk header backup"):
        keyslots.restore_header(meta, str(tmp_path / "junk.bak"))


def test_dump_shows_nothing_secret(disk):
    data, meta = disk
    keyslots.add_key(meta, key=KEY16, new_passphrase="pw", kdf=KdfParams(128, 2, 2))
    info = keyslots.read_header(meta)
    assert (info.version, info.generation, info.cipher_key_bytes) == (3, 2, 16)
    assert [(s.slot, s.kind, s.kdf, s.memory_kib, s.iterations, s.lanes) for s in info.slots] \
        == [(0, "key file", "hmac-sha256", None, None, None), (1, "passphrase", "argon2id", 128, 2, 2)]
    text = repr(info.as_dict())
    with open(meta, "rb") as f:
        raw = f.read(BS)
    for secret in (KEY16.hex(), raw[SUPERBLOCK_SLOTS_AT + 60:SUPERBLOCK_SLOTS_AT + 92].hex()):
        assert secret not in text


def test_key_changes_need_the_disk_unowned(disk):
    from sworndisk import DeviceBusyError
    data, meta = disk
    d = SwornDisk.open(data, meta, KEY16)
    try:
        with pytest.raises(DeviceBusyError):
            keyslots.add_key(meta, key=KEY16, new_key=OTHER16)
        assert [s.slot for s in keyslots.read_header(meta).slots] == [0]   # reading is fine
    finally:
        d.close()


def test_calibration_targets_the_time_and_keeps_what_is_given():
    import time
    from sworndisk.kdf import argon2id, memory_cap_kib
    p = calibrate(200)
    assert p.iterations >= 4 and 1024 <= p.memory_kib <= memory_cap_kib()
    t0 = time.perf_counter()
    argon2id(b"pw", bytes(32), p)
    assert time.perf_counter() - t0 < 2.0          # about 0.2 s; loose: the machine is shared
    assert calibrate(200, memory_kib=64, iterations=3).memory_kib == 64
    q = calibrate(50, memory_kib=1024)
    assert q.memory_kib == 1024 and q.iterations >= 1
    with pytest.raises(InvalidArgument):
        KdfParams(4, 1).validate()
    with pytest.raises(InvalidArgument):
        KdfParams(1 << 30, 1).validate()         # beyond what a slot may ask for
