"""The administration verbs of sworndisk-ublk as a user runs them: add-key, change-key,
remove-key, dump, header-backup, header-restore (offline, on image files), status (of a
running server: the daemon runs for real, over a fake ublk server, as in test_cli), and
the friction fixes (del DEV, help texts, the no-key message)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types

import pytest

import ublk_shim
from sworndisk import SwornDisk
from sworndisk.cryptopool import automatic_workers
from sworndisk.device import create_image
from sworndisk_ublk import cli, keys
from sworndisk_ublk.errors import CliError, ExitCode

from .conftest import KEY16, OTHER16
from .test_cli import FakeUblkServer, fake_driver, run_dir  # noqa: F401 (fixtures)

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ("--pbkdf-memory", "64", "--pbkdf-time", "1")


@pytest.fixture
def disk(tmp_path):
    """(data, meta, key file) of a disk formatted with the key file in slot 0."""
    data, meta = str(tmp_path / "data.img"), str(tmp_path / "meta.img")
    create_image(data, 64 * MiB)
    create_image(meta, SwornDisk.min_meta_size(64 * MiB))
    key = tmp_path / "disk.key"
    key.write_bytes(KEY16)
    SwornDisk.create(data, meta, KEY16).close()
    return data, meta, str(key)


def stdin_lines(monkeypatch, *lines: str) -> None:
    """Standard input is a pipe holding these lines (passphrases, as a script gives them)."""
    pipe = io.BytesIO("".join(f"{line}\n" for line in lines).encode())
    monkeypatch.setattr(keys.sys, "stdin", types.SimpleNamespace(isatty=lambda: False,
                                                                 buffer=pipe))


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def slots(capsys, meta) -> list:
    code, out, _ = run(capsys, "dump", meta, "--json")
    assert code == 0
    return [(s["slot"], s["kind"]) for s in json.loads(out)["slots"]]


def test_keys_through_the_cli(disk, capsys, monkeypatch):
    data, meta, key = disk
    stdin_lines(monkeypatch, "correct horse")
    code, out, err = run(capsys, "add-key", meta, "--key-file", key, *TINY)
    assert (code, out) == (0, "1\n") and "added key slot 1 (passphrase, argon2id" in err
    assert slots(capsys, meta) == [(0, "key file"), (1, "passphrase")]
    stdin_lines(monkeypatch, "correct horse", "battery staple")
    code, out, _ = run(capsys, "change-key", meta, *TINY)
    assert (code, out) == (0, "1\n")
    stdin_lines(monkeypatch, "correct horse")
    code, _, err = run(capsys, "remove-key", meta, "--slot", "0")
    assert code == ExitCode.KEY and "does not open any key slot" in err
    code, _, err = run(capsys, "remove-key", meta, "--slot", "0", "--key-file", key)
    assert code == ExitCode.KEY and "opens slot 0 itself" in err
    stdin_lines(monkeypatch, "battery staple")
    assert run(capsys, "remove-key", meta, "--slot", "0")[0] == 0
    code, _, err = run(capsys, "remove-key", meta, "--slot", "1", "--key-file", key)
    assert code == ExitCode.USAGE and "last one" in err         # checked before any key
    assert slots(capsys, meta) == [(1, "passphrase")]
    disk_ = SwornDisk.open(data, meta, passphrase="battery staple")
    assert disk_.key_slot == 1
    disk_.close()
    code, _, err = run(capsys, "add-key", meta, "--key-file", key, "--new-key-file", key)
    assert code == ExitCode.KEY and "only passphrase key slots" in err


def test_a_new_key_file_slot_and_json(disk, tmp_path, capsys):
    data, meta, key = disk
    other = tmp_path / "other.key"
    other.write_text(OTHER16.hex() + "\n")
    code, out, _ = run(capsys, "add-key", meta, "--key-file", key, "--new-key-file",
                       str(other), "--slot", "5", "--json")
    assert code == 0 and json.loads(out) == {"slot": 5, "kind": "key file", "kdf": "hmac-sha256",
                                             "memory_kib": None, "iterations": None,
                                             "lanes": None}
    SwornDisk.open(data, meta, OTHER16).close()
    code, _, err = run(capsys, "add-key", meta, "--key-file", key, "--new-key-file",
                       str(other), "--slot", "5")
    assert code == ExitCode.USAGE and "not a free slot" in err


def test_dump(disk, capsys):
    data, meta, key = disk
    code, out, _ = run(capsys, "dump", meta)
    assert code == 0
    for words in ("version:        3", "uuid:", "created:", "logical size:   56.0 MiB",
                  "copy 0: ok (generation 1), copy 1: ok (generation 1)",
                  "0: key file, hmac-sha256", "7: empty"):
        assert words in out
    assert KEY16.hex() not in out
    code, _, err = run(capsys, "dump", meta + ".nope")
    assert code == ExitCode.NOT_FOUND and "no such file" in err


def test_header_backup_and_restore(disk, tmp_path, capsys):
    data, meta, key = disk
    backup = str(tmp_path / "hdr.bak")
    code, _, err = run(capsys, "header-backup", meta, backup)
    assert code == 0 and "keep it as safe" in err
    assert run(capsys, "header-backup", meta, backup)[0] == ExitCode.USAGE
    other = tmp_path / "other.key"
    other.write_bytes(OTHER16)
    run(capsys, "change-key", meta, "--key-file", key, "--new-key-file", str(other))
    code, _, err = run(capsys, "header-restore", meta, backup)
    assert code == 0 and "key slot 0 is as at the backup" in err and "removed or changed" in err
    SwornDisk.open(data, meta, KEY16).close()
    foreign_meta = str(tmp_path / "foreign.img")
    create_image(foreign_meta, SwornDisk.min_meta_size(64 * MiB))
    create_image(str(tmp_path / "foreign-data.img"), 64 * MiB)
    SwornDisk.create(str(tmp_path / "foreign-data.img"), foreign_meta, KEY16).close()
    code, _, err = run(capsys, "header-restore", foreign_meta, backup)
    assert code == ExitCode.USAGE and "header of another disk" in err


def test_passphrases_from_a_pipe_in_a_real_process(disk):
    """The installed command, stdin a pipe: one line per passphrase, as cryptsetup."""
    data, meta, key = disk
    cmd = [sys.executable, "-m", "sworndisk_ublk"]
    p = subprocess.run(cmd + ["add-key", meta, "--key-file", key, *TINY], input=b"pw one\n",
                       capture_output=True, cwd=REPO, timeout=120)
    assert (p.returncode, p.stdout) == (0, b"1\n"), p.stderr
    p = subprocess.run(cmd + ["check", data, meta], input=b"pw one\n", capture_output=True,
                       cwd=REPO, timeout=120)
    assert p.returncode == 0 and p.stdout.endswith(b"clean\n"), p.stderr
    p = subprocess.run(cmd + ["check", data, meta], stdin=subprocess.DEVNULL,
                       capture_output=True, cwd=REPO, timeout=120, start_new_session=True)
    assert p.returncode == 8 and b"--key-file" in p.stderr and b"Traceback" not in p.stderr


def test_status_of_a_running_device(capsys, tmp_path, fake_driver, monkeypatch, run_dir):
    """`add --anchor` for real up to the kernel (fake ublk server), then status."""
    monkeypatch.setattr(ublk_shim, "UblkServer", FakeUblkServer)
    data, meta = str(tmp_path / "data.img"), str(tmp_path / "meta.img")
    create_image(data, 64 * MiB)
    create_image(meta, SwornDisk.min_meta_size(64 * MiB))
    key = tmp_path / "key"
    key.write_bytes(KEY16)
    anchor = tmp_path / "disk.anchor"
    table = f"0 {48 * MiB // 512} sworndisk {data} {meta} 0 force"
    code, out, err = run(capsys, "add", "--key-file", str(key), "--anchor", str(anchor), table)
    assert code == 0, err
    try:
        assert anchor.stat().st_size == 72
        code, out, err = run(capsys, "status", "-n", "7", "--json")
        assert code == 0, err
        st = json.loads(out)
        assert (st["dev"], st["data"], st["meta"], st["size"]) == ("/dev/ublkb7", data, meta,
                                                                   48 * MiB)
        assert st["used"] + st["free"] == st["usable"] == 48 * MiB
        assert round(st["used_mib"] + st["free_mib"], 1) == st["usable_mib"]
        assert (st["key_slot"], st["key_bits"], st["anchor"]) == (0, 128, str(anchor))
        assert st["uptime"] >= 0 and st["cleaning_runs"] == 0
        assert (st["crypto_workers"], st["crypto_worker_restarts"]) == (automatic_workers(), 0)
        code, text, _ = run(capsys, "status", "/dev/ublkb7")
        assert code == 0 and "/dev/ublkb7 is active." in text and "free:       48.0 MiB" in text
        assert "  crypto:     " in text
        assert run(capsys, "status")[0] == ExitCode.USAGE
        code, _, err = run(capsys, "status", "-n", "9")
        assert code == ExitCode.NOT_FOUND
    finally:
        assert run(capsys, "del", "/dev/ublkb7")[0] == 0


def test_every_option_has_help_and_add_help_explains_the_table(capsys):
    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in verbs.items():
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit):
        cli.main(["add", "--help"])
    out = capsys.readouterr().out
    for words in ("512-byte sectors", "force", "true", "false", "<data_dev>", "<meta_dev>"):
        assert words in out


@pytest.mark.parametrize("text,number", [("/dev/ublkb3", 3), ("ublkb12", 12), ("4", 4)])
def test_del_takes_a_device_path(text, number):
    assert cli._device_number(text) == number


def test_del_refuses_other_paths(capsys):
    code, _, err = run(capsys, "del", "/dev/sda")
    assert code == ExitCode.USAGE and "/dev/ublkbN" in err
    assert run(capsys, "del")[0] == ExitCode.USAGE


def test_no_key_and_no_terminal_says_key_file(monkeypatch):
    monkeypatch.setattr(keys, "_terminal_available", lambda: False)
    stdin_lines(monkeypatch)                       # an empty pipe: end of file at once
    with pytest.raises(CliError) as e:
        keys.ask_passphrase("meta.img", new=True, stdin_free=True)
    assert "--key-file" in e.value.message and "empty passphrase" not in e.value.message
    stdin_lines(monkeypatch, "")                   # an empty line is an empty passphrase
    with pytest.raises(CliError, match="empty passphrase"):
        keys.ask_passphrase("meta.img", new=True, stdin_free=True)
