"""Crypto workers in the ublk server (issue 15), end to end in the ublk VM: one boot runs
tests/e2e/scripts/pool.sh (--crypto-workers 1 --queues 2, fio verify, status and stats)."""
import pytest

from tests.e2e.steps import run_script

pytestmark = pytest.mark.e2e

SCRIPT = "tests/e2e/scripts/pool.sh"
STEPS = ["setup", "flag", "fio", "status", "done"]


@pytest.fixture(scope="module")
def run(vm_prepared):
    return run_script(SCRIPT, timeout=600)


@pytest.mark.parametrize("step", STEPS)
def test_step(run, step):
    run.check(step)


def test_exit_status(run):
    assert run.code == 0, "\n".join(run.output.splitlines()[-40:])
