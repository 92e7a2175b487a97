"""`sworndisk-ublk resize` as a user runs it, on image files: grow, the one-line refusals
(meta too small, shrink, busy, wrong key) with their exit codes, and `dump`/`check`
showing the new size."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from sworndisk import SwornDisk
from sworndisk.device import create_image
from sworndisk_ublk import cli
from sworndisk_ublk.errors import ExitCode

from .conftest import BS, KEY16, OTHER16

MiB = 1 << 20


@pytest.fixture
def disk(tmp_path):
    """(data, meta, key file) of a 24 MiB disk whose meta device has room to grow."""
    data, meta = str(tmp_path / "data.img"), str(tmp_path / "meta.img")
    create_image(data, 24 * MiB)
    create_image(meta, SwornDisk.min_meta_size(24 * MiB))
    key = tmp_path / "disk.key"
    key.write_bytes(KEY16)
    with SwornDisk.create(data, meta, KEY16) as d:
        d.write(0, b"A" * BS * 4)
        d.write(d.nr_blocks - 1, b"Z" * BS)
    return data, meta, str(key)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def digest(*paths) -> list:
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]


def test_resize_grows_and_dump_check_show_it(capsys, disk):
    data, meta, key = disk
    old_nr = SwornDisk.usable_blocks(24 * MiB)
    os.truncate(data, 64 * MiB)
    os.truncate(meta, 64 * MiB)
    code, out, err = run(capsys, "resize", data, meta, "--key-file", key)
    new_nr = SwornDisk.usable_blocks(64 * MiB)
    assert code == 0 and out == f"{new_nr * 8}\n", (code, out, err)
    assert err.count("\n") == 1 and f"add it with <sectors> {new_nr * 8}" in err
    code, out, _ = run(capsys, "dump", meta, "--json")
    assert code == 0 and json.loads(out)["nr_blocks"] == new_nr
    assert json.loads(out)["data_blocks"] == 16 * 1024
    code, out, _ = run(capsys, "dump", meta)
    assert f"({new_nr} blocks of 4 KiB, {new_nr * 8} sectors)" in out
    code, out, _ = run(capsys, "check", data, meta, "--key-file", key)
    assert code == 0 and "clean" in out and f"{new_nr * 8} sectors" in out, out
    with SwornDisk.open(data, meta, KEY16) as d:
        assert d.nr_blocks == new_nr
        assert d.read(0, 4) == b"A" * BS * 4 and d.read(old_nr - 1, 1) == b"Z" * BS
        d.write(new_nr - 1, b"N" * BS)
    with SwornDisk.open(data, meta, KEY16) as d:
        assert d.read(new_nr - 1, 1) == b"N" * BS
    # Again: nothing to grow, exit 0.
    code, out, err = run(capsys, "resize", data, meta, "--key-file", key, "--json")
    assert code == 0 and json.loads(out)["changed"] is False and "nothing to grow" in err


def test_resize_sectors(capsys, disk):
    data, meta, key = disk
    os.truncate(data, 64 * MiB)
    os.truncate(meta, 64 * MiB)
    before = digest(data, meta)
    code, out, err = run(capsys, "resize", data, meta, "--key-file", key, "--sectors",
                         str(64 * 2048 + 8))
    assert code == ExitCode.USAGE and digest(data, meta) == before
    one_line_error(err, "more than the data device", f"({64 * 2048} sectors)")
    code, out, err = run(capsys, "resize", data, meta, "--key-file", key, "--sectors", "80003")
    assert code == 0 and out == "80000\n", err
    assert "not a multiple of 8" in err
    with SwornDisk.open(data, meta, KEY16) as d:
        assert d.nr_blocks == 10000


def one_line_error(err: str, *words: str) -> None:
    assert err.startswith("sworndisk-ublk: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err


def test_meta_too_small_one_line_and_nothing_changes(capsys, disk):
    data, meta, key = disk
    os.truncate(data, 256 * MiB)
    before = digest(data, meta)
    code, out, err = run(capsys, "resize", data, meta, "--key-file", key)
    assert code == ExitCode.USAGE and out == ""
    one_line_error(err, "meta device", "truncate -s")
    assert digest(data, meta) == before
    needed = int(err.split("needs at least ")[1].split(" bytes")[0])
    mib = err.split("truncate -s ")[1].split("M ")[0]
    assert int(mib) * MiB >= needed > os.path.getsize(meta)
    os.truncate(meta, int(mib) * MiB)               # what the message says to do
    code, out, err = run(capsys, "resize", data, meta, "--key-file", key)
    assert code == 0, err


@pytest.mark.parametrize("how", ["sectors", "data"])
def test_shrink_refused_one_line(capsys, disk, how):
    data, meta, key = disk
    if how == "sectors":
        argv = ("--sectors", "8192")
    else:
        os.truncate(data, 16 * MiB)
        argv = ()
    before = digest(data, meta)
    code, out, err = run(capsys, "resize", data, meta, "--key-file", key, *argv)
    assert code == ExitCode.USAGE
    one_line_error(err, "shrinking is not supported")
    assert digest(data, meta) == before


def test_busy_refused(capsys, disk):
    data, meta, key = disk
    os.truncate(data, 64 * MiB)
    with SwornDisk.open(data, meta, KEY16):
        code, _, err = run(capsys, "resize", data, meta, "--key-file", key)
    assert code == ExitCode.BUSY
    one_line_error(err, "busy")


def test_wrong_key_and_missing_file(capsys, disk, tmp_path):
    data, meta, _ = disk
    other = tmp_path / "other.key"
    other.write_bytes(OTHER16)
    os.truncate(data, 64 * MiB)
    code, _, err = run(capsys, "resize", data, meta, "--key-file", str(other))
    assert code == ExitCode.KEY
    one_line_error(err, "wrong key")
    code, _, err = run(capsys, "resize", str(tmp_path / "nope"), meta, "--key-file", str(other))
    assert code == ExitCode.NOT_FOUND
    one_line_error(err, "no such file")


def test_add_max_sectors_reserves_meta(tmp_path):
    """`add --max-sectors`: the size check and the format it asks of the engine."""
    from sworndisk_ublk.table import parse_table
    from sworndisk_ublk.volume import check_meta_size, growth_limit
    from sworndisk_ublk.errors import CliError
    data, meta = str(tmp_path / "d.img"), str(tmp_path / "m.img")
    create_image(data, 64 * MiB)
    small = SwornDisk.min_meta_size(64 * MiB)
    create_image(meta, small)
    table = parse_table(f"0 {SwornDisk.usable_blocks(64 * MiB) * 8} sworndisk {data} {meta} 0 true")
    max_blocks = growth_limit(table, 4 << 21, True)       # 4 GiB
    assert max_blocks == 1 << 20
    with pytest.raises(CliError) as e:
        check_meta_size(table, max_blocks)
    assert "room to grow to 4.0 GiB" in str(e.value) and e.value.code == ExitCode.USAGE
    with pytest.raises(CliError):
        growth_limit(table, 8, True)                       # less than the table's size
    assert growth_limit(table, 4 << 21, False) is None     # an existing disk: a note
    need = SwornDisk.min_meta_size(64 * MiB, None, None, max_blocks)
    os.truncate(meta, need)
    check_meta_size(table, max_blocks)
    SwornDisk.create(data, meta, KEY16, max_blocks=max_blocks).close()
    os.truncate(data, 1 << 30)
    from sworndisk.resize import grow
    res = grow(data, meta, key=KEY16)
    assert res.changed and not res.moved and os.path.getsize(meta) == need


def test_header_backup_from_before_a_resize_is_refused(capsys, disk, tmp_path):
    """Restoring it would take the disk back to the layout (and state) before the resize."""
    data, meta, key = disk
    backup = str(tmp_path / "hdr")
    assert run(capsys, "header-backup", meta, backup)[0] == 0
    os.truncate(data, 64 * MiB)
    os.truncate(meta, 64 * MiB)
    assert run(capsys, "resize", data, meta, "--key-file", key)[0] == 0
    before = digest(meta)
    code, _, err = run(capsys, "header-restore", meta, backup)
    assert code == ExitCode.USAGE and digest(meta) == before
    one_line_error(err, "before the disk was resized")
