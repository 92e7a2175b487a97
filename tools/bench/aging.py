"""The aging run: random 4 KiB overwrites on a disk that is u% full (the paper's Fig. 9).

For each utilisation u, on a data image of D bytes:
  fill     live = u x usable capacity, written sequentially (1 MiB requests) + flush
  warm-up  the first pass: D bytes of 4 KiB writes at uniform random LBAs in [0, live),
           a flush every 1000 writes; a log-structured disk runs out of clean segments
           during it and starts cleaning
  steady   (k - 1) x D more bytes of the same: throughput and write amplification
           (device bytes written / user bytes written, counted under the disk) are
           measured here

CryptDisk runs the same LBAs on `live` blocks at every u in the same run, as the baseline
(its write amplification is 1 by construction, and is measured anyway). Afterwards, untimed,
a sample of blocks is read back and checked.

A disk that cannot clean (yet) runs out of space during the overwrites: that is reported
per row with how far it got, not raised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from .disks import BLOCK_SIZE, BenchDisk, make_cryptdisk, make_sworndisk, sworndisk_usable_blocks
from .workloads import (Payload, VerifyError, WorkloadError, WorkloadResult, random_lbas,
                        random_read, random_write, sequential_write, timed)

FILL_REQUEST_BLOCKS = 256
VERIFY_READS = 2000


@dataclass(frozen=True)
class AgingParams:
    data_bytes: int = 256 << 20          # D
    passes: float = 2.5                  # k: total overwrite volume is k x D
    utilisations: Tuple[float, ...] = (0.5, 0.7, 0.9)
    flush_every: int = 1000
    seed: int = 7


@dataclass(frozen=True)
class AgingPlan:
    """What one utilisation's run writes; computed once so both disks do the same."""
    utilisation: float
    data_bytes: int
    nr_blocks: int           # SwornDisk's logical size: its usable capacity on D
    live_blocks: int
    warmup_ops: int
    steady_ops: int
    flush_every: int
    seed: int


def make_plan(params: AgingParams, utilisation: float, with_engine: bool) -> AgingPlan:
    """Without the engine in the run (CryptDisk only) the usable capacity is taken as 80%
    of D rather than asked of SwornDisk."""
    if with_engine:
        usable = sworndisk_usable_blocks(params.data_bytes)
    else:
        usable = params.data_bytes * 4 // 5 // BLOCK_SIZE
    pass_ops = params.data_bytes // BLOCK_SIZE
    total_ops = int(params.passes * pass_ops)
    return AgingPlan(utilisation, params.data_bytes, usable, max(1, int(usable * utilisation)),
                     min(pass_ops, total_ops), max(0, total_ops - pass_ops),
                     params.flush_every, params.seed)


@dataclass
class AgingResult:
    kind: str
    plan: AgingPlan
    fill: Optional[WorkloadResult] = None
    warmup: Optional[WorkloadResult] = None
    steady: Optional[WorkloadResult] = None
    engine_write_amplification: Optional[float] = None
    error: Optional[str] = None     # e.g. ENOSPC from a disk that cannot clean: reported
    wrong_data: bool = False        # a read-back check failed: the run fails

    @property
    def measured(self) -> Optional[WorkloadResult]:
        """The phase the table reports: steady state, or the warm-up if there is no more."""
        return self.steady or self.warmup


def _open(kind: str, workdir: str, plan: AgingPlan) -> BenchDisk:
    tag = f"-aging{int(plan.utilisation * 100)}"
    if kind == "sworndisk":
        return make_sworndisk(workdir, plan.nr_blocks, plan.data_bytes, tag)
    return make_cryptdisk(workdir, plan.live_blocks, tag)


def run_aging(kind: str, workdir: str, plan: AgingPlan) -> AgingResult:
    """One disk at one utilisation (meant to run in its own process)."""
    result = AgingResult(kind, plan)
    payload = Payload(FILL_REQUEST_BLOCKS, plan.seed)
    lbas = random_lbas(plan.seed, plan.warmup_ops + plan.steady_ops, 0, plan.live_blocks)
    bench = _open(kind, workdir, plan)
    try:
        result.fill = timed("fill", bench, sequential_write(
            bench.disk, 0, plan.live_blocks, FILL_REQUEST_BLOCKS, payload, "fill"))
        result.warmup = timed("warmup", bench, random_write(
            bench.disk, lbas[:plan.warmup_ops], payload, plan.flush_every, "warmup"))
        if plan.steady_ops:
            result.steady = timed("steady", bench, random_write(
                bench.disk, lbas[plan.warmup_ops:], payload, plan.flush_every, "steady"))
        # untimed: a WA below 1 or a fast run mean nothing if blocks went missing
        random_read(bench.disk, random_lbas(plan.seed + 1, VERIFY_READS, 0, plan.live_blocks))()
    except (WorkloadError, VerifyError) as e:
        result.error = f"{type(e).__name__}: {e}"
        result.wrong_data = isinstance(e, VerifyError)
    finally:
        result.engine_write_amplification = _engine_write_amplification(bench)
        bench.close(suppress_errors=result.error is not None)
    return result


def _engine_write_amplification(bench: BenchDisk) -> Optional[float]:
    """What SwornDisk itself reports (CryptDisk reports nothing; a failed disk still
    answers stats())."""
    if bench.kind != "sworndisk":
        return None
    return bench.disk.stats().session.write_amplification
