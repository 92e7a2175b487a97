"""Native tests of disk names, the tab file and start/stop, del --force/--deferred (issue 16).

`add` runs for real up to the kernel (tests/test_cli.py's `served`: root, a fake driver,
a fake ublk server in the forked server process); the links go to a temporary directory
(SWORNDISK_LINK_DIR). The real device and kernel side is tests/e2e/test_boot.py.
"""
from __future__ import annotations

import errno
import json
import os

import pytest

from sworndisk import SwornDisk, keyslots
from sworndisk_ublk import boot, names, state, tab
from sworndisk_ublk.errors import CliError, ExitCode

from .test_cli import (FakeUblkServer, KEY_HEX, fake_driver, one_error_line, run_cli,  # noqa: F401
                       run_dir, served, sized_images)

MiB = 1 << 20
SECTORS = 32 * MiB // 512


@pytest.fixture(autouse=True)
def link_dir(tmp_path, monkeypatch):
    d = tmp_path / "dev-sworndisk"
    monkeypatch.setenv("SWORNDISK_LINK_DIR", str(d))
    return d


# --- names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["home", "a", "x" * 64, "ü" * 32, "data_1.2-b", "é-_.:@+"])
def test_valid_names(name):
    assert names.name_problem(name) is None and names.validate_name(name) == name


@pytest.mark.parametrize("name,why", [
    ("", "empty"), ("x" * 65, "longer than 64 bytes"), ("ü" * 33, "longer than 64 bytes"),
    ("a/b", "'/'"), ("a b", "whitespace"), ("a\tb", "whitespace"), ("a\nb", "whitespace"),
    (".hidden", "starts with '.'"), ("..", "starts with '.'"), ("-x", "starts with '-'")])
def test_invalid_names_are_one_line(name, why):
    assert why in names.name_problem(name)
    with pytest.raises(CliError) as e:
        names.validate_name(name)
    assert e.value.code == ExitCode.USAGE and "\n" not in e.value.message.replace(repr(name), "")


def test_add_with_a_bad_name_is_refused_before_anything(capsys, tmp_path, fake_driver):
    code, out, err = run_cli(capsys, "add", "--name", "a/b", "--key-file", "/nonexistent",
                             f"0 {SECTORS} sworndisk /nonexistent/d /nonexistent/m 0 false")
    assert code == ExitCode.USAGE and "holds a '/'" in one_error_line(err) and out == ""


def test_stale_links_are_replaced_never_followed(link_dir, tmp_path):
    link_dir.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(str(victim), link_dir / "home")          # a stale link pointing at a file
    os.symlink("/dev/ublkb99", link_dir / "dangling")   # a dangling one
    assert names.make_link("home", "/dev/ublkb3") == str(link_dir / "home")
    assert names.make_link("dangling", "/dev/ublkb4") == str(link_dir / "dangling")
    assert os.readlink(link_dir / "home") == "/dev/ublkb3"
    assert os.readlink(link_dir / "dangling") == "/dev/ublkb4"
    assert victim.read_text() == "precious" and victim.is_file()
    assert sorted(os.listdir(link_dir)) == ["dangling", "home"]      # no temp left behind
    # remove_link only removes a link to the device it is told about.
    names.remove_link("home", "/dev/ublkb9")
    assert os.readlink(link_dir / "home") == "/dev/ublkb3"
    names.remove_link("home", "/dev/ublkb3")
    assert not os.path.lexists(link_dir / "home")
    # Something that is not a symlink is not ours to replace.
    (link_dir / "file").write_text("x")
    with pytest.raises(CliError) as e:
        names.make_link("file", "/dev/ublkb5")
    assert e.value.code == ExitCode.BUSY and (link_dir / "file").read_text() == "x"


def test_link_path_names_resolve(link_dir):
    assert names.name_of_path(f"{link_dir}/home") == "home"
    assert names.name_of_path(f"{link_dir}/../home") is None
    assert names.name_of_path("/dev/ublkb0") is None


# --- add --name, list, status/stats/del by name ----------------------------------------------

def _add(capsys, keyfile, data, meta, *extra, fmt="force"):
    return run_cli(capsys, "add", "--key-file", keyfile, *extra,
                   f"0 {SECTORS} sworndisk {data} {meta} 0 {fmt}")


def test_named_disk_lifecycle(capsys, tmp_path, served, link_dir, run_dir):
    data, meta = sized_images(tmp_path)
    code, out, err = _add(capsys, served, data, meta, "--name", "home")
    assert code == 0, err
    dev = out.strip()
    assert os.readlink(link_dir / "home") == dev and f"({link_dir}/home)" in err
    assert state.load(FakeUblkServer.next_id).name == "home"
    code, out, _ = run_cli(capsys, "list", "--json")
    assert json.loads(out)[0]["name"] == "home"
    code, out, _ = run_cli(capsys, "list")
    assert out.splitlines()[0].startswith("NAME") and out.splitlines()[1].startswith("home ")
    for form in ("home", f"{link_dir}/home", dev, str(FakeUblkServer.next_id)):
        code, out, err = run_cli(capsys, "stats", form, "--json")
        assert code == 0 and isinstance(json.loads(out), dict), (form, err)

    # A second disk may not take a live name: refused before anything is opened.
    (tmp_path / "two").mkdir()
    data2, meta2 = sized_images(tmp_path / "two")
    code, out, err = _add(capsys, "/nonexistent-key", data2, meta2, "--name", "home")
    assert code == ExitCode.BUSY and "in use by" in one_error_line(err) and out == ""

    code, _, err = run_cli(capsys, "del", "home")
    assert code == 0, err
    assert not os.path.lexists(link_dir / "home") and state.load_all() == []
    code, _, err = run_cli(capsys, "del", "home")
    assert code == ExitCode.NOT_FOUND and "no SwornDisk named 'home'" in one_error_line(err)


def test_a_stale_name_is_taken_over(capsys, tmp_path, served, link_dir, run_dir):
    """A killed server's state (its device gone) and dangling link do not block the name."""
    link_dir.mkdir()
    os.symlink("/dev/ublkb42", link_dir / "home")
    state.save(state.DeviceState(dev_id=42, pid=2 ** 22 + 5, pid_start=1, table="t",
                                 data="d", meta="m", size=4096, recoverable=False, queues=1,
                                 depth=1, log="-", name="home"))
    data, meta = sized_images(tmp_path)
    code, out, err = _add(capsys, served, data, meta, "--name", "home")
    assert code == 0, err
    assert os.readlink(link_dir / "home") == out.strip() and state.load(42) is None


def test_del_force_and_deferred_without_users(capsys, tmp_path, served, link_dir, run_dir):
    """Natively nothing can hold the (fake) device: --deferred deletes at once, --force
    goes through the server's forced path (its log says so)."""
    data, meta = sized_images(tmp_path)
    for how in ("--deferred", "--force"):
        code, out, err = _add(capsys, served, data, meta, "--name", "home",
                              fmt="force" if how == "--deferred" else "false")
        assert code == 0, err
        log = state.load(FakeUblkServer.next_id).log
        code, _, err = run_cli(capsys, "del", how, f"{link_dir}/home")
        assert code == 0, err
        assert state.load_all() == [] and not os.path.lexists(link_dir / "home")
        assert ("forced removal" in open(log).read()) == (how == "--force")
    code, _, err = run_cli(capsys, "del", "--force", "--deferred", "home")
    assert code == ExitCode.USAGE


def test_read_only_never_formats(capsys, tmp_path, served):
    data, meta = sized_images(tmp_path)
    code, out, err = _add(capsys, served, data, meta, "--read-only")
    assert code == ExitCode.USAGE and "never formatted" in one_error_line(err)
    code, out, err = _add(capsys, served, data, meta)
    assert code == 0, err
    assert run_cli(capsys, "del", out.strip())[0] == 0
    before = [open(p, "rb").read() for p in (data, meta)]
    code, out, err = _add(capsys, served, data, meta, "--read-only", fmt="false")
    assert code == 0 and "read-only" in err, err
    code, listed, _ = run_cli(capsys, "list", "--json")
    assert json.loads(listed)[0]["read_only"] is True
    assert run_cli(capsys, "del", out.strip())[0] == 0
    assert [open(p, "rb").read() for p in (data, meta)] == before


# --- the tab file -----------------------------------------------------------------------------

TAB = """\
# name  data        meta          key          options
home    /dev/vdb    /dev/vdc      /etc/home.key  recoverable,anchor=/var/lib/a,queues=2,depth=32
ro      /d/data     UUID=0A1B2C3D-0000-4000-8000-000000000001  -   read-only,noauto,crypto-workers=3
plain   /d/x /d/y /k   # no options, a trailing comment

dash    /d/x2 /d/y2 /k -
"""


def test_tab_parses_every_option_and_comments():
    t = tab.parse_tab(TAB, "/etc/sworndisktab")
    assert t.errors == []
    home, ro, plain, dash = t.entries
    assert (home.lineno, home.name, home.data, home.meta, home.key) == (
        2, "home", "/dev/vdb", "/dev/vdc", "/etc/home.key")
    assert home.options == tab.TabOptions(recoverable=True, anchor="/var/lib/a", queues=2,
                                          depth=32)
    assert ro.meta == "UUID=0a1b2c3d-0000-4000-8000-000000000001" and ro.passphrase
    assert ro.options == tab.TabOptions(read_only=True, noauto=True, crypto_workers=3)
    assert plain.options == tab.TabOptions() == dash.options and plain.lineno == 4
    assert dash.where == "/etc/sworndisktab:6" and t.find("plain") is plain


@pytest.mark.parametrize("line,why", [
    ("a /d /m", "3 fields, expected 4 or 5"),
    ("a /d /m /k opt extra", "6 fields"),
    ("-a /d /m /k", "starts with '-'"),
    ("a" * 65 + " /d /m /k", "longer than 64 bytes"),
    ("a d /m /k", "DATA must be an absolute path"),
    ("a /d m /k", "META must be an absolute path"),
    ("a /d /m k", "KEY (a key file, or -) must be an absolute path"),
    ("a UUID=x /m /k", "DATA cannot be named by UUID="),
    ("a /d UUID= /k", "UUID= needs the uuid"),
    ("a /d /m /k bogus", "unknown option 'bogus'"),
    ("a /d /m /k noauto=1", "option noauto takes no value"),
    ("a /d /m /k read-only,read-only", "option read-only given twice"),
    ("a /d /m /k queues=0", "queues= must be a positive number"),
    ("a /d /m /k depth=x", "depth= must be a positive number"),
    ("a /d /m /k crypto-workers=-1", "crypto-workers= must be a positive number"),
    ("a /d /m /k anchor=", "option anchor needs a value"),
    ("a /d /m /k anchor=rel", "anchor= must be an absolute path"),
    ("a /d /m /k recoverable,,noauto", "empty option"),
])
def test_bad_lines_are_reported_with_their_number(line, why):
    t = tab.parse_tab(f"# comment\ngood /d /m /k\n{line}\nlast /d2 /m2 /k\n", "/t")
    assert [e.name for e in t.entries] == ["good", "last"]
    assert len(t.errors) == 1 and str(t.errors[0]).startswith("/t:3: "), t.errors
    assert why in str(t.errors[0])


def test_a_name_on_two_lines_is_an_error_on_the_second():
    t = tab.parse_tab("a /d /m /k\nb /d2 /m2 /k\na /d3 /m3 /k\n", "/t")
    assert [e.name for e in t.entries] == ["a", "b"]
    assert [str(e) for e in t.errors] == ["/t:3: the name 'a' is already used on line 1"]


def test_uuid_is_found_among_block_devices(tmp_path):
    """UUID= against a fake /sys/class/block and /dev of image files (natively there is no
    block device to format); ublk devices and empty devices are not even opened."""
    sys_dir, dev_dir = tmp_path / "sys", tmp_path / "dev"
    sys_dir.mkdir(), dev_dir.mkdir()
    data, meta = sized_images(tmp_path)
    SwornDisk.create(data, meta, key=bytes.fromhex(KEY_HEX)).close()
    text = keyslots.read_header(meta).uuid
    for name, src, size in (("vdb", data, 1), ("vdc", meta, 1), ("ublkb0", meta, 1),
                            ("sr0", None, 0)):
        (sys_dir / name).mkdir()
        (sys_dir / name / "size").write_text(f"{size}\n")
        if src:
            os.symlink(src, dev_dir / name)
        else:
            (dev_dir / name).write_bytes(b"")
    found = tab.block_devices(str(sys_dir), str(dev_dir))
    assert found == [str(dev_dir / "vdb"), str(dev_dir / "vdc")]
    assert tab.find_uuid(f"UUID={text.upper()}", found) == str(dev_dir / "vdc")
    entry = tab.parse_tab(f"a {data} UUID={text} /k\n", "/t").entries[0]
    assert tab.resolve(entry, found) == (data, str(dev_dir / "vdc"))
    with pytest.raises(CliError) as e:
        tab.find_uuid("UUID=0a1b2c3d-0000-4000-8000-000000000001", found)
    assert e.value.code == ExitCode.NOT_FOUND
    os.symlink(meta, dev_dir / "vdd")
    with pytest.raises(CliError) as e:
        tab.find_uuid(f"UUID={text}", found + [str(dev_dir / "vdd")])
    assert "several devices" in e.value.message


# --- start / stop -----------------------------------------------------------------------------

@pytest.fixture
def many(served, monkeypatch):
    """Several fake devices at once: each add gets the lowest number without state (the
    fake's fixed number would clash); every one left is deleted afterwards."""
    def add(self):
        n = FakeUblkServer.next_id
        while state.load(n) is not None:
            n += 1
        return n
    monkeypatch.setattr(FakeUblkServer, "add", add)
    yield served
    for st in state.load_all():
        from sworndisk_ublk import cli
        assert cli.main(["del", "-n", str(st.dev_id)]) == 0


def _disk(capsys, served, tmp_path, sub):
    """A formatted disk in tmp_path/sub (added and deleted once)."""
    (tmp_path / sub).mkdir()
    data, meta = sized_images(tmp_path / sub)
    code, out, err = _add(capsys, served, data, meta)
    assert code == 0, err
    assert run_cli(capsys, "del", out.strip())[0] == 0
    return data, meta


def test_start_and_stop_from_a_tab(capsys, tmp_path, many, link_dir):
    served = many
    d1, m1 = _disk(capsys, served, tmp_path, "one")
    d2, m2 = _disk(capsys, served, tmp_path, "two")
    tabfile = tmp_path / "sworndisktab"
    tabfile.write_text(f"# two disks and a bad line\n"
                       f"one {d1} {m1} {served}\n"
                       f"broken {d1}\n"
                       f"two {d2} {m2} {served} noauto,read-only\n"
                       f"asks {d2} {m2} -\n")
    code, out, err = run_cli(capsys, "start", "--all", "--tab", str(tabfile))
    assert code == ExitCode.USAGE, err
    assert f"{tabfile}:3: 2 fields" in err
    # No terminal under pytest: the passphrase line fails alone, with its line number.
    assert f"{tabfile}:5: asks: KEY is - (a passphrase), but there is no terminal" in err
    assert out.splitlines() == [f"{link_dir}/one"]
    assert [s.name for s in state.load_all()] == ["one"]           # two is noauto

    code, out, err = run_cli(capsys, "start", "--tab", str(tabfile), "one", "two")
    assert code == 0, err
    assert f"note: {tabfile}:2: one is already up" in err and out.splitlines() == [
        f"{link_dir}/two"]
    assert {s.name: s.read_only for s in state.load_all()} == {"one": False, "two": True}
    assert os.path.islink(link_dir / "two")

    code, out, err = run_cli(capsys, "start", "--tab", str(tabfile), "nosuch")
    assert code == ExitCode.USAGE and f"{tabfile}: no line for the disk 'nosuch'" in err

    code, out, err = run_cli(capsys, "stop", "--all", "--tab", str(tabfile))
    assert code == ExitCode.USAGE and f"{tabfile}:3: 2 fields" in err       # still reported
    assert "one: stopped" in err and "two: stopped" in err
    assert state.load_all() == [] and os.listdir(link_dir) == []
    code, out, err = run_cli(capsys, "stop", "--tab", str(tabfile), "one")
    assert code == 0 and f"note: {tabfile}:2: one is not up" in err


def test_start_needs_names_or_all_and_a_tab(capsys, tmp_path):
    code, _, err = run_cli(capsys, "start")
    assert code == ExitCode.USAGE and "give disk names or --all" in one_error_line(err)
    code, _, err = run_cli(capsys, "stop", "--tab", str(tmp_path / "none"), "--all")
    assert code == ExitCode.NOT_FOUND and "no such file" in one_error_line(err)


def test_tab_options_are_add_keywords():
    """Every option a tab line gives reaches add() under a keyword add() takes."""
    import inspect
    entry = tab.parse_tab("a /d /m /k crypto-workers=4,queues=2,read-only\n", "/t").entries[0]
    kw = boot._add_options(entry)
    assert kw["crypto_workers"] == 4 and kw["queues"] == 2 and kw["name"] == "a"
    assert kw["read_only"] is True
    assert set(kw) <= set(inspect.signature(boot.commands.add).parameters)


# --- the target: read-only and forced removal ------------------------------------------------

def test_read_only_target_and_fail_all(tmp_path):
    """A read-only engine behind the target: reads work, a flush has nothing to do, a write
    that got past the kernel is refused, and nothing reaches the images, not even at close.
    fail_all (del --force) fails every request, reads included."""
    import types

    import ublk_shim
    from sworndisk_ublk.target import SwornDiskTarget

    def req(op, offset, length):
        return types.SimpleNamespace(op=op, offset=offset, length=length, fua=False, tag=0,
                                     q_id=0)
    data, meta = sized_images(tmp_path)
    key = bytes.fromhex(KEY_HEX)
    disk = SwornDisk.create(data, meta, key=key)
    disk.write(0, b"r" * 8192)
    disk.close()
    before = [open(p, "rb").read() for p in (data, meta)]
    t = SwornDiskTarget(SwornDisk.open(data, meta, key=key, read_only=True))
    assert t.read_only
    buf = memoryview(bytearray(8192))
    assert t.handle(req(ublk_shim.OP_READ, 0, 8192), buf) == 8192 and bytes(buf) == b"r" * 8192
    assert t.handle(req(ublk_shim.OP_FLUSH, 0, 0), buf) == 0
    assert t.handle(req(ublk_shim.OP_WRITE, 0, 4096), buf) == -errno.EROFS
    assert t.handle(req(ublk_shim.OP_DISCARD, 0, 4096), buf) == -errno.EROFS
    assert t.handle_batch([(req(ublk_shim.OP_WRITE, 0, 4096), buf),
                           (req(ublk_shim.OP_WRITE, 4096, 4096), buf)]) == [-errno.EROFS] * 2
    t.idle()
    t.fail_all()
    assert t.handle(req(ublk_shim.OP_READ, 0, 4096), buf) == -errno.EIO
    assert t.handle_batch([(req(ublk_shim.OP_READ, 0, 4096), buf)] * 2) == [-errno.EIO] * 2
    t.close()
    assert [open(p, "rb").read() for p in (data, meta)] == before
