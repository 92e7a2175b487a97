"""The device table: ``<start> <sectors> sworndisk <data_dev> <meta_dev> <key> <format>``.

This is the dmsetup table of the Rust device-mapper SwornDisk, kept word for word so that
its manual's examples carry over.  Two things differ on purpose:

* ``<key>`` must be ``0``: a key in a table ends up on a command line (visible to every
  user through ``ps`` and in shell history) or in a state file.  The key comes from
  ``--key-file`` or a passphrase prompt instead.
* ``<sectors>`` is rounded down to a multiple of 8, because the device has 4 KiB logical
  blocks (the Rust manual's ``58593750`` gives a device of 58593744 sectors); `add` says so.

Error messages never quote the table text: it might hold a key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from sworndisk import BLOCK_SIZE
from ublk_shim import blockio

from .errors import CliError, ExitCode

SECTOR_SIZE = 512
SECTORS_PER_BLOCK = BLOCK_SIZE // SECTOR_SIZE
TARGET_NAME = "sworndisk"
FORMATS = ("force", "true", "false")
FIELDS = "<start> <sectors> sworndisk <data_dev> <meta_dev> <key> <format>"

KEY_IN_TABLE_MESSAGE = (
    "the table's <key> field must be 0: keys never go on a command line or in a table "
    "(ps, shell history and state files would show them); put the key in a file and use "
    "--key-file PATH, or leave --key-file out to be asked for a passphrase")


class TableError(CliError):
    """The table text is malformed or names unusable devices."""

    def __init__(self, message: str, code: ExitCode = ExitCode.USAGE):
        super().__init__(message, code)


@dataclass(frozen=True)
class Table:
    """A validated table.  There is no key field: the key never lives next to the table."""

    start: int
    sectors: int
    data_dev: str
    meta_dev: str
    format: str          # "force" | "true" | "false"

    @property
    def size(self) -> int:
        """Logical size in bytes: whole 4 KiB blocks."""
        return self.nr_blocks * BLOCK_SIZE

    @property
    def rounding_note(self) -> str:
        """Empty, or a note that <sectors> was rounded down to whole 4 KiB blocks."""
        if self.sectors % SECTORS_PER_BLOCK == 0:
            return ""
        return (f"<sectors> {self.sectors} is not a multiple of {SECTORS_PER_BLOCK}; the device "
                f"has {self.nr_blocks * SECTORS_PER_BLOCK} sectors (whole 4 KiB blocks)")

    @property
    def nr_blocks(self) -> int:
        """Logical size in 4 KiB blocks."""
        return self.sectors // SECTORS_PER_BLOCK

    def line(self, format: Optional[str] = None) -> str:
        """The table as text, with the key field 0 (safe to store and show)."""
        fmt = self.format if format is None else format
        return (f"{self.start} {self.sectors} {TARGET_NAME} {self.data_dev} {self.meta_dev} "
                f"0 {fmt}")

    def with_format(self, format: str) -> "Table":
        """The same devices with another <format>: `recover` and re-adds never format."""
        return Table(self.start, self.sectors, self.data_dev, self.meta_dev, format)


def _parse_int(word: str, name: str) -> int:
    try:
        value = int(word, 10)
    except ValueError:
        raise TableError(f"bad table: {name} must be a decimal number of 512-byte sectors, "
                         f"got {word!r}") from None
    return value


def parse_table(text: str) -> Table:
    """Parse one table line (from the command line or stdin) into a Table.

    Blank lines and ``#`` comments are ignored, like dmsetup; exactly one table line must
    remain, since a SwornDisk device has one target.  Device paths are kept as written;
    `resolve_devices` checks them.
    """
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise TableError(f"bad table: empty; expected '{FIELDS}'")
    if len(lines) > 1:
        raise TableError(f"bad table: {len(lines)} lines; a SwornDisk table has exactly one "
                         f"line '{FIELDS}'")
    words = lines[0].split()
    if len(words) != 7:
        # Do not echo the words: one of them may be a key.
        raise TableError(f"bad table: {len(words)} fields, expected 7: '{FIELDS}'")
    start_w, sectors_w, target, data_dev, meta_dev, key, fmt = words
    if target != TARGET_NAME:
        raise TableError(f"bad table: target type must be '{TARGET_NAME}', got {target!r}")
    start = _parse_int(start_w, "<start>")
    if start != 0:
        raise TableError(f"bad table: <start> must be 0 (one target covers the whole device), "
                         f"got {start}")
    sectors = _parse_int(sectors_w, "<sectors>")
    if sectors <= 0:
        raise TableError(f"bad table: <sectors> must be positive, got {sectors}")
    if sectors < SECTORS_PER_BLOCK:
        raise TableError(f"bad table: <sectors> must be at least {SECTORS_PER_BLOCK} "
                         f"(one 4 KiB block), got {sectors}")
    if key != "0":
        raise TableError(KEY_IN_TABLE_MESSAGE)
    if fmt not in FORMATS:
        raise TableError(f"bad table: <format> must be one of {', '.join(FORMATS)}, "
                         f"got {fmt!r}")
    return Table(start, sectors, data_dev, meta_dev, fmt)


def _check_device(path: str, role: str) -> os.stat_result:
    try:
        return blockio.storage_stat(path)
    except FileNotFoundError:
        raise TableError(f"{role} device {path}: no such file or device",
                         ExitCode.NOT_FOUND) from None
    except PermissionError:
        raise TableError(f"{role} device {path}: permission denied",
                         ExitCode.PERMISSION) from None
    except blockio.NotStorageError:
        raise TableError(f"{role} device {path}: not a block device or regular file") from None


def same_device(a: str, b: str) -> bool:
    """True if both paths name one device or file (through symlinks or hard links)."""
    try:
        return blockio.identity(os.stat(a)) == blockio.identity(os.stat(b))
    except OSError:
        return False


def resolve_devices(table: Table) -> Table:
    """Check that both devices exist, differ and are usable; return absolute paths.

    Paths become absolute because the server runs with `/` as its working directory.
    """
    data = os.path.abspath(table.data_dev)
    meta = os.path.abspath(table.meta_dev)
    data_st = _check_device(data, "data")
    meta_st = _check_device(meta, "meta")
    if blockio.identity(data_st) == blockio.identity(meta_st):
        raise TableError(f"data and meta devices must differ (both are {data})")
    data_size = blockio.path_size(data)
    if table.size > data_size:
        raise TableError(
            f"logical size {table.sectors} sectors ({format_bytes(table.size)}) is larger "
            f"than data device {data} ({data_size // SECTOR_SIZE} sectors, "
            f"{format_bytes(data_size)})", ExitCode.USAGE)
    return Table(table.start, table.sectors, data, meta, table.format)


def format_bytes(n: int) -> str:
    """Human size with binary units, e.g. 268435456 -> '256.0 MiB'."""
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"
