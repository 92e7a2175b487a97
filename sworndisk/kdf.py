"""Key-encryption keys for the key slots: a key file through HMAC, a passphrase through Argon2id.

A key file is already a random key, so its slot key is one HMAC with the slot's salt. A
passphrase is stretched with Argon2id (`cryptography`'s), memory-hard so that each guess
costs an attacker the memory and time it costs us. Its parameters are stored in the slot
(docs/format.md), so each slot keeps the cost it was given when it was made, and are
calibrated like cryptsetup's: at least 4 passes over as much memory as the target time
allows, up to min(1 GiB, half the RAM).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass

from .errors import InvalidArgument
from .format import LABEL_KEY_FILE_KEK

SALT_BYTES = 32
KEK_BYTES = 32
DEFAULT_ITER_TIME_MS = 1000      # cryptsetup's --iter-time, for Argon2id
MAX_MEMORY_KIB = 1 << 20         # 1 GiB, as cryptsetup
MIN_ITERATIONS = 4               # cryptsetup's floor for a calibrated Argon2id
MIN_CALIBRATED_KIB = 1024        # below this, a slow machine gets fewer KiB, not more time
_PROBE_MAX_KIB = 32 * 1024       # probes grow (x4) to this size or until one takes _PROBE_S
_PROBE_S = 0.1
LIMIT_MEMORY_KIB = 4 << 20       # 4 GiB
LIMIT_ITERATIONS = 1000
LIMIT_LANES = 64


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost: memory in KiB, passes over it, parallel lanes."""
    memory_kib: int
    iterations: int
    lanes: int = 1

    def validate(self) -> "KdfParams":
        if self.lanes < 1 or self.iterations < 1:
            raise InvalidArgument("Argon2id needs at least one pass and one lane")
        if self.memory_kib < 8 * self.lanes:
            raise InvalidArgument(f"Argon2id needs at least 8 KiB of memory per lane "
                                  f"(got {self.memory_kib} KiB for {self.lanes} lanes)")
        # Bounds on what a slot may ask for: its parameters are read before anything is
        # authenticated, so a forged slot must not make open allocate or spin forever.
        if self.memory_kib > LIMIT_MEMORY_KIB or self.iterations > LIMIT_ITERATIONS \
                or self.lanes > LIMIT_LANES:
            raise InvalidArgument(f"Argon2id parameters out of range (at most "
                                  f"{LIMIT_MEMORY_KIB} KiB, {LIMIT_ITERATIONS} passes, "
                                  f"{LIMIT_LANES} lanes)")
        return self


def new_salt() -> bytes:
    return os.urandom(SALT_BYTES)


def key_file_kek(key: bytes, salt: bytes) -> bytes:
    """A key file's slot key: it is random already, so no stretching."""
    return hmac.new(key, LABEL_KEY_FILE_KEK + salt, hashlib.sha256).digest()


def argon2id(passphrase: bytes, salt: bytes, params: KdfParams) -> bytes:
    """A passphrase's slot key."""
    from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
    p = params.validate()
    return Argon2id(salt=salt, length=KEK_BYTES, iterations=p.iterations, lanes=p.lanes,
                    memory_cost=p.memory_kib).derive(passphrase)


def memory_cap_kib() -> int:
    """min(1 GiB, half the RAM): what a calibrated slot may ask for at most."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
    except (ValueError, OSError):
        return MAX_MEMORY_KIB
    return max(MIN_CALIBRATED_KIB, min(MAX_MEMORY_KIB, ram // 2))


def default_lanes() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def calibrate(iter_time_ms: int = DEFAULT_ITER_TIME_MS, memory_kib: int | None = None,
              iterations: int | None = None) -> KdfParams:
    """Parameters that take about `iter_time_ms` here; a value given is kept as is.

    One probe measures the cost of a pass over a KiB; Argon2id's time is close to
    proportional to memory x passes, so the rest is arithmetic."""
    if iter_time_ms <= 0:
        raise InvalidArgument(f"the iteration time must be positive (got {iter_time_ms} ms)")
    lanes = default_lanes()
    if memory_kib is not None:
        lanes = max(1, min(lanes, memory_kib // 8))
    if memory_kib is not None and iterations is not None:
        return KdfParams(memory_kib, iterations, lanes).validate()
    cap = memory_cap_kib()
    per_kib_pass = _per_kib_pass(lanes, min(_PROBE_MAX_KIB, cap))
    budget = iter_time_ms / 1000 / per_kib_pass          # KiB x passes in the target time
    if memory_kib is not None:
        return KdfParams(memory_kib, max(1, int(budget // memory_kib)), lanes).validate()
    if iterations is not None:
        mem = int(min(cap, max(MIN_CALIBRATED_KIB, budget // iterations)))
        return KdfParams(mem, iterations, lanes).validate()
    mem = int(min(cap, max(MIN_CALIBRATED_KIB, budget // MIN_ITERATIONS)))
    # Larger memory costs more per KiB (caches, TLB): time one pass at the chosen size
    # (a quarter of the target at most) and settle the passes on that.
    per_kib_pass = max(_timed(KdfParams(mem, 1, lanes)), 1e-6) / mem
    budget = iter_time_ms / 1000 / per_kib_pass
    if budget < mem * MIN_ITERATIONS:
        mem = int(max(MIN_CALIBRATED_KIB, budget // MIN_ITERATIONS))
    return KdfParams(mem, max(MIN_ITERATIONS, int(budget // mem)), lanes).validate()


def _per_kib_pass(lanes: int, largest: int) -> float:
    """Seconds per KiB and pass: from a probe large enough to time (and to leave the CPU
    caches), small enough not to take long on a slow machine (an emulator)."""
    argon2id(b"warm-up", bytes(SALT_BYTES), KdfParams(8 * lanes, 1, lanes))   # not timed
    kib = min(1024, largest)
    while True:
        took = min(_timed(KdfParams(kib, 1, lanes)) for _ in range(2))   # the less disturbed
        if took >= _PROBE_S or kib >= largest:
            return max(took, 1e-6) / kib
        kib = min(largest, kib * 4)


def _timed(params: KdfParams) -> float:
    t0 = time.perf_counter()
    argon2id(b"calibration", bytes(SALT_BYTES), params)
    return time.perf_counter() - t0


__all__ = ["KdfParams", "argon2id", "calibrate", "key_file_kek", "memory_cap_kib", "new_salt"]
