"""Turning results into the printed tables and the JSON document."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

from .aging import AgingPlan, AgingResult
from .disks import BLOCK_SIZE, DISPLAY_NAMES
from .isolate import Isolated
from .suite import LABELS, TARGETS, SuiteResult, cpu_ratios, ratios
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
        fastest = {w: max((r.results[w] for r in runs), key=lambda x: x.mb_per_s)
                   for w in runs[-1].results}
        best = replace(runs[-1], results=fastest,
                       prefill=max((r.prefill for r in runs), key=lambda x: x.mb_per_s))
        return cls(best, max(o.rss_peak_kib for o in outcomes),
                   min(o.rss_start_kib for o in outcomes), all(o.isolated for o in outcomes))


@dataclass
class BenchReport:
    """Everything one invocation measured; outcomes hold SuiteResult / AgingResult values."""
    settings: dict
    suite: Dict[str, List[Isolated]] = field(default_factory=dict)   # kind -> one per repeat
    aging: List[AgingRow] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def summaries(self) -> Dict[str, DiskSummary]:
        """Disks all of whose runs completed."""
        return {k: DiskSummary.of(runs) for k, runs in self.suite.items()
                if runs and all(o.error is None for o in runs)}

    def suite_results(self) -> Dict[str, SuiteResult]:
        return {k: s.best for k, s in self.summaries().items()}


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others, columns as wide as their content."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _fmt(x: Optional[float], spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


# -- the micro-benchmark ---------------------------------------------------------------------

def suite_text(report: BenchReport) -> str:
    res = report.suite_results()
    kinds = list(res)
    if not kinds:
        return "no disk completed the benchmark"
    workloads = [w for w in LABELS if any(w in r.results for r in res.values())]
    rat, cpu_rat = ratios(res, workloads), cpu_ratios(res, workloads)

    headers = ["workload"]
    for k in kinds:
        headers += [f"{DISPLAY_NAMES[k]} MB/s", "IOPS"]
    if rat:
        headers += ["ratio", "target", "", "CPU ratio"]
    rows = []
    for w in workloads:
        row = [LABELS[w]]
        for k in kinds:
            r = res[k].results.get(w)
            row += [_fmt(r and r.mb_per_s), _fmt(r and r.iops, ".0f")]
        if rat:
            ok = w in rat and rat[w] >= TARGETS[w]
            row += [_fmt(rat.get(w), ".2f") + "x", f">={TARGETS[w]}x", "ok" if ok else "BELOW",
                    _fmt(cpu_rat.get(w), ".2f") + "x"]
        rows.append(row)
    return table(headers, rows) + "\n\n" + _per_disk_text(report.summaries())


def _per_disk_text(summaries: Dict[str, DiskSummary]) -> str:
    kinds = list(summaries)
    res = {k: s.best for k, s in summaries.items()}
    metrics: List[tuple] = []   # (label, fn(kind) -> str)

    def workload_metric(label: str, name: str, get: Callable[[WorkloadResult], float], spec):
        if any(name in res[k].results for k in kinds):
            metrics.append((label, lambda k: _fmt(
                get(res[k].results[name]) if name in res[k].results else None, spec)))

    for name in LABELS:
        workload_metric(f"CPU us/block, {LABELS[name]}", name, lambda r: r.cpu_us_per_block, ".1f")
    for name in ("randwrite", "seqwrite"):
        workload_metric(f"device WA, {LABELS[name]}", name, lambda r: r.write_amplification, ".3f")
    metrics += [
        ("peak RSS MiB", lambda k: _fmt(summaries[k].rss_peak_kib / 1024)),
        ("RSS before disk MiB", lambda k: _fmt(summaries[k].rss_start_kib / 1024)),
        ("prefill MB/s (untimed)", lambda k: _fmt(res[k].prefill.mb_per_s)),
        ("O_DIRECT", lambda k: "yes" if res[k].direct_io else "NO (page cache)"),
    ]
    headers = ["per disk", *(DISPLAY_NAMES[k] for k in kinds)]
    text = table(headers, [[label, *(fn(k) for k in kinds)] for label, fn in metrics])
    if not all(summaries[k].isolated for k in kinds):
        text += "\n(in-process run: RSS is the whole process's, not per disk)"
    return text


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
    return {"direct_io": r.direct_io, "image_bytes": r.image_bytes,
            "prefill": r.prefill.to_dict(),
            "workloads": {w: x.to_dict() for w, x in r.results.items()},
            "engine_stats": r.engine_stats}


def _aging_dict(r: AgingResult) -> dict:
    return {"error": r.error, "wrong_data": r.wrong_data,
            "engine_write_amplification": r.engine_write_amplification,
            **{p: (getattr(r, p).to_dict() if getattr(r, p) else None)
               for p in ("fill", "warmup", "steady")}}


def to_json(report: BenchReport) -> dict:
    res = report.suite_results()
    return {
        "settings": report.settings,
        "notes": report.notes,
        "suite": {k: {"runs": [_outcome_dict(o, _suite_dict) for o in runs],
                      "best": _suite_dict(res[k]) if k in res else None}
                  for k, runs in report.suite.items()},
        "ratios": ratios(res, list(LABELS)),
        "cpu_ratios": cpu_ratios(res, list(LABELS)),
        "targets": TARGETS,
        "aging": [{"plan": asdict(row.plan),
                   **{k: _outcome_dict(o, _aging_dict) for k, o in row.outcomes.items()}}
                  for row in report.aging],
    }
