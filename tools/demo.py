"""`make demo`: SwornDisk as a real block device, end to end, in about a minute.

It creates file-backed data and meta images and a random key file, adds a SwornDisk ublk
device, puts ext4 on it, writes a few files, shows `sworndisk-ublk list` and the engine
statistics, deletes the device, adds it again without formatting, checks the files and
tears everything down.  Where the host kernel has no ublk driver it says so and runs the
same demo inside the QEMU VM of tools/vm/run (re-invoking itself with --in-vm).

    python -m tools.demo [--workdir DIR] [--size MiB] [--keep]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from ublk_shim import ctrl
from ublk_shim.sys import block_dev_id

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "sworndisk_ublk"]
# name -> content, or the size of random content
FILES = {"hello.txt": b"Hello from SwornDisk!\n", "random-1m.bin": 1 << 20,
         "random-64k.bin": 64 << 10}


class DemoError(Exception):
    pass


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def run(cmd: List[str], *, shown: Optional[str] = None, capture: bool = False,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run and echo a command the way a user would type it."""
    print(f"$ {shown or ' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    done = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    if capture and done.stdout:
        print(done.stdout, end="", flush=True)
    if check and done.returncode:
        raise DemoError(f"{shown or cmd[0]} failed with exit status {done.returncode}")
    return done


def swd(*args: str, capture: bool = False, check: bool = True) -> subprocess.CompletedProcess:
    return run(CLI + list(args), shown="sworndisk-ublk " + " ".join(shlex.quote(a) for a in args),
               capture=capture, check=check)


# --- where to run ---------------------------------------------------------------------------

def ublk_available() -> bool:
    if ctrl.driver_available():
        return True
    if os.geteuid() == 0:
        subprocess.run(["modprobe", "ublk_drv"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return ctrl.driver_available()


def run_in_vm(argv: List[str]) -> int:
    print("demo: this kernel has no ublk driver (no /dev/ublk-control, modprobe ublk_drv "
          "failed): running the demo inside a VM (tools/vm/run)", flush=True)
    cmd = [str(REPO / "tools" / "vm" / "run"), "--mem", "2048", "--timeout", "900", "--",
           sys.executable, "-m", "tools.demo", "--in-vm", *argv]
    return subprocess.run(cmd, cwd=REPO).returncode


# --- the demo -------------------------------------------------------------------------------

def make_images(work: Path, size: int) -> tuple:
    from sworndisk import SwornDisk
    work.mkdir(parents=True, exist_ok=True)
    data, meta, key = work / "data.img", work / "meta.img", work / "key"
    meta_size = -(-SwornDisk.min_meta_size(size, size // 4096) // (1 << 20)) << 20
    for path, n in ((data, size), (meta, meta_size)):
        with open(path, "wb") as f:
            f.truncate(n)
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    os.chmod(key, 0o600)
    print(f"data image {data}: {size >> 20} MiB (sparse); meta image {meta}: "
          f"{meta_size >> 20} MiB (SwornDisk.min_meta_size, rounded up); "
          f"key file {key}: 32 random bytes, mode 600")
    return data, meta, key


def add(data: Path, meta: Path, key: Path, size: int, fmt: str) -> str:
    table = f"0 {size // 512} sworndisk {data} {meta} 0 {fmt}"
    dev = swd("add", "--key-file", str(key), table, capture=True).stdout.strip()
    if block_dev_id(dev) is None:
        raise DemoError(f"unexpected output from add: {dev!r}")
    return dev


def dev_number(dev: str) -> str:
    return str(block_dev_id(dev))


def ensure_ext4() -> None:
    """A minimal kernel (the test VM's) may not autoload the ext4 module on mount."""
    with open("/proc/filesystems") as f:
        if any(line.split()[-1:] == ["ext4"] for line in f):
            return
    subprocess.run(["modprobe", "ext4"], check=False)


def write_files(mnt: Path) -> dict:
    sums = {}
    for name, spec in FILES.items():
        data = spec if isinstance(spec, bytes) else os.urandom(spec)
        (mnt / name).write_bytes(data)
        sums[name] = hashlib.sha256(data).hexdigest()
        print(f"wrote {mnt / name}: {len(data)} bytes, sha256 {sums[name][:16]}...")
    return sums


def check_files(mnt: Path, sums: dict) -> None:
    for name, digest in sums.items():
        got = hashlib.sha256((mnt / name).read_bytes()).hexdigest()
        if got != digest:
            raise DemoError(f"{name} changed: sha256 {got[:16]}... != {digest[:16]}...")
        print(f"{mnt / name}: sha256 matches")


def demo(work: Path, size: int, keep: bool) -> None:
    started = time.monotonic()
    mnt = work / "mnt"
    dev = None
    mounted = False
    try:
        say("1. images and key")
        data, meta, key = make_images(work, size)
        mnt.mkdir(exist_ok=True)

        say("2. add a new SwornDisk (format force)")
        dev = add(data, meta, key, size, "force")

        say("3. ext4 on it, a few files")
        ensure_ext4()
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", dev])
        run(["mount", "-o", "noinit_itable", dev, str(mnt)])
        mounted = True
        sums = write_files(mnt)
        run(["sync"])
        run(["df", "-h", str(mnt)])

        say("4. what is running, and the engine's statistics")
        swd("list")
        swd("stats", "-n", dev_number(dev))

        say("5. unmount and delete (the server flushes and closes the engine)")
        run(["umount", str(mnt)])
        mounted = False
        swd("del", "-n", dev_number(dev))
        dev = None

        say("6. add it again without formatting (format false) and check the files")
        dev = add(data, meta, key, size, "false")
        run(["mount", "-o", "ro", dev, str(mnt)])
        mounted = True
        check_files(mnt, sums)
        swd("list")

        say("7. tear down")
        run(["umount", str(mnt)])
        mounted = False
        swd("del", "-n", dev_number(dev))
        dev = None
        print(f"\ndemo finished in {time.monotonic() - started:.0f} s: the files survived a "
              f"delete and re-add, encrypted and authenticated on {data.name}/{meta.name}")
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)])
        if dev is not None:
            subprocess.run(CLI + ["del", "-n", dev_number(dev), "--wait", "10"])
        if not keep:
            for name in ("data.img", "meta.img", "key"):
                try:
                    (work / name).unlink()
                except FileNotFoundError:
                    pass
            try:
                mnt.rmdir()
                work.rmdir()
            except OSError:
                pass


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="/var/tmp/sworndisk-demo", type=Path)
    p.add_argument("--size", type=int, default=256, metavar="MiB", help="data image size")
    p.add_argument("--keep", action="store_true", help="keep the images and key file")
    p.add_argument("--in-vm", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.in_vm and not ublk_available():
        return run_in_vm([a for a in argv if a != "--in-vm"])
    if os.geteuid() != 0:
        print("demo: error: run as root (ublk devices and mount need it)", file=sys.stderr)
        return 1
    try:
        demo(args.workdir, args.size << 20, args.keep)
    except DemoError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
