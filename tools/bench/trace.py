"""Replaying recorded block traces (tools/trace) natively against SwornDisk and CryptDisk.

    python -m tools.bench --trace FILE|DIR [FILE...] [--depth 1,32] [--quick] [--plot DIR]

A trace is replayed as recorded, reads and writes interleaved, on each disk kind, at each
depth, on a fresh disk:

1. *Plan* (untimed): the trace is cut into batches of at most `depth` consecutive requests,
   as a ublk queue hands them over at that depth. FLUSH and FUA requests are barriers: each
   is a batch of its own, issued once everything before it completed, and nothing after it
   is issued before it completes (a FUA write is its write then a flush; the engines have
   no FUA). A batch also ends before a request that overlaps an earlier one in it when
   either writes, so every read has one right answer.
2. *Prefill* (untimed): blocks the trace reads before it writes them (the file system and
   data the recording's unrecorded setup phase made) are written, flushed, and the disk is
   reopened, so the replay meets a disk as a user does after mounting it.
3. *Replay* (timed): each batch's READs with one read_many, then its writes (each run of
   WRITEs with one write_many), discards and write-zeroes in order, then the barrier's
   flush; a final flush. Every written block carries a stamp (its LBA and the write's
   sequence number) and random bytes; every read is checked against what the trace wrote
   there last (discarded blocks: zeros on SwornDisk, unspecified on CryptDisk, which like
   dm-crypt decrypts whatever the device holds; write-zeroes: zeros on both).
4. *Read-back* (untimed): the disk is reopened and every block the replay touched is read
   and checked against the trace's last write: a lost or misplaced block fails the run.

A request's latency is from the start of its batch to the return of the call that served
it (reads: the batch's read_many; writes: the end of the batch, with the barrier's flush).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, TextIO, Tuple

import numpy as np

from tools.trace import format as tf

from .disks import (BLOCK_SIZE, DISPLAY_NAMES, BenchDisk,
                    make_cryptdisk, make_sworndisk, sworndisk_data_bytes)
from .workloads import VerifyError

WORDS = BLOCK_SIZE // 8
MAX_REQUEST_BLOCKS = 128          # prefill and read-back extents (512 KiB, ublk's max I/O)
QUICK_REQUESTS = 200              # --quick replays each trace's first requests only

# What a block holds, per LBA: a write's sequence number (>= 1, 0 = prefill), or
ZERO = -1                         # zeros (write-zeroes)
DISCARDED = -2                    # discarded: zeros on SwornDisk, unspecified on CryptDisk
UNTOUCHED = -3                    # neither read nor written by the trace


class TraceError(ValueError):
    """A trace that cannot be replayed (unaligned requests, past the end)."""


@dataclass(frozen=True)
class Op:
    """One request of the trace in blocks; `seq` numbers writes (its trace index + 1)."""
    op: int
    lba: int
    nr: int
    fua: bool
    seq: int


@dataclass
class Plan:
    """A trace cut into batches for one depth, with what every read must return."""
    name: str
    nr_blocks: int
    depth: int
    ops: List[Op]
    batches: List[List[int]]              # indices into ops, in trace order
    expect: Dict[int, np.ndarray]         # op index -> per-block state when it is read
    prefill: np.ndarray                   # bool per LBA: read before the trace writes it
    final: np.ndarray                     # per-LBA state after the trace


def _ops(trace: tf.Trace, name: str) -> List[Op]:
    ops = []
    for i, r in enumerate(trace.records):
        if r.op == tf.FLUSH:
            ops.append(Op(tf.FLUSH, 0, 0, False, i + 1))
            continue
        if r.offset % BLOCK_SIZE or r.length % BLOCK_SIZE:
            raise TraceError(f"{name}: request {i} ({r.op_name} {r.length} bytes at {r.offset}) "
                             f"is not 4 KiB aligned; record on a 4 KiB-block device")
        if r.length:
            ops.append(Op(r.op, r.offset // BLOCK_SIZE, r.length // BLOCK_SIZE, r.fua, i + 1))
    return ops


def _writes(op: Op) -> bool:
    return op.op in (tf.WRITE, tf.DISCARD, tf.WRITE_ZEROES)


def _cut(ops: Sequence[Op], depth: int) -> List[List[int]]:
    """Batches of at most `depth`; barriers alone; no overlap involving a write inside one."""
    batches: List[List[int]] = []
    cur: List[int] = []
    for i, op in enumerate(ops):
        if op.op == tf.FLUSH or op.fua:
            if cur:
                batches.append(cur)
            batches.append([i])
            cur = []
            continue
        hazard = any(ops[j].lba < op.lba + op.nr and op.lba < ops[j].lba + ops[j].nr
                     and (_writes(op) or _writes(ops[j])) for j in cur)
        if cur and (len(cur) >= depth or hazard):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def plan(trace: tf.Trace, depth: int, name: str = "trace") -> Plan:
    nr_blocks = trace.device_bytes // BLOCK_SIZE
    ops = _ops(trace, name)
    state = np.full(nr_blocks, UNTOUCHED, dtype=np.int64)
    prefill = np.zeros(nr_blocks, dtype=bool)
    expect: Dict[int, np.ndarray] = {}
    for i, op in enumerate(ops):
        if op.op == tf.FLUSH:
            continue
        if op.lba + op.nr > nr_blocks:
            raise TraceError(f"{name}: request {op.seq - 1} goes past the device's end")
        seg = state[op.lba:op.lba + op.nr]
        if op.op == tf.READ:
            unknown = seg == UNTOUCHED
            prefill[op.lba:op.lba + op.nr] |= unknown
            seg[unknown] = 0
            expect[i] = seg.copy()
        elif op.op == tf.WRITE:
            seg[:] = op.seq
        else:
            seg[:] = ZERO if op.op == tf.WRITE_ZEROES else DISCARDED
    return Plan(name, nr_blocks, depth, ops, _cut(ops, depth), expect, prefill, state)


# --- data -------------------------------------------------------------------------------

class Stamps:
    """Write buffers: random (incompressible) blocks whose first two words are the block's
    LBA and the writing request's sequence number."""

    def __init__(self, max_blocks: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self._words = rng.integers(0, 2**63, size=(max_blocks, WORDS), dtype=np.uint64)

    def blocks(self, lba: int, nr: int, seq: int) -> bytes:
        w = self._words[:nr]
        w[:, 0] = np.arange(lba, lba + nr, dtype=np.uint64)
        w[:, 1] = seq
        return w.tobytes()


def check(data, lba: int, expect: np.ndarray, discarded_reads_zero: bool) -> None:
    """VerifyError unless `data` (blocks from `lba`) holds what `expect` says."""
    words = np.frombuffer(data, dtype="<u8").reshape(-1, WORDS)
    stamped = expect >= 0
    lbas = np.arange(lba, lba + len(expect), dtype=np.uint64)
    bad = stamped & ((words[:, 0] != lbas) | (words[:, 1] != expect.astype(np.uint64)))
    zero = (expect == ZERO) | ((expect == DISCARDED) & discarded_reads_zero)
    bad |= zero & words.any(axis=1)
    if bad.any():
        b = int(np.flatnonzero(bad)[0])
        want = (f"write #{expect[b]}" if expect[b] > 0 else "prefill" if expect[b] == 0
                else "zeros")
        raise VerifyError(f"block {lba + b} read back wrong: expected {want}, got a block "
                          f"stamped LBA {int(words[b, 0])} write #{int(words[b, 1])}")


# --- running -------------------------------------------------------------------------------

@dataclass
class TraceResult:
    """One replay of one trace on one disk at one depth."""
    trace: str
    disk: str
    depth: int
    requests: int = 0
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    device_bytes_written: int = 0
    device_bytes_read: int = 0
    p50_us: float = 0.0
    p99_us: float = 0.0
    read_p50_us: float = 0.0
    read_p99_us: float = 0.0
    write_p50_us: float = 0.0
    write_p99_us: float = 0.0
    prefill_blocks: int = 0
    verified_blocks: int = 0          # read back and checked at the end
    error: Optional[str] = None

    @property
    def mb_per_s(self) -> float:
        return (self.read_bytes + self.write_bytes) / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def iops(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_seconds * 1e6 / self.requests if self.requests else 0.0

    @property
    def write_amplification(self) -> float:
        return self.device_bytes_written / self.write_bytes if self.write_bytes else 0.0

    @property
    def write_share(self) -> float:
        total = self.read_bytes + self.write_bytes
        return self.write_bytes / total if total else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(mb_per_s=self.mb_per_s, iops=self.iops,
                 cpu_us_per_request=self.cpu_us_per_request,
                 write_amplification=self.write_amplification, write_share=self.write_share)
        return d


@dataclass
class ReplayDisk:
    """A disk under replay: the BenchDisk (which knows how to reopen it) and its discard
    semantics."""
    bench: BenchDisk
    log: Optional[list] = None        # tests: every call, (name, args), in issue order

    @property
    def discarded_reads_zero(self) -> bool:
        return self.bench.kind == "sworndisk"

    def reopen(self) -> None:
        """Close and open again on the same devices: caches cold, state from the devices."""
        self.bench.reopen()

    def call(self, name: str, *args):
        if self.log is not None:
            self.log.append((name, args))
        return getattr(self.bench.disk, name)(*args)

    def write_zeroes(self, lba: int, nr: int) -> None:
        """What the ublk targets do: SwornDisk discards (reads as zeros), CryptDisk writes
        encrypted zeros (dm-crypt has no write-zeroes; the block layer writes zero pages)."""
        if self.bench.kind == "sworndisk":
            self.call("discard", lba, nr)
        else:
            self.call("write_many", [(lba, bytes(nr * BLOCK_SIZE))])


def _extents(mask: np.ndarray) -> List[Tuple[int, int]]:
    """Runs of True as (lba, nr) of at most MAX_REQUEST_BLOCKS."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    out = []
    for start, end in zip(edges[::2].tolist(), edges[1::2].tolist()):
        out.extend((lba, min(MAX_REQUEST_BLOCKS, end - lba))
                   for lba in range(start, end, MAX_REQUEST_BLOCKS))
    return out


def prefill(disk: ReplayDisk, p: Plan, stamps: Stamps) -> int:
    extents = _extents(p.prefill)
    for i in range(0, len(extents), 32):
        disk.call("write_many", [(lba, stamps.blocks(lba, n, 0)) for lba, n in extents[i:i + 32]])
    disk.call("flush")
    return int(p.prefill.sum())


def read_back(disk: ReplayDisk, p: Plan) -> int:
    """Every block the trace touched (or the prefill wrote), checked; blocks checked."""
    extents = _extents(p.final != UNTOUCHED)
    for i in range(0, len(extents), 32):
        group = extents[i:i + 32]
        for (lba, n), data in zip(group, disk.call("read_many", group)):
            if isinstance(data, BaseException):
                raise data
            check(data, lba, p.final[lba:lba + n], disk.discarded_reads_zero)
    return sum(n for _, n in extents)


def _run_batch(disk: ReplayDisk, p: Plan, batch: List[int], stamps: Stamps,
               latency: np.ndarray) -> None:
    ops, t0 = p.ops, time.perf_counter()
    reads = [i for i in batch if ops[i].op == tf.READ]
    if reads:
        results = disk.call("read_many", [(ops[i].lba, ops[i].nr) for i in reads])
        latency[reads] = time.perf_counter() - t0
        for i, data in zip(reads, results):
            if isinstance(data, BaseException):
                raise data
            check(data, ops[i].lba, p.expect[i], disk.discarded_reads_zero)
    rest = [i for i in batch if ops[i].op != tf.READ]
    k = 0
    while k < len(rest):
        op = ops[rest[k]]
        if op.op == tf.WRITE:
            run = [rest[k]]
            while k + len(run) < len(rest) and ops[rest[k + len(run)]].op == tf.WRITE:
                run.append(rest[k + len(run)])
            disk.call("write_many", [(ops[j].lba, stamps.blocks(ops[j].lba, ops[j].nr, ops[j].seq))
                                     for j in run])
            k += len(run)
            continue
        if op.op == tf.DISCARD:
            disk.call("discard", op.lba, op.nr)
        elif op.op == tf.WRITE_ZEROES:
            disk.write_zeroes(op.lba, op.nr)
        k += 1
    if len(batch) == 1 and (ops[batch[0]].op == tf.FLUSH or ops[batch[0]].fua):
        disk.call("flush")
    if rest:
        latency[rest] = time.perf_counter() - t0


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q) * 1e6) if len(values) else 0.0


def replay(disk: ReplayDisk, p: Plan, *, reopen: bool = True) -> TraceResult:
    """Prefill, reopen, timed replay (+ final flush), reopen, read-back: one TraceResult."""
    ops = p.ops
    res = TraceResult(p.name, disk.bench.kind, p.depth, requests=len(ops))
    stamps = Stamps(max([o.nr for o in ops] + [MAX_REQUEST_BLOCKS]))
    res.prefill_blocks = prefill(disk, p, stamps)
    if reopen:
        disk.reopen()
    latency = np.zeros(len(ops))
    before = disk.bench.counts()
    cpu0, t0 = time.process_time(), time.perf_counter()
    for batch in p.batches:
        _run_batch(disk, p, batch, stamps, latency)
    disk.call("flush")
    res.seconds, res.cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    delta = disk.bench.counts() - before
    res.device_bytes_written, res.device_bytes_read = delta.bytes_written, delta.bytes_read
    kinds = np.array([o.op for o in ops])
    nbytes = np.array([o.nr for o in ops], dtype=np.int64) * BLOCK_SIZE
    is_read, is_write = kinds == tf.READ, (kinds == tf.WRITE) | (kinds == tf.WRITE_ZEROES)
    res.reads, res.writes = int(is_read.sum()), int(is_write.sum())
    res.flushes = int((kinds == tf.FLUSH).sum())
    res.read_bytes, res.write_bytes = int(nbytes[is_read].sum()), int(nbytes[is_write].sum())
    res.p50_us, res.p99_us = _pct(latency, 50), _pct(latency, 99)
    res.read_p50_us, res.read_p99_us = _pct(latency[is_read], 50), _pct(latency[is_read], 99)
    res.write_p50_us, res.write_p99_us = _pct(latency[is_write], 50), _pct(latency[is_write], 99)
    if reopen:
        disk.reopen()
    res.verified_blocks = read_back(disk, p)
    return res


def _make(kind: str, workdir: str, p: Plan, tag: str) -> ReplayDisk:
    if kind == "sworndisk":
        written = int(p.prefill.sum()) + sum(o.nr for o in p.ops if o.op == tf.WRITE)
        data_bytes = sworndisk_data_bytes(p.nr_blocks, min_bytes=max(32 << 20,
                                                                     written * BLOCK_SIZE * 5 // 4))
        return ReplayDisk(make_sworndisk(workdir, p.nr_blocks, data_bytes, tag))
    return ReplayDisk(make_cryptdisk(workdir, p.nr_blocks, tag))


def load_trace(path: str, limit: int = 0) -> tf.Trace:
    trace = tf.load(path)
    if limit:
        trace.records = trace.records[:limit]
    return trace


def trace_name(path: str) -> str:
    return os.path.basename(path).removesuffix(".xz").removesuffix(".trace")


def replay_file(kind: str, path: str, depths: Sequence[int], workdir: str,
                limit: int = 0) -> List[TraceResult]:
    """Every depth of one trace on one disk kind, each on a fresh disk (a spawned child's
    task: isolate.run_isolated)."""
    trace, name, out = load_trace(path, limit), trace_name(path), []
    for depth in depths:
        p = plan(trace, depth, name)
        disk = _make(kind, workdir, p, f"-{name}-{depth}")
        failed = False
        try:
            out.append(replay(disk, p))
        except Exception as e:         # the error is the result; the other runs go on
            failed = True
            out.append(TraceResult(name, kind, depth, error=f"{type(e).__name__}: {e}"))
        finally:
            disk.bench.close(suppress_errors=failed)
    return out


# --- reporting ------------------------------------------------------------------------------

def rows(results: Sequence[TraceResult]) -> List[List[str]]:
    out = [["trace", "writes", "depth", "disk", "MB/s", "IOPS", "CPU us/req", "dev WA",
            "p50 ms", "p99 ms", "vs CryptDisk"]]
    by_key = {(r.trace, r.depth, r.disk): r for r in results}
    for r in results:
        if r.error:
            out.append([r.trace, "", str(r.depth), DISPLAY_NAMES[r.disk], "FAILED: " + r.error,
                        *[""] * 6])
            continue
        base = by_key.get((r.trace, r.depth, "cryptdisk"))
        ratio = (f"{r.mb_per_s / base.mb_per_s:.2f}x"
                 if r.disk != "cryptdisk" and base and not base.error and base.mb_per_s else "")
        out.append([r.trace, f"{r.write_share:.0%}", str(r.depth), DISPLAY_NAMES[r.disk],
                    f"{r.mb_per_s:.1f}", f"{r.iops:.0f}", f"{r.cpu_us_per_request:.0f}",
                    f"{r.write_amplification:.2f}", f"{r.p50_us / 1e3:.2f}",
                    f"{r.p99_us / 1e3:.2f}", ratio])
    return out


def table_text(results: Sequence[TraceResult]) -> str:
    table = rows(results)
    widths = [max(len(row[c]) for row in table if len(row) > c) for c in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in table)


def markdown(results: Sequence[TraceResult]) -> str:
    table = rows(results)
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)


def write_charts(results: Sequence[dict], outdir: str) -> List[str]:
    """Per depth: MB/s of each trace on both disks, and SwornDisk's ratio (PNG files)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(outdir, exist_ok=True)
    paths = []
    ok = [r for r in results if not r.get("error")]
    for depth in sorted({r["depth"] for r in ok}):
        at = {(r["trace"], r["disk"]): r for r in ok if r["depth"] == depth}
        traces = sorted({t for t, _ in at})
        fig, (ax, bx) = plt.subplots(2, 1, figsize=(max(6, len(traces) * 0.9), 7),
                                     gridspec_kw={"height_ratios": [3, 2]})
        x = np.arange(len(traces))
        for k, kind in enumerate(("sworndisk", "cryptdisk")):
            ax.bar(x + (k - 0.5) * 0.4, [at.get((t, kind), {}).get("mb_per_s", 0) for t in traces],
                   0.4, label=DISPLAY_NAMES[kind])
        ax.set_ylabel("MB/s (log scale)")
        ax.set_yscale("log")
        ax.set_title(f"Trace replay at depth {depth}")
        ax.set_xticks(x, [])
        ax.legend()
        ratios = [at[(t, "sworndisk")]["mb_per_s"] / at[(t, "cryptdisk")]["mb_per_s"]
                  if (t, "sworndisk") in at and (t, "cryptdisk") in at
                  and at[(t, "cryptdisk")]["mb_per_s"] else 0 for t in traces]
        bx.bar(x, ratios, 0.6, color="tab:green")
        bx.axhline(1.0, color="grey", lw=0.8)
        bx.set_ylabel("SwornDisk / CryptDisk")
        bx.set_xticks(x, traces, rotation=35, ha="right", fontsize=8)
        fig.tight_layout()
        path = os.path.join(outdir, f"trace-depth{depth}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


@dataclass
class TraceRun:
    """What `--trace` did: the files, the settings and every result."""
    files: List[str]
    depths: List[int]
    limit: int
    results: List[TraceResult] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"traces": self.files, "depths": self.depths, "request_limit": self.limit,
                "results": [r.to_dict() for r in self.results]}


def run(files: Sequence[str], kinds: Sequence[str], depths: Sequence[int], workdir: str,
        quick: bool, in_process: bool, log: TextIO) -> TraceRun:
    from .isolate import run_isolated
    limit = QUICK_REQUESTS if quick else 0
    out = TraceRun(list(files), list(depths), limit)
    for n, path in enumerate(files):
        for kind in (kinds if n % 2 == 0 else kinds[::-1]):   # neither always second
            print(f"  {DISPLAY_NAMES[kind]}: {trace_name(path)} at depth "
                  f"{', '.join(map(str, depths))} ...", file=log, flush=True)
            outcome = run_isolated(replay_file, kind, path, list(depths), workdir, limit,
                                   in_process=in_process or quick)
            if outcome.error:
                print(outcome.error, file=log)
                out.results.extend(TraceResult(trace_name(path), kind, d, error="child failed: "
                                               + outcome.error.strip().splitlines()[-1])
                                   for d in depths)
            else:
                out.results.extend(outcome.value)
    order = {k: i for i, k in enumerate(("sworndisk", "cryptdisk"))}
    out.results.sort(key=lambda r: (r.trace, r.depth, order[r.disk]))
    return out


def main(args, out: TextIO, log: TextIO) -> int:
    """`python -m tools.bench --trace ...` (cli.main hands over the parsed arguments)."""
    import json

    from .cli import work_directory
    from .disks import sworndisk_unavailable_reason
    files = list(tf.iter_files(args.trace))
    missing = [f for f in files if not os.path.isfile(f)]
    if missing or not files:
        what = missing[0] if missing else "in " + " ".join(args.trace)
        print(f"python -m tools.bench: no trace file {what} (give .trace.xz files or a "
              "directory of them, e.g. tools/trace/data)", file=log)
        return 2
    for f in files:
        try:
            tf.load(f)
        except (tf.TraceFormatError, OSError) as e:
            print(f"python -m tools.bench: {f}: {e}", file=log)
            return 2
    kinds = list(args.disks)
    if "sworndisk" in kinds and sworndisk_unavailable_reason():
        print(f"python -m tools.bench: SwornDisk engine not available "
              f"({sworndisk_unavailable_reason()})", file=log)
        return 2
    with work_directory(args.dir) as workdir:
        done = run(files, kinds, args.depth, workdir, args.quick, args.in_process, log)
    load = os.getloadavg()[0]
    print(f"\ntrace replay: {len(files)} trace(s), depth {', '.join(map(str, args.depth))}"
          f"{f', first {done.limit} requests of each (--quick)' if done.limit else ''}; "
          f"load average {load:.1f} on {os.cpu_count()} CPUs (same-run ratios only)\n", file=out)
    print(table_text(done.results), file=out)
    doc = done.to_json()
    if args.json:
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    if args.plot:
        paths = write_charts(doc["results"], args.plot)
        print(f"\ncharts: {', '.join(paths)}", file=out)
    return 1 if any(r.error for r in done.results) else 0
