"""Keys, status, check and the rollback anchor (issue 10), end to end in the ublk VM: one
boot runs tests/e2e/scripts/admin.sh (see there for the steps)."""
import pytest

from tests.e2e.steps import script_tests

pytestmark = pytest.mark.e2e

SCRIPT = "tests/e2e/scripts/admin.sh"
STEPS = ["setup", "format", "status", "add-key", "check", "anchor", "done"]


run, test_step, test_exit_status = script_tests(SCRIPT, STEPS, timeout=900)
