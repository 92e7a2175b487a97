"""A major compaction: BITs of adjacent levels merged into one new BIT.

A merge runs a chunk of records at a time (`Merge.step`), so that it can make progress
between writes instead of inside the commit that found a level overfull (lsm.LsmIndex
paces it, protocol.CommitProtocol installs it with a checkpoint of its own). Its inputs
stay in the index, answering lookups, until it is installed; the chunks it writes are
allocated as *building* (space.IndexSpace), which a checkpoint pack records as free, so a
crash or a close before the install loses the merge and nothing else.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .bit import Bit, BitBuilder
from .records import TOMBSTONE_HBA, RecordFormat, u64


class Merge:
    """BITs `inputs` (newest first: all of levels `source`..`target` when it began)
    merging into one BIT for level `target` with `builder`."""

    def __init__(self, inputs: list[Bit], source: int, target: int, bottom: bool,
                 builder: BitBuilder, fmt: RecordFormat):
        self.inputs, self.source, self.target, self.bottom = inputs, source, target, bottom
        self.builder = builder
        self.total = sum(bit.meta.count for bit in inputs)   # records in: the work to do
        self.merged = 0                 # records out of the inputs' merge so far
        self.done = False
        self._stream = merge_streams([bit.leaves() for bit in inputs], fmt)

    def step(self, share: bool = False) -> int:
        """Merges the next chunk into the new BIT (its nodes sealed and written); the
        records that came out of it, 0 once the inputs are exhausted. `share`: the
        crypto workers may seal nodes too (they are idle: a checkpoint waits for it)."""
        if self.done:
            return 0
        self.builder.share_seals = share
        recs = next(self._stream, None)
        if recs is None:
            self.done = True
            return 0
        n = len(recs)
        if self.bottom:                     # the deepest level keeps no tombstone
            recs = recs[recs["hba"] != TOMBSTONE_HBA]
        self.builder.add(recs)
        self.merged += n
        return n

    def run(self) -> None:
        """Merges all that is left, at once (the workers share the sealing), and leaves
        the builder to share the last nodes (LsmIndex finishes it)."""
        while self.step(share=True):
            pass
        self.builder.share_seals = True

    def chunks(self) -> list[int]:
        """The index chunks the new BIT has been given so far."""
        return list(self.builder.chunks)


MERGE_CHUNK_RECORDS = 4096


def merge_streams(streams: list, fmt: RecordFormat) -> Iterator[np.ndarray]:
    """Merges sorted record streams (index 0 newest) into one, newest record per LBA.

    Each step takes everything up to the smallest last-buffered LBA among the inputs, so
    no input can still hold a smaller LBA. Inputs are read in chunks of a few thousand
    records (several leaves), so that the numpy work of a step is spread over many
    records; memory stays a chunk per input. Each chunk keeps its LBAs as a contiguous
    array for the searches and the sort, and records move as opaque bytes (numpy copies
    a structured dtype field by field)."""
    streams = [_chunked(s, fmt) for s in streams]
    bufs = [next(s, None) for s in streams]
    raw = fmt.opaque
    while True:
        live = [i for i, b in enumerate(bufs) if b is not None]
        if not live:
            return
        cut = u64(min(int(bufs[i][1][-1]) for i in live))
        parts, keys = [], []
        for i in live:
            recs, lbas = bufs[i]
            k = int(lbas.searchsorted(cut, side="right"))
            if k:
                parts.append(recs[:k].view(raw))
                keys.append(lbas[:k])
            bufs[i] = (recs[k:], lbas[k:]) if k < len(recs) else next(streams[i], None)
        if len(parts) == 1:
            yield parts[0].view(fmt.dtype)
            continue
        lbas = np.concatenate(keys)
        order = np.argsort(lbas, kind="stable")     # equal LBAs: the newer input first
        lbas = lbas[order]
        first = np.empty(len(lbas), bool)
        first[0] = True
        np.not_equal(lbas[1:], lbas[:-1], out=first[1:])
        yield np.concatenate(parts)[order[first]].view(fmt.dtype)


def _chunked(stream, fmt: RecordFormat) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The arrays of `stream` joined into chunks of at least MERGE_CHUNK_RECORDS, each
    with its LBAs as a contiguous array."""
    parts, n = [], 0
    for recs in stream:
        parts.append(recs)
        n += len(recs)
        if n >= MERGE_CHUNK_RECORDS:
            chunk = fmt.concat(parts)
            yield chunk, np.ascontiguousarray(chunk["lba"])
            parts, n = [], 0
    if parts:
        chunk = fmt.concat(parts)
        yield chunk, np.ascontiguousarray(chunk["lba"])
