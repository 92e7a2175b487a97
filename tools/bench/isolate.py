"""Running one disk's workloads in a fresh interpreter, so its peak RSS is its own.

`ru_maxrss` is a high-water mark for the whole process: measured in one process it would
charge whichever disk ran second with the first one's memory. A *spawned* (not forked)
child starts from an empty interpreter, so its peak is that disk's alone; its RSS before
the disk is created (interpreter + numpy + cryptography) is reported beside it.
"""
from __future__ import annotations

import multiprocessing
import resource
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass
class Isolated:
    """What a child returned, or the traceback it died with."""
    value: Any = None
    error: Optional[str] = None
    rss_start_kib: int = 0        # peak RSS before the task ran (imports done)
    rss_peak_kib: int = 0         # peak RSS when the task returned
    isolated: bool = True         # False: ran in this process, RSS is not per task

    @property
    def rss_peak_mib(self) -> float:
        return self.rss_peak_kib / 1024

    @property
    def rss_start_mib(self) -> float:
        return self.rss_start_kib / 1024


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux


def _run(fn: Callable, args: tuple, isolated: bool) -> Isolated:
    start = _maxrss_kib()
    try:
        value = fn(*args)
    except BaseException:
        return Isolated(error=traceback.format_exc(), rss_start_kib=start,
                        rss_peak_kib=_maxrss_kib(), isolated=isolated)
    return Isolated(value, None, start, _maxrss_kib(), isolated)


def _child_main(conn, fn: Callable, args: tuple) -> None:
    try:
        conn.send(_run(fn, args, True))
    finally:
        conn.close()


def run_isolated(fn: Callable, *args, in_process: bool = False) -> Isolated:
    """Call fn(*args) in a spawned child (fn and args must pickle), or here if in_process
    (for profilers and debuggers, which do not follow children)."""
    if in_process:
        return _run(fn, args, False)
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(sender, fn, args))
    proc.start()
    sender.close()
    try:
        outcome = receiver.recv()
    except EOFError:
        outcome = None
    finally:
        receiver.close()
        proc.join()
    if outcome is None:
        return Isolated(error=f"child process died (exit code {proc.exitcode})")
    return outcome
