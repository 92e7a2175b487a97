"""UblkServer: one ublk device served by a Target, from ADD_DEV to DEL_DEV.

    server = UblkServer(NullTarget(1 << 30))
    dev_id = server.add()      # target.open(), ADD_DEV, SET_PARAMS
    server.start()             # queue threads FETCH every tag, START_DEV; /dev/ublkbN exists
    server.wait()              # until the device is stopped (by del elsewhere, or stop())
    server.stop()              # STOP_DEV, queue threads wind down, target.close()
    server.delete()            # DEL_DEV

The public methods are meant to be called from one thread (normally the main thread); the
queue threads are internal. Every blocking step has a timeout, so none of them can hang.
"""
from __future__ import annotations

import errno
import logging
import os
import time
from typing import Dict, List, Optional

from . import holders
from . import sys as uapi
from .ctrl import DEFAULT_TIMEOUT, Control, DeviceParams, DevInfo
from .errors import UblkError
from .queue import Queue
from .target import OP_NAMES, Target

log = logging.getLogger("ublk_shim")

_NEW, _ADDED, _STARTED, _STOPPED, _DELETED = "new", "added", "started", "stopped", "deleted"
_NODE_TIMEOUT = 5.0        # udev/devtmpfs may lag behind ADD_DEV / START_DEV a little
_QUEUE_READY_TIMEOUT = 30.0

# With USER_RECOVERY alone, requests the dead server had taken but not answered fail with
# EIO; REISSUE hands them to the new server instead. Re-executing a READ, WRITE, FLUSH or
# DISCARD is harmless: the block layer counts a request complete only once it is committed,
# so the upper layer never saw these finish, and it never keeps two overlapping writes in
# flight, so a repeated write cannot overtake a newer one.
RECOVERY_FLAGS = uapi.UBLK_F_USER_RECOVERY | uapi.UBLK_F_USER_RECOVERY_REISSUE


class UblkServer:
    """Serve `target` as /dev/ublkbN.

    dev_id: -1 lets the kernel pick the number. nr_queues / queue_depth / max_io_bytes are
    requests: the kernel may grant fewer queues (one per CPU at most) and round max_io_bytes
    down to a page; `info` holds what was granted. recoverable: add with USER_RECOVERY |
    USER_RECOVERY_REISSUE, so that the device survives this process and `recover` can take
    it over. idle_interval: how long a queue waits for requests before calling target.idle().
    """

    def __init__(self, target: Target, dev_id: int = -1, nr_queues: int = 1,
                 queue_depth: int = 64, max_io_bytes: int = 512 * 1024,
                 recoverable: bool = False, *, idle_interval: float = 0.05,
                 timeout: float = DEFAULT_TIMEOUT, read_only: bool = False):
        if not 1 <= nr_queues <= uapi.UBLK_MAX_NR_QUEUES:
            raise UblkError(errno.EINVAL, f"nr_queues {nr_queues} is not in 1..4096")
        if not 1 <= queue_depth <= uapi.UBLK_MAX_QUEUE_DEPTH:
            raise UblkError(errno.EINVAL, f"queue_depth {queue_depth} is not in 1..4096")
        page = uapi.page_size()
        if not (page <= max_io_bytes <= uapi.UBLK_MAX_IO_BUF_BYTES and max_io_bytes % page == 0):
            raise UblkError(errno.EINVAL, f"max_io_bytes {max_io_bytes} must be a multiple of "
                                          f"{page} up to {uapi.UBLK_MAX_IO_BUF_BYTES}")
        self.target = target
        self.dev_id = dev_id
        self.nr_queues = nr_queues
        self.queue_depth = queue_depth
        self.max_io_bytes = max_io_bytes
        self.recoverable = recoverable
        self.read_only = read_only
        self.idle_interval = idle_interval
        self.timeout = timeout
        self.info: Optional[DevInfo] = None
        self._ctrl: Optional[Control] = None
        self._queues: List[Queue] = []
        self._char_fd = -1
        self._target_open = False
        self._state = _NEW

    # ---- paths and status ----------------------------------------------------------------

    @property
    def block_path(self) -> str:
        return uapi.UBLK_BLOCK_PATH.format(self.dev_id)

    @property
    def char_path(self) -> str:
        return uapi.UBLK_CHAR_PATH.format(self.dev_id)

    @property
    def state(self) -> str:
        """new, added, started, stopped or deleted."""
        return self._state

    def stats(self) -> Dict[str, int]:
        """Requests served so far, by op, summed over queues; 'failed' counts error results,
        'batches' the target.handle_batch calls and 'max_batch' the largest batch (> 1 shows
        that requests at depth are served together)."""
        out = {name: 0 for name in OP_NAMES.values()}
        out.update(failed=0, batches=0, max_batch=0)
        for q in self._queues:
            for op, name in OP_NAMES.items():
                out[name] += q.counts[op]
            out["failed"] += q.failed
            out["batches"] += q.batches
            out["max_batch"] = max(out["max_batch"], q.max_batch)
        return out

    # ---- lifecycle -----------------------------------------------------------------------

    def add(self) -> int:
        """target.open(), ADD_DEV, SET_PARAMS; returns the device number.

        /dev/ublkcN exists afterwards, /dev/ublkbN only after start().
        """
        self._expect(_NEW, "add")
        self._open_target()
        try:
            ctrl = self._ctrl = Control()
            flags = RECOVERY_FLAGS if self.recoverable else 0
            if flags and ctrl.features is not None and not ctrl.features & uapi.UBLK_F_USER_RECOVERY:
                raise UblkError(errno.EOPNOTSUPP, "this kernel's ublk has no USER_RECOVERY")
            self.info = ctrl.add_dev(self.dev_id, self.nr_queues, self.queue_depth,
                                     self.max_io_bytes, flags)
            self.dev_id = self.info.dev_id
            self._state = _ADDED
            missing = flags & ~self.info.flags
            if missing:
                raise UblkError(errno.EOPNOTSUPP, f"ublk {self.dev_id}: the kernel did not "
                                f"grant {uapi.flag_names(missing)}")
            ctrl.set_params(self.dev_id, DeviceParams(size=self.target.size,
                                                      max_io_bytes=self.info.max_io_bytes,
                                                      read_only=self.read_only))
        except BaseException:
            self._abandon()
            raise
        log.info("%s", self.info.describe())
        return self.dev_id

    def start(self) -> None:
        """Arm every queue, then START_DEV; returns once /dev/ublkbN exists.

        START_DEV blocks in the kernel until every tag is fetched and then reads the
        partition table through the device, so the queue threads are serving before it is
        sent (from this thread, waited for with a timeout).
        """
        self._expect(_ADDED, "start")
        try:
            self._open_char()
            self._start_queues()
            self._ctrl.start_dev(self.dev_id, os.getpid(), self.timeout)
        except BaseException:
            self._abandon()
            raise
        self._state = _STARTED
        _wait_for_node(self.block_path)

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until every queue thread has ended (the device was stopped or deleted, by
        stop() or by another process); True if so, False if `timeout` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for q in self._queues:
            # Short joins keep the calling (main) thread responsive to signals.
            while not q.join(0.5 if deadline is None else
                             max(0.0, min(0.5, deadline - time.monotonic()))):
                if deadline is not None and time.monotonic() >= deadline:
                    return False
        return True

    def stop(self) -> None:
        """STOP_DEV, wait for the queues to wind down, target.close(). Idempotent.

        A file system mounted on /dev/ublkbN, and programs that have it open, get I/O
        errors afterwards: refusing to stop a device in use is the caller's policy.
        """
        if self._state == _STARTED:
            try:
                self._ctrl.stop_dev(self.dev_id, self.timeout)
            except UblkError as e:
                if e.errno != errno.ENODEV:      # already deleted from elsewhere: fine
                    raise
            self._join_queues()
            self._state = _STOPPED
        elif self._state == _ADDED:
            self._state = _STOPPED
        self._release()

    def delete(self, *, timeout: float = 10.0, wait: bool = True) -> None:
        """stop() if needed, then DEL_DEV. Idempotent; a device already deleted elsewhere is
        fine. Waits at most `timeout` s for other openers of the device to let go, then
        raises UblkError(EBUSY) (the device is gone; only its number stays reserved).
        wait=False returns right after the removal (DEL_DEV_ASYNC where available)."""
        if self._state in (_NEW, _DELETED):
            return
        self.stop()
        try:
            self._ctrl.del_dev(self.dev_id, timeout, wait=wait)
        except UblkError as e:
            if e.errno != errno.ENODEV:
                raise
        finally:
            self._state = _DELETED
            self._close_ctrl()

    def __enter__(self) -> "UblkServer":
        return self

    def __exit__(self, *exc) -> None:
        self.delete()

    # ---- recovery ------------------------------------------------------------------------

    @classmethod
    def recover(cls, target: Target, dev_id: int, nr_queues: Optional[int] = None,
                queue_depth: Optional[int] = None, *, idle_interval: float = 0.05,
                timeout: float = DEFAULT_TIMEOUT) -> "UblkServer":
        """Take over device `dev_id`, whose (recoverable) server died; returns it serving.

        START_USER_RECOVERY (retried while the dead server is still being torn down), open
        /dev/ublkcN, map and FETCH every tag of every queue, END_USER_RECOVERY. Queue count
        and depth are the device's; passing different ones is an error.
        """
        ctrl = Control()
        try:
            info = ctrl.get_dev_info(dev_id)
            _check_recoverable(info, nr_queues, queue_depth)
            params = ctrl.get_params(dev_id)
        except BaseException:
            ctrl.close()
            raise
        server = cls(target, dev_id, info.nr_queues, info.queue_depth, info.max_io_bytes,
                     recoverable=True, idle_interval=idle_interval, timeout=timeout)
        server._ctrl, server.info, server._state = ctrl, info, _ADDED
        try:
            server._open_target()
            if target.size != params.size:
                raise UblkError(errno.EINVAL, f"ublk {dev_id} has {params.size} bytes, the "
                                              f"target {target.size}")
            ctrl.start_user_recovery(dev_id, timeout)
            server._open_char()
            server._start_queues()
            ctrl.end_user_recovery(dev_id, os.getpid(), timeout)
        except BaseException:
            # Leave the device itself alone: it stays quiesced for another attempt.
            server._stop_queues()
            server._release()
            server._close_ctrl()
            server._state = _DELETED
            raise
        server._state = _STARTED
        log.info("recovered %s", info.describe())
        return server

    # ---- internals -----------------------------------------------------------------------

    def _expect(self, state: str, action: str) -> None:
        if self._state != state:
            raise UblkError(errno.EINVAL, f"cannot {action} a ublk server that is {self._state}")

    def _open_target(self) -> None:
        self.target.open()
        self._target_open = True
        size = self.target.size
        if size <= 0 or size % uapi.BLOCK_SIZE:
            raise UblkError(errno.EINVAL, f"target size {size} is not a positive multiple "
                                          f"of {uapi.BLOCK_SIZE} bytes")

    def _open_char(self) -> None:
        """Open /dev/ublkcN (exclusive: one server per device), waiting briefly for udev."""
        deadline = time.monotonic() + _NODE_TIMEOUT
        while True:
            try:
                self._char_fd = os.open(self.char_path, os.O_RDWR | os.O_CLOEXEC)
                return
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EBUSY) or time.monotonic() > deadline:
                    why = "another server has it open" if e.errno == errno.EBUSY else e.strerror
                    raise UblkError(e.errno, f"cannot open {self.char_path}: {why}") from None
            time.sleep(0.05)

    def _start_queues(self) -> None:
        info = self.info
        self._queues = [Queue(self.dev_id, q, self._char_fd, info.queue_depth, info.max_io_bytes,
                              self.target, ioctl_encode=info.ioctl_encode,
                              idle_interval=self.idle_interval)
                        for q in range(info.nr_queues)]
        for q in self._queues:
            q.start()
        for q in self._queues:
            if not q.ready.wait(_QUEUE_READY_TIMEOUT):
                raise UblkError(errno.ETIMEDOUT, f"ublk {self.dev_id}: queue {q.q_id} did "
                                                 "not get ready")
            if q.error is not None:
                raise UblkError(getattr(q.error, "errno", None) or errno.EIO,
                                f"ublk {self.dev_id}: queue {q.q_id}: {q.error}")

    def _join_queues(self) -> None:
        """After STOP_DEV every tag completes with ABORT and the threads end by themselves;
        a thread that does not is told to leave (its ring's teardown cancels the rest)."""
        deadline = time.monotonic() + self.timeout
        for q in self._queues:
            if not q.join(max(0.0, deadline - time.monotonic())):
                log.warning("ublk %d: queue %d did not wind down; aborting it",
                            self.dev_id, q.q_id)
                q.abort()
                q.join(5.0)

    def _stop_queues(self) -> None:
        for q in self._queues:
            q.abort()
        for q in self._queues:
            q.join(5.0)

    def _release(self) -> None:
        """Close /dev/ublkcN (after the queues) and the target."""
        if any(q.alive for q in self._queues):
            self._stop_queues()
        if self._char_fd >= 0:
            os.close(self._char_fd)
            self._char_fd = -1
        if self._target_open:
            self._target_open = False
            self.target.close()

    def _close_ctrl(self) -> None:
        if self._ctrl is not None:
            self._ctrl.close()
            self._ctrl = None

    def _abandon(self) -> None:
        """Undo a failed add/start: queues, files, target, and the device if we added it."""
        self._stop_queues()
        try:
            self._release()
        except Exception:
            log.exception("ublk: closing the target failed")
        if self._state == _ADDED and self._ctrl is not None:
            try:
                self._ctrl.del_dev(self.dev_id, 10.0)
            except UblkError as e:
                log.warning("%s", e)
        self._close_ctrl()
        self._state = _DELETED


def _check_recoverable(info: DevInfo, nr_queues: Optional[int],
                       queue_depth: Optional[int]) -> None:
    if not info.recoverable:
        raise UblkError(errno.EINVAL, f"ublk {info.dev_id} was not added as recoverable")
    if info.state == uapi.UBLK_S_DEV_LIVE and holders.pid_alive(info.pid):
        raise UblkError(errno.EBUSY, f"ublk {info.dev_id} is live, served by pid {info.pid}")
    for name, want, have in (("queues", nr_queues, info.nr_queues),
                             ("queue depth", queue_depth, info.queue_depth)):
        if want is not None and want != have:
            raise UblkError(errno.EINVAL, f"ublk {info.dev_id} has {have} {name}, not {want}")


def _wait_for_node(path: str) -> None:
    deadline = time.monotonic() + _NODE_TIMEOUT
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            log.warning("%s did not appear (no devtmpfs/udev?)", path)
            return
        time.sleep(0.02)
