"""The two AEAD backends write the same format: an image written with one reads back
identically with the other, both ways, for 16- and 32-byte root keys and both cipher key
sizes; tampering is detected by either."""
from __future__ import annotations

import random

import pytest

from sworndisk import Config, IntegrityError, SwornDisk, crypto

from .conftest import BS, KEY16, KEY32, MiB, Model, make_blocks, new_disk, verify_disk

BACKENDS = ("cryptography", "pycryptodome")
NR = 512


@pytest.fixture(autouse=True)
def restore_backend():
    before = crypto.backend_name()
    yield
    crypto.set_backend(before)
    assert crypto.backend_name() == before


def _fill(disk, seed):
    rng = random.Random(seed)
    model = Model(NR)
    for i in range(120):
        lba = rng.randrange(NR)
        n = min(rng.randint(1, 8), NR - lba)
        buf = make_blocks(rng, lba, n, i)
        disk.write(lba, buf)
        model.write(lba, buf)
        if i % 10 == 9:
            disk.flush()
        if i % 37 == 0:
            lba = rng.randrange(NR - 4)
            disk.discard(lba, 4)
            model.discard(lba, 4)
    return model


@pytest.mark.parametrize("writer,reader", [("cryptography", "pycryptodome"),
                                           ("pycryptodome", "cryptography")])
@pytest.mark.parametrize("key,cipher", [(KEY16, 16), (KEY32, 32), (KEY16, 32)],
                         ids=["k16-c16", "k32-c32", "k16-c32"])
def test_cross_backend(writer, reader, key, cipher):
    crypto.set_backend(writer)
    assert crypto.backend_name() == writer
    cfg = Config(memtable_records=32, level_ratio=2, cipher_key_bytes=cipher)
    disk, data, meta = new_disk(24 * MiB, NR, cfg, key=key)
    model = _fill(disk, seed=cipher + len(key))
    # leave unflushed-but-closed data and a journal tail to replay: flush without close
    disk.flush()
    crypto.set_backend(reader)
    assert crypto.backend_name() == reader
    d = SwornDisk.open(data, meta, key)          # crash-style recovery with the other backend
    verify_disk(d, model, f"{writer}->{reader} (recovery)", lbas=range(NR))
    # the reader writes too; the writer reads it back
    rng = random.Random(1)
    for i in range(30):
        lba = rng.randrange(NR)
        buf = make_blocks(rng, lba, 1, 1000 + i)
        d.write(lba, buf)
        model.write(lba, buf)
    d.close()
    crypto.set_backend(writer)
    d = SwornDisk.open(data, meta, key)
    verify_disk(d, model, f"{reader}->{writer} (clean)", lbas=range(NR))
    d.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_detects_tampering(backend):
    crypto.set_backend(backend)
    disk, data, meta = new_disk(24 * MiB, NR, Config(memtable_records=32))
    before = bytes(data.buf)
    disk.write(3, b"t" * BS)
    disk.close()
    changed = [o for o in range(0, len(data.buf), BS) if data.buf[o:o + BS] != before[o:o + BS]]
    assert changed
    for o in changed:
        data.buf[o] ^= 1
    d = SwornDisk.open(data, meta, KEY16)
    with pytest.raises(IntegrityError):
        d.read(3, 1)
    d.close()


def test_same_ciphertext_both_backends():
    """Same key/nonce/plaintext/AAD -> same bytes (standard AES-GCM)."""
    out = []
    for b in BACKENDS:
        crypto.set_backend(b)
        out.append(crypto.encrypt(b"k" * 16, b"n" * 12, b"p" * 100, b"aad"))
        assert crypto.decrypt(b"k" * 16, b"n" * 12, out[-1][0], out[-1][1], "x", b"aad") \
            == b"p" * 100
        with pytest.raises(IntegrityError):
            crypto.decrypt(b"k" * 16, b"n" * 12, out[-1][0], out[-1][1], "x", b"aaD")
    assert out[0] == out[1]


def test_unknown_backend():
    from sworndisk import InvalidArgument
    with pytest.raises(InvalidArgument):
        crypto.set_backend("rot13")
