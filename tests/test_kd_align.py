"""Top-K aligned to packed label positions: after BFD packing (and a row shuffle) every placed
top-K is the teacher's distribution for exactly the label at its position; untrained = -1/0."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from distilled.data.chat import ChatEncoder
from distilled.kd.align import build_topk_arrays, pack_with_topk, sample_topk, trained_span
from distilled.kd.logprobs import StudentVocab
from distilled.kd.standin import synth_top_logprobs
from distilled.data.packing import IGNORE_INDEX, pack_table

K = 4


@pytest.fixture(scope="module")
def encoded(qwen_tokenizer):
    """20 real chat samples (system + user + assistant), the assistant text being the 'generation'."""
    rng = np.random.default_rng(0)
    enc = ChatEncoder(qwen_tokenizer)
    answers, convs = [], []
    for i in range(20):
        words = " ".join(f"step{j} {int(rng.integers(0, 999))}" for j in range(int(rng.integers(2, 60))))
        ans = f"<think>\n{words}\n</think>\n\nThe answer is \\boxed{{{i}}}."
        answers.append(ans)
        convs.append([{"role": "system", "content": "Reason."}, {"role": "user", "content": f"Problem {i}?"},
                      {"role": "assistant", "content": ans}])
    batch = enc.encode(convs)
    vocab = StudentVocab(qwen_tokenizer)
    recs = []
    for i, ans in enumerate(answers):
        ids = qwen_tokenizer.encode(ans, add_special_tokens=False)
        ids = ids + [151645] if i % 2 == 0 else ids  # half the teachers also report the closing token
        recs.append(synth_top_logprobs(ids, K, seed=i, vocab=vocab))
    return batch, recs


def test_sample_topk_lands_on_the_assistant_tokens(encoded):
    batch, recs = encoded
    ids, labels = batch.row(0)
    s, e = trained_span(labels)
    t_ids, t_lp, status = sample_topk(ids, labels, recs[0], K)
    assert status == "ok"
    assert (t_ids[:s] == -1).all() and (t_lp[:s] == 0).all()
    np.testing.assert_array_equal(t_ids[s:e], recs[0].topk_ids)  # record 0 includes the closing token
    _, _, status = sample_topk(ids, labels, recs[1], K)  # another sample's record: refused
    assert status == "mismatch"
    ids1, lab1 = batch.row(1)
    t1, _, st1 = sample_topk(ids1, lab1, recs[1], K)  # no closing-token data: that position is CE-only
    s1, e1 = trained_span(lab1)
    assert st1 == "ok" and (t1[e1 - 1] == -1).all() and (t1[s1:e1 - 1] >= 0).all()


@pytest.mark.parametrize("seed", [None, 3])
def test_alignment_after_bfd_packing(encoded, seed):
    batch, recs = encoded
    rows = [batch.row(i) for i in range(len(batch))]
    records = [None if i == 7 else r for i, r in enumerate(recs)]  # sample 7 has no teacher data
    t_ids, t_lp, st = build_topk_arrays([r[0] for r in rows], [r[1] for r in rows], records, K)
    assert st.with_topk == 19 and st.no_record == 1
    table = batch.to_arrow()
    S = 512
    packed, stats, n_kd = pack_with_topk(table, t_ids, t_lp, S, pad_id=151643, seed=seed)
    assert stats.dropped_overlong == 0
    ref, _ = pack_table(table, S, 151643, seed=seed)
    for c in ref.column_names:  # the packed columns are untouched
        assert packed.column(c).to_pylist() == ref.column(c).to_pylist()
    assert stats.rows >= 2 and stats.max_docs_per_row >= 2  # several documents share a row
    lab = np.asarray(packed.column("labels").to_pylist())
    pid = np.asarray(packed.column("topk_ids").to_pylist()).reshape(len(lab), S, K)
    plp = np.asarray(packed.column("topk_logprobs").to_pylist(), dtype=np.float32).reshape(len(lab), S, K)
    assert packed.schema.field("topk_logprobs").type == pa.list_(pa.float16())
    has = pid[..., 0] >= 0
    assert (lab[has] != IGNORE_INDEX).all() and (plp[~has] == 0).all() and (pid[~has] == -1).all()
    # every trained label carries the teacher top-K of exactly that token, by content:
    want = {}
    for i, r in enumerate(records):
        if r is not None:
            want[tuple(r.sampled_ids.tolist())] = r
    found = 0
    for row in range(len(lab)):
        ends = packed.column("actual_seq_len")[row].as_py()
        starts = [0] + ends[:-1]
        for a, b in zip(starts, ends):
            doc_lab = lab[row, a:b]
            tr = np.nonzero(doc_lab != IGNORE_INDEX)[0]
            seq = tuple(doc_lab[tr].tolist())
            r = want.get(seq) or want.get(seq[:-1])
            if r is None:  # sample 7: no teacher data anywhere in it
                assert not has[row, a:b].any()
                continue
            found += 1
            m = min(len(tr), r.n_tokens)
            np.testing.assert_array_equal(pid[row, a + tr[:m]], r.topk_ids[:m])
            np.testing.assert_allclose(plp[row, a + tr[:m]], r.topk_logprobs[:m].astype(np.float16), rtol=0)
            # the sampled token is the label there, and it is among the top-K
            assert (lab[row, a + tr[:m]] == r.sampled_ids[:m]).all()
    assert found == 19
    assert n_kd == int(has.sum()) and n_kd > 0.9 * stats.label_tokens * 19 / 20


def test_overlong_truncate_keeps_alignment(encoded):
    batch, recs = encoded
    rows = [batch.row(i) for i in range(len(batch))]
    t_ids, t_lp, _ = build_topk_arrays([r[0] for r in rows], [r[1] for r in rows], recs, K)
    S = 64  # most samples are longer: truncated
    packed, stats, n_kd = pack_with_topk(batch.to_arrow(), t_ids, t_lp, S, 151643, overlong="truncate")
    assert stats.truncated > 0 and n_kd > 0
    lab = np.asarray(packed.column("labels").to_pylist())
    pid = np.asarray(packed.column("topk_ids").to_pylist()).reshape(len(lab), S, K)
    has = pid[..., 0] >= 0
    assert (lab[has] != IGNORE_INDEX).all()
