"""The SwornDisk ublk target: block requests in, engine calls out.

The kernel sees a device with 4 KiB logical blocks, so every offset and length is a
multiple of 4096 and maps to whole engine blocks.  Queue threads call `handle`
concurrently but the engine is not thread-safe, so one lock serialises every call.
A completion batch's READs go to the engine together (handle_batch, read_many), and so do
its runs of consecutive plain WRITEs (write_many).

Errors become -errno for the kernel: the engine's IntegrityError (EIO) and NoSpaceError
(ENOSPC) are OSErrors and carry their errno; anything unexpected is an -EIO, logged once
per exception type (never with data) so a failing disk cannot flood the log.

A recoverable device also keeps a write log (wlog.py): a write or discard is completed to
the kernel only once it is in the engine *and* in the log, and whenever the engine's
commit_seq moves (at a flush, or a commit the engine makes by itself inside write() or
background work) the log restarts empty. If the log cannot be written, the target falls
back to committing each write before completing it (write-through) until it can again.
After a recover that could not restore the log, every FLUSH and FUA write fails with EIO
until the device is released (no mount, holder or opener left; the daemon watches): the
file system that was told those writes were done must learn that they may be gone, and
one failed flush is not enough, since some kernel paths ignore the error of a flush
(ext4's lazy inode-table init, jbd2's journal-tail cleanup).
"""
from __future__ import annotations

import errno
import logging
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import ublk_shim
from sworndisk import BLOCK_SIZE
from ublk_shim import Request, Target
from ublk_shim.target import Outcome, handle_one

from .wlog import WriteLog

log = logging.getLogger("sworndisk_ublk.target")


class SwornDiskTarget(Target):
    """Serves an open `sworndisk.SwornDisk`; closing the target closes the engine."""

    def __init__(self, disk: Any, size: Optional[int] = None):
        self.disk = disk
        self.size = disk.nr_blocks * BLOCK_SIZE if size is None else size
        self._lock = threading.Lock()
        self._closed = False
        self._logged: Set[type] = set()
        self._background = getattr(disk, "background_step", None)
        self._wlog: Optional[WriteLog] = None
        self._write_through = False       # the log failed: commit before completing
        self._wlog_failures = 0           # times the log could not be written
        self._loss = ""                   # while set, FLUSH and FUA writes fail with EIO
        self._flushes_failed = 0
        self.read_only = bool(getattr(disk, "read_only", False))
        self._failing = False             # del --force: every request fails with EIO
        self._ops = {
            ublk_shim.OP_READ: self._read,
            ublk_shim.OP_WRITE: self._write,
            ublk_shim.OP_FLUSH: self._flush,
            ublk_shim.OP_DISCARD: self._discard,
            ublk_shim.OP_WRITE_ZEROES: self._discard,   # discarded blocks read as zeros
        }

    # --- ublk_shim.Target ---------------------------------------------------------------

    def open(self) -> None:
        """Nothing to do: the engine was opened (and the key checked) before the target."""

    def close(self) -> None:
        """Flush and close the engine; idempotent because shutdown paths may overlap.

        The engine's statistics go to the log first: they are the last word on what the
        device did (writes, cleaning, amplification). The write log then restarts empty at
        the final commit (keeping a pending loss), for a recover that may follow.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                log.info("engine stats at close: %s", self.disk.stats().as_dict())
            except Exception:           # noqa: BLE001 - statistics are optional
                pass
            wlog, self._wlog = self._wlog, None
            try:
                self.disk.close()
                if wlog is not None:
                    _restart_quietly(wlog, self.disk.commit_seq)
            finally:
                if wlog is not None:
                    wlog.close()

    def start_log(self, wlog: WriteLog) -> None:
        """From now on every completed write/discard is in `wlog` or committed.

        `wlog` starts at the engine's commit_seq; a loss reason in it makes FLUSH and FUA
        writes fail until release_loss().
        """
        with self._lock:
            if wlog.base != self.disk.commit_seq:
                raise ValueError(f"write log at commit {wlog.base}, engine at "
                                 f"{self.disk.commit_seq}")
            self._wlog = wlog
            self._loss = wlog.loss

    def fail_all(self) -> None:
        """From now on every request fails with EIO without touching the engine (`del
        --force`): the kernel's drain of the device then ends at once, and whatever was
        flushed before stays (close() commits what the engine holds)."""
        self._failing = True

    def handle(self, req: Request, buf: memoryview) -> int:
        if self._failing:
            return -errno.EIO
        op = self._ops.get(req.op)
        if op is None:
            return -errno.EOPNOTSUPP
        if self.read_only and req.op != ublk_shim.OP_READ:
            # The kernel refuses writes to a read-only device before they get here; a
            # flush has nothing to make durable.
            return 0 if req.op == ublk_shim.OP_FLUSH else -errno.EROFS
        if req.op == ublk_shim.OP_FLUSH:
            lba = nr_blocks = 0         # a flush's sector is not meaningful (often garbage)
        elif req.offset % BLOCK_SIZE or req.length % BLOCK_SIZE:
            return -errno.EINVAL
        else:
            lba, nr_blocks = req.offset // BLOCK_SIZE, req.length // BLOCK_SIZE
        with self._lock:
            try:
                return op(req, buf, lba, nr_blocks)
            except OSError as e:            # IntegrityError, NoSpaceError, device errors
                if e.errno != errno.ENOSPC:     # a full disk is the user's business
                    self._log_once(e, req)
                return -(e.errno or errno.EIO)
            except Exception as e:          # noqa: BLE001 - the kernel gets -EIO whatever it is
                self._log_once(e, req)
                return -errno.EIO
            finally:
                self._follow_commits()      # even a failed call may have committed

    def handle_batch(self, batch: Sequence[Tuple[Request, memoryview]]) -> List[Outcome]:
        """A completion batch: all its READs with one engine read_many (the engine looks
        them up together and the backing device reads them all at once), then writes,
        discards and flushes in order, each run of consecutive plain WRITEs with one
        write_many. The requests were all in flight together, so no order among them is
        owed; a FLUSH covers the writes completed before it, those of earlier batches. A
        bad block fails its own READ only."""
        if self._failing:
            return [-errno.EIO] * len(batch)
        out: List[Outcome] = [None] * len(batch)
        reads = [i for i, (req, _) in enumerate(batch) if req.op == ublk_shim.OP_READ]
        if len(reads) > 1:
            self._read_many(batch, reads, out)
        i = 0
        while i < len(batch):
            j = i
            while j < len(batch) and not self.read_only and _plain_write(batch[j][0]):
                j += 1
            if j - i > 1:                   # consecutive plain WRITEs: one write_many
                self._write_many(batch, range(i, j), out)
            for k in range(i, max(j, i + 1)):
                if out[k] is None:
                    out[k] = handle_one(self, *batch[k])
            i = max(j, i + 1)
        return out

    def _write_many(self, batch: Sequence[Tuple[Request, memoryview]], group: range,
                    out: List[Outcome]) -> None:
        """Plain WRITEs (aligned, no FUA) into the engine with one write_many, each then
        kept in the write log as handle() keeps it. If the engine refuses the call, each
        request goes through handle() and reports its own outcome (writing one again is
        harmless: same data, same place)."""
        items = [(batch[i][0].offset // BLOCK_SIZE, batch[i][1][:batch[i][0].length])
                 for i in group]
        with self._lock:
            if self._closed:
                return
            try:
                self.disk.write_many(items)
            except Exception:               # noqa: BLE001 - handle() reports each one
                return
            finally:
                self._follow_commits()      # even a failed call may have committed
            for i, (lba, data) in zip(group, items):
                self._keep(lambda wlog, lba=lba, data=data: wlog.append_write(lba, data))
                out[i] = batch[i][0].length

    def _read_many(self, batch: Sequence[Tuple[Request, memoryview]], reads: List[int],
                   out: List[Outcome]) -> None:
        """Serves aligned READs together; leaves anything else (and a batch the engine
        refuses as a whole, e.g. a range past the end) to handle()."""
        todo = [i for i in reads
                if not (batch[i][0].offset % BLOCK_SIZE or batch[i][0].length % BLOCK_SIZE)]
        ranges = [(batch[i][0].offset // BLOCK_SIZE, batch[i][0].length // BLOCK_SIZE)
                  for i in todo]
        with self._lock:
            if self._closed:
                return
            try:
                pending = self.disk.start_reads(ranges)
            except Exception:               # noqa: BLE001 - handle() reports each one
                return
        try:        # the verification, outside the lock: another queue's calls go in
            results = pending.result()
        except Exception:                   # noqa: BLE001 - handle() reports each one
            return
        for i, res in zip(todo, results):
            req, buf = batch[i]
            if isinstance(res, OSError):    # IntegrityError: EIO for this request alone
                self._log_once(res, req)
                out[i] = -(res.errno or errno.EIO)
            elif isinstance(res, Exception):
                self._log_once(res, req)
                out[i] = -errno.EIO
            else:
                buf[:req.length] = res
                out[i] = req.length

    def idle(self) -> None:
        """Give the engine's background work (a merge in progress, segment cleaning) a turn
        when queues are idle.

        Never waits for the lock: if a request holds it, the queues are not idle after all.
        """
        if self._background is None or self.read_only or self._failing \
                or not self._lock.acquire(blocking=False):
            return
        try:
            if not self._closed:
                self._background()
        except Exception as e:              # noqa: BLE001
            self._log_once(e, None)
        finally:
            try:
                if not self._closed:
                    self._follow_commits()  # cleaning commits its moves
            finally:
                self._lock.release()

    # --- helpers --------------------------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        """The engine's statistics, plus the write log's (prefixed wlog_) when it has one."""
        with self._lock:
            if self._closed:
                return {}
            out = self.disk.stats().as_dict()
            if self._wlog is not None:
                out.update(wlog_base=self._wlog.base, wlog_records=self._wlog.records,
                           wlog_bytes_appended=self._wlog.appended_bytes,
                           wlog_restarts=self._wlog.restarts,
                           wlog_write_through=self._write_through,
                           wlog_failures=self._wlog_failures,
                           wlog_loss_pending=self._loss or None,
                           wlog_flushes_failed=self._flushes_failed)
            return out

    def _read(self, req: Request, buf: memoryview, lba: int, nr_blocks: int) -> int:
        buf[:req.length] = self.disk.read(lba, nr_blocks)
        return req.length

    def _write(self, req: Request, buf: memoryview, lba: int, nr_blocks: int) -> int:
        if req.fua and self._loss:
            return self._report_loss()
        # No copy here: write() copies into the engine's segment buffer before it returns,
        # so the shim may reuse `buf` for the next request at once.
        data = buf[:req.length]
        self.disk.write(lba, data)
        if req.fua:
            self.disk.flush()           # committed: the log restarts, nothing to append
        else:
            self._keep(lambda wlog: wlog.append_write(lba, data))
        return req.length

    def _flush(self, req: Request, buf: memoryview, lba: int, nr_blocks: int) -> int:
        if self._loss:
            return self._report_loss()
        self.disk.flush()
        return 0

    def _discard(self, req: Request, buf: memoryview, lba: int, nr_blocks: int) -> int:
        if nr_blocks:
            self.disk.discard(lba, nr_blocks)
            self._keep(lambda wlog: wlog.append_discard(lba, nr_blocks))
        return 0

    # --- the write log --------------------------------------------------------------------

    def _keep(self, append: Callable[[WriteLog], None]) -> None:
        """Make a write/discard the engine just took survive this process before it is
        completed: in the log, or, if the log fails, committed."""
        if self._wlog is None:
            return
        self._follow_commits()          # the call may have committed: restart first
        if not self._write_through:
            try:
                append(self._wlog)
                return
            except OSError as e:
                self._enter_write_through(e)
        self.disk.flush()
        self._follow_commits()

    def _follow_commits(self) -> None:
        """Restart the log when the engine has committed: all it held is durable now.

        Restarting even when the call covered only part of what was logged is safe: the
        current request is appended after the restart (replaying it twice is harmless).
        """
        wlog = self._wlog
        if wlog is None or (wlog.base == self.disk.commit_seq and not self._write_through):
            return
        try:
            wlog.restart(self.disk.commit_seq)
        except OSError as e:
            self._enter_write_through(e)
            return
        self._write_through = False

    def _enter_write_through(self, exc: OSError) -> None:
        """Logged the first time only: a full tmpfs could otherwise fail every write."""
        self._write_through = True
        self._wlog_failures += 1
        if self._wlog_failures == 1:
            log.error("cannot write the write log %s (%s): until it works again, every "
                      "write is committed before it completes (counted in stats as "
                      "wlog_failures)", self._wlog.path, exc)

    @property
    def failure(self) -> Optional[str]:
        """Why the engine stopped accepting writes (its failure latch), or None."""
        return getattr(self.disk, "failure", None)

    @property
    def loss_pending(self) -> str:
        """Why flushes fail (a wlog.LOSS_REASONS name), or "" when they work."""
        return self._loss

    def release_loss(self) -> None:
        """The device is no longer in use by whoever saw the lost writes: flushes work again.

        Recorded in the log (E) first, so a server killed now does not fail flushes again.
        """
        with self._lock:
            if not self._loss or self._wlog is None:
                return
            try:
                self._wlog.append_loss_released()
            except OSError as e:        # a later recover fails flushes again: the safe side
                log.error("cannot record the release in the write log: %s", e)
            log.warning("the device is no longer in use: flushes work again (%d failed "
                        "with EIO since the loss)", self._flushes_failed)
            self._loss = ""

    def _report_loss(self) -> int:
        """Fail this FLUSH / FUA write with EIO: completed writes may have been lost."""
        self._flushes_failed += 1
        if self._flushes_failed == 1:
            log.warning("failing flushes with EIO until the device is released: completed "
                        "writes may have been lost at recover (%s)", self._loss)
        return -errno.EIO

    def _log_once(self, exc: BaseException, req: Optional[Request]) -> None:
        kind = type(exc)
        if kind in self._logged:
            return
        self._logged.add(kind)
        where = (f"op {req.op} offset {req.offset} length {req.length}" if req is not None
                 else "background work")
        # The message is the exception's own text; request data is never logged.
        log.error("%s failed: %s: %s (further %s errors are not logged)",
                  where, kind.__name__, exc, kind.__name__)


def _plain_write(req: Request) -> bool:
    """A WRITE that write_many can take: whole blocks, no FUA."""
    return (req.op == ublk_shim.OP_WRITE and not req.fua
            and not (req.offset % BLOCK_SIZE or req.length % BLOCK_SIZE))


def _restart_quietly(wlog: WriteLog, commit_seq: int) -> None:
    """Restart the log at the final commit; if that fails, the old log (which starts
    before that commit, so all of it is covered) is just as correct."""
    try:
        wlog.restart(commit_seq)
    except OSError as e:
        log.error("cannot restart the write log %s at close: %s", wlog.path, e)
