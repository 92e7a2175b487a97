"""The state directory (/run/sworndisk/, or $SWORNDISK_RUN_DIR): one JSON file per device.

A server writes ``<dev_id>.json`` once its device is live and removes it when it stops
cleanly, so `list`, `del` and `recover` can find the server's pid, the table and the
options without talking to it.  The file holds no secrets: the table's key field is
always 0 and the key source is not recorded.  /run is a tmpfs, so the state goes away
with a reboot, as the devices do.

A pid alone is not proof of life (pids are reused), so the server's start time
(`ublk_shim.holders.start_time`) is stored beside it.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

from ublk_shim import holders
from ublk_shim.sys import UBLK_BLOCK_PATH

DEFAULT_RUN_DIR = "/run/sworndisk"


def run_dir() -> str:
    """The state directory; tests point SWORNDISK_RUN_DIR elsewhere."""
    return os.environ.get("SWORNDISK_RUN_DIR") or DEFAULT_RUN_DIR


def ensure_run_dir() -> str:
    path = run_dir()
    os.makedirs(path, mode=0o755, exist_ok=True)
    return path


def state_path(dev_id: int) -> str:
    return os.path.join(run_dir(), f"{dev_id}.json")


def log_path(dev_id: int) -> str:
    return os.path.join(run_dir(), f"{dev_id}.log")


def stats_path(dev_id: int) -> str:
    return os.path.join(run_dir(), f"{dev_id}.stats.json")


def name_path(dev_id: int) -> str:
    """The disk's name alone, for the udev rule of contrib/udev (reads it with cat)."""
    return os.path.join(run_dir(), f"{dev_id}.name")


def save_name(dev_id: int, name: str) -> None:
    path = name_path(dev_id)
    with open(f"{path}.tmp", "w") as f:
        f.write(name + "\n")
    os.replace(f"{path}.tmp", path)


def request_path(dev_id: int) -> str:
    """What `del --force`/`--deferred` asks of the server (read at its SIGUSR2)."""
    return os.path.join(run_dir(), f"{dev_id}.request")


@dataclass
class DeviceState:
    """What a running (or crashed) server left behind for the other commands."""

    dev_id: int
    pid: int
    pid_start: Optional[int]
    table: str                    # table line, key field 0
    data: str
    meta: str
    size: int                     # logical size in bytes
    recoverable: bool
    queues: int
    depth: int
    log: str
    started: float = field(default_factory=time.time)
    key_slot: Optional[int] = None        # the key slot that opened the disk
    anchor: Optional[str] = None          # the rollback anchor file, if any
    failed: Optional[str] = None          # why the engine stopped accepting writes, if it did
    name: Optional[str] = None            # the disk's name: /dev/sworndisk/NAME
    read_only: bool = False               # added --read-only
    pending_removal: bool = False         # del --deferred: goes once its last user closes it

    @property
    def dev_path(self) -> str:
        return UBLK_BLOCK_PATH.format(self.dev_id)

    def server_alive(self) -> bool:
        return holders.pid_alive(self.pid, self.pid_start)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceState":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def save(state: DeviceState) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a file."""
    directory = ensure_run_dir()
    fd, tmp = tempfile.mkstemp(prefix=f".{state.dev_id}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(state.to_json())
        os.chmod(tmp, 0o644)
        os.replace(tmp, state_path(state.dev_id))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def record_failure(dev_id: int, pid: int, reason: str) -> None:
    """Note in a live server's state file that its disk failed, and why (for list/status)."""
    st = load(dev_id)
    if st is not None and st.pid == pid and st.failed != reason:
        st.failed = reason
        save(st)


def load(dev_id: int) -> Optional[DeviceState]:
    try:
        with open(state_path(dev_id)) as f:
            return DeviceState.from_dict(json.load(f))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        return None             # a corrupt state file is as good as none


def load_all() -> List[DeviceState]:
    try:
        names = os.listdir(run_dir())
    except FileNotFoundError:
        return []
    states = []
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext == ".json" and stem.isdigit():
            st = load(int(stem))
            if st is not None:
                states.append(st)
    return sorted(states, key=lambda s: s.dev_id)


def find_name(name: str) -> Optional[DeviceState]:
    """The state of the device named `name`, if any (a name is unique among live disks;
    with stale entries left by dead servers, the newest one)."""
    found = [st for st in load_all() if st.name == name]
    return max(found, key=lambda st: st.started) if found else None


def remove(dev_id: int, *, expect_pid: Optional[int] = None) -> None:
    """Remove a device's state (and stats) file; with `expect_pid`, only if that pid owns it.

    The pid check lets an exiting server clean up without racing a newer server that
    already took over the same device (recover).
    """
    if expect_pid is not None:
        st = load(dev_id)
        if st is not None and st.pid != expect_pid:
            return
    for path in (state_path(dev_id), stats_path(dev_id), request_path(dev_id),
                 name_path(dev_id)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
