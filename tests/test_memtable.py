"""The MemTable: a commit's records kept as their array while the table is empty must
answer exactly what the dict would, and become the dict on the first change."""
from __future__ import annotations

import numpy as np

from sworndisk.memtable import MemTable
from sworndisk.records import RecordFormat

FMT = RecordFormat(16)


def _recs(lbas: list[int], tag: int) -> np.ndarray:
    recs = np.zeros(len(lbas), FMT.dtype)
    recs["lba"] = lbas
    recs["hba"] = [tag * 1000 + lba for lba in lbas]
    return recs


def _hba(value: bytes | None) -> int | None:
    return None if value is None else FMT.hba_of(value)


def test_staged_records_answer_as_the_dict_would():
    staged, plain = MemTable(FMT), MemTable(FMT)
    recs = _recs([3, 7, 8, 100], 1)
    staged.stage(recs)
    plain.update(dict(zip(recs["lba"].tolist(), FMT.values_of(recs))))
    assert not staged.is_empty() and staged.map == {}          # kept as the array
    assert len(staged) == len(plain) == 4
    lbas = [0, 3, 8, 9, 100, 101, 3]
    assert staged.find(lbas) == plain.find(lbas)
    assert staged.to_array().tobytes() == plain.to_array().tobytes()
    assert not staged.to_array().flags.writeable               # compacted as it is
    assert staged.map == {}
    assert [_hba(staged.get(l)) for l in lbas] == [_hba(plain.get(l)) for l in lbas]
    assert staged.map == plain.map                             # a dict from here on
    assert staged.split(lbas) == plain.split(lbas)
    assert staged.to_array().tobytes() == plain.to_array().tobytes()


def test_staging_nothing_leaves_the_table_empty():
    mt = MemTable(FMT)
    mt.stage(_recs([], 1))
    assert mt.is_empty() and mt.find([1]) == ([], []) and mt.get(1) is None


def test_a_change_after_staging_keeps_every_record():
    mt = MemTable(FMT)
    mt.stage(_recs([1, 2, 3], 1))
    mt.put(2, FMT.values_of(_recs([2], 9))[0])
    assert [_hba(mt.get(l)) for l in (1, 2, 3)] == [1001, 9002, 1003]
    mt.stage(_recs([3, 4], 5))                                 # not empty: merged in
    assert [_hba(v) for _l, v in mt.range(0, 10)] == [1001, 9002, 5003, 5004]
    mt.clear()
    assert mt.is_empty() and len(mt) == 0 and mt.find([1, 2]) == ([], [])
    mt.stage(_recs([6], 2))
    assert mt.range(0, 100) == [(6, FMT.values_of(_recs([6], 2))[0])]
