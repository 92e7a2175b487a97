"""Progress of a long operation: one line on a terminal, rewritten in place, nothing elsewhere.

    checking data blocks: 12288/65536 blocks (18%), 2150 blocks/s, 25 s left

A person at a terminal wants to know that a check of a large disk is moving and how long
it will take; a pipe, a log or a script (--json) wants none of it, so the reporter is off
unless its stream is a terminal. It is a callable ``(stage, done, total)``, the shape of
the engine's progress callbacks (sworndisk.check); the rate and the time left are those
of the current stage, since stages count different things.
"""
from __future__ import annotations

import sys
import time
from typing import Mapping, Optional, TextIO


def _duration(seconds: float) -> str:
    s = int(seconds + 0.5)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Progress:
    """Reports (stage, done, total) as one self-overwriting line, at most every `interval`
    seconds, on `stream` (stderr) when it is a terminal and `quiet` is not set."""

    def __init__(self, verb: str, *, units: Mapping[str, str] = {}, stream: Optional[TextIO] = None,
                 quiet: bool = False, interval: float = 0.2):
        self.verb = verb
        self.units = units            # what a stage counts; "blocks" unless it says
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = not quiet and _isatty(self.stream)
        self.interval = interval
        self._stage = ""
        self._stage_start = 0.0
        self._last = 0.0                  # when the line was last written
        self._prev = time.monotonic()     # the previous call: where a new stage's work began
        self.shown = False

    def line(self, stage: str, done: int, total: int, elapsed: float) -> str:
        """The text shown for `done` of `total` after `elapsed` seconds of this stage."""
        unit = self.units.get(stage, "blocks")
        text = f"{self.verb} {stage}: {done}/{total} {unit}"
        if total:
            text += f" ({100 * done // total}%)"
        if elapsed > 0 and done > 0:
            rate = done / elapsed
            text += f", {rate:.0f} {unit}/s"
            if total > done:
                text += f", {_duration((total - done) / rate)} left"
        return text

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now, prev = time.monotonic(), self._prev
        self._prev = now
        if stage != self._stage:          # its first `done` were worked on since `prev`
            self._stage, self._stage_start = stage, prev
        elif now - self._last < self.interval and done < total:
            return
        self._last = now
        self.stream.write(f"\r{self.line(stage, done, total, now - self._stage_start)}\033[K")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        """Clear the line, so that what is printed next starts on a clean one."""
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
