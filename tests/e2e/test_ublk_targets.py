"""End to end: the ublk shim's null and loop targets on a real ublk driver, in the test VM.

One VM boot runs tests/e2e/scripts/targets.sh (see there for the steps): device parameters,
fio throughput and verify jobs on null and loop (at depth, so requests reach the target in
batches), FLUSH / DISCARD / WRITE_ZEROES reaching the target, external delete, refusal while
mounted, bounded delete while held open, and recovery of a recoverable device after kill -9
of its server. About 1.5 minutes under TCG.
"""
import re
import subprocess

import pytest

from tests.e2e.conftest import REPO, VM_RUN

pytestmark = pytest.mark.e2e

SCRIPT = "tests/e2e/scripts/targets.sh"

STEPS = [
    "OK null parameters", "OK null io", "OK null deleted", "OK loop verify",
    "OK loop discard/write_zeroes/flush", "OK loop deleted", "OK external del",
    "OK busy device handling", "OK recovery", "ALL OK",
]
FIO_JOBS = ["null-randread", "null-randwrite", "null-verify", "loop-verify-4k",
            "loop-verify-64k"]


@pytest.fixture(scope="module")
def vm_output(vm_prepared):
    """One VM boot for the whole module: (exit status, merged output)."""
    if vm_prepared:
        pytest.skip(vm_prepared)
    cmd = [str(VM_RUN), "--disk", "64M", "--cpus", "2", "--timeout", "600", "--",
           "sh", SCRIPT, "/dev/vdb"]
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=900)
    print(done.stdout)        # shown by pytest on failure, and with -s
    return done.returncode, done.stdout


def test_script_passes(vm_output):
    status, out = vm_output
    assert status == 0, f"VM run exited {status}:\n{out[-4000:]}"
    for step in STEPS:
        assert step in out, f"missing {step!r}:\n{out[-4000:]}"


def test_fio_figures_reported(vm_output):
    _, out = vm_output
    for job in FIO_JOBS:
        m = re.search(rf"^RESULT {job}: (read|write): IOPS=([\d.]+)(k?)", out, re.MULTILINE)
        assert m, f"no fio figures for {job}"
        assert float(m.group(2)) > 0


def server_stats(out, index):
    """The stats line of the index-th server the script ran (0 null, 1 loop), as ints."""
    stats = re.findall(r"^ublk \d+ stats: (.*)$", out, re.MULTILINE)
    assert len(stats) > index, "no stats line"
    return {k: int(v) for k, v in (kv.split("=") for kv in stats[index].split())}


def test_loop_target_saw_flush_discard_write_zeroes(vm_output):
    loop = server_stats(vm_output[1], 1)
    assert loop["flush"] > 0 and loop["discard"] > 0
    assert loop["write_zeroes"] > 0 and loop["failed"] == 0


def test_requests_at_depth_are_served_in_batches(vm_output):
    """fio at depth 16/32 (with crc32c verify on loop): the target got many requests per call."""
    for index in (0, 1):                                    # null, loop
        s = server_stats(vm_output[1], index)
        served = sum(s[op] for op in ("read", "write", "flush", "discard", "write_zeroes"))
        assert s["max_batch"] > 1, s
        assert 0 < s["batches"] < served, s
