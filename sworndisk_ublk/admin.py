"""The administration verbs, cryptsetup's for SwornDisk: key slots, dump, header backup and
restore, status, check.

All but `status` work offline on the images or devices (no ublk, no root unless the
devices need it); `status` asks a running server. Like commands.py, each function takes
plain values and returns what is to be printed, or raises CliError; keys come from a key
file or a passphrase (keys.py), never from the command line.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from sworndisk import BLOCK_SIZE

from . import state
from .names import link_path
from .progress import Progress
from .errors import CliError, ExitCode, to_cli_error
from .keys import KeySource, get_key_source, load_key_file
from .table import format_bytes

MiB = 1 << 20


def _require_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise CliError(f"{what} {path}: no such file or device", ExitCode.NOT_FOUND)


def _engine_call(meta: str, fn: Callable[[], Any]) -> Any:
    """Run an engine call; its errors become the one-line CliErrors users see."""
    from sworndisk.errors import NotFormattedError
    try:
        return fn()
    except CliError:
        raise
    except NotFormattedError:          # (add's hint about <format> does not apply here)
        raise CliError(f"{meta} holds no SwornDisk (neither superblock copy has the magic)",
                       ExitCode.NOT_FOUND) from None
    except Exception as e:             # noqa: BLE001 - mapped to one line
        raise to_cli_error(e, meta) from None


# --- key slots ------------------------------------------------------------------------------

def kdf_params(iter_time_ms: Optional[int], memory_kib: Optional[int],
               iterations: Optional[int]) -> Any:
    """Argon2id parameters for a new passphrase slot: None (the engine calibrates to about
    1 s) unless something was given; what was not given is calibrated around it."""
    if iter_time_ms is None and memory_kib is None and iterations is None:
        return None
    from sworndisk import kdf
    try:
        return kdf.calibrate(iter_time_ms or kdf.DEFAULT_ITER_TIME_MS, memory_kib, iterations)
    except ValueError as e:
        raise CliError(str(e), ExitCode.USAGE) from None


def _existing_key(meta: str, key_file: Optional[str]) -> KeySource:
    return get_key_source(key_file, meta, new=False, stdin_free=True)


def _new_key(meta: str, new_key_file: Optional[str]) -> KeySource:
    if new_key_file is not None:
        return load_key_file(new_key_file)
    return get_key_source(None, meta, new=True, stdin_free=True)


def add_key(meta: str, *, key_file: Optional[str], new_key_file: Optional[str],
            slot: Optional[int] = None, kdf: Any = None) -> int:
    """Adds a key slot for a new key, authorised by an existing one; returns its number."""
    from sworndisk import keyslots
    _require_file(meta, "meta device")
    old, new = _existing_key(meta, key_file), _new_key(meta, new_key_file)
    return _engine_call(meta, lambda: keyslots.add_key(
        meta, slot=slot, kdf=kdf, **old.engine_args(), **new.engine_args("new_")))


def change_key(meta: str, *, key_file: Optional[str], new_key_file: Optional[str],
               kdf: Any = None) -> int:
    """Replaces the slot the old key opens with one for the new key; returns its number."""
    from sworndisk import keyslots
    _require_file(meta, "meta device")
    old, new = _existing_key(meta, key_file), _new_key(meta, new_key_file)
    return _engine_call(meta, lambda: keyslots.change_key(
        meta, kdf=kdf, **old.engine_args(), **new.engine_args("new_")))


def remove_key(meta: str, slot: int, *, key_file: Optional[str]) -> None:
    """Empties a key slot, authorised by the key of another slot."""
    from sworndisk import keyslots
    _require_file(meta, "meta device")
    source = _existing_key(meta, key_file)
    _engine_call(meta, lambda: keyslots.remove_key(meta, slot, **source.engine_args()))


def describe_slot(info: Any) -> str:
    """'passphrase, argon2id: 65536 KiB, 4 passes, 2 lanes' or 'key file, hmac-sha256'."""
    text = f"{info.kind}, {info.kdf}"
    if info.memory_kib is not None:
        text += f": {info.memory_kib} KiB, {info.iterations} passes, {info.lanes} lanes"
    return text


def slot_info(meta: str, slot: int) -> Any:
    return next(s for s in dump(meta).slots if s.slot == slot)


# --- dump, header backup and restore ----------------------------------------------------------

def dump(meta: str) -> Any:
    """The superblock's plaintext, no key needed (sworndisk.keyslots.HeaderInfo)."""
    from sworndisk import keyslots
    _require_file(meta, "meta device")
    return _engine_call(meta, lambda: keyslots.read_header(meta))


def format_dump(meta: str, info: Any) -> str:
    from sworndisk.format import KEY_SLOTS
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.created))
    copies = ", ".join(f"copy {c.copy}: {c.state}"
                       + (f" (generation {c.generation})" if c.generation is not None else "")
                       for c in info.copies)
    lines = [
        f"SwornDisk header on {meta}",
        f"  version:        {info.version}",
        f"  features:       incompatible 0x{info.incompat:x}, compatible 0x{info.compat:x}",
        f"  uuid:           {info.uuid}",
        f"  created:        {created}",
        f"  logical size:   {format_bytes(info.nr_blocks * BLOCK_SIZE)} "
        f"({info.nr_blocks} blocks of 4 KiB, {info.nr_blocks * 8} sectors)",
        f"  data device:    {format_bytes(info.data_blocks * BLOCK_SIZE)} used",
        f"  meta device:    {format_bytes(info.meta_blocks * BLOCK_SIZE)} used",
        f"  cipher:         aes-gcm, {info.cipher_key_bytes * 8}-bit keys per block",
        f"  superblock:     {copies}",
        "Key slots:"]
    used = {s.slot: s for s in info.slots}
    for n in range(KEY_SLOTS):
        lines.append(f"  {n}: " + (describe_slot(used[n]) if n in used else "empty"))
    return "\n".join(lines)


def header_backup(meta: str, path: str) -> Any:
    from sworndisk import keyslots
    _require_file(meta, "meta device")
    return _engine_call(meta, lambda: keyslots.backup_header(meta, path))


def header_restore(meta: str, path: str) -> Any:
    from sworndisk import keyslots
    _require_file(meta, "meta device")
    _require_file(path, "header backup")
    return _engine_call(meta, lambda: keyslots.restore_header(meta, path))


RESTORE_WARNING = ("restoring a header brings back every key slot as it was at the backup, "
                   "including keys removed or changed since then")


# --- status -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Status:
    """What `status` shows of a running device: sizes in bytes, used + free = usable."""

    dev: str
    pid: int
    data: str
    meta: str
    size: int
    usable: int
    used: int
    free: int
    used_mib: float
    free_mib: float
    usable_mib: float
    cipher: str
    key_bits: Optional[int]         # None: the meta device cannot be read (it failed)
    key_slot: Optional[int]
    anchor: Optional[str]
    commit_seq: int
    write_amplification: Optional[float]
    cleaning_runs: int
    blocks_moved: int
    minor_compactions: int
    major_compactions: int
    uptime: float            # seconds
    recoverable: bool
    lost: Optional[str]
    failed: Optional[str] = None    # why the disk stopped accepting writes, if it did
    name: Optional[str] = None       # add --name: /dev/sworndisk/NAME
    read_only: bool = False
    crypto_workers: int = 0              # the engine's crypto worker processes
    crypto_worker_restarts: int = 0      # workers replaced after dying

    def as_dict(self) -> dict:
        return asdict(self)


def _three_digits(x: Optional[float]) -> Optional[float]:
    return None if x is None else float(f"{x:.3g}")


def status(dev_id: int, stats: Callable[[int], dict]) -> Status:
    """Ask the server of device N (`stats`, as the stats verb does) and the state file."""
    st = state.load(dev_id)
    data = stats(dev_id)                # raises CliError for an unknown or dead device
    if st is None:
        raise CliError(f"the state of /dev/ublkb{dev_id} disappeared", ExitCode.NOT_FOUND)
    space, life = data["space"], data["lifetime"]
    usable_blocks = min(space["usable_blocks"], space["nr_blocks"])
    used_blocks = min(space["valid_blocks"], usable_blocks)
    usable_mib = round(usable_blocks * BLOCK_SIZE / MiB, 1)
    used_mib = round(used_blocks * BLOCK_SIZE / MiB, 1)
    try:
        key_bits: Optional[int] = 8 * dump(st.meta).cipher_key_bytes
    except CliError:
        if not st.failed:               # a failed meta device still gets its status shown
            raise
        key_bits = None
    return Status(
        dev=st.dev_path, pid=st.pid, data=st.data, meta=st.meta,
        size=space["nr_blocks"] * BLOCK_SIZE, usable=usable_blocks * BLOCK_SIZE,
        used=used_blocks * BLOCK_SIZE, free=(usable_blocks - used_blocks) * BLOCK_SIZE,
        used_mib=used_mib, free_mib=round(usable_mib - used_mib, 1), usable_mib=usable_mib,
        cipher="aes-gcm", key_bits=key_bits, key_slot=st.key_slot, anchor=st.anchor,
        commit_seq=data["commit_seq"],
        write_amplification=_three_digits(data["session"]["write_amplification"]),
        cleaning_runs=life["cleaning_runs"], blocks_moved=life["blocks_moved"],
        minor_compactions=life["minor_compactions"],
        major_compactions=life["major_compactions"],
        uptime=round(time.time() - st.started, 1), recoverable=st.recoverable,
        lost=data["lost_writes"], failed=st.failed, name=st.name, read_only=st.read_only,
        crypto_workers=data["crypto"]["workers"],
        crypto_worker_restarts=data["crypto"]["worker_restarts"])


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def format_status(s: Status) -> str:
    wa = "-" if s.write_amplification is None else f"{s.write_amplification:g}"
    lines = [
        f"{s.dev} is active.",
        f"  server:     pid {s.pid}, up {_duration(s.uptime)}",
        *([f"  name:       {s.name} ({link_path(s.name)})"] if s.name else []),
        *(["  mode:       read-only"] if s.read_only else []),
        f"  data:       {s.data}",
        f"  meta:       {s.meta}",
        f"  size:       {format_bytes(s.size)} ({s.size // BLOCK_SIZE} blocks of 4 KiB)",
        f"  usable:     {s.usable_mib:.1f} MiB",
        f"  used:       {s.used_mib:.1f} MiB",
        f"  free:       {s.free_mib:.1f} MiB",
        f"  cipher:     {s.cipher}, {s.key_bits or '?'}-bit keys",
        f"  key slot:   {'-' if s.key_slot is None else s.key_slot}",
        f"  anchor:     {s.anchor or 'none'}",
        f"  write amplification: {wa}",
        f"  cleaning:   {s.cleaning_runs} runs, {s.blocks_moved} blocks moved",
        f"  compaction: {s.minor_compactions} minor, {s.major_compactions} major",
        f"  commit:     {s.commit_seq}",
        f"  crypto:     {s.crypto_workers or 'no'} worker process"
        f"{'' if s.crypto_workers == 1 else 'es'}, {s.crypto_worker_restarts} restarted"]
    if s.lost:
        lines.append(f"  lost:       {s.lost}")
    if s.failed:
        lines[0] = f"{s.dev} has FAILED: it accepts no more writes (requests fail with EIO)."
        lines.append(f"  failed:     {s.failed}")
        lines.append("  to reopen at the last completed flush: reconnect the storage, then "
                     "del and add (or recover)")
    return "\n".join(lines)


# --- resize -----------------------------------------------------------------------------------

def resize(data: str, meta: str, *, key_file: Optional[str], sectors: Optional[int]) -> Any:
    """Grow the closed disk onto its enlarged devices (sworndisk.resize.grow); returns its
    GrowResult. A shrink is refused before the key is asked for (the header says the
    size, unverified; the engine checks again, verified)."""
    from sworndisk.resize import grow
    _require_file(data, "data device")
    _require_file(meta, "meta device")
    from ublk_shim import blockio
    nr_blocks = None if sectors is None else sectors // (BLOCK_SIZE // 512)
    current = dump(meta).nr_blocks
    if nr_blocks is not None and nr_blocks < current:
        raise CliError(f"--sectors {sectors} is less than the disk's {current * 8} sectors: "
                       f"shrinking is not supported", ExitCode.USAGE)
    data_sectors = blockio.path_size(data) // BLOCK_SIZE * 8
    if nr_blocks is not None and nr_blocks * 8 > data_sectors:
        raise CliError(f"--sectors {sectors} is more than the data device {data} holds "
                       f"({data_sectors} sectors): make it larger first", ExitCode.USAGE)
    if sectors is not None and sectors % 8:
        print(f"sworndisk-ublk: note: --sectors {sectors} is not a multiple of 8; the disk "
              f"gets {nr_blocks * 8} sectors (whole 4 KiB blocks)", file=sys.stderr)
    source = _existing_key(meta, key_file)
    return _engine_call(meta, lambda: grow(data, meta, nr_blocks=nr_blocks,
                                           **source.engine_args()))


def describe_resize(meta: str, r: Any) -> str:
    if not r.changed:
        return (f"the SwornDisk on {meta} already has {format_bytes(r.nr_blocks * BLOCK_SIZE)} "
                f"({r.sectors} sectors) on its devices: nothing to grow")
    moved = "; its meta regions moved" if r.moved else ""
    return (f"grew the SwornDisk on {meta} from {format_bytes(r.old_nr_blocks * BLOCK_SIZE)} to "
            f"{format_bytes(r.nr_blocks * BLOCK_SIZE)} ({r.sectors} sectors; data device "
            f"{format_bytes(r.data_blocks * BLOCK_SIZE)} used, meta "
            f"{format_bytes(r.meta_blocks * BLOCK_SIZE)}{moved}): add it with <sectors> "
            f"{r.sectors}")


# --- check ------------------------------------------------------------------------------------

CHECK_UNITS = {"index": "BITs", "segment table": "segments"}     # others count blocks


def check(data: str, meta: str, *, key_file: Optional[str], data_blocks: bool,
          quiet: bool = False) -> Any:
    """Run sworndisk.check on the devices, with progress on a terminal unless `quiet`
    (--json); returns its CheckReport."""
    from sworndisk.check import check as run_check
    _require_file(data, "data device")
    _require_file(meta, "meta device")
    source = _existing_key(meta, key_file)
    progress = Progress("checking", units=CHECK_UNITS, quiet=quiet)
    try:
        return _engine_call(meta, lambda: run_check(data, meta, data_blocks=data_blocks,
                                                    progress=progress, **source.engine_args()))
    finally:
        progress.done()


def format_check(data: str, meta: str, report: Any) -> str:
    checked = ", ".join(f"{what} {n}" for what, n in report.checked.items())
    lines = [f"checked {meta} and {data}:", f"  {checked or 'nothing'}"]
    if report.nr_blocks:
        lines.append(f"  logical size {format_bytes(report.nr_blocks * BLOCK_SIZE)} "
                     f"({report.nr_blocks * 8} sectors)")
    lines += [f"note: {n}" for n in report.notes]
    if report.clean:
        lines.append("clean")
    else:
        n = len(report.problems)
        lines.append(f"{n} problem{'s' if n > 1 else ''} found:")
        lines += [f"  {p.where}: {p.what}" for p in report.problems]
    return "\n".join(lines)


CHECK_CLEAN, CHECK_PROBLEMS, CHECK_FAILED = 0, 4, ExitCode.CHECK_FAILED     # as fsck(8)
