"""The disk's failure latch: the first failure of a state-changing step stops the disk.

Any failure midway (device error, an internal region full, a bug) leaves the on-disk
state consistent but the in-memory one perhaps not, so the disk refuses further calls
until it is reopened (which recovers to the last commit). An object apart from the disk
so that the parts it is handed to (Admission) do not hold the disk itself: a disk
dropped without close() is then freed, with its crypto workers, at once.
"""
from __future__ import annotations


class FailureLatch:
    def __init__(self):
        # What failed, as text: the exception itself would keep its traceback's frames,
        # and with them the disk, alive.
        self.failed: str | None = None
        self.reason: str | None = None      # the same with the exception's type, for list/status

    def run(self, fn):
        """fn(), latching whatever it raises."""
        try:
            return fn()
        except BaseException as e:
            self.failed = str(e) or type(e).__name__
            self.reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            raise


__all__ = ["FailureLatch"]
