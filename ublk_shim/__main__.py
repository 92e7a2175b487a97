"""A tiny runner for manual use and tests (the real CLI is sworndisk-ublk).

    python -m ublk_shim null --size 256M [--queues N] [--depth N] [--recoverable]
    python -m ublk_shim loop FILE        [--queues N] [--depth N] [--recoverable]
    python -m ublk_shim loop FILE --record TRACE    # log every request (tools/trace)
    python -m ublk_shim null --size 256M --recover N     # take over a dead server's device
    python -m ublk_shim del N [--force] [--timeout S]
    python -m ublk_shim list

null/loop print "/dev/ublkbN" once the device exists, serve until SIGTERM/SIGINT or until
the device is deleted from elsewhere, then stop + delete it and print one stats line.
A SIGTERM while the device is mounted is refused (printed); a second one forces. `del`
refuses a mounted device too, unless --force: that policy is this runner's, not the
shim's (UblkServer and ctrl stop and delete whatever they are told to).
"""
from __future__ import annotations

import argparse
import errno
import logging
import re
import signal
import sys
import threading

from . import ctrl, holders
from . import sys as uapi
from .errors import UblkError
from .server import UblkServer
from .target import LoopTarget, NullTarget, Target

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'256M' -> 268435456 (K, M, G, T are powers of 1024; an optional trailing B or iB)."""
    m = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def _refuse_if_used(dev_id: int) -> None:
    """UblkError(EBUSY) if /dev/ublkbN or a partition is mounted or held by another block
    device. Programs that merely have it open are not asked: DEL_DEV waits for them."""
    users = holders.block_users(uapi.UBLK_BLOCK_PATH.format(dev_id), with_openers=False)
    if users:
        raise UblkError(errno.EBUSY, f"ublk {dev_id} is in use ({'; '.join(users)}): "
                                     "unmount/release it first")


def _serve(target: Target, args: argparse.Namespace) -> int:
    if args.recover is not None:
        server = UblkServer.recover(target, args.recover)
    else:
        server = UblkServer(target, dev_id=args.dev_id, nr_queues=args.queues,
                            queue_depth=args.depth, max_io_bytes=args.max_io,
                            recoverable=args.recoverable)
        server.add()
        try:
            server.start()
        except BaseException:
            server.delete()
            raise
    print(server.block_path, flush=True)

    requests = []                      # one entry per SIGTERM/SIGINT received
    wake = threading.Event()

    def on_signal(signum, _frame):
        requests.append(signum)
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not server.wait(0.2):
        if wake.is_set():
            wake.clear()
            try:
                if len(requests) == 1:         # the second signal forces
                    _refuse_if_used(server.dev_id)
                server.delete()
                break
            except UblkError as e:
                if server.state == "deleted":
                    raise
                print(f"ublk_shim: {e} (send the signal again to force)", file=sys.stderr,
                      flush=True)
    # The queues ended without us: the device was stopped or deleted from elsewhere. Remove
    # what is left without waiting for its other openers (that is the deleter's business).
    server.delete(wait=False)
    stats = " ".join(f"{k}={v}" for k, v in server.stats().items())
    print(f"ublk {server.dev_id} stats: {stats}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ublk_shim", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    def serving(name: str, help_: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--queues", type=int, default=1)
        s.add_argument("--depth", type=int, default=64)
        s.add_argument("--max-io", type=parse_size, default=512 * 1024)
        s.add_argument("--dev-id", type=int, default=-1, help="device number (default: any)")
        s.add_argument("--recoverable", action="store_true",
                       help="add with USER_RECOVERY so that --recover can take over")
        s.add_argument("--recover", type=int, metavar="N",
                       help="recover device N (its server died) instead of adding one")
        return s

    serving("null", "reads zeros, discards writes").add_argument(
        "--size", type=parse_size, required=True)
    loop = serving("loop", "a file or block device")
    loop.add_argument("file")
    loop.add_argument("--record", metavar="TRACE",
                      help="log every request to this block trace (tools/trace/format.py)")
    d = sub.add_parser("del", help="delete a device")
    d.add_argument("dev_id", type=int)
    d.add_argument("--force", action="store_true", help="even if mounted")
    d.add_argument("--timeout", type=float, default=10.0)
    sub.add_parser("list", help="list devices")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        if args.cmd == "null":
            return _serve(NullTarget(args.size), args)
        if args.cmd == "loop":
            target: Target = LoopTarget(args.file)
            if args.record:
                from .recording import RecordingTarget
                target = RecordingTarget(target, args.record)
            return _serve(target, args)
        if args.cmd == "del":
            if not args.force:
                _refuse_if_used(args.dev_id)
            ctrl.delete_device(args.dev_id, timeout=args.timeout)
            return 0
        for info in ctrl.list_devices():
            print(info.describe())
        return 0
    except (UblkError, OSError) as e:
        print(f"ublk_shim: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
