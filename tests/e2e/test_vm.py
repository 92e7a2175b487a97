"""Smoke test of the VM harness (tools/vm/run) that every ublk end-to-end test relies on.

Two boots: one checks everything a test needs from the guest at once, one the timeout.
"""
import re
import subprocess
import sys
import time
from io import BytesIO

import pytest

from tests.e2e.conftest import REPO, VM_RUN

pytestmark = pytest.mark.e2e

GUEST_CHECKS = r"""
echo first-line
sleep 2
test -c /dev/ublk-control && echo ublk-control=yes
echo vdb-bytes=$(( $(cat /sys/block/vdb/size) * 512 ))
echo cwd=$(pwd)
.venv/bin/python -c 'import sworndisk; print("import-sworndisk=ok")'
exit 7
"""


def test_command_runs_in_guest_and_status_comes_back():
    proc = subprocess.Popen([str(VM_RUN), "--disk", "64M", "--timeout", "400", "--",
                             "sh", "-c", GUEST_CHECKS], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, first_at = [], None
    for line in proc.stdout:
        first_at = first_at or time.monotonic()
        lines.append(line.rstrip("\n"))
    stderr = proc.stderr.read()
    status, ended_at = proc.wait(), time.monotonic()
    assert status == 7, f"output: {lines}\nstderr: {stderr}"
    assert lines[0] == "first-line"
    assert ended_at - first_at >= 2, "output was not streamed while the command ran"
    assert "ublk-control=yes" in lines
    assert f"vdb-bytes={64 << 20}" in lines
    assert f"cwd={REPO}" in lines
    assert "import-sworndisk=ok" in lines
    assert not any("@@SWORNDISK_VM" in line for line in lines)


def test_timeout_kills_the_vm(vm_run):
    done = vm_run("sleep", "600", timeout=10)
    assert done.returncode == 124, f"stdout: {done.stdout}\nstderr: {done.stderr}"
    assert "timed out after 10 s" in done.stderr


def test_usage_errors_do_not_boot():
    for args in (["--disk", "12X", "--", "true"], []):
        done = subprocess.run([str(VM_RUN), *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2
        assert "usage:" in done.stderr


def test_console_parsing():
    """Boot noise and markers are stripped; CRs go; output may lack its final newline."""
    sys.path.insert(0, str(VM_RUN.parent))
    try:
        from vm import Console
    finally:
        sys.path.remove(str(VM_RUN.parent))
    out = BytesIO()
    console = Console(out)
    console.feed(b"SeaBIOS\r\n@@SWORNDISK_VM_START@@\r\nhel")
    console.feed(b"lo\r\nno newline@@SWORNDISK_VM_EXIT=5@@\r\n[ 3.2] reboot: Power down\r\n")
    console.finish()
    assert (out.getvalue(), console.status) == (b"hello\nno newline", 5)


def test_boot_that_panics_before_command_is_retried(vm_run, monkeypatch):
    """The first boot's init exits (SWORNDISK_VM_FAIL_BOOTS=1): a real early-boot panic."""
    monkeypatch.setenv("SWORNDISK_VM_FAIL_BOOTS", "1")
    done = vm_run("sh", "-c", "echo ran; exit 4", timeout=600)
    assert done.returncode == 4, f"stdout: {done.stdout}\nstderr: {done.stderr}"
    assert done.stdout == "ran\n"
    retry, = [line for line in done.stderr.splitlines() if "retrying" in line]
    assert retry.startswith("tools/vm/run: boot 1 of 3 died before COMMAND started")
    # The reason is the boot's first panic line: the hook's own ("Attempted to kill
    # init!"), unless one of TCG's rare early-boot Oopses came first (one CI run met an
    # "Oops: int3" there); that boot died before COMMAND too, and was retried.
    assert re.search(r"\(the VM stopped before COMMAND started: (Kernel panic - not "
                     r"syncing: Attempted to kill init!|Oops|BUG:)", retry), retry


def test_panic_after_command_started_is_not_retried(vm_run):
    done = vm_run("sh", "-c", "echo before; echo c >/proc/sysrq-trigger; sleep 30", timeout=600)
    assert done.returncode == 125, f"stdout: {done.stdout}\nstderr: {done.stderr}"
    assert "before" in done.stdout
    assert "retrying" not in done.stderr
    assert "the VM died before COMMAND finished" in done.stderr
