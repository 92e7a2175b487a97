"""What the write log costs per request: `python -m sworndisk_ublk.wlog_bench [N] [KiB]`.

Drives SwornDiskTarget.handle with N random writes of the given size (default 20000 x
4 KiB) on an engine over memory devices, without and then with a write log in /dev/shm
(a tmpfs, as /run is), and prints microseconds per write for both. Memory devices keep the
storage out of the figure: the difference is the log's own cost (encryption, MAC chain,
one writev to tmpfs, restarts at the engine's autocommits).
"""
from __future__ import annotations

import os
import random
import sys
import tempfile
import time
import types
from typing import Optional

import ublk_shim
from sworndisk import BLOCK_SIZE, MemoryDevice, SwornDisk

from .target import SwornDiskTarget
from .wlog import LogKeys, WriteLog

MiB = 1 << 20


def run(n: int, size: int, log_dir: Optional[str]) -> float:
    """Microseconds per write through the target, with a log in `log_dir` if given."""
    data_size = 256 * MiB
    meta_blocks = -(-SwornDisk.min_meta_size(data_size) // BLOCK_SIZE)
    disk = SwornDisk.create(MemoryDevice(data_size), MemoryDevice(meta_blocks * BLOCK_SIZE),
                            bytes(32))
    target = SwornDiskTarget(disk)
    if log_dir is not None:
        target.start_log(WriteLog.create(os.path.join(log_dir, "bench.wlog"),
                                         LogKeys.of(disk), disk.commit_seq))
    rng = random.Random(1)
    buf = memoryview(bytearray(os.urandom(size)))
    blocks = size // BLOCK_SIZE
    span = disk.nr_blocks // 2 - blocks            # stay well inside the usable space
    reqs = [types.SimpleNamespace(op=ublk_shim.OP_WRITE, offset=rng.randrange(span) * BLOCK_SIZE,
                                  length=size, fua=False, tag=0, q_id=0) for _ in range(n)]
    start = time.perf_counter()
    for r in reqs:
        if target.handle(r, buf) != size:
            raise RuntimeError("a write failed")
    elapsed = time.perf_counter() - start
    target.close()
    return elapsed / n * 1e6


def append_only(n: int, size: int, log_dir: str) -> float:
    """Microseconds per WriteLog.append_write alone (what each completed write adds)."""
    disk = types.SimpleNamespace(subkey=lambda label: bytes(32))
    wlog = WriteLog.create(os.path.join(log_dir, "append.wlog"), LogKeys.of(disk), 0)
    data = memoryview(bytearray(os.urandom(size)))
    start = time.perf_counter()
    for i in range(n):
        wlog.append_write(i, data)
        if wlog.records == 4096:            # as an engine commit would, bounding the file
            wlog.restart(i)
    elapsed = time.perf_counter() - start
    wlog.remove()
    return elapsed / n * 1e6


def main() -> None:
    """Alternate the two runs a few times and keep each one's best: the machine is shared."""
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    size = (int(sys.argv[2]) if len(sys.argv) > 2 else 4) * 1024
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        base = min(run(n, size, None) for _ in range(rounds))
        logged = min(run(n, size, d) for _ in range(rounds))
        alone = min(append_only(n, size, d) for _ in range(rounds))
    print(f"{n} writes of {size // 1024} KiB, best of {rounds}: target {base:.1f} us/write "
          f"without the log, {logged:.1f} with it (+{logged - base:.1f} us); "
          f"the append alone {alone:.1f} us")


if __name__ == "__main__":
    main()
