"""A target wrapper that records every request it serves into a block trace.

    RecordingTarget(LoopTarget(path), "run.trace.xz")

behaves exactly as the wrapped target and, before serving each completion batch, appends
one record per request (op, offset, length, FUA/NOUNMAP, queue, time since open) to the
trace, in the order the queues delivered them (tools/trace/format.py). The trace is
complete once close() ran, i.e. after the device stopped. This is how the workloads under
tools/trace are recorded in the VM: `python -m ublk_shim loop FILE --record TRACE`.
"""
from __future__ import annotations

import os
import time
from typing import List, Optional, Sequence, Tuple

from tools.trace import format as tf

from .target import (OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE, OP_WRITE_ZEROES, Outcome,
                     Request, Target)

# ublk op -> trace op
_OPS = {OP_READ: tf.READ, OP_WRITE: tf.WRITE, OP_FLUSH: tf.FLUSH, OP_DISCARD: tf.DISCARD,
        OP_WRITE_ZEROES: tf.WRITE_ZEROES}


class RecordingTarget(Target):
    """Wraps `inner`; every request it is handed goes to the trace at `path` first."""

    def __init__(self, inner: Target, path: str):
        self.inner = inner
        self.path = os.fspath(path)
        self.writer: Optional[tf.TraceWriter] = None
        self._t0 = 0
        if getattr(inner, "idle", None) is not None:   # the queue looks for it by name
            self.idle = inner.idle

    def open(self) -> None:
        self.inner.open()
        self.size = self.inner.size
        self.writer = tf.TraceWriter(self.path, self.size)
        self._t0 = time.monotonic_ns()

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            if self.writer is not None:
                self.writer.close()

    def record(self, requests: Sequence[Request]) -> None:
        now = time.monotonic_ns() - self._t0
        self.writer.append(
            tf.TraceRecord(now, r.offset, 0 if r.op == OP_FLUSH else r.length, _OPS[r.op],
                           (tf.FUA if r.fua else 0) | (tf.NOUNMAP if r.nounmap else 0),
                           r.q_id)
            for r in requests if r.op in _OPS)     # any other op fails (EOPNOTSUPP) below

    def handle(self, req: Request, buf: memoryview) -> int:
        self.record([req])
        return self.inner.handle(req, buf)

    def handle_batch(self, batch: Sequence[Tuple[Request, memoryview]]) -> List[Outcome]:
        self.record([req for req, _ in batch])
        return self.inner.handle_batch(batch)
