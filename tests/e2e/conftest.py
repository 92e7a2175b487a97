"""Shared setup of the end-to-end tests, which run commands in the ublk VM of tools/vm/run.

An e2e test is skipped, with the reason, only where the VM cannot exist at all: not root,
or QEMU cannot be installed. Any other failure to prepare the VM fails the tests, so that
a broken harness cannot turn CI green by skipping.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VM_RUN = REPO / "tools" / "vm" / "run"
PREPARE_TIMEOUT = 1800  # a fresh machine installs QEMU and fetches a kernel first


@pytest.fixture(scope="session")
def vm_prepared():
    """None once the VM can boot (`tools/vm/run --prepare`, once), else why it cannot."""
    if os.geteuid() != 0:
        return "e2e tests need root (QEMU, apt-get, ublk)"
    done = subprocess.run([str(VM_RUN), "--prepare"], capture_output=True, text=True,
                          timeout=PREPARE_TIMEOUT)
    if done.returncode == 0:
        return None
    last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    if shutil.which("qemu-system-x86_64") is None:
        return f"QEMU could not be installed: {last}"
    pytest.fail(f"tools/vm/run --prepare failed (exit {done.returncode}):\n{done.stderr}")


@pytest.fixture(autouse=True)
def _skip_without_vm(request):
    if request.node.get_closest_marker("e2e") is not None:
        reason = request.getfixturevalue("vm_prepared")
        if reason:
            pytest.skip(reason)


@pytest.fixture
def vm_run():
    """vm_run(*command, disks=(), timeout=600) -> CompletedProcess (text, output captured).

    Runs `tools/vm/run` from the repo root, so COMMAND's cwd in the VM is the repo root.
    """
    def run(*command, disks=(), timeout=600):
        args = [str(VM_RUN), "--timeout", str(timeout)]
        for size in disks:
            args += ["--disk", size]
        return subprocess.run([*args, "--", *command], cwd=REPO, capture_output=True,
                              text=True, timeout=timeout + 60)
    return run
