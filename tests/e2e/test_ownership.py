"""One owner per disk and force on an existing SwornDisk (issue 7), end to end in the ublk
VM: one boot runs tests/e2e/scripts/ownership.sh (see there for the steps). The core case:
while /dev/ublkb0 is mounted, `add ... force` of its images through symlinks is refused in
one line naming the server, and the ext4 on it reads back intact and fscks clean.
"""
import pytest

from tests.e2e.steps import run_script

pytestmark = pytest.mark.e2e

SCRIPT = "tests/e2e/scripts/ownership.sh"
STEPS = ["setup", "live", "symlink", "hardlink", "samepath", "race", "blockdev", "intact",
         "force", "done"]


@pytest.fixture(scope="module")
def run(vm_prepared):
    return run_script(SCRIPT, disks=("64M", "64M", "64M"), timeout=900)


@pytest.mark.parametrize("step", STEPS)
def test_step(run, step):
    run.check(step)


def test_exit_status(run):
    assert run.code == 0, "\n".join(run.output.splitlines()[-40:])
