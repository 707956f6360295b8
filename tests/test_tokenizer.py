"""The offline Qwen2.5 tokenizer: pinned ids, Qwen2's digit splitting, exact agreement with
tiktoken on the same ranks + regex, config files, and the CLI."""

from __future__ import annotations

import json
import random
import unicodedata

import pytest

from distilled.data import tokenizer as qt


def test_pinned_ids(qwen_tokenizer):
    tok = qwen_tokenizer
    assert tok.encode("Hello") == [9707]
    assert tok.encode(" world") == [1879]
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tok.convert_tokens_to_ids("<tool_call>") == 151657
    assert tok.convert_tokens_to_ids("<|file_sep|>") == 151664
    assert len(tok) == 151665
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.bos_token is None


def test_specials_are_single_tokens_inside_text(qwen_tokenizer):
    ids = qwen_tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[0] == 151644 and 151645 in ids
    # non-special added tokens are still atomic, and kept by skip_special_tokens
    ids = qwen_tokenizer.encode("a<tool_call>b")
    assert 151657 in ids
    assert "<tool_call>" in qwen_tokenizer.decode(ids, skip_special_tokens=True)
    assert "<|im_end|>" not in qwen_tokenizer.decode([9707, 151645], skip_special_tokens=True)


def test_digits_split_one_by_one(qwen_tokenizer):
    tok = qwen_tokenizer
    assert tok.tokenize("12345") == ["1", "2", "3", "4", "5"]
    pre = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("x=2024, y=3.14159")
    digits = [p for p, _ in pre if any(c.isdigit() for c in p)]
    assert digits and all(len(p) == 1 for p in digits)
    # Arabic-Indic and full-width digits are \p{N} too
    assert len(tok.tokenize("١٢٣")) >= 3


def test_pre_tokenizer_regex_is_qwen2s():
    import importlib

    dq = importlib.import_module("dashscope.tokenizers.qwen_tokenizer")
    assert qt.QWEN2_PAT == dq.PAT_STR
    assert r"\p{N}|" in qt.QWEN2_PAT and r"\p{N}{1,3}" not in qt.QWEN2_PAT


def _random_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = [
        "Hello", " world", "  ", "\n", "\n\n", "\r\n", "\t", " ", "12345", "3.14159", "x^2", "\\frac{1}{2}",
        "\\boxed{", "}", "<think>", "</think>", "Let's", " don't", "I'M", "'ll", "$", "$$", "\\(", "\\)",
        "数学", "证明", "日本語", "é", "ü", "ß", "Ω", "∑", "∫", "≤", "→", "😀", "👍🏽", "١٢٣", "１２３",
        "αβγ", "Привет", "\u00a0", "   \n", "...", "!!!", "?", "(", ")", "[", "]", "=", "+", "-", "*", "/",
        "_", "#", "@", "`", "~", "|", "\\\\", "aaaa", "ababab", "the", " the", "THE", "ing", " reasoning",
    ]
    out = []
    for _ in range(n):
        k = rng.randint(1, 30)
        s = "".join(rng.choice(pieces) for _ in range(k))
        if rng.random() < 0.3:  # raw random code points, BMP and beyond
            s += "".join(chr(rng.choice([rng.randint(32, 0x2FFF), rng.randint(0x4E00, 0x9FFF),
                                         rng.randint(0x1F300, 0x1FAFF)])) for _ in range(rng.randint(1, 12)))
        out.append(s)
    return out


def test_matches_tiktoken_exactly(qwen_tokenizer):
    """Same ranks + regex in tiktoken must give the same ids as our tokenizer.json.

    Qwen2's tokenizer NFC-normalises first (tiktoken does not), so we feed tiktoken NFC text.
    """
    import tiktoken

    ranks = qt.load_qwen_ranks()
    enc = tiktoken.Encoding("qwen-check", pat_str=qt.QWEN2_PAT, mergeable_ranks=ranks,
                            special_tokens=dict(qt.ADDED_TOKEN_IDS))
    texts = _random_strings(400)
    # long realistic math text too
    texts.append("Let $f(x)=x^3-3x+1$. We compute f'(x) = 3x^2-3 = 0 \\implies x=\\pm 1.\n\n" * 40)
    ours = qwen_tokenizer(texts, add_special_tokens=False)["input_ids"]
    bad = []
    for t, ids in zip(texts, ours):
        want = enc.encode_ordinary(unicodedata.normalize("NFC", t))
        if ids != want:
            bad.append((t, ids, want))
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]!r}"
    # decode round-trips (NFC text)
    for t, ids in zip(texts[:100], ours[:100]):
        assert qwen_tokenizer.decode(ids) == unicodedata.normalize("NFC", t)


def test_slow_tokenizer_from_vocab_and_merges_agrees(qwen_tokenizer_dir, qwen_tokenizer):
    """MindFormers' Qwen2 tokenizer reads vocab.json + merges.txt: they must encode the same."""
    from transformers import Qwen2Tokenizer

    slow = Qwen2Tokenizer(vocab_file=str(qwen_tokenizer_dir / "vocab.json"),
                          merges_file=str(qwen_tokenizer_dir / "merges.txt"))
    for t in _random_strings(40, seed=1):
        t = t.replace("<", "")  # the bare slow tokenizer has no added tokens
        assert slow.encode(t) == qwen_tokenizer.encode(t), t


def test_files_and_config(qwen_tokenizer_dir):
    d = qwen_tokenizer_dir
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (d / name).is_file()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    assert cfg["chat_template"] == qt.read_chat_template()
    assert cfg["added_tokens_decoder"]["151643"]["content"] == "<|endoftext|>"
    vocab = json.loads((d / "vocab.json").read_text())
    assert len(vocab) == 151643 and vocab["Hello"] == 9707 and vocab["Ġworld"] == 1879
    merges = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert len(merges) - 1 == 151643 - 256  # exactly one merge per non-byte token
    tj = json.loads((d / "tokenizer.json").read_text())
    assert tj["normalizer"]["type"] == "NFC"
    assert tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == qt.QWEN2_PAT
    assert [a["id"] for a in tj["added_tokens"]] == list(range(151643, 151665))


def test_chat_template_renders_official_format(qwen_tokenizer):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A"}]
    text = qwen_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    text = qwen_tokenizer.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
    assert "You are Qwen, created by Alibaba Cloud." in text and text.endswith("<|im_start|>assistant\n")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        qt.load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        qt.load_tokenizer(tmp_path)


def test_merge_derivation_on_toy_ranks():
    """Each multi-byte token gets exactly the split tiktoken merges last."""
    ranks = {bytes([b]): b for b in range(256)}
    nxt = 256
    for tok in (b"ab", b"bc", b"abc", b"abcd", b"cd"):
        ranks[tok] = nxt
        nxt += 1
    vocab, merges = qt.derive_vocab_and_merges(ranks)
    # "abc": a+b (256) merges first, so the last merge is ab + c; "abcd" forms as abc + d
    # because cd (260) ranks after abcd (259) and cannot be used to build it.
    assert ("ab", "c") in merges and ("abc", "d") in merges and ("c", "d") in merges
    assert len(merges) == 5 and len(vocab) == 261


def test_cli_builds_same_files(tmp_path, qwen_tokenizer_dir):
    import argparse

    # only this stage's commands: other stages may be mid-edit in a shared checkout
    parser = argparse.ArgumentParser(prog="distill")
    qt.register_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "tok"
    args = parser.parse_args(["tokenizer", "qwen2.5", "--output", str(out)])
    assert args.func(args) == 0
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (qwen_tokenizer_dir / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
