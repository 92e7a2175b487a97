"""Growing a disk (issue 17, item 1) end to end in the ublk VM: one boot runs
tests/e2e/scripts/resize.sh (resize, re-add, resize2fs, files intact; see there)."""
import pytest

from tests.e2e.steps import run_script

pytestmark = pytest.mark.e2e

SCRIPT = "tests/e2e/scripts/resize.sh"
STEPS = ["setup", "format", "meta-too-small", "resize", "readd", "check", "max-sectors", "done"]


@pytest.fixture(scope="module")
def run(vm_prepared):
    return run_script(SCRIPT, timeout=900)


@pytest.mark.parametrize("step", STEPS)
def test_step(run, step):
    run.check(step)


def test_exit_status(run):
    assert run.code == 0, "\n".join(run.output.splitlines()[-40:])
