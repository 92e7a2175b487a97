"""Open or format the SwornDisk a table describes: the table's <format> rule and the size checks.

<format> is the Rust version's: ``force`` formats, ``false`` never does, and ``true``
formats only a meta device that holds no SwornDisk at all.  A meta device that holds one
which fails to open (wrong key, failed MAC) is never formatted under ``true``: that is
an attack or a user mistake, and it is reported instead of being "repaired" by wiping.
``force`` on a meta device that holds a SwornDisk asks first, as cryptsetup does.

Everything here runs before the device is exposed, so every size problem is found before
a single byte is written.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

from sworndisk import BLOCK_SIZE
from ublk_shim import blockio

from . import terminal
from .errors import CliError, ExitCode, to_cli_error
from .keys import KeySource
from .table import SECTORS_PER_BLOCK, Table, format_bytes


def _engine() -> Any:
    from sworndisk import SwornDisk
    return SwornDisk


@dataclass(frozen=True)
class Capacity:
    """Sizes `add` reports: logical (what the kernel sees) and usable (what fits)."""

    size: int            # logical size, bytes
    usable: int          # live data that fits once the cleaning reserve is set aside, bytes
    data_size: int       # data device, bytes

    def describe(self) -> str:
        thin = " (thin-provisioned)" if self.usable < self.size else ""
        return (f"size {format_bytes(self.size)} ({self.size // BLOCK_SIZE} blocks of 4 KiB), "
                f"usable capacity {format_bytes(self.usable)}{thin}")


def holds_sworndisk(meta: str) -> bool:
    """True if the meta device carries a SwornDisk superblock (it is only read)."""
    try:
        return _engine().probe(meta)
    except Exception as e:             # noqa: BLE001 - reported as a one-line error
        raise to_cli_error(e, meta) from None


def will_format(table: Table) -> bool:
    """Apply <format>: force -> yes, false -> no, true -> only if there is no SwornDisk."""
    if table.format == "force":
        return True
    if table.format == "false":
        return False
    return not holds_sworndisk(table.meta_dev)


OVERWRITE_QUESTION = (
    "\nWARNING!\n========\nThis will overwrite the SwornDisk on {meta} irrevocably: "
    "everything stored on it is lost.\n\nAre you sure? (Type 'yes' in capital letters): ")


def confirm_overwrite(table: Table, *, assume_yes: bool) -> None:
    """`force` on a meta device that already holds a SwornDisk destroys that disk: go on
    only if the user types YES on the terminal, as cryptsetup asks, or gave --yes. With
    no terminal and no --yes, refuse. A blank meta device needs no question."""
    if table.format != "force" or assume_yes or not holds_sworndisk(table.meta_dev):
        return
    answer = terminal.ask(OVERWRITE_QUESTION.format(meta=table.meta_dev))
    if answer is None:
        raise CliError(f"{table.meta_dev} holds a SwornDisk, which <format> force would "
                       f"destroy, and there is no terminal to confirm on: add --yes to "
                       f"overwrite it, or use <format> false to open it", ExitCode.USAGE)
    if answer != "YES":
        raise CliError(f"not confirmed (YES was not typed): the SwornDisk on "
                       f"{table.meta_dev} was left as it was", ExitCode.FAILED)


def capacity(table: Table) -> Capacity:
    data_size = blockio.path_size(table.data_dev)
    usable = _engine().usable_blocks(data_size) * BLOCK_SIZE
    return Capacity(table.size, min(usable, table.size), data_size)


def growth_limit(table: Table, max_sectors: Optional[int], formatting: bool) -> Optional[int]:
    """The logical size (blocks) a new disk reserves meta room to grow to, from `add
    --max-sectors` (whole 4 KiB blocks); None without it, or for a disk that exists."""
    if max_sectors is None:
        return None
    if not formatting:
        print(f"sworndisk-ublk: note: --max-sectors only applies when formatting; the "
              f"SwornDisk on {table.meta_dev} keeps its layout", file=sys.stderr)
        return None
    if max_sectors // SECTORS_PER_BLOCK < table.nr_blocks:
        raise CliError(f"--max-sectors {max_sectors} is less than the table's <sectors> "
                       f"{table.sectors}: give at least {table.nr_blocks * SECTORS_PER_BLOCK}",
                       ExitCode.USAGE)
    return max_sectors // SECTORS_PER_BLOCK


def check_meta_size(table: Table, max_blocks: Optional[int] = None) -> None:
    """Refuse a meta device too small for the index of this logical size (and the room
    to grow to `max_blocks`), naming the minimum."""
    data_size = blockio.path_size(table.data_dev)
    meta_size = blockio.path_size(table.meta_dev)
    try:
        need = _engine().min_meta_size(data_size, table.nr_blocks, max_blocks=max_blocks)
    except ValueError as e:
        raise CliError(str(e), ExitCode.USAGE) from None
    if meta_size < need:
        grow = (f" and room to grow to {format_bytes(max_blocks * BLOCK_SIZE)}"
                if max_blocks else "")
        raise CliError(
            f"meta device {table.meta_dev} is too small: {meta_size} bytes "
            f"({format_bytes(meta_size)}); a {format_bytes(table.size)} SwornDisk on a "
            f"{format_bytes(data_size)} data device{grow} needs at least {need} bytes "
            f"({format_bytes(need)})", ExitCode.USAGE)


@dataclass(frozen=True)
class OpenOptions:
    """How `add` and `recover` open the engine, besides the key."""

    anchor: Optional[str] = None      # the rollback anchor file
    accept_rollback: bool = False     # open a disk older than its anchor, and move the anchor
    kdf: Any = None                   # sworndisk.kdf.KdfParams for a new passphrase slot
    max_blocks: Optional[int] = None  # a new disk reserves meta room to grow to this size
    read_only: bool = False           # open for reading only: nothing is written to either image
    crypto_workers: Optional[int] = None   # the engine's crypto worker processes (None: auto)


def _runtime(opts: OpenOptions) -> Any:
    """The engine's runtime settings (crypto workers); format-time ones are its defaults."""
    from sworndisk import Config
    return Config(crypto_workers=opts.crypto_workers)


def _format(table: Table, source: KeySource, opts: OpenOptions) -> Any:
    check_meta_size(table)
    return _engine().create(table.data_dev, table.meta_dev, nr_blocks=table.nr_blocks,
                            config=_runtime(opts),
                            kdf=opts.kdf, anchor=opts.anchor, max_blocks=opts.max_blocks,
                            **source.engine_args())


def _open(table: Table, source: KeySource, opts: OpenOptions) -> Any:
    disk = _engine().open(table.data_dev, table.meta_dev, anchor=opts.anchor, config=_runtime(opts),
                          accept_rollback=opts.accept_rollback, read_only=opts.read_only,
                          **source.engine_args())
    if disk.nr_blocks != table.nr_blocks:
        formatted = disk.nr_blocks * (BLOCK_SIZE // 512)
        disk.close()
        raise CliError(f"the table says {table.sectors} sectors but the SwornDisk on "
                       f"{table.meta_dev} was formatted with {formatted}; use "
                       f"<sectors> {formatted}", ExitCode.USAGE)
    return disk


def open_disk(table: Table, source: KeySource, *, format: Optional[bool] = None,
              opts: OpenOptions = OpenOptions()) -> Any:
    """Format or open the engine for `table`; every failure is a one-line CliError.

    `format` overrides the table's rule (recover passes False: a crashed disk is reopened,
    never formatted).
    """
    formatting = will_format(table) if format is None else format
    try:
        return _format(table, source, opts) if formatting else _open(table, source, opts)
    except Exception as e:             # noqa: BLE001
        raise to_cli_error(e, table.meta_dev) from None
