"""In the VM: `python -m ublk_shim loop FILE --record TRACE` logs what the kernel sends.

Writes 8 KiB at 1 MiB with O_DIRECT, fsyncs (a FLUSH), reads 4 KiB back, stops the server
and checks that the trace holds those three requests in that order. Prints OK lines."""
import mmap
import os
import signal
import subprocess
import sys

from tools.trace import format as tf

IMG, TRACE, MiB = "/run/trace-e2e.img", "/run/trace-e2e.trace.xz", 1 << 20

with open(IMG, "wb") as f:
    f.truncate(64 * MiB)
server = subprocess.Popen([sys.executable, "-m", "ublk_shim", "loop", IMG, "--record", TRACE],
                          stdout=subprocess.PIPE, text=True)
dev = server.stdout.readline().strip()
assert dev.startswith("/dev/ublkb"), f"no device: {dev!r}"
buf = mmap.mmap(-1, 8192)
buf.write(b"\xa5" * 8192)
fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
assert os.pwritev(fd, [buf], MiB) == 8192
os.fsync(fd)
back = mmap.mmap(-1, 4096)
assert os.preadv(fd, [back], MiB) == 4096 and back[:] == b"\xa5" * 4096
os.close(fd)
server.send_signal(signal.SIGTERM)
out, _ = server.communicate(timeout=60)
assert server.returncode == 0, f"server exited {server.returncode}"
print("OK served")

trace = tf.load(TRACE)
assert trace.device_bytes == 64 * MiB
ops = [(r.op_name, r.offset, r.length) for r in trace.records]
w = ops.index(("write", MiB, 8192))
f = next(i for i in range(w + 1, len(ops)) if ops[i][0] == "flush")
r = ops.index(("read", MiB, 4096), f + 1)
times = [rec.time_ns for rec in trace.records]
assert times == sorted(times)
print(f"OK trace record ({len(ops)} requests; write #{w}, flush #{f}, read #{r})")
