"""One owner per disk (issue 7, item 1): while a SwornDisk is open, no other open or create
gets at its images, from another process or this one, by the same path, a symlink or a
hard link, and a refused attempt writes nothing. The lock dies with its owner, so a
crashed owner's disk opens (that is what `recover` needs).

Real files, real processes (the owners and intruders are `python -c` subprocesses), real
OFD locks; block devices (O_EXCL) on loop devices where the machine has them, and in the
VM (tests/e2e/test_ownership.py).
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sworndisk import DeviceBusyError, FileDevice, InvalidArgument, SwornDisk
from sworndisk.device import check_unowned, create_image

from .conftest import BS, KEY16, MiB

REPO = Path(__file__).resolve().parents[1]
DATA_SIZE = 32 * MiB
FORMS = ("same path", "symlink", "hard link")
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


def digest(*paths: str) -> list[str]:
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


@pytest.fixture
def paths(tmp_path) -> dict[str, tuple[str, str]]:
    """The same two images under the three path forms, the links in another directory."""
    data, meta = tmp_path / "data.img", tmp_path / "meta.img"
    create_image(str(data), DATA_SIZE)
    create_image(str(meta), SwornDisk.min_meta_size(DATA_SIZE))
    other = tmp_path / "elsewhere"
    other.mkdir()
    for img in (data, meta):
        os.symlink(img, other / f"{img.stem}.sym")
        os.link(img, other / f"{img.stem}.hard")
    return {"same path": (str(data), str(meta)),
            "symlink": (str(other / "data.sym"), str(other / "meta.sym")),
            "hard link": (str(other / "data.hard"), str(other / "meta.hard"))}


@pytest.mark.parametrize("owner_op", ["create", "open"])
def test_a_second_process_cannot_open_or_create_an_owned_disk(paths, owner_op):
    data, meta = paths["same path"]
    if owner_op == "open":
        SwornDisk.create(data, meta, KEY16).close()
    owner = own(owner_op, data, meta)
    before = digest(data, meta)
    attempts = [(op, *paths[form]) for form in FORMS for op in ("open", "create")]
    for (op, d, _), line in zip(attempts, intrude(*attempts), strict=True):
        assert line.startswith(f"busy {errno.EBUSY} data device {d} "), (op, d, line)
        assert f"is in use: locked by pid {owner.pid} " in line, line
    assert digest(data, meta) == before, "a refused open or create wrote to the images"
    owner.release()
    with SwornDisk.open(*paths["hard link"], KEY16) as disk:
        assert mark_of(disk.read(0, 1)) == "owner"


def test_the_lock_dies_with_its_process(paths):
    """kill -9 of the owner frees the images: the crashed disk reopens (recover's case)."""
    data, meta = paths["same path"]
    owner = own("create", data, meta, "flushed before the kill")
    owner.kill()
    with SwornDisk.open(*paths["symlink"], KEY16) as disk:
        assert mark_of(disk.read(0, 1)) == "flushed before the kill"


@pytest.mark.parametrize("forms", [("same path", "same path"), ("same path", "symlink"),
                                   ("symlink", "hard link")])
def test_racing_creates_exactly_one_wins(paths, forms):
    racers = [Owner("create", *paths[form], f"racer {i}") for i, form in enumerate(forms)]
    for racer in racers:            # both armed (imports done), then go back to back
        racer.go()
    results = [racer.result() for racer in racers]
    winners = [r for r, res in zip(racers, results) if res == "owner"]
    assert len(winners) == 1, results
    loser = next(res for res in results if res != "owner")
    assert loser.startswith(f"busy {errno.EBUSY} ") and "is in use" in loser, loser
    for racer in racers:
        racer.release()
    with SwornDisk.open(*paths["same path"], KEY16) as disk:
        assert mark_of(disk.read(0, 1)) == winners[0].mark


def test_a_second_open_in_the_same_process_is_refused(paths):
    with SwornDisk.create(*paths["same path"], KEY16) as disk:
        disk.write(1, b"x" * BS)
        for form in FORMS:
            with pytest.raises(DeviceBusyError) as e:
                SwornDisk.open(*paths[form], KEY16)
            assert "this process" in str(e.value)
        disk.flush()
    with SwornDisk.open(*paths["symlink"], KEY16) as disk:       # close() released it
        assert disk.read(1, 1) == b"x" * BS


def test_devices_passed_in_stay_locked_until_their_caller_closes_them(paths):
    d, m = (FileDevice(p) for p in paths["same path"])
    SwornDisk.create(d, m, KEY16).close()
    with pytest.raises(DeviceBusyError):        # the caller's devices are still open
        SwornDisk.open(*paths["hard link"], KEY16)
    with SwornDisk.open(d, m, KEY16):           # the caller itself may reopen on them
        pass
    d.close()
    m.close()
    SwornDisk.open(*paths["hard link"], KEY16).close()


def test_probe_of_a_live_disk_only_reads(paths):
    """probe and read_kdf_salt answer for an owned disk (they write nothing, so they need
    no ownership); anything that writes must own the disk first."""
    data, meta = paths["same path"]
    owner = own("create", data, meta)
    assert SwornDisk.probe(paths["symlink"][1])
    assert SwornDisk.read_kdf_salt(paths["hard link"][1]) is None
    owner.release()


def test_one_file_cannot_be_both_data_and_meta(paths):
    data, _ = paths["same path"]
    before = digest(data)
    with pytest.raises(InvalidArgument, match="must differ"):
        SwornDisk.create(data, paths["hard link"][0], KEY16)
    assert digest(data) == before


def test_check_unowned_reports_the_owner_without_taking_the_lock(paths):
    data, meta = paths["same path"]
    check_unowned(paths["symlink"][0], "data device")           # free: no error
    with SwornDisk.create(data, meta, KEY16):
        with pytest.raises(DeviceBusyError) as e:
            check_unowned(paths["hard link"][1], "meta device")
        assert e.value.errno == errno.EBUSY
        assert str(e.value).startswith(f"meta device {paths['hard link'][1]} is in use: "
                                       f"locked by pid {os.getpid()} ")
    check_unowned(data, "data device")
    with SwornDisk.open(data, meta, KEY16):      # the check left no lock behind
        pass


@pytest.fixture
def loop_devices(tmp_path):
    """Two loop devices over sparse files (root and util-linux losetup needed)."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    devs = []
    try:
        for name, size in (("data", DATA_SIZE), ("meta", SwornDisk.min_meta_size(DATA_SIZE))):
            img = tmp_path / f"{name}.loop"
            create_image(str(img), (size + MiB - 1) // MiB * MiB)
            done = subprocess.run(["losetup", "--find", "--show", str(img)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"no loop device: {done.stderr.strip()}")
            devs.append(done.stdout.strip())
        yield devs
    finally:
        for dev in devs:
            subprocess.run(["losetup", "--detach", dev], check=True)


def test_block_devices_are_claimed_exclusively(loop_devices, tmp_path):
    data, meta = loop_devices
    link = tmp_path / "data-link"
    os.symlink(data, link)
    with SwornDisk.create(data, meta, KEY16):
        for fn in (lambda: SwornDisk.open(str(link), meta, KEY16),
                   lambda: check_unowned(str(link), "data device")):
            with pytest.raises(DeviceBusyError) as e:
                fn()
            assert str(e.value).startswith(f"data device {link} (= {data}) is in use: ")
            assert f"open by pid {os.getpid()} " in str(e.value)
        with pytest.raises(OSError) as e:                 # any other exclusive user, too
            os.open(meta, os.O_RDONLY | os.O_EXCL)
        assert e.value.errno == errno.EBUSY
    os.close(os.open(meta, os.O_RDONLY | os.O_EXCL))       # released at close()
    SwornDisk.open(str(link), meta, KEY16).close()
