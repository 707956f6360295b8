"""Recipes (issue 15): every published run as an 8-NPU YAML + a tiny CPU twin + commands.

Fast tests: every YAML passes MindFormers 1.9's config-class check; each recipe's global batch and
layout are what its guide says (MindFormers' formula); twins keep their recipe's structure; the
10%-floor cosine of MindFormers equals transformers' ``cosine_with_min_lr``; the guides' data shapes
(Bespoke-Stratos, Mixture-of-Thoughts with a domain column, Magpie-Reasoning-V2) tokenise and mask
right through both preprocessing paths; ``--preset open-r1`` and the reference rows; the export's
generation config and model card, loaded with transformers and generating until ``<|im_end|>``.

Slow tests: each recipe end to end on its CPU twin (data -> run_mindformer.py in graph mode ->
convert -> ``distill eval --preset open-r1`` on a few problems -> model card with results).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from distilled import recipes
from distilled.recipes import RECIPES, global_batch

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
IM_END, EOT = 151645, 151643


def _raw(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())


# --------------------------------------------------------------------------------------- YAMLs

@pytest.mark.parametrize("rec", RECIPES, ids=lambda r: r.name)
def test_recipe_yamls_pass_mindformers_config_classes(rec):
    from distilled.train.mindformers_run import yaml_problems

    assert yaml_problems(REPO / rec.config) == []
    assert yaml_problems(REPO / rec.twin) == []
    for p in rec.data_configs:
        assert (REPO / p).is_file(), p


EXPECTED_LAYOUT = {  # recipe -> (seq_length, global batch rows, batch, dp, GA)
    "mindspore-docs-7b": (32768, None, 1, 1, None),
    "openr1-stratos-1.5b": (4096, 128, 1, 8, 16),
    "magpie-lora-3b": (8192, 32, 1, 8, 4),
    "openr1-distill-7b": (32768, 128, 1, 1, 128),
}


@pytest.mark.parametrize("rec", RECIPES, ids=lambda r: r.name)
def test_global_batch_layout_and_per_token_loss(rec):
    raw = _raw(rec.config)
    seq, gb, bs, dp, ga = EXPECTED_LAYOUT[rec.name]
    mc = raw["model"]["model_config"]
    assert mc["seq_length"] == seq and recipes.devices(raw) == 8
    rc, pc = raw["runner_config"], raw["parallel_config"]
    assert (rc["batch_size"], pc["data_parallel"]) == (bs, dp)
    if gb is not None:
        assert rc["gradient_accumulation_steps"] == ga
        assert global_batch(raw) == rc["batch_size"] * pc["data_parallel"] * rc["gradient_accumulation_steps"] == gb
    if global_batch(raw) > 1 or rec.name != "mindspore-docs-7b":
        # MF 1.9 only accumulates in semi-auto parallel, and only the wrapper key picks the
        # numerator/denominator accumulation cell: both keys, always together
        assert raw["parallel"]["parallel_mode"] == 1 and raw["parallel"]["full_batch"] is True
        assert raw["calculate_per_token_loss"] is True and raw["runner_wrapper"]["calculate_per_token_loss"] is True
    assert raw["context"]["mode"] == 0 and mc["eos_token_id"] == IM_END
    assert mc["use_flash_attention"] is True and raw["train_dataset"]["data_loader"]["create_attention_mask"] is True
    assert (mc["hidden_size"] // mc["num_heads"]) * mc["num_heads"] == mc["hidden_size"]
    assert mc["num_heads"] % pc["model_parallel"] == 0 and mc["n_kv_heads"] % pc["model_parallel"] == 0


@pytest.mark.parametrize("rec", RECIPES, ids=lambda r: r.name)
def test_twin_has_its_recipes_structure(rec):
    big, twin = _raw(rec.config), _raw(rec.twin)
    bm, tm = big["model"]["model_config"], twin["model"]["model_config"]
    assert set(twin) - {"parallel"} <= set(big) | {"parallel"}
    assert twin["model"]["arch"] == big["model"]["arch"] and tm["type"] == bm["type"]
    assert twin["train_dataset"]["data_loader"]["type"] == big["train_dataset"]["data_loader"]["type"]
    assert twin["context"]["device_target"] == "CPU" and twin["context"]["mode"] == 0  # graph mode
    # the docs run's twin predates the recipes and keeps TinyQwen2Shape's theta (1e6)
    keys = ("tie_word_embeddings", "qkv_has_bias", "input_sliced_sig") + (() if rec.name == "mindspore-docs-7b"
                                                                         else ("theta",))
    for key in keys:
        assert tm[key] == bm[key], key
    assert ("pet_config" in tm) == ("pet_config" in bm) == rec.lora
    assert twin["lr_schedule"]["type"] == big["lr_schedule"]["type"]
    assert twin["lr_schedule"]["warmup_ratio"] == big["lr_schedule"]["warmup_ratio"]
    if "lr_end" in big["lr_schedule"]:  # the same floor ratio
        assert np.isclose(twin["lr_schedule"]["lr_end"] / twin["lr_schedule"]["learning_rate"],
                          big["lr_schedule"]["lr_end"] / big["lr_schedule"]["learning_rate"])
    assert twin["optimizer"]["betas"] == big["optimizer"]["betas"]
    assert twin["runner_wrapper"]["max_grad_norm"] == big["runner_wrapper"]["max_grad_norm"]
    assert twin.get("calculate_per_token_loss") == big.get("calculate_per_token_loss")
    if rec.name != "mindspore-docs-7b":
        assert twin["runner_config"]["gradient_accumulation_steps"] == 2


def test_openr1_distill_7b_has_open_r1s_settings():
    raw = _raw(recipes.get("openr1-distill-7b").config)
    mc, lr = raw["model"]["model_config"], raw["lr_schedule"]
    assert mc["theta"] == 300000.0 and mc["seq_length"] == mc["max_position_embedding"] == 32768
    assert (mc["hidden_size"], mc["num_layers"], mc["num_heads"], mc["n_kv_heads"], mc["vocab_size"],
            mc["intermediate_size"], mc["tie_word_embeddings"]) == (3584, 28, 28, 4, 152064, 18944, False)
    assert lr["type"] == "CosineWithWarmUpLR" and lr["learning_rate"] == 4e-5 and lr["lr_end"] == 4e-6
    assert lr["warmup_ratio"] == 0.03 and raw["runner_config"]["epochs"] == 5
    assert raw["runner_wrapper"]["use_clip_grad"] is True and raw["runner_wrapper"]["max_grad_norm"] == 0.2
    assert global_batch(raw) == 128
    assert (REPO / "configs" / "open_r1_system_prompt.txt").read_text().strip() == recipes.OPEN_R1_SYSTEM_PROMPT
    data = _raw("configs/data_process_mixture_of_thoughts.yaml")["train_dataset"]["data_loader"]
    assert data["handler"][0]["system_prompt"] == recipes.OPEN_R1_SYSTEM_PROMPT


def test_stratos_1_5b_has_the_guides_settings():
    raw = _raw(recipes.get("openr1-stratos-1.5b").config)
    mc = raw["model"]["model_config"]
    assert mc["tie_word_embeddings"] is True and mc["theta"] == 10000.0 and mc["seq_length"] == 4096
    assert (mc["hidden_size"], mc["num_layers"], mc["num_heads"], mc["n_kv_heads"], mc["vocab_size"],
            mc["intermediate_size"]) == (1536, 28, 12, 2, 151936, 8960)
    assert raw["lr_schedule"]["learning_rate"] == 2e-5 and raw["runner_config"]["epochs"] == 1
    assert mc["compute_dtype"] == "bfloat16" and raw["recompute_config"]["recompute"] is True


def test_mindformers_has_no_phi3_model():
    """Why the LoRA recipe uses a Qwen2.5 student: MindFormers 1.9 ships no Phi-3 model class."""
    import mindformers

    models = Path(mindformers.__file__).parent / "models"
    names = {p.name for p in models.iterdir() if p.is_dir()}
    assert "llama" in names and "qwen2" in names
    assert not any("phi" in n.lower() for n in names)
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

    assert not MindFormerRegister.is_exist(MindFormerModuleType.MODELS, "Phi3ForCausalLM")


def test_cosine_floor_equals_transformers_cosine_with_min_lr():
    """MindFormers' CosineWithWarmUpLR (lr_end = 10%) built from the recipe YAML follows transformers'
    cosine_with_min_lr (min_lr_rate 0.1) step by step; the floor is reached and never undershot."""
    import mindspore as ms
    import torch
    from mindformers.core.lr import build_lr
    from mindformers.tools.register import MindFormerConfig
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    lr_cfg = dict(_raw(recipes.get("openr1-distill-7b").config)["lr_schedule"])
    total = 400  # 3% warmup = 12 steps, an integer both ways (MF floors, transformers ceils)
    lr_cfg["total_steps"] = total
    sched = build_lr(MindFormerConfig(**lr_cfg))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr_cfg["learning_rate"])
    hf = get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=12, num_training_steps=total,
                                                     min_lr_rate=0.1)
    ms_lr = np.array([float(sched(ms.Tensor(s, ms.int32)).asnumpy()) for s in range(total + 5)])
    hf_lr = np.array([lr_cfg["learning_rate"] * hf.lr_lambdas[0](s) for s in range(total + 1)])
    assert np.allclose(ms_lr[:total + 1], hf_lr, rtol=1e-5, atol=1e-12)
    assert np.isclose(ms_lr[12], 4e-5) and np.isclose(ms_lr[total], 4e-6)
    assert ms_lr[12:].min() >= 4e-6 * (1 - 1e-6)
    assert np.allclose(ms_lr[total:], 4e-6)  # MindFormers then holds the floor (transformers' would rise)


# --------------------------------------------------------------------------- the guides' data

STRATOS_SYSTEM = ("Your role as an assistant involves thoroughly exploring questions through a systematic long "
                  "thinking process before providing the final precise and accurate solutions.")


def stratos_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows shaped like bespokelabs/Bespoke-Stratos-17k: `system` + `conversations` [{from, value}]."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        a, b = int(rng.randint(2, 90)), int(rng.randint(2, 90))
        out.append({"system": STRATOS_SYSTEM, "conversations": [
            {"from": "user", "value": f"Return your final response within \\boxed{{}}. What is {a} + {b}?"},
            {"from": "assistant", "value": f"<|begin_of_thought|>\n\n{a} plus {b}: add the tens, then the ones."
                                           f"\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n{a} + {b} = "
                                           f"\\boxed{{{a + b}}}\n\n<|end_of_solution|>"}]})
    return out


def mot_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows shaped like open-r1/Mixture-of-Thoughts: `messages`, `num_tokens`, `source` (domain)."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        dom = ("math", "code", "science")[i % 3]
        a, b = int(rng.randint(2, 90)), int(rng.randint(2, 90))
        if dom == "code":
            q, ans = f"Write a Python function returning {a} + {b}.", f"```python\ndef f():\n    return {a} + {b}\n```"
        elif dom == "science":
            q, ans = f"A cart moves {a} m then {b} m. Total distance?", f"The total is \\boxed{{{a + b}}} m."
        else:
            q, ans = f"What is {a} + {b}?", f"The answer is \\boxed{{{a + b}}}."
        msgs = [{"role": "user", "content": q},
                {"role": "assistant", "content": f"<think>\n{a} and {b} make {a + b}.\n</think>\n\n{ans}"}]
        out.append({"messages": msgs, "num_tokens": 40 + i, "source": dom})
    return out


def magpie_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows shaped like Magpie-Reasoning-V2-250K-CoT-Deepseek-R1-Llama-70B (instruction/response with
    <think>, plus the set's other columns, which are ignored)."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        a, b = int(rng.randint(2, 90)), int(rng.randint(2, 90))
        instr = f"If I have {a} apples and buy {b} more, how many apples do I have?"
        resp = f"<think>\nStart with {a}, add {b}: {a + b}.\n</think>\n\nYou have \\boxed{{{a + b}}} apples."
        out.append({"uuid": f"m{i}", "instruction": instr, "response": resp,
                    "conversations": [{"from": "human", "value": instr}, {"from": "gpt", "value": resp}],
                    "task_category": "Math", "difficulty": "easy", "language": "EN"})
    return out


def openr1_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows shaped like OpenR1-Math-220k (`problem` + `messages`)."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(n):
        a, b = int(rng.randint(2, 90)), int(rng.randint(2, 90))
        p = f"What is {a} + {b}?"
        out.append({"problem": p, "messages": [{"role": "user", "content": p}, {
            "role": "assistant", "content": f"<think>\n{a} plus {b} is {a + b}.\n</think>\n\n\\boxed{{{a + b}}}"}]})
    return out


ROWS = {"mindspore-docs-7b": openr1_rows, "openr1-stratos-1.5b": stratos_rows, "magpie-lora-3b": magpie_rows,
        "openr1-distill-7b": mot_rows}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _preprocess(rec, src: Path, out: Path, tokenizer_dir: Path, seq: int, *extra: str) -> dict:
    """The recipe's `distill preprocess` command line (the registry's flags), run in-process."""
    from distilled.cli import main

    args = list(rec.preprocess_args)
    if "--system-prompt" in args:  # the shell's "$(cat configs/open_r1_system_prompt.txt)"
        args[args.index("--system-prompt") + 1] = (REPO / "configs" / "open_r1_system_prompt.txt").read_text().strip()
    rc = main(["preprocess", "--input", str(src), "--format", rec.data_format, *args, "--tokenizer",
               str(tokenizer_dir), "--seq-length", str(seq), "--output", str(out), "--quiet", "--seed", "0",
               "--keep-handled", *extra])
    assert rc == 0
    return json.loads((out / "report.json").read_text())


def _trained_texts(tok, handled_dir: Path) -> list[str]:
    import pyarrow as pa

    with pa.memory_map(str(handled_dir / "handled.arrow")) as src:
        t = pa.ipc.open_file(src).read_all()
    out = []
    for ids, labels in zip(t.column("input_ids").to_pylist(), t.column("labels").to_pylist()):
        out.append(tok.decode([x for x in labels if x != -100]))
    return out, [tok.decode(ids) for ids in t.column("input_ids").to_pylist()]


@pytest.mark.parametrize("name", ["openr1-stratos-1.5b", "magpie-lora-3b", "openr1-distill-7b"])
def test_guide_data_shapes_through_distill_preprocess(name, tmp_path, qwen_tokenizer_dir, qwen_tokenizer):
    rec = recipes.get(name)
    rows = ROWS[name](12)
    rep = _preprocess(rec, _jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "packed", qwen_tokenizer_dir, 512)
    assert rep["rows_in"] == 12 and rep["rows_kept"] == 12 and rep["skips"]["total"] == 0
    trained, full = _trained_texts(qwen_tokenizer, tmp_path / "packed")
    assert len(trained) == 12
    for row, tr, fu in zip(rows, trained, full):
        if name == "openr1-stratos-1.5b":  # system prompt and thought markers kept (think_style keep)
            answer, system = row["conversations"][1]["value"], row["system"]
        elif name == "magpie-lora-3b":
            answer, system = row["response"], "Please reason step by step"
        else:
            answer, system = row["messages"][1]["content"], recipes.OPEN_R1_SYSTEM_PROMPT
        assert tr == answer + "<|im_end|>"  # only the answer and its closing <|im_end|> are trained
        assert fu.startswith("<|im_start|>system\n" + system) and row_user(row) in fu


def row_user(row: dict) -> str:
    if "conversations" in row and "instruction" not in row:
        return row["conversations"][0]["value"]
    return row.get("instruction") or row["messages"][0]["content"]


def test_mixture_of_thoughts_domain_filter_and_mix(tmp_path, qwen_tokenizer_dir, qwen_tokenizer):
    """`--domains` keeps only the listed `source` values, each at its fraction, the same on every run;
    dropped rows are counted, and --strict does not stop on a selection."""
    rec = recipes.get("openr1-distill-7b")
    rows = mot_rows(300)
    src = _jsonl(tmp_path / "mot.jsonl", rows)
    rep = _preprocess(rec, src, tmp_path / "a", qwen_tokenizer_dir, 2048, "--domains", "math,science", "--strict")
    assert rep["rows_kept"] == 200 and rep["skips"]["by_reason"] == {"domain_filtered": 100}
    assert "'code'" in rep["skips"]["first_seen"]["domain_filtered"]
    trained, _ = _trained_texts(qwen_tokenizer, tmp_path / "a")
    assert not any("```python" in t for t in trained)
    rep = _preprocess(rec, src, tmp_path / "b", qwen_tokenizer_dir, 2048, "--domains", "math,code=0.5")
    kept_code = rep["rows_kept"] - 100
    assert rep["skips"]["by_reason"]["domain_filtered"] == 100 and 30 <= kept_code <= 70
    assert rep["skips"]["by_reason"]["domain_subsampled"] == 100 - kept_code
    rep2 = _preprocess(rec, src, tmp_path / "c", qwen_tokenizer_dir, 2048, "--domains", "math,code=0.5")
    assert rep2["rows_kept"] == rep["rows_kept"]  # deterministic (content hash, not a random draw)
    assert _trained_texts(qwen_tokenizer, tmp_path / "c")[0] == _trained_texts(qwen_tokenizer, tmp_path / "b")[0]
    from distilled.data.formats import FormatConfig

    with pytest.raises(ValueError, match="fractions must be in"):
        FormatConfig("messages", domains="math=1.5")


def _mf_yaml_run(tmp_path: Path, cfg_path: str, data_files: Path, tokenizer_dir: Path, tag: str,
                 **handler_kw) -> Path:
    from toolkit.data_preprocess.huggingface.datasets_preprocess import main

    loader = _raw(cfg_path)["train_dataset"]["data_loader"]
    loader.update(path="json", data_files=str(data_files))
    h = loader["handler"][0]
    h["tokenizer"]["pretrained_model_dir"] = str(tokenizer_dir)
    h.update(num_proc=None, **handler_kw)
    y = tmp_path / f"{tag}.yaml"
    y.write_text(yaml.safe_dump({"train_dataset": {"data_loader": loader}}, sort_keys=False))
    out = tmp_path / f"{tag}_handled"
    assert main(["--config", str(y), "--save_path", str(out)]) == 0
    return out


@pytest.mark.parametrize("name", ["openr1-stratos-1.5b", "magpie-lora-3b", "openr1-distill-7b"])
def test_recipe_data_yamls_match_distill_preprocess(name, tmp_path, qwen_tokenizer_dir):
    """The recipe's MindFormers data-process YAMLs (handling, then packing) give the same samples as its
    `distill preprocess` command; the MoT YAML takes the domain selection as a handler key."""
    import datasets
    import pyarrow as pa

    rec = recipes.get(name)
    rows = ROWS[name](30)
    src = _jsonl(tmp_path / "rows.jsonl", rows)
    kw = {"domains": ["math", "science"]} if name == "openr1-distill-7b" else {}
    handled = _mf_yaml_run(tmp_path, rec.data_configs[0], src, qwen_tokenizer_dir, "h", **kw)
    extra = ("--domains", "math,science") if kw else ()
    _preprocess(rec, src, tmp_path / "pp", qwen_tokenizer_dir, 1024, *extra)
    with pa.memory_map(str(tmp_path / "pp" / "handled.arrow")) as f:
        ref = pa.ipc.open_file(f).read_all()
    got = datasets.load_from_disk(str(handled))
    assert got["input_ids"] == ref.column("input_ids").to_pylist()
    assert got["labels"] == ref.column("labels").to_pylist()
    assert len(got) == (20 if kw else 30)
    pack = _raw(rec.data_configs[1])["train_dataset"]["data_loader"]
    assert pack["handler"][0]["type"] == "BFDPackingHandler" and pack["handler"][0]["pad_token"] == EOT
    assert pack["handler"][0]["seq_length"] == _raw(rec.config)["model"]["model_config"]["seq_length"]


# ------------------------------------------- packing == no packing for a whole global batch

def test_packed_global_batch_gradient_equals_unpacked(tmp_path):
    """OpenR1-Distill-7B trains unpacked in open-r1 and packed here. With a per-document mask and the
    token-mean loss over the whole global batch, one optimizer step over the packed rows (several
    accumulation micro-batches) has the same loss and the same gradient, tensor by tensor, as the
    step over the same documents one per row. The per-micro-batch mean (MindFormers' stock
    accumulation) does not: the test would catch it."""
    import pyarrow as pa
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from backend_helpers import VOCAB, make_small_qwen2

    from distilled.train.backends import TrainSettings, get_backend, packed_batch
    from distilled.train.backends.base import split_documents
    from distilled.data.packing import pack_table

    rng = np.random.default_rng(5)
    ids, labels = [], []
    for i in range(10):  # documents with very different trained-token counts (3 .. ~90)
        n = int(rng.integers(12, 110))
        prompt = int(rng.integers(2, n - 2)) if i % 2 else n - 4
        toks = rng.integers(2, VOCAB, n).tolist()
        ids.append(toks)
        labels.append([-100] * prompt + toks[prompt:])
    table = pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())),
                      "labels": pa.array(labels, pa.list_(pa.int32()))})
    packed, _ = pack_table(table, seq_length=128, pad_id=0, seed=0)
    rows = packed.to_pylist()
    assert len(rows) >= 4 and max(len(r["actual_seq_len"]) for r in rows) >= 2
    micro = [packed_batch(rows[i:i + 2]) for i in range(0, len(rows), 2)]  # batch 2 x accumulation k
    docs = [d for mb in micro for r in range(mb.batch_size) for d in split_documents(mb, r)]
    assert len(docs) == 10 and sum(d.num_loss_tokens for d in docs) == sum(mb.num_loss_tokens for mb in micro)

    weights = make_small_qwen2(tmp_path / "w")
    st = TrainSettings(learning_rate=1e-3, warmup_steps=0, total_steps=2, max_grad_norm=None)

    def step(batches):
        be = get_backend("torch", device="cpu")
        be.load_hf(weights)
        be.setup_training(st)
        r = be.train_step(batches)
        return r, {n: p.grad.detach().double().clone() for n, p in be.module.named_parameters()}

    r_packed, g_packed = step(micro)
    r_docs, g_docs = step(docs)
    assert r_packed.tokens == r_docs.tokens
    assert r_packed.loss == pytest.approx(r_docs.loss, rel=1e-5)
    assert r_packed.grad_norm == pytest.approx(r_docs.grad_norm, rel=1e-4)
    for n, g in g_packed.items():
        torch.testing.assert_close(g, g_docs[n], rtol=1e-4, atol=1e-7, msg=n)
    # stock accumulation: sum of each micro-batch's own token mean -> another gradient
    per_mb = [step([mb])[1] for mb in micro]
    total = sum(mb.num_loss_tokens for mb in micro)
    stock = {n: sum(g[n] for g in per_mb) for n in g_packed}
    fixed = {n: sum(g[n] * (mb.num_loss_tokens / total) for g, mb in zip(per_mb, micro)) for n in g_packed}
    for n in g_packed:  # the token-weighted sum of micro-batch means is the per-token gradient ...
        torch.testing.assert_close(fixed[n], g_docs[n], rtol=1e-4, atol=1e-7, msg=n)
    rel = max(float((stock[n] / len(micro) - g_docs[n]).norm() / (g_docs[n].norm() + 1e-12)) for n in g_packed)
    assert rel > 0.05  # ... the plain mean of micro-batch means is not


# ------------------------------------------------------------------- eval preset, reference rows

def test_eval_preset_open_r1_and_explicit_flags_win():
    from distilled.cli import build_parser
    from distilled.eval.runner import _cfg_from_args

    p = build_parser()
    cfg = _cfg_from_args(p.parse_args(["eval", "--preset", "open-r1", "--tasks", "aime24,math_500,gpqa_diamond"]))
    assert (cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.preset) == (0.6, 0.95, 32768, "open-r1")
    assert [cfg.n_for(t) for t in ("aime24", "math_500", "gpqa_diamond")] == [64, 4, 8]
    cfg = _cfg_from_args(p.parse_args(["eval", "--preset", "open-r1", "--tasks", "aime24", "--max-tokens", "64",
                                       "--n", "2", "--temperature", "0.0"]))
    assert (cfg.max_tokens, cfg.n_for("aime24"), cfg.temperature, cfg.top_p) == (64, 2, 0.0, 0.95)
    cfg = _cfg_from_args(p.parse_args(["eval", "--tasks", "aime24"]))  # no preset: the old defaults
    assert (cfg.n_for("aime24"), cfg.temperature, cfg.max_tokens, cfg.preset) == (4, 0.6, 32768, None)
    with pytest.raises(SystemExit):
        p.parse_args(["eval", "--preset", "nope", "--tasks", "aime24"])


PUBLISHED = {  # label fragment -> (aime24, math_500, gpqa_diamond) as published
    "Qwen2.5-Math-1.5B base (open-r1 README)": ("3.33", "23.6", "25.75"),
    "DeepSeek-R1-Distill-Qwen-1.5B (open-r1 README)": ("30.0", "83.0", "32.83"),
    "DeepSeek-R1-Distill-Qwen-1.5B (R1 paper)": ("28.9", "83.9", "33.8"),
    "Bespoke-Stratos-17k, 1 epoch (open-r1 README)": ("6.67", "45.4", "28.79"),
    "OpenR1-Distill-7B (open-r1 README)": ("52.7", "89.0", "52.8"),
    "DeepSeek-R1-Distill-Qwen-7B (open-r1 README)": ("51.3", "93.5", "52.4"),
}


def test_compare_reference_rows_per_recipe(tmp_path):
    from distilled.eval.runner import compare

    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({
        "model": "student", "engine": "transformers", "prompt_version": "v",
        "settings": {"temperature": 0.6, "top_p": 0.95, "max_tokens": 8, "n": "auto", "preset": "open-r1"},
        "tasks": {"aime24": {"pass@1": 0.0, "pass@1_stderr": 0.0}, "math_500": {"pass@1": 25.0, "pass@1_stderr": 1.0},
                  "gpqa_diamond": {"pass@1": 12.5, "pass@1_stderr": 2.0}}}))
    text = compare([str(run)], reference=True)
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols == ["model", "aime24", "math_500", "gpqa_diamond"]
    for label, want in PUBLISHED.items():
        line = next((ln for ln in text.splitlines() if label in ln), None)
        assert line is not None, label
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert tuple(cells[1:]) == want, (label, cells)
        assert "(reported)" in cells[0]
    from distilled.eval.runner import _ref_cell

    refs = [[c.strip() for c in ln.strip("|").split("|")] for ln in text.splitlines() if "(reported)" in ln]
    for r in RECIPES:  # every recipe's published numbers are one reference row
        if r.expected:
            assert any(all(cells[cols.index(t)] == _ref_cell(v) for t, v in r.expected.items()) for cells in refs), r.name


# ------------------------------------------------------------- export: generation config, card

class ForceTokenAt:
    """Logits processor: at new-token index ``k`` only ``token`` may be sampled (a stand-in for a
    trained student that ends its answer there)."""

    def __init__(self, prompt_len: int, k: int, token: int):
        self.prompt_len, self.k, self.token = prompt_len, k, token

    def __call__(self, input_ids, scores):
        import torch

        if input_ids.shape[1] - self.prompt_len == self.k:
            forced = torch.full_like(scores, -float("inf"))
            forced[:, self.token] = 0.0
            return forced
        return scores


def check_export_generates_until_im_end(export: Path, prompt: str = "What is 2 + 3?") -> None:
    """Load the export with transformers; its generation config stops at <|im_end|> when the model
    produces it, while the Qwen2.5-Math base's config (EOS <|endoftext|> only) would run on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessorList

    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    gc = model.generation_config
    assert IM_END in gc.eos_token_id and gc.eos_token_id[0] == IM_END and gc.pad_token_id == EOT
    assert GenerationConfig.from_pretrained(export).eos_token_id == gc.eos_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt")
    n = ids.shape[1]
    procs = LogitsProcessorList([ForceTokenAt(n, 5, IM_END)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=True, logits_processor=procs,
                             attention_mask=torch.ones_like(ids))
        new = out[0, n:].tolist()
        assert new[-1] == IM_END and len(new) == 6  # stopped right at the produced <|im_end|>
        base_like = GenerationConfig(eos_token_id=EOT, pad_token_id=EOT, do_sample=True, max_new_tokens=40)
        procs2 = LogitsProcessorList([ForceTokenAt(n, 5, IM_END)])
        out2 = model.generate(ids, generation_config=base_like, logits_processor=procs2,
                              attention_mask=torch.ones_like(ids))
    new2 = out2[0, n:].tolist()
    assert new2[5] == IM_END and len(new2) > 6  # without <|im_end|> as EOS it runs past the answer


def _fake_eval_run(d: Path) -> Path:
    """A results.json as `distill eval` writes it (the slow test makes a real one)."""
    d.mkdir()
    (d / "results.json").write_text(json.dumps({
        "model": "tiny", "engine": "transformers", "prompt_version": "v1",
        "settings": {"temperature": 0.6, "top_p": 0.95, "max_tokens": 8, "n": "auto", "preset": "open-r1"},
        "tasks": {"aime24": {"pass@1": 1.5625, "pass@1_stderr": 1.5, "n": 64, "problems": 1},
                  "math_500": {"pass@1": 25.0, "pass@1_stderr": 12.5, "n": 4, "problems": 2}}}))
    return d


def test_model_card_names_base_recipe_data_settings_and_results(tmp_path):
    from distilled.train.convert import hf_config_from_mf_yaml
    from distilled.train.model_card import generation_config, model_card

    rec = recipes.get("openr1-distill-7b")
    hf_cfg = hf_config_from_mf_yaml(REPO / rec.config)
    gen = generation_config(hf_cfg, None, {"eos_token_id": EOT, "bos_token_id": EOT, "top_k": 20})
    assert gen["eos_token_id"] == [IM_END, EOT] and "top_k" not in gen  # the base's EOS kept after <|im_end|>
    card = model_card(hf_cfg, gen, REPO / rec.config, eval_run=_fake_eval_run(tmp_path / "eval"))
    assert card.startswith("---\n") and f"base_model: {rec.student}" in card
    for needle in (rec.name, rec.source, "Mixture-of-Thoughts", "| learning rate | 4e-05 |",
                   "| min learning rate | 4e-06 |", "| grad clip (max norm) | 0.2 |", "| global batch (rows) | 128 |",
                   "| epochs | 5 |", "CosineWithWarmUpLR", "| RoPE theta | 300000 |",
                   "| aime24 | 1.6 ± 1.5 | 64 | 1 | 52.7 |", "| math_500 | 25.0 ± 12.5 | 4 | 2 | 89 |",
                   "preset open-r1", "distill eval --preset open-r1", "[151645, 151643]"):
        assert needle in card, needle
    plain = model_card(hf_cfg, gen, None)
    assert "unknown base model" in plain and "Not recorded" in plain and "Not evaluated" in plain


def test_mf_to_hf_writes_generation_config_and_card_and_stops_at_im_end(tmp_path, qwen_tokenizer_dir):
    from distilled.cli import main
    from distilled.train.convert import convert_hf_to_mf
    from distilled.train.tiny_model import TinyQwen2Shape, make_tiny_qwen2

    rec = recipes.get("openr1-distill-7b")
    hf = make_tiny_qwen2(tmp_path / "student", TinyQwen2Shape(rope_theta=300000.0), tokenizer_dir=qwen_tokenizer_dir)
    mf = convert_hf_to_mf(hf, tmp_path / "mf")
    out = tmp_path / "export"
    assert main(["convert", "mf-to-hf", str(mf), str(out), "--config", str(REPO / rec.twin), "--tokenizer",
                 str(qwen_tokenizer_dir), "--eval-run", str(_fake_eval_run(tmp_path / "eval"))]) == 0
    gc = json.loads((out / "generation_config.json").read_text())
    assert gc["eos_token_id"][0] == IM_END and EOT in gc["eos_token_id"]
    assert (gc["temperature"], gc["top_p"], gc["do_sample"]) == (0.6, 0.95, True)
    card = (out / "README.md").read_text()
    assert "Tiny CPU twin of recipe `openr1-distill-7b`" in card and "| aime24 | 1.6 ± 1.5 |" in card
    assert "base_model:" not in card  # a random tiny student is not the recipe's base
    check_export_generates_until_im_end(out)


# ------------------------------------------------------------------------------ README, docs

def test_readme_recipe_table_is_the_registry():
    from distilled.plots import md_table

    readme = (REPO / "README.md").read_text()
    assert md_table(recipes.TABLE_HEADERS, recipes.table_rows()) in readme
    for r in RECIPES:
        assert r.config in readme


def test_docs_recipes_names_every_recipe_and_its_commands():
    doc = (REPO / "docs" / "recipes.md").read_text()
    for r in RECIPES:
        assert f"`{r.name}`" in doc and r.config in doc and r.twin in doc
        for cmd in recipes.commands(r).values():
            assert cmd in doc, (r.name, cmd[:80])


def test_recipe_cli_and_wall_time_model():
    from distilled.cli import main

    assert main(["recipe", "list"]) == 0
    assert main(["recipe", "show", "openr1-distill-7b", "--tokens", "1e9"]) == 0
    assert main(["recipe", "show", "nope"]) == 2
    raw = _raw(recipes.get("mindspore-docs-7b").config)
    # docs/scaling.md's anchor: 45.4 GFLOP/token at s_ctx 2500 for the 7B
    assert abs(recipes.flops_per_token(raw, 2500) / 1e9 - 45.4) < 0.3
    # 224 M tokens (3 epochs of 74.6 M) at 40% MFU on 8 x 910B: ~2.8 h in docs/scaling.md
    assert abs(recipes.estimate_hours(raw, 74.6e6, 0.4) - 2.8) < 0.1


# ------------------------------------------------------------------- slow: end to end on twins

def _bench_dir(tmp_path: Path) -> Path:
    """A few offline problems in the files `distill eval --data-dir` reads."""
    d = tmp_path / "bench"
    d.mkdir()
    _jsonl(d / "aime24.jsonl", [{"problem": "Find 12 + 30.", "answer": "42"}])
    _jsonl(d / "math500.jsonl", [{"problem": "What is 2 + 3?", "answer": "5"},
                                 {"problem": "What is 7 - 4?", "answer": "3"}])
    _jsonl(d / "gpqa_diamond.jsonl", [{"Question": "Which is a noble gas?", "Correct Answer": "Neon",
                                       "Incorrect Answer 1": "Sodium", "Incorrect Answer 2": "Iron",
                                       "Incorrect Answer 3": "Carbon"}])
    return d


def _run_twin(rec, data: Path, student: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [PY, str(REPO / "run_mindformer.py"), "--config", str(REPO / rec.twin), "--run_mode", "finetune",
           "--train_dataset_dir", str(data), "--output_dir", str(out), "--load_checkpoint", str(student)]
    env = dict(os.environ, GLOG_v="3")
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


# mindspore-docs-7b's twin is configs/finetune_qwen2_5_tiny_cpu.yaml, the demo's YAML: tests/test_demo.py
# runs it end to end (data -> run_mindformer.py -> convert -> eval) and tests/test_finetune_cpu.py
# trains, resumes and exports it with 2 msrun workers, so it is not run a third time here.
E2E_RECIPES = [r for r in RECIPES if r.name != "mindspore-docs-7b"]


@pytest.mark.slow
@pytest.mark.parametrize("rec", E2E_RECIPES, ids=lambda r: r.name)
def test_recipe_end_to_end_on_its_cpu_twin(rec, tmp_path, qwen_tokenizer_dir):
    """data -> finetune (run_mindformer.py, graph mode, the twin YAML) -> convert -> eval (open-r1
    preset on a few offline problems) -> model card with the results, generating until <|im_end|>."""
    import datasets

    from distilled.cli import main
    from distilled.train.convert import load_safetensors_np
    from distilled.train.mindformers_run import read_loss
    from distilled.train.tiny_model import TinyQwen2Shape, make_tiny_qwen2

    twin = _raw(rec.twin)
    tm = twin["model"]["model_config"]
    seq = int(tm["seq_length"])
    # 1. data: the recipe's own preprocessing command on rows shaped like its data set
    # 4 packed rows of 512 each = 2 optimizer steps of global batch 2 (measured): the fewest that
    # still show accumulation (steps = rows / global batch) and a falling loss; a step costs ~5 s
    # here (151,936-row vocabulary), so more rows only make CI slower
    n = {"openr1-distill-7b": 4, "magpie-lora-3b": 20, "openr1-stratos-1.5b": 16}[rec.name]
    rep = _preprocess(rec, _jsonl(tmp_path / "rows.jsonl", ROWS[rec.name](n, seed=3)), tmp_path / "packed",
                      qwen_tokenizer_dir, seq)
    rows = len(datasets.load_from_disk(str(tmp_path / "packed")))
    gb = global_batch(dict(twin, parallel_config=dict(twin["parallel_config"], data_parallel=1)))
    assert rep["rows_kept"] == n and rows >= 2 * gb
    # 2. finetune: the twin through run_mindformer.py, one process, graph mode
    shape = TinyQwen2Shape(tie_word_embeddings=bool(tm["tie_word_embeddings"]), rope_theta=float(tm["theta"]))
    student = make_tiny_qwen2(tmp_path / "student", shape, tokenizer_dir=qwen_tokenizer_dir)
    out = tmp_path / "run"
    r = _run_twin(rec, tmp_path / "packed", student, out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = read_loss(out / "loss.jsonl")
    assert [x["step"] for x in losses] == list(range(1, rows // gb + 1))  # accumulation: rows / global batch
    assert all(np.isfinite(x["loss"]) for x in losses) and losses[-1]["loss"] < losses[0]["loss"]
    (ckpt,) = sorted((out / "checkpoint" / "rank_0").glob("*.safetensors"))[-1:]
    trained = load_safetensors_np(ckpt)
    assert ("lm_head.weight" in trained) == (not tm["tie_word_embeddings"])
    # 3. convert (merge-lora for the LoRA recipe), 4. eval with the open-r1 preset, 5. card + results
    verb = "merge-lora" if rec.lora else "mf-to-hf"
    export = tmp_path / "export"
    assert main(["convert", verb, str(ckpt), str(export), "--config", str(REPO / rec.twin), "--tokenizer",
                 str(qwen_tokenizer_dir)]) == 0
    ev = tmp_path / "eval"
    assert main(["eval", "--preset", "open-r1", "--tasks", "aime24,math_500,gpqa_diamond", "--engine",
                 "transformers", "--model", str(export), "--data-dir", str(_bench_dir(tmp_path)), "--limit", "1",
                 "--max-tokens", "8", "--output", str(ev), "--verify-workers", "1", "--batch-size", "16"]) in (0, 1)
    res = json.loads((ev / "results.json").read_text())
    assert res["settings"]["preset"] == "open-r1" and res["settings"]["temperature"] == 0.6
    assert {t: m["n_requested"] for t, m in res["tasks"].items()} == {"aime24": 64, "math_500": 4, "gpqa_diamond": 8}
    final = tmp_path / "final"
    assert main(["convert", verb, str(ckpt), str(final), "--config", str(REPO / rec.twin), "--tokenizer",
                 str(qwen_tokenizer_dir), "--eval-run", str(ev)]) == 0
    card = (final / "README.md").read_text()
    assert "| aime24 |" in card and "| math_500 |" in card and "preset open-r1" in card
    assert f"| tied embeddings | {tm['tie_word_embeddings']} |" in card
    check_export_generates_until_im_end(final)
