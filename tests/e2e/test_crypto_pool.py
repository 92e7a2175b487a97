"""Crypto workers in the ublk server (issue 15), end to end in the ublk VM: one boot runs
tests/e2e/scripts/pool.sh (--crypto-workers 1 --queues 2, fio verify, status and stats)."""
import pytest

from tests.e2e.steps import script_tests

pytestmark = pytest.mark.e2e

SCRIPT = "tests/e2e/scripts/pool.sh"
STEPS = ["setup", "flag", "fio", "status", "done"]


run, test_step, test_exit_status = script_tests(SCRIPT, STEPS, timeout=600)
