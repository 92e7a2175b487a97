"""Run a command inside a QEMU VM whose kernel has the ublk driver (see README.md).

The host kernel (here and in CI) has no ublk_drv, so the ublk end-to-end tests boot a
Debian kernel that does. The guest sees the host's root file system (9p, read-only, with
a tmpfs overlay) and chroots into it, so the repo, its .venv and the host's Python are
all there without building a guest image. Only the kernel and a tiny busybox initramfs
are cached on the host (outside the repo), built on first use.

Stdlib only: this runs before `make setup` has made the venv.
"""
import argparse
import ctypes
import fcntl
import hashlib
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

PROG = "tools/vm/run"
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
INIT_SCRIPT = HERE / "init"
CACHE = Path(os.environ.get("SWORNDISK_VM_CACHE", "/var/cache/sworndisk-vm"))
# TCG by default: KVM on this workplace's machines crashes or hangs ordinary guests, and
# probing it would cost a boot per run.
ACCEL = os.environ.get("SWORNDISK_VM_ACCEL", "tcg")
VERBOSE = os.environ.get("SWORNDISK_VM_VERBOSE") == "1"  # show the kernel's boot log
# Test hook: the first N boots of a run die in early boot (the init exits before COMMAND,
# so the kernel panics), to exercise the boot retry without waiting for a real panic.
FAIL_BOOTS_ENV = "SWORNDISK_VM_FAIL_BOOTS"

# Debian's generic 6.12 flavour; the newest one the mirror has is taken on first use.
KERNEL_PACKAGE_RE = re.compile(r"^linux-image-(6\.12\.(\d+)\+deb12-amd64)-unsigned$")
# Loaded by the initramfs with their dependencies; modprobe in the guest reaches the rest.
BOOT_MODULES = ["9p", "9pnet_virtio", "overlay", "virtio_blk", "ublk_drv"]
# Installed when missing: QEMU; the initramfs's shell (the plain busybox is not static);
# depmod and xz for the kernel's modules; fio and mkfs.ext4 for the tests in the guest.
HOST_PACKAGES = ["qemu-system-x86", "busybox-static", "kmod", "xz-utils", "fio", "e2fsprogs",
                 "qemu-utils", "nbd-client"]
BUSYBOX = Path("/bin/busybox")
# Bump when the initramfs layout changes in a way the inputs' hashes do not show.
INITRAMFS_FORMAT = "1"

GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASSED_ENV = re.compile(r"^(PYTHONPATH|CI|SWORNDISK_\w*)$")
START_MARKER = b"@@SWORNDISK_VM_START@@"
EXIT_RE = re.compile(rb"@@SWORNDISK_VM_EXIT=(\d+)@@$")
ERROR_RE = re.compile(rb"@@SWORNDISK_VM_ERROR=(.*)@@")
PANIC_RE = re.compile(rb"(Kernel panic|Oops|BUG:).*")
ANSI_RE = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|c)")  # SeaBIOS clears the screen

EXIT_TIMEOUT = 124   # like timeout(1)
EXIT_HARNESS = 125   # the VM failed, not COMMAND (like docker run)
POWEROFF_GRACE = 15  # seconds QEMU may take to exit after COMMAND finished
# A boot that dies before COMMAND starts is tried again this many times: under TCG an
# early-boot Oops happens about once in a dozen boots and says nothing about COMMAND.
BOOT_RETRIES = 2


class VMError(Exception):
    """A failure of the harness itself, reported as one line and exit status 125."""


def note(msg):
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- host packages

_apt_updated = False


def apt(*args):
    """Run apt-get quietly; its chatter goes to stderr so stdout stays COMMAND's."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    done = subprocess.run(["apt-get", "-q", *args], stdout=sys.stderr, env=env)
    if done.returncode:
        raise VMError(f"apt-get {' '.join(args)} failed (exit {done.returncode})")


def apt_update():
    """`apt-get update`, at most once per run: a fresh machine's lists may be empty or old."""
    global _apt_updated
    if not _apt_updated:
        apt("update")
        _apt_updated = True


def missing_packages():
    """The host packages that are not installed (one dpkg-query for all of them)."""
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *HOST_PACKAGES],
        capture_output=True, text=True).stdout
    installed = {line.split()[0] for line in out.splitlines() if line.endswith(" installed")}
    return [p for p in HOST_PACKAGES if p not in installed]


def ensure_packages():
    missing = missing_packages()
    if missing:
        note(f"installing {' '.join(missing)}")
        apt_update()
        apt("install", "-y", "--no-install-recommends", *missing)


# ---------------------------------------------------------------- kernel

def version_key(kver):
    return tuple(int(n) for n in re.findall(r"\d+", kver))


def cached_kernels():
    """Kernel versions fully unpacked in the cache (a `complete` file marks them)."""
    if not CACHE.is_dir():
        return []
    return sorted((d.name for d in CACHE.iterdir() if (d / "complete").exists()),
                  key=version_key)


def newest_kernel_package():
    """The newest matching kernel package the mirror offers: nothing is pinned."""
    apt_update()
    out = subprocess.run(["apt-cache", "search", "--names-only", r"^linux-image-6\.12"],
                         capture_output=True, text=True).stdout
    names = (line.split(" - ")[0].strip() for line in out.splitlines())
    found = [m for m in map(KERNEL_PACKAGE_RE.match, names) if m]
    if not found:
        raise VMError("apt-cache finds no linux-image-6.12.*+deb12-amd64-unsigned package")
    best = max(found, key=lambda m: int(m.group(2)))
    return best.group(0), best.group(1)


def fetch_kernel():
    """Download, unpack and depmod the newest kernel package; returns its version."""
    package, kver = newest_kernel_package()
    note(f"fetching {package} into {CACHE}")
    dest = CACHE / kver
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package],
                       cwd=tmp, check=True, stdout=sys.stderr)
        deb, = Path(tmp).glob("*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest / "root")], check=True)
    # The package has no modules.dep (its postinst makes it), so make it here.
    subprocess.run(["depmod", "-b", str(dest / "root"), kver], check=True)
    (dest / "complete").write_text(package + "\n")
    return kver


class Kernel:
    """One cached kernel: vmlinuz, its module tree and the initramfs built for it."""

    def __init__(self, kver):
        self.kver = kver
        self.dir = CACHE / kver
        self.vmlinuz = self.dir / "root" / "boot" / f"vmlinuz-{kver}"
        self.moddir = self.dir / "root" / "lib" / "modules" / kver
        self.initramfs = None  # set by ensure_initramfs()

    def boot_modules(self):
        """BOOT_MODULES and their dependencies, each after what it depends on."""
        deps = {}
        for line in (self.moddir / "modules.dep").read_text().splitlines():
            path, _, needs = line.partition(":")
            deps[module_name(path)] = (path, [module_name(p) for p in needs.split()])
        ordered = []

        def visit(name):
            if name not in deps:
                raise VMError(f"kernel {self.kver} has no module {name}")
            if name not in ordered:
                for dep in deps[name][1]:
                    visit(dep)
                ordered.append(name)

        for name in BOOT_MODULES:
            visit(name)
        return [(name, self.moddir / deps[name][0]) for name in ordered]

    def initramfs_key(self, modules):
        """Changes whenever anything that goes into the initramfs does."""
        h = hashlib.sha256(INITRAMFS_FORMAT.encode())
        for path in [INIT_SCRIPT, BUSYBOX, *(p for _, p in modules)]:
            h.update(str(path).encode() + b"\0" + path.read_bytes())
        return h.hexdigest()

    def ensure_initramfs(self):
        """Build the initramfs for the current inputs unless it is cached.

        Each version is its own file, named by its key: runs from checkouts with a different
        tools/vm/init (a clean clone of an older commit, say) neither rebuild each other's
        nor swap it under a run that is about to boot it. Versions unused for a day go.
        """
        modules = self.boot_modules()
        key = self.initramfs_key(modules)
        self.initramfs = self.dir / f"initramfs-{key[:16]}.cpio"
        if self.initramfs.exists():
            os.utime(self.initramfs)  # in use: keeps it from being pruned
            return
        note(f"building the initramfs for {self.kver}")
        cpio = Cpio()
        for d in ["bin", "dev", "proc", "sys", "lower", "upper", "newroot", "modules"]:
            cpio.add(d, 0o040755)
        cpio.add("dev/console", 0o020600, rdev=(5, 1))
        cpio.add("init", 0o100755, INIT_SCRIPT.read_bytes())
        cpio.add("bin/busybox", 0o100755, BUSYBOX.read_bytes())
        for i, (name, path) in enumerate(modules):
            cpio.add(f"modules/{i:02d}-{name}.ko", 0o100644, read_module(path))
        tmp = self.initramfs.with_suffix(".tmp")
        tmp.write_bytes(cpio.finish())
        tmp.replace(self.initramfs)
        for old in [*self.dir.glob("initramfs-*.cpio"), *self.dir.glob("initramfs.*")]:
            if old != self.initramfs and time.time() - old.stat().st_mtime > 86400:
                old.unlink()


def module_name(path):
    return Path(path).name.split(".ko")[0].replace("-", "_")


def read_module(path):
    """A module's bytes, xz-decompressed: busybox insmod cannot load .ko.xz."""
    if path.suffix != ".xz":
        return path.read_bytes()
    return subprocess.run(["xz", "-dc", str(path)], capture_output=True, check=True).stdout


class Cpio:
    """A minimal writer for the `newc` cpio format the kernel unpacks as initramfs."""

    def __init__(self):
        self.parts = []
        self.ino = 0

    def add(self, name, mode, data=b"", rdev=(0, 0)):
        self.ino += 1
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self._append(header + name.encode() + b"\0")
        self._append(data)

    def _append(self, data):
        """Add data padded to the 4-byte alignment newc wants after names and files."""
        data += b"\0" * (-len(data) % 4)
        self.parts.append(data)

    def finish(self):
        self.add("TRAILER!!!", 0)
        return b"".join(self.parts)


def prepare():
    """Install host tools, fetch a kernel and build its initramfs, once (under a lock)."""
    if os.geteuid() != 0:
        raise VMError("must run as root (it installs packages and runs QEMU)")
    ensure_packages()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel runs wait for one builder
        kernels = cached_kernels()
        kernel = Kernel(kernels[-1] if kernels else fetch_kernel())
        kernel.ensure_initramfs()
    return kernel


# ---------------------------------------------------------------- the run

def parse_size(text):
    """'64M' -> 67108864 (binary units K, M, G, T; plain bytes too)."""
    m = re.fullmatch(r"(\d+)([KMGT]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 64M, 1G)")
    size = int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))
    if size == 0 or size % 512:
        raise argparse.ArgumentTypeError(f"disk size {text!r} must be a non-zero multiple of 512")
    return size


def guest_env():
    env = {"PATH": GUEST_PATH, "HOME": "/root", "TERM": "dumb", "SWORNDISK_IN_VM": "1"}
    env.update((k, v) for k, v in os.environ.items() if PASSED_ENV.match(k))
    return env


def job_script(command, cwd):
    """The shell script the guest runs: environment, cwd, then COMMAND via /bin/sh -c."""
    q = shlex.quote
    lines = [f"export {k}={q(v)}" for k, v in sorted(guest_env().items())]
    lines.append(f"cd {q(cwd)} 2>/dev/null || "
                 f"{{ echo {q(f'{PROG}: {cwd} is not in the VM, running in {REPO}')} >&2; "
                 f"cd {q(str(REPO))} || exit {EXIT_HARNESS}; }}")
    lines.append(f"exec /bin/sh -c {q(shlex.join(command))} </dev/null")
    return "\n".join(lines) + "\n"


def qemu_command(kernel, workdir, job, disks, mem, cpus, fail_boot=False):
    """The QEMU command line; creates the sparse disk images in `workdir`.

    `fail_boot` (the SWORNDISK_VM_FAIL_BOOTS test hook) makes the init exit before COMMAND.
    """
    if ACCEL == "kvm":
        machine = ["-accel", "kvm", "-cpu", "host"]
    else:
        machine = ["-accel", "tcg,thread=multi", "-cpu", "max"]
    # loglevel=1 still shows panics (KERN_EMERG), so a crashed kernel explains itself.
    append = ["console=ttyS0", "panic=-1", f"sworndisk.job={job}",
              f"sworndisk.moddir={kernel.moddir}"] + ([] if VERBOSE else ["quiet", "loglevel=1"])
    if fail_boot:
        append.append("sworndisk.fail_boot=1")
    cmd = ["qemu-system-x86_64", *machine, "-m", str(mem), "-smp", str(cpus),
           "-nographic", "-no-reboot", "-nic", "none",
           "-kernel", str(kernel.vmlinuz), "-initrd", str(kernel.initramfs),
           "-append", " ".join(append),
           "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,"
                      "readonly=on,multidevs=remap"]
    # /dev/vda is a placeholder so that the user's disks are /dev/vdb, /dev/vdc, ...
    for i, size in enumerate([4096, *disks]):
        image = workdir / f"disk{i}.img"
        with open(image, "wb") as f:
            f.truncate(size)  # sparse
        opts = "readonly=on" if i == 0 else "cache=unsafe,discard=unmap"
        cmd += ["-drive", f"file={image},format=raw,if=virtio,{opts}"]
    return cmd


class Console:
    """Turns QEMU's serial console into COMMAND's output and exit status.

    Lines before the start marker are boot noise (kept for error reports); lines after
    it are COMMAND's and go to `out` as they arrive, without the serial port's CRs;
    the exit marker ends the output (it may follow output that lacked a final newline).
    """

    def __init__(self, out, echo_boot=None):
        self.out = out
        self.echo_boot = echo_boot
        self.running = False
        self.status = None
        self.error = None
        self.tail = deque(maxlen=30)
        self.panic = None  # the first panic/Oops line of the boot (a trace may bury it)
        self.partial = b""
        self.midline = False  # the last output ended without a newline

    def feed(self, data):
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            self.line(line[:-1] if line.endswith(b"\r") else line)

    def line(self, line, newline=b"\n"):
        if self.status is not None:
            return
        self.tail.append(line)
        if not self.running:
            self.running = START_MARKER in line
            panic = self.panic is None and PANIC_RE.search(line)
            if panic:
                self.panic = ANSI_RE.sub("", panic.group(0).decode(errors="replace")).strip()
            error = ERROR_RE.search(line)
            if error:
                self.error = error.group(1).decode(errors="replace")
            if self.echo_boot:
                self.echo_boot.write(line + b"\n")
            return
        m = EXIT_RE.search(line)
        if m:
            self.status = int(m.group(1))
            line, newline = line[:m.start()], b""
        self.out.write(line + newline)
        self.out.flush()
        self.midline = bool(line) and not newline

    def finish(self):
        """Flush a last line that never got its newline (e.g. after a timeout)."""
        if self.partial:
            self.line(self.partial, newline=b"")
            self.partial = b""


def die_with_parent():
    """In the QEMU child: die when tools/vm/run dies, even by SIGKILL (no stray VMs)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_vm(cmd, console, timeout, stderr_file):
    """Run QEMU, feeding its console to `console`; returns False on timeout."""
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=stderr_file, preexec_fn=die_with_parent)
    try:
        deadline = time.monotonic() + timeout
        fd = proc.stdout.fileno()
        while True:
            if console.status is not None:  # COMMAND is done; QEMU only powers off
                deadline = min(deadline, time.monotonic() + POWEROFF_GRACE)
            left = deadline - time.monotonic()
            if left <= 0:
                return console.status is not None
            if select.select([fd], [], [], left)[0]:
                data = os.read(fd, 65536)
                if not data:
                    return True
                console.feed(data)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        console.finish()


def vm_failure(console, stderr_file):
    """Explain a VM that stopped without an exit marker; the console tail shows why."""
    qemu_errors = qemu_stderr_text(stderr_file)
    if console.running:  # the console was streamed already: a panic trace is on stdout
        lines = [f"{PROG}: the VM died before COMMAND finished (kernel panic?)"]
    else:
        lines = [f"{PROG}: boot failure: {boot_failure_reason(console)}",
                 "--- last console lines:"]
        lines += [ANSI_RE.sub("", line.decode(errors="replace")) for line in console.tail]
    if qemu_errors:
        lines += ["--- qemu stderr:", qemu_errors]
    print("\n".join(lines), file=sys.stderr, flush=True)
    return EXIT_HARNESS


def qemu_stderr_text(stderr_file):
    stderr_file.seek(0)
    return stderr_file.read().decode(errors="replace").strip()


def boot_failure_reason(console):
    return console.error or "the VM stopped before COMMAND started"


def death_line(console):
    """What killed the boot: its first panic/Oops line, else the last console line, or ''."""
    if console.panic:
        return console.panic
    lines = [ANSI_RE.sub("", line.decode(errors="replace")).strip() for line in console.tail]
    return ([line for line in lines if line] or [""])[-1]


def fail_boots():
    """How many boots the SWORNDISK_VM_FAIL_BOOTS test hook makes die (0 when unset)."""
    value = os.environ.get(FAIL_BOOTS_ENV, "0").strip() or "0"
    if not value.isdigit():
        raise VMError(f"{FAIL_BOOTS_ENV}={value!r} must be a number of boots (e.g. 1)")
    return int(value)


def run(args):
    """Boot, run COMMAND, return its status; a boot that dies before COMMAND is retried.

    Only a VM that stopped before the start marker is booted again (at most BOOT_RETRIES
    times, each said on stderr): COMMAND has not run, so nothing is repeated. A failure
    after COMMAND started (a panic, a timeout) is reported, never retried. The timeout
    covers all boots together.
    """
    kernel = prepare()
    cwd = os.getcwd()
    failing = fail_boots()
    deadline = time.monotonic() + args.timeout
    with tempfile.TemporaryDirectory(prefix="sworndisk-vm-") as tmp:
        workdir = Path(tmp)
        job = workdir / "job.sh"
        job.write_text(job_script(args.command, cwd))
        for attempt in range(1 + BOOT_RETRIES):
            with tempfile.TemporaryFile() as qemu_stderr:
                cmd = qemu_command(kernel, workdir, job, args.disk, args.mem, args.cpus,
                                   fail_boot=attempt < failing)
                console = Console(sys.stdout.buffer, sys.stderr.buffer if VERBOSE else None)
                started = time.monotonic()
                finished = run_vm(cmd, console, deadline - started, qemu_stderr)
                if VERBOSE:
                    note(f"VM ran {time.monotonic() - started:.1f} s")
                if not finished:
                    if console.midline:
                        sys.stderr.write("\n")
                    note(f"timed out after {args.timeout:g} s; killed the VM")
                    return EXIT_TIMEOUT
                if console.status is not None:
                    return console.status
                if console.running or attempt == BOOT_RETRIES:
                    return vm_failure(console, qemu_stderr)
                last = death_line(console)
                note(f"boot {attempt + 1} of {1 + BOOT_RETRIES} died before COMMAND started "
                     f"({boot_failure_reason(console)}{': ' + last if last else ''}); "
                     f"retrying")
    raise AssertionError("unreachable")


def parser():
    p = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} [--mem MiB] [--cpus N] [--disk SIZE]... [--timeout SEC] -- COMMAND...\n"
              f"       {PROG} --prepare",
        description="Boot a Linux kernel with ublk under QEMU and run COMMAND as root in the "
                    "current directory (the host root is the guest root, read-only over 9p "
                    "with a tmpfs overlay). Streams COMMAND's output (stdout and stderr "
                    "merged) and exits with its status; 124 on timeout, 125 if the VM "
                    "fails. See tools/vm/README.md.")
    p.add_argument("--mem", type=int, default=2048, metavar="MiB", help="guest memory (2048)")
    p.add_argument("--cpus", type=int, default=2, metavar="N", help="guest CPUs (2)")
    p.add_argument("--disk", type=parse_size, action="append", default=[], metavar="SIZE",
                   help="add a sparse raw virtio disk: /dev/vdb, then /dev/vdc, ... "
                        "(e.g. 64M, 1G); repeatable")
    p.add_argument("--timeout", type=float, default=600, metavar="SEC",
                   help="kill the VM after SEC seconds, boot included, and exit 124 (600)")
    p.add_argument("--prepare", action="store_true",
                   help="only install the host tools, fetch the kernel and build the "
                        "initramfs (CI warm-up)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                   help="the command and its arguments, after --")
    return p


def main(argv):
    p = parser()
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.prepare and not args.command:
        p.error("no COMMAND given (put it after --)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        if args.prepare:
            kernel = prepare()
            print(f"{PROG}: ready: kernel {kernel.kver}, cache {CACHE}", flush=True)
            return 0
        return run(args)
    except VMError as e:
        note(str(e))
        return EXIT_HARNESS
    except subprocess.CalledProcessError as e:
        note(f"{shlex.join(map(str, e.cmd))} failed (exit {e.returncode})")
        return EXIT_HARNESS
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout's reader left (`run ... | head`): stop like a filter
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
