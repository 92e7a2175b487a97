"""A SwornDisk on network block devices, and what happens when their servers die (issue 17):

    tools/vm/run -- .venv/bin/python tests/e2e/scripts/nbd.py

Two image files are exported over NBD on 127.0.0.1 by qemu-nbd servers and attached with
the kernel's NBD client: the meta device with `nbd-client` (/dev/nbd1), the data device
first with `qemu-nbd -c` (/dev/nbd0), and `add` runs the moment the attach returned (both
ways must work on the first try; what holds the device then is printed). ext4, files and
a fio verify job on it; `del` and `add` again, everything intact. Then, for the data
device's server and then the meta device's: an fsync workload runs (the one of
fsync_recover.py), the server is killed with kill -9, the requests fail with EIO within
the NBD timeout, the disk latches (list and status say it failed and why); the server
comes back, the device is reattached, `del` + `add` opens the disk at its last completed
flush: fsck clean, every fsynced file intact.

Prints ``@@STEP <name> PASS|FAIL: <why>`` per step (tests/e2e/test_nbd.py) and
``@@RESULT <json>``.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fsync_recover as fr  # noqa: E402  (the fsync workload and the file check)
from fsync_recover import CLI, Failed, passed, sh, step  # noqa: E402

W = "/var/tmp/sworndisk-nbd"
MNT = f"{W}/mnt"
KEY = f"{W}/key"
DATA_MIB = 64
NBD_TIMEOUT = 10                 # seconds a request may wait for a server (nbd-client -t)
PORTS = {"data": 10809, "meta": 10810}
NBD = {"data": "/dev/nbd0", "meta": "/dev/nbd1"}
FIO_FILE = f"{MNT}/fio.dat"
FILES = 8                        # fsynced files each workload writes before it stops/dies
FIO = ["fio", "--name=verify", f"--filename={FIO_FILE}", "--size=2M", "--bs=4k",
       "--rw=randwrite", "--direct=1", "--verify=crc32c", "--randrepeat=1",
       "--output-format=terse"]


class Servers:
    """The qemu-nbd export of each image (raw, on 127.0.0.1, staying up between clients)."""

    def __init__(self) -> None:
        self.procs: dict = {}

    def start(self, which: str) -> None:
        self.procs[which] = subprocess.Popen(
            ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(PORTS[which]), "-x", "disk",
             "-t", f"{W}/{which}.img"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", PORTS[which]), 1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.procs[which].poll() is not None:
                    raise Failed(f"the {which} NBD server did not come up") from None
                time.sleep(0.1)

    def kill(self, which: str) -> None:
        self.procs[which].kill()
        self.procs[which].wait()

    def stop_all(self) -> None:
        for p in self.procs.values():
            p.kill()
            p.wait()


def attach_nbd_client(which: str) -> None:
    sh("nbd-client", "127.0.0.1", str(PORTS[which]), NBD[which], "-N", "disk",
       "-t", str(NBD_TIMEOUT))


def detach(which: str) -> None:
    sh("nbd-client", "-d", NBD[which], check=False)


def holders_now(dev: str) -> dict:
    """Who has `dev` open right now, and whether an exclusive open succeeds at once."""
    name = os.path.basename(dev)
    openers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == dev:
                    with open(f"/proc/{pid}/comm") as f:
                        openers.append(f"pid {pid} ({f.read().strip()}) fd {fd}")
        except OSError:
            continue
    try:
        fd = os.open(dev, os.O_RDONLY | os.O_EXCL)
        os.close(fd)
        excl = "ok"
    except OSError as e:
        excl = errno.errorcode.get(e.errno, str(e.errno))
    try:
        with open(f"/sys/block/{name}/pid") as f:
            nbd_pid = f.read().strip()
    except OSError:
        nbd_pid = None
    return {"openers": openers, "holders": os.listdir(f"/sys/block/{name}/holders"),
            "nbd_pid": nbd_pid, "exclusive_open": excl}


def add(fmt: str = "false") -> str:
    """`add` on the two NBD devices: "force" formats, "false" opens the disk as it is."""
    dev = sh(*CLI, "add", "--key-file", KEY,
             f"0 {DATA_MIB * 2048} sworndisk {NBD['data']} {NBD['meta']} 0 {fmt}").stdout.strip()
    if not dev.startswith("/dev/ublkb"):
        raise Failed(f"add printed {dev!r}")
    return dev


def delete(dev: str) -> None:
    sh(*CLI, "del", "-n", dev[len("/dev/ublkb"):], "--wait", "60")


def setup(servers: Servers) -> dict:
    step("setup")
    sh("modprobe", "nbd")
    sh("modprobe", "ext4", check=False)
    shutil.rmtree(W, ignore_errors=True)
    os.makedirs(MNT)
    from sworndisk import SwornDisk
    size = DATA_MIB << 20
    with open(f"{W}/data.img", "wb") as f:
        f.truncate(size)
    with open(f"{W}/meta.img", "wb") as f:
        f.truncate(-(-SwornDisk.min_meta_size(size, size // 4096) // (1 << 20)) << 20)
    with open(KEY, "w") as f:
        f.write(os.urandom(32).hex())
    os.chmod(KEY, 0o600)
    for which in PORTS:
        servers.start(which)
    passed()
    return {}


def attach_first_try() -> dict:
    """meta by nbd-client, data by `qemu-nbd -c`; `add` right after each attach returned."""
    step("attach")
    attach_nbd_client("meta")
    sh("qemu-nbd", "-f", "raw", "-c", NBD["data"], f"nbd://127.0.0.1:{PORTS['data']}/disk")
    seen = holders_now(NBD["data"])          # the moment `add` would look
    print(f"right after qemu-nbd -c returned: {json.dumps(seen)}", flush=True)
    dev = add("force")
    print(f"add on {NBD['data']} (qemu-nbd -c) and {NBD['meta']} (nbd-client): {dev}",
          flush=True)
    passed()
    return {"qemu_nbd_c": seen, "dev": dev}


def ext4_and_fio(dev: str) -> None:
    step("ext4")
    sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", dev)
    sh("mount", "-o", "noinit_itable", dev, MNT)
    work = workload("files")
    work.wait_for(lambda: work.done >= FILES)
    work.finish()
    done = sh(*FIO, "--do_verify=1")
    print(f"fio write+verify: {done.stdout.strip()[:120]}", flush=True)
    sh("umount", MNT)
    passed()


def readd(dev: str) -> str:
    """del, reattach the data device with nbd-client (the other way), add, all intact."""
    step("readd")
    delete(dev)
    sh("qemu-nbd", "-d", NBD["data"])
    attach_nbd_client("data")
    seen = holders_now(NBD["data"])
    print(f"right after nbd-client returned: {json.dumps(seen)}", flush=True)
    dev = add()
    check_disk(dev, f"{MNT}/files", f"{W}/sums-files")
    sh("mount", dev, MNT)
    sh(*FIO, "--verify_only")
    sh("umount", MNT)
    passed()
    return dev


def workload(name: str) -> "fr.Workload":
    """fsync_recover.py's fsync workload, in MNT/name, listing its files in W/sums-name."""
    fr.MNT, fr.SUMS = f"{MNT}/{name}", f"{W}/sums-{name}"
    os.makedirs(fr.MNT)
    if os.path.exists(f"{W}/stop"):
        os.unlink(f"{W}/stop")              # the last workload's
    return fr.Workload()


def check_disk(dev: str, files: str, sums: str) -> int:
    """Mount (replays the ext4 journal), unmount, fsck clean, every fsynced file intact."""
    sh("mount", dev, MNT)
    sh("umount", MNT)
    fsck = sh("fsck.ext4", "-f", "-n", dev, check=False)
    if fsck.returncode != 0:
        raise Failed(f"fsck.ext4 -f -n exited {fsck.returncode}:\n{fsck.stdout[-2000:]}")
    sh("mount", "-o", "ro", dev, MNT)
    try:
        return fr.check_sums(files, sums, least=FILES - FILES // 5)
    finally:
        sh("umount", MNT)


def server_dies(servers: Servers, dev: str, which: str) -> tuple:
    """kill -9 of `which` device's server under fsyncs; returns (new dev, report)."""
    step(f"kill-{which}")
    n = dev[len("/dev/ublkb"):]
    sh("mount", dev, MNT)
    work = workload(f"{which}-kill")
    work.wait_for(lambda: work.done >= FILES)
    servers.kill(which)
    killed = time.monotonic()
    try:
        work.proc.wait(NBD_TIMEOUT + 120)
    except subprocess.TimeoutExpired:
        raise Failed(f"the workload still runs {NBD_TIMEOUT + 120} s after the {which} "
                     f"server died (last marker {work.last})") from None
    failed_after = round(time.monotonic() - killed, 1)
    error = [line for line in work.output if "Error" in line][-1:]
    print(f"{which} server killed; the workload failed {failed_after} s later: {error}",
          flush=True)
    if work.proc.returncode == 0:
        raise Failed("the workload did not fail when its storage died")
    deadline = time.monotonic() + 30
    while True:
        rows = json.loads(sh(*CLI, "list", "--json").stdout)
        row = next((r for r in rows if r["dev"] == dev), None)
        if row and row["failed"]:
            break
        if time.monotonic() > deadline:
            raise Failed(f"list does not say {dev} failed: {rows}")
        time.sleep(0.5)
    listing = sh(*CLI, "list").stdout
    status = sh(*CLI, "status", "-n", n, check=False)
    print(listing, flush=True)
    print(status.stdout + status.stderr, flush=True)
    if "failed" not in listing.splitlines()[1].split() or "FAILED" not in status.stdout:
        raise Failed(f"list/status do not show the failure:\n{listing}\n{status.stdout}")
    kernel = sh("dmesg").stdout.splitlines()
    nbd = os.path.basename(NBD[which])
    print("\n".join([line for line in kernel if nbd in line][-4:]
                    + [line for line in kernel if "ublkb" in line or "EXT4" in line][-6:]),
          flush=True)
    # back: unmount what is left, release the device, server up, reattach, add
    sh("umount", MNT, check=False)
    delete(dev)
    servers.start(which)
    detach(which)
    attach_nbd_client(which)
    dev = add()
    files = check_disk(dev, fr.MNT, fr.SUMS)
    passed()
    return dev, {"failed_after_s": failed_after, "reason": row["failed"], "files": files,
                 "error": error[0] if error else None}


def main() -> int:
    os.chdir(fr.REPO)
    fr.W = W                       # where the workload's stop file goes
    sys.path.insert(0, fr.REPO)
    servers = Servers()
    result: dict = {}
    dev = None
    try:
        setup(servers)
        first = attach_first_try()
        dev = first["dev"]
        result["qemu_nbd_c"] = first["qemu_nbd_c"]
        ext4_and_fio(dev)
        dev = readd(dev)
        for which in ("data", "meta"):
            dev, result[f"kill_{which}"] = server_dies(servers, dev, which)
        step("teardown")
        delete(dev)
        for which in PORTS:
            detach(which)
        passed()
    except (Failed, subprocess.TimeoutExpired, OSError) as e:
        print(f"@@STEP {fr.STEP} FAIL: {e}", flush=True)
        subprocess.run(["umount", MNT], capture_output=True)
        subprocess.run([*CLI, "del", "--all", "--wait", "5"], capture_output=True)
        return 1
    finally:
        servers.stop_all()
    print("@@RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
