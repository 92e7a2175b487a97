"""Named access to a disk's parts, for tests, benchmarks and diagnostic tools.

What a test may poke is here, in one place, instead of in private attributes; it is not a
stable interface. `SwornDisk.debug` builds one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .batch import PendingBatch
from .cleaner import Cleaner
from .committed import CommittedState
from .cryptopool import CryptoPool
from .device import BlockDevice
from .protocol import CommitProtocol
from .records import RecordFormat


@dataclass
class DebugView:
    state: CommittedState
    batch: PendingBatch
    cleaner: Cleaner
    protocol: CommitProtocol
    fmt: RecordFormat
    data: BlockDevice
    meta: BlockDevice
    guarded: Callable = field(repr=False)    # runs a step under the disk's failure latch
    pool: CryptoPool | None = None           # the crypto workers (None: in the thread)

    @property
    def space(self):
        return self.state.space

    @property
    def index(self):
        return self.state.index

    @property
    def ispace(self):
        return self.state.ispace

    @property
    def segtable(self):
        return self.state.segtable

    @property
    def journal(self):
        return self.protocol.journal

    def clean(self, victim: int) -> bool:
        """One cleaning step on a chosen victim, committed (as flush's cleaning does)."""
        return self.guarded(lambda: self.cleaner.step(True, self.protocol.commit, victim))
