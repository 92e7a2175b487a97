"""The SwornDisk ublk server process: start-up, background mode, signals, shutdown.

`add` works like ``ublk add`` of ublksrv: the server runs in the background and `add`
returns once /dev/ublkbN exists.  The server is a grandchild (fork, setsid, fork) so it
has no controlling terminal and is not killed with the shell; its stdio goes to a log in
the state directory.  The grandchild does everything that can fail (opening the engine,
checking the key, ADD_DEV, START_DEV) so that `add` itself reports those errors and exits
non-zero: it reads the grandchild's start-up report from a pipe, one line of

    pid <pid>
    ready <json>           (dev_id, size, usable, pid, log)
    error <code> <message>

The ublk driver requires the process that opened /dev/ublkcN to be the one that issues
START_DEV (it records the opener's pid), which is one more reason for the grandchild to do
it all.  Keys reach the grandchild only through fork-inherited memory.

On SIGTERM/SIGINT, or when the device is stopped from outside, the server stops the
device, lets the engine flush and close, deletes the device and removes its state file.

A `--recoverable` server keeps a write log of the writes it completed since the engine's
last commit (wlog.py, restore.py); `recover` replays it before it takes the device over,
or, when it cannot, makes the loss visible (flushes fail with EIO until the device is
released, a warning, `list`).
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Optional

import ublk_shim
from ublk_shim import holders
from ublk_shim.sys import UBLK_BLOCK_PATH, libc

from . import names, restore, state
from .errors import CliError, ExitCode, to_cli_error
from .keys import KeySource
from .table import Table
from .target import SwornDiskTarget
from .volume import OpenOptions, capacity, open_disk
from .wlog import LogKeys, WriteLog

log = logging.getLogger("sworndisk_ublk.daemon")

DEFAULT_START_TIMEOUT = 600.0     # Python under TCG is slow; a format may take a while
PR_SET_DUMPABLE = 4
STOP_WAIT = 60.0                  # how long shutdown waits for the queues to drain
REQUEST_FORCE, REQUEST_DEFERRED = "force", "deferred"    # del's requests (SIGUSR2)


def start_timeout() -> float:
    return float(os.environ.get("SWORNDISK_START_TIMEOUT") or DEFAULT_START_TIMEOUT)


@dataclass(frozen=True)
class ServerOptions:
    """Everything a server needs besides the key (which is never stored)."""

    table: Table
    recoverable: bool = False
    queues: int = 1
    depth: int = 64
    recover_dev_id: Optional[int] = None      # set: resume a dead server's device
    anchor: Optional[str] = None              # the rollback anchor file (absolute)
    accept_rollback: bool = False             # open a disk older than its anchor
    kdf: Any = None                           # Argon2id cost of a new passphrase slot
    max_blocks: Optional[int] = None          # a new disk's meta room for growing (resize)
    name: Optional[str] = None                # /dev/sworndisk/NAME (names.py)
    read_only: bool = False                   # the kernel and the engine see a read-only disk
    crypto_workers: Optional[int] = None      # engine crypto worker processes (None: auto)


@dataclass(frozen=True)
class Ready:
    """What a server reports once its block device exists."""

    dev_id: int
    pid: int
    size: int
    usable: int
    log: str
    replayed: int = 0                 # recover: writes/discards put back from the write log
    lost: Optional[str] = None        # recover: the warning when completed writes may be lost

    @property
    def dev_path(self) -> str:
        return UBLK_BLOCK_PATH.format(self.dev_id)


class Server:
    """One SwornDisk ublk device and its engine, from start-up to shutdown."""

    def __init__(self, opts: ServerOptions, source: KeySource, log_file: str):
        self.opts = opts
        self.source = source
        self.log_file = log_file
        self.target: Any = None          # SwornDiskTarget once the engine is open
        self.ublk: Any = None
        self.dev_id = -1
        self._wake = threading.Event()
        self._stop_requested = False
        self._stats_requested = False
        self._failure: Optional[str] = None   # the engine failure already recorded
        self._request_pending = False      # SIGUSR2: del --force / --deferred (state.request_path)
        self._forced = False               # del --force: fail every request, stop at once
        self._record: Optional[state.DeviceState] = None     # what start() saved

    @property
    def dev_path(self) -> str:
        return UBLK_BLOCK_PATH.format(self.dev_id)

    # --- start-up ---------------------------------------------------------------------------

    def start(self) -> Ready:
        """Open the engine, create (or recover) the ublk device, record the state."""
        table, opts = self.opts.table, self.opts
        recovering = opts.recover_dev_id is not None
        # The server holds the keys from here on: no core dump, no ptrace by the user's
        # other processes (its crypto workers make themselves non-dumpable too).
        libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        disk = open_disk(table, self.source, format=False if recovering else None,
                         opts=OpenOptions(opts.anchor, opts.accept_rollback, opts.kdf,
                                          max_blocks=opts.max_blocks, read_only=opts.read_only,
                                          crypto_workers=opts.crypto_workers))
        self.source = KeySource(self.source.description)     # drop the secret reference
        self.target = SwornDiskTarget(disk, size=table.size)
        outcome = restore.RestoreOutcome(0)
        try:
            if recovering:
                self.dev_id = opts.recover_dev_id
                outcome = self._restore(disk)
                # Queue count and depth are the device's own (the kernel may have granted
                # fewer queues than were asked for), so they are not passed again.
                self.ublk = ublk_shim.UblkServer.recover(self.target, opts.recover_dev_id)
            else:
                self.ublk = ublk_shim.UblkServer(
                    self.target, dev_id=-1, nr_queues=opts.queues, queue_depth=opts.depth,
                    recoverable=opts.recoverable, read_only=opts.read_only)
                self.dev_id = self.ublk.add()
                restore.forget(self.dev_id)        # a previous device's log and loss note
                if opts.recoverable:
                    self._start_log(disk, "")
                self.ublk.start()
        except BaseException:
            # The shim undoes its own half-done work (queues, device); the engine is ours.
            self.target.close()
            raise
        self._adopt_log()
        cap = capacity(table)
        self._record = state.DeviceState(
            dev_id=self.dev_id, pid=os.getpid(), pid_start=holders.start_time(os.getpid()),
            table=table.line(), data=table.data_dev, meta=table.meta_dev, size=table.size,
            recoverable=opts.recoverable, queues=self._granted("nr_queues", opts.queues),
            depth=self._granted("queue_depth", opts.depth),
            log=self.log_file, key_slot=disk.key_slot, anchor=opts.anchor,
            name=opts.name, read_only=opts.read_only)
        state.save(self._record)
        if opts.name:               # once the device is live (and recorded under its name)
            self._link()
        log.info("serving %s: %s (%s)", self.dev_path, table.line(), cap.describe())
        lost = outcome.message(self.dev_path) if outcome.loss else None
        return Ready(self.dev_id, os.getpid(), cap.size, cap.usable, self.log_file,
                     replayed=outcome.replayed, lost=lost)

    def _link(self) -> None:
        """Make /dev/sworndisk/NAME; a failure costs the name only, not the device."""
        try:
            state.save_name(self.dev_id, self.opts.name)
            names.make_link(self.opts.name, self.dev_path)
        except (OSError, CliError) as e:
            log.error("cannot make the link of %s: %s", self.dev_path, e)
            return
        names.announce(self.dev_path)

    def _restore(self, disk: Any) -> "restore.RestoreOutcome":
        """Put back what the dead server completed, then log anew from the engine's commit.

        The loss note for `list` is written before the new log replaces the old one; the
        new log itself carries the obligation to fail the next flush.
        """
        outcome = restore.restore(disk, restore.log_path(self.dev_id))
        if outcome.loss:
            restore.save_loss(self.dev_id, outcome)
        self._start_log(disk, outcome.loss)
        return outcome

    def _start_log(self, disk: Any, loss: str) -> None:
        self.target.start_log(WriteLog.create(restore.log_path(self.dev_id), LogKeys.of(disk),
                                              disk.commit_seq, loss))

    def _granted(self, field: str, asked: int) -> int:
        info = getattr(self.ublk, "info", None)
        return int(getattr(info, field, asked) or asked)

    def _adopt_log(self) -> None:
        """Rename the start-up log (named by pid) after the device, now that its number is known."""
        wanted = state.log_path(self.dev_id)
        if self.log_file in ("-", wanted):
            return
        os.replace(self.log_file, wanted)
        self.log_file = wanted

    # --- serving ---------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop cleanly; SIGUSR1 dumps engine stats to the state directory."""
        def stop(signum: int, frame: Any) -> None:
            self._stop_requested = True
            self._wake.set()

        def stats(signum: int, frame: Any) -> None:
            self._stats_requested = True
            self._wake.set()

        def request(signum: int, frame: Any) -> None:
            self._request_pending = True
            self._wake.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, stop)
        signal.signal(signal.SIGUSR1, stats)
        signal.signal(signal.SIGUSR2, request)

    def serve(self) -> None:
        """Run until a stop signal or until the device is stopped from outside; then shut down.

        The shim's wait() runs in a helper thread so the main thread stays free for
        signal handlers (Python runs them only in the main thread).
        """
        waiter = threading.Thread(target=self._wait_device, name="ublk-wait", daemon=True)
        waiter.start()
        while not self._stop_requested and waiter.is_alive():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stats_requested:
                self._stats_requested = False
                self.write_stats()
            if self._request_pending:
                self._request_pending = False
                self._take_request()
            if self.target.loss_pending:
                self._release_when_unused()
            self.note_failure()
            if self._record is not None and self._record.pending_removal \
                    and not holders.block_users(self.dev_path):
                log.info("%s: its last user closed it; removing it (del --deferred)",
                         self.dev_path)
                self._stop_requested = True
        reason = ("forced removal (del --force)" if self._forced else
                  "stop requested" if self._stop_requested else "device stopped")
        log.info("shutting down %s: %s", self.dev_path, reason)
        self.shutdown(waiter)

    def note_failure(self) -> None:
        """Once the engine latched a failure (the backing storage failed: every request now
        fails with EIO), say so in the log and the state file, once: list and status show it."""
        reason = self.target.failure
        if reason and reason != self._failure:
            self._failure = reason
            log.error("the disk failed and accepts no more writes: %s; reconnect the "
                      "storage, then del and add (or recover) to reopen it at its last "
                      "completed flush", reason)
            state.record_failure(self.dev_id, os.getpid(), reason)

    def _take_request(self) -> None:
        """Act on what `del` left in the request file: `force` stops now, failing every
        request; `deferred` stops once nothing uses the device (and `list` says so)."""
        path = state.request_path(self.dev_id)
        try:
            with open(path) as f:
                what = f.read().strip()
            os.unlink(path)
        except OSError:
            return
        if what == REQUEST_FORCE:
            self._forced = True
            self._stop_requested = True
            self.target.fail_all()
        elif what == REQUEST_DEFERRED and self._record is not None:
            self._record = replace(self._record, pending_removal=True, failed=self._failure)
            state.save(self._record)
            log.info("%s: removal deferred until its last user closes it", self.dev_path)
        else:
            log.warning("ignoring an unknown request %r in %s", what, path)

    def _release_when_unused(self) -> None:
        """End the EIO on flushes once nothing that saw the lost writes uses the device:
        no mount, no stacked holder, no process with it open."""
        if not holders.block_users(self.dev_path):
            self.target.release_loss()

    def _wait_device(self) -> None:
        try:
            self.ublk.wait()
        except Exception as e:          # noqa: BLE001 - logged; shutdown follows
            log.error("ublk server failed: %s", e)
        finally:
            self._wake.set()

    def shutdown(self, waiter: Optional[threading.Thread] = None) -> None:
        """Stop the device, flush and close the engine, delete the device, forget the state.

        A device still mounted or held is stopped all the same: the process was asked to
        terminate, and flushing the engine is the best it can still do (`del` checks for
        users before it sends SIGTERM, unless --force). Its users then get EIO, and the
        device is deleted without waiting for them (DEL_DEV_ASYNC): its number is freed
        when the last one lets go.
        """
        busy = self._forced or bool(holders.block_users(self.dev_path))
        if self._forced:
            self.target.fail_all()
        try:
            self.ublk.stop()
        except Exception as e:          # noqa: BLE001 - still close the engine
            log.error("stopping the device failed: %s", e)
        if waiter is not None:
            waiter.join(STOP_WAIT)
        self.target.close()             # the shim closed it already; idempotent
        try:
            self.ublk.delete(wait=not busy)
        except Exception as e:          # noqa: BLE001
            log.error("deleting the device failed: %s", e)
        else:                           # the engine committed everything at close
            st = state.load(self.dev_id)
            if st is None or st.pid == os.getpid():     # not a newer device's log
                restore.forget(self.dev_id)
        if self.opts.name:
            names.remove_link(self.opts.name, self.dev_path)
        state.remove(self.dev_id, expect_pid=os.getpid())
        log.info("%s deleted", self.dev_path)

    def write_stats(self) -> None:
        if self.target is None:
            return
        path = state.stats_path(self.dev_id)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.target.stats(), f, sort_keys=True, default=str)
        os.replace(tmp, path)


# --- foreground ---------------------------------------------------------------------------

def run_foreground(opts: ServerOptions, source: KeySource,
                   on_ready: Callable[[Ready], None]) -> None:
    """Serve in this process until Ctrl-C/SIGTERM (``add --foreground``)."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, force=True,
                        format="sworndisk-ublk: %(message)s")
    server = Server(opts, source, log_file="-")
    server.install_signal_handlers()
    try:
        ready = server.start()
    except Exception as e:             # noqa: BLE001
        raise to_cli_error(e, opts.table.meta_dev) from None
    on_ready(ready)
    server.serve()


# --- background ---------------------------------------------------------------------------

def start_background(opts: ServerOptions, source: KeySource) -> Ready:
    """Fork the server into the background; return when its device exists.

    Raises CliError with the server's own message when start-up fails.
    """
    state.ensure_run_dir()
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # first child
        os.close(rfd)
        try:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            _daemon_main(opts, source, wfd)        # grandchild: the server
        finally:
            os._exit(1)
    os.close(wfd)
    os.waitpid(pid, 0)
    with os.fdopen(rfd, "rb") as pipe:
        return _await_ready(pipe, opts)


class _Startup:
    """What the parent has learnt from the server's start-up report so far."""

    def __init__(self) -> None:
        self.pid = 0
        self.log = ""

    def where(self) -> str:
        return f"log: {self.log or state.run_dir()}"


def _await_ready(pipe: Any, opts: ServerOptions) -> Ready:
    """Read the server's start-up report; a timeout or Ctrl-C stops the server."""
    seen = _Startup()
    try:
        return _read_report(pipe, opts, seen)
    except KeyboardInterrupt:
        if seen.pid:
            _kill_quietly(seen.pid)
        raise


def _read_report(pipe: Any, opts: ServerOptions, seen: _Startup) -> Ready:
    deadline = time.monotonic() + start_timeout()
    buf = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if seen.pid:
                _kill_quietly(seen.pid)
            raise CliError(f"the server did not come up within {start_timeout():.0f} s and "
                           f"was stopped ({seen.where()})", ExitCode.FAILED)
        if not select.select([pipe], [], [], remaining)[0]:
            continue
        chunk = os.read(pipe.fileno(), 65536)
        if not chunk:
            raise CliError(f"the server exited during start-up ({seen.where()})",
                           ExitCode.FAILED)
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            word, _, rest = line.decode("utf-8", "replace").partition(" ")
            if word == "pid":
                pid, _, seen.log = rest.partition(" ")
                seen.pid = int(pid)
            elif word == "ready":
                return Ready(**json.loads(rest))
            elif word == "error":
                code, _, message = rest.partition(" ")
                if seen.log and opts.recover_dev_id is None:
                    _remove_quietly(seen.log)      # the message says it all
                raise CliError(message, ExitCode(int(code)))


def _daemon_main(opts: ServerOptions, source: KeySource, report_fd: int) -> None:
    """Body of the grandchild; never returns."""
    code = 1
    try:
        os.chdir("/")                 # do not pin the caller's working directory's mount
        log_file = _redirect_stdio(opts)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, force=True,
                            format="%(asctime)s [%(process)d] %(levelname)s %(message)s")
        _report(report_fd, f"pid {os.getpid()} {log_file}")
        server = Server(opts, source, log_file)
        server.install_signal_handlers()
        try:
            ready = server.start()
        except Exception as e:        # noqa: BLE001
            err = to_cli_error(e, opts.table.meta_dev)
            log.error("start-up failed: %s", err.message)
            _report(report_fd, f"error {int(err.code)} {err.message}")
            return
        _report(report_fd, "ready " + json.dumps(asdict(ready)))
        os.close(report_fd)
        report_fd = -1
        server.serve()
        code = 0
    except BaseException:             # noqa: BLE001 - last resort: into the log
        logging.getLogger("sworndisk_ublk").exception("server failed")
    finally:
        logging.shutdown()
        os._exit(code)


def _redirect_stdio(opts: ServerOptions) -> str:
    """Point fds 0/1/2 at /dev/null and the log; returns the log path."""
    if opts.recover_dev_id is not None:
        path = state.log_path(opts.recover_dev_id)
    else:   # the device number is not known yet; renamed once it is
        path = os.path.join(state.run_dir(), f"add-{os.getpid()}.log")
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null_fd)
    os.close(log_fd)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    return path


def _report(fd: int, line: str) -> None:
    """One line to the waiting `add`; if it is gone (Ctrl-C), the server carries on."""
    if fd < 0:
        return
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode("utf-8"))
    except BrokenPipeError:
        log.warning("the starting command is gone; serving anyway")


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        pass


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
