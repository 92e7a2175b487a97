"""Trace replay (tools/bench/trace.py): batches and barriers, the order requests reach a
real MemoryDevice-backed SwornDisk (and CryptDisk), the per-read and read-back checks, and
that the committed traces replay on a clean clone."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest

from sworndisk import MemoryDevice, SwornDisk
from sworndisk.device import CountingDevice
from tools.bench import cli
from tools.bench import trace as tr
from tools.bench.cryptdisk import CryptDisk
from tools.bench.disks import BenchDisk
from tools.bench.workloads import VerifyError
from tools.trace import format as tf

BS = 4096
NR_BLOCKS = 64
DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "tools", "trace", "data")


def _r(op, lba, n=1, fua=False):
    return tf.TraceRecord(0, lba * BS, n * BS if op != tf.FLUSH else 0, op,
                          tf.FUA if fua else 0, 0)


W, R, F, D, Z = tf.WRITE, tf.READ, tf.FLUSH, tf.DISCARD, tf.WRITE_ZEROES
HAND_MADE = tf.Trace(NR_BLOCKS * BS, [
    _r(W, 0, 2), _r(W, 4), _r(R, 0, 2), _r(R, 10), _r(F, 0), _r(W, 8, fua=True), _r(R, 4),
    _r(D, 0), _r(R, 0, 2), _r(Z, 12, 2), _r(R, 12, 2), _r(W, 20), _r(F, 0)])


def test_batches_at_depth_32_cut_at_barriers_and_hazards():
    p = tr.plan(HAND_MADE, 32)
    assert p.batches == [[0, 1], [2, 3], [4], [5], [6, 7], [8, 9], [10, 11], [12]]
    assert tr.plan(HAND_MADE, 1).batches == [[i] for i in range(13)]
    assert tr.plan(HAND_MADE, 2).batches == [[0, 1], [2, 3], [4], [5], [6, 7], [8, 9],
                                             [10, 11], [12]]
    assert list(np.flatnonzero(p.prefill)) == [10]       # read before the trace wrote it
    assert list(p.expect[2]) == [1, 1] and list(p.expect[3]) == [0]
    assert list(p.expect[8]) == [tr.DISCARDED, 1] and list(p.expect[10]) == [tr.ZERO] * 2


def test_unaligned_trace_is_refused():
    bad = tf.Trace(NR_BLOCKS * BS, [tf.TraceRecord(0, 512, 4096, W, 0, 0)])
    with pytest.raises(tr.TraceError, match="not 4 KiB aligned"):
        tr.plan(bad, 4)


def _sworndisk(nr_blocks=NR_BLOCKS) -> tr.ReplayDisk:
    key = bytes(range(32))
    data = CountingDevice(MemoryDevice(16 << 20))
    meta = CountingDevice(MemoryDevice(SwornDisk.min_meta_size(16 << 20, nr_blocks)))
    disk = SwornDisk.create(data, meta, key, nr_blocks=nr_blocks)
    return tr.ReplayDisk(BenchDisk("sworndisk", disk, {"data": data, "meta": meta}, [], False,
                                   reopener=lambda: SwornDisk.open(data, meta, key)), log=[])


def _cryptdisk(nr_blocks=NR_BLOCKS) -> tr.ReplayDisk:
    key = bytes(range(64))
    data = CountingDevice(MemoryDevice(nr_blocks * BS))
    return tr.ReplayDisk(BenchDisk("cryptdisk", CryptDisk(data, key, nr_blocks), {"data": data},
                                   [], False, reopener=lambda: CryptDisk(data, key, nr_blocks)),
                         log=[])


def _summary(log):
    """(call, LBAs) per engine call, in issue order."""
    out = []
    for name, args in log:
        if name == "write_many":
            out.append((name, [lba for lba, _ in args[0]]))
        elif name == "read_many":
            out.append((name, list(args[0])))
        else:
            out.append((name, *args))
    return out


def test_replay_order_on_sworndisk():
    disk = _sworndisk()
    res = tr.replay(disk, tr.plan(HAND_MADE, 32, "hand"))
    assert res.error is None and res.requests == 13
    assert (res.reads, res.writes, res.flushes) == (5, 5, 2)
    assert _summary(disk.log) == [
        ("write_many", [10]), ("flush",),                     # prefill, then reopen
        ("write_many", [0, 4]),
        ("read_many", [(0, 2), (10, 1)]),
        ("flush",),                                            # FLUSH alone
        ("write_many", [8]), ("flush",),                       # FUA: write, flush, alone
        ("read_many", [(4, 1)]), ("discard", 0, 1),
        ("read_many", [(0, 2)]), ("discard", 12, 2),           # write-zeroes: discard
        ("read_many", [(12, 2)]), ("write_many", [20]),
        ("flush",),
        ("flush",),                                            # the replay's final flush
        ("read_many", [(0, 2), (4, 1), (8, 1), (10, 1), (12, 2), (20, 1)]),   # read-back
    ]
    assert res.verified_blocks == 8 and res.prefill_blocks == 1
    assert res.write_amplification > 0 and res.p99_us >= res.p50_us > 0


def test_replay_at_depth_1_issues_one_request_per_call():
    disk = _sworndisk()
    tr.replay(disk, tr.plan(HAND_MADE, 1, "hand"))
    calls = _summary(disk.log)[2:-2]
    for name, *args in calls:
        if name in ("write_many", "read_many"):
            assert len(args[0]) == 1


def test_replay_on_cryptdisk_writes_zeroes_and_ignores_discarded_contents():
    disk = _cryptdisk()
    res = tr.replay(disk, tr.plan(HAND_MADE, 32, "hand"))
    assert res.verified_blocks == 8
    assert ("write_many", [12]) in _summary(disk.log)            # write-zeroes: zero blocks


@pytest.mark.parametrize("make", [_sworndisk, _cryptdisk])
def test_read_back_fails_on_a_wrong_block(make):
    disk = make()
    p = tr.plan(HAND_MADE, 32, "hand")
    tr.replay(disk, p)
    assert tr.read_back(disk, p) == 8
    stale = tr.Stamps(1).blocks(4, 1, 99)          # LBA 4 as an older/other write left it
    disk.bench.disk.write(4, stale)
    with pytest.raises(VerifyError, match="block 4 read back wrong: expected write #2"):
        tr.read_back(disk, p)


def test_read_back_fails_on_a_lost_zeroing():
    disk = _sworndisk()
    p = tr.plan(HAND_MADE, 32, "hand")
    tr.replay(disk, p)
    disk.bench.disk.write(13, tr.Stamps(1).blocks(13, 1, 5))
    with pytest.raises(VerifyError, match="block 13 .*expected zeros"):
        tr.read_back(disk, p)


def test_check_blocks():
    blocks = tr.Stamps(3).blocks(7, 3, 4)
    tr.check(blocks, 7, np.array([4, 4, 4]), True)
    with pytest.raises(VerifyError, match="block 8"):
        tr.check(blocks, 7, np.array([4, 5, 4]), True)
    with pytest.raises(VerifyError, match="block 7"):
        tr.check(blocks, 6 + 1, np.array([tr.ZERO, 4, 4]), True)
    tr.check(bytes(3 * BS), 7, np.array([tr.DISCARDED, tr.ZERO, tr.DISCARDED]), True)
    tr.check(blocks, 7, np.array([tr.DISCARDED, 4, 4]), False)   # CryptDisk: unspecified
    with pytest.raises(VerifyError):
        tr.check(blocks, 7, np.array([tr.DISCARDED, 4, 4]), True)


def test_cli_replays_a_trace_file(tmp_path, capsys):
    path = tmp_path / "hand.trace.xz"
    tf.dump(HAND_MADE, path)
    rc = cli.main(["--trace", str(path), "--depth", "1,32", "--in-process", "--dir",
                   str(tmp_path), "--json", str(tmp_path / "out.json"), "--plot",
                   str(tmp_path / "charts")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "hand" in out and "SwornDisk" in out and "CryptDisk" in out
    doc = json.loads((tmp_path / "out.json").read_text())
    assert {(r["disk"], r["depth"]) for r in doc["results"]} == {
        ("sworndisk", 1), ("sworndisk", 32), ("cryptdisk", 1), ("cryptdisk", 32)}
    assert all(r["verified_blocks"] == 8 and r["error"] is None for r in doc["results"])
    assert sorted(os.listdir(tmp_path / "charts")) == ["trace-depth1.png", "trace-depth32.png"]


def test_cli_bad_trace_is_one_line(tmp_path, capsys):
    assert cli.main(["--trace", str(tmp_path / "missing.trace.xz")]) == 2
    (tmp_path / "bad.trace.xz").write_bytes(b"nope")
    assert cli.main(["--trace", str(tmp_path / "bad.trace.xz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no trace file" in err[0] and "not an xz" in err[1]


COMMITTED = sorted(glob.glob(os.path.join(DATA_DIR, "*.trace.xz")))


def test_traces_are_committed():
    assert len(COMMITTED) >= 7
    assert sum(os.path.getsize(p) for p in COMMITTED) < 8 << 20


@pytest.mark.parametrize("path", COMMITTED, ids=os.path.basename)
def test_committed_trace_replays(path, tmp_path):
    """The first requests of each committed trace, both disks, read back checked."""
    for kind in ("sworndisk", "cryptdisk"):
        (res,) = tr.replay_file(kind, path, [8], str(tmp_path), limit=200)
        assert res.error is None, res.error
        assert res.requests > 0 and res.verified_blocks > 0
