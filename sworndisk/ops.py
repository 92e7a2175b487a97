"""Typed journal operations and their encoding: the payload of one journal transaction.

A transaction is a sequence of records (docs/format.md, "Journal"): `W` (a run of index
records: these LBAs now map to these blocks), `D` (discard a range), `C` (commit: ends
every flush's transaction), `K` (checkpoint: names the pack about to be written). The same
list of operations is what a commit applies in memory and what recovery replays, so
`CommittedState.apply` sees exactly the same thing in both.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Union

import numpy as np

from .errors import IntegrityError
from .records import RecordFormat

from .format import OP_CHECKPOINT as REC_CHECKPOINT, OP_CHECKPOINT_BODY as _CKPT
from .format import OP_COMMIT as REC_COMMIT, OP_COMMIT_BODY as _U64
from .format import OP_DISCARD as REC_DISCARD, OP_DISCARD_BODY as _DISCARD
from .format import OP_WRITE as REC_WRITE, OP_WRITE_COUNT as _U32


@dataclass(frozen=True, eq=False)
class Writes:
    """A run of index records (RecordFormat.dtype, LBA included), in write order."""
    records: np.ndarray

    def __eq__(self, other) -> bool:
        return isinstance(other, Writes) and self.records.tobytes() == other.records.tobytes()


@dataclass(frozen=True)
class Discard:
    lba: int
    count: int


@dataclass(frozen=True)
class Commit:
    seq: int


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    mac: bytes


Op = Union[Writes, Discard, Commit, Checkpoint]


def encode(ops: list[Op]) -> bytes:
    out = bytearray()
    for op in ops:
        if isinstance(op, Writes):
            out += REC_WRITE + _U32.pack(len(op.records)) + op.records.tobytes()
        elif isinstance(op, Discard):
            out += REC_DISCARD + _DISCARD.pack(op.lba, op.count)
        elif isinstance(op, Commit):
            out += REC_COMMIT + _U64.pack(op.seq)
        elif isinstance(op, Checkpoint):
            out += REC_CHECKPOINT + _CKPT.pack(op.seq, op.mac)
        else:
            raise TypeError(f"not a journal operation: {op!r}")
    return bytes(out)


def decode(fmt: RecordFormat, payload: bytes) -> list[Op]:
    """Inverse of encode; a malformed payload (impossible after MAC checks) raises
    IntegrityError."""
    ops: list[Op] = []
    off = 0
    try:
        while off < len(payload):
            t = payload[off:off + 1]
            off += 1
            if t == REC_WRITE:
                n = _U32.unpack_from(payload, off)[0]
                off += 4
                if off + n * fmt.size > len(payload):
                    raise ValueError("write record runs past the payload")
                ops.append(Writes(np.frombuffer(payload, fmt.dtype, n, off).copy()))
                off += n * fmt.size
            elif t == REC_DISCARD:
                ops.append(Discard(*_DISCARD.unpack_from(payload, off)))
                off += _DISCARD.size
            elif t == REC_COMMIT:
                ops.append(Commit(_U64.unpack_from(payload, off)[0]))
                off += _U64.size
            elif t == REC_CHECKPOINT:
                ops.append(Checkpoint(*_CKPT.unpack_from(payload, off)))
                off += _CKPT.size
            else:
                raise ValueError(f"unknown record type {t!r}")
    except (ValueError, struct.error) as e:
        raise IntegrityError(f"journal transaction is malformed ({e})") from None
    return ops


__all__ = ["Writes", "Discard", "Commit", "Checkpoint", "Op", "encode", "decode"]
