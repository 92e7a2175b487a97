"""`sworndisk-ublk`: argument parsing, dispatch and error printing.

Every failure a user can cause ends as one line ``sworndisk-ublk: error: <message>`` on
stderr and a non-zero exit code (see errors.ExitCode and docs/cli.md); a traceback means
a bug.  Output meant for scripts goes to stdout (the device path, or JSON with --json);
human remarks go to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from dataclasses import asdict
from typing import List, NoReturn, Optional

from . import admin, boot, commands, tab
from .daemon import Ready
from .errors import CliError, ExitCode, to_cli_error

PROG = "sworndisk-ublk"


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors look like ours (one line, same prefix, exit code 2, or
    `usage_code` for a verb with codes of its own)."""

    usage_code: int = ExitCode.USAGE

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{self.prog} --help')", self.usage_code)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """argparse's, but arguments no verb knows point to that verb's help, not the
        top level's (argparse reports them from the top-level parser)."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            verb = self.verbs.get(getattr(ns, "command", None), self)
            verb.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def add_subparsers(self, **kwargs):
        self._verb_action = super().add_subparsers(**kwargs)
        return self._verb_action

    @property
    def verbs(self) -> dict:
        """The verbs' parsers by name (none for a verb's own parser)."""
        action = getattr(self, "_verb_action", None)
        return action.choices if action is not None else {}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def _crypto_workers(text: str) -> Optional[int]:
    """--crypto-workers: 0..64, or 'auto' (one per CPU beyond the first, at most 8)."""
    if text == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a number: {text!r} (give 0 to 64, or auto)") from None
    if not 0 <= value <= 64:
        raise argparse.ArgumentTypeError(f"must be 0 to 64 (or auto): {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _device_number(text: str) -> int:
    """N, the device path /dev/ublkbN (or ublkbN), NAME or /dev/sworndisk/NAME."""
    return commands.resolve_device(text)


def _which_device(args: argparse.Namespace, what: str) -> int:
    """-n N or a device path, exactly one."""
    if (args.dev_id is None) == (args.device is None):
        raise CliError(f"{what}: give the device as NAME, /dev/sworndisk/NAME, /dev/ublkbN "
                       f"or -n N (one of them)", ExitCode.USAGE)
    return args.dev_id if args.dev_id is not None else _device_number(args.device)


_KEY_FILE_HELP = ("the key file of an existing key slot: raw 16/32 bytes or 32/64 hex digits "
                  "(default: a passphrase, one line from stdin when it is not a terminal, "
                  "else asked on the terminal)")
_NEW_KEY_FILE_HELP = ("the new key as a key file (default: a new passphrase, asked twice on "
                      "the terminal, or the next line of stdin)")

ADD_DESCRIPTION = """Create /dev/ublkbN, a SwornDisk on a data and a meta device, from a dmsetup-style table.

TABLE is '<start> <sectors> sworndisk <data_dev> <meta_dev> <key> <format>', as one quoted
argument, as its seven words, or - to read it from stdin:
  <start>     0 (one target covers the whole device)
  <sectors>   the logical size in 512-byte sectors (rounded down to whole 4 KiB blocks;
              at most the data device's size)
  <data_dev>  the data device: a block device or a regular file
  <meta_dev>  the meta device: a block device or a regular file (see min_meta_size)
  <key>       0: the key never goes in the table (--key-file, or a passphrase)
  <format>    force  format (asks YES first if the meta device holds a SwornDisk)
              true   format only a meta device that holds no SwornDisk at all
              false  never format: open the SwornDisk that is there
"""


def _add_kdf_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("passphrase cost (Argon2id), for a new passphrase slot")
    g.add_argument("--iter-time", type=_positive, metavar="MS",
                   help="calibrate to take about MS milliseconds here (default 1000)")
    g.add_argument("--pbkdf-memory", type=_positive, metavar="KiB",
                   help="memory in KiB (default: calibrated, at most min(1 GiB, RAM/2))")
    g.add_argument("--pbkdf-time", type=_positive, metavar="N",
                   help="passes over the memory (default: calibrated, at least 4)")


def _meta_verb(sub, name: str, help: str, **kw) -> argparse.ArgumentParser:
    """A verb that works offline on a meta device: its first argument is META."""
    p = sub.add_parser(name, help=help, **kw)
    p.add_argument("meta", metavar="META", help="the meta device (a block device or image file)")
    return p


def _kdf(args: argparse.Namespace):
    return admin.kdf_params(args.iter_time, args.pbkdf_memory, args.pbkdf_time)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="SwornDisk secure block devices served over ublk.",
                epilog="See docs/cli.md for the table format, key handling and exit codes.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    a = sub.add_parser("add", help="create a SwornDisk device /dev/ublkbN from a table",
                       description=ADD_DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("table", nargs="+", metavar="TABLE|-",
                   help="the table (one quoted argument or its seven words), or -")
    a.add_argument("--key-file", metavar="PATH", help=_KEY_FILE_HELP)
    a.add_argument("--anchor", metavar="PATH",
                   help="rollback anchor: a file on storage you trust, updated at every "
                        "flush; opening a disk older than it fails (created when formatting)")
    a.add_argument("--accept-rollback", action="store_true",
                   help="open a disk older than its anchor (or whose anchor is missing or "
                        "forged) anyway, and move the anchor to it")
    a.add_argument("--foreground", action="store_true",
                   help="serve in this process until Ctrl-C/SIGTERM, logging to stderr")
    a.add_argument("--recoverable", action="store_true",
                   help="keep the device (I/O waits) if the server dies; see recover")
    a.add_argument("--queues", type=_positive, default=1, metavar="N",
                   help="ublk queues (default 1; at most one per CPU)")
    a.add_argument("--crypto-workers", type=_crypto_workers, default=None, metavar="N",
                   help="processes that encrypt and verify blocks beside the queues "
                        "(default auto: one per CPU beyond the first, at most 8; "
                        "0: all in the queue threads)")
    a.add_argument("--depth", type=_positive, default=64, metavar="N",
                   help="requests in flight per queue (default 64)")
    _add_kdf_options(a)
    a.add_argument("--yes", action="store_true",
                   help="with <format> force: overwrite a meta device that already holds a "
                        "SwornDisk without asking (needed where there is no terminal to "
                        "type YES on)")
    a.add_argument("--max-sectors", type=_positive, metavar="N",
                   help="when formatting: reserve meta room to grow (resize) up to N sectors "
                        "with no larger meta device (docs/cli.md gives the cost)")
    a.add_argument("--json", action="store_true",
                   help="print {dev_id, dev, pid, size, usable, log} as JSON instead of the path")
    a.add_argument("--name", metavar="NAME",
                   help="name the disk: /dev/sworndisk/NAME points at its /dev/ublkbN, and "
                        "del, status, stats and recover take NAME")
    a.add_argument("--read-only", action="store_true",
                   help="serve the disk read-only: the kernel refuses writes and nothing is "
                        "written to either image (never formats)")

    d = sub.add_parser("del", help="stop and delete devices (engine flushed and closed)")
    d.add_argument("device", nargs="?", metavar="DEV", help=_DEV_HELP)
    which = d.add_mutually_exclusive_group()
    which.add_argument("-n", "--number", type=int, metavar="N", dest="dev_id",
                       help="the device number N of /dev/ublkbN")
    which.add_argument("--all", action="store_true", help="every SwornDisk device")
    d.add_argument("--wait", type=_seconds, default=0.0, metavar="SEC",
                   help="wait up to SEC seconds for the device to be unmounted/closed "
                        "(default: fail at once)")
    d.add_argument("--timeout", type=_seconds, default=120.0, metavar="SEC",
                   help="how long the server may take to flush and stop (default 120)")
    busy = d.add_mutually_exclusive_group()
    busy.add_argument("--force", action="store_true",
                      help="tear down a device that is open or mounted: requests in flight "
                           "and new ones fail with EIO, what was flushed stays")
    busy.add_argument("--deferred", action="store_true",
                      help="a device in use is removed when its last user closes it "
                           "(list shows it as pending-removal meanwhile)")

    ls = sub.add_parser("list", help="list SwornDisk devices")
    ls.add_argument("--json", action="store_true", help="print a JSON list of objects")

    r = sub.add_parser("recover", help="restart the server of a --recoverable device")
    r.add_argument("device", nargs="?", metavar="DEV", help=_DEV_HELP)
    r.add_argument("-n", "--number", type=int, metavar="N", dest="dev_id",
                   help="the device number N of /dev/ublkbN")
    r.add_argument("--key-file", metavar="PATH", help=_KEY_FILE_HELP)
    r.add_argument("--accept-rollback", action="store_true",
                   help="reopen a disk older than its anchor anyway (see add)")
    r.add_argument("--foreground", action="store_true",
                   help="serve in this process until Ctrl-C/SIGTERM, logging to stderr")
    r.add_argument("--json", action="store_true", help="print the result as JSON")

    s = sub.add_parser("stats", help="show the engine's raw counters for a running device")
    s.add_argument("device", nargs="?", metavar="DEV", help=_DEV_HELP)
    s.add_argument("-n", "--number", type=int, metavar="N", dest="dev_id",
                   help="the device number N of /dev/ublkbN")
    s.add_argument("--json", action="store_true", help="print them as JSON")

    st = sub.add_parser("status", help="show a running device: sizes, space, cipher, key "
                                       "slot, write amplification, uptime")
    st.add_argument("device", nargs="?", metavar="DEV", help=_DEV_HELP)
    st.add_argument("-n", "--number", type=int, metavar="N", dest="dev_id",
                    help="the device number N of /dev/ublkbN")
    st.add_argument("--json", action="store_true", help="print it as JSON")

    ak = _meta_verb(sub, "add-key", help="add a key slot (prints its number)",
                        description="Add a key or passphrase, authorised by an existing one. "
                                    "Prints the new slot's number.")
    ak.add_argument("--key-file", metavar="PATH", help=_KEY_FILE_HELP)
    ak.add_argument("--new-key-file", metavar="PATH", help=_NEW_KEY_FILE_HELP)
    ak.add_argument("--slot", "--key-slot", type=int, metavar="N", dest="slot",
                    help="the slot to use (default: the lowest free one)")
    ak.add_argument("--json", action="store_true", help="print the slot as JSON")
    _add_kdf_options(ak)

    ck = _meta_verb(sub, "change-key", help="replace the key of the slot the old key opens",
                        description="Replace a key or passphrase: the slot the old one opens "
                                    "gets the new one. Prints the slot's number.")
    ck.add_argument("--key-file", metavar="PATH", help="the old key's key file (default: "
                                                       "the old passphrase)")
    ck.add_argument("--new-key-file", metavar="PATH", help=_NEW_KEY_FILE_HELP)
    ck.add_argument("--json", action="store_true", help="print the slot as JSON")
    _add_kdf_options(ck)

    rk = _meta_verb(sub, "remove-key", help="empty a key slot (never the last one)",
                        description="Empty key slot N, authorised by the key of another slot.")
    rk.add_argument("--slot", "--key-slot", type=int, metavar="N", dest="slot", required=True,
                    help="the slot to empty")
    rk.add_argument("--key-file", metavar="PATH",
                    help="the key file of another slot (default: another slot's passphrase)")

    dp = _meta_verb(sub, "dump", help="show the header: version, uuid, sizes, key slots "
                                     "(no key needed, nothing secret)")
    dp.add_argument("--json", action="store_true", help="print it as JSON")

    hb = _meta_verb(sub, "header-backup", help="save the header (superblock and key slots) "
                                              "to a new file")
    hb.add_argument("file", metavar="FILE", help="the backup file to create (mode 600)")

    hr = _meta_verb(sub, "header-restore", help="write a header backup back (brings back "
                                               "removed keys)")
    hr.add_argument("file", metavar="FILE", help="a file made by header-backup for this disk")

    rs = sub.add_parser("resize", help="grow a disk (offline) after its data device, and if "
                                       "need be its meta device, was made larger")
    rs.add_argument("data", metavar="DATA", help="the data device")
    rs.add_argument("meta", metavar="META", help="the meta device")
    rs.add_argument("--sectors", type=_positive, metavar="N",
                    help="the new logical size in 512-byte sectors (default: what the data "
                         "device now allows, as at format); never less than now")
    rs.add_argument("--key-file", metavar="PATH", help=_KEY_FILE_HELP)
    rs.add_argument("--json", action="store_true", help="print the sizes before and after as JSON")

    c = sub.add_parser("check", help="verify every structure of a disk, writing nothing "
                                     "(exit 0 clean, 4 problems, 8 could not run)")
    c.usage_code = admin.CHECK_FAILED
    c.add_argument("data", metavar="DATA", help="the data device")
    c.add_argument("meta", metavar="META", help="the meta device")
    c.add_argument("--key-file", metavar="PATH", help=_KEY_FILE_HELP)
    c.add_argument("--data", action="store_true", dest="data_blocks",
                   help="also read and verify every live data block")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_tab_verbs(sub)
    return p


_DEV_HELP = "the device: NAME, /dev/sworndisk/NAME or /dev/ublkbN"


def _add_tab_verbs(sub) -> None:
    """start/stop: the disks of the tab file (boot.py, docs/boot.md)."""
    for verb, text in (("start", "open disks of the tab file by name (never formats)"),
                       ("stop", "flush and delete disks of the tab file by name")):
        t = sub.add_parser(verb, help=text, description=f"{text[0].upper()}{text[1:]}: "
                           f"lines 'NAME DATA META KEY [OPTIONS]' of {tab.DEFAULT_TAB}; "
                           f"see docs/boot.md.")
        t.add_argument("names", nargs="*", metavar="NAME", help="disks of the tab file")
        t.add_argument("--all", action="store_true",
                       help="every disk of the tab file" + (" without noauto"
                                                            if verb == "start" else ""))
        t.add_argument("--tab", metavar="PATH", default=tab.DEFAULT_TAB,
                       help=f"the tab file (default {tab.DEFAULT_TAB})")
        if verb == "stop":
            t.add_argument("--wait", type=_seconds, default=0.0, metavar="SEC",
                           help="wait up to SEC seconds for each disk to be unmounted/closed")
            t.add_argument("--timeout", type=_seconds, default=120.0, metavar="SEC",
                           help="how long each server may take to flush and stop")


def _run_tab(args: argparse.Namespace) -> int:
    if bool(args.names) == args.all:
        raise CliError(f"{args.command}: give disk names or --all (one of them)",
                       ExitCode.USAGE)
    if args.command == "start":
        return boot.start(args.tab, args.names, args.all, error=_error_line)
    return boot.stop(args.tab, args.names, args.all, error=_error_line, wait=args.wait,
                     timeout=args.timeout)


def _error(e: CliError) -> None:
    _error_line(e.message)


def _error_line(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def _ready_printer(as_json: bool):
    def on_ready(ready: Ready) -> None:
        if as_json:
            print(json.dumps(dict(asdict(ready), dev=ready.dev_path)), flush=True)
        else:
            print(ready.dev_path, flush=True)
        print(f"{PROG}: {commands.describe_ready(ready)}", file=sys.stderr, flush=True)
    return on_ready


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def _run_admin(args: argparse.Namespace) -> Optional[int]:
    """The offline verbs of admin.py (and status); None if `args` is another verb."""
    if args.command in ("add-key", "change-key"):
        kdf = _kdf(args)
        if args.command == "add-key":
            slot = admin.add_key(args.meta, key_file=args.key_file,
                                 new_key_file=args.new_key_file, slot=args.slot, kdf=kdf)
        else:
            slot = admin.change_key(args.meta, key_file=args.key_file,
                                    new_key_file=args.new_key_file, kdf=kdf)
        info = admin.slot_info(args.meta, slot)
        if args.json:
            _print_json(asdict(info))
        else:
            print(slot)
        verb = "added" if args.command == "add-key" else "changed"
        print(f"{PROG}: {verb} key slot {slot} ({admin.describe_slot(info)})", file=sys.stderr)
    elif args.command == "remove-key":
        admin.remove_key(args.meta, args.slot, key_file=args.key_file)
        print(f"{PROG}: removed key slot {args.slot}", file=sys.stderr)
    elif args.command == "dump":
        info = admin.dump(args.meta)
        print(json.dumps(info.as_dict(), indent=2) if args.json
              else admin.format_dump(args.meta, info))
    elif args.command == "header-backup":
        info = admin.header_backup(args.meta, args.file)
        print(f"{PROG}: saved the header of {args.meta} (uuid {info.uuid}, "
              f"{len(info.slots)} key slots in use) to {args.file}; it opens with the keys "
              f"of those slots: keep it as safe as they are", file=sys.stderr)
    elif args.command == "header-restore":
        report = admin.header_restore(args.meta, args.file)
        n = len(report.slots_back)
        back = (f"; key slot{'s' * (n > 1)} {', '.join(map(str, report.slots_back))} "
                f"{'are' if n > 1 else 'is'} as at the backup" if n else "")
        print(f"{PROG}: restored the header of {args.meta} (uuid {report.uuid}) from "
              f"{args.file}{back}", file=sys.stderr)
        print(f"{PROG}: warning: {admin.RESTORE_WARNING}", file=sys.stderr)
    elif args.command == "resize":
        result = admin.resize(args.data, args.meta, key_file=args.key_file, sectors=args.sectors)
        if args.json:
            _print_json(result.as_dict())
        else:
            print(result.sectors)
        print(f"{PROG}: {admin.describe_resize(args.meta, result)}", file=sys.stderr)
    elif args.command == "status":
        st = admin.status(_which_device(args, "status"), commands.stats)
        print(json.dumps(st.as_dict(), indent=2) if args.json else admin.format_status(st))
    else:
        return None
    return 0


def _run_check(args: argparse.Namespace) -> int:
    """fsck's exit codes: 0 clean, 4 problems found, 8 could not run."""
    try:
        report = admin.check(args.data, args.meta, key_file=args.key_file,
                             data_blocks=args.data_blocks, quiet=args.json)
    except Exception as e:            # noqa: BLE001 - could not run: one line, code 8
        if os.environ.get("SWORNDISK_DEBUG"):
            traceback.print_exc()
        _error(to_cli_error(e, args.meta))
        return admin.CHECK_FAILED
    if args.json:
        _print_json(report.as_dict())
    else:
        print(admin.format_check(args.data, args.meta, report))
    return admin.CHECK_CLEAN if report.clean else admin.CHECK_PROBLEMS


def _run(args: argparse.Namespace) -> int:
    if args.command == "check":
        return _run_check(args)
    if args.command in ("start", "stop"):
        return _run_tab(args)
    code = _run_admin(args)
    if code is not None:
        return code
    if args.command == "add":
        commands.add(commands.read_table_text(args.table, sys.stdin),
                     key_file=args.key_file, foreground=args.foreground,
                     recoverable=args.recoverable, queues=args.queues, depth=args.depth,
                     stdin_free=args.table != ["-"], on_ready=_ready_printer(args.json),
                     yes=args.yes, anchor=args.anchor, accept_rollback=args.accept_rollback,
                     kdf=_kdf(args), max_sectors=args.max_sectors, name=args.name,
                     read_only=args.read_only, crypto_workers=args.crypto_workers)
    elif args.command == "recover":
        commands.recover(_which_device(args, "recover"), key_file=args.key_file, foreground=args.foreground,
                         on_ready=_ready_printer(args.json),
                         accept_rollback=args.accept_rollback)
    elif args.command == "del":
        if args.all:
            if args.device is not None:
                raise CliError("del: give a device or --all, not both", ExitCode.USAGE)
            return commands.delete_all(wait=args.wait, timeout=args.timeout, report=_error,
                                       force=args.force, deferred=args.deferred)
        commands.delete(_which_device(args, "del"), wait=args.wait, timeout=args.timeout,
                        force=args.force, deferred=args.deferred)
    elif args.command == "list":
        rows = commands.list_devices()
        if args.json:
            print(json.dumps([asdict(r) for r in rows], indent=2))
        else:
            print(commands.format_rows(rows))
    elif args.command == "stats":
        data = commands.stats(_which_device(args, "stats"))
        if args.json:
            _print_json(data)
        else:
            width = max((len(k) for k in data), default=0)
            for key in sorted(data):
                print(f"{key.ljust(width)}  {data[key]}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the console script; returns (and exits with) the exit code."""
    try:
        args = build_parser().parse_args(argv)
        code = _run(args)
    except CliError as e:
        _error(e)
        code = int(e.code)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:            # noqa: BLE001 - last resort: one line, no traceback
        if os.environ.get("SWORNDISK_DEBUG"):
            traceback.print_exc()
        err = to_cli_error(e)
        _error(err)
        code = int(err.code) or 1
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
