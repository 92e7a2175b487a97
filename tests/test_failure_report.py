"""A disk whose backing storage fails: the request fails with EIO, the engine latches, the
server records why, and `list` shows it (issue 17; the VM test kills real NBD servers)."""
from __future__ import annotations

import errno
import logging
import os

from sworndisk import Config, MemoryDevice, SwornDisk
from sworndisk_ublk import commands, state
from sworndisk_ublk.daemon import Server, ServerOptions
from sworndisk_ublk.keys import KeySource
from sworndisk_ublk.table import parse_table
from sworndisk_ublk.target import SwornDiskTarget
from ublk_shim import OP_FLUSH, OP_WRITE, Request, holders

from .conftest import KEY16, MiB, meta_size_for
from .crashdev import FaultyDevice
from .test_cli import run_dir  # noqa: F401 - autouse: the state directory in tmp_path

BS = 4096
CFG = Config(memtable_records=64)


def _req(op, block, blocks=1):
    return Request(op, block * BS, blocks * BS if op != OP_FLUSH else 0, False, 0, 0, 0)


def test_backing_failure_is_latched_recorded_and_listed(caplog):
    data = FaultyDevice(MemoryDevice(24 * MiB))
    meta = MemoryDevice(meta_size_for(24 * MiB, 1024, CFG))
    target = SwornDiskTarget(SwornDisk.create(data, meta, KEY16, nr_blocks=1024, config=CFG))
    block = memoryview(bytearray(b"w" * BS))
    assert target.handle(_req(OP_WRITE, 3), block) == BS
    assert target.failure is None
    data.fail_flush_after(0)                       # the storage dies under the next flush
    assert target.handle(_req(OP_FLUSH, 0), memoryview(bytearray(0))) == -errno.EIO
    assert data.failures == 1
    assert target.failure == "OSError: [Errno 5] injected flush error"
    assert target.handle(_req(OP_WRITE, 4), block) == -errno.EIO    # latched

    table = parse_table("0 8192 sworndisk /nbd/data /nbd/meta 0 false")
    server = Server(ServerOptions(table), KeySource("test"), "-")
    server.target, server.dev_id = target, 7
    state.save(state.DeviceState(
        dev_id=7, pid=os.getpid(), pid_start=holders.start_time(os.getpid()),
        table=table.line(), data=table.data_dev, meta=table.meta_dev, size=table.size,
        recoverable=False, queues=1, depth=64, log="-"))
    with caplog.at_level(logging.ERROR, logger="sworndisk_ublk.daemon"):
        server.note_failure()
        server.note_failure()                      # once is enough
    errors = [r.getMessage() for r in caplog.records if r.name == "sworndisk_ublk.daemon"]
    assert errors == ["the disk failed and accepts no more writes: OSError: [Errno 5] "
                      "injected flush error; reconnect the storage, then del and add (or "
                      "recover) to reopen it at its last completed flush"]
    assert state.load(7).failed == target.failure

    row, = commands.list_devices()
    assert (row.state, row.failed) == ("alive", target.failure)
    lines = commands.format_rows([row]).splitlines()
    assert lines[1].split()[:4] == ["-", "/dev/ublkb7", str(os.getpid()), "failed"]
    assert lines[-1] == "/dev/ublkb7 failed: OSError: [Errno 5] injected flush error"
