"""Progress on long operations (issue 16): a line rewritten on a terminal, nothing on a pipe
or with --json. The CLI runs in a child process whose stderr is a pty (or a pipe)."""
from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys

from sworndisk import SwornDisk
from sworndisk_ublk.progress import Progress

from .test_cli import KEY_HEX, sized_images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_the_line_has_blocks_rate_and_time_left():
    p = Progress("checking", stream=_Tty())
    assert p.line("data blocks", 250, 1000, 2.0) == (
        "checking data blocks: 250/1000 blocks (25%), 125 blocks/s, 6 s left")
    assert p.line("index", 0, 7, 0.0) == "checking index: 0/7 blocks (0%)"
    assert "min" in p.line("data blocks", 10, 100000, 1.0)
    p("data blocks", 1, 10)
    p.done()
    out = p.stream.getvalue()
    assert out.startswith("\rchecking data blocks: 1/10") and out.endswith("\r\033[K")


def test_nothing_off_a_terminal_or_when_quiet():
    for p in (Progress("x", stream=io.StringIO()), Progress("x", stream=_Tty(), quiet=True)):
        p("data blocks", 1, 10)
        p.done()
        assert p.stream.getvalue() == "" and not p.enabled


def _disk(tmp_path):
    data, meta = sized_images(tmp_path)
    key = bytes.fromhex(KEY_HEX)
    disk = SwornDisk.create(data, meta, key=key)
    for lba in range(0, 2048, 8):
        disk.write(lba, os.urandom(8 * 4096))
    disk.close()
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY_HEX + "\n")
    return data, meta, str(keyfile)


def _run(argv, *, tty: bool):
    """Run the CLI with stderr on a pty (tty) or a pipe; (exit code, stdout, stderr)."""
    cmd = [sys.executable, "-m", "sworndisk_ublk", *argv]
    if not tty:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        return done.returncode, done.stdout, done.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=slave,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    os.close(slave)
    err = b""
    while True:
        if select.select([master], [], [], 300)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:          # EIO: the child closed the pty
                break
            if not chunk:
                break
            err += chunk
    out = proc.stdout.read().decode()
    proc.wait(30)
    os.close(master)
    return proc.returncode, out, err.decode()


def test_check_shows_progress_on_a_terminal_only(tmp_path):
    data, meta, keyfile = _disk(tmp_path)
    argv = ["check", data, meta, "--key-file", keyfile, "--data"]
    code, out, err = _run(argv, tty=True)
    assert code == 0 and "clean" in out, err
    assert "\rchecking data blocks: " in err and "blocks/s" in err, repr(err)
    code, out, err = _run(argv, tty=False)
    assert code == 0 and "clean" in out and err == "", repr(err)
    code, out, err = _run(argv + ["--json"], tty=True)
    assert code == 0 and '"clean": true' in out and "checking" not in err, repr(err)
