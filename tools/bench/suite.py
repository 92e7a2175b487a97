"""The micro-benchmark: four workloads on one disk at one depth, run once per disk kind.

Order, identical for both disks:
  prefill      sequential 1 MiB writes over the whole region + flush (untimed: it makes
               every block readable, so random reads read written data)
  randwrite    4 KiB writes at seeded random LBAs in the region, then flush
  randread     4 KiB reads at (other) seeded random LBAs in the region
  seqwrite     1 MiB writes over the first `seq_bytes` of the region, then flush
  seqread      1 MiB reads of the same range

Requests go `depth` at a time (workloads.py): SwornDisk reads a batch with one `read_many`
and writes it with one `write_many`; CryptDisk submits each batch to the device
together through io_uring. Every depth gets a fresh disk, so each depth's run starts from
the same state.

SwornDisk gets a data image large enough to absorb every write of the run without segment
cleaning (images are sparse, so that costs nothing): this benchmark measures the I/O paths;
the aging run (aging.py) is the one that measures a disk that has to clean. With
`tight_data` it gets only what its logical size needs, and cleans during the run.
"""
from __future__ import annotations

import cProfile
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from .disks import BLOCK_SIZE, BenchDisk, make_cryptdisk, make_sworndisk, sworndisk_data_bytes
from .profiling import WorkloadProfile, summarise
from .workloads import (Body, DeviceReads, NullDisk, Payload, RawDisk, WorkloadResult,
                        client_seconds, random_lbas, random_read, random_write,
                        sequential_read, sequential_write, timed)

WORKLOADS = ("randwrite", "randread", "seqwrite", "seqread")
LABELS = {"randwrite": "rand write 4K", "randread": "rand read 4K",
          "seqwrite": "seq write 1M", "seqread": "seq read 1M"}
DEFAULT_DEPTHS = (1, 32)
READS = ("randread", "seqread")


@dataclass(frozen=True)
class Target:
    """A SwornDisk / CryptDisk throughput ratio to reach (`minimum`), and the one hoped for."""
    minimum: float
    goal: Optional[float] = None

    def text(self) -> str:
        return f">={self.minimum:g}x" + (f" (goal {self.goal:g}x)" if self.goal else "")


# What the issues ask for, per depth (reported, never asserted). Random write and read at
# depth 32: issue 15 (reads on a disk reopened before reading); the rest of depth 32 and
# random write at depth 1: issue 9; the rest of depth 1: the 0.7x of the earlier issues.
TARGETS: Dict[int, Dict[str, Target]] = {
    1: {"randwrite": Target(4.0, 8.0), "randread": Target(0.7),
        "seqwrite": Target(0.7), "seqread": Target(0.7)},
    32: {"randwrite": Target(3.0), "randread": Target(1.2),
         "seqwrite": Target(1.0), "seqread": Target(0.9)},
}
# SwornDisk's CPU us per 4 KiB block, at most (issue 9, at depth 32): the whole process
CPU_TARGETS: Dict[int, Dict[str, float]] = {32: {"randread": 15.0, "randwrite": 10.0}}
# ... and on the engine's thread alone (issue 15, at depth 32)
THREAD_CPU_TARGETS: Dict[int, Dict[str, float]] = {32: {"randread": 6.0, "randwrite": 4.0}}
# SwornDisk with its crypto workers / the same build with crypto_workers=0, at least
# (issue 15): the pool's gain at depth 32, and no loss of more than 10% at depth 1
WORKERS_TARGETS: Dict[int, Dict[str, float]] = {
    1: {w: 0.9 for w in ("randwrite", "randread", "seqwrite", "seqread")},
    32: {"randwrite": 1.5, "randread": 1.4, "seqwrite": 1.3, "seqread": 1.3},
}
# Peak RSS of the engine's process and its workers together, MiB, at most (issue 15)
RSS_TARGETS_MIB: Dict[int, float] = {32: 256.0}


@dataclass(frozen=True)
class SuiteParams:
    region_bytes: int = 1 << 30
    rand_ops: int = 30_000
    seq_bytes: int = 256 << 20
    request_bytes: int = 1 << 20
    seed: int = 42
    depth: int = 1                  # requests per batch
    workloads: Tuple[str, ...] = WORKLOADS
    profile_lines: int = 0          # >0: cProfile each timed workload, keep this many lines
    profile_sort: str = "own"       # or "cum"
    tight_data: bool = False        # SwornDisk data image just big enough: cleaning included
    crypto_workers: Optional[int] = None   # SwornDisk's Config.crypto_workers (None: automatic)
    warm_reads: bool = False        # read right after writing; default: close and reopen first

    @property
    def region_blocks(self) -> int:
        return self.region_bytes // BLOCK_SIZE

    @property
    def request_blocks(self) -> int:
        return self.request_bytes // BLOCK_SIZE

    @property
    def seq_blocks(self) -> int:
        return min(self.seq_bytes, self.region_bytes) // BLOCK_SIZE

    def user_bytes_written(self) -> int:
        """Everything the run writes, prefill included: the no-cleaning data image size."""
        total = self.region_bytes
        if "randwrite" in self.workloads:
            total += self.rand_ops * BLOCK_SIZE
        if "seqwrite" in self.workloads:
            total += self.seq_blocks * BLOCK_SIZE
        return total


@dataclass
class SuiteResult:
    """One disk kind's run at one depth: a result per workload, plus what the disk says
    of itself."""
    kind: str
    depth: int
    direct_io: bool
    image_bytes: Dict[str, int]
    prefill: WorkloadResult
    results: Dict[str, WorkloadResult] = field(default_factory=dict)
    engine_stats: dict = field(default_factory=dict)
    profiles: Dict[str, WorkloadProfile] = field(default_factory=dict)
    # CryptDisk's runs: each read workload again straight from its image (RawDisk), the
    # device's own share of a batch
    device: Dict[str, DeviceReads] = field(default_factory=dict)
    crypto_workers: int = 0              # the pool's size as the engine chose it
    workers_rss_peak_kib: int = 0        # the most its workers held together (sum of VmHWM)


def open_disk(kind: str, workdir: str, params: SuiteParams) -> BenchDisk:
    if kind == "sworndisk":
        room = 0 if params.tight_data else params.user_bytes_written() * 11 // 10 + (64 << 20)
        data_bytes = sworndisk_data_bytes(params.region_blocks, room)
        return make_sworndisk(workdir, params.region_blocks, data_bytes,
                              crypto_workers=params.crypto_workers)
    if kind == "cryptdisk":
        return make_cryptdisk(workdir, params.region_blocks)
    raise ValueError(f"unknown disk kind {kind!r}")


def _bodies(disk, params: SuiteParams, payload: Payload) -> Dict[str, Callable[[], Body]]:
    """Builders of the timed workloads: called (LBA lists drawn) before timing starts."""
    n, rb, depth = params.region_blocks, params.request_blocks, params.depth
    return {
        "randwrite": lambda: random_write(
            disk, random_lbas(params.seed, params.rand_ops, 0, n), payload, depth=depth),
        "randread": lambda: random_read(
            disk, random_lbas(params.seed + 1, params.rand_ops, 0, n), depth=depth),
        "seqwrite": lambda: sequential_write(disk, 0, params.seq_blocks, rb, payload,
                                             depth=depth),
        "seqread": lambda: sequential_read(disk, 0, params.seq_blocks, rb, depth=depth),
    }


def run_suite(kind: str, workdir: str, params: SuiteParams) -> SuiteResult:
    """Create a `kind` disk in `workdir`, prefill it, run the selected workloads at
    `params.depth`, delete it. Meant to run in its own process (see isolate.py)."""
    payload = Payload(params.request_blocks, params.seed)
    with open_disk(kind, workdir, params) as bench:
        prefill = timed("prefill", bench, sequential_write(
            bench.disk, 0, params.region_blocks, params.request_blocks, payload, "prefill"))
        result = SuiteResult(kind, params.depth, bench.direct_io, dict(bench.sizes), prefill)
        for name in WORKLOADS:
            if name not in params.workloads:
                continue
            if name in READS and not params.warm_reads:
                bench.reopen()          # untimed: reads meet the disk as after a reboot
            body = _bodies(bench.disk, params, payload)[name]()
            if params.profile_lines <= 0:
                result.results[name] = timed(name, bench, body)
            else:
                profiler = cProfile.Profile()
                profiler.enable()
                result.results[name] = r = timed(name, bench, body)
                profiler.disable()
                result.profiles[name] = summarise(profiler, name, r.blocks,
                                                  params.profile_lines, params.profile_sort)
            # The loop's own share of the thread, on a disk that does nothing.
            r = result.results[name]
            r.client_cpu_seconds = client_seconds(_bodies(NullDisk(), params, payload)[name]())
            # After each workload (a reopen starts new workers): the most they held together.
            pool = bench.pool()
            result.crypto_workers = pool.workers
            result.workers_rss_peak_kib = max(result.workers_rss_peak_kib, pool.rss_peak_kib())
            if kind == "cryptdisk" and name in READS:
                raw = RawDisk(bench.devices["data"].inner.fd)
                try:
                    result.device[name] = DeviceReads(
                        timed(name, bench, _bodies(raw, params, payload)[name]()), raw.together)
                finally:
                    raw.close()
        result.engine_stats = _jsonable(bench.stats())
    return result


def _jsonable(stats: dict) -> dict:
    """Engine stats, with anything exotic turned into text so they survive JSON."""
    def conv(v):
        if isinstance(v, (int, float, str, bool)) or v is None:
            return v
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return str(v)
    return conv(stats)


def ratios(results: Dict[str, SuiteResult], workloads: List[str],
           metric: Callable[[WorkloadResult], float] = lambda r: r.mb_per_s
           ) -> Dict[str, float]:
    """SwornDisk / CryptDisk `metric` (default throughput) per workload, where both ran."""
    sw, cd = results.get("sworndisk"), results.get("cryptdisk")
    if not sw or not cd:
        return {}
    both = [w for w in workloads if w in sw.results and w in cd.results]
    return {w: metric(sw.results[w]) / metric(cd.results[w])
            for w in both if metric(cd.results[w]) > 0}


def cpu_ratios(results: Dict[str, SuiteResult], workloads: List[str]) -> Dict[str, float]:
    """The throughput ratio if both disks were purely CPU-bound: CryptDisk's CPU time per
    block over SwornDisk's. Unlike the wall-clock ratio, load from other processes hardly
    moves it."""
    return ratios(results, workloads,
                  lambda r: 1 / r.cpu_us_per_block if r.cpu_us_per_block else 0.0)


def workers_ratios(auto: Optional[SuiteResult], inline: Optional[SuiteResult],
                   workloads: List[str]) -> Dict[str, float]:
    """SwornDisk with its crypto workers / with crypto_workers=0, MB/s per workload."""
    if not auto or not inline:
        return {}
    return {w: auto.results[w].mb_per_s / inline.results[w].mb_per_s for w in workloads
            if w in auto.results and w in inline.results and inline.results[w].mb_per_s > 0}



def fastest_possible(inline: WorkloadResult, device: DeviceReads, cores: int) -> float:
    """The most MB/s `cores` could make of a batch-synchronous workload that `inline` ran
    on one core, by Amdahl's law: with one batch in flight, and its reads completing
    together (device.together near 1), the device's time (the same requests with nothing
    on top) overlaps no work on the data, and the rest of `inline`'s time is split
    perfectly over the cores. A device measured slower than w0 (noise) leaves nothing to
    gain."""
    t_inline = 1 / inline.mb_per_s
    t_device = min(t_inline, 1 / device.mb_per_s)
    return 1 / (t_device + (t_inline - t_device) / cores)
