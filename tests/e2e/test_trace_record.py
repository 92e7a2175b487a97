"""End to end: the recording loop target (`python -m ublk_shim loop FILE --record TRACE`)
on a real ublk driver logs a write, the FLUSH of an fsync and a read, in order (one VM boot,
tests/e2e/scripts/trace_record.py; under a minute under TCG on an idle machine)."""
import subprocess

import pytest

from tests.e2e.conftest import REPO, VM_RUN

pytestmark = pytest.mark.e2e


def test_recording_loop_target_logs_requests(vm_prepared):
    cmd = [str(VM_RUN), "--timeout", "600", "--", "env", f"PYTHONPATH={REPO}",
           str(REPO / ".venv" / "bin" / "python"), "tests/e2e/scripts/trace_record.py"]
    done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:]
    assert "OK served" in done.stdout and "OK trace record" in done.stdout, done.stdout[-4000:]
