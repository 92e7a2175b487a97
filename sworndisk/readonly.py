"""Opening a disk without writing to it: for `check` and other inspection.

A read-only disk's devices are opened O_RDONLY (paths) and wrapped so that any write,
flush or discard raises ReadOnlyError instead of reaching the device: recovery runs in
memory only, and nothing the engine does can change what it inspects. Files get a shared
(read) lock, so an inspection waits for no one but a running server still refuses it.
"""
from __future__ import annotations

import os

from .device import BlockDevice, DeviceWrapper, FileDevice, open_pair
from .errors import ReadOnlyError


class ReadOnlyDevice(DeviceWrapper):
    """Reads pass through; every write-side call raises ReadOnlyError."""

    def _refuse(self, *args) -> None:
        raise ReadOnlyError("the disk was opened read-only: nothing may be written to it")

    pwrite = pwrite_many = flush = discard = _refuse


def open_pair_readonly(data, meta) -> tuple[BlockDevice, BlockDevice, list[BlockDevice]]:
    """Like device.open_pair, for reading only: (data, meta, owned), both wrapped."""
    owned: list[BlockDevice] = []
    try:
        devs = []
        for dev in (data, meta):
            if isinstance(dev, (str, os.PathLike)):
                dev = FileDevice(os.fspath(dev), readonly=True)
                owned.append(dev)
            devs.append(dev)
        d, m, _ = open_pair(*devs)
    except BaseException:
        for dev in owned:
            dev.close()
        raise
    return ReadOnlyDevice(d), ReadOnlyDevice(m), owned


__all__ = ["ReadOnlyDevice", "open_pair_readonly"]
