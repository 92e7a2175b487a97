"""For the ownership tests (tests/test_ownership.py, tests/test_cli.py): a SwornDisk user
in another process (a `python -c` subprocess of this interpreter, given the key on stdin),
and the three path forms of one pair of images."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from .conftest import KEY16

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 120

# Opens or creates the disk when told "go", writes its mark to block 0, flushes, says
# "owner" (or "busy <errno> <message>"), then holds the disk until its stdin closes.
_OWNER = r'''
import sys
from sworndisk import DeviceBusyError, SwornDisk
op, data, meta, mark = sys.argv[1:5]
key = bytes.fromhex(sys.stdin.readline())
print("armed", flush=True)
if sys.stdin.readline() != "go\n":
    sys.exit("no go")
try:
    disk = (SwornDisk.create if op == "create" else SwornDisk.open)(data, meta, key)
except DeviceBusyError as e:
    print("busy", e.errno, e, flush=True)
    sys.exit(0)
disk.write(0, mark.encode().ljust(4096, b"."))
disk.flush()
print("owner", flush=True)
sys.stdin.read()
disk.close()
'''

# Tries each "op<TAB>data<TAB>meta" of argv in turn; one line per attempt.
_INTRUDER = r'''
import sys
from sworndisk import DeviceBusyError, SwornDisk
key = bytes.fromhex(sys.stdin.readline())
for attempt in sys.argv[1:]:
    op, data, meta = attempt.split("\t")
    try:
        disk = (SwornDisk.create if op == "create" else SwornDisk.open)(data, meta, key)
    except DeviceBusyError as e:
        print("busy", e.errno, e, flush=True)
    else:
        disk.close()
        print("got it", flush=True)
'''


def _python(code: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    watchdog = threading.Timer(TIMEOUT, proc.kill)      # a hung child fails the test
    watchdog.daemon = True
    watchdog.start()
    proc.stdin.write(KEY16.hex() + "\n")                # the key never goes on argv
    proc.stdin.flush()
    return proc


class Owner:
    """A SwornDisk user in another process (see _OWNER)."""

    def __init__(self, op: str, data: str, meta: str, mark: str):
        self.mark = mark
        self.proc = _python(_OWNER, op, data, meta, mark)
        assert self._line() == "armed", self.proc.stderr.read()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self) -> str:
        return self.proc.stdout.readline().rstrip("\n")

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> str:
        line = self._line()
        assert line, f"the child died: {self.proc.stderr.read()}"
        return line

    def release(self) -> None:
        """Close the disk and exit cleanly."""
        self.proc.stdin.close()
        assert self.proc.wait(TIMEOUT) == 0, self.proc.stderr.read()

    def kill(self) -> None:
        """Die without closing anything, as a crashed server does."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(TIMEOUT)


def own(op: str, data: str, meta: str, mark: str = "owner") -> Owner:
    owner = Owner(op, data, meta, mark)
    owner.go()
    assert owner.result() == "owner"
    return owner


def intrude(*attempts: tuple[str, str, str]) -> list[str]:
    """Run the attempts in one other process; its line per attempt."""
    proc = _python(_INTRUDER, *("\t".join(a) for a in attempts))
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    return out.splitlines()


def mark_of(block: bytes) -> str:
    return block.rstrip(b".").decode()


def mark_of(block: bytes) -> str:
    """The mark an Owner wrote to a block."""
    return block.rstrip(b".").decode()


def path_forms(where: Path, data: str, meta: str) -> dict[str, tuple[str, str]]:
    """The images as given, through symlinks, and through hard links (made under `where`,
    so that no two forms share a directory or a name)."""
    other = where / "elsewhere"
    other.mkdir()
    forms = {"same path": (data, meta)}
    for form, make in (("symlink", os.symlink), ("hard link", os.link)):
        pair = []
        for role, img in (("data", data), ("meta", meta)):
            link = other / f"{role}.{form.replace(' ', '-')}"
            make(img, link)
            pair.append(str(link))
        forms[form] = (pair[0], pair[1])
    return forms


def digest(*paths: str) -> list[str]:
    """What the files hold now: to show that a refused attempt wrote nothing."""
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]
