"""One owner per disk and force on an existing SwornDisk (issue 7), end to end in the ublk
VM: one boot runs tests/e2e/scripts/ownership.sh (see there for the steps). The core case:
while /dev/ublkb0 is mounted, `add ... force` of its images through symlinks is refused in
one line naming the server, and the ext4 on it reads back intact and fscks clean.
"""
import pytest

from tests.e2e.steps import script_tests

pytestmark = pytest.mark.e2e

SCRIPT = "tests/e2e/scripts/ownership.sh"
STEPS = ["setup", "live", "symlink", "hardlink", "samepath", "race", "blockdev", "intact",
         "force", "done"]


run, test_step, test_exit_status = script_tests(SCRIPT, STEPS, disks=("64M", "64M", "64M"), timeout=900)
