"""The one row reader (io_utils.read_rows): every source kind, shards, bad records, one location format."""

from __future__ import annotations

import json

import pytest

from distilled.io_utils import (BadLine, BadRecord, RowReadError, RowSource, expand_row_sources, iter_jsonl, location,
                                read_rows, row_file_kind)


def _write_jsonl(path, lines):
    path.write_bytes(b"".join(lines))
    return path


def test_jsonl_rows_bad_records_and_locations(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [b'{"i": 1}\n', b"\n", b"{oops\n", b"[1, 2]\n", b'{"i": \xff}\n',
                                            b'\xef\xbb\xbf{"i": 5}\n'])
    got = list(read_rows(p))
    assert [n for n, _ in got] == [1, 3, 4, 5, 6]  # blank line 2 skipped, numbers stay the file's
    assert got[0][1] == {"i": 1} and got[4][1] == {"i": 5}  # a BOM is tolerated
    bad = [r for _, r in got if isinstance(r, BadRecord)]
    assert [b.kind for b in bad] == ["invalid_json", "bad_type", "invalid_json"]
    assert str(bad[0]).startswith(f"{p}:3: invalid JSON (")
    assert str(bad[1]) == f"{p}:4: expected a JSON object, got list"
    assert bad[2].message == "invalid UTF-8 at byte offset 6"
    assert BadLine is BadRecord and bad[0].reason == bad[0].message
    assert list(iter_jsonl(p))[1][0] == 3


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_jsonl_shards_cover_every_line_once(tmp_path, n):
    p = _write_jsonl(tmp_path / "s.jsonl", [json.dumps({"i": i, "pad": "x" * (i % 13)}).encode() + b"\n"
                                            for i in range(101)])
    seen = [(k, r["i"]) for i in range(n) for k, r in read_rows(p, i, n)]
    assert seen == [(i + 1, i) for i in range(101)]


def test_json_array_parquet_csv_and_arrow_dir(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": f"p{i}", "a": i} for i in range(9)]
    arr = tmp_path / "a.json"
    arr.write_text(json.dumps(rows[:2] + [3] + rows[2:]))
    assert row_file_kind(arr) == "json"
    got = list(read_rows(arr))
    assert got[0] == (1, rows[0]) and str(got[2][1]) == f"{arr}:3: expected a JSON object, got int"
    lines = tmp_path / "l.json"
    lines.write_text("\n".join(json.dumps(r) for r in rows))
    assert row_file_kind(lines) == "jsonl" and [r for _, r in read_rows(lines)] == rows

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet", row_group_size=4)
    assert [(n, r) for n, r in read_rows(tmp_path / "t.parquet", 1, 2, batch_size=3)] == \
        [(k + 1, rows[k]) for k in range(4, 9)]
    (tmp_path / "c.csv").write_text("q,a\np0,0\np1,1\n")
    assert list(read_rows(tmp_path / "c.csv")) == [(1, {"q": "p0", "a": 0}), (2, {"q": "p1", "a": 1})]

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert [n for n, _ in read_rows(tmp_path / "ds", 0, 3, batch_size=2)] == [1, 2, 3]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
    assert len(list(read_rows(tmp_path / "dd", split="test"))) == 9
    with pytest.raises(RowReadError, match=r"dd: DatasetDict without a 'train' split \(test\)"):
        list(read_rows(tmp_path / "dd"))


def test_expand_sources_and_errors(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    (d / "b.jsonl").write_text('{"x": 1}\n')
    (d / "a.json").write_text('[{"x": 0}]')
    (d / "notes.txt").write_text("ignored")
    assert expand_row_sources([str(d)]) == [RowSource(str(d / "a.json"), "json"), RowSource(str(d / "b.jsonl"), "jsonl")]
    with pytest.raises(FileNotFoundError, match="input not found"):
        expand_row_sources([str(tmp_path / "missing.jsonl")])
    with pytest.raises(ValueError, match=r"unsupported input type '\.txt'"):
        expand_row_sources([str(d / "notes.txt")])
    (tmp_path / "obj.json").write_text('{"x": 1}')
    assert list(read_rows(tmp_path / "obj.json")) == [(1, {"x": 1})]  # one object = one JSON line
    (tmp_path / "bad.json").write_text('[{"x": 1},')
    with pytest.raises(RowReadError, match=r"bad.json: invalid JSON"):
        list(read_rows(tmp_path / "bad.json"))
    assert location("f.jsonl", 3) == "f.jsonl:3"
