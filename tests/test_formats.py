"""Row formats and the tokenize+mask step, checked against transformers' apply_chat_template with
the official Qwen2.5 template on many rows."""

from __future__ import annotations

import random

import numpy as np
import pytest

from distilled import SYSTEM_PROMPT
from distilled.data.chat import ChatEncoder, TemplateError, encode_rows
from distilled.data.formats import (DataError, FormatConfig, RowError, SkipCounter, row_to_conversations,
                               rows_to_conversations, stratos_to_r1)

IM_END = "<|im_end|>"


@pytest.fixture(scope="module", params=["tiktoken", "hf"])
def encoder(request, qwen_tokenizer):
    enc = ChatEncoder(qwen_tokenizer, engine=request.param)
    assert enc.engine_name == request.param
    return enc


def _rand_text(rng: random.Random, allow_edge_ws: bool = True) -> str:
    words = ["Let", " x", " =", " 3", ".", "\\frac{1}{2}", " \\boxed{42}", "数学", " 証明", "é", "e\u0301",
             " 😀", "\n", "\n\n", "  ", "\t", "<think>", "</think>", " Wait", ",", " so", "1234567", "$$",
             "Привет", "∑_{i=1}^n", " ...", "'s", " don't"]
    s = "".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
    if allow_edge_ws and rng.random() < 0.15:
        s = rng.choice(["\n", " ", "\n\n", " \n"]) + s
    if allow_edge_ws and rng.random() < 0.15:
        s = s + rng.choice(["\n", " ", "\n\n"])
    if not s.strip():
        s += "x"
    return s


def _rand_conv(rng: random.Random) -> list[dict]:
    conv = []
    if rng.random() < 0.5:
        conv.append({"role": "system", "content": _rand_text(rng)})
    for _ in range(rng.randint(1, 3)):
        conv.append({"role": "user", "content": _rand_text(rng)})
        conv.append({"role": "assistant", "content": _rand_text(rng)})
    if rng.random() < 0.1:
        conv.append({"role": "user", "content": _rand_text(rng)})  # trailing, untrained
    return conv


def _reference_labels(tok, conv) -> tuple[list[int], list[int]]:
    """Independent reference: HF offsets on the template's own rendering. A token is trained
    when it starts inside [assistant content start, end of its closing <|im_end|>)."""
    text = tok.apply_chat_template(conv, tokenize=False)
    ids = tok.apply_chat_template(conv)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc["input_ids"] == ids
    spans, pos = [], 0
    for m in conv:
        head = f"<|im_start|>{m['role']}\n"
        at = text.index(head + m["content"] + IM_END, pos)
        c0 = at + len(head)
        pos = c0 + len(m["content"]) + len(IM_END)
        if m["role"] == "assistant":
            spans.append((c0, pos))
    labels = [t if any(a <= s < b for a, b in spans) else -100 for t, (s, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def test_ids_and_masks_match_apply_chat_template(qwen_tokenizer, encoder):
    rng = random.Random(0)
    convs = [_rand_conv(rng) for _ in range(300)]
    batch = encoder.encode(convs)
    assert len(batch) == len(convs)
    prefix_checked = 0
    for i, conv in enumerate(convs):
        ids, labels = batch.row(i)
        ref_ids, ref_labels = _reference_labels(qwen_tokenizer, conv)
        assert ids.tolist() == ref_ids, i
        assert labels.tolist() == ref_labels, (i, conv)
        # the docs' two-render method agrees wherever its prefix assumption holds
        if conv[-1]["role"] == "assistant":
            prompt = qwen_tokenizer.apply_chat_template(conv[:-1], add_generation_prompt=True)
            if ref_ids[: len(prompt)] == prompt:
                trained = [k for k, v in enumerate(labels.tolist()) if v != -100]
                last = [k for k in trained if k >= len(prompt)]
                assert last == list(range(len(prompt), len(ref_ids) - 1))  # through <|im_end|>, not the "\n"
                assert ids[last[-1]] == 151645
                prefix_checked += 1
    assert prefix_checked > 150
    assert encoder.fallback_rows > 0  # leading-newline contents exercised the slow path


def test_assistant_im_end_trained_everything_else_not(qwen_tokenizer, encoder):
    conv = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "<think>\nsum\n</think>\n\n4"},
            {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]
    ids, labels = encoder.encode([conv]).row(0)
    trained = ids[labels != -100]
    assert (labels[labels != -100] == trained).all()  # unshifted
    assert qwen_tokenizer.decode(trained) == "<think>\nsum\n</think>\n\n4<|im_end|>6<|im_end|>"
    assert (ids == 151645).sum() == 5 and (trained == 151645).sum() == 2


def test_system_prompt_default_custom_disabled(qwen_tokenizer, encoder):
    row = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    c = row_to_conversations(row, FormatConfig("cot"))[0]
    assert c[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert row_to_conversations(row, FormatConfig("cot", system_prompt="Be brief."))[0][0]["content"] == "Be brief."
    c = row_to_conversations(row, FormatConfig("cot", system_prompt=None))[0]
    assert c[0]["role"] == "user"
    text = qwen_tokenizer.decode(encoder.encode([c]).ids)
    assert "You are Qwen, created by Alibaba Cloud" in text  # the template's own default
    # a row with its own system message keeps it
    own = {"messages": [{"role": "system", "content": "Mine"}] + row["messages"]}
    assert row_to_conversations(own, FormatConfig("cot"))[0][0]["content"] == "Mine"


def _openr1_row(**kw):
    row = {"problem": "Find x.", "solution": "x=1", "answer": "1",
           "messages": [{"role": "user", "content": "Find x."}, {"role": "assistant", "content": "<think>a</think> 1"}],
           "generations": ["<think>long wrong</think> 2", "<think>a long right one</think> 1", "<think>b</think> 1",
                           "<think>cut"],
           "correctness_math_verify": [False, True, True, True],
           "is_reasoning_complete": [True, True, True, False]}
    row.update(kw)
    return row


def test_openr1_policies():
    row = _openr1_row()
    assert row_to_conversations(row, FormatConfig("openr1"))[0][-1]["content"] == "<think>a</think> 1"
    first = row_to_conversations(row, FormatConfig("openr1", generation_policy="first_correct"))
    assert [c[-1]["content"] for c in first] == ["<think>a long right one</think> 1"]
    assert first[0][1] == {"role": "user", "content": "Find x."}
    short = row_to_conversations(row, FormatConfig("openr1", generation_policy="shortest_correct"))
    assert [c[-1]["content"] for c in short] == ["<think>b</think> 1"]
    allc = row_to_conversations(row, FormatConfig("openr1", generation_policy="all_correct"))
    assert [c[-1]["content"] for c in allc] == ["<think>a long right one</think> 1", "<think>b</think> 1"]
    # incomplete reasoning never counts as correct; null verdicts are not correct
    none = _openr1_row(correctness_math_verify=[None, False, False, True])
    with pytest.raises(RowError) as e:
        row_to_conversations(none, FormatConfig("openr1", generation_policy="all_correct"))
    assert e.value.reason == "no_correct_generation"
    bad = _openr1_row(is_reasoning_complete=[True])
    with pytest.raises(RowError) as e:
        row_to_conversations(bad, FormatConfig("openr1", generation_policy="first_correct"))
    assert e.value.reason == "length_mismatch" and e.value.field == "is_reasoning_complete"


@pytest.mark.parametrize("row,reason,field", [
    ({}, "missing_column", "messages"),
    ({"messages": "hi"}, "bad_type", "messages"),
    ({"messages": []}, "no_assistant_turn", "messages"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no_assistant_turn", "messages"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
     "empty_content", "messages[1].content"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  \n"}]},
     "empty_content", "messages[1].content"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
     "non_string_content", "messages[0].content"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
     "non_string_content", "messages[0].content"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "missing_column", "messages[0].content"),
    ({"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "bad_role", "messages[0].role"),
    ({"messages": ["q", "a"]}, "bad_type", "messages[0]"),
])
def test_bad_rows_reason_and_field(row, reason, field):
    with pytest.raises(RowError) as e:
        row_to_conversations(row, FormatConfig("cot"))
    assert (e.value.reason, e.value.field) == (reason, field)


def test_counted_skips_and_strict(encoder):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows = [good, {"messages": 3}, good, {"nope": 1}, {"messages": [{"role": "user", "content": "q"},
                                                                     {"role": "assistant", "content": "x<|im_end|>y"}]}]
    locs = [f"data.jsonl:{i + 1}" for i in range(len(rows))]
    skips = SkipCounter()
    batch = encode_rows(rows, FormatConfig("cot"), encoder, skips, locs)
    assert len(batch) == 2
    assert skips.counts == {"bad_type": 1, "missing_column": 1, "special_token_in_content": 1}
    assert skips.first["bad_type"].startswith("data.jsonl:2")
    with pytest.raises(DataError, match=r"data\.jsonl:2: field 'messages'.*expected a list"):
        encode_rows(rows, FormatConfig("cot"), encoder, SkipCounter(), locs, strict=True)


def test_magpie_and_messages_formats(qwen_tokenizer, encoder):
    m = row_to_conversations({"instruction": "Sum 1..3", "response": "<think>1+2+3</think>6"}, FormatConfig("magpie"))
    assert m[0][1:] == [{"role": "user", "content": "Sum 1..3"}, {"role": "assistant", "content": "<think>1+2+3</think>6"}]
    with pytest.raises(RowError) as e:
        row_to_conversations({"instruction": "x", "response": 1}, FormatConfig("magpie"))
    assert (e.value.reason, e.value.field) == ("bad_type", "response")
    conv = row_to_conversations({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                              {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
                                FormatConfig("messages", system_prompt=None))[0]
    ids, labels = encoder.encode([conv]).row(0)
    assert qwen_tokenizer.decode(ids[labels != -100]) == "b<|im_end|>d<|im_end|>"
    for c in (conv, m[0]):
        ids, labels = encoder.encode([c]).row(0)
        assert (ids.tolist(), labels.tolist()) == _reference_labels(qwen_tokenizer, c)


STRATOS = {"system": "Your role as an assistant involves thoroughly exploring questions...",
           "conversations": [{"from": "user", "value": "What is 1+1?"},
                             {"from": "assistant", "value": "<|begin_of_thought|>\n\nOne plus one.\n\n<|end_of_thought|>"
                                                            "\n\n<|begin_of_solution|>\n\n\\boxed{2}\n\n<|end_of_solution|>"}]}


def test_stratos_keep_and_r1(qwen_tokenizer, encoder):
    keep = row_to_conversations(STRATOS, FormatConfig("stratos"))[0]
    assert keep[0] == {"role": "system", "content": STRATOS["system"]}
    assert keep[-1]["content"].startswith("<|begin_of_thought|>")
    r1 = row_to_conversations(STRATOS, FormatConfig("stratos", think_style="r1"))[0]
    assert r1[0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert r1[-1]["content"] == "<think>\nOne plus one.\n</think>\n\n\\boxed{2}"
    for conv in (keep, r1):
        ids, labels = encoder.encode([conv]).row(0)
        ref_ids, ref_labels = _reference_labels(qwen_tokenizer, conv)
        assert ids.tolist() == ref_ids and labels.tolist() == ref_labels
    with pytest.raises(RowError) as e:
        stratos_to_r1("no markers")
    assert e.value.reason == "missing_think_markers"
    with pytest.raises(RowError) as e:
        row_to_conversations({"conversations": [{"from": "robot", "value": "x"}]}, FormatConfig("stratos"))
    assert e.value.field == "conversations[0].from"


def test_template_that_rewrites_content_is_refused(qwen_tokenizer):
    strip_tpl = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}")
    enc = ChatEncoder(qwen_tokenizer, chat_template=strip_tpl, engine="hf")
    with pytest.raises(TemplateError):
        enc.encode([[{"role": "user", "content": " q "}, {"role": "assistant", "content": "a "}]])
    drop_tpl = "{% for m in messages %}{% if m.role != 'assistant' %}{{ m.content }}{% endif %}{% endfor %}"
    with pytest.raises(TemplateError):
        ChatEncoder(qwen_tokenizer, chat_template=drop_tpl, engine="hf").encode([[{"role": "user", "content": "q"},
                                                                     {"role": "assistant", "content": "a"}]])


# DeepSeek-R1-Distill's rule, in Qwen's chat markup (the Qwen tokenizer has no DeepSeek specials):
# an assistant turn keeps only the text after </think>.
R1_DISTILL_TPL = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{% set content = m['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}"
)


def _conv(answer: str, q: str = "What is 2+2?") -> list[dict]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]


def test_content_dependent_template_refused_naming_first_diverging_row(qwen_tokenizer):
    """Issue 13 item 5: the check used to run on the first row of each layout only, so a
    DeepSeek-R1-Distill-style template passed on a harmless first row and later rows diverged."""
    rows = [{"messages": _conv(a)} for a in ("The answer is 4.", "It is 4.", "So 4.",
                                              "<think>\n2+2 is 4, I am sure of it.\n</think>\n\n\\boxed{4}",
                                              "<think>x</think> 5")]
    enc = ChatEncoder(qwen_tokenizer, chat_template=R1_DISTILL_TPL, engine="hf")
    enc.encode([r["messages"] for r in rows[:3]])  # the harmless rows do render exactly
    cfg = FormatConfig("cot", system_prompt=None)
    locs = [f"data.jsonl:{i + 1}" for i in range(len(rows))]
    with pytest.raises(TemplateError, match=r"^data\.jsonl:4: .*\d+ tokens against apply_chat_template's \d+; "
                                            r"the row has </think>, <think>"):
        encode_rows(rows, cfg, ChatEncoder(qwen_tokenizer, chat_template=R1_DISTILL_TPL, engine="hf"),
                    SkipCounter(), locs)
    # a row past CHECK_ROWS_PER_LAYOUT rows is still checked when its class is new
    from distilled.data.chat import CHECK_ROWS_PER_LAYOUT

    many = [{"messages": _conv(f"Plain answer {i}.")} for i in range(CHECK_ROWS_PER_LAYOUT + 5)] + rows[3:4]
    with pytest.raises(TemplateError, match=rf"^row {len(many)}: "):
        encode_rows(many, cfg, ChatEncoder(qwen_tokenizer, chat_template=R1_DISTILL_TPL, engine="hf"), SkipCounter())


def test_whitespace_stripping_template_refused_on_a_later_row(qwen_tokenizer):
    trim_tpl = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}"
    rows = [{"messages": _conv(f"Answer {i}.")} for i in range(12)]  # more than CHECK_ROWS_PER_LAYOUT
    rows.append({"messages": _conv("Answer with a trailing newline.\n")})
    with pytest.raises(TemplateError, match=rf"^row {len(rows)}: .*trailing whitespace"):
        encode_rows(rows, FormatConfig("cot", system_prompt=None),
                    ChatEncoder(qwen_tokenizer, chat_template=trim_tpl, engine="hf"), SkipCounter())


def test_every_row_class_checked_and_exact_with_the_real_template(qwen_tokenizer, encoder):
    """The Qwen2.5 template renders contents verbatim: every class passes, ids are exact."""
    answers = ["4", " 4", "4 ", "\n4\n", "<think>a</think> 4", "<think>a", "a</think>4", " <think>\nb\n</think>\n\n4 "]
    convs = [_conv(a, q) for a in answers for q in ("q", " q", "q\n")]
    batch = encoder.encode(convs)
    for i, conv in enumerate(convs):
        ids, _ = batch.row(i)
        assert ids.tolist() == qwen_tokenizer.apply_chat_template(conv, tokenize=True)


def test_to_arrow_types(encoder):
    import pyarrow as pa

    convs = rows_to_conversations([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 3,
                                  FormatConfig("cot"), SkipCounter())
    t = encoder.encode(convs).to_arrow()
    assert t.schema.field("input_ids").type == pa.list_(pa.int32())
    assert t.schema.field("labels").type == pa.list_(pa.int32())
    assert t.num_rows == 3
    a = np.asarray(t.column("input_ids").combine_chunks().values)
    b = np.asarray(t.column("labels").combine_chunks().values)
    assert a.shape == b.shape and ((b == -100) | (b == a)).all()


def test_format_config_validation():
    with pytest.raises(ValueError, match="unknown format"):
        FormatConfig("alpaca")
    with pytest.raises(ValueError, match="generation_policy"):
        FormatConfig("openr1", generation_policy="best")
    assert FormatConfig("openr1", generation_policy="messages").generation_policy is None


def _tiny_bpe(merges_in_id_order: bool, extra: bool = False):
    """A byte-level BPE (256 bytes + 'ab' + 'abc') with Qwen2's pre-tokenizer, as a fast tokenizer.
    ``extra``: instead 'ab', 'bc', 'abc' with the non-canonical rule ('a', 'bc') for 'abc'."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    from distilled.data.tokenizer import QWEN2_PAT, bytes_to_unicode

    enc = bytes_to_unicode()
    vocab = {enc[b]: b for b in range(256)}
    vocab["ab"], vocab["abc"] = 256, 257
    merges = [("a", "b"), ("ab", "c")] if merges_in_id_order else [("ab", "c"), ("a", "b")]
    if extra:
        vocab["bc"], vocab["abc"] = 257, 258
        merges = [("a", "b"), ("b", "c"), ("a", "bc")]
    tok = Tokenizer(BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PAT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_tiktoken_engine_only_when_provably_equal(qwen_tokenizer):
    from distilled.data.chat import TiktokenEngine

    ok = TiktokenEngine.from_tokenizer(_tiny_bpe(True))
    assert ok is not None and ok.encode_batch(["abc abd"]) == [[257, 32, 256, 100]]
    assert TiktokenEngine.from_tokenizer(_tiny_bpe(False)) is None  # merge order != id order
    # ids in merge order, but 'abc' = a + bc is not the split tiktoken makes (ab + c): HF gives
    # [ab, c] where tiktoken would give [abc], so the engine must refuse
    odd = _tiny_bpe(True, extra=True)
    assert odd.encode("abc") == [256, 99]
    assert TiktokenEngine.from_tokenizer(odd) is None
    with pytest.raises(ValueError, match="not a plain byte-level BPE"):
        ChatEncoder(_tiny_bpe(False), chat_template="{% for m in messages %}{{ m.content }}{% endfor %}",
                    engine="tiktoken")
    q = TiktokenEngine.from_tokenizer(qwen_tokenizer)
    assert q is not None and q.nfc
    text = "e\u0301 caf\u00e9 <|im_start|>user\n12345<|im_end|><tool_call>"
    assert q.encode_batch([text]) == [qwen_tokenizer.encode(text)]
