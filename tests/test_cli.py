"""Native tests of sworndisk-ublk (no VM): table, keys, state, target, CLI errors, daemon.

The ublk driver is not needed: where a test goes past the driver check it points the
shim's UBLK_CONTROL_PATH at an ordinary file, and the daemon test replaces the shim's
UblkServer with an in-process fake (fork inherits the replacement).
"""
from __future__ import annotations

import errno
import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import types

import pytest

import ublk_shim
from sworndisk import IntegrityError, MemoryDevice, NoSpaceError, SwornDisk
from sworndisk_ublk import cli, commands, keys, state, table as tbl
from sworndisk_ublk.errors import CliError, ExitCode
from sworndisk_ublk.target import SwornDiskTarget
from ublk_shim import ctrl, holders
from ublk_shim import sys as uapi

from .owner_process import digest, mark_of, own, path_forms

KEY_HEX = "00112233445566778899aabbccddeeff"
SECRET = "deadbeefdeadbeefdeadbeefdeadbeef"
MiB = 1 << 20


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("SWORNDISK_RUN_DIR", str(d))
    return d


@pytest.fixture
def images(tmp_path):
    data, meta = tmp_path / "data.img", tmp_path / "meta.img"
    for p, size in ((data, 64 * MiB), (meta, 16 * MiB)):
        with open(p, "wb") as f:
            f.truncate(size)
    return str(data), str(meta)


@pytest.fixture
def fake_driver(tmp_path, monkeypatch):
    """Pretend /dev/ublk-control exists (the checks only look for the file)."""
    ctl = tmp_path / "ublk-control"
    ctl.write_bytes(b"")
    monkeypatch.setattr(uapi, "UBLK_CONTROL_PATH", str(ctl))
    return ctl


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# --- table --------------------------------------------------------------------------------

def test_table_parses_the_rust_manual_format():
    t = tbl.parse_table("0 58593744 sworndisk /dev/loop0 /dev/loop1 0 force\n")
    assert (t.start, t.sectors, t.data_dev, t.meta_dev, t.format) == (
        0, 58593744, "/dev/loop0", "/dev/loop1", "force")
    assert t.size == 58593744 * 512 and t.nr_blocks == 58593744 // 8
    assert t.line() == "0 58593744 sworndisk /dev/loop0 /dev/loop1 0 force"
    assert t.with_format("false").line().endswith(" 0 false")


def test_table_ignores_comments_and_blank_lines():
    t = tbl.parse_table("# my disk\n\n  0 8 sworndisk a b 0 true  \n")
    assert t.format == "true"


@pytest.mark.parametrize("text, words", [
    ("", "empty"),
    ("0 8 sworndisk a b 0 true\n0 8 sworndisk c d 0 true", "exactly one"),
    ("0 8 sworndisk a b 0", "7"),
    ("1 8 sworndisk a b 0 true", "<start> must be 0"),
    ("0 8 crypt a b 0 true", "target type"),
    ("0 x sworndisk a b 0 true", "decimal"),
    ("0 0 sworndisk a b 0 true", "positive"),
    ("0 8 sworndisk a b 0 maybe", "force, true, false"),
])
def test_bad_tables(text, words):
    with pytest.raises(CliError) as e:
        tbl.parse_table(text)
    assert words in e.value.message and e.value.code == ExitCode.USAGE


def test_sectors_round_down_to_whole_blocks_as_in_the_rust_manual():
    # The Rust manual's table (30 GB = 58593750 sectors) must work as written.
    t = tbl.parse_table("0 58593750 sworndisk /dev/loop0 /dev/loop1 0 force")
    assert t.nr_blocks == 58593744 // 8 and t.size == 58593744 * 512
    assert "58593744" in t.rounding_note
    assert tbl.parse_table("0 58593744 sworndisk a b 0 force").rounding_note == ""
    with pytest.raises(CliError) as e:
        tbl.parse_table("0 7 sworndisk /dev/loop0 /dev/loop1 0 force")
    assert "at least 8" in e.value.message


def test_key_in_table_is_refused_without_echoing_it():
    with pytest.raises(CliError) as e:
        tbl.parse_table(f"0 8 sworndisk a b {SECRET} force")
    msg = e.value.message
    assert "command line" in msg and "ps" in msg and "--key-file" in msg
    assert SECRET not in msg


def test_malformed_table_never_echoes_its_words():
    with pytest.raises(CliError) as e:
        tbl.parse_table(f"0 8 sworndisk a {SECRET} force")
    assert SECRET not in e.value.message


def test_resolve_devices(images, tmp_path, monkeypatch):
    data, meta = images
    monkeypatch.chdir(tmp_path)
    t = tbl.resolve_devices(tbl.parse_table("0 8 sworndisk data.img meta.img 0 true"))
    assert (t.data_dev, t.meta_dev) == (data, meta)


def test_resolve_devices_errors(images, tmp_path):
    data, meta = images
    cases = [
        (f"0 8 sworndisk {tmp_path}/nope {meta} 0 true", "no such file", ExitCode.NOT_FOUND),
        (f"0 8 sworndisk {data} {data} 0 true", "must differ", ExitCode.USAGE),
        (f"0 8 sworndisk {tmp_path} {meta} 0 true", "not a block device", ExitCode.USAGE),
        (f"0 {64 * MiB // 512 + 8} sworndisk {data} {meta} 0 true", "larger than data",
         ExitCode.USAGE),
    ]
    for text, words, code in cases:
        with pytest.raises(CliError) as e:
            tbl.resolve_devices(tbl.parse_table(text))
        assert words in e.value.message and e.value.code == code, text


def test_format_bytes():
    assert tbl.format_bytes(512) == "512 B"
    assert tbl.format_bytes(256 * MiB) == "256.0 MiB"
    assert tbl.format_bytes(3 << 40) == "3.0 TiB"


# --- keys ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content, key", [
    (bytes(range(16)), bytes(range(16))),
    (bytes(range(32)), bytes(range(32))),
    (KEY_HEX.encode(), bytes.fromhex(KEY_HEX)),
    (KEY_HEX.encode() + b"\n", bytes.fromhex(KEY_HEX)),
    ((KEY_HEX * 2).upper().encode() + b"\r\n", bytes.fromhex(KEY_HEX * 2)),
    (b"\n" * 16, b"\n" * 16),            # raw keys are raw, newlines included
])
def test_key_files(tmp_path, content, key):
    p = tmp_path / "key"
    p.write_bytes(content)
    src = keys.load_key_file(str(p))
    assert src.key == key and not src.is_passphrase
    assert KEY_HEX not in repr(src) and repr(key) not in repr(src)


@pytest.mark.parametrize("content", [b"", b"short", bytes(24), b"ab" * 20 + b"\n", bytes(5000)])
def test_bad_key_files(tmp_path, content):
    p = tmp_path / "key"
    p.write_bytes(content)
    with pytest.raises(CliError) as e:
        keys.load_key_file(str(p))
    assert str(p) in e.value.message and e.value.code == ExitCode.USAGE


def test_missing_key_file(tmp_path):
    with pytest.raises(CliError) as e:
        keys.load_key_file(str(tmp_path / "nope"))
    assert "no such file" in e.value.message and e.value.code == ExitCode.NOT_FOUND


def test_no_terminal_and_no_stdin_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(keys, "_terminal_available", lambda: False)
    with pytest.raises(CliError) as e:
        keys.get_key_source(None, "meta.img", new=False, stdin_free=False)
    assert "--key-file" in e.value.message


def test_passphrase_from_stdin_when_there_is_no_terminal(monkeypatch):
    monkeypatch.setattr(keys, "_terminal_available", lambda: False)
    stdin = types.SimpleNamespace(isatty=lambda: False, buffer=io.BytesIO(b"correct horse\n"))
    monkeypatch.setattr(keys.sys, "stdin", stdin)
    src = keys.get_key_source(None, "meta.img", new=True, stdin_free=True)
    assert src.passphrase == b"correct horse" and "correct" not in repr(src)


def test_terminal_prompt_confirms_new_passphrases(monkeypatch):
    answers = iter(["one", "two"])
    monkeypatch.setattr(keys, "_terminal_available", lambda: True)
    monkeypatch.setattr(keys.getpass, "getpass", lambda prompt="": next(answers))
    with pytest.raises(CliError) as e:
        keys.ask_passphrase("meta.img", new=True, stdin_free=False)
    assert "do not match" in e.value.message
    monkeypatch.setattr(keys.getpass, "getpass", lambda prompt="": "")
    with pytest.raises(CliError):
        keys.ask_passphrase("meta.img", new=False, stdin_free=False)


def test_key_sources_become_the_engines_arguments():
    assert keys.KeySource("passphrase", passphrase=b"pw").engine_args() == {"passphrase": b"pw"}
    assert keys.KeySource("file", key=b"k" * 16).engine_args("new_") == {"new_key": b"k" * 16}


# --- state --------------------------------------------------------------------------------

def make_state(dev_id=3, pid=None, **kw):
    pid = os.getpid() if pid is None else pid
    base = dict(dev_id=dev_id, pid=pid, pid_start=holders.start_time(pid),
                table="0 8 sworndisk /d /m 0 true", data="/d", meta="/m", size=4096,
                recoverable=False, queues=1, depth=64, log="/x.log")
    base.update(kw)
    return state.DeviceState(**base)


def test_state_roundtrip_and_listing(run_dir):
    for i in (5, 2):
        state.save(make_state(dev_id=i))
    assert [s.dev_id for s in state.load_all()] == [2, 5]
    st = state.load(5)
    assert st == make_state(dev_id=5, started=st.started) and st.dev_path == "/dev/ublkb5"
    assert oct(os.stat(state.state_path(5)).st_mode & 0o777) == "0o644"
    state.remove(5, expect_pid=os.getpid() + 1)          # not the owner: kept
    assert state.load(5) is not None
    state.remove(5)
    assert state.load(5) is None and [s.dev_id for s in state.load_all()] == [2]


def test_state_ignores_garbage(run_dir):
    run_dir.mkdir()
    (run_dir / "7.json").write_text("{not json")
    (run_dir / "notes.json").write_text("{}")
    assert state.load_all() == []


# --- CLI errors ---------------------------------------------------------------------------

def test_cli_bad_table(capsys):
    code, out, err = run_cli(capsys, "add", "0 8 sworndisk a b 0 sometimes")
    assert code == ExitCode.USAGE and err.startswith("sworndisk-ublk: error: bad table")
    assert len(err.strip().splitlines()) == 1 and out == ""


def test_cli_key_on_command_line(capsys):
    code, _, err = run_cli(capsys, "add", "0", "8", "sworndisk", "a", "b", SECRET, "force")
    assert code == ExitCode.USAGE and "--key-file" in err and SECRET not in err


def test_cli_missing_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "add", f"0 8 sworndisk {tmp_path}/no-data {tmp_path}/m 0 true")
    assert code == ExitCode.NOT_FOUND
    assert f"sworndisk-ublk: error: data device {tmp_path}/no-data: no such file" in err


def test_cli_table_from_stdin(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"0 8 sworndisk {tmp_path}/x {tmp_path}/y 0 true\n"))
    code, _, err = run_cli(capsys, "add", "-")
    assert code == ExitCode.NOT_FOUND and "no-such" not in err and f"{tmp_path}/x" in err


def test_cli_no_driver(capsys, images, tmp_path, monkeypatch):
    monkeypatch.setattr(uapi, "UBLK_CONTROL_PATH", str(tmp_path / "no-ublk-control"))
    data, meta = images
    code, _, err = run_cli(capsys, "add", f"0 8 sworndisk {data} {meta} 0 force")
    assert code == ExitCode.NOT_FOUND
    assert err == ("sworndisk-ublk: error: the ublk driver is not available (no "
                   "/dev/ublk-control): run 'modprobe ublk_drv' as root; the kernel needs "
                   "CONFIG_BLK_DEV_UBLK=m or =y (Linux 6.0 or later)\n")


def test_cli_not_root(capsys, images, fake_driver, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    data, meta = images
    for argv in (["add", f"0 8 sworndisk {data} {meta} 0 force"], ["del", "-n", "0"],
                 ["recover", "-n", "0"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == ExitCode.PERMISSION and "root" in err, argv


def test_del_refuses_a_device_in_use_and_leaves_its_server_alone(capsys, fake_driver,
                                                                monkeypatch):
    """The policy is the CLI's (the shim stops whatever it is told to): while anything
    uses the device, `del` says who in one line, exits BUSY and signals no server."""
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(ctrl, "device_exists", lambda dev_id: dev_id == 7)
    asked = []

    def users(path):
        asked.append(path)
        return ["mounted on /mnt", "open by pid 123 (dd)"]

    monkeypatch.setattr(holders, "block_users", users)
    server = subprocess.Popen(["sleep", "60"])
    try:
        state.save(make_state(dev_id=7, pid=server.pid))
        code, out, err = run_cli(capsys, "del", "/dev/ublkb7")
        assert (code, out) == (ExitCode.BUSY, "") and asked == ["/dev/ublkb7"]
        assert err == ("sworndisk-ublk: error: /dev/ublkb7 is busy: mounted on /mnt, open by "
                       "pid 123 (dd); unmount or close it first\n")
        assert server.poll() is None and state.load(7) is not None
    finally:
        server.kill()
        server.wait()


def test_cli_usage_errors_are_one_line(capsys):
    code, _, err = run_cli(capsys, "del")
    assert code == ExitCode.USAGE and err.startswith("sworndisk-ublk: error:")
    assert err.count("\n") == 1
    code, _, err = run_cli(capsys, "frobnicate")
    assert code == ExitCode.USAGE and err.count("\n") == 1
    code, _, err = run_cli(capsys, "add", "--crypto-workers", "-1", "x")
    assert code == ExitCode.USAGE and err.count("\n") == 1 and "--crypto-workers" in err
    assert err.endswith("(see 'sworndisk-ublk add --help')\n")
    code, _, err = run_cli(capsys, "stats", "--bogus")
    assert code == ExitCode.USAGE and err == ("sworndisk-ublk: error: unrecognized arguments: "
                                              "--bogus (see 'sworndisk-ublk stats --help')\n")
    code, _, err = run_cli(capsys, "check", "d.img", "m.img", "--bogus")   # check's own code
    assert code == 8 and err.count("\n") == 1 and "sworndisk-ublk check --help" in err


def test_cli_del_and_recover_unknown_device(capsys, fake_driver):
    code, _, err = run_cli(capsys, "del", "-n", "42")
    assert code == ExitCode.NOT_FOUND and "no SwornDisk device 42" in err
    code, _, err = run_cli(capsys, "recover", "-n", "42")
    assert code == ExitCode.NOT_FOUND


def test_cli_recover_needs_recoverable(capsys, fake_driver):
    state.save(make_state(dev_id=4, pid=2 ** 22 + 1, recoverable=False))
    code, _, err = run_cli(capsys, "recover", "-n", "4")
    assert code == ExitCode.USAGE and "--recoverable" in err
    state.save(make_state(dev_id=4, recoverable=True))       # our own pid: "alive"
    code, _, err = run_cli(capsys, "recover", "-n", "4")
    assert code == ExitCode.BUSY and "nothing to recover" in err


def test_cli_list_cleans_stale_state(capsys, run_dir):
    state.save(make_state(dev_id=1))                          # alive (our pid)
    state.save(make_state(dev_id=2, pid=2 ** 22 + 7))         # dead and no device: stale
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and "/dev/ublkb1" in out and "alive" in out and "ublkb2" not in out
    assert state.load(2) is None
    code, out, _ = run_cli(capsys, "list", "--json")
    rows = json.loads(out)
    assert [(r["dev_id"], r["state"], r["recoverable"]) for r in rows] == [(1, "alive", False)]
    assert set(rows[0]) >= {"dev", "pid", "state", "data", "meta", "size", "recoverable"}


def test_cli_meta_too_small(capsys, tmp_path, fake_driver):
    data, meta = tmp_path / "d", tmp_path / "m"
    data.write_bytes(b"")
    os.truncate(data, 64 * MiB)
    meta.write_bytes(bytes(4096))
    code, _, err = run_cli(capsys, "add", "--key-file", "/nonexistent",
                           f"0 {64 * MiB // 512} sworndisk {data} {meta} 0 force")
    assert code == ExitCode.USAGE and "too small" in err and "at least" in err
    assert meta.read_bytes() == bytes(4096)                   # nothing written


# --- volume (engine rules) ----------------------------------------------------------------

def sized_images(tmp_path, data_size=32 * MiB):
    data, meta = str(tmp_path / "d.img"), str(tmp_path / "m.img")
    need = SwornDisk.min_meta_size(data_size, data_size // 4096)
    for p, n in ((data, data_size), (meta, (need + 4095) // 4096 * 4096)):
        with open(p, "wb") as f:
            f.truncate(n)
    return data, meta


def test_format_rules_and_wrong_key(tmp_path):
    from sworndisk_ublk import volume
    data, meta = sized_images(tmp_path)
    sectors = 32 * MiB // 512
    key_a = keys.KeySource("a", key=bytes(16))
    key_b = keys.KeySource("b", key=b"\1" * 16)

    def table(fmt):
        return tbl.parse_table(f"0 {sectors} sworndisk {data} {meta} 0 {fmt}")

    with pytest.raises(CliError) as e:
        volume.open_disk(table("false"), key_a)
    assert "holds no SwornDisk" in e.value.message
    assert volume.will_format(table("true"))
    disk = volume.open_disk(table("true"), key_a)
    disk.write(3, b"x" * 4096)
    disk.close()
    assert not volume.will_format(table("true"))
    for fmt in ("true", "false"):        # a wrong key is reported, never "repaired"
        with pytest.raises(CliError) as e:
            volume.open_disk(table(fmt), key_b)
        assert e.value.code == ExitCode.KEY and "wrong key" in e.value.message
    disk = volume.open_disk(table("false"), key_a)
    assert disk.read(3, 1) == b"x" * 4096
    disk.close()
    with pytest.raises(CliError) as e:
        volume.open_disk(tbl.parse_table(f"0 {sectors - 8} sworndisk {data} {meta} 0 false"),
                         key_a)
    assert f"<sectors> {sectors}" in e.value.message


def test_passphrase_disks_open_with_their_passphrase(tmp_path):
    from sworndisk.kdf import KdfParams
    from sworndisk.keyslots import read_header
    from sworndisk_ublk import volume
    data, meta = sized_images(tmp_path)
    t = tbl.parse_table(f"0 {32 * MiB // 512} sworndisk {data} {meta} 0 force")
    opts = volume.OpenOptions(kdf=KdfParams(64, 1))
    volume.open_disk(t, keys.KeySource("passphrase", passphrase=b"pw"), opts=opts).close()
    assert [(s.kind, s.memory_kib) for s in read_header(meta).slots] == [("passphrase", 64)]
    volume.open_disk(t.with_format("false"), keys.KeySource("passphrase", passphrase=b"pw")).close()
    with pytest.raises(CliError) as e:
        volume.open_disk(t.with_format("false"), keys.KeySource("passphrase", passphrase=b"no"))
    assert e.value.code == ExitCode.KEY
    with pytest.raises(CliError) as e:          # a key file on a passphrase-only disk
        volume.open_disk(t.with_format("false"), keys.KeySource("file", key=b"k" * 16))
    assert e.value.code == ExitCode.KEY and "only passphrase key slots" in e.value.message


# --- target -------------------------------------------------------------------------------

def req(op, offset, length, fua=False):
    return types.SimpleNamespace(op=op, offset=offset, length=length, fua=fua, tag=0, q_id=0)


class FakeDisk:
    """Records engine calls; raises `fail` from every call when set."""

    nr_blocks = 16

    def __init__(self):
        self.calls = []
        self.blocks = {}
        self.fail = None

    def _call(self, *call):
        self.calls.append(call)
        if self.fail is not None:
            raise self.fail

    def read(self, lba, n):
        self._call("read", lba, n)
        return b"".join(self.blocks.get(lba + i, bytes(4096)) for i in range(n))

    def write(self, lba, data):
        self._call("write", lba, len(data))
        data = bytes(data)      # like the engine: copied during the call (the shim reuses buf)
        for i in range(len(data) // 4096):
            self.blocks[lba + i] = data[i * 4096:(i + 1) * 4096]

    def flush(self):
        self._call("flush")

    def discard(self, lba, n):
        self._call("discard", lba, n)

    def close(self):
        self._call("close")

    def stats(self):
        return {"calls": len(self.calls)}

    def background_step(self):
        self._call("background")


def test_target_maps_requests_to_engine_calls():
    disk = FakeDisk()
    t = SwornDiskTarget(disk)
    assert t.size == 16 * 4096
    buf = memoryview(bytearray(8192))
    buf[:] = b"a" * 8192
    assert t.handle(req(ublk_shim.OP_WRITE, 4096, 8192, fua=True), buf) == 8192
    out = memoryview(bytearray(8192))
    assert t.handle(req(ublk_shim.OP_READ, 4096, 8192), out) == 8192 and bytes(out) == b"a" * 8192
    assert t.handle(req(ublk_shim.OP_FLUSH, 0, 0), buf) == 0
    assert t.handle(req(ublk_shim.OP_FLUSH, 4095 * 512, 0), buf) == 0     # the sector is garbage
    assert t.handle(req(ublk_shim.OP_DISCARD, 8192, 4096), buf) == 0
    assert t.handle(req(ublk_shim.OP_WRITE_ZEROES, 0, 4096), buf) == 0
    assert t.handle(req(ublk_shim.OP_READ, 512, 4096), out) == -errno.EINVAL
    assert disk.calls == [("write", 1, 8192), ("flush",), ("read", 1, 2), ("flush",),
                          ("flush",), ("discard", 2, 1), ("discard", 0, 1)]
    t.idle()
    assert disk.calls[-1] == ("background",)
    t.close()
    t.close()
    assert disk.calls.count(("close",)) == 1


def test_target_error_mapping(caplog):
    disk = FakeDisk()
    t = SwornDiskTarget(disk)
    buf = memoryview(bytearray(4096))
    for exc, res in ((IntegrityError("mac"), -errno.EIO), (NoSpaceError("full"), -errno.ENOSPC),
                     (OSError(errno.EROFS, "ro"), -errno.EROFS), (KeyError("x"), -errno.EIO),
                     (KeyError("y"), -errno.EIO)):
        disk.fail = exc
        assert t.handle(req(ublk_shim.OP_WRITE, 0, 4096), buf) == res
    assert sum("KeyError" in r.getMessage() for r in caplog.records) == 1   # logged once
    assert t.handle(req(99, 0, 4096), buf) == -errno.EOPNOTSUPP


def test_target_without_background_hook_is_idle():
    t = SwornDiskTarget(types.SimpleNamespace(nr_blocks=1, close=lambda: None))
    t.idle()                                  # no background_step: nothing to do


def test_target_with_the_real_engine():
    data = MemoryDevice(32 * MiB)
    meta = MemoryDevice((SwornDisk.min_meta_size(32 * MiB) + 4095) // 4096 * 4096)
    t = SwornDiskTarget(SwornDisk.create(data, meta, bytes(16)))
    buf = memoryview(bytearray(b"z" * 8192))
    assert t.handle(req(ublk_shim.OP_WRITE, 0, 8192), buf) == 8192
    buf[:] = bytes(8192)                      # the shim reuses its buffer
    out = memoryview(bytearray(8192))
    assert t.handle(req(ublk_shim.OP_READ, 0, 8192), out) == 8192 and bytes(out) == b"z" * 8192
    assert t.handle(req(ublk_shim.OP_DISCARD, 0, 4096), buf) == 0
    t.handle(req(ublk_shim.OP_READ, 0, 8192), out)
    assert bytes(out) == bytes(4096) + b"z" * 4096
    assert isinstance(t.stats(), dict)
    t.close()


# --- daemon (fake ublk server, real fork/setsid/pipe/state/signals) -----------------------

class FakeUblkServer:
    """Stands in for ublk_shim.UblkServer inside the forked server process."""

    next_id = 7
    fail_add = None

    def __init__(self, target, dev_id=-1, nr_queues=1, queue_depth=64, max_io_bytes=0,
                 recoverable=False, read_only=False):
        self.target = target
        self.stopped = threading.Event()

    def add(self):
        if FakeUblkServer.fail_add:
            raise FakeUblkServer.fail_add
        return FakeUblkServer.next_id

    def start(self):
        pass

    def wait(self):
        self.stopped.wait()

    def stop(self):
        if not self.stopped.is_set():
            self.stopped.set()
            self.target.close()

    def delete(self, *, timeout=10.0, wait=True):
        self.stop()


def test_daemon_lifecycle(capsys, tmp_path, fake_driver, monkeypatch, run_dir):
    data, meta = sized_images(tmp_path)
    monkeypatch.setattr(ublk_shim, "UblkServer", FakeUblkServer)
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY_HEX + "\n")
    table = f"0 {32 * MiB // 512} sworndisk {data} {meta} 0 force"
    code, out, err = run_cli(capsys, "add", "--key-file", str(keyfile), table)
    assert code == 0, err
    assert out.strip() == "/dev/ublkb7" and "usable capacity" in err
    st = state.load(7)
    assert st.server_alive() and st.pid != os.getpid() and st.table.endswith(" 0 force")
    assert KEY_HEX not in (run_dir / "7.json").read_text()
    assert KEY_HEX not in (run_dir / "7.log").read_text()
    code, out, _ = run_cli(capsys, "list", "--json")
    assert json.loads(out)[0]["state"] == "alive"
    code, out, _ = run_cli(capsys, "stats", "-n", "7", "--json")
    assert code == 0 and isinstance(json.loads(out), dict)
    code, _, err = run_cli(capsys, "del", "-n", "7")
    assert code == 0, err
    assert state.load(7) is None and not st.server_alive()
    assert "deleted" in (run_dir / "7.log").read_text()

    # The child opens the engine, so a wrong key is reported by `add` itself.
    keyfile.write_text("ff" * 16)
    code, out, err = run_cli(capsys, "add", "--key-file", str(keyfile),
                             table.replace("force", "false"))
    assert code == ExitCode.KEY and "wrong key" in err and out == ""
    assert state.load_all() == []


def test_daemon_reports_shim_errors(capsys, tmp_path, fake_driver, monkeypatch):
    data, meta = sized_images(tmp_path)
    monkeypatch.setattr(ublk_shim, "UblkServer", FakeUblkServer)
    monkeypatch.setattr(FakeUblkServer, "fail_add", OSError(errno.EBUSY, "Device or resource busy"))
    keyfile = tmp_path / "key"
    keyfile.write_bytes(bytes(32))
    code, _, err = run_cli(capsys, "add", "--key-file", str(keyfile),
                           f"0 {32 * MiB // 512} sworndisk {data} {meta} 0 force")
    assert code == ExitCode.BUSY and "busy" in err


# --- one owner per disk, force on an existing SwornDisk (issue 7) -------------------------

SECTORS = 32 * MiB // 512
QUESTION = "Are you sure? (Type 'yes' in capital letters): "


@pytest.fixture
def served(tmp_path, fake_driver, monkeypatch):
    """`add` runs for real up to the kernel: root, a fake driver, a fake ublk server (forked
    children inherit them). Gives the key file; a device left behind is deleted."""
    monkeypatch.setattr(ublk_shim, "UblkServer", FakeUblkServer)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY_HEX + "\n")
    yield str(keyfile)
    if state.load(FakeUblkServer.next_id) is not None:
        assert cli.main(["del", "-n", str(FakeUblkServer.next_id)]) == 0


def one_error_line(output: str) -> str:
    lines = [ln for ln in output.replace("\r", "").splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sworndisk-ublk: error: "), output
    return lines[0]


def _cli_child(argv, start_fd=None):
    """Body of a forked CLI run: stdio on fds 0-2 (not pytest's capture), exit with the
    CLI's code; with `start_fd`, wait for one byte on it first (a starting gun)."""
    code = 70
    try:
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        if start_fd is not None:
            os.read(start_fd, 1)
        code = cli.main(list(argv))
    except BaseException:              # noqa: BLE001 - the test reads it
        traceback.print_exc()
    finally:
        os._exit(code)


def start_detached(*argv, start_fd=None):
    """Fork a CLI run with no controlling terminal (setsid), stdin /dev/null and its
    output on a pipe; returns (pid, read end)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(w, 1)
        os.dup2(w, 2)
        os.close(null)
        os.close(w)         # else the server it forks keeps the pipe open: no EOF here
        _cli_child(argv, start_fd)
    os.close(w)
    return pid, r


def finish(pid, r):
    """(exit code, output) of a started CLI run."""
    with os.fdopen(r) as f:
        out = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), out


def run_detached(*argv):
    return finish(*start_detached(*argv))


def run_on_terminal(answer, *argv, timeout=120.0):
    """Run the CLI on a new pseudo-terminal (its controlling terminal) and type `answer`
    when it asks; with `answer` None, a question kills the run. (exit code, output)."""
    pid, master = pty.fork()
    if pid == 0:
        _cli_child(argv)
    out, status = b"", None
    deadline = time.monotonic() + timeout
    while status is None and time.monotonic() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            try:
                out += os.read(master, 4096)
            except OSError:            # EIO: nothing has the terminal open any more
                pass
            if QUESTION.encode() in out and b"\n" not in out.split(QUESTION.encode())[-1]:
                if answer is None:
                    os.kill(pid, signal.SIGKILL)
                else:
                    os.write(master, answer.encode() + b"\n")
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
    if status is None:
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
    while select.select([master], [], [], 0)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace").replace("\r", "")


@pytest.fixture
def existing(tmp_path):
    """Images holding a SwornDisk whose block 3 is written."""
    data, meta = sized_images(tmp_path)
    with SwornDisk.create(data, meta, bytes.fromhex(KEY_HEX)) as disk:
        disk.write(3, b"x" * 4096)
    return data, meta


def block3(data, meta) -> bytes:
    with SwornDisk.open(data, meta, bytes.fromhex(KEY_HEX)) as disk:
        return disk.read(3, 1)


def force_table(data, meta) -> str:
    return f"0 {SECTORS} sworndisk {data} {meta} 0 force"


def test_cli_add_of_an_owned_disk_is_one_busy_line(capsys, tmp_path, served):
    data, meta = sized_images(tmp_path)
    owner = own("create", data, meta)
    try:
        before = digest(data, meta)
        for form, (d, m) in path_forms(tmp_path, data, meta).items():
            code, out, err = run_cli(capsys, "add", "--yes", "--key-file", served,
                                     force_table(d, m))
            line = one_error_line(err)
            assert code == ExitCode.BUSY and out == "", (form, err)
            assert line.startswith(f"sworndisk-ublk: error: data device {d} "), line
            assert f"is in use: locked by pid {owner.pid} " in line, line
        assert digest(data, meta) == before, "a refused add wrote to the images"
    finally:
        owner.release()
    with SwornDisk.open(data, meta, bytes.fromhex(KEY_HEX)) as disk:
        assert mark_of(disk.read(0, 1)) == "owner"


def test_cli_add_refused_by_its_server_when_the_owner_came_after_the_check(
        capsys, tmp_path, served, monkeypatch):
    """The early check is a hint; the server's open is the lock that counts: an owner that
    appears between the two still wins, and `add` says so in one line."""
    monkeypatch.setattr(commands, "check_unowned", lambda path, what: None)
    data, meta = sized_images(tmp_path)
    owner = own("create", data, meta)
    try:
        before = digest(data, meta)
        code, out, err = run_cli(capsys, "add", "--yes", "--key-file", served,
                                 force_table(data, meta))
        line = one_error_line(err)
        assert code == ExitCode.BUSY and out == "" and state.load_all() == [], err
        assert f"data device {data} is in use: locked by pid {owner.pid} " in line, line
        assert digest(data, meta) == before
    finally:
        owner.release()


def test_racing_adds_exactly_one_wins(tmp_path, served):
    data, meta = sized_images(tmp_path)
    forms = path_forms(tmp_path, data, meta)
    gun_r, gun_w = os.pipe()
    runs = [start_detached("add", "--yes", "--key-file", served, force_table(*forms[form]),
                           start_fd=gun_r) for form in ("same path", "symlink")]
    os.close(gun_r)
    os.write(gun_w, b"go")                 # both start at once
    os.close(gun_w)
    results = [finish(*run) for run in runs]
    assert sorted(code for code, _ in results) == [0, ExitCode.BUSY], results
    winner, loser = sorted(results, key=lambda r: r[0])
    assert winner[1].startswith("/dev/ublkb7\n"), winner
    assert "is in use" in one_error_line(loser[1])
    assert cli.main(["del", "-n", "7"]) == 0
    SwornDisk.open(data, meta, bytes.fromhex(KEY_HEX)).close()


def test_force_on_a_sworndisk_without_a_terminal_needs_yes(served, existing):
    data, meta = existing
    before = digest(meta)
    code, out = run_detached("add", "--key-file", served, force_table(data, meta))
    line = one_error_line(out)
    assert code == ExitCode.USAGE and "no terminal" in line and "--yes" in line, out
    assert digest(meta) == before and block3(data, meta) == b"x" * 4096
    code, out = run_detached("add", "--yes", "--key-file", served, force_table(data, meta))
    assert code == 0 and QUESTION not in out, out
    assert cli.main(["del", "-n", "7"]) == 0
    assert block3(data, meta) == bytes(4096)           # a new, empty disk


@pytest.mark.parametrize("answer", ["yes", "", "YES please"])
def test_force_on_a_sworndisk_not_confirmed_on_the_terminal(served, existing, answer):
    data, meta = existing
    before = digest(meta)
    code, out = run_on_terminal(answer, "add", "--key-file", served, force_table(data, meta))
    assert f"This will overwrite the SwornDisk on {meta} irrevocably" in out, out
    assert QUESTION in out and code == ExitCode.FAILED, out
    assert "sworndisk-ublk: error: not confirmed" in out and "Traceback" not in out, out
    assert digest(meta) == before and block3(data, meta) == b"x" * 4096


def test_force_on_a_sworndisk_confirmed_with_YES_on_the_terminal(served, existing):
    data, meta = existing
    code, out = run_on_terminal("YES", "add", "--key-file", served, force_table(data, meta))
    assert QUESTION in out and code == 0 and "/dev/ublkb7" in out, out
    assert cli.main(["del", "-n", "7"]) == 0
    assert block3(data, meta) == bytes(4096)


def test_force_asks_nothing_with_yes_or_on_a_blank_device(served, existing, tmp_path):
    data, meta = existing
    code, out = run_on_terminal(None, "add", "--yes", "--key-file", served,
                                force_table(data, meta))
    assert code == 0 and QUESTION not in out, out
    assert cli.main(["del", "-n", "7"]) == 0
    blank = tmp_path / "blank"
    blank.mkdir()
    data, meta = sized_images(blank)
    code, out = run_on_terminal(None, "add", "--key-file", served, force_table(data, meta))
    assert code == 0 and QUESTION not in out, out
