"""Crypto workers in the ublk server (issue 15), end to end in the ublk VM: one boot runs
tests/e2e/scripts/pool.sh (--crypto-workers 1 --queues 2, fio verify, status and stats; on
image files, then on two virtio disks, where the workers read the data device themselves)."""
import pytest

from tests.e2e.steps import script_tests

pytestmark = pytest.mark.e2e

SCRIPT = "tests/e2e/scripts/pool.sh"
STEPS = ["setup", "flag", "fio", "status", "fetch", "done"]


run, test_step, test_exit_status = script_tests(SCRIPT, STEPS, disks=("64M", "32M"), timeout=900)
