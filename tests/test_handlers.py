"""MindFormers 1.9 handlers: registration, dataset-level API, the MindFormers-compatible toolkit
script with the shipped YAMLs' shape, and MindFormers' own HFDataLoader resolving our handlers by
``type:`` name."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from distilled.data.chat import ChatEncoder, encode_rows
from distilled.data.formats import FormatConfig, SkipCounter

REPO = Path(__file__).resolve().parents[1]


def _openr1_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(1, 30)
        think = " ".join(rng.choice(["Let", "x", "=", str(i), "so", "\\frac{1}{2}", "数", "Wait,"]) for _ in range(k * 5))
        gen = f"<think>\n{think}\n</think>\n\nThe answer is $\\boxed{{{i}}}$."
        rows.append({
            "problem": f"Problem {i}: compute {i}+0.", "solution": str(i), "answer": str(i), "uuid": f"u{i}",
            "messages": [{"role": "user", "content": f"Problem {i}: compute {i}+0."}, {"role": "assistant", "content": gen}],
            "generations": [gen + " wrong", gen],
            "correctness_math_verify": [False, True],
            "is_reasoning_complete": [True, True],
        })
    return rows


@pytest.fixture(scope="module")
def openr1_jsonl(tmp_path_factory) -> tuple[Path, list[dict]]:
    rows = _openr1_rows(40)
    bad = [{"problem": "no messages"}, {"problem": "x", "messages": [{"role": "user", "content": "only user"}]}]
    d = tmp_path_factory.mktemp("openr1")
    path = d / "train.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in rows[:10] + bad + rows[10:]:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path, rows


def test_register_with_mindformers_idempotent():
    import mindformers.dataset.handler as mf_handler

    import handlers

    handlers.register_with_mindformers()
    handlers.register_with_mindformers()
    for name in ("OpenR1Math220kDataHandler", "CoTJsonlDataHandler", "BFDPackingHandler", "MessagesDataHandler",
                 "StratosDataHandler", "MagpieDataHandler"):
        assert getattr(mf_handler, name) is getattr(handlers, name)


@pytest.mark.parametrize("policy", [None, "all_correct"])
def test_openr1_handler_matches_formats(openr1_jsonl, qwen_tokenizer_dir, qwen_tokenizer, policy):
    import datasets

    from handlers import OpenR1Math220kDataHandler

    path, rows = openr1_jsonl
    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    h = OpenR1Math220kDataHandler(seq_length=4096, generation_policy=policy,
                                  tokenizer={"pretrained_model_dir": str(qwen_tokenizer_dir)})
    out = h(ds)
    assert out.column_names == ["input_ids", "labels"]
    assert len(out) == 40 and h.rows_in == 42
    if policy is None:
        assert h.skips.counts == {"missing_column": 1, "no_assistant_turn": 1}
    else:  # both bad rows lack `generations`
        assert h.skips.counts == {"missing_column": 2}
    want = encode_rows(rows, FormatConfig("openr1", generation_policy=policy), ChatEncoder(qwen_tokenizer), SkipCounter())
    for i in (0, 17, 39):
        ids, labels = want.row(i)
        assert out[i]["input_ids"] == ids.tolist() and out[i]["labels"] == labels.tolist()
    text = qwen_tokenizer.decode(out[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nPlease reason step by step")


def test_cot_handler_strict_names_row(tmp_path, qwen_tokenizer_dir):
    import datasets

    from distilled.data.formats import DataError
    from handlers import CoTJsonlDataHandler

    ds = datasets.Dataset.from_list([
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
    ])
    h = CoTJsonlDataHandler(tokenizer={"pretrained_model_dir": str(qwen_tokenizer_dir)}, strict=True)
    with pytest.raises(DataError, match=r"row 2: field 'messages\[1\]\.content'"):
        h(ds)
    h2 = CoTJsonlDataHandler(tokenizer={"vocab_file": str(qwen_tokenizer_dir / "vocab.json"), "type": "Qwen2Tokenizer"},
                             system_prompt=None)
    out = h2(ds)
    assert len(out) == 1 and h2.skips.counts == {"empty_content": 1}


def _write_yaml(path: Path, loader: dict) -> Path:
    path.write_text(yaml.safe_dump({"train_dataset": {"data_loader": loader}}, sort_keys=False))
    return path


def test_shipped_yamls_are_valid_for_mf19():
    for name, seq in (("data_process_packing.yaml", 32768), ("data_process_packing_8k.yaml", 8192)):
        cfg = yaml.safe_load((REPO / "configs" / name).read_text())["train_dataset"]["data_loader"]
        assert cfg["load_func"] == "load_from_disk" and "dataset_path" in cfg and "split" not in cfg
        (h,) = cfg["handler"]
        assert h == {"type": "BFDPackingHandler", "seq_length": seq, "pad_token": 151643, "overlong": "drop"}
    cfg = yaml.safe_load((REPO / "configs" / "data_process_handling.yaml").read_text())["train_dataset"]["data_loader"]
    (h,) = cfg["handler"]
    assert h["type"] == "OpenR1Math220kDataHandler" and "pretrained_model_dir" in h["tokenizer"]
    assert h["system_prompt"] == "Please reason step by step, and put your final answer within \\boxed{}."


def test_toolkit_handling_then_packing(tmp_path, openr1_jsonl, qwen_tokenizer_dir):
    """The two-step YAML flow of the docs, through MindFormers' own loader code, atomically saved."""
    import datasets

    from toolkit.data_preprocess.huggingface.datasets_preprocess import main

    path, rows = openr1_jsonl
    shipped = yaml.safe_load((REPO / "configs" / "data_process_handling.yaml").read_text())["train_dataset"]["data_loader"]
    shipped["data_files"] = str(path)
    shipped["path"] = "json"
    shipped["handler"][0]["tokenizer"]["pretrained_model_dir"] = str(qwen_tokenizer_dir)
    shipped["handler"][0]["num_proc"] = None
    shipped["handler"].append({"type": "save_to_disk", "dataset_path": str(tmp_path / "ignored")})
    handled = tmp_path / "handled"
    assert main(["--config", str(_write_yaml(tmp_path / "h.yaml", shipped)), "--save_path", str(handled)]) == 0
    assert not (tmp_path / "ignored").exists()
    rep = json.loads((handled / "report.json").read_text())
    assert rep["rows_loaded"] == 42 and rep["rows_out"] == 40
    assert rep["handlers"][0]["skips"]["by_reason"] == {"missing_column": 1, "no_assistant_turn": 1}
    ds = datasets.load_from_disk(str(handled))
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == 40

    pack = yaml.safe_load((REPO / "configs" / "data_process_packing_8k.yaml").read_text())["train_dataset"]["data_loader"]
    pack["dataset_path"] = str(handled)
    pack["handler"][0]["seq_length"] = 1024
    packed = tmp_path / "packed"
    assert main(["--config", str(_write_yaml(tmp_path / "p.yaml", pack)), "--save_path", str(packed)]) == 0
    pds = datasets.load_from_disk(str(packed))
    assert set(pds.column_names) >= {"input_ids", "labels", "actual_seq_len", "position_ids"}
    rep = json.loads((packed / "report.json").read_text())
    st = rep["handlers"][0]["packing"]
    assert st["samples_in"] == 40 and st["samples_packed"] + st["dropped_overlong"] == 40
    total = sum(len(x) for x in ds["input_ids"] if len(x) <= 1024)
    ids = np.concatenate([np.asarray(r, np.int64) for r in pds["input_ids"]])
    assert (ids != 151643).sum() == total  # every real token kept; padding is 151643, never 0
    assert all(len(r) == 1024 for r in pds["input_ids"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_mindformers_hfdataloader_resolves_our_types(tmp_path, openr1_jsonl, qwen_tokenizer_dir):
    """A MindFormers data_loader naming OpenR1Math220kDataHandler + BFDPackingHandler works once
    the project's entry point has registered them, and yields the packed columns."""
    import handlers
    from mindformers.dataset.dataloader.hf_dataloader import HFDataLoader

    handlers.register_with_mindformers()
    path, rows = openr1_jsonl
    ds = HFDataLoader(load_func="load_dataset", path="json", data_files=str(path), split="train",
                      handler=[{"type": "OpenR1Math220kDataHandler", "tokenizer": {"pretrained_model_dir": str(qwen_tokenizer_dir)}},
                               {"type": "BFDPackingHandler", "seq_length": 2048, "pad_token": 151643}],
                      create_attention_mask=True, use_broadcast_data=False)
    item = next(ds.create_dict_iterator(num_epochs=1, output_numpy=True))
    assert {"input_ids", "labels", "loss_mask", "position_ids", "attention_mask"} <= set(item)
    assert item["input_ids"].shape[-1] == 2048
    lm = item["loss_mask"].reshape(-1)
    labels = item["labels"].reshape(-1)
    assert ((labels != -100) == (lm != 0)).all()


@pytest.mark.slow
def test_stratos_magpie_handlers_and_num_proc(qwen_tokenizer_dir, qwen_tokenizer):
    import datasets

    from handlers import MagpieDataHandler, StratosDataHandler

    tok = {"pretrained_model_dir": str(qwen_tokenizer_dir)}
    think = ("<|begin_of_thought|>\n\nAdd them.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n"
             "\\boxed{{{}}}\n\n<|end_of_solution|>")
    rows = [{"system": "Think first.", "conversations": [{"from": "user", "value": f"{i}+{i}?"},
                                                        {"from": "assistant", "value": think.format(2 * i)}]}
            for i in range(12)]
    rows.append({"system": "x", "conversations": [{"from": "user", "value": "no markers"},
                                                  {"from": "assistant", "value": "just text"}]})
    ds = datasets.Dataset.from_list(rows)
    h = StratosDataHandler(tokenizer=tok, think_style="r1", num_proc=2, batch_size=4)
    out = h(ds)
    assert len(out) == 12
    text = qwen_tokenizer.decode(out[3]["input_ids"])
    assert "<think>\nAdd them.\n</think>\n\n\\boxed{6}<|im_end|>" in text and "Please reason step by step" in text
    keep = StratosDataHandler(tokenizer=tok)(ds)
    assert len(keep) == 13 and "<|im_start|>system\nThink first.<|im_end|>" in qwen_tokenizer.decode(keep[0]["input_ids"])
    mg = MagpieDataHandler(tokenizer=tok, system_prompt=None)
    out = mg(datasets.Dataset.from_list([{"instruction": "Sum 1..3", "response": "<think>1+2+3</think>6"},
                                         {"instruction": "x", "response": None}]))
    assert len(out) == 1 and mg.skips.counts == {"missing_column": 1}
    labels = np.asarray(out[0]["labels"])
    assert qwen_tokenizer.decode(np.asarray(out[0]["input_ids"])[labels != -100]) == "<think>1+2+3</think>6<|im_end|>"


def test_skip_counts_exact_with_num_proc_and_agree_with_distill_preprocess(tmp_path, qwen_tokenizer_dir):
    """Issue 13 item 2: counters mutated inside ``datasets.map`` workers used to be lost (report
    said 0 skipped with num_proc 8). 16 rows, 8 bad, num_proc 2, batch_size 3 (so batches land on
    both workers): the toolkit's report.json and ``distill preprocess`` count the same skips."""
    from distilled.data import preprocess as pp
    from toolkit.data_preprocess.huggingface.datasets_preprocess import main

    good = _openr1_rows(8)
    um = lambda c: {"role": "user", "content": c}  # noqa: E731
    am = lambda c: {"role": "assistant", "content": c}  # noqa: E731
    bad = [
        {"problem": "no messages 1"},
        {"problem": "no messages 2"},
        {"problem": "x", "messages": [um("only user")]},
        {"problem": "x", "messages": [um("q"), am(" ")]},
        {"problem": "x", "messages": [um("q"), am("")]},
        {"problem": "x", "messages": [um("q"), am("a <|im_end|> b")]},
        {"problem": "x", "messages": [um("q"), {"role": "bot", "content": "a"}]},
        {"problem": "x", "messages": []},
    ]
    rows = [r for pair in zip(good, bad) for r in pair]  # bad rows spread over every batch
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    shipped = yaml.safe_load((REPO / "configs" / "data_process_handling.yaml").read_text())["train_dataset"]["data_loader"]
    shipped.update(data_files=str(path), path="json")
    h = shipped["handler"][0]
    h["tokenizer"]["pretrained_model_dir"] = str(qwen_tokenizer_dir)
    h.update(num_proc=2, batch_size=3)
    handled = tmp_path / "handled"
    assert main(["--config", str(_write_yaml(tmp_path / "h.yaml", shipped)), "--save_path", str(handled)]) == 0
    rep = json.loads((handled / "report.json").read_text())
    (entry,) = rep["handlers"]
    want = {"missing_column": 2, "no_assistant_turn": 2, "empty_content": 2, "special_token_in_content": 1,
            "bad_role": 1}
    assert entry["rows_in"] == 16 and rep["rows_out"] == 8
    assert entry["skips"]["by_reason"] == want and entry["skips"]["total"] == 8
    assert entry["skips"]["first_seen"]["missing_column"].startswith("row 2:")  # first bad row, in row order

    pp_rep = pp.preprocess(pp.PreprocessConfig(inputs=[str(path)], tokenizer=str(qwen_tokenizer_dir), seq_length=8192,
                                               output=str(tmp_path / "pp"), format=FormatConfig("openr1"),
                                               num_proc=2, batch_size=3, progress=False))
    assert pp_rep["rows_in"] == entry["rows_in"]
    assert pp_rep["samples"] == rep["rows_out"]
    assert pp_rep["skips"]["by_reason"] == entry["skips"]["by_reason"]
