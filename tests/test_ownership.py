"""One owner per disk (issue 7, item 1): while a SwornDisk is open, no other open or create
gets at its images, from another process or this one, by the same path, a symlink or a
hard link, and a refused attempt writes nothing. The lock dies with its owner, so a
crashed owner's disk opens (that is what `recover` needs).

Real files, real processes (the owners and intruders are `python -c` subprocesses), real
OFD locks; block devices (O_EXCL) on loop devices where the machine has them, and in the
VM (tests/e2e/test_ownership.py).
"""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sworndisk import DeviceBusyError, FileDevice, InvalidArgument, SwornDisk
from sworndisk.device import check_unowned, create_image

from .conftest import BS, KEY16, MiB
from .owner_process import Owner, digest, intrude, mark_of, own, path_forms

DATA_SIZE = 32 * MiB
FORMS = ("same path", "symlink", "hard link")


@pytest.fixture
def paths(tmp_path) -> dict[str, tuple[str, str]]:
    data, meta = str(tmp_path / "data.img"), str(tmp_path / "meta.img")
    create_image(data, DATA_SIZE)
    create_image(meta, SwornDisk.min_meta_size(DATA_SIZE))
    return path_forms(tmp_path, data, meta)


@pytest.mark.parametrize("owner_op", ["create", "open"])
def test_a_second_process_cannot_open_or_create_an_owned_disk(paths, owner_op):
    data, meta = paths["same path"]
    if owner_op == "open":
        SwornDisk.create(data, meta, KEY16).close()
    owner = own(owner_op, data, meta)
    before = digest(data, meta)
    attempts = [(op, *paths[form]) for form in FORMS for op in ("open", "create")]
    for (op, d, _), line in zip(attempts, intrude(*attempts), strict=True):
        assert line.startswith(f"busy {errno.EBUSY} data device {d} "), (op, d, line)
        assert f"is in use: locked by pid {owner.pid} " in line, line
    assert digest(data, meta) == before, "a refused open or create wrote to the images"
    owner.release()
    with SwornDisk.open(*paths["hard link"], KEY16) as disk:
        assert mark_of(disk.read(0, 1)) == "owner"


def test_the_lock_dies_with_its_process(paths):
    """kill -9 of the owner frees the images: the crashed disk reopens (recover's case)."""
    data, meta = paths["same path"]
    owner = own("create", data, meta, "flushed before the kill")
    owner.kill()
    with SwornDisk.open(*paths["symlink"], KEY16) as disk:
        assert mark_of(disk.read(0, 1)) == "flushed before the kill"


@pytest.mark.parametrize("forms", [("same path", "same path"), ("same path", "symlink"),
                                   ("symlink", "hard link")])
def test_racing_creates_exactly_one_wins(paths, forms):
    racers = [Owner("create", *paths[form], f"racer {i}") for i, form in enumerate(forms)]
    for racer in racers:            # both armed (imports done), then go back to back
        racer.go()
    results = [racer.result() for racer in racers]
    winners = [r for r, res in zip(racers, results) if res == "owner"]
    assert len(winners) == 1, results
    loser = next(res for res in results if res != "owner")
    assert loser.startswith(f"busy {errno.EBUSY} ") and "is in use" in loser, loser
    for racer in racers:
        racer.release()
    with SwornDisk.open(*paths["same path"], KEY16) as disk:
        assert mark_of(disk.read(0, 1)) == winners[0].mark


def test_a_second_open_in_the_same_process_is_refused(paths):
    with SwornDisk.create(*paths["same path"], KEY16) as disk:
        disk.write(1, b"x" * BS)
        for form in FORMS:
            with pytest.raises(DeviceBusyError) as e:
                SwornDisk.open(*paths[form], KEY16)
            assert "this process" in str(e.value)
        disk.flush()
    with SwornDisk.open(*paths["symlink"], KEY16) as disk:       # close() released it
        assert disk.read(1, 1) == b"x" * BS


def test_devices_passed_in_stay_locked_until_their_caller_closes_them(paths):
    d, m = (FileDevice(p) for p in paths["same path"])
    SwornDisk.create(d, m, KEY16).close()
    with pytest.raises(DeviceBusyError):        # the caller's devices are still open
        SwornDisk.open(*paths["hard link"], KEY16)
    with SwornDisk.open(d, m, KEY16):           # the caller itself may reopen on them
        pass
    d.close()
    m.close()
    SwornDisk.open(*paths["hard link"], KEY16).close()


def test_probe_of_a_live_disk_only_reads(paths):
    """probe and the header dump answer for an owned disk (they write nothing, so they
    need no ownership); anything that writes must own the disk first."""
    from sworndisk.keyslots import read_header
    data, meta = paths["same path"]
    owner = own("create", data, meta)
    assert SwornDisk.probe(paths["symlink"][1])
    assert [s.kind for s in read_header(paths["hard link"][1]).slots] == ["key file"]
    owner.release()


def test_one_file_cannot_be_both_data_and_meta(paths):
    data, _ = paths["same path"]
    before = digest(data)
    with pytest.raises(InvalidArgument, match="must differ"):
        SwornDisk.create(data, paths["hard link"][0], KEY16)
    assert digest(data) == before


def test_check_unowned_reports_the_owner_without_taking_the_lock(paths):
    data, meta = paths["same path"]
    check_unowned(paths["symlink"][0], "data device")           # free: no error
    with SwornDisk.create(data, meta, KEY16):
        with pytest.raises(DeviceBusyError) as e:
            check_unowned(paths["hard link"][1], "meta device")
        assert e.value.errno == errno.EBUSY
        assert str(e.value).startswith(f"meta device {paths['hard link'][1]} is in use: "
                                       f"locked by pid {os.getpid()} ")
    check_unowned(data, "data device")
    with SwornDisk.open(data, meta, KEY16):      # the check left no lock behind
        pass


@pytest.fixture
def loop_devices(tmp_path):
    """Two loop devices over sparse files (root and util-linux losetup needed)."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    devs = []
    try:
        for name, size in (("data", DATA_SIZE), ("meta", SwornDisk.min_meta_size(DATA_SIZE))):
            img = tmp_path / f"{name}.loop"
            create_image(str(img), (size + MiB - 1) // MiB * MiB)
            done = subprocess.run(["losetup", "--find", "--show", str(img)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"no loop device: {done.stderr.strip()}")
            devs.append(done.stdout.strip())
        yield devs
    finally:
        for dev in devs:
            subprocess.run(["losetup", "--detach", dev], check=True)


def test_block_devices_are_claimed_exclusively(loop_devices, tmp_path):
    data, meta = loop_devices
    link = tmp_path / "data-link"
    os.symlink(data, link)
    with SwornDisk.create(data, meta, KEY16):
        for fn in (lambda: SwornDisk.open(str(link), meta, KEY16),
                   lambda: check_unowned(str(link), "data device")):
            with pytest.raises(DeviceBusyError) as e:
                fn()
            assert str(e.value).startswith(f"data device {link} (= {data}) is in use: ")
            assert f"open by pid {os.getpid()} " in str(e.value)
        with pytest.raises(OSError) as e:                 # any other exclusive user, too
            os.open(meta, os.O_RDONLY | os.O_EXCL)
        assert e.value.errno == errno.EBUSY
    os.close(os.open(meta, os.O_RDONLY | os.O_EXCL))       # released at close()
    SwornDisk.open(str(link), meta, KEY16).close()
