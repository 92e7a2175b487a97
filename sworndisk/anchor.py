"""The rollback anchor: the disk's latest commit sequence, kept outside its two devices.

The paper's threat model gives the adversary both devices, so nothing on them can tell the
disk's whole state from an older, equally consistent copy of it. An anchor file on storage
the user trusts (another disk, a TPM-sealed file system) can: after every commit it holds
the disk's uuid and commit sequence, under an HMAC keyed from the master key, so only the
disk can write it. Opening a disk whose committed state is older than its anchor is a
rollback.

The file is replaced atomically (a temporary file, fsync, rename, fsync of the directory)
before the commit returns: the cost is one small durable write per flush. A crash between
the commit and the anchor update leaves the anchor one commit behind, which is allowed
(the disk may be ahead of its anchor, never behind it).
"""
from __future__ import annotations

import hashlib
import hmac
import os

from .errors import AnchorError, RollbackError
from .format import ANCHOR as _ANCHOR, ANCHOR_MAGIC, ANCHOR_VERSION

_SIGNED = _ANCHOR.size - 32          # every field before the MAC


class Anchor:
    """One disk's anchor file: `read` checks it, `write` moves it (durably)."""

    def __init__(self, path: str | os.PathLike, disk_uuid: bytes, key: bytes):
        self.path = os.path.abspath(os.fspath(path))     # a later chdir changes nothing
        self.uuid = disk_uuid
        self._key = key

    def _mac(self, signed: bytes) -> bytes:
        return hmac.new(self._key, signed, hashlib.sha256).digest()

    def read(self) -> int:
        """The commit sequence the anchor vouches for; AnchorError if it cannot vouch."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read(_ANCHOR.size + 1)
        except FileNotFoundError:
            raise AnchorError(f"the anchor {self.path} is missing: rollback cannot be ruled "
                              f"out (accept_rollback / --accept-rollback starts a new one)") from None
        except OSError as e:
            raise AnchorError(f"the anchor {self.path} cannot be read: {e.strerror}") from None
        if len(raw) != _ANCHOR.size or raw[:8] != ANCHOR_MAGIC:
            raise AnchorError(f"{self.path} is not a SwornDisk anchor")
        magic, version, _r, disk_uuid, seq, mac = _ANCHOR.unpack_from(raw)
        if version != ANCHOR_VERSION:
            raise AnchorError(f"the anchor {self.path} has version {version}; this sworndisk "
                              f"reads version {ANCHOR_VERSION}")
        if disk_uuid != self.uuid:
            raise AnchorError(f"the anchor {self.path} belongs to another disk (uuid "
                              f"{disk_uuid.hex()}, this disk is {self.uuid.hex()})")
        if not hmac.compare_digest(mac, self._mac(raw[:_SIGNED])):
            raise AnchorError(f"the anchor {self.path} fails authentication: it was forged "
                              f"or damaged")
        return seq

    def write(self, commit_seq: int) -> None:
        """Durably replace the anchor with `commit_seq`: the new file or the old one, never
        a mix, and on stable storage (file and directory entry) when this returns."""
        signed = _ANCHOR.pack(ANCHOR_MAGIC, ANCHOR_VERSION, 0, self.uuid, commit_seq,
                              bytes(32))[:_SIGNED]
        directory = os.path.dirname(self.path)
        tmp = os.path.join(directory, f".{os.path.basename(self.path)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            blob = signed + self._mac(signed)
            if os.write(fd, blob) != len(blob):
                raise OSError(f"{tmp}: short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)




def attach_anchor(path: str, disk_uuid: bytes, key: bytes, commit_seq: int,
                  accept_rollback: bool, read_only: bool) -> Anchor:
    """Checks a disk at `commit_seq` against its anchor and moves the anchor to it (not
    for a read-only disk: it only checks). RollbackError if the disk is older than the
    anchor, AnchorError if the anchor is missing or forged, unless `accept_rollback`."""
    anchor = Anchor(path, disk_uuid, key)
    try:
        seq: int | None = anchor.read()
    except AnchorError:
        if not accept_rollback:
            raise
        seq = None
    if seq is not None and commit_seq < seq and not accept_rollback:
        raise RollbackError(
            f"the disk was rolled back: its last commit is {commit_seq}, but the "
            f"anchor {path} says commit {seq} was made", commit_seq, seq)
    if not read_only and seq != commit_seq:
        anchor.write(commit_seq)
    return anchor


__all__ = ["Anchor", "attach_anchor"]
