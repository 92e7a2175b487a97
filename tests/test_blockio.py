"""ublk_shim.blockio, the host block I/O under FileDevice and LoopTarget, on regular files."""
from __future__ import annotations

import errno
import os

import pytest

import sworndisk.device
from sworndisk import FileDevice
from sworndisk.device import create_image
from ublk_shim import blockio

BS = 4096


def test_open_size_identity_and_kind(tmp_path):
    p = tmp_path / "img"
    create_image(str(p), 64 * BS)
    os.symlink(p, tmp_path / "sym")
    os.link(p, tmp_path / "hard")
    f = blockio.BlockFile(str(p))
    try:
        assert (f.size, f.is_blockdev, f.readonly) == (64 * BS, False, False)
        assert blockio.path_size(str(p)) == 64 * BS
        assert f.identity == blockio.identity(os.stat(tmp_path / "sym"))
        assert f.identity == blockio.identity(os.stat(tmp_path / "hard"))
    finally:
        f.close()
        f.close()                                   # idempotent
    assert f.fd == -1
    with pytest.raises(blockio.NotStorageError) as e:
        blockio.BlockFile(str(tmp_path))
    assert e.value.errno == errno.EINVAL
    assert str(e.value) == f"{tmp_path}: not a regular file or block device"
    with pytest.raises(FileNotFoundError):
        blockio.BlockFile(str(tmp_path / "missing"))


@pytest.mark.parametrize("unmap", [True, False])
def test_discard_and_write_zeroes_leave_zeros_in_a_file(tmp_path, unmap):
    p = tmp_path / "img"
    p.write_bytes(b"x" * 16 * BS)
    f = blockio.BlockFile(str(p), direct=False)
    try:
        f.discard(2 * BS, 2 * BS)                   # a punched hole reads as zeros
        f.write_zeroes(8 * BS, 3 * BS, unmap=unmap)
    finally:
        f.close()
    data = p.read_bytes()
    assert len(data) == 16 * BS                     # the size is kept
    assert data[2 * BS:4 * BS] == bytes(2 * BS) and data[8 * BS:11 * BS] == bytes(3 * BS)
    kept = data[:2 * BS] + data[4 * BS:8 * BS] + data[11 * BS:]
    assert kept == b"x" * 11 * BS


def test_write_zeroes_writes_zeros_where_the_store_cannot(tmp_path, monkeypatch):
    p = tmp_path / "img"
    p.write_bytes(b"y" * 4 * BS)

    def unsupported(fd, mode, offset, length):
        raise OSError(errno.EOPNOTSUPP, "no fallocate here")

    monkeypatch.setattr(blockio, "_fallocate", unsupported)
    f = blockio.BlockFile(str(p))
    try:
        f.discard(0, BS)                            # a hint: nothing happens
        f.write_zeroes(BS, 2 * BS)
    finally:
        f.close()
    assert p.read_bytes() == b"y" * BS + bytes(2 * BS) + b"y" * BS


def test_filedevice_without_io_uring_writes_and_reads_plainly(tmp_path, monkeypatch):
    """Where the kernel refuses io_uring (an OSError at ring setup), the batch calls fall
    back to one write or read at a time."""
    setups = []

    def refused(entries):
        setups.append(entries)
        raise OSError(errno.EPERM, "io_uring_setup: disabled")

    monkeypatch.setattr(sworndisk.device, "Ring", refused)
    p = tmp_path / "img"
    create_image(str(p), 32 * BS)
    dev = FileDevice(str(p))
    try:
        items = [(bytes([i + 1]) * BS, 3 * i * BS) for i in range(8)]
        dev.pwrite_many(items)
        assert dev.pread_many([(BS, off) for _, off in items]) == [d for d, _ in items]
        assert len(setups) == 1                     # tried once, then plain I/O
    finally:
        dev.close()
