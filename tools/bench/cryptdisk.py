"""CryptDisk: the encrypt-in-place baseline SwornDisk is measured against.

It does what dm-crypt does with `--sector-size 4096` and aes-xts-plain64: every 4 KiB block
is encrypted with AES-XTS (64-byte key, i.e. AES-256-XTS) under a tweak equal to its LBA,
and stored at `lba * 4096` of one device. There is no integrity, freshness or metadata, so
it is the cheapest a "secure" disk can be: one device I/O per request, in place.

It is built from the same Python parts as the engine (a `sworndisk.device.BlockDevice`,
`cryptography`, one request per call) so that a ratio between the two measures the design,
not the language. A multi-block request is one pread/pwrite of the whole range with
per-block encryption, as dm-crypt encrypts per sector inside one bio.

The surface is the engine's (read/write/flush/discard/close/stats, block_size, nr_blocks,
read_many) so the same workload code drives both. At depth, `read_many` and `write_many`
submit a whole batch of requests to the device together (`FileDevice.pread_many` /
`pwrite_many`: io_uring with O_DIRECT), the way dm-crypt passes a queue's bios on to the
device below without waiting for each one. Unlike SwornDisk, reading a block that was never
written (or was discarded) returns the decryption of whatever the device holds, not zeros:
that is dm-crypt's behaviour too.
"""
from __future__ import annotations

from typing import Optional

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sworndisk.device import BlockDevice
from sworndisk.errors import DiskClosedError, InvalidArgument

BLOCK_SIZE = 4096
KEY_BYTES = 64  # AES-256-XTS: two 256-bit keys
_XTS_SLACK = 15  # update_into wants room for a cipher block beyond the input


class CryptDisk:
    """A block device encrypted in place with AES-XTS, tweak = LBA (16-byte little-endian)."""

    block_size = BLOCK_SIZE

    def __init__(self, device: BlockDevice, key: bytes, nr_blocks: Optional[int] = None):
        if len(key) != KEY_BYTES:
            raise InvalidArgument(f"CryptDisk key must be {KEY_BYTES} bytes (got {len(key)})")
        capacity = device.size // BLOCK_SIZE
        if nr_blocks is None:
            nr_blocks = capacity
        if not 0 < nr_blocks <= capacity:
            raise InvalidArgument(
                f"nr_blocks must be in [1, {capacity}] for a {device.size}-byte device")
        self._device: Optional[BlockDevice] = device
        self._aes = algorithms.AES(key)
        self.nr_blocks = nr_blocks
        self._out = bytearray()
        self._counters = {"blocks_written": 0, "blocks_read": 0, "flushes": 0}

    # -- the engine's surface -------------------------------------------------------------

    def read(self, lba: int, nr_blocks: int) -> bytes:
        dev = self._live_device()
        self._check_range(lba, nr_blocks)
        ciphertext = dev.pread(nr_blocks * BLOCK_SIZE, lba * BLOCK_SIZE)
        self._counters["blocks_read"] += nr_blocks
        return bytes(self._crypt(ciphertext, lba, encrypt=False))

    def read_many(self, ranges) -> list:
        """Each (lba, nr_blocks) range's plaintext, in order, all read with one
        `pread_many` and decrypted into one reused buffer: the results are memoryviews,
        valid until the next call (like dm-crypt, which decrypts into the request's own
        pages, this allocates nothing per request). The engine's contract otherwise,
        except that CryptDisk has no per-range error to return (a device error raises)."""
        dev = self._live_device()
        ranges = [(lba, n) for lba, n in ranges]
        for lba, n in ranges:
            self._check_range(lba, n)
        raws = dev.pread_many([(n * BLOCK_SIZE, lba * BLOCK_SIZE) for lba, n in ranges])
        out = self._buffer(sum(n for _, n in ranges) * BLOCK_SIZE)
        views, pos = [], 0
        for (lba, n), raw in zip(ranges, raws):
            self._crypt_into(raw, lba, out[pos:], encrypt=False)
            views.append(out[pos:pos + n * BLOCK_SIZE])
            pos += n * BLOCK_SIZE
        self._counters["blocks_read"] += pos // BLOCK_SIZE
        return views

    def write(self, lba: int, data) -> None:
        dev = self._live_device()
        nr_blocks = self._check_write(lba, data)
        dev.pwrite(self._crypt(data, lba, encrypt=True), lba * BLOCK_SIZE)
        self._counters["blocks_written"] += nr_blocks

    def write_many(self, items) -> None:
        """Several (lba, data) writes, encrypted into one reused buffer and handed to the
        device with one `pwrite_many` (which copies them before it returns). A single
        write is a plain `write`: at depth 1 nothing is left in flight, as with
        `pread_many`, which reads a single range with a plain pread."""
        items = [(lba, data) for lba, data in items]
        if len(items) == 1:
            return self.write(*items[0])
        dev = self._live_device()
        sizes = [self._check_write(lba, data) * BLOCK_SIZE for lba, data in items]
        out = self._buffer(sum(sizes))
        writes, pos = [], 0
        for (lba, data), nbytes in zip(items, sizes):
            self._crypt_into(data, lba, out[pos:], encrypt=True)
            writes.append((out[pos:pos + nbytes], lba * BLOCK_SIZE))
            pos += nbytes
        dev.pwrite_many(writes)
        self._counters["blocks_written"] += pos // BLOCK_SIZE

    def flush(self) -> None:
        self._live_device().flush()
        self._counters["flushes"] += 1

    def discard(self, lba: int, nr_blocks: int) -> None:
        dev = self._live_device()
        self._check_range(lba, nr_blocks)
        dev.discard(lba * BLOCK_SIZE, nr_blocks * BLOCK_SIZE)

    def close(self) -> None:
        """Flush; the device stays open: whoever passed it in owns it."""
        if self._device is not None:
            self._device.flush()
            self._device = None

    def stats(self) -> dict:
        return dict(self._counters, nr_blocks=self.nr_blocks, write_amplification=1.0)

    def __enter__(self) -> "CryptDisk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _crypt(self, data, lba: int, *, encrypt: bool) -> memoryview:
        """En/decrypt `data` into a buffer reused across requests (valid until the next
        call). Reuse matters in Python: a fresh 1 MiB object per request is an mmap/munmap
        with page faults in glibc, which would charge the baseline for the allocator
        rather than the design."""
        nbytes = len(data)
        out = self._buffer(nbytes)
        self._crypt_into(data, lba, out, encrypt=encrypt)
        return out[:nbytes]

    def _buffer(self, nbytes: int) -> memoryview:
        if len(self._out) < nbytes + _XTS_SLACK:
            self._out = bytearray(nbytes + _XTS_SLACK)
        return memoryview(self._out)

    def _crypt_into(self, data, lba: int, out: memoryview, *, encrypt: bool) -> None:
        """Each 4 KiB block of `data` under the tweak of its own LBA, into the start of
        `out` (which has room for _XTS_SLACK bytes more)."""
        src = memoryview(data).cast("B")
        for off in range(0, len(src), BLOCK_SIZE):
            cipher = Cipher(self._aes, modes.XTS((lba + off // BLOCK_SIZE).to_bytes(16, "little")))
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            ctx.update_into(src[off:off + BLOCK_SIZE], out[off:off + BLOCK_SIZE + _XTS_SLACK])

    def _live_device(self) -> BlockDevice:
        if self._device is None:
            raise DiskClosedError("CryptDisk is closed")
        return self._device

    def _check_write(self, lba: int, data) -> int:
        """The number of blocks `data` covers, or InvalidArgument."""
        if len(data) % BLOCK_SIZE or not data:
            raise InvalidArgument(f"write length must be a positive multiple of {BLOCK_SIZE}")
        nr_blocks = len(data) // BLOCK_SIZE
        self._check_range(lba, nr_blocks)
        return nr_blocks

    def _check_range(self, lba: int, nr_blocks: int) -> None:
        if lba < 0 or nr_blocks <= 0 or lba + nr_blocks > self.nr_blocks:
            raise InvalidArgument(
                f"blocks [{lba}, {lba + nr_blocks}) are outside the disk ({self.nr_blocks} blocks)")
