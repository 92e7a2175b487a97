"""tools/vm/run retries a boot that dies before COMMAND starts, and only such a boot.

Natively, without QEMU: a fake `qemu-system-x86_64` first on PATH plays the VM. It honours
the harness's own test hook (SWORNDISK_VM_FAIL_BOOTS puts `sworndisk.fail_boot=1` on the
kernel command line, where the real init exits and panics the kernel) by printing the
panic and exiting before the start marker; otherwise it runs the job script like the
guest's init does, between the markers. tests/e2e/test_vm.py does the same with real boots.
"""
import os
import signal
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

VM_DIR = Path(__file__).resolve().parents[1] / "tools" / "vm"

FAKE_QEMU = textwrap.dedent(r"""
    #!/bin/sh
    # A stand-in for QEMU: one line per boot in $FAKE_QEMU_LOG, then the guest's console.
    append=
    while [ $# -gt 0 ]; do
        [ "$1" = -append ] && append=$2
        shift
    done
    echo "boot $append" >>"$FAKE_QEMU_LOG"
    echo "SeaBIOS (version fake)"
    case " $append " in
    *" sworndisk.fail_boot=1 "*)
        echo "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"
        echo "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"
        exit 0 ;;
    esac
    job=$(echo "$append" | tr ' ' '\n' | sed -n 's/^sworndisk.job=//p')
    echo "@@SWORNDISK_VM_START@@"
    if [ -n "$FAKE_QEMU_PANIC_AFTER_START" ]; then
        echo "command output before the panic"
        echo "Kernel panic - not syncing: sysrq triggered crash"
        exit 0
    fi
    /bin/sh "$job"
    echo "@@SWORNDISK_VM_EXIT=$?@@"
""").lstrip()


@pytest.fixture
def vm(tmp_path, monkeypatch):
    """The harness module with a fake QEMU on PATH and a fake (never booted) kernel."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    qemu = bindir / "qemu-system-x86_64"
    qemu.write_text(FAKE_QEMU)
    qemu.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_QEMU_LOG", str(tmp_path / "boots.log"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv("SWORNDISK_VM_FAIL_BOOTS", raising=False)
    monkeypatch.syspath_prepend(str(VM_DIR))
    sys.modules.pop("vm", None)
    import vm as module
    kernel = SimpleNamespace(vmlinuz=tmp_path / "vmlinuz", initramfs=tmp_path / "initrd",
                             moddir=tmp_path / "modules")
    monkeypatch.setattr(module, "prepare", lambda: kernel)
    sigterm = signal.getsignal(signal.SIGTERM)
    yield module
    signal.signal(signal.SIGTERM, sigterm)
    sys.modules.pop("vm", None)


def boots(tmp_path):
    log = tmp_path / "boots.log"
    return log.read_text().splitlines() if log.exists() else []


def test_boot_that_dies_early_is_retried_and_says_so(vm, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("SWORNDISK_VM_FAIL_BOOTS", "2")
    status = vm.main(["--", "sh", "-c", "echo hello from COMMAND; exit 3"])
    out, err = capfd.readouterr()
    assert status == 3, err
    assert out == "hello from COMMAND\n"
    tried = boots(tmp_path)
    assert len(tried) == 3
    assert ["sworndisk.fail_boot=1" in b for b in tried] == [True, True, False]
    retries = [line for line in err.splitlines() if "retrying" in line]
    assert retries == [
        f"tools/vm/run: boot {n} of 3 died before COMMAND started (the VM stopped before "
        f"COMMAND started: Oops: int3: 0000 [#1] PREEMPT SMP NOPTI); retrying"
        for n in (1, 2)]


def test_at_most_two_retries_then_a_boot_failure(vm, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("SWORNDISK_VM_FAIL_BOOTS", "5")
    status = vm.main(["--", "true"])
    out, err = capfd.readouterr()
    assert status == vm.EXIT_HARNESS
    assert len(boots(tmp_path)) == 3
    assert err.count("retrying") == 2
    assert "tools/vm/run: boot failure: the VM stopped before COMMAND started" in err
    assert "Attempted to kill init!" in err  # the last console lines explain it
    assert out == ""


def test_failure_after_command_started_is_never_retried(vm, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("FAKE_QEMU_PANIC_AFTER_START", "1")
    status = vm.main(["--", "true"])
    out, err = capfd.readouterr()
    assert status == vm.EXIT_HARNESS
    assert len(boots(tmp_path)) == 1
    assert "retrying" not in err
    assert "the VM died before COMMAND finished" in err
    assert "command output before the panic" in out


def test_a_good_boot_is_booted_once(vm, tmp_path, capfd):
    assert vm.main(["--", "sh", "-c", "exit 0"]) == 0
    assert len(boots(tmp_path)) == 1
    assert "retrying" not in capfd.readouterr().err


def test_bad_hook_value_is_one_line(vm, monkeypatch, capfd):
    monkeypatch.setenv("SWORNDISK_VM_FAIL_BOOTS", "x")
    assert vm.main(["--", "true"]) == vm.EXIT_HARNESS
    assert capfd.readouterr().err == (
        "tools/vm/run: SWORNDISK_VM_FAIL_BOOTS='x' must be a number of boots (e.g. 1)\n")
