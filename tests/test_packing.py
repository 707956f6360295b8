"""BFD packing: exact small cases and Hypothesis properties (no token lost or duplicated, rows of
exactly seq_length, consistent boundaries, labels aligned with the per-document shift, pad id used,
overlong dropped/truncated and counted). Pure numpy/pyarrow: no MindFormers import here."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distilled.data import packing
from distilled.data.packing import IGNORE_INDEX, bfd_assign, pack_table

PAD = 151643


def make_table(docs, labels=None, *, value_type=pa.int32(), large=False, chunks=1):
    """Arrow table of input_ids/labels; labels default: every token trained except the first."""
    if labels is None:
        labels = [[IGNORE_INDEX] + list(d[1:]) if d else [] for d in docs]
    lt = pa.large_list(value_type) if large else pa.list_(value_type)
    schema = pa.schema([("input_ids", lt), ("labels", lt)])
    if chunks <= 1 or len(docs) < 2:
        return pa.table({"input_ids": docs, "labels": labels}, schema=schema)
    bounds = np.linspace(0, len(docs), chunks + 1).astype(int)
    batches = [
        pa.record_batch({"input_ids": docs[a:b], "labels": labels[a:b]}, schema=schema)
        for a, b in zip(bounds[:-1], bounds[1:])
    ]
    return pa.Table.from_batches(batches, schema=schema)


def rows_of(table):
    d = table.to_pydict()
    return [dict(zip(d, vals)) for vals in zip(*d.values())]


def split_docs(row):
    """Documents of a packed row from its actual_seq_len (and the padding tail)."""
    ends = row["actual_seq_len"]
    starts = [0] + ends[:-1]
    return [(s, e) for s, e in zip(starts, ends)], ends[-1]


# ---------------------------------------------------------------------------------------------
# exact small examples
# ---------------------------------------------------------------------------------------------
def test_exact_two_rows():
    docs = [[10, 11, 12, 13], [20, 21], [30, 31, 32], [40, 41, 42]]
    labels = [[-100, -100, 12, 13], [20, 21], [-100, 31, 32], [-100, -100, 42]]
    packed, stats = pack_table(make_table(docs, labels), seq_length=6, pad_id=PAD)
    # BFD: 4 -> row0 (room 2); 3 -> row1 (room 3); 3 -> row1 (room 0); 2 -> row0
    assert packed.to_pydict() == {
        "input_ids": [[10, 11, 12, 13, 20, 21], [30, 31, 32, 40, 41, 42]],
        "labels": [[-100, 12, 13, -100, 21, -100], [31, 32, -100, -100, 42, -100]],
        "actual_seq_len": [[4, 6], [3, 6]],
        "position_ids": [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]],
    }
    assert stats.rows == 2 and stats.tokens == 12 and stats.fill_ratio == 1.0
    assert stats.samples_in == stats.samples_packed == 4
    assert stats.label_tokens == 6
    assert stats.max_docs_per_row == 2
    assert packed.schema == packing.packed_schema()


def test_exact_padding_and_boundary_label_pad():
    docs = [[5, 6, 7], [8, 9]]
    labels = [[5, 6, 7], [8, 9]]
    packed, _ = pack_table(make_table(docs, labels), seq_length=8, pad_id=3, boundary_label="pad")
    assert packed.to_pydict() == {
        "input_ids": [[5, 6, 7, 8, 9, 3, 3, 3]],
        "labels": [[6, 7, 3, 9, 3, -100, -100, -100]],
        "actual_seq_len": [[3, 5]],
        "position_ids": [[0, 1, 2, 0, 1, 0, 1, 2]],
    }
    packed, _ = pack_table(make_table(docs, labels), seq_length=8, pad_id=3)
    assert packed.column("labels").to_pylist() == [[6, 7, -100, 9, -100, -100, -100, -100]]


def test_overlong_drop_and_truncate_counted():
    docs = [[1] * 5, [2] * 9, [3] * 4, []]
    t = make_table(docs)
    packed, stats = pack_table(t, seq_length=6, pad_id=0, overlong="drop")
    assert (stats.dropped_overlong, stats.truncated, stats.dropped_empty) == (1, 0, 1)
    assert stats.samples_packed == 2 and stats.samples_in == 4
    assert sorted(map(len, (r["actual_seq_len"] for r in rows_of(packed)))) == [1, 1]
    assert 2 not in packed.column("input_ids").combine_chunks().flatten().to_pylist()

    packed, stats = pack_table(t, seq_length=6, pad_id=0, overlong="truncate")
    assert (stats.dropped_overlong, stats.truncated, stats.truncated_tokens) == (0, 1, 3)
    assert stats.samples_packed == 3 and stats.tokens == 15
    row = [r for r in rows_of(packed) if r["input_ids"][0] == 2][0]
    assert row["input_ids"] == [2] * 6 and row["actual_seq_len"] == [6]
    # the truncated document's last kept position has no next token inside the document
    assert row["labels"] == [2] * 4 + [2, IGNORE_INDEX]


def test_bfd_assign_small_and_errors():
    assert bfd_assign(np.array([3, 5, 2, 4]), 7).tolist() == [1, 0, 0, 1]
    assert bfd_assign(np.array([], dtype=np.int64), 7).tolist() == []
    # best fit (not first fit): 4 goes to the row with room 4, not the earlier one with room 5
    assert bfd_assign(np.array([5, 6, 4]), 10).tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="sample 1 has length 11"):
        bfd_assign(np.array([3, 11]), 10)
    with pytest.raises(ValueError, match="length 0"):
        bfd_assign(np.array([0, 1]), 10)


def test_bad_input_messages():
    with pytest.raises(ValueError, match="no column 'labels'"):
        pack_table(pa.table({"input_ids": [[1, 2]]}), 4)
    with pytest.raises(ValueError, match="row 1 .*labels has 1 tokens but input_ids has 2"):
        pack_table(pa.table({"input_ids": [[1], [1, 2]], "labels": [[1], [1]]}), 4)
    with pytest.raises(ValueError, match="'input_ids' must be a list of integers"):
        pack_table(pa.table({"input_ids": [["a"]], "labels": [[1]]}), 4)
    with pytest.raises(ValueError, match="row 2 .*'labels' is null"):
        pack_table(pa.table({"input_ids": [[1], [2], [3]], "labels": [[1], [2], None]}), 4)
    with pytest.raises(ValueError, match="row 1 .*'input_ids' contains a null token"):
        pack_table(pa.table({"input_ids": [[1], [2, None]], "labels": [[1], [2, 3]]}), 4)
    with pytest.raises(ValueError, match=r"row 2 .*'input_ids' holds 1099511627776, outside int32"):
        pack_table(pa.table({"input_ids": [[1], [2], [3, 2**40]], "labels": [[1], [2], [3, 4]]}), 4)
    with pytest.raises(ValueError, match="overlong"):
        pack_table(make_table([[1]]), 4, overlong="cut")


def test_empty_input_gives_empty_table():
    packed, stats = pack_table(make_table([[]]), 8)
    assert packed.num_rows == 0 and stats.rows == 0 and stats.dropped_empty == 1
    assert packed.schema == packing.packed_schema()


def test_int64_large_list_and_many_chunks_match(monkeypatch):
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, 1000, rng.integers(1, 40)).tolist() for _ in range(300)]
    ref, ref_stats = pack_table(make_table(docs), 64, pad_id=PAD)
    other, _ = pack_table(make_table(docs, value_type=pa.int64(), large=True, chunks=7), 64, pad_id=PAD)
    assert other.equals(ref)
    # tiny input slices and output chunks: same rows
    monkeypatch.setattr(packing, "_SLICE_TOKENS", 50)
    monkeypatch.setattr(packing, "_CHUNK_TOKENS", 64 * 5)
    chunked, stats = pack_table(make_table(docs, chunks=13), 64, pad_id=PAD)
    assert chunked.column("input_ids").num_chunks > 1
    assert chunked.to_pydict() == ref.to_pydict()
    assert stats.to_dict() | {"elapsed_s": 0} == ref_stats.to_dict() | {"elapsed_s": 0}


def test_differently_chunked_columns():
    docs = [[i] * (1 + i % 5) for i in range(1, 60)]
    base = make_table(docs)
    ids = base.column("input_ids").combine_chunks()
    labs = base.column("labels").combine_chunks()
    t = pa.table({
        "input_ids": pa.chunked_array([ids.slice(0, 10), ids.slice(10)]),
        "labels": pa.chunked_array([labs.slice(0, 33), labs.slice(33)]),
    })
    assert pack_table(t, 16, 0)[0].to_pydict() == pack_table(base, 16, 0)[0].to_pydict()


def test_columns_sliced_differently_pack_every_sample(monkeypatch):
    """input_ids cut into more input slices than labels (chunks [5, 55] vs [60]): every sample is
    still copied. The copy loop once zipped the two slice streams and stopped at the shorter one,
    leaving the last rows' buffers unwritten (uninitialised memory in the output)."""
    monkeypatch.setattr(packing, "_SLICE_TOKENS", 50)  # 10 samples of 5 tokens per slice
    docs = [[i] * 5 for i in range(1, 61)]
    base = make_table(docs)
    ids, labs = base.column("input_ids").combine_chunks(), base.column("labels").combine_chunks()
    t = pa.table({"input_ids": pa.chunked_array([ids.slice(0, 5), ids.slice(5)]), "labels": pa.chunked_array([labs])})
    assert len(list(packing._slices(t.column("input_ids"), 50))) > len(list(packing._slices(t.column("labels"), 50)))
    packed, stats = pack_table(t, 10, 0)
    assert packed.to_pydict() == pack_table(base, 10, 0)[0].to_pydict()
    assert Counter(x for r in packed.column("input_ids").to_pylist() for x in r) == {i: 5 for i in range(1, 61)}
    assert stats.label_tokens == 60 * 4  # per document: labels[1:] (4 trained), then -100


def test_seed_shuffles_rows_only():
    docs = [[i] * (1 + i % 7) for i in range(1, 200)]
    a, _ = pack_table(make_table(docs), 16, 0)
    b, _ = pack_table(make_table(docs), 16, 0, seed=3)
    c, _ = pack_table(make_table(docs), 16, 0, seed=3)
    assert b.equals(c)
    assert a.to_pydict() != b.to_pydict()
    key = lambda r: tuple(r["input_ids"])  # noqa: E731
    assert sorted(rows_of(a), key=key) == sorted(rows_of(b), key=key)


def test_to_dataset_keeps_columns_and_types():
    packed, _ = pack_table(make_table([[1, 2, 3], [4, 5]]), 8, pad_id=9)
    ds = packing.to_dataset(packed, key="unit")
    assert ds.column_names == list(packing.PACKED_COLUMNS)
    assert ds[0]["input_ids"] == [1, 2, 3, 4, 5, 9, 9, 9]
    assert str(ds.features["labels"].feature.dtype) == "int32"
    assert ds._fingerprint == packing.to_dataset(packed, key="unit")._fingerprint
    assert ds._fingerprint != packing.to_dataset(packed, key="other")._fingerprint


def test_summary_and_to_dict():
    _, stats = pack_table(make_table([[1, 2], [3] * 9]), 4, overlong="drop")
    d = stats.to_dict()
    assert set(d) >= {"samples_in", "samples_packed", "dropped_overlong", "truncated", "rows", "tokens",
                      "fill_ratio", "elapsed_s"}
    assert "1 overlong dropped" in stats.summary() and "fill 50.00%" in stats.summary()


# ---------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------
def reference_bfd_fills(lengths, S):
    """Naive O(n * rows) best fit decreasing: the multiset of row fills."""
    rooms = []
    for L in sorted(lengths, reverse=True):
        best = None
        for i, r in enumerate(rooms):
            if L <= r and (best is None or r < rooms[best]):
                best = i
        if best is None:
            rooms.append(S - L)
        else:
            rooms[best] -= L
    return sorted(S - r for r in rooms)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 40).flatmap(
    lambda S: st.tuples(st.just(S), st.lists(st.integers(1, S), max_size=60))))
def test_bfd_matches_naive_reference(case):
    S, lengths = case
    bins = bfd_assign(np.array(lengths, dtype=np.int64), S)
    fills = np.bincount(bins, weights=lengths, minlength=0).astype(int) if lengths else np.zeros(0, int)
    assert sorted(fills.tolist()) == reference_bfd_fills(lengths, S)
    assert (fills <= S).all()
    # rows are numbered 0..R-1 without gaps
    assert set(bins.tolist()) == set(range(len(fills)))
    # any-fit property: no two rows could have been merged
    if len(fills) >= 2:
        f = np.sort(fills)
        assert f[0] + f[1] > S
    # deterministic
    assert np.array_equal(bins, bfd_assign(np.array(lengths, dtype=np.int64), S))


doc_strategy = st.lists(
    st.lists(st.tuples(st.integers(0, 2**31 - 1), st.booleans()), max_size=30),
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    docs_spec=doc_strategy,
    S=st.integers(2, 32),
    overlong=st.sampled_from(["drop", "truncate"]),
    boundary=st.sampled_from(["ignore", "pad"]),
    pad_id=st.integers(0, 200_000),
    chunks=st.integers(1, 4),
)
def test_packing_properties(docs_spec, S, overlong, boundary, pad_id, chunks):
    docs = [[t for t, _ in d] for d in docs_spec]
    labels = [[t if trained else IGNORE_INDEX for t, trained in d] for d in docs_spec]
    packed, stats = pack_table(make_table(docs, labels, chunks=chunks), S, pad_id, overlong,
                               boundary_label=boundary)
    X = IGNORE_INDEX if boundary == "ignore" else pad_id

    # what should survive
    expected_docs = Counter()
    n_over = n_empty = 0
    for d, lab in zip(docs, labels):
        if not d:
            n_empty += 1
            continue
        if len(d) > S:
            n_over += 1
            if overlong == "drop":
                continue
            d, lab = d[:S], lab[:S]
        expected_docs[(tuple(d), tuple(lab[1:]) + (X,))] += 1

    got_docs = Counter()
    rows = rows_of(packed)
    for row in rows:
        for col in ("input_ids", "labels", "position_ids"):
            assert len(row[col]) == S  # every row exactly seq_length
        spans, end = split_docs(row)
        assert 0 < end <= S
        assert all(0 <= s < e for s, e in spans)  # strictly increasing boundaries
        for s, e in spans:
            got_docs[(tuple(row["input_ids"][s:e]), tuple(row["labels"][s:e]))] += 1
            assert row["position_ids"][s:e] == list(range(e - s))
        # padding tail: pad id, ignored labels, positions restarting at 0
        assert row["input_ids"][end:] == [pad_id] * (S - end)
        assert row["labels"][end:] == [IGNORE_INDEX] * (S - end)
        assert row["position_ids"][end:] == list(range(S - end))

    # no token lost or duplicated: exactly the expected documents, each once, labels shifted
    assert got_docs == expected_docs
    assert stats.samples_in == len(docs)
    assert stats.dropped_empty == n_empty
    assert stats.samples_packed == sum(expected_docs.values())
    if overlong == "drop":
        assert stats.dropped_overlong == n_over and stats.truncated == 0
    else:
        assert stats.truncated == n_over and stats.dropped_overlong == 0
    assert stats.rows == len(rows)
    assert stats.tokens == sum(len(d) for d, _ in expected_docs.elements())
    if rows:
        assert stats.fill_ratio == pytest.approx(stats.tokens / (len(rows) * S))
    assert stats.label_tokens == sum(sum(v != IGNORE_INDEX for v in r["labels"]) for r in rows)
