"""The write log of recoverable devices and recover's restore path (issue 11), natively.

A real engine on memory devices sits behind the real SwornDiskTarget; "kill -9" is modelled
by abandoning the engine object without closing it and opening the same devices again (the
engine recovers to its last commit, as after a real crash). The VM test
(tests/e2e/scripts/fsync_recover.py) does the same with ext4, ublk and real kill -9.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import types

import pytest

import ublk_shim
from ublk_shim import ctrl
from sworndisk import MemoryDevice, SwornDisk
from sworndisk_ublk import restore, state, wlog
from sworndisk_ublk.restore import MAX_COMMITS_PER_CALL, RestoreOutcome
from sworndisk_ublk.target import SwornDiskTarget
from sworndisk_ublk.wlog import LogKeys, LogRefused, WriteLog, read_log
from tests.conftest import KEY16, OTHER16, meta_size_for
from tests.test_cli import fake_driver, run_dir  # noqa: F401 - fixtures (run_dir: autouse)

BS = 4096
MiB = 1 << 20


def req(op, offset, length, fua=False):
    return types.SimpleNamespace(op=op, offset=offset, length=length, fua=fua, tag=0, q_id=0)


def block(tag: int, n: int = 1) -> bytes:
    return b"".join((b"%08d/%04d|" % (tag, i)).ljust(BS, b"#") for i in range(n))


class Rig:
    """Engine + target + write log, with a model of every *completed* write and discard."""

    def __init__(self, tmp_path, key=KEY16, name="0.wlog"):
        self.key = key
        self.data = MemoryDevice(32 * MiB)
        self.meta = MemoryDevice(meta_size_for(32 * MiB))
        self.path = str(tmp_path / name)
        self.model: dict = {}
        self._up(SwornDisk.create(self.data, self.meta, key))

    def _up(self, disk, loss: str = "") -> None:
        self.disk = disk
        self.target = SwornDiskTarget(disk)
        self.wlog = WriteLog.create(self.path, LogKeys.of(disk), disk.commit_seq, loss)
        self.target.start_log(self.wlog)

    def write(self, lba: int, data: bytes, fua: bool = False) -> int:
        buf = memoryview(bytearray(data))
        res = self.target.handle(req(ublk_shim.OP_WRITE, lba * BS, len(data), fua), buf)
        buf[:] = bytes(len(data))                   # the shim reuses its buffers at once
        if res == len(data):
            for i in range(len(data) // BS):
                self.model[lba + i] = data[i * BS:(i + 1) * BS]
        return res

    def discard(self, lba: int, n: int) -> int:
        res = self.target.handle(req(ublk_shim.OP_DISCARD, lba * BS, n * BS), memoryview(b""))
        if res == 0:
            for i in range(lba, lba + n):
                self.model.pop(i, None)
        return res

    def flush(self) -> int:
        return self.target.handle(req(ublk_shim.OP_FLUSH, 0, 0), memoryview(b""))

    def crash(self) -> SwornDisk:
        """kill -9: the process's memory is gone, its log file and the devices stay."""
        self.wlog.close()
        return SwornDisk.open(self.data, self.meta, self.key)

    def recover(self) -> RestoreOutcome:
        """What the recovering server does: reopen, restore, log anew, serve."""
        disk = self.crash()
        outcome = restore.restore(disk, self.path)
        self._up(disk, outcome.loss)
        return outcome

    def assert_model(self) -> None:
        lbas = sorted(set(self.model) | {0, 1, 2, 3, 40, 41, 99})
        for lba in lbas:
            assert self.disk.read(lba, 1) == self.model.get(lba, bytes(BS)), f"LBA {lba}"

    def snapshot(self) -> tuple:
        return bytes(self.data.buf), bytes(self.meta.buf)

    def roll_back(self, snap: tuple) -> None:
        self.data.buf[:], self.meta.buf[:] = snap


@pytest.fixture
def rig(tmp_path):
    return Rig(tmp_path)


# --- the log file itself -------------------------------------------------------------------

def test_records_round_trip_and_no_plaintext_in_the_file(rig):
    rig.write(3, block(1, 2))
    rig.discard(40, 2)
    rig.write(7, block(2))
    got = read_log(rig.path, LogKeys.of(rig.disk))
    assert [(e.kind, e.lba, e.nr_blocks) for e in got.entries] == \
        [(b"W", 3, 2), (b"D", 40, 2), (b"W", 7, 1)]
    assert got.entries[0].data == block(1, 2) and got.base == rig.disk.commit_seq
    raw = open(rig.path, "rb").read()
    assert b"00000001/0000|" not in raw and b"#" * 64 not in raw
    assert oct(os.stat(rig.path).st_mode & 0o777) == "0o600"
    assert LogKeys.of(rig.disk).key not in raw


def test_every_completed_write_is_in_the_log_and_a_commit_empties_it(rig):
    keys = LogKeys.of(rig.disk)
    seq = rig.disk.commit_seq
    for i in range(5):
        assert rig.write(i, block(i)) == BS
        assert len(read_log(rig.path, keys).entries) == i + 1
    assert rig.flush() == 0
    assert rig.disk.commit_seq == seq + 1
    after = read_log(rig.path, keys)
    assert after.base == seq + 1 and after.entries == []
    assert rig.write(9, block(9), fua=True) == BS      # FUA commits: nothing left to log
    assert read_log(rig.path, keys).entries == [] and rig.disk.commit_seq == seq + 2


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


@pytest.mark.parametrize("where", ["header-base", "header-tag", "first-record", "last-tag"])
def test_a_flipped_bit_anywhere_refuses_the_whole_log(rig, where):
    rig.write(1, block(1))
    rig.write(2, block(2))
    size = os.path.getsize(rig.path)
    offset = {"header-base": 24, "header-tag": wlog.HEADER_SIZE - 1,
              "first-record": wlog.HEADER_SIZE + 100, "last-tag": size - 1}[where]
    _flip(rig.path, offset)
    with pytest.raises(LogRefused) as e:
        read_log(rig.path, LogKeys.of(rig.disk))
    assert e.value.why == "refused"


def _records(path: str):
    raw = open(path, "rb").read()
    pos, out = wlog.HEADER_SIZE, []
    while pos < len(raw):
        size = int.from_bytes(raw[pos:pos + 4], "little")
        out.append(raw[pos:pos + 4 + size])
        pos += 4 + size
    return raw[:wlog.HEADER_SIZE], out


def test_reordered_dropped_or_spliced_records_are_refused(rig, tmp_path):
    for i in range(3):
        rig.write(i, block(i))
    keys = LogKeys.of(rig.disk)
    head, recs = _records(rig.path)
    other = Rig(tmp_path, name="other.wlog")       # same kind of records, another log
    other.write(0, block(0))
    _, foreign = _records(other.path)
    for body in (recs[1] + recs[0] + recs[2],          # reordered
                 recs[0] + recs[2],                    # one dropped from the middle
                 recs[0] + foreign[0] + recs[2]):      # spliced in from another log
        with open(rig.path, "wb") as f:
            f.write(head + body)
        with pytest.raises(LogRefused):
            read_log(rig.path, keys)


def test_a_cut_short_last_record_is_dropped_and_the_chain_continues(rig):
    rig.write(1, block(1))
    rig.write(2, block(2))
    size = os.path.getsize(rig.path)
    os.truncate(rig.path, size - 100)           # killed inside write(2) of record 2
    keys = LogKeys.of(rig.disk)
    got = read_log(rig.path, keys)
    assert got.torn and [e.lba for e in got.entries] == [1]
    w = WriteLog.resume(rig.path, keys, got)
    w.append_replay_started()
    w.close()
    again = read_log(rig.path, keys)
    assert not again.torn and again.replay_started and [e.lba for e in again.entries] == [1]


def test_a_failed_append_leaves_no_half_record(rig, monkeypatch):
    rig.write(1, block(1))
    real = os.writev

    def half(fd, bufs):
        os.write(fd, bytes(bufs[0]) + bytes(bufs[1])[:50])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wlog.os, "writev", half)
    with pytest.raises(OSError):
        rig.wlog.append_write(2, block(2))
    monkeypatch.setattr(wlog.os, "writev", real)
    rig.wlog.append_write(3, block(3))
    got = read_log(rig.path, LogKeys.of(rig.disk))
    assert [e.lba for e in got.entries] == [1, 3] and not got.torn


def test_keys_are_not_in_reprs(rig):
    keys = LogKeys.of(rig.disk)
    assert keys.key.hex() not in repr(keys) and repr(keys.key) not in repr(keys)


# --- restore -------------------------------------------------------------------------------

def test_engine_reopens_at_its_last_commit():
    """restore's rule 'base < N: all covered' needs open() itself never to commit."""
    data, meta = MemoryDevice(32 * MiB), MemoryDevice(meta_size_for(32 * MiB))
    disk = SwornDisk.create(data, meta, KEY16)
    disk.write(0, block(0))
    disk.flush()
    seq = disk.commit_seq
    disk.write(1, block(1))
    assert SwornDisk.open(data, meta, KEY16).commit_seq == seq


def test_good_log_replays_every_completed_write(rig):
    rig.write(0, block(10, 3))
    rig.flush()
    rig.write(1, block(11))                 # completed after the last commit:
    rig.discard(2, 1)                       # only the log has these
    rig.write(40, block(12, 2))
    rig.write(1, block(13))                 # order matters: the later write wins
    base = rig.disk.commit_seq
    outcome = rig.recover()
    assert outcome == RestoreOutcome(replayed=4)
    assert rig.disk.commit_seq == base + 1          # replayed, then committed
    rig.assert_model()
    assert rig.flush() == 0                         # nothing reported lost
    # and it was committed before serving: another crash right now loses nothing either
    assert rig.recover() == RestoreOutcome(replayed=0)
    rig.assert_model()


def test_missing_log_recovers_to_the_last_commit_and_fails_the_first_flush(rig):
    rig.write(0, block(1))
    rig.flush()
    rig.write(1, block(2))
    committed = dict(rig.model)
    del rig.model[1]
    os.unlink(rig.path)
    outcome = rig.recover()
    assert (outcome.loss, outcome.replayed) == ("missing", 0)
    assert "unknown number of completed writes" in outcome.message("/dev/ublkb0")
    assert "the write log is missing" in outcome.message("/dev/ublkb0")
    rig.assert_model()
    assert rig.model == {0: committed[0]}
    assert rig.write(5, block(5)) == BS             # plain writes are fine
    assert rig.flush() == -errno.EIO                # the file system is told
    assert rig.flush() == -errno.EIO                # and told again: some callers ignore it
    assert rig.target.stats()["wlog_flushes_failed"] == 2
    assert read_log(rig.path, LogKeys.of(rig.disk)).pending_loss == "missing"
    rig.target.release_loss()                       # the daemon: nobody uses the device now
    assert rig.flush() == 0
    assert read_log(rig.path, LogKeys.of(rig.disk)).pending_loss == ""
    assert rig.recover() == RestoreOutcome(replayed=0)      # released: not reported again


def test_fua_write_reports_the_loss_too(rig):
    rig.write(1, block(1))
    os.unlink(rig.path)
    rig.model.clear()
    rig.recover()
    assert rig.write(2, block(2), fua=True) == -errno.EIO
    assert rig.write(2, block(2), fua=True) == -errno.EIO
    rig.target.release_loss()
    assert rig.write(2, block(2), fua=True) == BS
    rig.assert_model()


def test_tampered_log_is_refused_never_replayed(rig):
    rig.write(0, block(1))
    rig.flush()
    rig.write(1, block(2))
    rig.write(2, block(3))
    _flip(rig.path, os.path.getsize(rig.path) - 1)      # only the last record is touched
    for lba in (1, 2):
        del rig.model[lba]
    outcome = rig.recover()
    assert (outcome.loss, outcome.replayed) == ("refused", 0)
    assert "fails to verify" in outcome.message("/dev/ublkb0")
    rig.assert_model()                                  # not even the good first record
    assert rig.flush() == -errno.EIO


def test_log_of_another_disk_is_refused(rig, tmp_path):
    other = Rig(tmp_path, key=OTHER16, name="other.wlog")
    other.write(1, block(99))
    rig.write(1, block(1))
    rig.model.clear()
    shutil.copy(other.path, rig.path)
    outcome = rig.recover()
    assert (outcome.loss, outcome.replayed) == ("other-disk", 0)
    rig.assert_model()
    assert rig.flush() == -errno.EIO


def test_same_key_other_disk_is_still_another_disk(rig, tmp_path):
    """The key is bound to the disk's uuid, not only to the user's key."""
    other = Rig(tmp_path, key=rig.key, name="other.wlog")
    assert LogKeys.of(other.disk).fingerprint != LogKeys.of(rig.disk).fingerprint


def test_log_older_than_the_disk_is_not_replayed(rig):
    """A log whose base is behind the engine is either the log of a server killed between
    a commit and the log's restart (all covered) or an older copy put back: it cannot be
    told apart, so it is never replayed over the newer state. The newer writes of a log
    replaced that way are lost without a report: a stated limit (only root can do it)."""
    rig.write(1, block(1))
    old = open(rig.path, "rb").read()               # a copy of the log before the commit
    rig.flush()
    rig.write(2, block(2))
    rig.write(1, block(3))                          # newer than what the old copy holds
    with open(rig.path, "wb") as f:
        f.write(old)
    del rig.model[2]
    rig.model[1] = block(1)
    outcome = rig.recover()
    assert outcome == RestoreOutcome(replayed=0)
    rig.assert_model()                              # block(1) is the committed value


def test_killed_between_a_commit_and_the_log_restart(rig, monkeypatch):
    rig.write(1, block(1))
    rig.write(2, block(2))
    monkeypatch.setattr(WriteLog, "restart", _killed)
    with pytest.raises(_Killed):
        rig.flush()                                 # committed, then killed
    monkeypatch.undo()
    assert read_log(rig.path, LogKeys.of(rig.disk)).base < rig.disk.commit_seq
    assert rig.recover() == RestoreOutcome(replayed=0)
    rig.assert_model()                              # the commit holds everything


def test_log_newer_than_the_disk_means_the_devices_were_rolled_back(rig):
    rig.write(0, block(1))
    rig.flush()
    snap = rig.snapshot()
    rig.write(0, block(2))
    rig.flush()
    rig.write(1, block(3))
    rig.roll_back(snap)
    rig.model = {0: block(1)}
    outcome = rig.recover()
    assert (outcome.loss, outcome.replayed) == ("rolled-back", 0)
    assert "rolled back" in outcome.message("/dev/ublkb0")
    rig.assert_model()
    assert rig.flush() == -errno.EIO


class _Killed(BaseException):
    """kill -9 in the middle of a call: nothing after it runs (not an OSError)."""


def _killed(*args, **kwargs):
    raise _Killed()


class DyingDisk:
    """Passes calls to the engine; at write number `commit_at` it commits (as an autocommit
    would) and then the process 'dies' inside that call."""

    def __init__(self, disk, commit_at: int):
        self.disk, self.commit_at, self.writes = disk, commit_at, 0

    def __getattr__(self, name):
        return getattr(self.disk, name)

    def write(self, lba, data):
        self.disk.write(lba, data)
        self.writes += 1
        if self.writes == self.commit_at:
            self.disk.flush()
            raise _Killed()


def test_a_replay_interrupted_after_the_engine_committed_part_of_it(rig):
    for i in range(6):
        rig.write(i, block(20 + i))
    rig.write(2, block(30))                     # overwrites an entry the commit covers
    disk = rig.crash()
    base = disk.commit_seq
    with pytest.raises(_Killed):
        restore.restore(DyingDisk(disk, commit_at=4), rig.path)
    disk = SwornDisk.open(rig.data, rig.meta, rig.key)
    assert disk.commit_seq == base + 1          # ahead of the log: a prefix was committed
    got = read_log(rig.path, LogKeys.of(disk))
    assert got.replay_started and got.base == base
    outcome = restore.restore(disk, rig.path)   # replayed again, whole: idempotent
    assert outcome == RestoreOutcome(replayed=7)
    rig.disk = disk
    rig.assert_model()


def test_an_old_copy_of_a_replayed_log_is_refused_as_stale(rig):
    rig.write(1, block(1))
    rig.write(2, block(2))
    disk = rig.crash()
    keys = LogKeys.of(disk)
    w = WriteLog.resume(rig.path, keys, read_log(rig.path, keys))
    w.append_replay_started()                   # as restore does before replaying
    w.close()
    replaying = open(rig.path, "rb").read()
    assert restore.restore(disk, rig.path).replayed == 2
    rig._up(disk)
    for i in range(MAX_COMMITS_PER_CALL + 1):   # the device moves on: newer commits
        rig.write(1, block(100 + i))
        rig.flush()
    with open(rig.path, "wb") as f:             # the copy is put back
        f.write(replaying)
    outcome = rig.recover()
    assert (outcome.loss, outcome.replayed) == ("stale", 0)
    rig.assert_model()                          # block(1) was not rolled back to old data
    assert rig.flush() == -errno.EIO


def test_a_loss_survives_another_crash_until_the_device_is_released(rig):
    rig.write(1, block(1))
    os.unlink(rig.path)
    rig.model.clear()
    assert rig.recover().loss == "missing"
    rig.write(2, block(2))                      # logged, but no flush reported the loss yet
    assert rig.flush() == -errno.EIO
    outcome = rig.recover()
    assert outcome.carried and outcome.loss == "missing" and outcome.replayed == 1
    assert "the device has not been released since" in outcome.message("/dev/ublkb0")
    rig.assert_model()
    assert rig.flush() == -errno.EIO
    rig.target.release_loss()
    assert rig.recover() == RestoreOutcome(replayed=0)      # released: not again


def test_if_the_log_cannot_be_written_writes_are_committed_before_completion(rig, monkeypatch):
    def broken(self, plain):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(WriteLog, "_append", broken)
    seq = rig.disk.commit_seq
    assert rig.write(1, block(1)) == BS
    assert rig.write(2, block(2)) == BS
    assert rig.disk.commit_seq == seq + 2       # write-through: one commit per write
    assert rig.target.stats()["wlog_failures"] == 2
    monkeypatch.undo()
    assert rig.recover() == RestoreOutcome(replayed=0)
    rig.assert_model()                          # nothing completed was lost


def test_close_commits_and_leaves_an_empty_log(rig):
    rig.write(1, block(1))
    rig.target.close()
    got = read_log(rig.path, LogKeys.of(rig.disk))
    assert got.entries == [] and got.base == rig.disk.commit_seq


# --- the commands: recover prints one line, list and stats show it ----------------------------

def test_recover_reports_a_lost_log_and_list_shows_it(capsys, tmp_path, fake_driver,
                                                       monkeypatch, run_dir):
    from tests.test_cli import FakeUblkServer, KEY_HEX, run_cli, sized_images

    class RecoverableFake(FakeUblkServer):
        @classmethod
        def recover(cls, target, dev_id):
            return cls(target)

    data, meta = sized_images(tmp_path)
    monkeypatch.setattr(ublk_shim, "UblkServer", RecoverableFake)
    monkeypatch.setattr(ctrl, "device_exists", lambda dev_id: True)
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY_HEX + "\n")
    table = f"0 {32 * MiB // 512} sworndisk {data} {meta} 0 force"
    code, out, err = run_cli(capsys, "add", "--recoverable", "--key-file", str(keyfile), table)
    assert code == 0, err
    wlog_file = run_dir / "7.wlog"
    assert wlog_file.exists()

    os.kill(state.load(7).pid, signal.SIGKILL)
    _wait_dead(state.load(7))
    code, out, err = run_cli(capsys, "recover", "-n", "7", "--key-file", str(keyfile), "--json")
    assert code == 0, err
    assert json.loads(out)["replayed"] == 0 and json.loads(out)["lost"] is None
    assert "warning" not in err

    os.kill(state.load(7).pid, signal.SIGKILL)
    _wait_dead(state.load(7))
    wlog_file.unlink()
    code, out, err = run_cli(capsys, "recover", "-n", "7", "--key-file", str(keyfile))
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == [
        "sworndisk-ublk: warning: /dev/ublkb7: an unknown number of completed writes since "
        f"the last flush may have been lost: the write log is missing ({wlog_file}); "
        "flushes fail with EIO until it is unmounted and closed (then run fsck)"]
    code, out, _ = run_cli(capsys, "list")
    assert out.splitlines()[0].split()[-1] == "LOST" and out.splitlines()[1].split()[-1] == "yes"
    code, out, _ = run_cli(capsys, "list", "--json")
    assert "the write log is missing" in json.loads(out)[0]["lost"]
    code, out, _ = run_cli(capsys, "stats", "-n", "7", "--json")
    assert "missing" in json.loads(out)["lost_writes"]
    # No /dev/ublkb7 here, so nothing uses it: the server ends the EIO on flushes at once.
    _wait_for(lambda: "flushes work again" in (run_dir / "7.log").read_text())
    assert KEY_HEX not in "".join(p.read_text(errors="replace") for p in run_dir.iterdir()
                                  if p.suffix in (".json", ".log"))

    monkeypatch.setattr(ctrl, "device_exists", lambda dev_id: False)
    code, _, err = run_cli(capsys, "del", "-n", "7")
    assert code == 0, err
    assert not wlog_file.exists() and not (run_dir / "7.lost.json").exists()


def _wait_dead(st):
    _wait_for(lambda: not st.server_alive())


def _wait_for(condition, timeout=10.0):
    import time
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
