"""Parsing teacher logprobs (chat, completions, vLLM ids) into student ids, and the vocabulary check
with the real Qwen2.5 tokenizer: a matching teacher passes, a foreign one is refused by position."""

from __future__ import annotations

import numpy as np
import pytest

from distilled.kd.logprobs import (LogprobsFormatError, StudentVocab, VocabularyGuard, VocabularyMismatch,
                                   check_sampled, parse_choice_logprobs)
from distilled.kd.standin import chat_logprobs_json, completion_logprobs_json, synth_top_logprobs

TEXT = "<think>\nLet x = 12 × 7. Then x² − 3 = 7053; café ✓ 🦜.\n</think>\n\nThe answer is \\boxed{84}."


@pytest.fixture(scope="module")
def vocab(qwen_tokenizer):
    return StudentVocab(qwen_tokenizer)


def test_vocab_maps_known_tokens(vocab):
    assert vocab.by_bytes[b"Hello"] == 9707 and vocab.by_bytes[b" world"] == 1879
    assert vocab.by_bytes[b"<|im_end|>"] == 151645 and 151645 in vocab.special


@pytest.mark.parametrize("shape,as_ids", [("chat", False), ("chat", True), ("completion", True),
                                          ("completion", False)])
def test_parse_round_trip(vocab, qwen_tokenizer, shape, as_ids):
    ids = qwen_tokenizer.encode("The answer is 42, not 41.", add_special_tokens=False)
    rec = synth_top_logprobs(ids, 8, seed=3, vocab=vocab)
    lp = chat_logprobs_json(rec, vocab, as_ids) if shape == "chat" else completion_logprobs_json(rec, vocab, as_ids)
    got = parse_choice_logprobs({"logprobs": lp}, vocab, k=8)
    np.testing.assert_array_equal(got.sampled_ids, ids)
    if shape == "completion" and not as_ids:
        # token strings without bytes: alternatives that are part of a character are left out
        # (their mass stays in the tail), every other entry is kept in order
        for t in range(len(ids)):
            keep = [i for i in rec.topk_ids[t] if "\ufffd" not in vocab.token_text(i)]
            assert got.topk_ids[t, :len(keep)].tolist() == keep
            assert (got.topk_ids[t, len(keep):] == -1).all() and (got.topk_logprobs[t, len(keep):] == 0).all()
        return
    np.testing.assert_array_equal(got.topk_ids, rec.topk_ids)
    np.testing.assert_allclose(got.topk_logprobs, rec.topk_logprobs, rtol=1e-6)
    # fewer requested than returned: the best k are kept
    got3 = parse_choice_logprobs({"logprobs": lp}, vocab, k=3)
    np.testing.assert_array_equal(got3.topk_ids, rec.topk_ids[:, :3])


def test_chat_bytes_resolve_partial_utf8(vocab, qwen_tokenizer):
    """'✓' may be split into byte tokens that are not valid UTF-8 alone: chat 'bytes' resolve them,
    a completions token string holding U+FFFD without ids is refused as ambiguous."""
    ids = qwen_tokenizer.encode(TEXT, add_special_tokens=False)
    partial = [i for i in ids if "\ufffd" in vocab.token_text(i)]
    assert partial, "the test text should contain a byte-fallback token"
    rec = synth_top_logprobs(ids, 4, seed=1, vocab=vocab)
    got = parse_choice_logprobs({"logprobs": chat_logprobs_json(rec, vocab)}, vocab, k=4)
    np.testing.assert_array_equal(got.sampled_ids, ids)
    assert check_sampled(TEXT, got.sampled_ids, vocab) == len(ids)
    with pytest.raises(VocabularyMismatch, match="part of a character"):
        parse_choice_logprobs({"logprobs": completion_logprobs_json(rec, vocab)}, vocab, k=4)


def test_vllm_prompt_logprobs_shape(vocab, qwen_tokenizer):
    ids = qwen_tokenizer.encode("2 + 2 = 4", add_special_tokens=False)
    plp = [None] + [{str(i): {"logprob": -0.1, "rank": 1, "decoded_token": "x"},
                     "15": {"logprob": -2.5, "rank": 2, "decoded_token": "0"},
                     "99999": {"logprob": -9.0, "rank": 1000, "decoded_token": "?"}} for i in ids[1:]]
    got = parse_choice_logprobs({"prompt_logprobs": plp, "logprobs": None}, vocab, k=2, prompt_ids=ids, start=1)
    np.testing.assert_array_equal(got.sampled_ids, ids[1:])
    assert (got.topk_ids[:, 1] == 15).all() and np.allclose(got.topk_logprobs[:, 0], -0.1)


def test_missing_logprobs_is_named(vocab):
    with pytest.raises(LogprobsFormatError, match="choice.logprobs: missing"):
        parse_choice_logprobs({"text": "hi"}, vocab, k=2)
    with pytest.raises(ValueError, match="1..20"):
        parse_choice_logprobs({"logprobs": {"content": []}}, vocab, k=21)


def test_matching_teacher_passes_with_trailing_eos(vocab, qwen_tokenizer):
    ids = qwen_tokenizer.encode(TEXT, add_special_tokens=False)
    assert check_sampled(TEXT, ids + [151645], vocab) == len(ids)


def test_foreign_vocabulary_refused_naming_position(vocab, qwen_tokenizer):
    ids = qwen_tokenizer.encode(TEXT, add_special_tokens=False)
    # a teacher whose token 5 is a string the student's vocabulary lacks
    content = [{"token": vocab.token_text(i), "logprob": -0.1, "bytes": list(vocab.bytes_of(i)), "top_logprobs": []}
               for i in ids]
    content[5] = {"token": "xq_zz_unlikely_token", "logprob": -0.1, "bytes": list(b"xq_zz_unlikely_token"),
                  "top_logprobs": []}
    with pytest.raises(VocabularyMismatch, match="token 5: .*not a token of the student's vocabulary"):
        parse_choice_logprobs({"logprobs": {"content": content}}, vocab, k=1)
    # tokens that exist in the student vocabulary but spell another text
    wrong = list(ids)
    wrong[7] = vocab.by_bytes[b" banana"]
    with pytest.raises(VocabularyMismatch, match="teacher token 7") as exc:
        check_sampled(TEXT, wrong, vocab)
    assert exc.value.kind == "bytes" and exc.value.position == 7


def test_other_segmentation_refused_naming_position(vocab, qwen_tokenizer):
    text = "Hello world, the answer is 84."
    ids = qwen_tokenizer.encode(text, add_special_tokens=False)
    # the same bytes split differently ("Hel" "lo" instead of "Hello"): another tokenizer's habits
    split = [vocab.by_bytes[b"Hel"], vocab.by_bytes[b"lo"]] + ids[1:]
    with pytest.raises(VocabularyMismatch, match=r"token 0 differs: teacher 'Hel'.*student 'Hello'") as exc:
        check_sampled(text, split, vocab)
    assert exc.value.kind == "segmentation"


def test_guard_tolerates_rare_resplits_refuses_systematic(vocab, qwen_tokenizer):
    text = "Hello world, the answer is 84."
    ids = qwen_tokenizer.encode(text, add_special_tokens=False)
    good = synth_top_logprobs(ids, 2, seed=0)
    split_ids = [vocab.by_bytes[b"Hel"], vocab.by_bytes[b"lo"]] + ids[1:]
    bad = synth_top_logprobs(split_ids, 2, seed=0)
    g = VocabularyGuard(max_noncanonical_rate=0.1, min_checked=20)
    for i in range(30):
        out = g.check(text, bad if i == 10 else good, vocab, f"gen {i}")
        assert (out is None) == (i == 10)
    assert g.noncanonical == 1
    g2 = VocabularyGuard()
    g2.check(text, bad, vocab, "gen 0") is None
    g2.check(text, bad, vocab, "gen 1")
    with pytest.raises(VocabularyMismatch, match="3 of 3 generations"):
        g2.check(text, bad, vocab, "gen 2")
    with pytest.raises(VocabularyMismatch):  # a bytes mismatch is fatal at once
        VocabularyGuard().check("other text", good, vocab, "gen 0")


def test_standin_logprobs_are_a_proper_distribution(vocab, qwen_tokenizer):
    ids = qwen_tokenizer.encode(TEXT * 3, add_special_tokens=False)
    rec = synth_top_logprobs(ids, 20, seed=7, vocab=vocab)
    p = np.exp(rec.topk_logprobs.astype(np.float64))
    mass = p.sum(1)
    assert (mass < 1).all() and (mass > 0.94).all()  # the tail keeps 0.2-5%
    assert (np.diff(rec.topk_logprobs, axis=1) <= 0).all()  # descending
    assert all(len(set(r)) == 20 for r in rec.topk_ids.tolist())  # no duplicate ids
    assert (rec.topk_ids == np.asarray(ids)[:, None]).any(1).all()  # the emitted token is in the top-K
    top1 = (rec.topk_ids[:, 0] == np.asarray(ids)).mean()
    assert 0.8 < top1 < 0.99  # mostly top-1, sometimes outranked
    np.testing.assert_array_equal(rec.topk_ids, synth_top_logprobs(ids, 20, seed=7, vocab=vocab).topk_ids)
    assert not np.array_equal(rec.topk_logprobs, synth_top_logprobs(ids, 20, seed=8, vocab=vocab).topk_logprobs)
    # some alternatives are spelling variants (e.g. ' The' for 'The')
    the = vocab.by_bytes[b"The"]
    t = ids.index(the)
    assert vocab.by_bytes[b" The"] in rec.topk_ids[t].tolist()


def test_teacher_with_renamed_special_tokens(vocab, qwen_tokenizer):
    """DeepSeek-R1-Distill-Qwen: same BPE tokens, specials renamed. A closing special the student
    cannot name is left out; as an alternative it goes to the tail; in the middle it is refused."""
    text = "The answer is 84."
    ids = qwen_tokenizer.encode(text, add_special_tokens=False)
    eos = "<｜end▁of▁sentence｜>"
    ent = lambda tok, b, lp, top: {"token": tok, "logprob": lp, "bytes": list(b), "top_logprobs": top}
    content = [ent(vocab.token_text(i), vocab.bytes_of(i), -0.1,
                   [ent(vocab.token_text(i), vocab.bytes_of(i), -0.1, []), ent(eos, eos.encode(), -3.0, [])])
               for i in ids]
    content.append(ent(eos, eos.encode(), -0.01, []))
    got = parse_choice_logprobs({"logprobs": {"content": content}}, vocab, k=2)
    np.testing.assert_array_equal(got.sampled_ids, ids)
    assert (got.topk_ids[:, 1] == -1).all() and (got.topk_ids[:, 0] == np.asarray(ids)).all()
    assert check_sampled(text, got.sampled_ids, vocab) == len(ids)
    content.insert(2, ent(eos, eos.encode(), -0.01, []))
    with pytest.raises(VocabularyMismatch, match="special token"):
        parse_choice_logprobs({"logprobs": {"content": content}}, vocab, k=2)
