"""Turning results into the printed tables and the JSON document."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

from .aging import AgingPlan, AgingResult
from .disks import BLOCK_SIZE, DISPLAY_NAMES
from .isolate import Isolated
from .suite import (CPU_TARGETS, LABELS, RSS_TARGETS_MIB, TARGETS, THREAD_CPU_TARGETS,
                    WORKERS_TARGETS, SuiteResult, cpu_ratios, fastest_possible, ratios,
                    workers_ratios)
from .workloads import WorkloadResult


@dataclass
class AgingRow:
    """One utilisation: the plan both disks ran, and each one's outcome (an AgingResult)."""
    plan: AgingPlan
    outcomes: Dict[str, Isolated] = field(default_factory=dict)


@dataclass
class DiskSummary:
    """A disk's repeated runs folded into one: per workload the fastest run (the one least
    disturbed by other load on the machine; both disks get the same number of tries), and
    the highest peak RSS."""
    best: SuiteResult
    rss_peak_kib: int
    rss_start_kib: int
    isolated: bool

    @classmethod
    def of(cls, outcomes: List[Isolated]) -> "DiskSummary":
        runs: List[SuiteResult] = [o.value for o in outcomes]
        best = replace(runs[-1], results=_fastest([r.results for r in runs]),
                       device=_fastest([r.device for r in runs]),
                       prefill=max((r.prefill for r in runs), key=lambda x: x.mb_per_s))
        return cls(best, max(o.rss_peak_kib for o in outcomes),
                   min(o.rss_start_kib for o in outcomes), all(o.isolated for o in outcomes))


def _cores(report: "BenchReport", auto: SuiteResult) -> int:
    """The cores a run with workers can use: the engine's thread and each worker, at most
    the machine's CPUs."""
    return min(report.settings["cpus"] or 1, 1 + auto.crypto_workers)


def _fastest(per_run: List[Dict[str, WorkloadResult]]) -> Dict[str, WorkloadResult]:
    """Per workload (those of the last run), its fastest run."""
    return {w: max((d[w] for d in per_run), key=lambda x: x.mb_per_s) for w in per_run[-1]}


@dataclass
class BenchReport:
    """Everything one invocation measured; outcomes hold SuiteResult / AgingResult values."""
    settings: dict
    # depth -> kind -> one outcome per repeat
    suite: Dict[int, Dict[str, List[Isolated]]] = field(default_factory=dict)
    aging: List[AgingRow] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    # depth -> SwornDisk's runs with crypto_workers=0 (--scaling), one per repeat
    workers0: Dict[int, List[Isolated]] = field(default_factory=dict)

    @property
    def depths(self) -> List[int]:
        return sorted(self.suite)

    def summaries(self, depth: int) -> Dict[str, DiskSummary]:
        """Per disk, its completed runs at `depth` (a failed run is reported where it
        failed, and makes the exit status 1)."""
        done = {k: [o for o in runs if o.error is None]
                for k, runs in self.suite.get(depth, {}).items()}
        return {k: DiskSummary.of(runs) for k, runs in done.items() if runs}

    def failures(self) -> List[str]:
        """One line per disk and depth with failed runs."""
        return [f"{DISPLAY_NAMES[k]} at depth {d}: {n} of {len(runs)} run(s) failed (the "
                f"error is above); its figures come from the others"
                for d in self.depths for k, runs in self.suite[d].items()
                if (n := sum(o.error is not None for o in runs))]

    def suite_results(self, depth: int) -> Dict[str, SuiteResult]:
        return {k: s.best for k, s in self.summaries(depth).items()}

    def workers0_summary(self, depth: int) -> Optional[DiskSummary]:
        """SwornDisk with crypto_workers=0 at `depth` (--scaling), if a run completed."""
        done = [o for o in self.workers0.get(depth, []) if o.error is None]
        return DiskSummary.of(done) if done else None


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """The first `left` columns left-aligned, the others right-aligned, columns as wide as
    their content."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _fmt(x: Optional[float], spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


# -- the micro-benchmark ---------------------------------------------------------------------

def _verdict(value: Optional[float], meets: Callable[[float], bool], limit) -> str:
    """'ok' or 'BELOW' where there is both a figure and a target, else nothing."""
    if value is None or limit is None:
        return ""
    return "ok" if meets(value) else "BELOW"


def suite_text(report: BenchReport) -> str:
    """Throughput with the ratios and their targets, CPU per block with its targets, and
    the per-disk figures: every depth, one row per (depth, workload)."""
    thr_rows, cpu_rows, kinds = [], [], []
    for depth in report.depths:
        res = report.suite_results(depth)
        kinds += [k for k in res if k not in kinds]
        workloads = [w for w in LABELS if any(w in r.results for r in res.values())]
        rat, cpu_rat = ratios(res, workloads), cpu_ratios(res, workloads)
        for w in workloads:
            got = {k: res[k].results.get(w) for k in res}
            target, ratio = TARGETS.get(depth, {}).get(w), rat.get(w)
            thr_rows.append((depth, w, got, [
                _fmt(ratio, ".2f") + "x" if ratio is not None else "-",
                target.text() if target else "-",
                _verdict(ratio, lambda x: x >= target.minimum, target)]))
            sw = got.get("sworndisk")
            cpu_max = CPU_TARGETS.get(depth, {}).get(w)
            thread_max = THREAD_CPU_TARGETS.get(depth, {}).get(w)
            cpu_rows.append((depth, w, got, [
                _fmt(cpu_rat.get(w), ".2f") + "x" if w in cpu_rat else "-",
                f"<={cpu_max:g}" if cpu_max else "-",
                _verdict(sw and sw.cpu_us_per_block, lambda x: x <= cpu_max, cpu_max),
                _fmt(sw and sw.engine_us_per_block), _fmt(sw and sw.client_us_per_block),
                _fmt(sw and sw.worker_us_per_block),
                f"<={thread_max:g}" if thread_max else "-",
                _verdict(sw and sw.engine_us_per_block, lambda x: x <= thread_max, thread_max)]))
    if not thr_rows:
        return "no disk completed the benchmark"

    def rows_of(rows, cells):
        return [[str(d), LABELS[w], *(c for k in kinds for c in cells(got.get(k))), *extra]
                for d, w, got, extra in rows]
    names = [DISPLAY_NAMES[k] for k in kinds]
    thr = table(["depth", "workload", *(h for n in names for h in (f"{n} MB/s", "IOPS")),
                 "ratio", "target", ""],
                rows_of(thr_rows, lambda r: [_fmt(r and r.mb_per_s), _fmt(r and r.iops, ".0f")]),
                left=2)
    cpu = table(["depth", "workload", *(f"{n} us/blk" for n in names), "CPU ratio",
                 "SwornDisk target", "", "engine thread", "client", "workers",
                 "thread target", ""],
                rows_of(cpu_rows, lambda r: [_fmt(r and r.cpu_us_per_block)]), left=2)
    failed = "".join(f"\nnote: {line}" for line in report.failures())
    return (f"{thr}{failed}\n\nCPU time per 4 KiB block (process CPU, all threads; CPU ratio = "
            f"CryptDisk's / SwornDisk's; then, of the thread driving SwornDisk, the engine's "
            f"share and the benchmark loop's own (client: the same loop on a disk that does "
            f"nothing), and its crypto worker processes)\n{cpu}\n\n{_per_disk_text(report)}")


def scaling_text(report: BenchReport) -> str:
    """--scaling: SwornDisk with 0 crypto workers and with its workers (the run's
    --crypto-workers, automatic by default) against CryptDisk, at every depth, with the
    issue's targets; then the memory of the engine's process and its workers."""
    rows, mem_rows, ceiling_rows = [], [], []
    for depth in report.depths:
        res = report.suite_results(depth)
        auto, crypt = res.get("sworndisk"), res.get("cryptdisk")
        inline_summary = report.workers0_summary(depth)
        inline = inline_summary.best if inline_summary else None
        if auto is None or inline is None:
            continue
        workloads = [w for w in LABELS if w in auto.results and w in inline.results]
        vs_crypt = ratios(res, workloads)
        vs_inline = workers_ratios(auto, inline, workloads)
        for w in workloads:
            a, i = auto.results[w], inline.results[w]
            c = crypt.results.get(w) if crypt else None
            target, wmin = TARGETS.get(depth, {}).get(w), WORKERS_TARGETS.get(depth, {}).get(w)
            tmax = THREAD_CPU_TARGETS.get(depth, {}).get(w)
            rows.append([str(depth), LABELS[w],
                         _fmt(i.mb_per_s), _fmt(i.engine_us_per_block),
                         _fmt(a.mb_per_s), _fmt(a.engine_us_per_block),
                         _fmt(a.worker_us_per_block), _fmt(a.client_us_per_block),
                         _fmt(c and c.mb_per_s),
                         _fmt(vs_crypt.get(w), ".2f") + "x" if w in vs_crypt else "-",
                         target.text() if target else "-",
                         _verdict(vs_crypt.get(w), lambda x: x >= target.minimum, target),
                         _fmt(vs_inline.get(w), ".2f") + "x" if w in vs_inline else "-",
                         f">={wmin:g}x" if wmin else "-",
                         _verdict(vs_inline.get(w), lambda x: x >= wmin, wmin),
                         f"<={tmax:g}" if tmax else "-",
                         _verdict(a.engine_us_per_block, lambda x: x <= tmax, tmax)])
        ceiling_rows += _ceiling_rows(depth, ceilings(inline, crypt, _cores(report, auto)))
        summary = report.summaries(depth)["sworndisk"]
        workers = auto.workers_rss_peak_kib / 1024
        total = summary.rss_peak_kib / 1024 + workers
        limit = RSS_TARGETS_MIB.get(depth)
        mem_rows.append([str(depth), str(auto.crypto_workers), _fmt(summary.rss_peak_kib / 1024),
                         _fmt(workers), _fmt(total), f"<={limit:g}" if limit else "-",
                         _verdict(total, lambda x: x <= limit, limit)])
    if not rows:
        return "scaling: no depth has both a SwornDisk run with workers and one without"
    w = next(r.best.crypto_workers for d in report.depths
             for k, r in report.summaries(d).items() if k == "sworndisk")
    head = table(["depth", "workload", "w0 MB/s", "w0 thread", f"w{w} MB/s", f"w{w} thread",
                  f"w{w} workers", "client", "CryptDisk MB/s", "vs CryptDisk", "target", "",
                  "vs w0", "target", "", "thread target", ""], rows, left=2)
    mem = table(["depth", "workers", "engine MiB", "workers MiB", "together MiB", "target", ""],
                mem_rows, left=1)
    return (f"scaling: SwornDisk with 0 crypto workers (w0: sealing and verifying in the "
            f"engine's thread) and with {w} (w{w}); MB/s, and CPU us per 4 KiB block on the "
            f"engine's thread (the driving thread's CPU less the benchmark loop's own, "
            f"'client', measured on a disk that does nothing) and in the workers\n{head}\n\npeak RSS, SwornDisk with its "
            f"workers (the engine process's peak + the sum of its workers' VmHWM)\n{mem}"
            f"{_ceilings_text(ceiling_rows)}")


# RawDisk.together at least this: a batch's reads complete at once, and for requests of
# one block (which no reader can split into smaller reads to verify the first meanwhile)
# fastest_possible is a bound; else the device's time can overlap work on the data
TOGETHER = 0.9


@dataclass(frozen=True)
class Ceiling:
    """What more cores could give a read workload at most (suite.fastest_possible)."""
    device_mb_per_s: float     # the same requests straight from CryptDisk's image
    device_share: float        # of w0's time: what no core can take off a batch
    together: float            # RawDisk.together
    request_bytes: int
    cores: int
    most_mb_per_s: float
    vs_w0: float
    vs_cryptdisk: Optional[float]

    @property
    def bound(self) -> bool:
        return self.together >= TOGETHER and self.request_bytes == BLOCK_SIZE


def ceilings(inline: SuiteResult, crypt: Optional[SuiteResult], cores: int
             ) -> Dict[str, Ceiling]:
    """Per read workload that CryptDisk also ran straight from its image, its Ceiling."""
    out = {}
    for w, device in (crypt.device.items() if crypt else ()):
        i, c = inline.results.get(w), crypt.results.get(w)
        if i is None or not (i.mb_per_s and device.mb_per_s):
            continue
        best = fastest_possible(i, device, cores)
        out[w] = Ceiling(device.mb_per_s, i.mb_per_s / device.mb_per_s, device.together,
                         device.result.user_bytes // device.result.ops, cores, best,
                         best / i.mb_per_s,
                         best / c.mb_per_s if c and c.mb_per_s else None)
    return out


def _ceiling_rows(depth: int, found: Dict[str, Ceiling]) -> List[List[str]]:
    def verdict(x: Optional[float], minimum: Optional[float]) -> str:
        return "" if x is None or not minimum else ("reachable" if x >= minimum else "ABOVE")
    rows = []
    for w in (w for w in LABELS if w in found):
        c = found[w]
        wmin, target = WORKERS_TARGETS.get(depth, {}).get(w), TARGETS.get(depth, {}).get(w)
        row = [str(depth), LABELS[w], _fmt(c.device_mb_per_s), f"{100 * c.together:.0f}%",
               f"{100 * c.device_share:.0f}%", str(c.cores)]
        if c.bound:
            row += [_fmt(c.most_mb_per_s), f"{c.vs_w0:.2f}x", f">={wmin:g}x" if wmin else "-",
                    verdict(c.vs_w0, wmin),
                    _fmt(c.vs_cryptdisk, ".2f") + "x" if c.vs_cryptdisk else "-",
                    target.text() if target else "-",
                    verdict(c.vs_cryptdisk, target.minimum if target else None)]
        else:
            row += ["-", "-", "-", "no bound", "-", "-", ""]
        rows.append(row)
    return rows


def _ceilings_text(rows: List[List[str]]) -> str:
    if not rows:
        return ""
    head = table(["depth", "workload", "device MB/s", "first done at", "device share of w0",
                  "cores", "most MB/s", "most vs w0", "target", "", "most vs CryptDisk",
                  "target", ""], rows, left=2)
    return ("\n\nwhat more cores could give reads at most (Amdahl): a batch of `depth` "
            "requests is read and answered before the next is issued; the same reads "
            "straight from CryptDisk's image, no index and no crypto, give the device's time "
            "per batch and when in it the first read completes. Where the reads complete "
            f"together (first done at >= {100 * TOGETHER:.0f}% of the batch), no work on "
            "the data overlaps the device's time, and at best the rest of w0's time is split "
            "perfectly over the cores (the engine's thread and its workers, at most the "
            "CPUs); each request is one block, so no reader can split it to verify a part "
            "while the rest is read. ABOVE: the target asks more than that; no bound: "
            "larger requests, or reads that complete one after another, which a reader "
            f"can overlap with the verification\n{head}")


def _per_disk_text(report: BenchReport) -> str:
    """Device traffic, memory and setup per disk and depth."""
    columns = [(d, k, s) for d in report.depths for k, s in report.summaries(d).items()]
    metrics: List[tuple] = []   # (label, fn(summary) -> str)
    for name in ("randwrite", "seqwrite"):
        if any(name in s.best.results for _, _, s in columns):
            metrics.append((f"device WA, {LABELS[name]}", lambda s, name=name: _fmt(
                s.best.results[name].write_amplification if name in s.best.results else None,
                ".3f")))
    metrics += [
        ("peak RSS MiB", lambda s: _fmt(s.rss_peak_kib / 1024)),
        ("crypto workers", lambda s: str(s.best.crypto_workers)),
        ("workers' peak RSS MiB", lambda s: _fmt(s.best.workers_rss_peak_kib / 1024)),
        ("RSS before disk MiB", lambda s: _fmt(s.rss_start_kib / 1024)),
        ("prefill MB/s (untimed)", lambda s: _fmt(s.best.prefill.mb_per_s)),
        ("O_DIRECT", lambda s: "yes" if s.best.direct_io else "NO (page cache)"),
    ]
    headers = ["per disk", *(f"{DISPLAY_NAMES[k]} d{d}" for d, k, _ in columns)]
    text = table(headers, [[label, *(fn(s) for _, _, s in columns)] for label, fn in metrics])
    if not all(s.isolated for _, _, s in columns):
        text += "\n(in-process run: RSS is the whole process's, not per disk)"
    return text


def profiles_text(report: BenchReport) -> str:
    """Each disk's profiled workloads at each depth (from its first complete run)."""
    parts = []
    for depth in report.depths:
        for kind, runs in report.suite[depth].items():
            run = next((o.value for o in runs if o.error is None), None)
            for w, prof in (run.profiles.items() if run else ()):
                cpu = run.results[w].cpu_us_per_block
                parts.append(prof.text(f"{DISPLAY_NAMES[kind]}, {LABELS[w]}, depth {depth} "
                                       f"(CPU {cpu:.1f} us/block)"))
    return "\n\n".join(parts)


# -- the aging run ----------------------------------------------------------------------------

def aging_text(report: BenchReport) -> str:
    if not report.aging:
        return ""
    kinds = list(report.aging[0].outcomes)
    headers = ["util", "live MiB"]
    for k in kinds:
        headers += [f"{DISPLAY_NAMES[k]} MB/s", "IOPS", "WA"]
    if "sworndisk" in kinds:
        headers.append("WA (engine)")
    if len(kinds) == 2:
        headers.append("ratio")
    rows, notes = [], []
    for aging_row in report.aging:
        plan, per_kind = aging_row.plan, aging_row.outcomes
        live_mib = plan.live_blocks * BLOCK_SIZE / (1 << 20)
        row = [f"{round(plan.utilisation * 100)}%", _fmt(live_mib, ".0f")]
        measured = {}
        for k in kinds:
            outcome = per_kind[k]
            r: Optional[AgingResult] = outcome.value if outcome.error is None else None
            m = r.measured if r else None
            measured[k] = m
            row += [_fmt(m and m.mb_per_s), _fmt(m and m.iops, ".0f"),
                    _fmt(m and m.write_amplification, ".3f")]
            if outcome.error:
                notes.append(f"{row[0]} {DISPLAY_NAMES[k]}: failed:\n{outcome.error}")
            elif r.error:
                notes.append(f"{row[0]} {DISPLAY_NAMES[k]}: {r.error}")
            elif r.steady is None:
                notes.append(f"{row[0]} {DISPLAY_NAMES[k]}: no steady phase (passes <= 1); "
                             "warm-up reported")
        if "sworndisk" in kinds:
            r = per_kind["sworndisk"].value
            row.append(_fmt(r.engine_write_amplification if r else None, ".3f"))
        if len(kinds) == 2:
            sw, cd = measured.get("sworndisk"), measured.get("cryptdisk")
            row.append(_fmt(sw.mb_per_s / cd.mb_per_s, ".2f") + "x"
                       if sw and cd and cd.mb_per_s else "-")
        rows.append(row)
    text = table(headers, rows)
    return text + ("\n" + "\n".join(notes) if notes else "")


# -- JSON -------------------------------------------------------------------------------------

def _outcome_dict(outcome: Isolated, body: Callable[[object], dict]) -> dict:
    d = {"rss_peak_kib": outcome.rss_peak_kib, "rss_start_kib": outcome.rss_start_kib,
         "isolated": outcome.isolated, "error": outcome.error}
    if outcome.error is None:
        d.update(body(outcome.value))
    return d


def _suite_dict(r: SuiteResult) -> dict:
    return {"depth": r.depth, "direct_io": r.direct_io, "image_bytes": r.image_bytes,
            "crypto_workers": r.crypto_workers, "workers_rss_peak_kib": r.workers_rss_peak_kib,
            "prefill": r.prefill.to_dict(),
            "workloads": {w: x.to_dict() for w, x in r.results.items()},
            "engine_stats": r.engine_stats,
            "profiles": {w: asdict(p) for w, p in r.profiles.items()},
            "device": {w: x.to_dict() for w, x in r.device.items()}}


def _depth_dict(report: BenchReport, depth: int) -> dict:
    res = report.suite_results(depth)
    return {"depth": depth,
            "disks": {k: {"runs": [_outcome_dict(o, _suite_dict) for o in runs],
                          "best": _suite_dict(res[k]) if k in res else None}
                      for k, runs in report.suite[depth].items()},
            "ratios": ratios(res, list(LABELS)),
            "cpu_ratios": cpu_ratios(res, list(LABELS)),
            "targets": {w: asdict(t) for w, t in TARGETS.get(depth, {}).items()},
            "cpu_targets_us": CPU_TARGETS.get(depth, {}),
            "thread_cpu_targets_us": THREAD_CPU_TARGETS.get(depth, {}),
            **_workers0_dict(report, depth, res)}


def _workers0_dict(report: BenchReport, depth: int, res: Dict[str, SuiteResult]) -> dict:
    """--scaling: the crypto_workers=0 runs, and the ratios to them."""
    if depth not in report.workers0:
        return {}
    summary = report.workers0_summary(depth)
    best = summary.best if summary else None
    return {"workers0": {"runs": [_outcome_dict(o, _suite_dict) for o in report.workers0[depth]],
                         "best": _suite_dict(best) if best else None},
            "workers_ratios": workers_ratios(res.get("sworndisk"), best, list(LABELS)),
            "ceilings": ({w: {**asdict(c), "bound": c.bound} for w, c in ceilings(
                best, res.get("cryptdisk"), _cores(report, res["sworndisk"])).items()}
                if best and "sworndisk" in res else {}),
            "workers_targets": WORKERS_TARGETS.get(depth, {}),
            "rss_target_mib": RSS_TARGETS_MIB.get(depth)}


def _aging_dict(r: AgingResult) -> dict:
    return {"error": r.error, "wrong_data": r.wrong_data,
            "engine_write_amplification": r.engine_write_amplification,
            **{p: (getattr(r, p).to_dict() if getattr(r, p) else None)
               for p in ("fill", "warmup", "steady")}}


def to_json(report: BenchReport) -> dict:
    return {
        "settings": report.settings,
        "notes": report.notes,
        "suite": [_depth_dict(report, d) for d in report.depths],
        "aging": [{"plan": asdict(row.plan),
                   **{k: _outcome_dict(o, _aging_dict) for k, o in row.outcomes.items()}}
                  for row in report.aging],
    }
