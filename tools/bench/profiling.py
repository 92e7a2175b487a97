"""`--profile`: where a workload's time goes, per 4 KiB block.

Each timed workload gets its own cProfile run (inside the child that runs the disk, at the
depth of that run), summarised as the top functions by own time (or cumulative time) in
microseconds per block moved, so that "per random read" and "per random write" can be
read off directly and compared with the CPU us/block of the tables.

cProfile's clock is the wall clock: a CPU clock (CLOCK_PROCESS_CPUTIME_ID) costs ~1 us
per call here, more than most functions being measured. So the blocking calls (a
`preadv`, `submit_and_wait` on io_uring, `fdatasync`) show their waiting as own time, and
everything runs slower under the profiler (the "profiled" total says by how much): read
the rows as shares, and the tables' CPU us/block as the absolute figure.
"""
from __future__ import annotations

import cProfile
import os
import pstats
from dataclasses import dataclass, field
from typing import List, Tuple

SORTS = ("own", "cum")
_ROOTS = ("sworndisk", "sworndisk_ublk", "ublk_shim", "tools")


@dataclass
class ProfileRow:
    function: str       # "sworndisk/reader.py:40(read_many)" or "<built-in method posix.preadv>"
    calls: int
    own_s: float
    cum_s: float


@dataclass
class WorkloadProfile:
    """The top functions of one profiled workload."""
    workload: str
    blocks: int
    total_s: float          # everything the profiler saw (sum of own times)
    sort: str
    rows: List[ProfileRow] = field(default_factory=list)

    def per_block_us(self, seconds: float) -> float:
        return seconds * 1e6 / self.blocks if self.blocks else 0.0

    def text(self, title: str) -> str:
        head = (f"{title}: profiled {self.per_block_us(self.total_s):.1f} us/block (wall clock, "
                f"cProfile overhead included), top {len(self.rows)} by {self.sort} time")
        lines = [head, f"{'own us/blk':>10}  {'cum us/blk':>10}  {'calls/blk':>9}  function"]
        for r in self.rows:
            lines.append(f"{self.per_block_us(r.own_s):10.2f}  {self.per_block_us(r.cum_s):10.2f}  "
                         f"{r.calls / max(1, self.blocks):9.3g}  {r.function}")
        return "\n".join(lines)


def _label(key: Tuple[str, int, str]) -> str:
    """A pstats key as a short, stable name: the path from the package root, or the
    built-in's own description."""
    filename, line, func = key
    if filename == "~":
        return func
    parts = filename.split(os.sep)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in _ROOTS or parts[i] == "site-packages":
            start = i + 1 if parts[i] == "site-packages" else i
            filename = "/".join(parts[start:])
            break
    else:
        filename = os.path.basename(filename)
    return f"{filename}:{line}({func})"


def summarise(profiler: cProfile.Profile, workload: str, blocks: int, lines: int,
              sort: str = "own") -> WorkloadProfile:
    stats = pstats.Stats(profiler).stats      # key -> (prim calls, calls, own, cum, callers)
    index = 2 if sort == "own" else 3
    top = sorted(stats.items(), key=lambda kv: kv[1][index], reverse=True)[:lines]
    rows = [ProfileRow(_label(k), v[1], v[2], v[3]) for k, v in top]
    return WorkloadProfile(workload, blocks, sum(v[2] for v in stats.values()), sort, rows)
