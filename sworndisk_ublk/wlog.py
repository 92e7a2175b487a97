"""The write log: completed writes a recoverable server has not committed yet, kept outside it.

Why it exists: the ublk device advertises a volatile write cache, so the engine commits only
at FLUSH/FUA. When a `--recoverable` server dies, ublk keeps the device and the file system
on it carries on, unaware; writes the dead server had completed but not committed would
vanish while the next FLUSH succeeds. So the target appends every write and discard it
completes to this log (after the engine has it, before the kernel is told), and `recover`
replays the log into the reopened engine before it takes the device over. When the engine
commits, everything logged so far is durable and the log restarts empty.

The file lives in the state directory (/run/sworndisk/N.wlog, a tmpfs) so it survives the
server process but not a reboot (neither does the device). It is encrypted and
authenticated, so that no plaintext reaches swap, and a log that was altered, belongs to
another disk or starts from another commit is refused, never replayed.

Format (integers little-endian):

    header  magic "SDWLOG" 00 01 (8) | fingerprint (16) | base commit_seq (8) |
            log id (16, random) | flags (4) | zero (4) | tag (16)
    record  length L (4) | ciphertext (L - 16) | tag (16)

* key K = disk.subkey("ublk-write-log"): bound to the disk's key and uuid.
  fingerprint = HMAC-SHA256(K, "fingerprint")[:16] names the disk without revealing K, so
  a log of another disk is told apart from a forged one.
* Each log has its own AES-256-GCM key, HMAC-SHA256(K, "log" || log id); record i (from 1)
  uses the nonce i (12 bytes, big-endian), so nonces never repeat under a key.
* The header tag is the GCM tag of an empty message with the first 56 header bytes as
  associated data. Record i authenticates (previous tag || L) as associated data: the tags
  form a MAC chain from the header, so records cannot be dropped from the middle,
  reordered, or spliced in from another log.
* flags: the low byte is a loss reason (see restore.py) while the device must still fail
  every FLUSH (see target.py); 0 when none is pending.
* Plaintext of a record: kind (1) | a (8) | b (4) | data
    W  write       a = LBA, b = blocks, data = b * 4096 bytes
    D  discard     a = LBA, b = blocks
    R  replay      a recover started replaying this log into the engine
    A  at commit   a = engine commit_seq reached while replaying
    E  released    the device was let go after the loss: flushes work again

A last record cut short (the writer was killed inside write(2)) is dropped on reading: its
request was never completed. A log cut short at a record boundary cannot be told from a
shorter genuine one; that, and the file's deletion, are limits stated in docs/cli.md.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from typing import Any, List, Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sworndisk import BLOCK_SIZE

KEY_LABEL = "ublk-write-log"
MAGIC = b"SDWLOG\x00\x01"
_HEAD = struct.Struct("<8s16sQ16sI4x")        # everything the header tag covers
TAG_BYTES = 16
HEADER_SIZE = _HEAD.size + TAG_BYTES
_LEN = struct.Struct("<I")
_OP = struct.Struct("<cQI")
WRITE, DISCARD, REPLAY, AT_COMMIT, RELEASED = b"W", b"D", b"R", b"A", b"E"


class LogRefused(Exception):
    """The log exists but must not be replayed; `why` is one of LOSS_REASONS, the message
    says where (for the server log and recover's warning)."""

    def __init__(self, why: str, detail: str):
        super().__init__(detail)
        self.why = why


@dataclass(frozen=True)
class LogKeys:
    """The disk-bound key of its write logs and the fingerprint that names the disk."""

    key: bytes = field(repr=False)
    fingerprint: bytes

    @classmethod
    def of(cls, disk: Any) -> "LogKeys":
        key = disk.subkey(KEY_LABEL)
        return cls(key, hmac.new(key, b"fingerprint", hashlib.sha256).digest()[:16])

    def aead(self, log_id: bytes) -> AESGCM:
        return AESGCM(hmac.new(self.key, b"log" + log_id, hashlib.sha256).digest())


def _nonce(seq: int) -> bytes:
    return seq.to_bytes(12, "big")


@dataclass(frozen=True)
class Entry:
    """A write (data) or discard (data None) to replay, in log order."""

    kind: bytes
    lba: int
    nr_blocks: int
    data: Optional[bytes] = field(default=None, repr=False)


@dataclass
class LogContents:
    """A verified log: what to replay and where a writer would continue the chain."""

    base: int                     # engine commit_seq the log starts from
    loss: str                     # loss reason still to report ("" if none)
    entries: List[Entry]          # writes and discards, in order
    replay_started: bool          # a recover began replaying it (R record)
    last_commit: int              # base, or the last commit_seq an A record saw
    loss_released: bool           # an E record follows the pending loss
    torn: bool                    # a cut-short last record was dropped
    length: int                   # bytes that verified
    records: int
    log_id: bytes = field(repr=False)
    tag: bytes = field(repr=False)

    @property
    def pending_loss(self) -> str:
        return "" if self.loss_released else self.loss


def _header(keys: LogKeys, base: int, log_id: bytes, loss: str) -> bytes:
    head = _HEAD.pack(MAGIC, keys.fingerprint, base, log_id, _loss_code(loss))
    return head + keys.aead(log_id).encrypt(_nonce(0), b"", head)


# Loss reasons travel in the header's flags as small codes; restore.py owns their meaning.
LOSS_REASONS = ("", "missing", "refused", "other-disk", "rolled-back", "stale")


def _loss_code(loss: str) -> int:
    return LOSS_REASONS.index(loss)


def read_log(path: str, keys: LogKeys) -> LogContents:
    """Read and verify the whole log. FileNotFoundError if there is none; LogRefused if it
    is not this disk's or fails to verify anywhere (nothing of it may then be replayed)."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
        raise LogRefused("refused", f"{path} is not a SwornDisk write log")
    magic, fingerprint, base, log_id, flags = _HEAD.unpack_from(raw)
    if fingerprint != keys.fingerprint:
        raise LogRefused("other-disk", path)
    aead = keys.aead(log_id)
    tag = raw[_HEAD.size:HEADER_SIZE]
    try:
        aead.decrypt(_nonce(0), tag, raw[:_HEAD.size])
    except InvalidTag:
        raise LogRefused("refused", f"header of {path}") from None
    if flags >= len(LOSS_REASONS):
        raise LogRefused("refused", f"unknown flags {flags:#x} in {path}")
    out = LogContents(base=base, loss=LOSS_REASONS[flags], entries=[], replay_started=False,
                      last_commit=base, loss_released=False, torn=False, length=HEADER_SIZE,
                      records=0, log_id=log_id, tag=tag)
    pos = HEADER_SIZE
    while pos < len(raw):
        if len(raw) - pos < _LEN.size + TAG_BYTES:
            out.torn = True
            break
        (size,) = _LEN.unpack_from(raw, pos)
        if size > len(raw) - pos - _LEN.size:
            out.torn = True
            break
        start = pos + _LEN.size
        try:
            plain = aead.decrypt(_nonce(out.records + 1), raw[start:start + size],
                                 out.tag + raw[pos:start])
        except InvalidTag:
            raise LogRefused("refused", f"record {out.records + 1} of {path}") from None
        _apply_record(out, plain, path)
        out.tag = raw[start + size - TAG_BYTES:start + size]
        out.records += 1
        pos = out.length = start + size
    return out


def _apply_record(out: LogContents, plain: bytes, path: str) -> None:
    kind, a, b = _OP.unpack_from(plain)
    data = plain[_OP.size:]
    if kind == WRITE and len(data) == b * BLOCK_SIZE and b:
        out.entries.append(Entry(WRITE, a, b, data))
    elif kind == DISCARD and not data and b:
        out.entries.append(Entry(DISCARD, a, b))
    elif kind == REPLAY and not data:
        out.replay_started = True
    elif kind == AT_COMMIT and not data:
        out.last_commit = a
    elif kind == RELEASED and not data:
        out.loss_released = True
    else:           # authentic yet malformed: a bug, or a format this code does not know
        raise LogRefused("refused", f"record {out.records + 1} of {path} is malformed")


class WriteLog:
    """Appends records to the log file; `restart` begins a new log (atomically replacing it).

    Not thread-safe: the target calls it under its engine lock. Every append either adds a
    whole record or raises OSError leaving the file as it was (a partial record is cut off).
    """

    def __init__(self, path: str, keys: LogKeys):
        self.path = path
        self.keys = keys
        self.base = -1
        self.loss = ""                # pending loss reason, carried into restarted logs
        self.records = 0              # records appended to the current log
        self.appended_bytes = 0       # over the object's life, for statistics
        self.restarts = 0
        self._fd = -1
        self._aead: Optional[AESGCM] = None
        self._tag = b""
        self._length = 0

    # --- life cycle ---------------------------------------------------------------------

    @classmethod
    def create(cls, path: str, keys: LogKeys, base: int, loss: str = "") -> "WriteLog":
        """A new, empty log at `base` in place of whatever `path` held."""
        log = cls(path, keys)
        log.loss = loss
        log.restart(base)
        log.restarts = 0
        return log

    @classmethod
    def resume(cls, path: str, keys: LogKeys, contents: LogContents) -> "WriteLog":
        """Continue a verified log (restore appends its R and A records to it)."""
        log = cls(path, keys)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, contents.length)         # drop a cut-short last record
        except BaseException:
            os.close(fd)
            raise
        log._fd, log._length = fd, contents.length
        log._aead, log._tag = keys.aead(contents.log_id), contents.tag
        log.base, log.loss, log.records = contents.base, contents.pending_loss, contents.records
        return log

    def restart(self, base: int) -> None:
        """Begin a new empty log at `base` (the engine committed everything logged so far).

        Written to a temporary file and renamed over the old one, so a reader finds either
        log whole whenever this process dies.
        """
        log_id = os.urandom(16)
        header = _header(self.keys, base, log_id, self.loss)
        tmp = f"{self.path}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
        try:
            if os.write(fd, header) != len(header):
                raise OSError(f"short write to {tmp}")
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            _unlink_quietly(tmp)
            raise
        self.close()
        self._fd, self._length = fd, len(header)
        self._aead, self._tag = self.keys.aead(log_id), header[_HEAD.size:]
        self.base, self.records = base, 0
        self.restarts += 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        self.close()
        _unlink_quietly(self.path)

    # --- records ------------------------------------------------------------------------

    def append_write(self, lba: int, data: Any) -> None:
        self._append(_OP.pack(WRITE, lba, len(data) // BLOCK_SIZE) + data)

    def append_discard(self, lba: int, nr_blocks: int) -> None:
        self._append(_OP.pack(DISCARD, lba, nr_blocks))

    def append_replay_started(self) -> None:
        self._append(_OP.pack(REPLAY, 0, 0))

    def append_commit(self, commit_seq: int) -> None:
        self._append(_OP.pack(AT_COMMIT, commit_seq, 0))

    def append_loss_released(self) -> None:
        self._append(_OP.pack(RELEASED, 0, 0))
        self.loss = ""

    def _append(self, plain: bytes) -> None:
        if self._fd < 0:
            raise OSError(f"the write log {self.path} is closed")
        size = _LEN.pack(len(plain) + TAG_BYTES)
        sealed = self._aead.encrypt(_nonce(self.records + 1), plain, self._tag + size)
        try:
            done = os.writev(self._fd, (size, sealed))
            if done != len(size) + len(sealed):
                raise OSError(f"short write to {self.path} ({done} bytes)")
        except BaseException:
            os.ftruncate(self._fd, self._length)     # never leave half a record behind
            raise
        self._length += done
        self._tag = sealed[-TAG_BYTES:]
        self.records += 1
        self.appended_bytes += done


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
