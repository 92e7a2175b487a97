"""The SwornDisk ublk target: block requests in, engine calls out.

The kernel sees a device with 4 KiB logical blocks, so every offset and length is a
multiple of 4096 and maps to whole engine blocks.  Queue threads call `handle`
concurrently but the engine is not thread-safe, so one lock serialises every call.

Errors become -errno for the kernel: the engine's IntegrityError (EIO) and NoSpaceError
(ENOSPC) are OSErrors and carry their errno; anything unexpected is an -EIO, logged once
per exception type (never with data) so a failing disk cannot flood the log.
"""
from __future__ import annotations

import errno
import logging
import threading
from typing import Any, Dict, Optional, Set

import ublk_shim
from ublk_shim import Request, Target

from .table import BLOCK_SIZE

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
        device did (writes, cleaning, amplification).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                log.info("engine stats at close: %s", self.disk.stats())
            except Exception:           # noqa: BLE001 - statistics are optional
                pass
            self.disk.close()

    def handle(self, req: Request, buf: memoryview) -> int:
        op = self._ops.get(req.op)
        if op is None:
            return -errno.EOPNOTSUPP
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

    def idle(self) -> None:
        """Give the engine's background work (segment cleaning) a turn when queues are idle.

        Never waits for the lock: if a request holds it, the queues are not idle after all.
        """
        if self._background is None or not self._lock.acquire(blocking=False):
            return
        try:
            if not self._closed:
                self._background()
        except Exception as e:              # noqa: BLE001
            self._log_once(e, None)
        finally:
            self._lock.release()

    # --- helpers --------------------------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        with self._lock:
            return {} if self._closed else dict(self.disk.stats())

    def _read(self, req: Request, buf: memoryview, lba: int, nr_blocks: int) -> int:
        buf[:req.length] = self.disk.read(lba, nr_blocks)
        return req.length

    def _write(self, req: Request, buf: memoryview, lba: int, nr_blocks: int) -> int:
        # No copy here: write() copies into the engine's segment buffer before it returns,
        # so the shim may reuse `buf` for the next request at once.
        self.disk.write(lba, buf[:req.length])
        if req.fua:
            self.disk.flush()
        return req.length

    def _flush(self, req: Request, buf: memoryview, lba: int, nr_blocks: int) -> int:
        self.disk.flush()
        return 0

    def _discard(self, req: Request, buf: memoryview, lba: int, nr_blocks: int) -> int:
        if nr_blocks:
            self.disk.discard(lba, nr_blocks)
        return 0

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
