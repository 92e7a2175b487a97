"""The rollback anchor (sworndisk/anchor.py): a whole-disk rollback to an older consistent
state, which nothing on the two devices can reveal, is caught against a file kept
elsewhere; a missing or forged anchor is an error; accept_rollback moves the anchor."""
from __future__ import annotations

import os

import pytest

from sworndisk import (AnchorError, MemoryDevice, RollbackError, SwornDisk, SwornDiskError)
from sworndisk.format import ANCHOR

from .conftest import KEY16, OTHER16

MiB = 1 << 20
BS = 4096


def devices():
    return MemoryDevice(64 * MiB), MemoryDevice(SwornDisk.min_meta_size(64 * MiB))


def snapshot(*devs) -> list[bytes]:
    return [bytes(d.buf) for d in devs]


def put_back(snap: list[bytes], *devs) -> None:
    for raw, d in zip(snap, devs):
        d.buf[:] = raw


def write_one(data, meta, path, lba: int, fill: bytes) -> int:
    """Open with the anchor, write one block, flush, close; the commit seq reached."""
    d = SwornDisk.open(data, meta, KEY16, anchor=path)
    d.write(lba, fill * BS)
    d.flush()
    seq = d.commit_seq
    d.close()
    return seq


def anchor_seq(path) -> int:
    with open(path, "rb") as f:
        return ANCHOR.unpack_from(f.read())[4]


@pytest.fixture
def anchored(tmp_path):
    """(data, meta, anchor path) of a disk created with an anchor, one flush made."""
    data, meta = devices()
    path = str(tmp_path / "disk.anchor")
    d = SwornDisk.create(data, meta, KEY16, anchor=path)
    d.write(0, b"1" * BS)
    d.flush()
    d.close()
    return data, meta, path


def test_every_commit_moves_the_anchor_before_flush_returns(tmp_path):
    data, meta = devices()
    path = str(tmp_path / "a")
    d = SwornDisk.create(data, meta, KEY16, anchor=path)
    assert anchor_seq(path) == d.commit_seq == 0
    for i in range(3):
        d.write(i, bytes([i]) * BS)
        d.flush()
        assert anchor_seq(path) == d.commit_seq == i + 1
    d.close()
    assert os.stat(path).st_size == ANCHOR.size and os.stat(path).st_mode & 0o777 == 0o600
    assert not [n for n in os.listdir(tmp_path) if n != "a"]      # no temporary left


def test_a_rolled_back_disk_is_refused(anchored):
    data, meta, path = anchored
    old = snapshot(data, meta)
    newest = write_one(data, meta, path, 0, b"2")
    put_back(old, data, meta)                  # the whole disk, as it was: consistent, older
    SwornDisk.open(data, meta, KEY16).close()  # without the anchor nothing can tell
    with pytest.raises(RollbackError) as e:
        SwornDisk.open(data, meta, KEY16, anchor=path)
    assert (e.value.disk_seq, e.value.anchor_seq) == (newest - 1, newest)
    assert str(newest) in str(e.value) and not isinstance(e.value, AnchorError)
    assert anchor_seq(path) == newest          # refusing does not move the anchor


def test_accept_rollback_opens_and_moves_the_anchor(anchored):
    data, meta, path = anchored
    old = snapshot(data, meta)
    write_one(data, meta, path, 0, b"2")
    put_back(old, data, meta)
    d = SwornDisk.open(data, meta, KEY16, anchor=path, accept_rollback=True)
    assert d.read(0, 1) == b"1" * BS and anchor_seq(path) == d.commit_seq
    d.close()
    SwornDisk.open(data, meta, KEY16, anchor=path).close()     # the new normal


def test_a_disk_ahead_of_its_anchor_opens(anchored, tmp_path):
    """A crash between the journal write and the anchor's: the anchor lags one commit."""
    data, meta, path = anchored
    with open(path, "rb") as f:
        lagging = f.read()
    write_one(data, meta, path, 1, b"x")
    with open(path, "wb") as f:
        f.write(lagging)
    d = SwornDisk.open(data, meta, KEY16, anchor=path)
    assert anchor_seq(path) == d.commit_seq > ANCHOR.unpack_from(lagging)[4]
    d.close()


@pytest.mark.parametrize("damage", ["missing", "mac", "seq", "truncated", "other disk", "junk"])
def test_a_missing_or_forged_anchor_is_an_error(anchored, tmp_path, damage):
    data, meta, path = anchored
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    if damage == "missing":
        os.unlink(path)
    elif damage == "other disk":
        d2, m2 = devices()
        SwornDisk.create(d2, m2, OTHER16, anchor=path).close()
    else:
        if damage == "mac":
            raw[-1] ^= 1
        elif damage == "seq":                   # a forger moving the anchor back
            raw[32:40] = (0).to_bytes(8, "little")
        elif damage == "truncated":
            raw = raw[:40]
        else:
            raw = bytearray(os.urandom(len(raw)))
        with open(path, "wb") as f:
            f.write(raw)
    with pytest.raises(AnchorError) as e:
        SwornDisk.open(data, meta, KEY16, anchor=path)
    assert isinstance(e.value, RollbackError) and isinstance(e.value, SwornDiskError)
    assert path in str(e.value)
    d = SwornDisk.open(data, meta, KEY16, anchor=path, accept_rollback=True)
    assert anchor_seq(path) == d.commit_seq
    d.close()
    SwornDisk.open(data, meta, KEY16, anchor=path).close()


def test_read_only_opens_check_the_anchor_and_write_nothing(anchored):
    data, meta, path = anchored
    old = snapshot(data, meta)
    write_one(data, meta, path, 5, b"5")
    before = snapshot(data, meta)
    with open(path, "rb") as f:
        anchor_before = f.read()
    SwornDisk.open(data, meta, KEY16, anchor=path, read_only=True).close()
    put_back(old, data, meta)
    with pytest.raises(RollbackError):
        SwornDisk.open(data, meta, KEY16, anchor=path, read_only=True)
    SwornDisk.open(data, meta, KEY16, anchor=path, read_only=True, accept_rollback=True).close()
    with open(path, "rb") as f:
        assert f.read() == anchor_before
    put_back(before, data, meta)
    assert snapshot(data, meta) == before


def test_the_cli_reports_a_rollback_in_one_line(anchored, tmp_path):
    """What `add ... false --anchor` does when it opens the engine (add needs ublk; the
    opening is this function)."""
    from sworndisk_ublk import keys, table as tbl, volume
    from sworndisk_ublk.errors import CliError, ExitCode
    from sworndisk.device import create_image
    data, meta = str(tmp_path / "d.img"), str(tmp_path / "m.img")
    create_image(data, 64 * MiB)
    create_image(meta, SwornDisk.min_meta_size(64 * MiB))
    path = str(tmp_path / "cli.anchor")
    t = tbl.parse_table(f"0 {56 * MiB // 512} sworndisk {data} {meta} 0 force")
    key = keys.KeySource("key file", key=KEY16)
    disk = volume.open_disk(t, key, opts=volume.OpenOptions(anchor=path))
    disk.close()
    with open(data, "rb") as f:
        old_data = f.read()
    with open(meta, "rb") as f:
        old_meta = f.read()
    disk = volume.open_disk(t.with_format("false"), key, opts=volume.OpenOptions(anchor=path))
    disk.write(0, b"z" * BS)
    disk.close()
    for p, raw in ((data, old_data), (meta, old_meta)):
        with open(p, "wb") as f:
            f.write(raw)
    with pytest.raises(CliError) as e:
        volume.open_disk(t.with_format("false"), key, opts=volume.OpenOptions(anchor=path))
    msg = e.value.message
    assert e.value.code == ExitCode.ROLLBACK and "rolled back" in msg and "\n" not in msg
    assert "its last commit is 0, its anchor says 1" in msg and "--accept-rollback" in msg
    volume.open_disk(t.with_format("false"), key,
                     opts=volume.OpenOptions(anchor=path, accept_rollback=True)).close()
