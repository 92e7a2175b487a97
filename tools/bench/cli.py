"""Command line: `python -m tools.bench [--quick] [--depth 1,32] [--aging] [--json [PATH]]
[--plot DIR] ...`.

Runs each disk kind's workloads at each depth in its own spawned process (see isolate.py),
on sparse image files in a fresh directory under --dir (default /var/tmp: a real
filesystem, where O_DIRECT works, unlike tmpfs), prints the tables and deletes the
directory. `--plot` draws charts of the results (plot.py); with `--from-json` it draws
them from an earlier run's JSON instead of running anything.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Iterator, List, Optional, TextIO

from . import plot
from .aging import AgingParams, make_plan, run_aging
from .disks import DISK_KINDS, DISPLAY_NAMES, sworndisk_unavailable_reason
from .isolate import Isolated, run_isolated
from .profiling import SORTS
from .report import (AgingRow, BenchReport, aging_text, profiles_text, scaling_text,
                     suite_text, to_json)
from .suite import DEFAULT_DEPTHS, WORKLOADS, SuiteParams, run_suite

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class Preset:
    """Default sizes: the full run takes ~1-3 minutes on 2 cores, --quick ~15 s; the aging
    run ~3-5 minutes more, ~30 s with --quick."""
    size: int
    ops: int
    seq_size: int
    repeat: int
    aging_size: int
    aging_passes: float


FULL = Preset(size=1 << 30, ops=60_000, seq_size=512 << 20, repeat=2,
              aging_size=384 << 20, aging_passes=3.0)
QUICK = Preset(size=256 << 20, ops=10_000, seq_size=64 << 20, repeat=1,
               aging_size=64 << 20, aging_passes=2.5)


def parse_size(text: str) -> int:
    """'1G', '256M', '64k', '4096' -> bytes, a positive multiple of 4 KiB."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        n = int(float(t[:len(t) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if n <= 0 or n % 4096:
        raise argparse.ArgumentTypeError(f"size must be a positive multiple of 4 KiB: {text!r}")
    return n


def _csv(choices):
    def parse(text: str) -> List[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}")
        return items
    return parse


def _utilisations(text: str) -> List[float]:
    try:
        us = [float(x) / (100 if float(x) > 1 else 1) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of utilisations: {text!r}") from None
    if not all(0 < u < 1 for u in us):
        raise argparse.ArgumentTypeError("utilisations must be in (0, 1) or (0, 100)%")
    return us


def _depths(text: str) -> List[int]:
    try:
        depths = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of depths: {text!r}") from None
    if not depths or not all(1 <= d <= 4096 for d in depths):
        raise argparse.ArgumentTypeError(f"depths must be integers in [1, 4096]: {text!r}")
    return depths


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 64:
        raise argparse.ArgumentTypeError(f"crypto workers must be an integer in [0, 64] "
                                         f"(0: in the engine's thread): {text!r}")
    return n


class _Parser(argparse.ArgumentParser):
    """Bad input is one line on stderr and exit status 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (--help for usage)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m tools.bench",
        description="SwornDisk vs CryptDisk (AES-XTS in place) on O_DIRECT image files.")
    p.add_argument("--quick", action="store_true", help="small sizes: a ~15 s smoke run")
    p.add_argument("--size", type=parse_size, help="logical region (default 1G; quick 256M)")
    p.add_argument("--ops", type=int, help="random 4 KiB ops per random workload "
                                           "(default 60000; quick 10000)")
    p.add_argument("--seq-size", type=parse_size, help="sequential bytes (default 512M; "
                                                       "quick 64M)")
    p.add_argument("--repeat", type=int, help="run each disk's workloads N times, alternating "
                                              "disks, and report the best (default 2; quick 1)")
    p.add_argument("--depth", type=_depths, default=list(DEFAULT_DEPTHS), metavar="N[,N...]",
                   help="requests per batch: SwornDisk reads a batch with one read_many and "
                        "writes it with one write_many, CryptDisk submits it through "
                        "io_uring; each depth on a fresh disk (default 1,32)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--disks", type=_csv(DISK_KINDS), default=list(DISK_KINDS),
                   help="comma list of sworndisk,cryptdisk (default both)")
    p.add_argument("--workloads", type=_csv(WORKLOADS), default=list(WORKLOADS),
                   help=f"comma list of {','.join(WORKLOADS)} (default all)")
    p.add_argument("--tight-data", action="store_true",
                   help="give SwornDisk only the data image its logical size needs (the run "
                        "then includes segment cleaning); default: room for every write")
    p.add_argument("--crypto-workers", type=_workers, metavar="N",
                   help="SwornDisk's crypto worker processes (Config.crypto_workers): 0 seals "
                        "and verifies in the engine's thread (default: automatic)")
    p.add_argument("--scaling", action="store_true",
                   help="also run SwornDisk with --crypto-workers 0 at each depth and print "
                        "the scaling table: MB/s, ratios to CryptDisk and to 0 workers, CPU "
                        "per block on the engine's thread and in the workers")
    p.add_argument("--warm-reads", action="store_true",
                   help="read right after writing (default: close and reopen each disk "
                        "before each read workload, as after a reboot)")
    p.add_argument("--dir", default="/var/tmp",
                   help="where the temporary image directory goes (default /var/tmp)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write results as JSON to PATH (no PATH: stdout, tables to stderr)")
    p.add_argument("--plot", metavar="DIR",
                   help="write PNG charts of the results to DIR (needs matplotlib: "
                        "pip install -e '.[plot]')")
    p.add_argument("--from-json", metavar="PATH",
                   help="with --plot: chart the JSON of an earlier run instead of running")
    p.add_argument("--trace", nargs="+", action="extend", metavar="FILE|DIR",
                   help="replay block traces (tools/trace/data) on both disks at each --depth "
                        "instead of the synthetic workloads (tools/bench/trace.py)")
    g = p.add_argument_group("aging (random overwrites at high utilisation)")
    g.add_argument("--aging", action="store_true", help="also run the aging benchmark")
    g.add_argument("--aging-only", action="store_true", help="run only the aging benchmark")
    g.add_argument("--aging-size", type=parse_size,
                   help="data device size D (default 384M; quick 64M)")
    g.add_argument("--aging-passes", type=float,
                   help="overwrite k x D bytes, the first D is warm-up (default 3; quick 2.5)")
    g.add_argument("--utilisations", type=_utilisations, default=[0.5, 0.7, 0.9],
                   help="comma list (default 50,70,90)")
    d = p.add_argument_group("diagnostics")
    d.add_argument("--in-process", action="store_true",
                   help="run everything in this process (for cProfile/pdb; RSS not per disk)")
    d.add_argument("--profile", type=int, nargs="?", const=25, default=0, metavar="LINES",
                   help="cProfile each timed workload at each depth, print its top LINES "
                        "functions in us per block")
    d.add_argument("--profile-sort", choices=SORTS, default="own",
                   help="order the profile by own time (default) or cumulative time")
    return p


def _fs_type(path: str) -> str:
    """The filesystem type holding `path` (longest matching mount point in /proc/mounts)."""
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


@contextmanager
def work_directory(base: str) -> Iterator[str]:
    """A fresh directory under `base`, removed with everything in it afterwards."""
    os.makedirs(base, exist_ok=True)
    path = tempfile.mkdtemp(prefix="sworndisk-bench-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Runner:
    """Carries out one invocation: picks the disks, runs each isolated, collects a report."""

    def __init__(self, args: argparse.Namespace, log: TextIO):
        self.args, self.log = args, log
        preset = QUICK if args.quick else FULL
        self.suite = SuiteParams(
            region_bytes=args.size or preset.size, rand_ops=args.ops or preset.ops,
            seq_bytes=args.seq_size or preset.seq_size, seed=args.seed,
            workloads=tuple(args.workloads), profile_lines=args.profile,
            profile_sort=args.profile_sort, tight_data=args.tight_data,
            crypto_workers=args.crypto_workers, warm_reads=args.warm_reads)
        self.depths = list(args.depth)
        self.repeat = max(1, args.repeat or preset.repeat)
        self.aging = AgingParams(
            data_bytes=args.aging_size or preset.aging_size,
            passes=args.aging_passes or preset.aging_passes,
            utilisations=tuple(args.utilisations))
        self.report = BenchReport(settings={})
        self.kinds = self._select_kinds()

    def _select_kinds(self) -> List[str]:
        reason = sworndisk_unavailable_reason() if "sworndisk" in self.args.disks else None
        if reason is None:
            return list(self.args.disks)
        self.report.notes.append(f"SwornDisk engine not available ({reason}): "
                                 "CryptDisk baseline only")
        return [k for k in self.args.disks if k != "sworndisk"]

    def _run(self, what: str, fn, *args) -> Isolated:
        print(f"  {what} ...", file=self.log, flush=True)
        outcome = run_isolated(fn, *args, in_process=self.args.in_process)
        if outcome.error:
            print(f"  {what} FAILED:\n{outcome.error}", file=self.log, flush=True)
        return outcome

    def run(self) -> BenchReport:
        kinds = self.kinds
        with work_directory(self.args.dir) as workdir:
            self.report.settings = self._settings(workdir, kinds)
            self._warn_if_cramped(workdir)
            if not self.args.aging_only:
                for rep in range(self.repeat):
                    for depth in self.depths:
                        params = replace(self.suite, depth=depth)
                        runs = self.report.suite.setdefault(depth, {})
                        # alternate the order so neither disk always runs on a warmer machine
                        for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
                            runs.setdefault(kind, []).append(self._run(
                                f"{DISPLAY_NAMES[kind]}: workloads at depth {depth} "
                                f"(run {rep + 1}/{self.repeat})", run_suite, kind, workdir,
                                params))
                        if self.args.scaling and "sworndisk" in kinds:
                            self.report.workers0.setdefault(depth, []).append(self._run(
                                f"SwornDisk, crypto_workers=0: workloads at depth {depth} "
                                f"(run {rep + 1}/{self.repeat})", run_suite, "sworndisk",
                                workdir, replace(params, crypto_workers=0)))
            if self.args.aging or self.args.aging_only:
                for u in self.aging.utilisations:
                    row = AgingRow(make_plan(self.aging, u, "sworndisk" in kinds))
                    for kind in kinds:
                        row.outcomes[kind] = self._run(
                            f"{DISPLAY_NAMES[kind]}: aging at {u:.0%}", run_aging,
                            kind, workdir, row.plan)
                    self.report.aging.append(row)
        self.report.settings["loadavg_end"] = os.getloadavg()[0]
        return self.report

    def _settings(self, workdir: str, kinds: List[str]) -> dict:
        import cryptography
        return {"disks": kinds, "suite": asdict(self.suite), "depths": self.depths,
                "repeat": self.repeat,
                "aging": asdict(self.aging), "isolated": not self.args.in_process,
                "dir": workdir, "filesystem": _fs_type(os.path.realpath(workdir)),
                "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0],
                "python": platform.python_version(), "cryptography": cryptography.__version__}

    def _warn_if_cramped(self, workdir: str) -> None:
        """Notes on conditions that make the numbers less trustworthy."""
        load, cpus = self.report.settings["loadavg_start"], os.cpu_count() or 1
        if load > 0.5 * cpus:
            self.report.notes.append(f"load average {load:.1f} on {cpus} CPUs at start: other "
                                     "work competes for the CPUs and the disk, expect noise")
        fs = self.report.settings["filesystem"]
        if fs in ("tmpfs", "ramfs"):
            self.report.notes.append(f"{workdir} is on {fs}: no O_DIRECT, results are RAM speed")
        need = 2 * self.suite.user_bytes_written() + 2 * self.aging.data_bytes
        free = shutil.disk_usage(workdir).free
        if free < need:
            self.report.notes.append(f"only {free >> 20} MiB free in {workdir}; "
                                     f"the run may write up to {need >> 20} MiB")


def _suite_headline(settings: dict) -> str:
    s = settings["suite"]
    workers = s.get("crypto_workers")
    return (f"workloads: region {s['region_bytes'] >> 20} MiB, {s['rand_ops']} random 4 KiB ops, "
            f"{s['seq_bytes'] >> 20} MiB sequential in {s['request_bytes'] >> 10} KiB requests, "
            f"at depth {', '.join(map(str, settings['depths']))}; best of {settings['repeat']} "
            f"run(s) per disk and depth; SwornDisk crypto workers: "
            f"{'automatic' if workers is None else workers}; reads "
            f"{'right after writing (warm)' if s.get('warm_reads') else 'on disks closed and reopened first'}")


def _aging_headline(settings: dict) -> str:
    a = settings["aging"]
    return (f"aging: random 4 KiB overwrites, data device {a['data_bytes'] >> 20} MiB, "
            f"{a['passes']} passes (the first is warm-up), flush every {a['flush_every']} writes")


def print_report(report: BenchReport, out: TextIO) -> None:
    st = report.settings
    load = f"{st['loadavg_start']:.1f}"
    if "loadavg_end" in st:
        load += f" at start, {st['loadavg_end']:.1f} at end"
    print(f"\nSwornDisk engine benchmark: images in {st['dir']} ({st['filesystem']}), "
          f"{st['cpus']} CPUs, load average {load}", file=out)
    for note in report.notes:
        print(f"note: {note}", file=out)
    if report.suite:
        print(f"\n{_suite_headline(st)}\n{suite_text(report)}", file=out)
        if report.workers0:
            print(f"\n{scaling_text(report)}", file=out)
        profiles = profiles_text(report)
        if profiles:
            print(f"\nprofiles (first run of each disk and depth; its timings include the "
                  f"profiler's overhead):\n\n{profiles}", file=out)
    if report.aging:
        print(f"\n{_aging_headline(st)}\n{aging_text(report)}", file=out)


def _failed(report: BenchReport) -> bool:
    """A run that crashed, or a disk that returned wrong data (running out of space while
    aging is a result, not a failure)."""
    aging = [o for row in report.aging for o in row.outcomes.values()]
    suite = [o for by_kind in report.suite.values() for runs in by_kind.values() for o in runs]
    suite += [o for runs in report.workers0.values() for o in runs]
    return (any(o.error for o in [*suite, *aging])
            or any(o.value.wrong_data for o in aging if o.error is None))


def _load_json(path: str) -> dict:
    """An earlier run's --json document, or SystemExit with one line saying why not."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"python -m tools.bench: cannot read {path}: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("suite", []), list):
        raise SystemExit(f"python -m tools.bench: {path} is not the JSON of a benchmark run "
                         "(of this version)")
    return doc


def _plot(doc: dict, outdir: str, out: TextIO) -> None:
    try:
        paths = plot.write_charts(doc, outdir)
    except OSError as e:
        raise SystemExit(f"python -m tools.bench: cannot write charts to {outdir}: {e}") from None
    print(f"\ncharts: {', '.join(paths)}" if paths else "\nno results to chart", file=out)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.from_json and not args.plot:
        print("python -m tools.bench: --from-json only goes with --plot DIR", file=sys.stderr)
        return 2
    if args.plot and plot.missing():
        print(f"python -m tools.bench: {plot.missing()}", file=sys.stderr)
        return 2
    if args.from_json:
        _plot(_load_json(args.from_json), args.plot, sys.stdout)
        return 0
    if args.trace:
        from . import trace
        return trace.main(args, sys.stderr if args.json == "-" else sys.stdout, sys.stderr)
    json_to_stdout = args.json == "-"
    human = sys.stderr if json_to_stdout else sys.stdout
    runner = Runner(args, sys.stderr)
    if not runner.kinds:
        print("nothing to run: " + "; ".join(runner.report.notes), file=sys.stderr)
        return 2
    report = runner.run()
    print_report(report, human)
    doc_text = json.dumps(to_json(report), indent=2, default=str)
    if args.json:
        if json_to_stdout:
            print(doc_text)
        else:
            with open(args.json, "w") as f:
                f.write(doc_text + "\n")
            print(f"\nJSON written to {args.json}", file=human)
    if args.plot:
        _plot(json.loads(doc_text), args.plot, human)   # the same document --from-json reads
    return 1 if _failed(report) else 0
