"""The recording loop target (ublk_shim/recording.py), natively: the queue's entry points
(handle_batch, handle) on a real LoopTarget over a file, no kernel needed."""
from __future__ import annotations

import os

from tools.trace import format as tf
from ublk_shim import OP_DISCARD, OP_FLUSH, OP_READ, OP_WRITE, Request
from ublk_shim.__main__ import main as shim_main
from ublk_shim.recording import RecordingTarget
from ublk_shim.target import OP_WRITE_ZEROES, LoopTarget
from ublk_shim import sys as uapi

BS = 4096


def _req(op, block, blocks=1, fua=False, q=0, flags=0):
    return Request(op, block * BS, blocks * BS if op != OP_FLUSH else 0, fua, 0, q, flags)


def test_records_every_request_and_serves_it(tmp_path):
    backing = tmp_path / "backing.img"
    backing.write_bytes(bytes(64 * BS))
    trace_path = tmp_path / "run.trace.xz"
    target = RecordingTarget(LoopTarget(str(backing), direct=False), str(trace_path))
    target.open()
    assert target.size == 64 * BS
    data = bytearray(os.urandom(2 * BS))
    out = target.handle_batch([(_req(OP_WRITE, 3, 2), memoryview(data)),
                               (_req(OP_WRITE, 9, 1, fua=True, q=1), memoryview(data)[:BS])])
    assert out == [2 * BS, BS]
    got = bytearray(2 * BS)
    assert target.handle(_req(OP_READ, 3, 2), memoryview(got)) == 2 * BS
    assert got == data                              # the inner target really served it
    target.handle_batch([(_req(OP_FLUSH, 0), memoryview(b"")),
                         (_req(OP_DISCARD, 20, 4), memoryview(b"")),
                         (_req(OP_WRITE_ZEROES, 30, 2, flags=uapi.UBLK_IO_F_NOUNMAP),
                          memoryview(b""))])
    target.close()

    trace = tf.load(trace_path)
    assert trace.device_bytes == 64 * BS
    assert [(r.op_name, r.offset // BS, r.length // BS, r.flags, r.queue)
            for r in trace.records] == [
        ("write", 3, 2, 0, 0), ("write", 9, 1, tf.FUA, 1), ("read", 3, 2, 0, 0),
        ("flush", 0, 0, 0, 0), ("discard", 20, 4, 0, 0), ("write-zeroes", 30, 2, tf.NOUNMAP, 0)]
    times = [r.time_ns for r in trace.records]
    assert times == sorted(times) and times[-1] > 0


def test_idle_is_passed_through_only_when_the_inner_target_has_one(tmp_path):
    class Idling(LoopTarget):
        calls = 0

        def idle(self):
            Idling.calls += 1

    assert not hasattr(RecordingTarget(LoopTarget("x"), str(tmp_path / "a")), "idle")
    rec = RecordingTarget(Idling("x"), str(tmp_path / "b"))
    rec.idle()
    assert Idling.calls == 1


def test_cli_loop_takes_record(capsys):
    try:
        shim_main(["loop", "--help"])
    except SystemExit as e:
        assert e.code == 0
    assert "--record TRACE" in capsys.readouterr().out
