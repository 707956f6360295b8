"""Logits-distillation benchmark: storage, preprocessing overhead and step-time overhead, side by side.

    python bench/kd.py                 # all sections, default sizes (~3 min on 2 CPU cores)
    python bench/kd.py --only storage  # one section: storage | preprocess | step_torch | step_ms
    python bench/kd.py --json out.json

Sections (same data for both sides of every comparison, in one run):

* **storage**: stored bytes per generated token of the top-K sidecar for K = 5, 8, 20 and each
  codec (raw arrays, deflate, byte planes + deflate), on real Qwen2.5 tokens of stand-in R1-style
  answers with stand-in top-K (distilled.kd.standin), and the OpenAI chat-logprobs JSON for the
  same tokens. Reference: DistillKit stores a compressed top-128 at about 300 bytes/token.
  (Stand-in logprobs are smoother than a real teacher's; ids of real alternatives cluster more,
  so real deflate ratios may differ: not verified on a real teacher here.)
* **preprocess**: ``pack_table`` (plain SFT) vs ``pack_table_with_sidecars`` (KD: index the
  sidecar, align every sample, pack the position map, gather) on the same synthetic OpenR1-like
  samples; and the packed dataset's size on disk.
* **step_torch**: one optimizer step (forward, loss, backward, AdamW) of the tiny Qwen2 student
  (hidden 64, 2 layers, full 151,936-token vocabulary) on one packed row, CE vs KD loss.
* **step_ms**: the same with MindFormers' legacy LlamaForCausalLM vs KDLlamaForCausalLM, compiled
  in GRAPH_MODE (value_and_grad + AdamW under ms.jit). Target for both: KD step <= 1.3x SFT.
* **toy** (``--toy KD_DIR SFT_DIR``): two finished ``distill demo`` runs of equal sizes, one with
  ``--kd``: held-out accuracy before/after, held-out CE of both final students on the stand-in
  teacher's answers to the held-out problems, and the number of training steps.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DISTILLKIT_BYTES_PER_TOKEN = 300  # DistillKit's compressed top-128 (its README figure, issue 16)


def _tokenizer():
    from distilled.data.tokenizer import cached_qwen2_5_tokenizer_dir, load_tokenizer

    return load_tokenizer(cached_qwen2_5_tokenizer_dir())


def standin_answers(n: int, seed: int = 0) -> list[str]:
    """R1-style answers of the stand-in teacher to synthetic problems (real text, real tokens)."""
    from distilled.generate.problems import synth
    from distilled.generate.teacher_server import compose_answer, r1_text

    rng = random.Random(seed)
    out = []
    for row in synth(n, seed=seed):
        reasoning, final, _ = compose_answer(row["problem"], rng, 0.1)
        out.append(r1_text(reasoning, final))
    return out


def bench_storage(n_answers: int = 200) -> dict:
    from distilled.kd.logprobs import StudentVocab
    from distilled.kd.sidecar import CODEC_PLANES, CODEC_RAW, CODEC_ZLIB, HEADER_SIZE, encode_record
    from distilled.kd.standin import chat_logprobs_json, synth_top_logprobs

    tok = _tokenizer()
    vocab = StudentVocab(tok)
    texts = standin_answers(n_answers)
    ids = [tok.encode(t, add_special_tokens=False) + [151645] for t in texts]
    tokens = sum(len(x) for x in ids)
    rows = []
    for k in (5, 8, 20):
        recs = [synth_top_logprobs(x, k, i, vocab) for i, x in enumerate(ids)]
        row = {"k": k, "tokens": tokens, "raw_bytes_per_token_formula": 6 * (k + 1)}
        for name, codec in (("raw", CODEC_RAW), ("zlib", CODEC_ZLIB), ("planes", CODEC_PLANES)):
            t0 = time.perf_counter()
            size = sum(len(encode_record(f"u{i}", 0, r, codec)) for i, r in enumerate(recs))
            row[f"{name}_bytes_per_token"] = round(size / tokens, 2)
            row[f"{name}_encode_s"] = round(time.perf_counter() - t0, 3)
        row["header_bytes_per_record"] = HEADER_SIZE
        js = sum(len(json.dumps(chat_logprobs_json(r, vocab)).encode()) for r in recs[:50])
        row["openai_json_bytes_per_token"] = round(js / sum(len(x) for x in ids[:50]), 1)
        row["vs_distillkit_top128"] = round(row["planes_bytes_per_token"] / DISTILLKIT_BYTES_PER_TOKEN, 3)
        row["gb_per_billion_tokens"] = round(row["planes_bytes_per_token"], 2)  # bytes/token x 1e9 / 1e9
        rows.append(row)
    return {"answers": n_answers, "rows": rows}


def bench_preprocess(samples: int = 400, k: int = 20, seq_length: int = 16384, seed: int = 0) -> dict:
    import datasets
    from datasets.fingerprint import generate_random_fingerprint

    from bench.packing import synthetic_lengths, synthetic_table
    from distilled.kd.align import trained_span
    from distilled.kd.dataset import pack_table_with_sidecars
    from distilled.kd.sidecar import SidecarWriter, TokenTopK
    from distilled.data.packing import pack_table

    lengths = synthetic_lengths(samples, seed=seed)
    table = synthetic_table(lengths, seed=seed)
    rng = np.random.default_rng(seed)
    tmp = Path(tempfile.mkdtemp(prefix="bench-kd-"))
    side = tmp / "gens.topk.bin"
    ids_all = table.column("input_ids").to_pylist()
    labs_all = table.column("labels").to_pylist()
    t0 = time.perf_counter()
    with SidecarWriter(side) as w:
        for i, (x, y) in enumerate(zip(ids_all, labs_all)):
            s, e = trained_span(np.asarray(y))
            n = e - s
            tid = rng.integers(0, 151643, size=(n, k), dtype=np.int32)
            tid[:, 0] = x[s:e]
            lp = np.sort(np.log(rng.dirichlet(np.ones(k + 1), size=n)[:, :k]), axis=1)[:, ::-1]
            w.write(f"s{i}", 0, TokenTopK(np.asarray(x[s:e]), lp[:, 0], tid, lp))
    write_s = time.perf_counter() - t0
    del ids_all, labs_all
    t0 = time.perf_counter()
    packed, stats = pack_table(table, seq_length, 151643)
    sft_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed_kd, stats_kd, rep = pack_table_with_sidecars(table, [side], k, seq_length, 151643, set(range(151643, 151665)))
    kd_s = time.perf_counter() - t0
    sizes = {}
    for name, t in (("sft", packed), ("kd", packed_kd)):
        d = tmp / name
        datasets.Dataset(t, fingerprint=generate_random_fingerprint()).save_to_disk(str(d))
        sizes[name] = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    out = {"samples": samples, "tokens": int(lengths.sum()), "k": k, "seq_length": seq_length,
           "rows": stats.rows, "sidecar_bytes": side.stat().st_size,
           "sidecar_bytes_per_token": round(side.stat().st_size / rep["trained_positions"], 2),
           "sidecar_write_s": round(write_s, 3), "sft_pack_s": round(sft_s, 3), "kd_pack_s": round(kd_s, 3),
           "kd_over_sft": round(kd_s / sft_s, 2) if sft_s else None, "kd_index_s": rep["index_s"],
           "kd_align_s": rep["align_s"], "kd_position_share": rep["kd_position_share"],
           "sft_disk_bytes": sizes["sft"], "kd_disk_bytes": sizes["kd"],
           "kd_disk_bytes_per_token": round(sizes["kd"] / int(lengths.sum()), 1)}
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _row(seq: int, k: int, seed: int = 0):
    """One packed-like row: 3 documents, prompts untrained, top-K on trained labels."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 151643, size=seq).astype(np.int64)
    labels = np.concatenate([ids[1:], [-100]]).copy()
    for a in (0, seq // 3, 2 * seq // 3):
        labels[a:a + 40] = -100
    tid = rng.integers(0, 151643, size=(seq, k)).astype(np.int32)
    tid[:, 0] = np.maximum(labels, 0)
    tid[labels == -100] = -1
    lp = np.sort(np.log(rng.dirichlet(np.ones(k + 1), size=seq)[:, :k]), axis=1)[:, ::-1].astype(np.float16)
    lp[labels == -100] = 0
    return ids, labels, tid, lp


def bench_step_torch(seq: int = 1024, k: int = 20, steps: int = 8) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distilled.kd.loss_torch import kd_loss

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    ids, labels, tid, lp = _row(seq, k)
    x = torch.tensor(ids)[None]
    y = torch.tensor(labels)[None]
    ti = torch.tensor(tid)[None]
    tl = torch.tensor(lp)[None]
    out = {"seq": seq, "k": k, "steps": steps, "threads": torch.get_num_threads()}
    for mode in ("sft", "kd", "sft", "kd"):  # interleaved twice: the second pass is reported
        model = Qwen2ForCausalLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = model(input_ids=x).logits
            if mode == "sft":
                loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1),
                                                         ignore_index=-100)
            else:
                loss = kd_loss(logits, y, ti, tl, 0.5, 1.0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        out[f"{mode}_step_s"] = round(statistics.median(times[1:]), 4)
    out["kd_over_sft"] = round(out["kd_step_s"] / out["sft_step_s"], 3)
    return out


def bench_step_ms(seq: int = 1024, k: int = 20, steps: int = 6) -> dict:
    import mindspore as ms
    from mindspore import nn

    from distilled.train import mindformers_compat

    mindformers_compat.apply_cpu_shims()
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from mindformers import LlamaConfig, LlamaForCausalLM

    from distilled.kd.mindformers_kd import KDLlamaForCausalLM

    ids, labels, tid, lp = _row(seq, k)
    mask = (labels != -100).astype(np.int32)
    t = dict(ids=ms.Tensor(ids[None].astype(np.int32)), labels=ms.Tensor(labels[None].astype(np.int32)),
             mask=ms.Tensor(mask[None]), tid=ms.Tensor(tid.reshape(1, -1)), tlp=ms.Tensor(lp.reshape(1, -1)))
    out = {"seq": seq, "k": k, "steps": steps}
    for mode in ("sft", "kd"):
        cfg = LlamaConfig(batch_size=1, seq_length=seq, hidden_size=64, num_layers=2, num_heads=4, n_kv_heads=2,
                          vocab_size=151936, intermediate_size=256, qkv_has_bias=True, use_flash_attention=False,
                          compute_dtype="float32", layernorm_compute_type="float32",
                          softmax_compute_type="float32", rotary_dtype="float32", param_init_type="float32",
                          use_past=False, pad_token_id=151643, use_rope_slice=True, input_sliced_sig=True,
                          theta=1000000.0, kd_top_k=k, kd_alpha=0.5)
        ms.set_seed(0)
        model = (KDLlamaForCausalLM if mode == "kd" else LlamaForCausalLM)(cfg)
        model.set_train(True)
        params = model.trainable_params()
        opt = nn.AdamWeightDecay(params, learning_rate=1e-4)

        if mode == "kd":
            def f(a, b, c, d, e):
                return model(a, labels=b, loss_mask=c, topk_ids=d, topk_logprobs=e)
            args = (t["ids"], t["labels"], t["mask"], t["tid"], t["tlp"])
        else:
            def f(a, b, c):
                return model(a, labels=b, loss_mask=c)
            args = (t["ids"], t["labels"], t["mask"])
        grad_fn = ms.value_and_grad(f, None, params)

        @ms.jit
        def step(*a):
            loss, grads = grad_fn(*a)
            opt(grads)
            return loss

        times = []
        for _ in range(steps + 1):
            t0 = time.perf_counter()
            float(step(*args).asnumpy())
            times.append(time.perf_counter() - t0)
        out[f"{mode}_compile_s"] = round(times[0], 2)
        out[f"{mode}_step_s"] = round(statistics.median(times[1:]), 4)
    out["kd_over_sft"] = round(out["kd_step_s"] / out["sft_step_s"], 3)
    return out


def heldout_ce(model_dirs: dict[str, Path], tokenizer_dir: Path, test_jsonl: Path, seq_length: int = 1024,
               seed: int = 0) -> dict:
    """Token-mean CE of each model on the stand-in teacher's answers to the *held-out* test problems
    (same prompt format as the demo's training rows), torch backend, no update."""
    import asyncio

    from distilled import SYSTEM_PROMPT
    from distilled.train.backends.base import packed_batch
    from distilled.train.backends.torch_backend import TorchBackend
    from distilled.data.chat import ChatEncoder
    from distilled.generate.runner import GenerateConfig, run_generate
    from distilled.data.packing import pack_table
    from distilled.generate.teacher_server import TeacherConfig, start_in_thread
    from distilled.data.tokenizer import load_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench-kd-heldout-"))
    srv = start_in_thread(TeacherConfig(wrong_rate=0.0, seed=seed))
    try:
        cfg = GenerateConfig(dataset_name=str(test_jsonl), output_file=str(tmp / "gens.jsonl"), endpoints=[srv.addr],
                             model="stand-in-teacher", uuid_column="id", num_generations=1, max_tokens=2048,
                             max_concurrent=16, seed=seed, prompt_template="{prompt}", progress=False)
        asyncio.run(run_generate(cfg))
    finally:
        srv.stop()
    rows = [json.loads(x) for x in (tmp / "gens.jsonl").read_text().splitlines()]
    tok = load_tokenizer(tokenizer_dir)
    convs = [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": r["problem"]},
              {"role": "assistant", "content": r["generations"][0]}] for r in rows]
    packed, _ = pack_table(ChatEncoder(tok).encode(convs).to_arrow(), seq_length, tok.pad_token_id)
    batches = [packed_batch([r]) for r in packed.to_pylist()]
    out = {"heldout_answers": len(rows), "heldout_rows": len(batches)}
    for name, d in model_dirs.items():
        be = TorchBackend()
        be.load_hf(d, seq_length=seq_length)
        tot = cnt = 0.0
        for b in batches:
            r = be.forward(b)
            tot += r.loss_sum
            cnt += r.num_tokens
        out[f"{name}_heldout_ce"] = round(tot / cnt, 4)
    return out


def bench_toy(kd_dir: Path, sft_dir: Path) -> dict:
    """KD vs SFT on the demo's toy task from two `distill demo` runs of equal sizes (same problems,
    teacher seed, student, steps): held-out accuracy (`distill eval`), held-out CE, training steps."""
    from distilled.demo.report import eval_summary
    from distilled.train.mindformers_run import read_loss

    out: dict = {}
    for name, d in (("kd", kd_dir), ("sft", sft_dir)):
        before = eval_summary(d / "eval-before", d / "data" / "test.jsonl")
        after = eval_summary(d / "eval-after", d / "data" / "test.jsonl")
        losses = read_loss(d / "finetune" / "loss.jsonl")
        out[name] = {"steps": len(losses), "train_loss_first": losses[0]["loss"] if losses else None,
                     "train_loss_last": losses[-1]["loss"] if losses else None,
                     "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
                     "answered_after": after["answered"]}
    out.update(heldout_ce({"kd": kd_dir / "student-final", "sft": sft_dir / "student-final"}, kd_dir / "tokenizer",
                          kd_dir / "data" / "test.jsonl"))
    out["note"] = ("training losses are not comparable (KD's is alpha*CE + (1-alpha)*KL); held-out CE is the "
                   "same measure for both")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("storage", "preprocess", "step_torch", "step_ms"), action="append")
    p.add_argument("--samples", type=int, default=400, help="preprocess: synthetic samples")
    p.add_argument("--seq", type=int, default=1024, help="step benches: tokens per row")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--toy", nargs=2, metavar=("KD_DEMO_DIR", "SFT_DEMO_DIR"), default=None,
                   help="compare two finished `distill demo` runs of equal sizes, with --kd and without")
    a = p.parse_args(argv)
    os.environ.setdefault("GLOG_v", "3")
    todo = a.only or ([] if a.toy else ["storage", "preprocess", "step_torch", "step_ms"])
    res = {}
    if a.toy:
        res["toy"] = bench_toy(Path(a.toy[0]), Path(a.toy[1]))
        print(json.dumps({"toy": res["toy"]}, indent=1), flush=True)
    for name in todo:
        t0 = time.perf_counter()
        if name == "storage":
            res[name] = bench_storage()
        elif name == "preprocess":
            res[name] = bench_preprocess(a.samples)
        elif name == "step_torch":
            res[name] = bench_step_torch(a.seq)
        else:
            res[name] = bench_step_ms(a.seq)
        res[name]["bench_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({name: res[name]}, indent=1), flush=True)
    if a.json:
        from distilled.io_utils import write_json

        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
