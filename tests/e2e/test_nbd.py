"""Issue 17 in the ublk VM: a SwornDisk on two NBD devices (qemu-nbd exports on 127.0.0.1,
attached with `qemu-nbd -c` and `nbd-client`), ext4 + files + fio verify, del and add
again; then the data device's server and the meta device's server are each killed under
fsyncs: EIO within the NBD timeout, list/status say the disk failed and why, and after
reattaching, del + add opens it at its last flush with every fsynced file intact. One
boot runs tests/e2e/scripts/nbd.py; each test asserts on one of its steps.
"""
import json
import re

import pytest

from tests.e2e.steps import run_script

pytestmark = pytest.mark.e2e

STEPS = ["setup", "attach", "ext4", "readd", "kill-data", "kill-meta", "teardown"]
NBD_TIMEOUT = 10          # nbd.py's nbd-client -t


@pytest.fixture(scope="module")
def run(vm_prepared):
    done = run_script("tests/e2e/scripts/nbd.py", timeout=1400,
                      interpreter=".venv/bin/python")
    print(done.output)            # shown by pytest on failure, and with -s
    return done


@pytest.fixture(scope="module")
def result(run):
    m = re.search(r"^@@RESULT (.*)$", run.output, re.M)
    assert m, f"no result (exit {run.code})"
    return json.loads(m.group(1))


@pytest.mark.parametrize("step", STEPS)
def test_step(run, step):
    run.check(step)


@pytest.mark.parametrize("which", ["data", "meta"])
def test_server_death_is_bounded_and_explained(result, which):
    kill = result[f"kill_{which}"]
    assert kill["failed_after_s"] < NBD_TIMEOUT + 60    # EIO, not a hang
    assert kill["reason"].startswith("OSError: [Errno 5]"), kill
    assert kill["files"] >= 7


def test_qemu_nbd_holds_its_device_open(result):
    """What `add` meets right after `qemu-nbd -c` returned: qemu-nbd itself keeps the
    device open (the device's transport, named in /sys/block/nbd0/pid), not exclusively;
    the add on it succeeded on the first try (step attach)."""
    seen = result["qemu_nbd_c"]
    assert any("(qemu-nbd)" in o for o in seen["openers"]), seen
    assert seen["holders"] == [] and seen["nbd_pid"], seen
