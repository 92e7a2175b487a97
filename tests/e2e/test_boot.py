"""Named disks, the tab file with start/stop, read-only, del --force/--deferred (issue 16),
end to end in the ublk VM: one boot runs tests/e2e/scripts/boot.sh (see there for the steps)."""
import pytest

from tests.e2e.steps import script_tests

pytestmark = pytest.mark.e2e

SCRIPT = "tests/e2e/scripts/boot.sh"
STEPS = ["setup", "format", "start", "dupname", "stop", "recover", "readonly", "force",
         "deferred", "done"]


run, test_step, test_exit_status = script_tests(SCRIPT, STEPS, disks=("64M", "32M"), timeout=1800)
