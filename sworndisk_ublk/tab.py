"""The tab file, /etc/sworndisktab: the disks `start` opens and `stop` closes, crypttab-style.

One disk a line, fields separated by blanks, ``#`` starts a comment:

    NAME  DATA  META  KEY  [OPTIONS]

NAME     the disk's name (/dev/sworndisk/NAME; names.py says what a name may hold)
DATA     the data device: an absolute path
META     the meta device: an absolute path, or UUID=<uuid> of the SwornDisk on it (as
         `dump` shows it), looked for among the block devices
KEY      an absolute key-file path, or - for a passphrase asked on the terminal
OPTIONS  comma-separated (or - for none): recoverable, read-only, noauto, anchor=PATH,
         queues=N, depth=N, crypto-workers=N

The data device carries no header (docs/format.md), so only META can be found by UUID=;
DATA is named by a stable path such as /dev/disk/by-id/... . Parsing never stops at a bad
line: each one becomes a TabLineError with its line number and the others are still used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple

from .errors import CliError, ExitCode
from .names import name_problem

DEFAULT_TAB = "/etc/sworndisktab"
SYS_BLOCK = "/sys/class/block"
UUID_PREFIX = "UUID="
FIELDS = "NAME DATA META KEY [OPTIONS]"
FLAG_OPTIONS = ("recoverable", "read-only", "noauto")
NUMBER_OPTIONS = ("queues", "depth", "crypto-workers")
PATH_OPTIONS = ("anchor",)


@dataclass(frozen=True)
class TabOptions:
    """The OPTIONS field; None means "as add's default"."""

    recoverable: bool = False
    read_only: bool = False
    noauto: bool = False
    anchor: Optional[str] = None
    queues: Optional[int] = None
    depth: Optional[int] = None
    crypto_workers: Optional[int] = None


@dataclass(frozen=True)
class TabEntry:
    """One valid line of the tab file."""

    path: str                 # the tab file
    lineno: int
    name: str
    data: str
    meta: str                 # a path or UUID=<uuid>
    key: str                  # a key-file path or "-" (passphrase on the terminal)
    options: TabOptions = field(default_factory=TabOptions)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.lineno}"

    @property
    def passphrase(self) -> bool:
        return self.key == "-"


@dataclass(frozen=True)
class TabLineError:
    """A line that could not be used; `name` is its first word (it may not be a valid name)."""

    path: str
    lineno: int
    message: str
    name: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno}: {self.message}"


@dataclass(frozen=True)
class Tab:
    path: str
    entries: List[TabEntry]
    errors: List[TabLineError]

    def find(self, name: str) -> Optional[TabEntry]:
        return next((e for e in self.entries if e.name == name), None)


class _LineError(Exception):
    pass


def _number(key: str, value: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise _LineError(f"option {key}= must be a positive number, got {value!r}")
    return int(value)


def _absolute(what: str, value: str) -> str:
    if not value.startswith("/"):
        raise _LineError(f"{what} must be an absolute path, got {value!r}")
    return os.path.normpath(value)


def parse_options(text: str) -> TabOptions:
    """The OPTIONS field: every option known, none twice, values checked."""
    if text == "-":
        return TabOptions()
    values: dict = {}
    for item in text.split(","):
        key, has_value, value = item.partition("=")
        attr = key.replace("-", "_")
        if not key:
            raise _LineError(f"empty option in {text!r}")
        if attr in values:
            raise _LineError(f"option {key} given twice")
        if key in FLAG_OPTIONS:
            if has_value:
                raise _LineError(f"option {key} takes no value")
            values[attr] = True
        elif key in NUMBER_OPTIONS + PATH_OPTIONS:
            if not value:
                raise _LineError(f"option {key} needs a value: {key}=...")
            values[attr] = (_number(key, value) if key in NUMBER_OPTIONS
                            else _absolute(f"option {key}=", value))
        else:
            known = ", ".join(FLAG_OPTIONS + tuple(f"{o}=" for o in PATH_OPTIONS + NUMBER_OPTIONS))
            raise _LineError(f"unknown option {key!r} (known: {known})")
    return TabOptions(**values)


def _device(role: str, text: str) -> str:
    if text.upper().startswith(UUID_PREFIX):
        if role == "DATA":
            raise _LineError("DATA cannot be named by UUID=: the data device carries no "
                             "header; name it by a stable path such as /dev/disk/by-id/...")
        uuid = text[len(UUID_PREFIX):]
        if not uuid:
            raise _LineError(f"{role}: UUID= needs the uuid `dump` shows")
        return UUID_PREFIX + uuid.lower()
    return _absolute(role, text)


def parse_line(path: str, lineno: int, words: List[str]) -> TabEntry:
    if len(words) not in (4, 5):
        raise _LineError(f"{len(words)} fields, expected 4 or 5: {FIELDS}")
    name, data, meta, key = words[:4]
    problem = name_problem(name)
    if problem:
        raise _LineError(problem)
    key = key if key == "-" else _absolute("KEY (a key file, or -)", key)
    options = parse_options(words[4]) if len(words) == 5 else TabOptions()
    return TabEntry(path, lineno, name, _device("DATA", data), _device("META", meta), key,
                    options)


def parse_tab(text: str, path: str = DEFAULT_TAB) -> Tab:
    """Every line of `text`: valid ones as entries, the others as errors (a name on two
    lines is an error on the second)."""
    entries: List[TabEntry] = []
    errors: List[TabLineError] = []
    seen: dict = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        try:
            entry = parse_line(path, lineno, words)
            if entry.name in seen:
                raise _LineError(f"the name {entry.name!r} is already used on line "
                                 f"{seen[entry.name]}")
        except _LineError as e:
            errors.append(TabLineError(path, lineno, str(e), words[0]))
            continue
        seen[entry.name] = lineno
        entries.append(entry)
    return Tab(path, entries, errors)


def load_tab(path: str = DEFAULT_TAB) -> Tab:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except FileNotFoundError:
        raise CliError(f"{path}: no such file; write one line per disk, "
                       f"'{FIELDS}' (see docs/boot.md), or give --tab PATH",
                       ExitCode.NOT_FOUND) from None
    except PermissionError:
        raise CliError(f"{path}: permission denied", ExitCode.PERMISSION) from None
    except IsADirectoryError:
        raise CliError(f"{path}: is a directory", ExitCode.USAGE) from None
    return parse_tab(text, path)


# --- UUID= ---------------------------------------------------------------------------------

def block_devices(sys_dir: str = SYS_BLOCK, dev_dir: str = "/dev") -> List[str]:
    """The block devices worth probing for a SwornDisk header: every one the kernel lists,
    except ublk devices (a SwornDisk is not nested in one, and reading one whose server is
    dead would hang) and empty ones."""
    try:
        names = sorted(os.listdir(sys_dir))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.startswith("ublkb"):
            continue
        try:
            with open(os.path.join(sys_dir, name, "size")) as f:
                if int(f.read().strip() or 0) == 0:
                    continue
        except (OSError, ValueError):
            pass
        path = os.path.join(dev_dir, name)
        if os.path.exists(path):
            out.append(path)
    return out


def _uuid_of(path: str) -> Optional[str]:
    """The uuid of the SwornDisk whose meta device is `path`, or None (not one, unreadable)."""
    from sworndisk import SwornDisk, keyslots
    try:
        if not SwornDisk.probe(path):
            return None
        return keyslots.read_header(path).uuid.lower()
    except Exception:                 # noqa: BLE001 - not a SwornDisk, or unreadable
        return None


def find_uuid(spec: str, candidates: Optional[Iterable[str]] = None) -> str:
    """The one device among `candidates` (default: block_devices()) holding the SwornDisk
    with uuid `spec` (UUID=<uuid>); a one-line CliError if none or several do."""
    uuid = spec[len(UUID_PREFIX):].lower()
    found = [p for p in (block_devices() if candidates is None else candidates)
             if _uuid_of(p) == uuid]
    if not found:
        raise CliError(f"no block device holds the SwornDisk {spec} (is the device "
                       f"attached? `dump` shows a disk's uuid)", ExitCode.NOT_FOUND)
    if len(found) > 1:
        raise CliError(f"{spec} is on several devices ({', '.join(found)}), copies of one "
                       f"disk: name the meta device by its path", ExitCode.USAGE)
    return found[0]


def resolve(entry: TabEntry, candidates: Optional[Iterable[str]] = None) -> Tuple[str, str]:
    """(data, meta) as device paths, META's UUID= looked up."""
    meta = entry.meta
    if meta.startswith(UUID_PREFIX):
        meta = find_uuid(meta, candidates)
    return entry.data, meta
