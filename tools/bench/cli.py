"""Command line: `python -m tools.bench [--quick] [--aging] [--json [PATH]] ...`.

Runs each disk kind's workloads in its own spawned process (see isolate.py), on sparse
image files in a fresh directory under --dir (default /var/tmp: a real filesystem, where
O_DIRECT works, unlike tmpfs), prints the tables and deletes the directory.
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
from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional, TextIO

from .aging import AgingParams, make_plan, run_aging
from .disks import DISK_KINDS, DISPLAY_NAMES, sworndisk_unavailable_reason
from .isolate import Isolated, run_isolated
from .report import AgingRow, BenchReport, aging_text, suite_text, to_json
from .suite import WORKLOADS, SuiteParams, run_suite

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--disks", type=_csv(DISK_KINDS), default=list(DISK_KINDS),
                   help="comma list of sworndisk,cryptdisk (default both)")
    p.add_argument("--workloads", type=_csv(WORKLOADS), default=list(WORKLOADS),
                   help=f"comma list of {','.join(WORKLOADS)} (default all)")
    p.add_argument("--tight-data", action="store_true",
                   help="give SwornDisk only the data image its logical size needs (the run "
                        "then includes segment cleaning); default: room for every write")
    p.add_argument("--dir", default="/var/tmp",
                   help="where the temporary image directory goes (default /var/tmp)")
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help="write results as JSON to PATH (no PATH: stdout, tables to stderr)")
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
                   help="cProfile the timed workloads, print the top LINES by cumulative time")
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
            tight_data=args.tight_data)
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
                    # alternate the order so neither disk always runs on a warmer machine
                    for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
                        self.report.suite.setdefault(kind, []).append(self._run(
                            f"{DISPLAY_NAMES[kind]}: workloads (run {rep + 1}/{self.repeat})",
                            run_suite, kind, workdir, self.suite))
            if self.args.aging or self.args.aging_only:
                for u in self.aging.utilisations:
                    row = AgingRow(make_plan(self.aging, u, "sworndisk" in kinds))
                    for kind in kinds:
                        row.outcomes[kind] = self._run(
                            f"{DISPLAY_NAMES[kind]}: aging at {u:.0%}", run_aging,
                            kind, workdir, row.plan)
                    self.report.aging.append(row)
        return self.report

    def _settings(self, workdir: str, kinds: List[str]) -> dict:
        import cryptography
        return {"disks": kinds, "suite": asdict(self.suite), "repeat": self.repeat,
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
    return (f"workloads: region {s['region_bytes'] >> 20} MiB, {s['rand_ops']} random 4 KiB ops, "
            f"{s['seq_bytes'] >> 20} MiB sequential in {s['request_bytes'] >> 10} KiB requests; "
            f"best of {settings['repeat']} run(s) per disk")


def _aging_headline(settings: dict) -> str:
    a = settings["aging"]
    return (f"aging: random 4 KiB overwrites, data device {a['data_bytes'] >> 20} MiB, "
            f"{a['passes']} passes (the first is warm-up), flush every {a['flush_every']} writes")


def print_report(report: BenchReport, out: TextIO) -> None:
    st = report.settings
    print(f"\nSwornDisk engine benchmark: images in {st['dir']} ({st['filesystem']}), "
          f"{st['cpus']} CPUs, load average {st['loadavg_start']:.1f}", file=out)
    for note in report.notes:
        print(f"note: {note}", file=out)
    if report.suite:
        print(f"\n{_suite_headline(st)}\n{suite_text(report)}", file=out)
        for kind, runs in report.suite.items():
            for outcome in runs:
                if outcome.error is None and outcome.value.profile:
                    print(f"\nprofile of {DISPLAY_NAMES[kind]}'s timed workloads:\n"
                          f"{outcome.value.profile}", file=out)
    if report.aging:
        print(f"\n{_aging_headline(st)}\n{aging_text(report)}", file=out)


def _failed(report: BenchReport) -> bool:
    """A run that crashed, or a disk that returned wrong data (running out of space while
    aging is a result, not a failure)."""
    aging = [o for row in report.aging for o in row.outcomes.values()]
    suite = [o for runs in report.suite.values() for o in runs]
    return (any(o.error for o in [*suite, *aging])
            or any(o.value.wrong_data for o in aging if o.error is None))


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    json_to_stdout = args.json == "-"
    human = sys.stderr if json_to_stdout else sys.stdout
    runner = Runner(args, sys.stderr)
    if not runner.kinds:
        print("nothing to run: " + "; ".join(runner.report.notes), file=sys.stderr)
        return 2
    report = runner.run()
    print_report(report, human)
    if args.json:
        doc = json.dumps(to_json(report), indent=2, default=str)
        if json_to_stdout:
            print(doc)
        else:
            with open(args.json, "w") as f:
                f.write(doc + "\n")
            print(f"\nJSON written to {args.json}", file=human)
    return 1 if _failed(report) else 0
