"""Data plane: one ublk hardware queue served by one thread with its own io_uring.

Life of a queue thread (everything a queue owns is created and destroyed by its thread, so
io_uring's single-issuer rule holds and nothing is shared but the target):

    setup     ring (depth SQEs), read-only descriptor mmap of /dev/ublkcN for this queue,
              one page-aligned buffer of max_io_bytes per tag
    arm       FETCH_REQ for every tag, all in one io_uring_enter; then `ready` is set
    serve     loop: one io_uring_enter submits every COMMIT_AND_FETCH_REQ prepared for the
              previous batch and waits for the next completions; the completions with res 0
              carry requests in their tags' descriptors -> one target.handle_batch for all
              of them -> prepare a COMMIT_AND_FETCH_REQ(result) each. No completion within
              idle_interval -> target.idle()
    wind down every tag completes with UBLK_IO_RES_ABORT (-ENODEV) once the device is
              stopped (or the queue is torn down): the loop ends when no tag is armed
    teardown  close the ring (the kernel cancels whatever is still armed), unmap, free

user_data of a FETCH/COMMIT SQE is the tag.
"""
from __future__ import annotations

import errno
import logging
import mmap
import signal
import threading
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import sys as uapi
from .target import (OP_FLUSH, OP_DISCARD, OP_READ, OP_WRITE, OP_WRITE_ZEROES, Outcome,
                     Request, Target)
from .uring import TASKRUN_FLAG_SETS, Ring, buffer_address, open_ring

log = logging.getLogger("ublk_shim")

_DATA_OPS = (OP_READ, OP_WRITE)
_unpack_desc = uapi.IO_DESC.unpack_from
_DESC_SIZE = uapi.UBLK_DESC_SIZE
_OP_MASK = uapi.UBLK_IO_OP_MASK
_SECTOR_SHIFT = uapi.SECTOR_SHIFT
_F_FUA = uapi.UBLK_IO_F_FUA
_KNOWN_OPS = frozenset((OP_READ, OP_WRITE, OP_FLUSH, OP_DISCARD, OP_WRITE_ZEROES))
_EMPTY = memoryview(b"")
# Signals are for the main thread: a queue thread blocked in io_uring_enter must not be the
# one the kernel picks to deliver SIGINT/SIGTERM to.
_FAULT_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT,
                  signal.SIGTRAP, signal.SIGSYS, signal.SIGKILL, signal.SIGSTOP}


def request_result(op: int, ret: Optional[int], length: int) -> int:
    """The COMMIT result for a handler's return value.

    None counts as complete success. READ/WRITE report bytes (clamped to the request);
    FLUSH/DISCARD/WRITE_ZEROES report 0 on success (the driver treats any value >= 0 as
    success, and a byte count could overflow the s32 result for huge discards).
    """
    if ret is None:
        return length if op in _DATA_OPS else 0
    ret = int(ret)
    if ret < 0:
        return max(ret, -4095)
    return min(ret, length) if op in _DATA_OPS else 0


def outcome_result(req: Request, outcome: Outcome) -> int:
    """The COMMIT result for one entry of handle_batch's answer: an exception fails the
    request alone (OSError with its errno, anything else with EIO, logged)."""
    if outcome is None or outcome.__class__ is int:          # the usual case, first
        return request_result(req.op, outcome, req.length)
    if isinstance(outcome, OSError):
        return -(outcome.errno or errno.EIO)
    if isinstance(outcome, BaseException):
        log.error("ublk: target failed on %s", req, exc_info=outcome)
        return -errno.EIO
    return request_result(req.op, outcome, req.length)


class Queue:
    """Queue `q_id` of device `dev_id`; start() runs it on its own thread."""

    def __init__(self, dev_id: int, q_id: int, char_fd: int, depth: int, max_io_bytes: int,
                 target: Target, *, ioctl_encode: bool = True, idle_interval: float = 0.05):
        self.dev_id = dev_id
        self.q_id = q_id
        self.char_fd = char_fd
        self.depth = depth
        self.max_io_bytes = max_io_bytes
        self.target = target
        # Targets that do not derive from Target (duck typing) get the default: one by one.
        self._target_batch = getattr(target, "handle_batch", None) or partial(
            Target.handle_batch, target)
        self.idle_interval = idle_interval
        self.fetch_op = uapi.io_opcode(uapi.UBLK_IO_FETCH_REQ, legacy=not ioctl_encode)
        self.commit_op = uapi.io_opcode(uapi.UBLK_IO_COMMIT_AND_FETCH_REQ,
                                        legacy=not ioctl_encode)
        self.ready = threading.Event()        # set once armed (or failed: see `error`)
        self.error: Optional[BaseException] = None
        self.counts: List[int] = [0] * (max(_KNOWN_OPS) + 1)   # served requests by op
        self.failed = 0                        # requests answered with an error
        self.batches = 0                       # handle_batch calls
        self.max_batch = 0                     # the most requests handed over at once
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._ring: Optional[Ring] = None
        self._descs: Optional[mmap.mmap] = None
        self._bufmap: Optional[mmap.mmap] = None
        self._bufs: List[memoryview] = []
        self._buf_addrs: List[int] = []

    # ---- control from the server (any thread) ---------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"ublk{self.dev_id}q{self.q_id}")
        self._thread.start()

    def abort(self) -> None:
        """Make the thread leave without waiting for ABORT completions (error paths only:
        the ring's teardown then cancels the armed commands)."""
        self._stop.set()

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for the thread; True if it has ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals() - _FAULT_SIGNALS)
            _set_io_flusher()
            self._setup()
            self._arm()
        except BaseException as e:       # reported to start() through `error`
            self.error = e
            self.ready.set()
            self._teardown()
            return
        self.ready.set()
        try:
            self._serve()
        except BaseException as e:
            self.error = e
            log.exception("ublk %d queue %d: server loop failed", self.dev_id, self.q_id)
        finally:
            self._teardown()

    def _setup(self) -> None:
        self._ring = open_ring(self.depth, TASKRUN_FLAG_SETS)
        self._descs = mmap.mmap(self.char_fd, uapi.queue_desc_size(self.depth),
                                flags=mmap.MAP_SHARED, prot=mmap.PROT_READ,
                                offset=uapi.queue_desc_offset(self.q_id))
        self._map_buffers()

    def _map_buffers(self) -> None:
        """One anonymous mapping: page aligned, each tag's slice a multiple of pages."""
        self._bufmap = mmap.mmap(-1, self.depth * self.max_io_bytes)
        base = buffer_address(self._bufmap)
        whole = memoryview(self._bufmap)
        size = self.max_io_bytes
        self._bufs = [whole[t * size:(t + 1) * size] for t in range(self.depth)]
        self._buf_addrs = [base + t * size for t in range(self.depth)]
        whole.release()

    def _arm(self) -> None:
        for tag in range(self.depth):
            self._prep_io_cmd(self.fetch_op, tag, 0)
        while self._ring.pending:
            if not self._ring.submit():
                raise OSError(errno.EIO, "io_uring did not take the FETCH commands")

    def _prep_io_cmd(self, cmd_op: int, tag: int, result: int) -> None:
        self._ring.prep_packed(
            uapi.SQE_IO_CMD,
            # opcode, flags, ioprio, fd, off(cmd_op), addr, len, op_flags, user_data,
            # buf_index, personality, splice_fd_in | q_id, tag, result, addr
            uapi.IORING_OP_URING_CMD, 0, 0, self.char_fd, cmd_op, 0, 0, 0, tag, 0, 0, 0,
            self.q_id, tag, result, self._buf_addrs[tag])

    def _serve(self) -> None:
        ring = self._ring
        idle: Optional[Callable[[], None]] = getattr(self.target, "idle", None)
        timeout = self.idle_interval if idle is not None else 1.0
        armed = self.depth
        while armed and not self._stop.is_set():
            cqes = ring.submit_and_wait(1, timeout)
            if not cqes:
                if idle is not None and not ring.pending:
                    self._call_idle(idle)
                continue
            tags = []
            for tag, res, _flags in cqes:
                if res == uapi.UBLK_IO_RES_OK:
                    tags.append(tag)
                elif res == uapi.UBLK_IO_RES_ABORT:
                    armed -= 1            # the device is going away: this tag is retired
                else:
                    armed -= 1
                    log.error("ublk %d queue %d tag %d: io command failed: %s", self.dev_id,
                              self.q_id, tag, errno.errorcode.get(-res, res))
            if tags:
                # Committed together by the next io_uring_enter, which also waits for more.
                for tag, result in zip(tags, self.serve_batch(tags)):
                    self._prep_io_cmd(self.commit_op, tag, result)
        # Only abort() leaves commits unsent; the ring's teardown cancels their tags.

    def serve_batch(self, tags: Sequence[int]) -> List[int]:
        """Serve the requests now in the descriptors of `tags` with one target.handle_batch;
        returns their COMMIT results, in the order of `tags`.

        Requests the target must not see (unknown op, longer than the buffer) are answered
        here. Every tag gets a result whatever the target does: the kernel would wait
        forever for one left unanswered.
        """
        batch: List[Tuple[Request, memoryview]] = []
        refused: Dict[int, int] = {}           # index in tags -> result, for those answered here
        descs, bufs, q_id = self._descs, self._bufs, self.q_id
        for i, tag in enumerate(tags):
            op_flags, nr_sectors, start_sector, _ = _unpack_desc(descs, tag * _DESC_SIZE)
            op = op_flags & _OP_MASK
            length = nr_sectors << _SECTOR_SHIFT
            if op in _DATA_OPS:
                if length > self.max_io_bytes:
                    refused[i] = -errno.EIO
                    continue
                buf = bufs[tag][:length]
            elif op in _KNOWN_OPS:
                buf = _EMPTY
            else:
                refused[i] = -errno.EOPNOTSUPP
                continue
            batch.append((Request(op, start_sector << _SECTOR_SHIFT, length,
                                  bool(op_flags & _F_FUA), tag, q_id, op_flags & ~_OP_MASK),
                          buf))
        self.failed += len(refused)
        if not batch:
            return [refused[i] for i in range(len(tags))]
        self.batches += 1
        if len(batch) > self.max_batch:
            self.max_batch = len(batch)
        try:
            outcomes = self._handle_batch(batch)
        finally:
            for _, buf in batch:
                if buf is not _EMPTY:
                    _release(buf)
        results = []
        counts = self.counts
        for (req, _), outcome in zip(batch, outcomes):
            res = outcome_result(req, outcome)
            counts[req.op] += 1
            if res < 0:
                self.failed += 1
            results.append(res)
        if refused:                            # put them back where they were in `tags`
            served = iter(results)
            results = [refused[i] if i in refused else next(served) for i in range(len(tags))]
        return results

    def _handle_batch(self, batch: List[Tuple[Request, memoryview]]) -> Sequence[Outcome]:
        """target.handle_batch, answering the whole batch with an error if it fails as a whole
        (raises, or answers with the wrong number of results)."""
        try:
            outcomes = self._target_batch(batch)
            if len(outcomes) == len(batch):
                return outcomes
            log.error("ublk %d: handle_batch answered %d requests with %d results",
                      self.dev_id, len(batch), len(outcomes))
            return [-errno.EIO] * len(batch)
        except OSError as e:
            return [e] * len(batch)
        except Exception:
            log.exception("ublk %d: target failed on a batch of %d", self.dev_id, len(batch))
            return [-errno.EIO] * len(batch)

    def _call_idle(self, idle: Callable[[], None]) -> None:
        try:
            idle()
        except Exception:
            log.exception("ublk %d: target.idle failed", self.dev_id)

    def _teardown(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        for view in self._bufs:
            view.release()
        self._bufs = []
        for m in (self._descs, self._bufmap):
            if m is not None:
                try:
                    m.close()
                except BufferError:       # a target kept a view of its buffer: leave it
                    log.warning("ublk %d: a request buffer is still referenced", self.dev_id)
        self._descs = self._bufmap = None


def _release(view: memoryview) -> None:
    """End the target's access to a request buffer (later use raises ValueError)."""
    try:
        view.release()
    except BufferError:           # the target exported it (e.g. numpy); tolerated
        pass


def _set_io_flusher() -> None:
    """PR_SET_IO_FLUSHER: memory reclaim in this thread must not wait on writeback to the
    device it serves (a deadlock). Needs CAP_SYS_RESOURCE; best effort."""
    uapi.libc.prctl(uapi.PR_SET_IO_FLUSHER, 1, 0, 0, 0)
