"""`check`: verify every structure reachable from the newest checkpoint, writing nothing.

The disk is opened read-only (readonly.py: recovery runs in memory, nothing can reach
the devices), then each structure is read and verified on its own, as fsck -n would:

- both superblock copies (checksum, generation, authentication under the master key);
- both checkpoint slots (the trusted pack was verified by recovery; the other one is the
  previous pack or an unfinished one);
- the journal: the chain recovery followed, the older blocks still in the ring, and what
  follows the chain's end (a failing block there followed by blocks that verify means the
  history was cut short);
- every node of every BIT (authentication, kind and height, LBA order and bounds, the
  chunks the catalog lists, the record count);
- every segment-table block the pack's directory names (authentication, valid count);
- the space accounting against the index: every live record's block is named by its
  segment's reverse index, and each segment's valid count is what the index maps to it;
- with data_blocks, every live data block (authentication under its record).

Problems are collected with where they are, never raised: a report, not a verdict on the
first failure. What stops a check from running (wrong key, no SwornDisk, devices in use)
is raised as the engine's errors.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np

from . import crypto, superblock as sbmod
from .bit import Bit
from .checkpoint import read_pack
from .errors import IntegrityError
from .format import (BLOCK_SIZE, DETAIL_NONE, INDEX_CHUNK_BLOCKS, JOURNAL_HEADER,
                     JOURNAL_MAGIC, NO_BLOCK, NODE_INTERNAL, NODE_LEAF, PACK_HEADER, PACK_MAGIC,
                     SEGMENT_BLOCKS, TOMBSTONE_HBA, segdir_dtype)
from .merge import merge_streams
from .superblock import Credential, Unlocked

Progress = Callable[[str, int, int], None]     # (stage, done, total)
_BATCH = 4096                                  # records per step of the index walk


@dataclass(frozen=True)
class Problem:
    where: str          # "meta block 1234 (BIT 3 node)", "data block 77 (LBA 5)", ...
    what: str


@dataclass
class CheckReport:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)        # worth saying, not wrong
    checked: dict[str, int] = field(default_factory=dict)  # what was verified, by kind
    nr_blocks: int = 0          # the logical size the verified superblock gives (0: none)

    @property
    def clean(self) -> bool:
        return not self.problems

    def problem(self, where: str, what: str) -> None:
        self.problems.append(Problem(where, what))

    def count(self, what: str, n: int = 1) -> None:
        self.checked[what] = self.checked.get(what, 0) + n

    def as_dict(self) -> dict:
        return {"clean": self.clean, "problems": [asdict(p) for p in self.problems],
                "notes": list(self.notes), "checked": dict(self.checked),
                "nr_blocks": self.nr_blocks}


def check(data, meta, key=None, *, passphrase=None, data_blocks: bool = False,
          progress: Progress | None = None) -> CheckReport:
    """Checks the disk on `data` and `meta` with `key` (or `passphrase`); never writes."""
    from .disk import SwornDisk
    cred = Credential.of(key, passphrase)
    report = CheckReport()
    kept: dict = {}

    def unlock(blocks: list[bytes]) -> Unlocked:
        kept["blocks"] = blocks
        try:
            kept["unlocked"] = sbmod.unlock(blocks, cred)
        except IntegrityError as e:
            report.problem("meta blocks 0-1 (superblock)", str(e))
            raise
        return kept["unlocked"]

    try:
        disk = SwornDisk._open(data, meta, unlock, read_only=True)
    except IntegrityError as e:
        if "unlocked" in kept:
            _superblocks(report, kept["blocks"], kept["unlocked"])
            report.problem("recovery (the newest checkpoint and the journal after it)", str(e))
        return report
    report.nr_blocks = disk.nr_blocks
    try:
        _Checker(disk, report, progress or (lambda stage, done, total: None)).run(
            kept["blocks"], kept["unlocked"], data_blocks)
    finally:
        disk.close()
    return report


def _superblocks(report: CheckReport, blocks: list[bytes], un: Unlocked) -> None:
    for c in (sbmod.parse(b, i) for i, b in enumerate(blocks)):
        where = f"meta block {c.index} (superblock copy {c.index})"
        report.count("superblock copies")
        if not c.usable:
            report.problem(where, c.problem)
        elif c.generation < un.superblock.generation:
            report.problem(where, f"generation {c.generation}, older than the other copy's "
                                  f"{un.superblock.generation}: a key change was interrupted "
                                  f"(the next key change rewrites it)")
        elif c.uuid != un.superblock.uuid or c.superblock(un.master) is None:
            report.problem(where, "fails authentication under the master key: tampered with")


class _Checker:
    def __init__(self, disk, report: CheckReport, progress: Progress):
        self.disk = disk
        self.dbg = disk.debug
        self.layout = disk.layout
        self.report = report
        self.progress = progress
        self.bad_segments: set[int] = set()      # segment-table blocks that failed
        self.index_damaged = False               # a BIT node failed: no accounting then

    def run(self, blocks: list[bytes], un: Unlocked, data_blocks: bool) -> None:
        _superblocks(self.report, blocks, un)
        self.packs()
        self.journal()
        self.bits()
        self.segment_table()
        self.accounting(data_blocks)

    # ---- checkpoint slots ----
    def packs(self) -> None:
        lay, pseq = self.layout, self.dbg.protocol.pack_seq
        for slot in (0, 1):
            start = lay.checkpoint_slot(slot)
            pack = read_pack(self.dbg.meta, self.dbg.protocol.disk_key, start,
                             lay.checkpoint_blocks, segdir_dtype(self.disk.config.cipher_key_bytes))
            self.report.count("checkpoint slots")
            if pack is not None:
                continue
            magic, seq, _nonce, _len = PACK_HEADER.unpack_from(
                self.dbg.meta.pread(BLOCK_SIZE, start * BLOCK_SIZE))
            if magic != PACK_MAGIC:
                continue                       # never written
            where = f"meta block {start} (checkpoint slot {slot}, pack {seq})"
            if seq > pseq:
                self.report.notes.append(f"{where}: an unfinished checkpoint (a crash during "
                                         f"a checkpoint); harmless, the next one replaces it")
            else:
                self.report.problem(where, "fails to verify: damaged (recovery does not need "
                                           "this older pack now)")

    # ---- journal ----
    def journal(self) -> None:
        j = self.dbg.journal
        n, head, anchor = j.nblocks, j.head_seq, j.anchor_seq
        self.report.count("journal blocks", head - anchor)     # verified by recovery
        where = lambda seq: f"meta block {j.start + seq % n} (journal block {seq})"
        for seq in range(max(1, head - n), anchor):
            self.progress("journal", seq, anchor)
            self.report.count("journal blocks")
            if not j.verifies(j.block(seq), seq):
                self.report.problem(where(seq), "fails to verify: damaged (it is older than "
                                                "the checkpoint, so recovery no longer needs it)")
        # Past the chain's end: blocks written in this lap that recovery did not accept.
        bad, later = None, 0
        for seq in range(head, anchor + n):
            blk = j.block(seq)
            magic, hseq, _nonce = JOURNAL_HEADER.unpack_from(blk)
            if magic != JOURNAL_MAGIC or hseq != seq:
                break
            if j.verifies(blk, seq):
                later += bad is not None
            elif bad is None:
                bad = seq
        if bad is not None and later:
            self.report.problem(where(bad), f"fails to verify, and {later} later journal blocks "
                                            f"do: the history was cut short here, the commits "
                                            f"after it are lost")
        elif bad is not None:
            self.report.notes.append(
                f"{where(bad)}, after the last commit, fails to verify: a write torn by a crash "
                f"(that flush never completed), an earlier disk's leftovers, or damage to the "
                f"last commit (which cannot be told apart)")

    # ---- index ----
    def bits(self) -> None:
        bits = self.dbg.index.bits()
        owner: dict[int, int] = {}
        for bit in bits:
            for c in bit.meta.chunks:
                if c in owner:
                    self.report.problem(f"index chunk {c}", f"listed by BIT {owner[c]} and BIT "
                                                            f"{bit.meta.bit_id}")
                owner[c] = bit.meta.bit_id
                if self.dbg.ispace.state[c] == 0:
                    self.report.problem(f"index chunk {c}", f"holds BIT {bit.meta.bit_id} but "
                                                            f"the chunk map says it is free")
        for i, bit in enumerate(bits):
            self.progress("index", i, len(bits))
            self._bit(bit)

    def _bit(self, bit: Bit) -> None:
        m, fmt, lay = bit.meta, self.dbg.fmt, self.layout
        chunks = set(m.chunks)
        stack = [(m.root, m.height, m.lba_min, m.lba_max)]
        records, damaged = 0, False
        while stack:
            entry, height, lo, hi = stack.pop()
            hba = fmt.hba_of(entry)
            where = f"meta block {hba} (BIT {m.bit_id}, level {m.level}, height {height})"
            self.report.count("BIT nodes")
            if (hba - lay.index_start) // INDEX_CHUNK_BLOCKS not in chunks or hba < lay.index_start:
                self.report.problem(where, "outside the index chunks its BIT lists")
                damaged = True
                continue
            try:
                kind, recs = self.dbg.state.index.store.node(entry, f"BIT {m.bit_id} node")
            except IntegrityError as e:       # the message names the node; keep the verdict
                self.report.problem(where, str(e).split(f" at meta block {hba} ", 1)[-1])
                damaged = True
                continue
            lbas = recs["lba"]
            if kind != (NODE_LEAF if height == 0 else NODE_INTERNAL) or len(recs) == 0:
                self.report.problem(where, "node kind or size does not match its place in the tree")
                damaged = True
                continue
            if np.any(lbas[1:] <= lbas[:-1]) or lbas[0] < lo or lbas[-1] > hi:
                self.report.problem(where, f"records out of order or outside LBAs {lo}..{hi}")
            if height == 0:
                records += len(recs)
                continue
            bounds = list(lbas[1:].tolist()) + [hi + 1]
            for c in range(len(recs)):
                stack.append((fmt.value_at(recs, c), height - 1, int(lbas[c]), bounds[c] - 1))
        self.report.count("BITs")
        self.index_damaged |= damaged
        if not damaged and records != m.count:
            self.report.problem(f"BIT {m.bit_id} (level {m.level})",
                                f"holds {records} records; its catalog entry says {m.count}")

    # ---- segment table ----
    def segment_table(self) -> None:
        st = self.dbg.segtable
        lay = self.layout
        for seg in range(st.nseg):
            e = st.dir[seg]
            hba = int(e["hba"])
            if e["hba"] == NO_BLOCK:
                continue
            self.progress("segment table", seg, st.nseg)
            where = f"meta block {hba} (segment table, data segment {seg})"
            self.report.count("segment table blocks")
            if not lay.segtable_start <= hba < lay.segtable_start + lay.segtable_blocks:
                self.report.problem(where, "outside the segment table region")
                self.bad_segments.add(seg)
                continue
            try:
                pt = crypto.decrypt(e["key"].tobytes(), e["nonce"].tobytes(),
                                    self.dbg.meta.pread(BLOCK_SIZE, hba * BLOCK_SIZE),
                                    e["mac"].tobytes(), "segment table block")
            except IntegrityError as err:
                self.report.problem(where, str(err))
                self.bad_segments.add(seg)
                continue
            valid = int((np.frombuffer(pt, np.uint32) != DETAIL_NONE).sum())
            if valid != int(e["count"]):
                self.report.problem(where, f"names {valid} valid blocks; the checkpoint's "
                                           f"directory says {int(e['count'])}")
                self.bad_segments.add(seg)

    # ---- accounting and data ----
    def _live(self) -> Iterator[np.ndarray]:
        """The live index, newest record per LBA, tombstones dropped, in LBA order."""
        index = self.dbg.index
        mt = index.memtable
        streams = [iter([mt.to_array()] if len(mt) else [])]
        streams += [bit.leaves() for bit in index.bits()]
        for recs in merge_streams(streams, index.fmt):
            recs = recs[recs["hba"] != TOMBSTONE_HBA]
            if len(recs):
                yield recs

    def accounting(self, data_blocks: bool) -> None:
        if self.index_damaged:
            self.report.notes.append("the space accounting and data blocks were not checked: "
                                     "the index is damaged (see above)")
            return
        st = self.dbg.segtable
        counts = np.zeros(st.nseg, np.int64)
        total = sum(b.meta.count for b in self.dbg.index.bits()) + len(self.dbg.index.memtable)
        done = 0
        try:
            for recs in self._live():
                for i in range(0, len(recs), _BATCH):
                    part = recs[i:i + _BATCH]
                    done += len(part)
                    self.progress("data blocks" if data_blocks else "accounting", done, total)
                    self._records(part, counts)
                    if data_blocks:
                        self._data(part)
        except IntegrityError as e:           # the walk above verified every node: a bug
            self.report.problem("index", f"the live index could not be read whole: {e}")
            return
        for seg in np.flatnonzero(counts != st.count).tolist():
            if seg not in self.bad_segments:
                self.report.problem(f"data segment {seg}",
                                    f"the segment table counts {int(st.count[seg])} valid "
                                    f"blocks; the index maps {int(counts[seg])} to it")

    def _records(self, recs: np.ndarray, counts: np.ndarray) -> None:
        st = self.dbg.segtable
        hbas = recs["hba"].astype(np.int64)
        outside = hbas >= st.nseg * SEGMENT_BLOCKS
        for lba, hba in zip(recs["lba"][outside].tolist(), hbas[outside].tolist()):
            self.report.problem(f"LBA {lba}", f"its record names block {hba}, beyond the "
                                              f"data device")
        recs, hbas = recs[~outside], hbas[~outside]
        self.report.count("index records", len(recs))
        segs = hbas // SEGMENT_BLOCKS
        counts += np.bincount(segs, minlength=st.nseg)
        for seg in np.unique(segs).tolist():
            if seg in self.bad_segments:
                continue
            sel = segs == seg
            try:
                detail = st.detail(seg)
            except IntegrityError as e:
                self.report.problem(f"data segment {seg}", str(e))
                self.bad_segments.add(seg)
                continue
            offs, lbas = hbas[sel] % SEGMENT_BLOCKS, recs["lba"][sel]
            wrong = detail[offs] != lbas
            for lba, hba in zip(lbas[wrong].tolist(), hbas[sel][wrong].tolist()):
                self.report.problem(f"data block {hba} (LBA {lba})",
                                    "the index maps the LBA here but the segment table's "
                                    "reverse index does not")

    def _data(self, recs: np.ndarray) -> None:
        fmt, data = self.dbg.fmt, self.dbg.data
        for rec in np.sort(recs, order="hba"):
            hba, key, nonce, mac = fmt.split(rec.tobytes()[8:])
            self.report.count("data blocks")
            try:
                crypto.decrypt(key, nonce, data.pread(BLOCK_SIZE, hba * BLOCK_SIZE), mac,
                               "data block")
            except IntegrityError:
                self.report.problem(f"data block {hba} (LBA {int(rec['lba'])})",
                                    "fails authentication (tampered, replayed or corrupt)")


__all__ = ["check", "CheckReport", "Problem"]
