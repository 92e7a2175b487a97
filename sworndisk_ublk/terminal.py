"""The controlling terminal, for what must come from a person at the keyboard.

Questions go to /dev/tty, never to stdin, which may be a pipe, a script or the table
itself (`add -`); without a controlling terminal (cron, systemd, `setsid`) there is no one
to ask, and the caller must refuse or take an explicit flag instead.
"""
from __future__ import annotations

import os
from typing import Optional

TTY = "/dev/tty"


def _open() -> Optional[int]:
    try:
        return os.open(TTY, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None


def available() -> bool:
    """True if this process has a controlling terminal to ask on."""
    fd = _open()
    if fd is None:
        return False
    os.close(fd)
    return True


def ask(prompt: str) -> Optional[str]:
    """Show `prompt` on the terminal and read one line (without its end of line), echoed;
    '' at end of input, None if there is no terminal."""
    fd = _open()
    if fd is None:
        return None
    try:
        os.write(fd, prompt.encode())
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(fd, 1)
            if not chunk:
                break
            line += chunk
        return line.decode("utf-8", "replace").rstrip("\r\n")
    finally:
        os.close(fd)
