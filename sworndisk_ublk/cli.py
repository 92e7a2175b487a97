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

from . import commands
from .daemon import Ready
from .errors import CliError, ExitCode, to_cli_error

PROG = "sworndisk-ublk"


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors look like ours (one line, same prefix, exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise CliError(message, ExitCode.USAGE)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="SwornDisk secure block devices served over ublk.",
                epilog="See docs/cli.md for the table format, key handling and exit codes.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    a = sub.add_parser("add", help="create a SwornDisk device /dev/ublkbN from a table",
                       description="TABLE is '<start> <sectors> sworndisk <data_dev> "
                                   "<meta_dev> 0 <format>', or - to read it from stdin.")
    a.add_argument("table", nargs="+", metavar="TABLE|-",
                   help="the table (one quoted argument or its seven words), or -")
    a.add_argument("--key-file", metavar="PATH",
                   help="raw 16/32-byte key or 32/64 hex digits (default: ask for a passphrase)")
    a.add_argument("--foreground", action="store_true", help="serve in this process")
    a.add_argument("--recoverable", action="store_true",
                   help="keep the device (I/O waits) if the server dies; see recover")
    a.add_argument("--queues", type=_positive, default=1, metavar="N", help="default 1")
    a.add_argument("--depth", type=_positive, default=64, metavar="N", help="default 64")
    a.add_argument("--yes", action="store_true",
                   help="with <format> force: overwrite a meta device that already holds a "
                        "SwornDisk without asking (needed where there is no terminal to "
                        "type YES on)")
    a.add_argument("--json", action="store_true", help="print the result as JSON")

    d = sub.add_parser("del", help="stop and delete devices (engine flushed and closed)")
    which = d.add_mutually_exclusive_group(required=True)
    which.add_argument("-n", "--number", type=int, metavar="N", dest="dev_id")
    which.add_argument("--all", action="store_true")
    d.add_argument("--wait", type=_seconds, default=0.0, metavar="SEC",
                   help="wait up to SEC seconds for the device to be unmounted/closed "
                        "(default: fail at once)")
    d.add_argument("--timeout", type=_seconds, default=120.0, metavar="SEC",
                   help="how long the server may take to flush and stop (default 120)")

    ls = sub.add_parser("list", help="list SwornDisk devices")
    ls.add_argument("--json", action="store_true")

    r = sub.add_parser("recover", help="restart the server of a --recoverable device")
    r.add_argument("-n", "--number", type=int, metavar="N", dest="dev_id", required=True)
    r.add_argument("--key-file", metavar="PATH")
    r.add_argument("--foreground", action="store_true")
    r.add_argument("--json", action="store_true")

    s = sub.add_parser("stats", help="show the engine statistics of a running device")
    s.add_argument("-n", "--number", type=int, metavar="N", dest="dev_id", required=True)
    s.add_argument("--json", action="store_true")
    return p


def _error(e: CliError) -> None:
    print(f"{PROG}: error: {e.message}", file=sys.stderr, flush=True)


def _ready_printer(as_json: bool):
    def on_ready(ready: Ready) -> None:
        if as_json:
            print(json.dumps(dict(asdict(ready), dev=ready.dev_path)), flush=True)
        else:
            print(ready.dev_path, flush=True)
        print(f"{PROG}: {commands.describe_ready(ready)}", file=sys.stderr, flush=True)
    return on_ready


def _run(args: argparse.Namespace) -> int:
    if args.command == "add":
        commands.add(commands.read_table_text(args.table, sys.stdin),
                     key_file=args.key_file, foreground=args.foreground,
                     recoverable=args.recoverable, queues=args.queues, depth=args.depth,
                     stdin_free=args.table != ["-"], on_ready=_ready_printer(args.json),
                     yes=args.yes)
    elif args.command == "recover":
        commands.recover(args.dev_id, key_file=args.key_file, foreground=args.foreground,
                         on_ready=_ready_printer(args.json))
    elif args.command == "del":
        if args.all:
            return commands.delete_all(wait=args.wait, timeout=args.timeout, report=_error)
        commands.delete(args.dev_id, wait=args.wait, timeout=args.timeout)
    elif args.command == "list":
        rows = commands.list_devices()
        if args.json:
            print(json.dumps([asdict(r) for r in rows], indent=2))
        else:
            print(commands.format_rows(rows))
    elif args.command == "stats":
        data = commands.stats(args.dev_id)
        if args.json:
            print(json.dumps(data, indent=2, sort_keys=True, default=str))
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
