"""Step scripts in the ublk VM: a script under tests/e2e/scripts/ prints
``@@STEP <name> PASS`` or ``@@STEP <name> FAIL: <why>`` per step and stops at the first
failure; one VM boot runs it, and one test per step asserts on its marker, so a failure
names the step and shows the script's output around it.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

import pytest

from tests.e2e.conftest import REPO, VM_RUN

MARKER = re.compile(r"^@@STEP (\S+) (PASS|FAIL)(?:: (.*))?$", re.M)


@dataclass(frozen=True)
class ScriptRun:
    """One run of a step script: its exit status, merged output and {step: (status, why)}."""

    code: int
    output: str
    steps: dict

    def context(self, step: str, lines: int = 60) -> str:
        """The output of `step` (from its '---- step' line), trimmed to its last lines."""
        start = self.output.find(f"---- step {step}")
        text = self.output[start:] if start >= 0 else self.output
        end = text.find("---- step ", 10)
        text = text[:end] if end > 0 else text
        return "\n".join(text.splitlines()[-lines:])

    def check(self, step: str) -> None:
        """Fail unless `step` reported PASS, naming the first failed step if it never ran."""
        if step not in self.steps:
            failed = [s for s, (st, _) in self.steps.items() if st == "FAIL"]
            if failed:
                pytest.fail(f"not reached: step {failed[0]} failed before it "
                            f"({self.steps[failed[0]][1]})")
            pytest.fail(f"step {step} never reported (exit {self.code}); output tail:\n"
                        + "\n".join(self.output.splitlines()[-60:]))
        status, reason = self.steps[step]
        assert status == "PASS", f"{step}: {reason}\n{self.context(step)}"


def run_script(script: str, *, disks: tuple = (), timeout: int = 900,
               interpreter: str = "bash") -> ScriptRun:
    """Boot the VM once and run `script` (a path under the repo) with `interpreter` in it."""
    cmd = [str(VM_RUN), "--timeout", str(timeout)]
    for size in disks:
        cmd += ["--disk", size]
    done = subprocess.run([*cmd, "--", interpreter, script], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout + 120)
    steps = {m.group(1): (m.group(2), m.group(3) or "") for m in MARKER.finditer(done.stdout)}
    return ScriptRun(done.returncode, done.stdout, steps)


def script_tests(script: str, steps: list, **run_args):
    """The tests of a module whose whole story is one step script in one VM boot: the
    module-scoped `run` fixture, a test per step and one on the exit status. A module
    takes them as `run, test_step, test_exit_status = script_tests(SCRIPT, STEPS, ...)`;
    `run_args` go to run_script (disks, timeout, interpreter)."""

    @pytest.fixture(scope="module", name="run")
    def run(vm_prepared):
        return run_script(script, **run_args)

    @pytest.mark.parametrize("step", steps)
    def test_step(run, step):
        run.check(step)

    def test_exit_status(run):
        assert run.code == 0, "\n".join(run.output.splitlines()[-40:])

    return run, test_step, test_exit_status
