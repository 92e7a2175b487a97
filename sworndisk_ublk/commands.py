"""The sub-commands: add, del, list, recover, stats.  `cli.py` parses, this module acts.

Each command takes plain values and returns what it wants printed, or raises CliError;
no argparse objects reach this module, so the commands can be tested on their own.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from sworndisk.device import check_unowned
from sworndisk.errors import DeviceBusyError
from ublk_shim import DriverMissing, NotRoot, ctrl, holders
from ublk_shim.sys import UBLK_BLOCK_PATH, block_dev_id

from . import names, restore, state
from .daemon import (REQUEST_DEFERRED, REQUEST_FORCE, Ready, ServerOptions, run_foreground,
                     start_background)
from .errors import CliError, ExitCode, to_cli_error
from .keys import get_key_source
from .table import Table, format_bytes, parse_table, resolve_devices, same_device
from .volume import check_meta_size, confirm_overwrite, growth_limit, will_format

POLL = 0.2
DEFAULT_QUEUES, DEFAULT_DEPTH = 1, 64     # add's --queues and --depth


# --- preconditions ------------------------------------------------------------------------

def require_ublk() -> None:
    """The driver must be loaded; say how to load it and what the kernel needs."""
    if not ctrl.driver_available():
        raise to_cli_error(DriverMissing())


def require_root() -> None:
    if os.geteuid() != 0:
        raise to_cli_error(NotRoot())


def _require_devices_free(table: Table) -> None:
    """Refuse, before asking anything, devices that have an owner: an open SwornDisk (the
    engine's lock, whatever path it was opened by), a device whose server died and that
    waits for `recover`, or a block device that is mounted or open. The server's own open
    is the check that counts (two racing adds both get here); this one fails early."""
    for role, path in (("data", table.data_dev), ("meta", table.meta_dev)):
        try:
            check_unowned(path, f"{role} device")
        except DeviceBusyError as e:
            raise to_cli_error(e) from None
        for st in state.load_all():
            if not any(same_device(path, p) for p in (st.data, st.meta)):
                continue
            if st.server_alive():
                raise CliError(f"{role} device {path} is used by {st.dev_path} (server pid "
                               f"{st.pid})", ExitCode.BUSY)
            if ctrl.device_exists(st.dev_id):
                raise CliError(f"{role} device {path} belongs to {st.dev_path}, whose server "
                               f"died: recover -n {st.dev_id} to resume it, or del -n "
                               f"{st.dev_id} to drop it, first", ExitCode.BUSY)
        users = holders.block_users(path)
        if users:
            raise CliError(f"{role} device {path} is busy: {', '.join(users)}", ExitCode.BUSY)


def require_name_free(name: str) -> None:
    """Refuse a name a disk still has: a live one, or one whose server died and that waits
    for recover or del. A dead disk whose device is gone leaves only a stale entry (and
    maybe a stale link, replaced when the new disk is live)."""
    names.validate_name(name)
    names.check_link_free(name)
    st = state.find_name(name)
    if st is None:
        return
    if st.server_alive():
        raise CliError(f"the name {name!r} is in use by {st.dev_path} (server pid {st.pid}); "
                       f"del {name} first, or choose another name", ExitCode.BUSY)
    if ctrl.device_exists(st.dev_id):
        raise CliError(f"the name {name!r} belongs to {st.dev_path}, whose server died: "
                       f"recover {name} to resume it, or del {name} to drop it, first",
                       ExitCode.BUSY)
    state.remove(st.dev_id)
    restore.forget(st.dev_id)


def resolve_device(text: str) -> int:
    """The device number of N, /dev/ublkbN, ublkbN, NAME or /dev/sworndisk/NAME. A name is
    looked up in the servers' state, never through the link (which may be stale)."""
    if text.isdigit():
        return int(text)
    dev_id = block_dev_id(text)
    if dev_id is not None:
        return dev_id
    name = names.name_of_path(text) or (text if names.name_problem(text) is None else None)
    if name is not None:
        st = state.find_name(name)
        if st is not None:
            return st.dev_id
        raise CliError(f"no SwornDisk named {name!r} (see list)", ExitCode.NOT_FOUND)
    raise CliError(f"not a SwornDisk device: {text!r} (give NAME, /dev/sworndisk/NAME, "
                   f"/dev/ublkbN or -n N)", ExitCode.USAGE)


# --- add / recover ------------------------------------------------------------------------

def read_table_text(words: List[str], stdin: Any) -> str:
    """`add -` reads the table from stdin (as `dmsetup create` does); else argv words."""
    if words == ["-"]:
        return stdin.read()
    return " ".join(words)


def add(table_text: str, *, key_file: Optional[str], foreground: bool, recoverable: bool,
        queues: int, depth: int, stdin_free: bool,
        on_ready: Callable[[Ready], None], yes: bool = False, anchor: Optional[str] = None,
        accept_rollback: bool = False, kdf: Any = None,
        max_sectors: Optional[int] = None, name: Optional[str] = None,
        read_only: bool = False, crypto_workers: Optional[int] = None) -> None:
    """Parse and check everything, confirm the overwrite of an existing SwornDisk (unless
    `yes`), ask for the key, then start the server. `anchor` is the rollback anchor file,
    `kdf` the Argon2id cost of a new passphrase slot (None: calibrated), `max_sectors`
    the size a new disk reserves meta room to grow to (resize), `name` makes
    /dev/sworndisk/NAME, `read_only` serves the disk read-only (it is never formatted),
    `crypto_workers` the engine's crypto worker processes (None: automatic)."""
    if name is not None:
        require_name_free(name)
    table = resolve_devices(parse_table(table_text))
    if table.rounding_note:
        print(f"sworndisk-ublk: note: {table.rounding_note}", file=sys.stderr)
    require_ublk()
    require_root()
    _require_devices_free(table)
    formatting = will_format(table)
    if formatting and read_only:
        raise CliError(f"a read-only disk is never formatted, and {table.meta_dev} would be "
                       f"(<format> {table.format}); use <format> false", ExitCode.USAGE)
    max_blocks = growth_limit(table, max_sectors, formatting)
    if formatting:
        check_meta_size(table, max_blocks)
        confirm_overwrite(table, assume_yes=yes)
    source = get_key_source(key_file, table.meta_dev, new=formatting, stdin_free=stdin_free)
    opts = ServerOptions(table=table, recoverable=recoverable, queues=queues, depth=depth,
                         anchor=os.path.abspath(anchor) if anchor else None,
                         accept_rollback=accept_rollback, kdf=kdf, max_blocks=max_blocks,
                         name=name, read_only=read_only, crypto_workers=crypto_workers)
    _launch(opts, source, foreground, on_ready)


def recover(dev_id: int, *, key_file: Optional[str], foreground: bool,
            on_ready: Callable[[Ready], None], accept_rollback: bool = False) -> None:
    """Start a new server for a --recoverable device whose server died (with the anchor
    it was added with)."""
    require_ublk()
    require_root()
    st = _load_state(dev_id)
    if not st.recoverable:
        raise CliError(f"{st.dev_path} was not added with --recoverable and cannot be "
                       f"recovered; delete it (del -n {dev_id}) and add it again", ExitCode.USAGE)
    if st.server_alive():
        raise CliError(f"{st.dev_path} is served by pid {st.pid}: nothing to recover",
                       ExitCode.BUSY)
    if not ctrl.device_exists(dev_id):
        state.remove(dev_id)
        raise CliError(f"{st.dev_path} no longer exists; add it again (format false)",
                       ExitCode.NOT_FOUND)
    table = resolve_devices(parse_table(st.table)).with_format("false")
    source = get_key_source(key_file, table.meta_dev, new=False, stdin_free=True)
    opts = ServerOptions(table=table, recoverable=True, queues=st.queues, depth=st.depth,
                         recover_dev_id=dev_id, anchor=st.anchor,
                         accept_rollback=accept_rollback, name=st.name,
                         read_only=st.read_only)

    def report(ready: Ready) -> None:
        on_ready(ready)
        if ready.lost:          # one line; the first flush fails with EIO as well
            print(f"sworndisk-ublk: warning: {ready.lost}", file=sys.stderr, flush=True)

    _launch(opts, source, foreground, report)


def _launch(opts: ServerOptions, source: Any, foreground: bool,
            on_ready: Callable[[Ready], None]) -> None:
    if foreground:
        run_foreground(opts, source, on_ready)
    else:
        on_ready(start_background(opts, source))


def describe_ready(ready: Ready) -> str:
    """The human summary `add` prints to stderr (stdout gets just the device path)."""
    thin = " (thin-provisioned)" if ready.usable < ready.size else ""
    log = f", log {ready.log}" if ready.log != "-" else ""
    st = state.load(ready.dev_id)
    named = f" ({names.link_path(st.name)})" if st is not None and st.name else ""
    ro = ", read-only" if st is not None and st.read_only else ""
    return (f"{ready.dev_path}{named}: SwornDisk of {format_bytes(ready.size)}, usable capacity "
            f"{format_bytes(ready.usable)}{thin}{ro}; server pid {ready.pid}{log}")


# --- del ----------------------------------------------------------------------------------

def _load_state(dev_id: int) -> state.DeviceState:
    st = state.load(dev_id)
    if st is not None:
        return st
    if ctrl.device_exists(dev_id):
        raise CliError(f"{UBLK_BLOCK_PATH.format(dev_id)} is not a SwornDisk device (no state "
                       f"in {state.state_path(dev_id)})", ExitCode.NOT_FOUND)
    raise CliError(f"no SwornDisk device {dev_id} (no {UBLK_BLOCK_PATH.format(dev_id)})",
                   ExitCode.NOT_FOUND)


def _wait_unused(st: state.DeviceState, wait: float) -> None:
    deadline = time.monotonic() + wait
    while True:
        users = holders.block_users(st.dev_path)     # del's policy: nothing may use it
        if not users:
            return
        if time.monotonic() >= deadline:
            hint = ("; unmount or close it first" if st.server_alive() else
                    f"; its server is dead: recover -n {st.dev_id} first, then unmount")
            waited = f" after waiting {wait:g} s" if wait > 0 else ""
            raise CliError(f"{st.dev_path} is busy{waited}: {', '.join(users)}{hint}",
                           ExitCode.BUSY)
        time.sleep(POLL)


def _wait_exit(st: state.DeviceState, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while st.server_alive():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)
    return True


def _ask_server(st: state.DeviceState, request: str) -> None:
    """Leave `request` for the server and signal it (SIGUSR2); see daemon.Server."""
    path = state.request_path(st.dev_id)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(request + "\n")
    os.replace(tmp, path)
    try:
        os.kill(st.pid, signal.SIGUSR2)
    except ProcessLookupError:
        pass


def _defer(st: state.DeviceState, users: List[str], timeout: float) -> bool:
    """`del --deferred` of a device in use: the server removes it when its last user closes
    it. True once the server has taken the request (False: the device was not in use)."""
    if not users:
        return False
    if not st.server_alive():
        raise CliError(f"{st.dev_path} is busy ({', '.join(users)}) and its server is dead, "
                       f"so nothing can remove it later: recover -n {st.dev_id} first, or "
                       f"del --force -n {st.dev_id}", ExitCode.BUSY)
    _ask_server(st, REQUEST_DEFERRED)
    deadline = time.monotonic() + min(timeout, 30.0)
    while True:
        now = state.load(st.dev_id)
        if now is None or now.pending_removal:
            break
        if time.monotonic() >= deadline or not st.server_alive():
            raise CliError(f"the server of {st.dev_path} (pid {st.pid}) did not take the "
                           f"deferred removal (log {st.log})", ExitCode.FAILED)
        time.sleep(POLL)
    print(f"sworndisk-ublk: {_label(st)} is in use ({', '.join(users)}); it will be removed "
          f"when its last user closes it", file=sys.stderr)
    return True


def _label(st: state.DeviceState) -> str:
    return f"{st.dev_path} ({names.link_path(st.name)})" if st.name else st.dev_path


def delete(dev_id: int, *, wait: float = 0.0, timeout: float = 120.0, force: bool = False,
           deferred: bool = False) -> None:
    """Stop a device cleanly: its server flushes and closes the engine, then deletes it.

    Refuses (or waits up to `wait` seconds) while the device is mounted or open, unless
    `force`: then every request in flight and after fails with EIO, and the device goes at
    once (what was flushed stays). `deferred`: a device in use is removed by its server
    when its last user closes it.  A device whose server is dead is stopped and deleted
    through the control device directly.
    """
    require_ublk()
    require_root()
    st = _load_state(dev_id)
    if deferred and ctrl.device_exists(dev_id) \
            and _defer(st, holders.block_users(st.dev_path), timeout):
        return
    if ctrl.device_exists(dev_id) and not force:
        _wait_unused(st, wait)
    if st.server_alive():
        if force:
            _ask_server(st, REQUEST_FORCE)
        else:
            try:
                os.kill(st.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not _wait_exit(st, timeout):
            raise CliError(f"the server of {st.dev_path} (pid {st.pid}) did not stop within "
                           f"{timeout:g} s (log {st.log}); kill -9 {st.pid}, then "
                           f"del -n {dev_id} again", ExitCode.FAILED)
    if ctrl.device_exists(dev_id):          # server dead (killed) or it failed to delete
        try:
            ctrl.stop_device(dev_id)
        except Exception:              # noqa: BLE001 - may already be stopped
            pass
        ctrl.delete_device(dev_id, wait=not force)
    if st.name:
        names.remove_link(st.name, st.dev_path)
    state.remove(dev_id)
    restore.forget(dev_id)          # the write log and loss record die with the device


def delete_all(*, wait: float, timeout: float, report: Callable[[CliError], None],
               force: bool = False, deferred: bool = False) -> int:
    """`del --all`: try every device, report each failure, return the worst exit code."""
    code = ExitCode.OK
    for st in state.load_all():
        try:
            delete(st.dev_id, wait=wait, timeout=timeout, force=force, deferred=deferred)
        except CliError as e:
            report(e)
            code = max(code, e.code)
    return int(code)


# --- list / stats -------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceRow:
    """One line of `list`."""

    dev_id: int
    dev: str
    pid: int
    state: str               # "alive" | "dead"
    data: str
    meta: str
    size: int
    recoverable: bool
    log: str
    lost: Optional[str] = None   # why a recover may have lost completed writes, if one did
    failed: Optional[str] = None  # why the disk stopped accepting writes (storage failure)
    name: Optional[str] = None   # /dev/sworndisk/NAME
    read_only: bool = False
    pending_removal: bool = False    # del --deferred: goes when its last user closes it


def list_devices() -> List[DeviceRow]:
    """Every SwornDisk device with state; stale entries (dead server, no device) are removed."""
    rows = []
    for st in state.load_all():
        alive = st.server_alive()
        if not alive and not ctrl.device_exists(st.dev_id):
            state.remove(st.dev_id)
            restore.forget(st.dev_id)
            continue
        rows.append(DeviceRow(st.dev_id, st.dev_path, st.pid, "alive" if alive else "dead",
                              st.data, st.meta, st.size, st.recoverable, st.log,
                              restore.load_loss(st.dev_id), st.failed if alive else None,
                              name=st.name, read_only=st.read_only,
                              pending_removal=st.pending_removal))
    return rows


def format_rows(rows: List[DeviceRow]) -> str:
    header = ("NAME", "DEV", "PID", "STATE", "DATA", "META", "SIZE", "MODE", "RECOVERABLE",
              "LOST")
    lines = [header] + [(r.name or "-", r.dev, str(r.pid), _row_state(r), r.data, r.meta,
                         format_bytes(r.size), "ro" if r.read_only else "rw",
                         "yes" if r.recoverable else "no", "yes" if r.lost else "-")
                        for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
             for line in lines]
    return "\n".join(table + [f"{r.dev} failed: {r.failed}" for r in rows if r.failed])


def _row_state(r: DeviceRow) -> str:
    if r.failed:
        return "failed"
    return "pending-removal" if r.pending_removal and r.state == "alive" else r.state


def stats(dev_id: int, timeout: float = 30.0) -> Dict[str, Any]:
    """Ask a live server for its engine statistics (SIGUSR1; it writes a JSON file)."""
    st = _load_state(dev_id)
    if not st.server_alive():
        raise CliError(f"the server of {st.dev_path} is not running", ExitCode.NOT_FOUND)
    path = state.stats_path(dev_id)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    os.kill(st.pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() >= deadline or not st.server_alive():
            raise CliError(f"the server of {st.dev_path} did not report statistics within "
                           f"{timeout:g} s", ExitCode.FAILED)
        time.sleep(POLL)
    with open(path) as f:
        data = json.load(f)
    data["lost_writes"] = restore.load_loss(dev_id)     # why a recover may have lost some
    return data
