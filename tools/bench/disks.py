"""Creating the two disks under test on image files, with every device byte counted.

Both disks sit on `sworndisk.device.FileDevice`s (O_DIRECT where the filesystem allows it)
wrapped in a `CountingDevice`, so the benchmark measures device traffic itself instead of
trusting a disk's own statistics: that is how write amplification is reported.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from sworndisk.device import CountingDevice, FileDevice, create_image

from .cryptdisk import KEY_BYTES as CRYPT_KEY_BYTES
from .cryptdisk import CryptDisk

BLOCK_SIZE = 4096
SEGMENT_BYTES = 4 << 20          # the engine's segment; data images are a whole number of them
SWORNDISK_KEY_BYTES = 32
DISK_KINDS = ("sworndisk", "cryptdisk")
DISPLAY_NAMES = {"sworndisk": "SwornDisk", "cryptdisk": "CryptDisk"}


@dataclass(frozen=True)
class DeviceCounts:
    """A snapshot of the counters of all devices under one disk."""
    bytes_written: int = 0
    bytes_read: int = 0

    def __sub__(self, other: "DeviceCounts") -> "DeviceCounts":
        return DeviceCounts(self.bytes_written - other.bytes_written,
                            self.bytes_read - other.bytes_read)


@dataclass(frozen=True)
class PoolFigures:
    """A disk's crypto worker processes at one moment."""
    workers: int = 0
    cpu_seconds: float = 0.0          # all its workers' CPU so far, live and dead
    pids: Tuple[int, ...] = ()

    def rss_peak_kib(self) -> int:
        """The sum of the live workers' peak RSS (VmHWM); a worker gone meanwhile counts 0."""
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/status") as f:
                    total += next((int(line.split()[1]) for line in f
                                   if line.startswith("VmHWM:")), 0)
            except OSError:
                pass
        return total


@dataclass
class BenchDisk:
    """A disk under test plus the image files and counting devices beneath it."""
    kind: str
    disk: object                      # SwornDisk or CryptDisk: same surface
    devices: Dict[str, CountingDevice]
    paths: List[str]
    direct_io: bool
    sizes: Dict[str, int] = field(default_factory=dict)
    # Opens the disk again on the same devices (after `disk.close()`): what a reboot does.
    reopener: Optional[Callable[[], object]] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return DISPLAY_NAMES[self.kind]

    def counts(self) -> DeviceCounts:
        return DeviceCounts(sum(d.bytes_written for d in self.devices.values()),
                            sum(d.bytes_read for d in self.devices.values()))

    def stats(self) -> dict:
        """SwornDisk's own stats (DiskStats.as_dict()); CryptDisk keeps none."""
        return self.disk.stats().as_dict() if self.kind == "sworndisk" else {}

    def reopen(self) -> None:
        """Closes the disk (its devices stay open) and opens it again, so that what is
        read next comes from the devices, as after a reboot: SwornDisk recovers and loads
        its index anew, CryptDisk starts afresh (O_DIRECT: no page cache either way)."""
        self.disk.close()
        self.disk = self.reopener()

    def pool(self) -> "PoolFigures":
        """SwornDisk's crypto workers now (CryptDisk has none)."""
        if self.kind != "sworndisk":
            return PoolFigures()
        c = self.disk.stats().crypto
        return PoolFigures(c.workers, c.worker_cpu_seconds, tuple(c.worker_pids))

    def close(self, suppress_errors: bool = False) -> None:
        """Close the disk, then its devices, then delete the images (sparse, possibly GiBs).
        `suppress_errors`: the disk already failed and its error was recorded; a second one
        from the closing flush would only hide the results gathered so far."""
        try:
            self.disk.close()
        except Exception:
            if not suppress_errors:
                raise
        finally:
            for dev in self.devices.values():
                dev.close()
            for path in self.paths:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def __enter__(self) -> "BenchDisk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def sworndisk_unavailable_reason() -> Optional[str]:
    """None if the engine can be imported, else why not (it may not have landed yet)."""
    try:
        from sworndisk import SwornDisk  # noqa: F401
    except Exception as e:  # ImportError, or an engine that fails at import
        return f"{type(e).__name__}: {e}"
    return None


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def sworndisk_usable_blocks(data_bytes: int) -> int:
    """The logical size the engine offers on a data device of this size (its own answer
    when it has `usable_blocks`, else the 80% the benchmark assumes for a cleaning reserve)."""
    from sworndisk import SwornDisk
    usable = getattr(SwornDisk, "usable_blocks", None)
    if usable is not None:
        return int(usable(data_bytes))
    return data_bytes * 4 // 5 // BLOCK_SIZE


def sworndisk_data_bytes(nr_blocks: int, min_bytes: int = 0) -> int:
    """The smallest data image (in whole segments, at least `min_bytes`) whose usable
    capacity holds `nr_blocks` logical blocks."""
    size = _round_up(max(min_bytes, nr_blocks * BLOCK_SIZE * 6 // 5), SEGMENT_BYTES)
    while sworndisk_usable_blocks(size) < nr_blocks:
        size = _round_up(size + max(SEGMENT_BYTES, size // 16), SEGMENT_BYTES)
    return size


def sworndisk_meta_bytes(data_bytes: int, nr_blocks: int) -> int:
    from sworndisk import SwornDisk
    min_meta = getattr(SwornDisk, "min_meta_size", None)
    if min_meta is not None:
        size = int(min_meta(data_bytes, nr_blocks))
    else:
        size = data_bytes // 10 + (64 << 20)
    return _round_up(size, BLOCK_SIZE)


def _open_image(path: str, size: int) -> CountingDevice:
    create_image(path, size)
    return CountingDevice(FileDevice(path))


def make_sworndisk(workdir: str, nr_blocks: int, data_bytes: int, tag: str = "",
                   crypto_workers: Optional[int] = None) -> BenchDisk:
    """Format a SwornDisk of `nr_blocks` on fresh sparse images of `data_bytes` (+ meta),
    with `crypto_workers` (None: the engine's automatic choice) at create and reopen."""
    from sworndisk import Config, SwornDisk
    config = Config(crypto_workers=crypto_workers)
    key = os.urandom(SWORNDISK_KEY_BYTES)
    meta_bytes = sworndisk_meta_bytes(data_bytes, nr_blocks)
    paths = [os.path.join(workdir, f"sworndisk{tag}-data.img"),
             os.path.join(workdir, f"sworndisk{tag}-meta.img")]
    devices: Dict[str, CountingDevice] = {}
    try:
        devices["data"] = _open_image(paths[0], data_bytes)
        devices["meta"] = _open_image(paths[1], meta_bytes)
        disk = SwornDisk.create(devices["data"], devices["meta"], key, nr_blocks=nr_blocks,
                                config=config)
    except BaseException:
        _discard(devices, paths)
        raise
    return BenchDisk("sworndisk", disk, devices, paths, _all_direct(devices),
                     {"data": data_bytes, "meta": meta_bytes},
                     lambda: SwornDisk.open(devices["data"], devices["meta"], key, config=config))


def make_cryptdisk(workdir: str, nr_blocks: int, tag: str = "") -> BenchDisk:
    """A CryptDisk of `nr_blocks` on one fresh sparse image of exactly that size."""
    data_bytes = nr_blocks * BLOCK_SIZE
    paths = [os.path.join(workdir, f"cryptdisk{tag}.img")]
    devices: Dict[str, CountingDevice] = {}
    try:
        devices["data"] = _open_image(paths[0], data_bytes)
        key = os.urandom(CRYPT_KEY_BYTES)
        disk = CryptDisk(devices["data"], key, nr_blocks)
    except BaseException:
        _discard(devices, paths)
        raise
    return BenchDisk("cryptdisk", disk, devices, paths, _all_direct(devices), {"data": data_bytes},
                     lambda: CryptDisk(devices["data"], key, nr_blocks))


def _all_direct(devices: Dict[str, CountingDevice]) -> bool:
    return all(getattr(d.inner, "direct", False) for d in devices.values())


def _discard(devices: Dict[str, CountingDevice], paths: List[str]) -> None:
    for dev in devices.values():
        dev.close()
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)
