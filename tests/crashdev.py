"""Fault-injecting block devices for the engine's correctness tests.

The engine does all of its I/O through BlockDevice.pread/pwrite/flush/discard, so these
wrappers see every byte it stores (see sworndisk/device.py).

CrashDevice / CrashController  (in the spirit of LevelDB's fault_injection_test.cc)
    A CrashDevice keeps two images: the *durable* one (what survives a power cut) and the
    *visible* one (durable + every write since the last flush(), i.e. the volatile cache).
    At a crash, the writes issued since the device's last flush() are subjected to the
    crash model: each one is kept or lost, and a multi-block write is torn at 4 KiB
    granularity (a random subset of its 4 KiB blocks survives).  Writes that were flushed
    are never lost.  After the crash every I/O raises OSError(EIO) until revive(), so the
    engine's in-flight operation aborts, as it would on a dead device.

    Devices that crash together (the data and the meta device of one disk) share one
    CrashController.  `arm(after_ops=k)` makes the (k+1)-th device operation (pwrite,
    flush or discard, on any device of the controller) counted from now crash all of them:
    the first k complete; if the (k+1)-th is a write it was "in flight": it joins the
    unflushed writes and may be torn or lost like them; if it is a flush, the flush does
    not happen.  `ops` counts the operations since the last `reset_count()`/`arm()`, so a
    test can measure how many device operations e.g. one disk.flush() performs and then
    crash at each of them.

FaultyDevice  -- fails chosen operations: EIO, ENOSPC, short reads (a failing disk,
                 not a crash).
TamperDevice  -- an online adversary: rewrites what pread returns.
RecordingDevice -- logs every write (device, offset, length, op sequence number).
"""
from __future__ import annotations

import errno
import random

from sworndisk.device import BlockDevice, DeviceWrapper, MemoryDevice

UNIT = 4096  # tear granularity


def _eio(what: str) -> OSError:
    return OSError(errno.EIO, what)


class CrashController:
    """Crash several CrashDevices at the same instant."""

    KEEP_MODES = ("random", "none", "all", "prefix", "blocks")

    def __init__(self):
        self.devices: list[CrashDevice] = []
        self.crashed = False
        self.ops = 0
        self.total_ops = 0
        self.crashes = 0
        self._armed_at = None
        self._arm_rng = None
        self._arm_keep = None
        self.log = None          # list of (dev name, op, offset, nbytes) when recording
        self.crash_info = None   # description of the last crash, for failure messages

    # -- wiring ---------------------------------------------------------------------
    def device(self, size: int, name: str = "") -> "CrashDevice":
        return CrashDevice(size, self, name=name or f"dev{len(self.devices)}")

    def _register(self, dev: "CrashDevice") -> None:
        self.devices.append(dev)

    # -- counting and arming -----------------------------------------------------------
    def reset_count(self) -> None:
        self.ops = 0

    def arm(self, after_ops: int, rng: random.Random, keep: str = "random") -> None:
        """Crash at the (after_ops+1)-th device operation from now (0: the next one)."""
        if after_ops < 0:
            raise ValueError("after_ops must be >= 0")
        assert keep in self.KEEP_MODES, keep
        self.ops = 0
        self._armed_at = after_ops
        self._arm_rng = rng
        self._arm_keep = keep

    def disarm(self) -> None:
        self._armed_at = None

    @property
    def armed(self) -> bool:
        return self._armed_at is not None

    def _before_op(self, dev: "CrashDevice", op: str, offset: int, data) -> bool:
        """Called before a mutating op. Returns True if the op proceeds normally; on the
        armed op, records an in-flight write (if any), crashes and raises EIO."""
        if self.crashed:
            raise _eio(f"{dev.name}: device is dead (crashed)")
        if self.log is not None:
            self.log.append((dev.name, op, offset, 0 if data is None else len(data)))
        if self._armed_at is not None and self.ops >= self._armed_at:
            if op in ("write", "discard"):
                dev._record_pending(offset, bytes(data))   # the in-flight write
            rng, keep = self._arm_rng, self._arm_keep
            self._armed_at = None
            self.crash(rng, keep, reason=f"armed crash at op #{self.ops} ({dev.name} {op} "
                                         f"offset={offset})")
            raise _eio(f"{dev.name}: injected crash during {op}")
        self.ops += 1
        self.total_ops += 1
        return True

    # -- crash / revive -----------------------------------------------------------------
    def crash(self, rng: random.Random, keep: str = "random", reason: str = "explicit crash"):
        """Power cut: every device keeps its durable image plus a subset of its unflushed
        writes chosen by `keep`:
          random  each unflushed 4 KiB block survives with a probability drawn per crash
          none    all unflushed writes are lost
          all     all unflushed writes survive
          prefix  the writes issued before a random point survive, whole (an ordered disk)
          blocks  each whole write survives or not (no tearing, but reordering)
        """
        if self.crashed:
            return
        if keep == "random":
            p = rng.choice((0.0, 0.2, 0.5, 0.8, 1.0, rng.random()))
        else:
            p = None
        kept = lost = 0
        for d in self.devices:
            k, l = d._crash(rng, keep, p)
            kept += k
            lost += l
        self.crashed = True
        self.crashes += 1
        self.crash_info = f"{reason}; keep={keep} p={p}; unflushed 4K blocks kept={kept} lost={lost}"

    def revive(self) -> None:
        """Power back on: the devices serve I/O again, from their post-crash images."""
        self.crashed = False
        self._armed_at = None
        for d in self.devices:
            d._revive()

    # -- images -------------------------------------------------------------------------
    def images(self) -> list[bytes]:
        """The visible image of every device (= the state if every unflushed write survived)."""
        return [bytes(d.visible) for d in self.devices]

    def load(self, images) -> None:
        """Make every device hold `images` (durable and visible), with nothing unflushed."""
        assert len(images) == len(self.devices)
        for d, img in zip(self.devices, images):
            d._load(img)
        self.crashed = False
        self._armed_at = None
        self.ops = 0


class CrashDevice(BlockDevice):
    """A MemoryDevice with a volatile write cache that a CrashController can cut."""

    def __init__(self, size: int, controller: CrashController | None = None, name: str = "dev"):
        self.name = name
        self.ctrl = controller if controller is not None else CrashController()
        self.mem = MemoryDevice(size)
        self.durable = bytearray(size)
        self.pending: list[tuple[int, bytes]] = []
        self._base = None                 # the image last load()ed ...
        self._touched: list[tuple[int, int]] = []   # ... and the ranges written since
        self.ctrl._register(self)

    # convenience: the brief's dev.arm(after_ops=k)
    def arm(self, after_ops: int, rng: random.Random | None = None, keep: str = "random"):
        self.ctrl.arm(after_ops, rng or random.Random(after_ops), keep)

    def crash(self, rng: random.Random | None = None, keep: str = "random"):
        self.ctrl.crash(rng or random.Random(0), keep)

    def revive(self):
        self.ctrl.revive()

    @property
    def visible(self) -> bytearray:
        return self.mem.buf

    @property
    def size(self) -> int:
        return self.mem.size

    def pread(self, nbytes: int, offset: int) -> bytes:
        if self.ctrl.crashed:
            raise _eio(f"{self.name}: device is dead (crashed)")
        return self.mem.pread(nbytes, offset)

    def pwrite(self, data, offset: int) -> None:
        data = bytes(data)
        # range errors are programming errors of the engine: report them before counting
        if offset < 0 or offset + len(data) > self.size:
            return self.mem.pwrite(data, offset)
        self.ctrl._before_op(self, "write", offset, data)
        self.mem.pwrite(data, offset)
        self.pending.append((offset, data))
        self._touched.append((offset, len(data)))

    def discard(self, offset: int, nbytes: int) -> None:
        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            return self.mem.discard(offset, nbytes)
        zeros = bytes(nbytes)
        self.ctrl._before_op(self, "discard", offset, zeros)
        self.mem.discard(offset, nbytes)
        self.pending.append((offset, zeros))
        self._touched.append((offset, nbytes))

    def flush(self) -> None:
        self.ctrl._before_op(self, "flush", 0, None)
        for off, data in self.pending:
            self.durable[off:off + len(data)] = data
        self.pending.clear()

    # -- controller internals ------------------------------------------------------------
    def _record_pending(self, offset: int, data: bytes) -> None:
        self.mem.buf[offset:offset + len(data)] = data
        self.pending.append((offset, data))
        self._touched.append((offset, len(data)))

    def _crash(self, rng: random.Random, keep: str, p) -> tuple[int, int]:
        img = self.durable
        kept = lost = 0
        pending, self.pending = self.pending, []
        cut = rng.randrange(len(pending) + 1) if keep == "prefix" else None
        for i, (off, data) in enumerate(pending):
            if keep in ("all", "none", "prefix", "blocks"):
                if keep == "all":
                    whole = True
                elif keep == "none":
                    whole = False
                elif keep == "prefix":
                    whole = i < cut
                else:
                    whole = rng.random() < 0.5
                n = max(1, (len(data) + UNIT - 1) // UNIT)
                if whole:
                    img[off:off + len(data)] = data
                    kept += n
                else:
                    lost += n
                continue
            # random, torn at 4 KiB granularity of the device
            pos = off
            end = off + len(data)
            while pos < end:
                nxt = min(end, (pos // UNIT + 1) * UNIT)
                if rng.random() < p:
                    img[pos:nxt] = data[pos - off:nxt - off]
                    kept += 1
                else:
                    lost += 1
                pos = nxt
        # the visible image differs from the durable one only where writes were pending
        for off, data in pending:
            self.mem.buf[off:off + len(data)] = img[off:off + len(data)]
        return kept, lost

    def _revive(self) -> None:
        pass

    def _load(self, img) -> None:
        assert len(img) == self.size
        if img is self._base:
            # restore only what was written since the last load of this very image
            for off, n in self._touched:
                self.mem.buf[off:off + n] = img[off:off + n]
                self.durable[off:off + n] = img[off:off + n]
        else:
            self.mem.buf[:] = img
            self.durable[:] = img
            self._base = img
        self._touched = []
        self.pending.clear()


def crash_pair(data_size: int, meta_size: int):
    """(controller, data CrashDevice, meta CrashDevice)."""
    ctrl = CrashController()
    data = ctrl.device(data_size, "data")
    meta = ctrl.device(meta_size, "meta")
    return ctrl, data, meta


class WrapDevice(DeviceWrapper):
    """Pass-through to another BlockDevice (base for the helpers below): the engine's
    DeviceWrapper, whose batch calls go through pread/pwrite, so every block is seen."""


class FaultyDevice(WrapDevice):
    """Fails chosen operations (a failing disk; the device keeps working otherwise).

    fail_read(lo, hi)                  reads overlapping [lo, hi) fail with EIO
    fail_read_after(k, short=False)    the (k+1)-th read from now fails with EIO, or with
                                       `short` returns only part of the bytes asked for
    fail_write_after(k, err=EIO)       the (k+1)-th write from now fails (not applied)
    fail_flush_after(k, err=EIO)       the (k+1)-th flush from now fails
    Each once, or with sticky=True from then on; `err` is the errno (ENOSPC: a thin or
    network backing store that ran out of room). `failures` counts the faults fired.
    """

    def __init__(self, inner: BlockDevice):
        super().__init__(inner)
        self.read_ranges: list[tuple[int, int]] = []
        self.reads = 0
        self.writes = 0
        self.flushes = 0
        self._read_fail_at = None
        self._write_fail_at = None
        self._flush_fail_at = None
        self._sticky = False
        self._short = False
        self._errno = errno.EIO
        self.failures = 0

    def clear(self) -> None:
        self.read_ranges.clear()
        self._read_fail_at = self._write_fail_at = self._flush_fail_at = None

    def fail_read(self, lo: int, hi: int) -> None:
        self.read_ranges.append((lo, hi))

    def fail_read_after(self, k: int, sticky: bool = False, short: bool = False) -> None:
        self.reads = 0
        self._read_fail_at = k
        self._sticky = sticky
        self._short = short

    def fail_write_after(self, k: int, sticky: bool = False, err: int = errno.EIO) -> None:
        self.writes = 0
        self._write_fail_at = k
        self._sticky = sticky
        self._errno = err

    def fail_flush_after(self, k: int, sticky: bool = False, err: int = errno.EIO) -> None:
        self.flushes = 0
        self._flush_fail_at = k
        self._sticky = sticky
        self._errno = err

    def _fires(self, at, count: int) -> bool:
        return at is not None and count >= at

    def pread(self, nbytes: int, offset: int) -> bytes:
        for lo, hi in self.read_ranges:
            if offset < hi and lo < offset + nbytes:
                self.failures += 1
                raise _eio(f"injected read error at {offset}")
        fire = self._fires(self._read_fail_at, self.reads)
        self.reads += 1
        if not fire:
            return self.inner.pread(nbytes, offset)
        if not self._sticky:
            self._read_fail_at = None
        self.failures += 1
        if self._short:     # what a read past a shrunken image's end returns
            return self.inner.pread(nbytes, offset)[:max(0, nbytes // 2 - 1)]
        raise _eio(f"injected read error at {offset}")

    def pwrite(self, data, offset: int) -> None:
        if self._fires(self._write_fail_at, self.writes):
            self.writes += 1
            if not self._sticky:
                self._write_fail_at = None
            self.failures += 1
            raise OSError(self._errno, f"injected write error at {offset}")
        self.writes += 1
        self.inner.pwrite(data, offset)

    def flush(self) -> None:
        if self._fires(self._flush_fail_at, self.flushes):
            self.flushes += 1
            if not self._sticky:
                self._flush_fail_at = None
            self.failures += 1
            raise OSError(self._errno, "injected flush error")
        self.flushes += 1
        self.inner.flush()


class TamperDevice(WrapDevice):
    """An online adversary: `on_read(offset, data) -> data` may rewrite what a read returns."""

    def __init__(self, inner: BlockDevice, on_read=None):
        super().__init__(inner)
        self.on_read = on_read
        self.tampered_reads = 0

    def pread(self, nbytes: int, offset: int) -> bytes:
        data = self.inner.pread(nbytes, offset)
        if self.on_read is not None:
            new = self.on_read(offset, data)
            if new is not None and new != data:
                assert len(new) == len(data)
                self.tampered_reads += 1
                data = bytes(new)
        return data


class RecordingDevice(WrapDevice):
    """Logs (seq, op, offset, nbytes) of every write/discard/flush; `seq` is shared by the
    devices given the same `clock` list so the order across data and meta is known."""

    def __init__(self, inner: BlockDevice, name: str, clock: list | None = None):
        super().__init__(inner)
        self.name = name
        self.clock = clock if clock is not None else [0]
        self.log: list[tuple[int, str, int, int]] = []

    def _tick(self) -> int:
        self.clock[0] += 1
        return self.clock[0]

    def pwrite(self, data, offset: int) -> None:
        self.log.append((self._tick(), "write", offset, len(data)))
        self.inner.pwrite(data, offset)

    def discard(self, offset: int, nbytes: int) -> None:
        self.log.append((self._tick(), "discard", offset, nbytes))
        self.inner.discard(offset, nbytes)

    def flush(self) -> None:
        self.log.append((self._tick(), "flush", 0, 0))
        self.inner.flush()

    def written_blocks(self, since: int = 0) -> set[int]:
        """4 KiB block numbers written (or discarded) after clock value `since`."""
        out = set()
        for seq, op, off, n in self.log:
            if seq > since and op in ("write", "discard"):
                out.update(range(off // UNIT, (off + max(n, 1) - 1) // UNIT + 1))
        return out
