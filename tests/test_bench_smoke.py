"""tools/bench: the CryptDisk baseline is dm-crypt's format, and the benchmark runs end to end
at depth, with charts.

Correctness only (tiny sizes); the numbers it prints are not checked. The runs use CryptDisk
alone, so they do not depend on the engine, except one small SwornDisk run at depth.
"""
import json
import os
import sys

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sworndisk.device import MemoryDevice
from sworndisk.errors import DiskClosedError, IntegrityError, InvalidArgument
from tools.bench.cli import main
from tools.bench.cryptdisk import CryptDisk
from tools.bench.disks import CountingDevice
from tools.bench.workloads import Payload, VerifyError, random_read, random_write

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


def test_cryptdisk_batches_are_the_same_blocks_in_one_device_call_each():
    dev = CountingDevice(MemoryDevice(64 * 4096))
    disk = CryptDisk(dev, KEY)
    payload = Payload(4, seed=2)
    items = [(9, payload.blocks(9, 1)), (0, payload.blocks(0, 4)), (40, payload.blocks(40, 2))]
    disk.write_many(items)
    assert dev.writes == 3 and dev.bytes_written == 7 * 4096
    for lba, data in items:
        for i in range(len(data) // 4096):
            block = data[i * 4096:(i + 1) * 4096]
            assert dev.inner.buf[(lba + i) * 4096:(lba + i + 1) * 4096] == xts(lba + i, block)
    reads = dev.reads
    got = disk.read_many([(lba, len(data) // 4096) for lba, data in items])
    assert dev.reads == reads + 3
    assert [bytes(g) for g in got] == [data for _, data in items]
    with pytest.raises(InvalidArgument):
        disk.read_many([(0, 1), (63, 2)])                    # checked before any I/O
    with pytest.raises(InvalidArgument):
        disk.write_many([(0, payload.blocks(0, 1)), (64, payload.blocks(64, 1))])
    assert dev.reads == reads + 3 and dev.writes == 3


class _FailingReads:
    """read_many as SwornDisk answers it when one range fails verification."""

    def __init__(self, disk):
        self.disk = disk

    def read_many(self, ranges):
        out = self.disk.read_many(ranges)
        out[-1] = IntegrityError("tampered")
        return out


class _Batches(MemoryDevice):
    """Records the size of every pread_many / pwrite_many call."""

    def __init__(self, size):
        super().__init__(size)
        self.batches = []
        self.flushes = 0

    def pwrite_many(self, items):
        self.batches.append(("w", len(items)))
        super().pwrite_many(items)

    def pread_many(self, items):
        self.batches.append(("r", len(items)))
        return super().pread_many(items)

    def flush(self):
        self.flushes += 1


def test_depth_batches_requests_and_a_failed_range_fails_the_workload():
    dev = _Batches(64 * 4096)
    disk = CryptDisk(dev, KEY)
    payload = Payload(1, seed=3)
    lbas = list(range(0, 40, 2))
    assert random_write(disk, lbas, payload, depth=8)() == (20, 20 * 4096)
    assert dev.batches == [("w", 8), ("w", 8), ("w", 4)] and dev.flushes == 1
    assert random_read(disk, lbas, depth=8)() == (20, 20 * 4096)
    assert dev.batches[3:] == [("r", 8), ("r", 8), ("r", 4)]
    with pytest.raises(IntegrityError):
        random_read(_FailingReads(disk), lbas, depth=8)()


def _run_cryptdisk(tmp_path, *extra):
    out = tmp_path / "bench.json"
    rc = main(["--quick", "--disks", "cryptdisk", "--size", "8M", "--ops", "300", "--repeat", "1",
               "--seq-size", "4M", "--dir", str(tmp_path), "--json", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_bench_quick_runs_cryptdisk_suite_and_aging(tmp_path, capsys):
    rc, doc = _run_cryptdisk(tmp_path, "--depth", "1", "--aging", "--aging-size", "4M",
                             "--aging-passes", "2", "--utilisations", "50")
    assert rc == 0
    text = capsys.readouterr().out
    assert "rand write 4K" in text and "aging" in text
    (depth1,) = doc["suite"]
    assert depth1["depth"] == 1
    (run,) = depth1["disks"]["cryptdisk"]["runs"]
    assert run["error"] is None and run["rss_peak_kib"] >= run["rss_start_kib"] > 0
    best = depth1["disks"]["cryptdisk"]["best"]["workloads"]
    assert set(best) == {"randwrite", "randread", "seqwrite", "seqread"}
    for result in best.values():
        assert result["mb_per_s"] > 0 and result["ops"] > 0 and result["cpu_us_per_block"] > 0
    assert best["randwrite"]["write_amplification"] == 1.0
    aging = doc["aging"][0]["cryptdisk"]
    assert aging["error"] is None and aging["steady"]["write_amplification"] == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]   # images deleted


def test_bench_depths_profile_and_plot(tmp_path, capsys):
    charts = tmp_path / "charts"
    rc, doc = _run_cryptdisk(tmp_path, "--depth", "1,4", "--workloads", "randwrite,randread",
                             "--profile", "5", "--plot", str(charts), "--in-process")
    assert rc == 0
    text = capsys.readouterr().out
    assert "CPU time per 4 KiB block" in text and "CryptDisk, rand read 4K, depth 4" in text
    assert [e["depth"] for e in doc["suite"]] == [1, 4]
    for entry in doc["suite"]:
        best = entry["disks"]["cryptdisk"]["best"]
        assert best["depth"] == entry["depth"] and set(best["workloads"]) == {"randwrite",
                                                                              "randread"}
        assert len(best["profiles"]["randread"]["rows"]) == 5
    pngs = sorted(p.name for p in charts.iterdir())
    assert pngs == ["cpu.png", "throughput.png"]               # no aging run: no aging chart
    assert all((charts / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # charts again from the saved JSON, without running anything
    again = tmp_path / "again"
    assert main(["--plot", str(again), "--from-json", str(tmp_path / "bench.json")]) == 0
    assert sorted(p.name for p in again.iterdir()) == pngs


def test_bench_sworndisk_at_depth(tmp_path):
    rc, doc = _run_cryptdisk(tmp_path, "--disks", "sworndisk,cryptdisk", "--depth", "1,8",
                             "--in-process")
    assert rc == 0
    for entry in doc["suite"]:
        assert set(entry["ratios"]) == {"randwrite", "randread", "seqwrite", "seqread"}
        assert entry["disks"]["sworndisk"]["best"]["engine_stats"]
    assert doc["suite"][1]["targets"] == {} and doc["suite"][0]["targets"]["randwrite"][
        "minimum"] == 4.0


def test_bench_scaling_table_workers_0_and_n_and_its_chart(tmp_path, capsys):
    charts = tmp_path / "charts"
    rc, doc = _run_cryptdisk(tmp_path, "--disks", "sworndisk,cryptdisk", "--depth", "1,8",
                             "--scaling", "--crypto-workers", "1", "--plot", str(charts))
    assert rc == 0
    text = capsys.readouterr().out
    assert "scaling: SwornDisk with 0 crypto workers" in text and "vs w0" in text
    assert "together MiB" in text and "crypto workers: 1" in text
    worked = 0.0
    for entry in doc["suite"]:
        inline = entry["workers0"]["best"]
        pooled = entry["disks"]["sworndisk"]["best"]
        assert inline["crypto_workers"] == 0 and pooled["crypto_workers"] == 1
        assert inline["workers_rss_peak_kib"] == 0 and pooled["workers_rss_peak_kib"] > 0
        assert set(entry["workers_ratios"]) == {"randwrite", "randread", "seqwrite", "seqread"}
        for w, r in inline["workloads"].items():
            assert r["worker_us_per_block"] == 0 and 0 < r["thread_us_per_block"], w
        for w, r in pooled["workloads"].items():
            assert 0 < r["thread_us_per_block"] <= r["cpu_us_per_block"] + 1e-9, w
            worked += r["worker_us_per_block"]
    assert worked > 0                                  # the workers' CPU was counted
    # The reads again straight from CryptDisk's image, and what 2 cores could make of them.
    assert "what more cores could give reads at most" in text
    for entry in doc["suite"]:
        device = entry["disks"]["cryptdisk"]["best"]["device"]
        assert sorted(device) == ["randread", "seqread"]
        assert all(d["user_bytes"] > 0 and d["seconds"] > 0 for d in device.values())
        assert sorted(entry["ceilings"]) == ["randread", "seqread"]
        for c in entry["ceilings"].values():
            assert c["cores"] == min(2, os.cpu_count()) and 0 < c["device_share"]
            assert c["vs_w0"] >= 1 and c["most_mb_per_s"] > 0
            assert 0 < c["together"] <= 1
            assert c["bound"] == (c["together"] >= 0.9 and c["request_bytes"] == 4096)
    assert doc["suite"][1]["workers_targets"] == {}      # depth 8: the issue sets none
    assert doc["suite"][0]["workers_targets"]["randread"] == 0.9
    assert sorted(p.name for p in charts.iterdir()) == ["cpu.png", "scaling.png",
                                                         "throughput.png"]


@pytest.mark.parametrize("warm", [False, True])
def test_reads_are_measured_on_reopened_disks_unless_warm(tmp_path, monkeypatch, warm):
    from tools.bench.disks import BenchDisk
    real, reopened = BenchDisk.reopen, []

    def counted(self):
        reopened.append(self.kind)
        real(self)
    monkeypatch.setattr(BenchDisk, "reopen", counted)
    rc, doc = _run_cryptdisk(tmp_path, "--disks", "sworndisk,cryptdisk", "--depth", "4",
                             "--crypto-workers", "0", "--in-process",
                             *(["--warm-reads"] if warm else []))
    assert rc == 0
    assert sorted(reopened) == ([] if warm else ["cryptdisk"] * 2 + ["sworndisk"] * 2)
    stats = doc["suite"][0]["disks"]["sworndisk"]["best"]["engine_stats"]
    # A reopened disk's session counts only what was read since the last open.
    read_since_open = stats["session"]["user_blocks_read"]
    assert (read_since_open == 4 << 20 >> 12) if not warm else read_since_open > 4 << 20 >> 12


def test_plot_without_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib fails
    assert main(["--quick", "--disks", "cryptdisk", "--plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pip install" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []                     # nothing ran


@pytest.mark.parametrize("argv", [["--depth", "0"], ["--depth", "x"], ["--from-json", "f"],
                                  ["--size", "3k"], ["--crypto-workers", "-1"],
                                  ["--crypto-workers", "two"]])
def test_bad_arguments_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        rc = main(argv)
        raise SystemExit(rc)
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_failed_run_is_reported_and_the_others_still_count(tmp_path, capsys, monkeypatch):
    import tools.bench.cli as cli
    real, calls = cli.run_suite, []

    def flaky(*args):
        calls.append(args)
        if len(calls) == 1:
            raise ImportError("a half-edited module")
        return real(*args)
    monkeypatch.setattr(cli, "run_suite", flaky)
    rc, doc = _run_cryptdisk(tmp_path, "--depth", "1", "--repeat", "2", "--workloads",
                             "randread", "--in-process")
    assert rc == 1 and len(calls) == 2
    text = capsys.readouterr().out
    assert "CryptDisk at depth 1: 1 of 2 run(s) failed" in text
    (entry,) = doc["suite"]
    assert entry["disks"]["cryptdisk"]["best"]["workloads"]["randread"]["mb_per_s"] > 0


def test_fastest_possible_is_amdahl_over_the_device_time():
    from tools.bench.suite import fastest_possible
    from tools.bench.workloads import WorkloadResult

    def mbs(seconds):     # 1 MB in `seconds`
        return WorkloadResult("randread", 1, 1_000_000, seconds, 0.0, 0, 0)
    # w0: 10 s, of which the device alone takes 6: 2 cores halve the other 4.
    assert fastest_possible(mbs(10), mbs(6), 2) == pytest.approx(1 / 8)
    assert fastest_possible(mbs(10), mbs(6), 1) == pytest.approx(1 / 10)
    # A device measured slower than the disk on top of it (noise): nothing to gain.
    assert fastest_possible(mbs(10), mbs(12), 4) == pytest.approx(1 / 10)


def test_raw_disk_reads_every_range_from_the_image_and_fails_a_short_one(tmp_path):
    from tools.bench.workloads import RawDisk
    path = tmp_path / "image"
    path.write_bytes(os.urandom(1 << 20))              # 256 blocks
    fd = os.open(path, os.O_RDONLY)
    raw = RawDisk(fd)
    try:
        got = raw.read_many([(0, 1), (255, 1), (8, 16)])
        assert [len(b) for b in got] == [4096, 4096, 16 * 4096]
        Payload.check(8, got[2])                       # answered as a NullDisk would
        with pytest.raises(OSError, match="raw device read failed"):
            raw.read_many([(0, 1), (256, 1)])          # past the end: a short read
    finally:
        raw.close()
        os.close(fd)
