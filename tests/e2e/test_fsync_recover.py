"""Issue 11 in the ublk VM: fsynced files survive kill -9 + recover under ext4, and a lost
write log is reported. One boot runs tests/e2e/scripts/fsync_recover.py (about 4 minutes
under TCG); each test asserts on one of its steps.
"""
import json
import re
import subprocess

import pytest

from tests.e2e.conftest import REPO, VM_RUN

pytestmark = pytest.mark.e2e

SCRIPT = "tests/e2e/scripts/fsync_recover.py"
TIMEOUT = 1200
STEPS = ["setup", "cycles", "verify", "lost", "teardown"]
MARKER = re.compile(r"^@@STEP (\S+) (PASS|FAIL)(?:: (.*))?$", re.M)


@pytest.fixture(scope="module")
def run(vm_prepared):
    """(exit status, output, {step: (status, why)}, result) of one VM run of the script."""
    done = subprocess.run([str(VM_RUN), "--timeout", str(TIMEOUT), "--",
                           ".venv/bin/python", SCRIPT], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT + 120)
    print(done.stdout)            # shown by pytest on failure, and with -s
    steps = {m.group(1): (m.group(2), m.group(3) or "") for m in MARKER.finditer(done.stdout)}
    m = re.search(r"^@@RESULT (.*)$", done.stdout, re.M)
    return done.returncode, done.stdout, steps, json.loads(m.group(1)) if m else None


@pytest.mark.parametrize("step", STEPS)
def test_step(run, step):
    code, output, steps, _ = run
    if step not in steps:
        failed = [f"{s}: {why}" for s, (st, why) in steps.items() if st == "FAIL"]
        pytest.fail(f"step {step} not reached (exit {code}); "
                    f"{failed[0] if failed else 'output tail:'}\n"
                    + "\n".join(output.splitlines()[-40:]))
    status, why = steps[step]
    assert status == "PASS", f"{step}: {why}"


def test_the_kills_hit_what_they_aimed_at(run):
    code, _, _, result = run
    assert result is not None, f"no result (exit {code})"
    cycles = result["cycles"]
    assert len(cycles) >= 6
    assert any(c["trigger"] == "fsync" and c["blocked_in"] == "fsync" for c in cycles)
    assert sum(c["replayed"] for c in cycles) > 0       # completed writes were put back
    assert result["files_verified"] >= 20
