"""kill -9 / recover cycles under an fsync workload on ext4, run as root in the ublk VM:

    tools/vm/run -- .venv/bin/python tests/e2e/scripts/fsync_recover.py [CYCLES]

Issue 11: a file whose fsync returned must never come back as zeros after `recover`. A
workload process creates files (and now and then rewrites an old one), fsyncs each file
and then its directory, and only then appends the file's SHA-256 to a list kept outside
the device. Meanwhile the server of the --recoverable device is killed with kill -9 at
chosen points -- inside a file fsync, inside a directory fsync, at a random moment -- and
`recover` brings it back while the file system stays mounted and the workload blocks and
carries on. At the end: unmount, fsck, mount again, and every listed file must have its
listed content. A last step deletes the write log before a recover: the loss must be
reported (a warning, `list`, the file system sees EIO), and once the file system is
unmounted the device must work again (fsck, mount, fsync).

Prints ``@@STEP <name> PASS|FAIL: <why>`` per step (tests/e2e/test_fsync_recover.py
asserts on them) and ``@@RESULT <json>`` with the figures.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
PY = sys.executable
CLI = [PY, "-m", "sworndisk_ublk"]
W = "/var/tmp/sworndisk-fsync"
MNT = f"{W}/mnt"
SUMS = f"{W}/sums"                   # outside the device: name sha256 size, one a line
RUN = os.environ.get("SWORNDISK_RUN_DIR") or "/run/sworndisk"
DATA_MIB = 64
TRIGGERS = ["fsync", "random", "dirsync", "fsync", "random", "fsync"]
STEP = "setup"

WORKLOAD = r'''
import hashlib, os, random, sys
mnt, sums, stop = sys.argv[1:4]
rng = random.Random(11)
names, i = [], 0
def say(*words):
    print(*words, flush=True)
while not os.path.exists(stop):
    if names and i % 5 == 4:
        name = rng.choice(names)                  # rewrite an old file in place
    else:
        name = f"f{i:05d}"
        names.append(name)
    data = rng.randbytes(rng.choice([4096, 12288, 65536, 150000, 300000]))
    fd = os.open(f"{mnt}/{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    say("fsync", i)
    os.fsync(fd)
    say("fsynced", i)
    os.close(fd)
    dfd = os.open(mnt, os.O_RDONLY)
    say("dirsync", i)
    os.fsync(dfd)
    say("dirsynced", i)
    os.close(dfd)
    with open(sums, "a") as f:
        f.write(f"{name} {hashlib.sha256(data).hexdigest()} {len(data)}\n")
    say("done", i)
    i += 1
'''


class Failed(Exception):
    pass


def step(name: str) -> None:
    global STEP
    STEP = name
    print(f"---- step {name}", flush=True)


def passed() -> None:
    print(f"@@STEP {STEP} PASS", flush=True)


def sh(*argv: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise Failed(f"{' '.join(argv)} exited {done.returncode}: "
                     f"{(done.stderr or done.stdout).strip()[-400:]}")
    return done


class Workload:
    """The fsync workload in its own process; a thread follows its progress markers."""

    def __init__(self) -> None:
        self.stop_file = f"{W}/stop"
        self.proc = subprocess.Popen([PY, "-c", WORKLOAD, MNT, SUMS, self.stop_file],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.cond = threading.Condition()
        self.last = ("", -1)             # the last marker: (word, file number)
        self.seen: dict = {}             # marker word -> the highest file number it had
        self.done = 0
        self.output: list = []
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        for line in self.proc.stdout:
            words = line.split()
            with self.cond:
                if len(words) == 2 and words[1].isdigit():
                    self.last = (words[0], int(words[1]))
                    self.seen[words[0]] = int(words[1])
                    if words[0] == "done":
                        self.done += 1
                else:
                    self.output.append(line.rstrip())
                self.cond.notify_all()

    def wait_for(self, what, timeout: float = 300.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: what() or self.proc.poll() is not None,
                                      timeout):
                raise Failed(f"the workload made no progress in {timeout:.0f} s "
                             f"(last marker {self.last})")
            if self.proc.poll() is not None and not what():
                raise Failed(f"the workload exited {self.proc.returncode}: "
                             f"{self.output[-5:]}")

    def finish(self) -> None:
        open(self.stop_file, "w").close()
        try:
            code = self.proc.wait(300)
        except subprocess.TimeoutExpired:
            raise Failed(f"the workload did not stop (last marker {self.last})") from None
        if code != 0:
            raise Failed(f"the workload failed (exit {code}): {self.output[-5:]}")


def server_pid(n: int) -> int:
    with open(f"{RUN}/{n}.json") as f:
        return json.load(f)["pid"]


def kill_server(n: int) -> int:
    pid = server_pid(n)
    os.kill(pid, 9)
    deadline = time.monotonic() + 30
    while os.path.exists(f"/proc/{pid}") and not _zombie(pid):
        if time.monotonic() > deadline:
            raise Failed(f"server {pid} survived kill -9")
        time.sleep(0.05)
    return pid


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def recover(n: int) -> dict:
    done = sh(*CLI, "recover", "-n", str(n), "--key-file", f"{W}/key", "--json", check=False)
    if done.returncode != 0:
        raise Failed(f"recover exited {done.returncode}: {done.stderr.strip()}")
    ready = json.loads(done.stdout)
    ready["stderr"] = done.stderr
    return ready


def setup() -> str:
    step("setup")
    sh("modprobe", "ext4", check=False)
    shutil.rmtree(W, ignore_errors=True)
    os.makedirs(MNT)
    sys.path.insert(0, REPO)
    from sworndisk import SwornDisk
    size = DATA_MIB << 20
    with open(f"{W}/data", "wb") as f:
        f.truncate(size)
    with open(f"{W}/meta", "wb") as f:
        f.truncate(-(-SwornDisk.min_meta_size(size, size // 4096) // (1 << 20)) << 20)
    with open(f"{W}/key", "w") as f:
        f.write(os.urandom(32).hex())
    os.chmod(f"{W}/key", 0o600)
    open(SUMS, "w").close()
    dev = sh(*CLI, "add", "--recoverable", "--key-file", f"{W}/key",
             f"0 {DATA_MIB * 2048} sworndisk {W}/data {W}/meta 0 force").stdout.strip()
    if not dev.startswith("/dev/ublkb"):
        raise Failed(f"add printed {dev!r}")
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", dev)
    sh("mount", "-o", "noinit_itable", dev, MNT)
    passed()
    return dev


def cycles(dev: str, n: int, count: int) -> list:
    """kill -9 / recover `count` times while the workload runs; returns what each did."""
    step("cycles")
    rng = random.Random(7)
    work = Workload()
    report = []
    for c in range(count):
        trigger = TRIGGERS[c % len(TRIGGERS)]
        floor = work.done + 3                      # some progress since the last recover
        work.wait_for(lambda: work.done >= floor)
        if trigger == "random":
            time.sleep(rng.uniform(0.05, 1.5))
        else:
            # Kill as soon as the workload has entered the trigger's call for a new file.
            # Waiting to see it as the *last* marker could wait forever: a quick directory
            # fsync is over before this thread looks, and meanwhile the workload would fill
            # the thin device.
            nxt = work.last[1] + 1
            work.wait_for(lambda: work.seen.get(trigger, -1) >= nxt)
        pid = kill_server(n)
        time.sleep(2)
        with work.cond:
            at_kill = work.last                     # still blocked there: the kill was inside it
        if not _listed_dead(dev):
            raise Failed(f"cycle {c}: list does not show {dev} dead after kill -9")
        ready = recover(n)
        if ready["lost"] is not None or "warning" in ready["stderr"]:
            raise Failed(f"cycle {c}: recover reported a loss: {ready['stderr'].strip()}")
        if ready["pid"] == pid:
            raise Failed(f"cycle {c}: same server pid after recover")
        report.append({"trigger": trigger, "blocked_in": at_kill[0], "file": at_kill[1],
                       "replayed": ready["replayed"]})
        print(f"cycle {c}: kill -9 ({trigger}) with the workload at {at_kill}; recover "
              f"replayed {ready['replayed']} writes", flush=True)
    floor = work.done + 3                          # and it carries on after the last one
    work.wait_for(lambda: work.done >= floor)
    work.finish()
    in_fsync = [r for r in report if r["blocked_in"] == "fsync"]
    if not in_fsync:
        raise Failed(f"no kill landed inside a file fsync: {report}")
    if not sum(r["replayed"] for r in report):
        raise Failed(f"no recover had completed writes to replay: {report}")
    passed()
    return report


def _listed_dead(dev: str) -> bool:
    rows = json.loads(sh(*CLI, "list", "--json").stdout)
    return any(r["dev"] == dev and r["state"] == "dead" for r in rows)


def verify(dev: str) -> int:
    """Unmount, fsck, mount, and check every listed file; returns how many were checked."""
    step("verify")
    sh("sync")
    sh("umount", MNT)
    fsck = sh("fsck.ext4", "-f", "-n", dev, check=False)
    if fsck.returncode != 0:
        raise Failed(f"fsck.ext4 -f -n exited {fsck.returncode}:\n{fsck.stdout[-2000:]}")
    sh("mount", dev, MNT)
    count = check_sums()
    passed()
    return count


def check_sums(mnt: str = MNT, sums: str = SUMS, least: int = 10) -> int:
    """Every file listed in `sums` (its last listing) has that content under `mnt`;
    returns how many were checked (at least `least`). Also used by nbd.py."""
    latest = {}
    with open(sums) as f:
        for line in f:
            name, digest, size = line.split()
            latest[name] = (digest, int(size))
    bad = []
    for name, (digest, size) in sorted(latest.items()):
        with open(f"{mnt}/{name}", "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != digest:
            what = "zeros" if not data.strip(b"\0") else f"{len(data)} bytes, other content"
            bad.append(f"{name} ({what}, expected {size} bytes)")
    if bad:
        raise Failed(f"{len(bad)} of {len(latest)} fsynced files differ: {bad[:10]}")
    if len(latest) < least:
        raise Failed(f"only {len(latest)} files were written")
    print(f"verified {len(latest)} files", flush=True)
    return len(latest)


def lost_state(dev: str, n: int) -> None:
    """With the write log deleted, recover must report the loss and fail the next flush."""
    step("lost")
    blob = os.urandom(1 << 20)
    fd = os.open(f"{MNT}/unflushed", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    try:
        import mmap
        buf = mmap.mmap(-1, len(blob))
        buf.write(blob)
        os.write(fd, buf)                          # completed to the device, never flushed
    finally:
        os.close(fd)
    kill_server(n)
    os.unlink(f"{RUN}/{n}.wlog")
    ready = recover(n)
    warnings = [line for line in ready["stderr"].splitlines() if "warning" in line]
    print("\n".join(warnings), flush=True)
    if len(warnings) != 1 or "may have been lost: the write log is missing" not in warnings[0]:
        raise Failed(f"recover did not print one loss warning: {ready['stderr'].strip()}")
    if ready["lost"] != warnings[0].split("warning: ", 1)[1]:
        raise Failed(f"recover --json lost is {ready['lost']!r}")
    listing = sh(*CLI, "list").stdout
    print(listing, flush=True)
    if listing.splitlines()[0].split()[-1] != "LOST" or \
            listing.splitlines()[1].split()[-1] != "yes":
        raise Failed("list does not show LOST yes")
    try:                    # ext4 may have hit the EIO in its own journal commit already
        fd = os.open(f"{MNT}/after", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.write(fd, b"written after a lossy recover\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        raise Failed("a file was created and fsynced after completed writes were lost")
    except OSError as e:
        if e.errno not in (errno.EIO, errno.EROFS):
            raise
        print(f"the file system noticed: {e}", flush=True)
    if "failing flushes with EIO" not in _server_log(n):
        raise Failed("the server log does not show the flushes it failed")
    kernel = sh("dmesg").stdout.splitlines()
    print("\n".join([line for line in kernel if "ublkb" in line or "EXT4-fs" in line][-6:]),
          flush=True)
    # Unmounted and closed, the device works again: fsck repairs, the file system mounts.
    sh("umount", MNT)
    deadline = time.monotonic() + 60
    while "flushes work again" not in _server_log(n):
        if time.monotonic() > deadline:
            raise Failed("the server did not end the EIO once the device was unmounted")
        time.sleep(0.5)
    fsck = sh("fsck.ext4", "-f", "-y", dev, check=False)
    print(f"fsck.ext4 -f -y: exit {fsck.returncode}", flush=True)
    if fsck.returncode not in (0, 1):          # 1: errors corrected
        raise Failed(f"fsck.ext4 -f -y exited {fsck.returncode}:\n{fsck.stdout[-2000:]}")
    sh("mount", dev, MNT)
    fd = os.open(f"{MNT}/after", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"written after the repair\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    sh("umount", MNT)
    passed()


def _server_log(n: int) -> str:
    with open(f"{RUN}/{n}.log") as f:
        return f.read()


def main() -> int:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else len(TRIGGERS)
    os.chdir(REPO)
    try:
        dev = setup()
        n = int(dev[len("/dev/ublkb"):])
        report = cycles(dev, n, count)
        files = verify(dev)
        lost_state(dev, n)
        step("teardown")
        sh(*CLI, "del", "-n", str(n))
        passed()
    except (Failed, subprocess.TimeoutExpired, OSError) as e:
        print(f"@@STEP {STEP} FAIL: {e}", flush=True)
        subprocess.run(["umount", MNT], capture_output=True)
        subprocess.run([*CLI, "del", "--all", "--wait", "5"], capture_output=True)
        return 1
    print("@@RESULT " + json.dumps({"cycles": report, "files_verified": files}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
