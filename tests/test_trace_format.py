"""The block trace format (tools/trace/format.py): golden bytes, round trips, bad input."""
from __future__ import annotations

import lzma

import pytest

from tools.trace import format as tf

RECORDS = [tf.TraceRecord(1000, 4096, 8192, tf.WRITE, tf.FUA, 1),
           tf.TraceRecord(2000, 0, 0, tf.FLUSH, 0, 0),
           tf.TraceRecord(3500, 512 * 7, 4096, tf.WRITE_ZEROES, tf.NOUNMAP, 0)]
TRACE = tf.Trace(1 << 30, RECORDS)

# header: magic, version 1, record size 24, sector 512, device 1 GiB, reserved
GOLDEN_HEADER = ("5344545241434500" "0100" "1800" "00020000" "0000004000000000"
                 "0000000000000000")
# records: time_ns, sector, nr_sectors, op, flags, queue
GOLDEN_RECORDS = ("e803000000000000" "0800000000000000" "10000000" "01" "01" "0100"
                  "d007000000000000" "0000000000000000" "00000000" "02" "00" "0000"
                  "ac0d000000000000" "0700000000000000" "08000000" "04" "02" "0000")


def test_golden_bytes():
    assert tf.encode(TRACE).hex() == GOLDEN_HEADER + GOLDEN_RECORDS
    assert tf.HEADER.size == 32 and tf.RECORD.size == 24


def test_decode_golden():
    back = tf.decode(bytes.fromhex(GOLDEN_HEADER + GOLDEN_RECORDS))
    assert back == TRACE
    assert [r.op_name for r in back.records] == ["write", "flush", "write-zeroes"]
    assert [r.fua for r in back.records] == [True, False, False]


def test_file_round_trip_is_xz(tmp_path):
    path = tmp_path / "t.trace.xz"
    tf.dump(TRACE, path)
    raw = path.read_bytes()
    assert raw.startswith(b"\xfd7zXZ\x00")
    assert lzma.decompress(raw) == tf.encode(TRACE)
    assert tf.load(path) == TRACE


def test_writer_streams_records(tmp_path):
    path = tmp_path / "w.trace.xz"
    w = tf.TraceWriter(path, 1 << 30)
    w.append(RECORDS[:1])
    w.append(RECORDS[1:])
    w.close()
    assert w.count == 3
    assert tf.load(path) == TRACE
    with pytest.raises(ValueError):
        w.append(RECORDS)


@pytest.mark.parametrize("raw, message", [
    (b"short", "shorter than a trace header"),
    (b"NOTATRACE" + bytes(23), "bad magic"),
    (bytes.fromhex(GOLDEN_HEADER.replace("0100", "0200", 1)), "unsupported trace version 2"),
    (bytes.fromhex(GOLDEN_HEADER + GOLDEN_RECORDS)[:-5], "truncated"),
    (bytes.fromhex(GOLDEN_HEADER + GOLDEN_RECORDS[:-8] + "09020000"), "unknown op 9"),
])
def test_bad_content(raw, message):
    with pytest.raises(tf.TraceFormatError, match=message):
        tf.decode(raw)


def test_not_xz(tmp_path):
    path = tmp_path / "plain.trace.xz"
    path.write_bytes(tf.encode(TRACE))
    with pytest.raises(tf.TraceFormatError, match="not an xz"):
        tf.load(path)


def test_iter_files_expands_directories(tmp_path):
    for name in ("b.trace.xz", "a.trace.xz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.rsplit("/", 1)[1] for p in tf.iter_files([tmp_path])] == ["a.trace.xz",
                                                                        "b.trace.xz"]
