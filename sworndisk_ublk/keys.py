"""Where a key comes from: a key file, or a passphrase (which the engine stretches with Argon2id).

Keys never travel on a command line (every user sees argv through ps) and are never
written to the state directory or the server log.  A key file holds either the raw key
(16 or 32 bytes) or its hex text (32 or 64 hex digits, an optional trailing newline), so
both ``head -c 32 /dev/urandom > key`` and ``openssl rand -hex 32 > key`` work.  A text
file of exactly 32 or 64 hex digits is read as hex: a random raw key is all hex digits
with negligible probability (about 2^-113 for 32 bytes).

A passphrase is read as one line from stdin when stdin is not a terminal (and not the
table's source), as cryptsetup does for scripts; otherwise without echo from the
controlling terminal (getpass), twice for a new one. The engine turns it into a key slot's
key with Argon2id, with the parameters stored in the slot (`sworndisk.kdf`).
"""
from __future__ import annotations

import getpass
import string
import sys
from dataclasses import dataclass, field
from typing import Optional

from . import terminal
from .errors import CliError, ExitCode

RAW_KEY_SIZES = (16, 32)
HEX_KEY_DIGITS = (32, 64)
_MAX_KEY_FILE = 4096
_MAX_PASSPHRASE = 512


@dataclass(frozen=True)
class KeySource:
    """Key material as given by the user: a ready key, or a passphrase to derive one from.

    The secret fields are excluded from repr() so that a stray log line or traceback
    cannot print them.
    """

    description: str                                   # "key file /root/k" or "passphrase"
    key: Optional[bytes] = field(default=None, repr=False)
    passphrase: Optional[bytes] = field(default=None, repr=False)

    @property
    def is_passphrase(self) -> bool:
        return self.passphrase is not None

    def engine_args(self, prefix: str = "") -> dict:
        """`key=` or `passphrase=` (with `prefix`, e.g. new_key=) for the engine's API."""
        if self.is_passphrase:
            return {f"{prefix}passphrase": self.passphrase}
        return {f"{prefix}key": self.key}


def parse_key_bytes(content: bytes, path: str) -> bytes:
    """Turn the content of a key file into key bytes (raw or hex, see the module doc)."""
    text = content[:-1] if content.endswith(b"\n") else content
    if text.endswith(b"\r"):
        text = text[:-1]
    if len(text) in HEX_KEY_DIGITS and all(c in string.hexdigits.encode() for c in text):
        return bytes.fromhex(text.decode("ascii"))
    if len(content) in RAW_KEY_SIZES:
        return content
    raise CliError(
        f"key file {path}: {len(content)} bytes; expected a raw key of 16 or 32 bytes, "
        f"or 32 or 64 hex digits", ExitCode.USAGE)


def load_key_file(path: str) -> KeySource:
    """Read a key file; errors are one-line CliErrors that never show the content."""
    try:
        with open(path, "rb") as f:
            content = f.read(_MAX_KEY_FILE + 1)
    except FileNotFoundError:
        raise CliError(f"key file {path}: no such file", ExitCode.NOT_FOUND) from None
    except IsADirectoryError:
        raise CliError(f"key file {path}: is a directory", ExitCode.USAGE) from None
    except PermissionError:
        raise CliError(f"key file {path}: permission denied", ExitCode.PERMISSION) from None
    if len(content) > _MAX_KEY_FILE:
        raise CliError(f"key file {path}: too large to be a key (more than {_MAX_KEY_FILE} "
                       f"bytes)", ExitCode.USAGE)
    return KeySource(f"key file {path}", key=parse_key_bytes(content, path))


def _terminal_available() -> bool:
    return terminal.available()


def _read_terminal(prompt: str, confirm: bool) -> bytes:
    try:
        first = getpass.getpass(prompt)
        if confirm and getpass.getpass("Verify passphrase: ") != first:
            raise CliError("passphrases do not match", ExitCode.USAGE)
    except (EOFError, KeyboardInterrupt):
        raise CliError("no passphrase entered", ExitCode.USAGE) from None
    return first.encode("utf-8")


def _read_stdin() -> bytes:
    line = sys.stdin.buffer.readline(_MAX_PASSPHRASE + 1)
    if not line:
        raise CliError("no key: standard input is empty; use --key-file PATH, or give the "
                       "passphrase as one line on standard input", ExitCode.USAGE)
    if len(line) > _MAX_PASSPHRASE:
        raise CliError(f"passphrase on stdin longer than {_MAX_PASSPHRASE} bytes",
                       ExitCode.USAGE)
    return line.rstrip(b"\r\n")


NO_KEY_MESSAGE = "no key: use --key-file PATH (there is no terminal to ask for a passphrase)"


def _stdin_is_a_pipe() -> bool:
    try:
        return not sys.stdin.isatty()
    except (AttributeError, ValueError):      # closed or replaced stdin
        return False


def ask_passphrase(target: str, *, new: bool, stdin_free: bool) -> KeySource:
    """Ask for a passphrase for the disk on `target` (a meta device path).

    One line from stdin when it is a pipe or a file (and `stdin_free`: it is not the
    table's source), as cryptsetup reads it in scripts; else the terminal, where `new`
    asks twice (a typo would lock the data away).
    """
    prompt = (f"Enter a new passphrase for the SwornDisk on {target}: " if new
              else f"Enter passphrase for {target}: ")
    if stdin_free and _stdin_is_a_pipe():
        passphrase = _read_stdin()
    elif _terminal_available():
        passphrase = _read_terminal(prompt, confirm=new)
    else:
        raise CliError(NO_KEY_MESSAGE, ExitCode.USAGE)
    if not passphrase:
        raise CliError("empty passphrase", ExitCode.USAGE)
    return KeySource("passphrase", passphrase=passphrase)


def get_key_source(key_file: Optional[str], meta: str, *, new: bool,
                   stdin_free: bool) -> KeySource:
    """The key file if one was given, else a passphrase prompt."""
    if key_file is not None:
        return load_key_file(key_file)
    return ask_passphrase(meta, new=new, stdin_free=stdin_free)
