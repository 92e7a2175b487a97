"""Keys, status, check and the rollback anchor (issue 10), end to end in the ublk VM: one
boot runs tests/e2e/scripts/admin.sh (see there for the steps)."""
import pytest

from tests.e2e.steps import run_script

pytestmark = pytest.mark.e2e

SCRIPT = "tests/e2e/scripts/admin.sh"
STEPS = ["setup", "format", "status", "add-key", "check", "anchor", "done"]


@pytest.fixture(scope="module")
def run(vm_prepared):
    return run_script(SCRIPT, timeout=900)


@pytest.mark.parametrize("step", STEPS)
def test_step(run, step):
    run.check(step)


def test_exit_status(run):
    assert run.code == 0, "\n".join(run.output.splitlines()[-40:])
