"""Capture (what `distill generate --top-logprobs` does per answer) and preprocessing with sidecars:
records found by content after reject/format steps, edited answers train by CE only."""

from __future__ import annotations

import numpy as np
import pytest

from distilled.data.chat import ChatEncoder
from distilled.kd.capture import Capture
from distilled.kd.dataset import SidecarIndex, pack_table_with_sidecars
from distilled.kd.logprobs import StudentVocab, VocabularyMismatch
from distilled.kd.sidecar import SidecarReader
from distilled.kd.standin import chat_logprobs_json, synth_top_logprobs

K = 5


@pytest.fixture(scope="module")
def vocab(qwen_tokenizer):
    return StudentVocab(qwen_tokenizer)


def _answer(i: int, g: int) -> str:
    return f"<think>\nProblem {i}, try {g}: {i} * {g + 3} = {i * (g + 3)}.\n</think>\n\nSo \\boxed{{{i * (g + 3)}}}."


def _logprobs(text, tok, vocab, seed, eos=True):
    ids = tok.encode(text, add_special_tokens=False) + ([151645] if eos else [])
    return chat_logprobs_json(synth_top_logprobs(ids, 8, seed, vocab), vocab)


def test_capture_commit_resume(tmp_path, qwen_tokenizer, vocab):
    out = tmp_path / "gens.jsonl"
    cap = Capture(out, K, qwen_tokenizer, committed=[])
    assert cap.request_extra() == {"logprobs": True, "top_logprobs": K}
    for i in range(3):
        recs = [cap.take(_answer(i, g), _logprobs(_answer(i, g), qwen_tokenizer, vocab, i * 10 + g), f"p{i} g{g}")
                for g in range(2)]
        assert all(r is not None and r.k == K for r in recs)
        cap.commit(f"p{i}", recs)
    cap.close()
    assert cap.summary()["stored"] == 6 and cap.summary()["bytes_per_token"] > 0
    # crash after p2's records but before its JSONL line: resume cuts them, p2 is regenerated once
    cap2 = Capture(out, K, qwen_tokenizer, committed=["p0", "p1"])
    assert cap2.writer.orphan_records == 2
    cap2.commit("p2", [cap2.take(_answer(2, g), _logprobs(_answer(2, g), qwen_tokenizer, vocab, 99), "x")
                       for g in range(2)])
    cap2.close()
    r = SidecarReader(out.with_suffix(".topk.bin"), verify="all")
    assert len(r) == 6 and r.get("p2", 1) is not None
    r.close()


def test_capture_refuses_another_vocabulary_and_missing_logprobs(tmp_path, qwen_tokenizer, vocab):
    cap = Capture(tmp_path / "g.jsonl", K, qwen_tokenizer, committed=[])
    text = _answer(1, 1)
    lp = _logprobs(text, qwen_tokenizer, vocab, 1)
    lp["content"][4]["bytes"] = list("Ġunknownish_zz".encode())
    with pytest.raises(VocabularyMismatch, match="token 4"):
        cap.take(text, lp, "problem 1 generation 1")
    assert cap.take(text, None, "a") is None and cap.take(text, None, "b") is None
    with pytest.raises(VocabularyMismatch, match="no 'logprobs'"):
        cap.take(text, None, "c")
    cap.close()
    with pytest.raises(ValueError, match="1..20"):
        Capture(tmp_path / "h.jsonl", 21, qwen_tokenizer, committed=[])


def test_preprocess_with_sidecars_finds_records_by_content(tmp_path, qwen_tokenizer, vocab):
    out = tmp_path / "gens.jsonl"
    cap = Capture(out, K, qwen_tokenizer, committed=[])
    answers = {}
    for i in range(12):
        recs = []
        for g in range(2):
            t = _answer(i, g)
            answers[(i, g)] = t
            recs.append(cap.take(t, _logprobs(t, qwen_tokenizer, vocab, i * 7 + g, eos=(i % 2 == 0)), "x"))
        cap.commit(f"p{i}", recs)
    cap.close()
    # reject kept generation 1 of every problem; one answer was edited afterwards; rows shuffled
    rows = [[{"role": "user", "content": f"Problem {i}?"}, {"role": "assistant", "content": answers[(i, 1)]}]
            for i in (5, 3, 11, 0, 7, 1, 9, 2, 8, 4, 10, 6)]
    rows[2][1]["content"] = rows[2][1]["content"].replace("So", "Hence")
    enc = ChatEncoder(qwen_tokenizer).encode(rows)
    special = set(vocab.special)
    packed, stats, rep = pack_table_with_sidecars(enc.to_arrow(), [out.with_suffix(".topk.bin")], K, 256,
                                                  151643, special, seed=1)
    assert rep["with_topk"] == 11 and rep["no_record"] == 1 and rep["token_mismatch"] == 0 and rep["records"] == 24
    S = 256
    lab = np.asarray(packed.column("labels").to_pylist())
    pid = np.asarray(packed.column("topk_ids").to_pylist()).reshape(len(lab), S, K)
    has = pid[..., 0] >= 0
    assert (lab[has] != -100).all()
    idx = SidecarIndex([out.with_suffix(".topk.bin")], special)
    # every trained label of a matched document carries its own generation's top-K
    checked = 0
    for row in range(len(lab)):
        ends = packed.column("actual_seq_len")[row].as_py()
        for a, b in zip([0] + ends[:-1], ends):
            tr = np.nonzero(lab[row, a:b] != -100)[0] + a
            rec = idx.find(lab[row, tr])
            if rec is None:
                assert not has[row, a:b].any()
                continue
            m = min(len(tr), rec.n_tokens)
            np.testing.assert_array_equal(pid[row, tr[:m]], rec.topk_ids[:m, :K])
            checked += 1
    idx.close()
    assert checked == 11
    assert 0.85 < rep["kd_position_share"] <= 11 / 12 + 1e-9  # minus closing tokens without data
