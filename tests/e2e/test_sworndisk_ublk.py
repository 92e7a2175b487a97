"""sworndisk-ublk end to end, in the ublk VM: one boot runs tests/e2e/scripts/sworndisk.sh.

The script does every step (add, fio write+verify at depth 1 and 16, ext4, del, re-add without formatting,
a del refused while the device is open or mounted, SIGTERM flushing, wrong keys, kill -9
and recover of a --recoverable server, passphrases, no secrets in /run) and prints
``@@STEP <name> PASS`` or ``@@STEP <name> FAIL: <why>``; each test here asserts on one
step, so a failure names the step and shows the script's output around it.
"""
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "tests/e2e/scripts/sworndisk.sh"
TIMEOUT = 900
STEPS = ["setup", "add", "fio", "fiodepth", "filesystem", "del", "readd", "busy", "sigterm", "wrongkey",
         "recover", "passphrase", "secrets", "done"]
MARKER = re.compile(r"^@@STEP (\S+) (PASS|FAIL)(?:: (.*))?$", re.M)


@pytest.fixture(scope="module")
def run(vm_prepared):
    """The script's run in the VM: (exit status, output, {step: (status, reason)})."""
    done = subprocess.run([str(REPO / "tools" / "vm" / "run"), "--timeout", str(TIMEOUT),
                           "--", "bash", SCRIPT], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT + 120)
    steps = {m.group(1): (m.group(2), m.group(3) or "") for m in MARKER.finditer(done.stdout)}
    return done.returncode, done.stdout, steps


def _context(output: str, step: str, lines: int = 60) -> str:
    """The output of `step` (from its '---- step' line), trimmed to its last lines."""
    start = output.find(f"---- step {step}")
    text = output[start:] if start >= 0 else output
    end = text.find("---- step ", 10)
    text = text[:end] if end > 0 else text
    return "\n".join(text.splitlines()[-lines:])


@pytest.mark.parametrize("step", STEPS)
def test_step(run, step):
    code, output, steps = run
    if step not in steps:
        failed = [s for s, (st, _) in steps.items() if st == "FAIL"]
        if failed:
            pytest.fail(f"not reached: step {failed[0]} failed before it "
                        f"({steps[failed[0]][1]})")
        pytest.fail(f"step {step} never reported (exit {code}); output tail:\n"
                    + "\n".join(output.splitlines()[-60:]))
    status, reason = steps[step]
    assert status == "PASS", f"{step}: {reason}\n{_context(output, step)}"


def test_exit_status(run):
    code, output, _ = run
    assert code == 0, "\n".join(output.splitlines()[-40:])
