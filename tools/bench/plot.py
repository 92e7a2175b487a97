"""`--plot DIR`: PNG charts of a run, drawn from its JSON document (report.to_json).

Working from the JSON means an earlier run's `--json` file can be charted again
(`--plot DIR --from-json FILE`) without running anything. matplotlib is an optional extra
(`pip install -e '.[plot]'`; `make setup` installs it).

  throughput.png   MB/s per workload and depth, both disks, the ratio and its target
  cpu.png          CPU us per 4 KiB block per workload and depth, SwornDisk's targets
  scaling.png      --scaling: MB/s of SwornDisk with 0 crypto workers and with its workers
                   against CryptDisk, and SwornDisk's CPU per block split into the engine's
                   thread and the workers, per workload and depth
  aging.png        write amplification and MB/s against utilisation (the aging run)
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, List, Optional

from .disks import DISPLAY_NAMES
from .suite import LABELS

COLOURS = {"sworndisk": "#1f77b4", "cryptdisk": "#ff7f0e"}
AGING_WA_TARGET = (0.7, 1.05)      # issue 9: write amplification at most 1.05 at 70% full
INSTALL_HINT = "pip install -e '.[plot]' (make setup installs it)"


def missing() -> Optional[str]:
    """None if charts can be drawn, else the one line that says how to make them possible."""
    # find_spec, not import: the parent process stays small, and the children it spawns
    # start with its resident set counted in their peak RSS (the kernel carries the
    # high-water mark across fork and exec)
    if importlib.util.find_spec("matplotlib") is None:
        return f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}"
    return None


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")           # files only: no display needed
    import matplotlib.pyplot as plt
    return plt


def write_charts(doc: dict, outdir: str) -> List[str]:
    """Every chart the document has data for, as PNGs in `outdir`; their paths."""
    os.makedirs(outdir, exist_ok=True)
    plt = _pyplot()
    written = []
    suite = [entry for entry in doc.get("suite", []) if _best(entry)]
    if suite:
        for name, draw in (("throughput.png", _throughput), ("cpu.png", _cpu)):
            written.append(_save(plt, draw(plt, suite, doc.get("settings", {})),
                                 os.path.join(outdir, name)))
    scaling = [e for e in suite if (e.get("workers0") or {}).get("best")]
    if scaling:
        written.append(_save(plt, _scaling(plt, scaling, doc.get("settings", {})),
                             os.path.join(outdir, "scaling.png")))
    aging = doc.get("aging", [])
    if aging:
        written.append(_save(plt, _aging(plt, aging, doc.get("settings", {})),
                             os.path.join(outdir, "aging.png")))
    return written


def _save(plt, fig, path: str) -> str:
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _best(entry: dict) -> Dict[str, dict]:
    """kind -> its best run's workloads, for the disks that completed at this depth."""
    return {k: d["best"]["workloads"] for k, d in entry.get("disks", {}).items()
            if d.get("best")}


def _load_note(settings: dict, best_of: bool = True) -> str:
    if "loadavg_start" not in settings:
        return ""
    load = f"load {settings['loadavg_start']:.1f}"
    if "loadavg_end" in settings:
        load += f"-{settings['loadavg_end']:.1f}"
    note = f"{load} on {settings.get('cpus', '?')} CPUs"
    return note + (f", best of {settings['repeat']}" if best_of and "repeat" in settings else "")


def _grouped(plt, suite: List[dict], settings: dict, metric: str, ylabel: str, title: str,
             annotate):
    """One panel per workload; in each, a group of bars (one per disk) per depth."""
    workloads = [w for w in LABELS if any(w in wl for e in suite for wl in _best(e).values())]
    kinds = [k for k in COLOURS if any(k in _best(e) for e in suite)]
    fig, axes = plt.subplots(1, len(workloads), figsize=(3.2 * len(workloads), 3.8),
                             squeeze=False)
    width = 0.8 / len(kinds)
    for ax, w in zip(axes[0], workloads):
        ticks = []
        for x, entry in enumerate(suite):
            best = _best(entry)
            for i, k in enumerate(kinds):
                r = best.get(k, {}).get(w)
                if r is not None:
                    bar = ax.bar(x + (i - (len(kinds) - 1) / 2) * width, r[metric], width,
                                 color=COLOURS[k], label=DISPLAY_NAMES[k] if x == 0 else None)
                    ax.bar_label(bar, fmt="%.0f" if r[metric] >= 100 else "%.1f", fontsize=7)
            ticks.append(annotate(ax, x, entry, w))
        ax.set_xticks(range(len(suite)), ticks, fontsize=8)
        ax.set_title(LABELS[w], fontsize=10)
        ax.margins(y=0.18)
        ax.tick_params(axis="y", labelsize=8)
    axes[0][0].set_ylabel(ylabel)
    handles, labels = [], []
    for ax in axes[0]:                 # every series once (a target line may be in one panel)
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    order = sorted(range(len(labels)), key=lambda i: labels[i] not in DISPLAY_NAMES.values())
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    fig.legend(handles, labels, loc="upper right", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"{title}  ({_load_note(settings)})", fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def _throughput(plt, suite: List[dict], settings: dict):
    def annotate(ax, x, entry, w):
        ratio, target = entry.get("ratios", {}).get(w), entry.get("targets", {}).get(w)
        tick = f"depth {entry['depth']}"
        if ratio is not None:
            tick += f"\n{ratio:.2f}x"
            if target:
                tick += f" (>={target['minimum']:g}x)"
        return tick
    return _grouped(plt, suite, settings, "mb_per_s", "MB/s",
                    "Throughput, SwornDisk / CryptDisk ratio (target)", annotate)


def _cpu(plt, suite: List[dict], settings: dict):
    def annotate(ax, x, entry, w):
        limit = entry.get("cpu_targets_us", {}).get(w)
        if limit:
            ax.hlines(limit, x - 0.45, x + 0.05, colors="red", linestyles="dashed",
                      label="SwornDisk target (at most)")      # over SwornDisk's bar
            return f"depth {entry['depth']}\ntarget <={limit:g}"
        return f"depth {entry['depth']}"
    return _grouped(plt, suite, settings, "cpu_us_per_block", "CPU us per 4 KiB block",
                    "CPU per block (lower is better)", annotate)


SCALING_SERIES = (("w0", "#9ecae1"), ("auto", "#1f77b4"), ("cryptdisk", "#ff7f0e"))


def _scaling(plt, suite: List[dict], settings: dict):
    """Top row: MB/s per depth, bars for SwornDisk with 0 workers, with its workers, and
    CryptDisk, the ratio to 0 workers below each group. Bottom row: SwornDisk's CPU per
    block, stacked: the engine's thread, then the workers."""
    workloads = [w for w in LABELS if any(w in e["workers0"]["best"]["workloads"] for e in suite)]
    fig, axes = plt.subplots(2, len(workloads), figsize=(3.2 * len(workloads), 6.4),
                             squeeze=False)
    workers = next((e["disks"]["sworndisk"]["best"].get("crypto_workers") for e in suite), "?")
    names = {"w0": "SwornDisk, 0 workers", "auto": f"SwornDisk, {workers} workers",
             "cryptdisk": DISPLAY_NAMES["cryptdisk"]}
    width = 0.8 / len(SCALING_SERIES)
    for col, w in enumerate(workloads):
        top, bottom = axes[0][col], axes[1][col]
        ticks = []
        for x, entry in enumerate(suite):
            runs = {"w0": entry["workers0"]["best"]["workloads"].get(w),
                    "auto": _best(entry).get("sworndisk", {}).get(w),
                    "cryptdisk": _best(entry).get("cryptdisk", {}).get(w)}
            for i, (key, colour) in enumerate(SCALING_SERIES):
                r = runs[key]
                if r is not None:
                    bar = top.bar(x + (i - 1) * width, r["mb_per_s"], width, color=colour,
                                  label=names[key] if x == 0 else None)
                    top.bar_label(bar, fmt="%.0f" if r["mb_per_s"] >= 100 else "%.1f",
                                  fontsize=7)
            for i, key in enumerate(("w0", "auto")):
                r = runs[key]
                if r is None:
                    continue
                pos = x + (i - 0.5) * 0.4
                # the engine's share of the thread (runs saved before it was measured
                # apart have only the thread's whole CPU, client included)
                thread = r.get("engine_us_per_block", r.get("thread_us_per_block", 0.0))
                work = r.get("worker_us_per_block", 0.0)
                bottom.bar(pos, thread, 0.38, color="#555555",
                           label="engine thread" if x == 0 and i == 0 else None)
                bottom.bar(pos, work, 0.38, bottom=thread, color="#2ca02c",
                           label="workers" if x == 0 and i == 0 else None)
                bottom.text(pos, thread + work, "w0" if key == "w0" else f"w{workers}",
                            ha="center", va="bottom", fontsize=7)
            ratio = entry.get("workers_ratios", {}).get(w)
            ticks.append(f"depth {entry['depth']}" + (f"\n{ratio:.2f}x w0" if ratio else ""))
        top.set_xticks(range(len(suite)), ticks, fontsize=8)
        bottom.set_xticks(range(len(suite)), [f"depth {e['depth']}" for e in suite], fontsize=8)
        top.set_title(LABELS[w], fontsize=10)
        for ax in (top, bottom):
            ax.margins(y=0.18)
            ax.tick_params(axis="y", labelsize=8)
    axes[0][0].set_ylabel("MB/s")
    axes[1][0].set_ylabel("CPU us per 4 KiB block")
    handles, labels = [], []
    for ax in (axes[0][0], axes[1][0]):
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.append(h)
            labels.append(label)
    fig.legend(handles, labels, loc="upper right", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"Scaling with crypto workers  ({_load_note(settings)})", fontsize=10,
                 x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    return fig


def _measured(outcome: Optional[dict]) -> Optional[dict]:
    if not outcome or outcome.get("error"):
        return None
    return outcome.get("steady") or outcome.get("warmup")


def _aging(plt, rows: List[dict], settings: dict):
    fig, (wa_ax, mb_ax) = plt.subplots(1, 2, figsize=(9.5, 4.4))
    utils = [row["plan"]["utilisation"] * 100 for row in rows]
    for k in COLOURS:
        points = [(u, _measured(row.get(k))) for u, row in zip(utils, rows) if k in row]
        points = [(u, m) for u, m in points if m]
        if not points:
            continue
        xs, was = [u for u, _ in points], [m["write_amplification"] for _, m in points]
        wa_ax.plot(xs, was, "o-", color=COLOURS[k], label=f"{DISPLAY_NAMES[k]} (measured)")
        if k == "sworndisk":
            for x, wa in zip(xs, was):
                wa_ax.annotate(f"{wa:.3f}", (x, wa), textcoords="offset points", xytext=(0, 6),
                               ha="center", fontsize=7)
        mb_ax.plot(xs, [m["mb_per_s"] for _, m in points], "o-", color=COLOURS[k],
                   label=DISPLAY_NAMES[k])
    engine = [(u, row["sworndisk"].get("engine_write_amplification"))
              for u, row in zip(utils, rows) if row.get("sworndisk")]
    engine = [(u, wa) for u, wa in engine if wa]
    if engine:
        wa_ax.plot([u for u, _ in engine], [wa for _, wa in engine], "x--",
                   color=COLOURS["sworndisk"], alpha=0.6, label="SwornDisk (engine's count)")
    u, limit = AGING_WA_TARGET
    wa_ax.plot([u * 100], [limit], "v", color="red", label=f"target <={limit:g} at {u:.0%}")
    top = max([limit, *(line.get_ydata().max() for line in wa_ax.get_lines())])
    wa_ax.set_ylim(0.95, top + (top - 0.95) * 0.15)   # WA >= 1: the excess over 1 matters
    wa_ax.set_title("Write amplification (device bytes / user bytes)", fontsize=10)
    mb_ax.set_ylim(bottom=0)
    mb_ax.set_title("Random 4 KiB overwrites at depth 1, MB/s (steady)", fontsize=10)
    for ax in (wa_ax, mb_ax):
        ax.set_xlabel("utilisation, %")
        ax.set_xticks(utils)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
                  frameon=False)
        ax.grid(alpha=0.3)
    a = settings.get("aging", {})
    size = f"data device {a['data_bytes'] >> 20} MiB, {a['passes']} passes; " if a else ""
    fig.suptitle(f"Aging: {size}{_load_note(settings, best_of=False)}", fontsize=10)
    fig.tight_layout()
    return fig
