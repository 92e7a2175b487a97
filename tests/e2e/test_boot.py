"""Named disks, the tab file with start/stop, read-only, del --force/--deferred (issue 16),
end to end in the ublk VM: one boot runs tests/e2e/scripts/boot.sh (see there for the steps)."""
import pytest

from tests.e2e.steps import run_script

pytestmark = pytest.mark.e2e

SCRIPT = "tests/e2e/scripts/boot.sh"
STEPS = ["setup", "format", "start", "dupname", "stop", "recover", "readonly", "force",
         "deferred", "done"]


@pytest.fixture(scope="module")
def run(vm_prepared):
    return run_script(SCRIPT, disks=("64M", "32M"), timeout=1800)


@pytest.mark.parametrize("step", STEPS)
def test_step(run, step):
    run.check(step)


def test_exit_status(run):
    assert run.code == 0, "\n".join(run.output.splitlines()[-40:])
