"""The block trace file format: one place, documented in tools/trace/README.md.

A trace is an xz (lzma) stream whose content is a 32-byte header followed by one fixed-size
24-byte record per request, in submission order, to the end of the stream. All integers
are little-endian.

Header (32 bytes):
    0  8  magic        b"SDTRACE\\0"
    8  2  version      1
   10  2  record_size  24
   12  4  sector_size  512 (the unit of `sector` and `nr_sectors` below)
   16  8  device_bytes size of the recorded device
   24  8  reserved     0

Record (24 bytes), struct "<QQIBBH":
    0  8  time_ns      submission time, nanoseconds since recording started (monotonic)
    8  8  sector       offset / 512
   16  4  nr_sectors   length / 512 (0 for FLUSH)
   20  1  op           0 read, 1 write, 2 flush, 3 discard, 4 write-zeroes
   21  1  flags        bit 0 FUA, bit 1 NOUNMAP (write-zeroes must not deallocate)
   22  2  queue        the ublk queue the request arrived on

The submission order is the record order. Stdlib only: the recorder runs in the VM next
to the ublk server, which imports nothing else.
"""
from __future__ import annotations

import lzma
import os
import struct
import threading
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, List, Union

MAGIC = b"SDTRACE\0"
VERSION = 1
SECTOR = 512
HEADER = struct.Struct("<8sHHIQQ")
RECORD = struct.Struct("<QQIBBH")

READ, WRITE, FLUSH, DISCARD, WRITE_ZEROES = range(5)
OP_NAMES = ("read", "write", "flush", "discard", "write-zeroes")
FUA, NOUNMAP = 1, 2


class TraceFormatError(ValueError):
    """The file is not a trace of this version, or is truncated."""


@dataclass(frozen=True)
class TraceRecord:
    """One request as the device saw it. Offsets and lengths in bytes."""
    __slots__ = ("time_ns", "offset", "length", "op", "flags", "queue")
    time_ns: int
    offset: int
    length: int
    op: int
    flags: int
    queue: int

    @property
    def fua(self) -> bool:
        return bool(self.flags & FUA)

    @property
    def op_name(self) -> str:
        return OP_NAMES[self.op]

    def pack(self) -> bytes:
        return RECORD.pack(self.time_ns, self.offset // SECTOR, self.length // SECTOR,
                           self.op, self.flags, self.queue)


@dataclass
class Trace:
    """A whole trace in memory: the device size and its records in submission order."""
    device_bytes: int
    records: List[TraceRecord]


def header_bytes(device_bytes: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, RECORD.size, SECTOR, device_bytes, 0)


def encode(trace: Trace) -> bytes:
    """The uncompressed content of a trace file (what golden-byte tests pin)."""
    return header_bytes(trace.device_bytes) + b"".join(r.pack() for r in trace.records)


def decode(raw: bytes) -> Trace:
    """Parses uncompressed content; TraceFormatError says what is wrong."""
    if len(raw) < HEADER.size:
        raise TraceFormatError("shorter than a trace header")
    magic, version, rec_size, sector, device_bytes, _ = HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise TraceFormatError("not a SwornDisk block trace (bad magic)")
    if version != VERSION or rec_size != RECORD.size or sector != SECTOR:
        raise TraceFormatError(f"unsupported trace version {version} (record size {rec_size}, "
                               f"sector {sector}); this reader knows version {VERSION}")
    body = memoryview(raw)[HEADER.size:]
    if len(body) % RECORD.size:
        raise TraceFormatError(f"truncated: {len(body) % RECORD.size} bytes of a partial record")
    records = []
    for t, sector_, nr, op, flags, queue in RECORD.iter_unpack(body):
        if op >= len(OP_NAMES):
            raise TraceFormatError(f"record {len(records)}: unknown op {op}")
        records.append(TraceRecord(t, sector_ * SECTOR, nr * SECTOR, op, flags, queue))
    return Trace(device_bytes, records)


def dump(trace: Trace, path: Union[str, os.PathLike]) -> None:
    with lzma.open(path, "wb", preset=9) as f:
        f.write(encode(trace))


def load(path: Union[str, os.PathLike]) -> Trace:
    """Reads a trace file; TraceFormatError if it is not one (or is corrupt)."""
    try:
        with lzma.open(path, "rb") as f:
            raw = f.read()
    except lzma.LZMAError as e:
        raise TraceFormatError(f"not an xz-compressed trace ({e})") from None
    except EOFError:
        raise TraceFormatError("not an xz-compressed trace, or a truncated one") from None
    return decode(raw)


class TraceWriter:
    """Appends records to a trace file as they arrive (thread-safe), compressing on the way.

    Nothing is lost if the process stops cleanly: close() ends the xz stream."""

    def __init__(self, path: Union[str, os.PathLike], device_bytes: int):
        self.path = os.fspath(path)
        self._file: BinaryIO = lzma.open(self.path, "wb", preset=6)
        self._file.write(header_bytes(device_bytes))
        self._lock = threading.Lock()
        self.count = 0

    def append(self, records: Iterable[TraceRecord]) -> None:
        data = b"".join(r.pack() for r in records)
        with self._lock:
            if self._file is None:
                raise ValueError(f"trace {self.path} is closed")
            self._file.write(data)
            self.count += len(data) // RECORD.size

    def close(self) -> None:
        with self._lock:
            f, self._file = self._file, None
        if f is not None:
            f.close()


def iter_files(paths: Iterable[Union[str, os.PathLike]]) -> Iterator[str]:
    """Trace files named, directories expanded to their *.trace.xz files (sorted)."""
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            for name in sorted(os.listdir(p)):
                if name.endswith(".trace.xz"):
                    yield os.path.join(p, name)
        else:
            yield p
