"""The recorded workloads, and the guest side of `tools/trace/record` (runs in the VM).

    python -m tools.trace.workloads NAME [NAME...]      # inside tools/vm/run, as root

For each workload: a sparse 512 MiB backing file on the guest's tmpfs is served by
`python -m ublk_shim loop`; ext4 is made on it and the workload's *setup* phase (laying out
files, loading the database) runs unrecorded, as Filebench and YCSB do before they measure;
then the device is served again with `--record`, ext4 is mounted with default options
(ordered data, barriers: journal commits are FLUSH + FUA), caches dropped, the *run* phase
runs, ext4 is unmounted and the server stopped. The trace (tools/trace/format.py) is then
printed base64 between markers on stdout, since nothing the guest writes reaches the host.
"""
from __future__ import annotations

import base64
import bisect
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List

DEVICE_BYTES = 512 << 20
BEGIN, END = "@@TRACE-BEGIN", "@@TRACE-END@@"
SITE_PACKAGES = ("pip", "numpy", "matplotlib", "fontTools", "hypothesis", "_pytest",
                 "cryptography", "Crypto")


# --- fio personalities (Filebench equivalents) -------------------------------------------

def _fio(mnt: str, job: str, *, layout: bool) -> None:
    """Runs a fio job file; `layout` only creates its files (fio --create_only)."""
    path = os.path.join(tempfile.gettempdir(), "job.fio")
    with open(path, "w") as f:
        f.write(job.format(dir=mnt))
    cmd = ["fio", "--eta=never", "--output=/dev/null", path]
    if layout:
        cmd.append("--create_only=1")
    subprocess.run(cmd, check=True)


# fileserver: 4 threads over ~100 MiB of 16-256 KiB files, random reads and writes of
# 4-64 KiB, 2:1 writes to reads, no fsync: ext4 writes back on its own (Filebench
# fileserver: create/write/append/read/delete with 50 threads, mean 128 KiB files).
FILESERVER = """
[global]
directory={dir}
ioengine=psync
nrfiles=200
filesize=16k-256k
file_service_type=random
bsrange=4k-64k
rw=randrw
rwmixwrite=67
io_size=24m
numjobs=4
group_reporting=1
[fileserver]
"""

# varmail: 4 threads over 1000 small files (16 KiB mean), read or append then fsync every
# write (Filebench varmail: create/append/fsync, read/append/fsync, read, delete).
VARMAIL = """
[global]
directory={dir}
ioengine=psync
nrfiles=250
filesize=4k-32k
file_service_type=random
bsrange=4k-16k
rw=randrw
rwmixread=50
fsync=1
io_size=4m
numjobs=4
group_reporting=1
[varmail]
"""

# webserver: 4 threads reading whole 16-64 KiB files of a 1000-file set in random order, and
# one thread appending 16 KiB records to a log (Filebench webserver: 10 reads per append).
WEBSERVER = """
[global]
directory={dir}
ioengine=psync
group_reporting=1
[pages]
nrfiles=250
filesize=16k-64k
file_service_type=random
rw=read
bs=16k
io_size=40m
numjobs=4
[log]
filename=access.log
rw=write
bs=16k
size=4m
"""


# --- SQLite under YCSB ------------------------------------------------------------------

YCSB_RECORDS = 60_000
YCSB_VALUE = 1000
# Operations per run: each update is a commit with 1-4 fsyncs, and a replay is bound by
# device flushes (ms each), so updates are kept to about a thousand per trace.
YCSB_OPS = {("wal", "a"): 2000, ("wal", "f"): 2000, ("delete", "a"): 1000,
            ("delete", "f"): 1000, ("wal", "b"): 4000, ("delete", "b"): 4000}
ZIPF_THETA = 0.99


class Zipfian:
    """YCSB's scrambled zipfian key chooser: rank r has weight 1/(r+1)^theta, and ranks are
    spread over the key space by a fixed permutation, so hot keys are not neighbours."""

    def __init__(self, n: int, seed: int):
        self.rng = random.Random(seed)
        acc, self.cdf = 0.0, []
        for r in range(n):
            acc += 1.0 / (r + 1) ** ZIPF_THETA
            self.cdf.append(acc)
        self.keys = list(range(n))
        random.Random(seed + 1).shuffle(self.keys)

    def next(self) -> int:
        return self.keys[min(bisect.bisect_left(self.cdf, self.rng.random() * self.cdf[-1]),
                             len(self.keys) - 1)]


def _db(mnt: str, journal: str) -> sqlite3.Connection:
    con = sqlite3.connect(os.path.join(mnt, "ycsb.db"), isolation_level=None)
    con.execute(f"PRAGMA journal_mode={journal}")
    con.execute("PRAGMA synchronous=FULL")     # the default: fsync at every commit
    return con


def ycsb_load(mnt: str, journal: str) -> None:
    con = _db(mnt, journal)
    con.execute("CREATE TABLE usertable (key INTEGER PRIMARY KEY, field BLOB)")
    rng = random.Random(1)
    for start in range(0, YCSB_RECORDS, 1000):
        con.execute("BEGIN")
        con.executemany("INSERT INTO usertable VALUES (?, ?)",
                        ((k, rng.randbytes(YCSB_VALUE)) for k in range(start, start + 1000)))
        con.execute("COMMIT")
    if journal == "wal":
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def ycsb_run(mnt: str, journal: str, mix: str) -> None:
    """A: 50% read / 50% update; B: 95/5; F: 50% read, 50% read-modify-write. Each update
    is its own transaction (autocommit), so SQLite fsyncs as an application would."""
    read_share = {"a": 0.5, "b": 0.95, "f": 0.5}[mix]
    con, keys, rng = _db(mnt, journal), Zipfian(YCSB_RECORDS, 7), random.Random(3)
    for _ in range(YCSB_OPS[journal, mix]):
        key = keys.next()
        if rng.random() < read_share:
            con.execute("SELECT field FROM usertable WHERE key=?", (key,)).fetchone()
        elif mix == "f":
            con.execute("BEGIN IMMEDIATE")
            (old,) = con.execute("SELECT field FROM usertable WHERE key=?", (key,)).fetchone()
            con.execute("UPDATE usertable SET field=? WHERE key=?", (old[::-1], key))
            con.execute("COMMIT")
        else:
            con.execute("UPDATE usertable SET field=? WHERE key=?",
                        (rng.randbytes(YCSB_VALUE), key))
    con.close()


# --- metadata-heavy: unpack and delete a tree ---------------------------------------------

def untar_setup(mnt: str) -> None:
    """The tree to unpack, as one tar on the disk (so the run reads it from there)."""
    site = os.path.join(sys.prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}",
                        "site-packages")
    names = [n for n in SITE_PACKAGES if os.path.isdir(os.path.join(site, n))]
    subprocess.run(["tar", "-C", site, "-cf", os.path.join(mnt, "tree.tar"), *names], check=True)


def untar_run(mnt: str) -> None:
    """Unpack, sync, delete, sync, fstrim (as a weekly fstrim.timer would)."""
    dest = os.path.join(mnt, "tree")
    os.mkdir(dest)
    subprocess.run(["tar", "-C", dest, "-xf", os.path.join(mnt, "tree.tar")], check=True)
    os.sync()
    shutil.rmtree(dest)
    os.sync()
    subprocess.run(["fstrim", mnt], check=False)


@dataclass(frozen=True)
class Workload:
    name: str
    what: str
    setup: Callable[[str], None]
    run: Callable[[str], None]


def _fio_workload(name: str, job: str) -> Workload:
    return Workload(name, f"fio equivalent of Filebench {name}",
                    lambda m: _fio(m, job, layout=True), lambda m: _fio(m, job, layout=False))


def _sqlite(journal: str, mix: str) -> Workload:
    label = {"wal": "WAL", "delete": "rollback journal"}[journal]
    return Workload(f"sqlite-{'wal' if journal == 'wal' else 'rollback'}-ycsb-{mix}",
                    f"SQLite ({label}) under YCSB-{mix.upper()}, zipfian keys",
                    lambda m: ycsb_load(m, journal), lambda m: ycsb_run(m, journal, mix))


WORKLOADS: Dict[str, Workload] = {w.name: w for w in [
    _fio_workload("fileserver", FILESERVER),
    _fio_workload("varmail", VARMAIL),
    _fio_workload("webserver", WEBSERVER),
    *[_sqlite(j, x) for j in ("wal", "delete") for x in ("a", "b", "f")],
    Workload("untar-delete", "unpack a site-packages tree, sync, delete it, sync, fstrim",
             untar_setup, untar_run),
]}


# --- the guest driver ---------------------------------------------------------------------

class LoopServer:
    """`python -m ublk_shim loop FILE [--record TRACE]` as a child; stop() ends it."""

    def __init__(self, backing: str, record: str = ""):
        cmd = [sys.executable, "-m", "ublk_shim", "loop", backing, "--queues", "1",
               "--depth", "64"] + (["--record", record] if record else [])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.dev = self.proc.stdout.readline().strip()
        if not self.dev.startswith("/dev/ublkb"):
            self.proc.wait()
            raise RuntimeError(f"ublk_shim loop did not start (exit {self.proc.returncode})")
        for _ in range(100):
            if os.path.exists(self.dev):
                break
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=120)
        if self.proc.returncode:
            raise RuntimeError(f"ublk_shim loop exited {self.proc.returncode}")


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


@contextmanager
def served(backing: str, record: str = "") -> Iterator[str]:
    server = LoopServer(backing, record)
    try:
        yield server.dev
    finally:
        server.stop()


@contextmanager
def mounted(dev: str, mnt: str) -> Iterator[None]:
    """ext4 on `dev` at `mnt` (default options); unmounted even when the body fails."""
    _sh("mount", dev, mnt)
    try:
        yield
    finally:
        _sh("umount", mnt)


def record(w: Workload, workdir: str) -> str:
    backing, trace, mnt = (os.path.join(workdir, n) for n in ("backing.img", f"{w.name}.trace.xz",
                                                            "mnt"))
    with open(backing, "wb") as f:
        f.truncate(DEVICE_BYTES)
    os.makedirs(mnt, exist_ok=True)
    with served(backing) as dev:
        _sh("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            dev)
        with mounted(dev, mnt):
            w.setup(mnt)
    with served(backing, trace) as dev, mounted(dev, mnt):
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        t0 = time.monotonic()
        w.run(mnt)
    print(f"{w.name}: run phase {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    os.unlink(backing)
    return trace


def main(argv: List[str]) -> int:
    unknown = [n for n in argv if n not in WORKLOADS]
    if unknown or not argv:
        print(f"usage: python -m tools.trace.workloads NAME...; names: {', '.join(WORKLOADS)}",
              file=sys.stderr)
        return 2
    workdir = tempfile.mkdtemp(prefix="trace-", dir="/run")
    for name in argv:
        path = record(WORKLOADS[name], workdir)
        with open(path, "rb") as f:
            data = base64.b64encode(f.read()).decode()
        print(f"{BEGIN} {name} {len(data)}@@")
        for i in range(0, len(data), 76):
            print(data[i:i + 76])
        print(END, flush=True)
        os.unlink(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
