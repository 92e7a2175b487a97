"""`check` (sworndisk/check.py and the CLI verb): clean on a healthy disk; a flipped byte in
a BIT node, a journal block, a segment-table block, a superblock copy or (with --data) a
data block is found and said where; the devices are never written; fsck's exit codes."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from sworndisk import MemoryDevice, SwornDisk, WrongKeyError
from sworndisk.check import check
from sworndisk.device import create_image
from sworndisk_ublk import cli

from .conftest import KEY16, OTHER16

MiB = 1 << 20
BS = 4096


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A disk with several BITs and commits, closed cleanly; where its structures are."""
    d = tmp_path_factory.mktemp("pristine")
    data, meta = str(d / "data.img"), str(d / "meta.img")
    create_image(data, 64 * MiB)
    create_image(meta, SwornDisk.min_meta_size(64 * MiB))
    disk = SwornDisk.create(data, meta, KEY16)
    for i in range(0, 3000, 10):
        disk.write(i, bytes([i % 251]) * 10 * BS)
        if i % 500 == 0:
            disk.flush()
    disk.discard(100, 50)
    disk.close()
    disk = SwornDisk.open(data, meta, KEY16, read_only=True)
    dbg = disk.debug
    where = {"bit": dbg.fmt.hba_of(dbg.index.bits()[0].meta.root),
             "journal": dbg.journal.start + 2,          # block 2: older than the checkpoint
             "data": dbg.fmt.hba_of(dbg.state.lookup_exact([7])[7]),
             "segtable": int(dbg.segtable.dir[0]["hba"])}
    disk.close()
    return data, meta, where


@pytest.fixture
def images(pristine, tmp_path):
    data, meta, where = pristine
    shutil.copy(data, tmp_path / "data.img")
    shutil.copy(meta, tmp_path / "meta.img")
    return str(tmp_path / "data.img"), str(tmp_path / "meta.img"), where


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0x10]))


def digest(*paths) -> list[str]:
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


def test_a_healthy_disk_is_clean(images):
    data, meta, _ = images
    r = check(data, meta, KEY16, data_blocks=True)
    assert r.clean, r.problems
    assert r.checked["index records"] == r.checked["data blocks"] == 2950
    assert r.checked["superblock copies"] == 2 and r.checked["BIT nodes"] > r.checked["BITs"] >= 1


@pytest.mark.parametrize("what,device,data_blocks,where", [
    ("bit", "meta", False, "BIT"), ("journal", "meta", False, "journal block 2"),
    ("segtable", "meta", False, "segment table"), ("data", "data", True, "LBA 7")])
def test_a_flipped_byte_is_found_and_located(images, what, device, data_blocks, where):
    data, meta, at = images
    flip(data if device == "data" else meta, at[what] * BS + 123)
    r = check(data, meta, KEY16, data_blocks=data_blocks)
    assert not r.clean
    hits = [p for p in r.problems if f"block {at[what]}" in p.where]
    assert hits and where in hits[0].where, r.problems


def test_a_data_block_is_only_read_with_data(images):
    data, meta, at = images
    flip(data, at["data"] * BS + 5)
    assert check(data, meta, KEY16).clean
    assert not check(data, meta, KEY16, data_blocks=True).clean


def test_a_damaged_superblock_copy_is_a_problem_but_the_check_runs(images):
    data, meta, _ = images
    flip(meta, BS + 700)
    r = check(data, meta, KEY16, data_blocks=True)
    assert [p.where for p in r.problems] == ["meta block 1 (superblock copy 1)"]
    assert r.checked["data blocks"] == 2950


def test_a_journal_cut_short_is_found(tmp_path):
    """A flipped byte in the middle of the committed journal: recovery stops there (it
    looks like a torn tail), but the blocks after it still verify, so check says so."""
    data, meta = MemoryDevice(64 * MiB), MemoryDevice(SwornDisk.min_meta_size(64 * MiB))
    disk = SwornDisk.create(data, meta, KEY16)
    for i in range(4):
        disk.write(i, bytes([i + 1]) * BS)
        disk.flush()
    j = disk.debug.journal
    victim = j.head_seq - 3                       # an older commit of the four
    meta.buf[(j.start + victim % j.nblocks) * BS + 100] ^= 1   # no close: a crash
    r = check(data, meta, KEY16)
    assert any(f"journal block {victim}" in p.where and "cut short" in p.what
               for p in r.problems), r


def test_check_never_writes_even_when_recovery_has_work(tmp_path):
    data, meta = MemoryDevice(64 * MiB), MemoryDevice(SwornDisk.min_meta_size(64 * MiB))
    disk = SwornDisk.create(data, meta, KEY16)
    for i in range(50):
        disk.write(i * 3, os.urandom(BS))
        disk.flush()                             # commits to replay, then no close
    before = (bytes(data.buf), bytes(meta.buf))
    r = check(data, meta, KEY16, data_blocks=True)
    assert r.clean, r.problems
    assert (bytes(data.buf), bytes(meta.buf)) == before


def test_check_of_images_never_writes(images):
    data, meta, at = images
    flip(meta, at["bit"] * BS + 9)
    before = digest(data, meta)
    check(data, meta, KEY16, data_blocks=True)
    assert digest(data, meta) == before


def test_what_stops_a_check_is_raised(images):
    data, meta, _ = images
    with pytest.raises(WrongKeyError):
        check(data, meta, OTHER16)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_the_cli_exits_like_fsck(images, tmp_path, capsys):
    data, meta, at = images
    key = tmp_path / "key"
    key.write_bytes(KEY16)
    code, out, _ = run(capsys, "check", data, meta, "--key-file", str(key))
    assert code == 0 and out.strip().endswith("clean")
    flip(data, at["data"] * BS + 1)
    assert run(capsys, "check", data, meta, "--key-file", str(key))[0] == 0
    code, out, _ = run(capsys, "check", data, meta, "--key-file", str(key), "--data", "--json")
    report = json.loads(out)
    assert code == 4 and not report["clean"]
    assert report["problems"] == [{"where": f"data block {at['data']} (LBA 7)",
                                   "what": "fails authentication (tampered, replayed or corrupt)"}]
    code, out, _ = run(capsys, "check", data, meta, "--key-file", str(key), "--data")
    assert code == 4 and "1 problem found:" in out and f"data block {at['data']} (LBA 7)" in out
    other = tmp_path / "other"
    other.write_bytes(OTHER16)
    code, _, err = run(capsys, "check", data, meta, "--key-file", str(other))
    assert code == 8 and err.count("\n") == 1 and "wrong key" in err
    assert run(capsys, "check", data, str(tmp_path / "nope"), "--key-file", str(key))[0] == 8
    assert run(capsys, "check", data)[0] == 8                      # usage: could not run
