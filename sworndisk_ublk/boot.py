"""`start` and `stop`: bring the disks of the tab file (tab.py) up and down by name.

`start` opens each disk as `add --name NAME` with <format> false would (it never formats:
the logical size comes from the disk's own header); a disk already up is left alone with a
note. `stop` flushes and deletes as `del` does. Every line is tried even when another
fails; each failure is reported with the line it came from ("/etc/sworndisktab:3: ...")
and the exit status is the worst one. This is what contrib/systemd/ runs at boot and
shutdown (docs/boot.md).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from . import commands, state, terminal
from .admin import dump
from .daemon import Ready
from .errors import CliError, ExitCode
from .names import link_path
from .tab import Tab, TabEntry, TabLineError, load_tab, resolve

PROG = "sworndisk-ublk"
Report = Callable[[str], None]


@dataclass(frozen=True)
class Selection:
    """The entries a `start`/`stop` acts on, and the failures found while choosing them."""

    entries: List[TabEntry]
    errors: List[str]


def select(tab: Tab, names: List[str], every: bool, *, skip_noauto: bool) -> Selection:
    """--all: every valid line (without the noauto ones for start) and every bad line's
    error; NAMEs: their lines, an error for a name with no line (or only a bad one)."""
    if every:
        entries = [e for e in tab.entries if not (skip_noauto and e.options.noauto)]
        return Selection(entries, [str(err) for err in tab.errors])
    entries, errors = [], []
    for name in names:
        entry = tab.find(name)
        bad: List[TabLineError] = [err for err in tab.errors if err.name == name]
        if entry is not None:
            entries.append(entry)
        elif bad:
            errors += [str(err) for err in bad]
        else:
            errors.append(f"{tab.path}: no line for the disk {name!r}")
    return Selection(entries, errors)


def _live(name: str) -> Optional[state.DeviceState]:
    st = state.find_name(name)
    return st if st is not None and st.server_alive() else None


def _add_options(entry: TabEntry) -> Dict[str, Any]:
    """The keyword arguments of commands.add for `entry`'s options: the one place where a
    tab option becomes an add option."""
    o = entry.options
    kw: Dict[str, Any] = dict(recoverable=o.recoverable, read_only=o.read_only,
                              anchor=o.anchor, name=entry.name,
                              queues=o.queues or commands.DEFAULT_QUEUES,
                              depth=o.depth or commands.DEFAULT_DEPTH,
                              crypto_workers=o.crypto_workers)
    return kw


def _key_file(entry: TabEntry) -> Optional[str]:
    """The key file, or None for a passphrase, which only a person at a terminal can give."""
    if not entry.passphrase:
        return entry.key
    if not terminal.available():
        raise CliError("KEY is - (a passphrase), but there is no terminal to ask it on; "
                       "use a key file for disks started at boot", ExitCode.USAGE)
    return None


def start_entry(entry: TabEntry, report: Report) -> None:
    """Open one disk of the tab (never formats); raises CliError."""
    live = _live(entry.name)
    if live is not None:
        report(f"note: {entry.where}: {entry.name} is already up as {live.dev_path}; "
               f"left alone")
        return
    commands.require_name_free(entry.name)       # before asking for anything
    data, meta = resolve(entry)
    info = dump(meta)
    table = f"0 {info.nr_blocks * 8} sworndisk {data} {meta} 0 false"
    key_file = _key_file(entry)

    def on_ready(ready: Ready) -> None:
        print(link_path(entry.name), flush=True)
        report(commands.describe_ready(ready))

    commands.add(table, key_file=key_file, foreground=False, stdin_free=False,
                 on_ready=on_ready, **_add_options(entry))


def stop_entry(entry: TabEntry, report: Report, *, wait: float, timeout: float) -> None:
    """Flush and delete one disk of the tab; a disk that is not up is a note."""
    st = state.find_name(entry.name)
    if st is None:
        report(f"note: {entry.where}: {entry.name} is not up")
        return
    commands.delete(st.dev_id, wait=wait, timeout=timeout)
    report(f"{entry.name}: stopped {st.dev_path}")


def _run(selection: Selection, act: Callable[[TabEntry], None], error: Report) -> int:
    code = 0
    for message in selection.errors:
        error(message)
        code = max(code, int(ExitCode.USAGE))
    for entry in selection.entries:
        try:
            act(entry)
        except CliError as e:
            error(f"{entry.where}: {entry.name}: {e.message}")
            code = max(code, int(e.code) or 1)
    return code


def _remark(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def start(tab_path: str, names: List[str], every: bool, *, error: Report,
          report: Report = _remark) -> int:
    """`start [NAME ...|--all]`; returns the exit status (the worst failure, 0 if none)."""
    tab = load_tab(tab_path)
    sel = select(tab, names, every, skip_noauto=True)
    return _run(sel, lambda e: start_entry(e, report), error)


def stop(tab_path: str, names: List[str], every: bool, *, error: Report, wait: float = 0.0,
         timeout: float = 120.0, report: Report = _remark) -> int:
    """`stop [NAME ...|--all]`; returns the exit status (the worst failure, 0 if none)."""
    tab = load_tab(tab_path)
    sel = select(tab, names, every, skip_noauto=False)
    return _run(sel, lambda e: stop_entry(e, report, wait=wait, timeout=timeout), error)
