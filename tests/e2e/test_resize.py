"""Growing a disk (issue 17, item 1) end to end in the ublk VM: one boot runs
tests/e2e/scripts/resize.sh (resize, re-add, resize2fs, files intact; see there)."""
import pytest

from tests.e2e.steps import script_tests

pytestmark = pytest.mark.e2e

SCRIPT = "tests/e2e/scripts/resize.sh"
STEPS = ["setup", "format", "meta-too-small", "resize", "readd", "check", "max-sectors", "done"]


run, test_step, test_exit_status = script_tests(SCRIPT, STEPS, timeout=900)
