"""tools/bench: the CryptDisk baseline is dm-crypt's format, and the benchmark runs end to end.

Correctness only (tiny sizes, CryptDisk only, so it does not depend on the engine); the
numbers it prints are not checked.
"""
import json

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sworndisk.device import MemoryDevice
from sworndisk.errors import DiskClosedError, InvalidArgument
from tools.bench.cli import main
from tools.bench.cryptdisk import CryptDisk
from tools.bench.disks import CountingDevice
from tools.bench.workloads import Payload, VerifyError

KEY = bytes(range(64))


def xts(lba: int, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(KEY), modes.XTS(lba.to_bytes(16, "little"))).encryptor()
    return enc.update(data) + enc.finalize()


def test_cryptdisk_is_aes_xts_in_place_with_lba_tweak():
    dev = CountingDevice(MemoryDevice(16 * 4096))
    disk = CryptDisk(dev, KEY)
    payload = Payload(4, seed=1)
    data = payload.blocks(5, 3)
    disk.write(5, data)
    disk.flush()
    assert dev.writes == 1 and dev.bytes_written == 3 * 4096   # one device write per request
    for i in range(3):
        block = data[i * 4096:(i + 1) * 4096]
        assert dev.inner.buf[(5 + i) * 4096:(6 + i) * 4096] == xts(5 + i, block)
    assert disk.read(5, 3) == data
    assert disk.read(6, 1) == data[4096:8192]
    Payload.check(5, disk.read(5, 3))
    with pytest.raises(VerifyError):
        Payload.check(4, disk.read(5, 1))
    with pytest.raises(InvalidArgument):
        disk.write(15, data)                                  # past the end
    with pytest.raises(InvalidArgument):
        disk.write(0, b"x" * 100)                             # not whole blocks
    disk.close()
    with pytest.raises(DiskClosedError):
        disk.read(0, 1)


def test_bench_quick_runs_cryptdisk_suite_and_aging(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["--quick", "--disks", "cryptdisk", "--size", "8M", "--ops", "300", "--repeat", "1",
               "--seq-size", "4M", "--aging", "--aging-size", "4M", "--aging-passes", "2",
               "--utilisations", "50", "--dir", str(tmp_path), "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "rand write 4K" in text and "aging" in text
    doc = json.loads(out.read_text())
    (run,) = doc["suite"]["cryptdisk"]["runs"]
    assert run["error"] is None and run["rss_peak_kib"] >= run["rss_start_kib"] > 0
    best = doc["suite"]["cryptdisk"]["best"]["workloads"]
    assert set(best) == {"randwrite", "randread", "seqwrite", "seqread"}
    for result in best.values():
        assert result["mb_per_s"] > 0 and result["ops"] > 0
    assert best["randwrite"]["write_amplification"] == 1.0
    aging = doc["aging"][0]["cryptdisk"]
    assert aging["error"] is None and aging["steady"]["write_amplification"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]   # images deleted
