"""The trimmed Qwen2.5 tokenizer (``--bpe-tokens N``) used by the tiny CPU students."""

from __future__ import annotations

import pytest

from distilled.data.tokenizer import build_qwen2_5_tokenizer, load_tokenizer

N = 12000


@pytest.fixture(scope="module")
def trimmed(tmp_path_factory):
    return load_tokenizer(build_qwen2_5_tokenizer(tmp_path_factory.mktemp("tok") / "trim", bpe_tokens=N))


def test_trimmed_ids_and_specials(trimmed, qwen_tokenizer) -> None:
    assert len(trimmed) == N + 22
    assert trimmed.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [N, N + 1, N + 2]
    assert trimmed.eos_token == "<|im_end|>" and trimmed.pad_token_id == N
    text = "Sami has 45 marbles. 已知 $x^2 = \\frac{1}{2}$, so \\boxed{30} 🙂"
    ids = trimmed.encode(text)
    assert max(ids) < N and trimmed.decode(ids) == text
    # every piece the full tokenizer makes with an id below N is made identically by the trimmed one
    full = qwen_tokenizer.encode("Hello world")
    assert all(i < N for i in full)
    assert trimmed.encode("Hello world") == full == [9707, 1879]


def test_trimmed_chat_template_masks_same_segments(trimmed) -> None:
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "\\boxed{5}"}]
    ids = trimmed.apply_chat_template(msgs)
    assert ids.count(N + 1) == 3 and ids.count(N + 2) == 3  # system, user, assistant turns


def test_bpe_tokens_out_of_range(tmp_path) -> None:
    with pytest.raises(ValueError, match="bpe_tokens"):
        build_qwen2_5_tokenizer(tmp_path / "bad", bpe_tokens=10)
