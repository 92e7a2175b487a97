"""recover's first step: put back the writes the dead server completed but had not committed.

The engine reopens at its last commit N. The write log (wlog.py) starts at some commit B:

* B == N: every write and discard in it was completed after commit N; replay them in order,
  then flush (commit), before the device is taken over.
* B < N, no R record: the server was killed between an engine commit and the restart of
  its log (a commit covers everything the engine had before it, so every entry is in N).
  Nothing to replay, nothing lost.
* B < N, R record: an earlier `recover` was replaying it when it died, after the engine had
  committed part of the replay. Replaying all of it again is correct (writes and discards
  overwrite, so replaying a prefix twice changes nothing), provided those commits were the
  replay's own: so the engine may be at most MAX_COMMITS_PER_CALL commits past the last
  commit the replay recorded (A record), or the log is refused as stale.
* B > N: the engine is older than its own log: the data or meta device was rolled back.
* no log, a log of another disk, or one that fails to verify anywhere: refused whole.

Whenever the log is refused, completed writes may be lost and how many is unknown. The
device still comes back, but FLUSH and FUA writes fail with EIO until the device is
released (target.py), so the file system stops trusting its cache; that obligation is
written into the new log's header, so a server killed before it ends passes it on. The
reason is also kept in N.lost.json for `list`.

What cannot be detected: a log cut short at a record boundary (or replaced by an older
copy of itself with the same base) looks like a shorter genuine one; only root can do
that to /run/sworndisk, and root can write the device directly anyway.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

from . import state
from .errors import CliError, ExitCode
from .wlog import DISCARD, LogContents, LogKeys, LogRefused, WriteLog, read_log

log = logging.getLogger("sworndisk_ublk.restore")

# The most commits one engine call makes (flush: commit + cleaning commit; write: an early
# commit for space + the autocommit). Bounds how far an interrupted replay can have moved
# the engine past its last A record.
MAX_COMMITS_PER_CALL = 2

_WHY = {
    "missing": "the write log is missing",
    "refused": "the write log fails to verify",
    "other-disk": "the write log belongs to another disk",
    "rolled-back": "the disk is older than its write log (the data or meta device was "
                   "rolled back)",
    "stale": "the write log is older than the disk and cannot be matched to it",
}


def log_path(dev_id: int) -> str:
    return os.path.join(state.run_dir(), f"{dev_id}.wlog")


def loss_path(dev_id: int) -> str:
    return os.path.join(state.run_dir(), f"{dev_id}.lost.json")


@dataclass(frozen=True)
class RestoreOutcome:
    """What recover did with the log: entries replayed, or why completed writes may be lost."""

    replayed: int
    loss: str = ""              # a wlog.LOSS_REASONS name; "" when nothing was lost
    detail: str = ""            # the specific finding, for the server log and the message
    carried: bool = False       # the loss happened at an earlier recover, still unreported

    def message(self, dev_path: str) -> str:
        """The one line `recover` prints when completed writes may have been lost."""
        if self.carried:
            why = f"an earlier recover found that {_WHY[self.loss]}, and the device has " \
                  f"not been released since"
        else:
            why = self.detail
        return (f"{dev_path}: an unknown number of completed writes since the last flush "
                f"may have been lost: {why}; flushes fail with EIO until it is unmounted "
                f"and closed (then run fsck)")


def restore(disk: Any, path: str) -> RestoreOutcome:
    """Replay the log at `path` into `disk` (just opened), or say why it must not be."""
    keys = LogKeys.of(disk)
    n = disk.commit_seq
    try:
        contents = read_log(path, keys)
    except FileNotFoundError:
        return _lost("missing", f"{_WHY['missing']} ({path})")
    except LogRefused as e:
        return _lost(e.why, f"{_WHY[e.why]} ({e})")
    carried = contents.pending_loss
    if contents.base > n:
        return _lost("rolled-back", f"{_WHY['rolled-back']}: the log starts at commit "
                                    f"{contents.base}, the disk is at commit {n}")
    if contents.base < n and not contents.replay_started:
        log.info("write log at commit %d, engine at %d: everything in it was committed",
                 contents.base, n)
        return _kept(0, carried)
    if contents.base < n and n - contents.last_commit > MAX_COMMITS_PER_CALL:
        return _lost("stale", f"{_WHY['stale']}: an interrupted replay saw commit "
                              f"{contents.last_commit}, the disk is at commit {n}")
    replayed = _replay(disk, path, keys, contents)
    return _kept(replayed, carried)


def _lost(why: str, detail: str) -> RestoreOutcome:
    log.warning("completed writes may have been lost: %s", detail)
    return RestoreOutcome(0, why, detail)


def _kept(replayed: int, carried: str) -> RestoreOutcome:
    if carried:
        return RestoreOutcome(replayed, carried, _WHY[carried], carried=True)
    return RestoreOutcome(replayed)


def _replay(disk: Any, path: str, keys: LogKeys, contents: LogContents) -> int:
    """Write the entries back in order and commit them; the R and A records let a recover
    that dies half-way be told apart from a stale log (see the module docstring)."""
    entries = contents.entries
    if not entries:
        return 0
    writer = WriteLog.resume(path, keys, contents)
    done = 0
    try:
        if not contents.replay_started:
            writer.append_replay_started()
        seq = disk.commit_seq
        for done, e in enumerate(entries):
            if e.kind == DISCARD:
                disk.discard(e.lba, e.nr_blocks)
            else:
                disk.write(e.lba, e.data)
            if disk.commit_seq != seq:
                seq = disk.commit_seq
                writer.append_commit(seq)
        done = len(entries)
        disk.flush()
        if disk.commit_seq != seq:
            writer.append_commit(disk.commit_seq)
    except OSError as e:
        raise CliError(f"replaying the write log failed after {done} of {len(entries)} "
                       f"entries: {e}; the log is kept: fix the cause and recover again",
                       ExitCode.FAILED) from None
    finally:
        writer.close()
    log.info("replayed %d completed writes/discards from the write log (commit %d -> %d)",
             len(entries), contents.base, disk.commit_seq)
    return len(entries)


# --- what `list` shows ---------------------------------------------------------------------

def save_loss(dev_id: int, outcome: RestoreOutcome) -> None:
    """Remember, for `list`, that a recover of this device may have lost completed writes."""
    path = loss_path(dev_id)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"reason": outcome.detail, "time": time.time()}, f)
    os.replace(tmp, path)


def load_loss(dev_id: int) -> Optional[str]:
    """The reason completed writes of this device may have been lost, or None."""
    try:
        with open(loss_path(dev_id)) as f:
            return str(json.load(f)["reason"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return "unknown (the record in the state directory is damaged)"


def forget(dev_id: int) -> None:
    """Remove the write log and the loss record of device N (deleted, or added anew)."""
    for path in (log_path(dev_id), loss_path(dev_id)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
