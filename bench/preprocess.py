"""Preprocessing benchmark: `distill preprocess` end to end vs a docs-style per-example handler in
``datasets.map`` and vs bare ``tokenizers`` ``encode_batch``, side by side in one run, plus packing
(BFD vs MindFormers' PackingHandler, reusing bench/packing.py) and peak memory.

Data: synthetic OpenR1-like rows (``problem`` + ``messages`` [user, assistant <think>...]) whose
token lengths are log-normal (median ~3k, clipped to 16k, bench/packing.py's distribution), written
once as JSONL. Tokenizer: the real Qwen2.5 tokenizer (built offline). Every method runs in a fresh
spawned process, so its peak RSS is its own.

    python bench/preprocess.py                       # 10k samples, seq 16384
    python bench/preprocess.py --samples 1000        # quick
    python bench/preprocess.py --json runs/bench_preprocess.json

Methods:
* ``bare``: ``tokenizers.Tokenizer.encode_batch`` on the already rendered chat texts (in memory;
  no JSON reading, no masks, no packing, no writing): the ceiling.
* ``docs-style``: the MindSpore docs' OpenR1 handler ported to MF 1.9's dataset API, i.e.
  ``datasets.load_dataset('json')`` + ``Dataset.map`` per example, ``apply_chat_template`` twice per
  row (prompt, full) -- handling only, packing not included.
* ``ours``: ``distill preprocess`` (read JSONL, validate, render, tokenize, mask, write Arrow, BFD
  pack, save_to_disk, report) -- everything included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.packing import measure, run_bfd, run_mindformers, synthetic_lengths  # noqa: E402

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
_CANDIDATES = (" the we so let then thus since because number value sum product equation solve find compute "
               "check wait hmm right left side both terms factor root square cube prime divisor multiple "
               "integer real positive negative zero one two three four five six seven eight nine ten "
               "triangle circle angle area length point line plane vector matrix function derivative "
               "integral limit sequence series probability expected case first second next last total "
               "answer result step approach method consider assume suppose note recall given gives "
               "equals means implies therefore hence also but and or if not is are was be this that").split()
_MATH = [" $x", "^2", " +", " 3", " =", " 7", "$,", " \\frac{1}{2}", " \\sqrt{5}", " (", ")", " 12", " 45",
         " \\cdot", " y", " -", " 0", " \\le", " n", " 2024", "."]


def _pool(tok) -> list[str]:
    """Space-prefixed words that are exactly one Qwen2.5 token each (so k words ~ k tokens)."""
    words = [" " + w for w in _CANDIDATES]
    return [w for w in words if len(tok.encode(w, add_special_tokens=False)) == 1]


def make_data(path: Path, n: int, seed: int, tok) -> dict:
    """Write ``n`` OpenR1-like rows to ``path`` (JSONL); lengths from bench/packing.py's law."""
    rng = np.random.default_rng(seed)
    lengths = synthetic_lengths(n, seed)
    pool = np.array(_pool(tok) + _MATH, dtype=object)
    overhead = 60  # template + system + problem tokens, roughly
    with open(path, "w", encoding="utf-8") as f:
        for i, L in enumerate(lengths):
            k = max(8, int(L) - overhead)
            words = pool[rng.integers(0, len(pool), k)]
            paras = ["".join(words[j:j + 40]) for j in range(0, k, 40)]
            think = "\n\n".join(p.strip() for p in paras)
            problem = f"Problem {i}: find the value of x if x^2 + {i} = {i + 4}."
            answer = f"<think>\n{think}\n</think>\n\nSo the answer is $\\boxed{{{i % 97}}}$."
            f.write(json.dumps({"problem": problem, "answer": str(i % 97),
                                "messages": [{"role": "user", "content": problem},
                                             {"role": "assistant", "content": answer}]}, ensure_ascii=False) + "\n")
    return {"rows": n, "bytes": path.stat().st_size}


def _rss_mb() -> tuple[float, float]:
    cur = peak = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1]) / 1024
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) / 1024
    return cur, peak


def run_bare(path: str, tok_dir: str) -> dict:
    """Bare tokenizers encode_batch over the rendered texts (rendering not timed)."""
    from tokenizers import Tokenizer

    from distilled.data.tokenizer import load_tokenizer

    hf = load_tokenizer(tok_dir)
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            msgs = [{"role": "system", "content": SYSTEM}] + json.loads(line)["messages"]
            texts.append(hf.apply_chat_template(msgs, tokenize=False))
    tk = Tokenizer.from_file(str(Path(tok_dir) / "tokenizer.json"))
    t = time.perf_counter()
    tokens = 0
    for i in range(0, len(texts), 1000):
        for e in tk.encode_batch(texts[i:i + 1000], add_special_tokens=False):
            tokens += len(e.ids)
    el = time.perf_counter() - t
    return {"method": "bare tokenizers encode_batch", "rows": len(texts), "tokens": tokens, "elapsed_s": el,
            "tok_per_s": tokens / el, "peak_rss_mb": _rss_mb()[1]}


class _DocsStyleHandler:
    """The MindSpore docs' OpenR1 handler logic (r1.5 per-example), as a MF 1.9 dataset.map."""

    def __init__(self, tok, seq_length: int):
        self.tok, self.seq_length = tok, seq_length

    def process(self, example):
        msgs = [{"role": "system", "content": SYSTEM}] + list(example["messages"])
        prompt_ids = self.tok.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True)
        full_ids = self.tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=False)
        full_ids = full_ids[: self.seq_length]
        labels = ([-100] * len(prompt_ids) + full_ids[len(prompt_ids):])[: len(full_ids)]
        return {"input_ids": np.array(full_ids, np.int32), "labels": np.array(labels, np.int32)}


def run_docs(path: str, tok_dir: str, seq_length: int) -> dict:
    """load_dataset('json') + per-example map with apply_chat_template twice (handling only)."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets

    from distilled.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    cache = tempfile.mkdtemp(prefix="docs-style-")
    t = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache)
    h = _DocsStyleHandler(tok, seq_length)
    out = ds.map(h.process, remove_columns=ds.column_names, load_from_cache_file=False)
    el = time.perf_counter() - t
    tokens = int(sum(len(x) for x in out.data.column("input_ids").to_pylist()))
    return {"method": "docs-style handler (datasets.map, apply_chat_template x2)", "rows": len(out), "tokens": tokens,
            "elapsed_s": el, "tok_per_s": tokens / el, "peak_rss_mb": _rss_mb()[1]}


def run_ours(path: str, tok_dir: str, seq_length: int, out_dir: str, num_proc: int = 1, engine: str = "auto") -> dict:
    """`distill preprocess` end to end (read, validate, tokenize+mask, pack, save, report).

    Timed from the call, after the imports a CLI run pays once (transformers, datasets)."""
    from distilled.data.tokenizer import load_tokenizer

    load_tokenizer(tok_dir)  # import transformers & co. outside the timer, as the other methods do
    os.environ.setdefault("TQDM_DISABLE", "1")
    from distilled.data.formats import FormatConfig
    from distilled.data.preprocess import PreprocessConfig, preprocess

    t = time.perf_counter()
    rep = preprocess(PreprocessConfig(inputs=[path], tokenizer=tok_dir, seq_length=seq_length, output=out_dir,
                                      format=FormatConfig("openr1"), num_proc=num_proc, progress=False,
                                      engine=engine))
    el = time.perf_counter() - t
    return {"method": f"distill preprocess (end to end, engine={rep['engine']})", "rows": rep["samples"],
            "tokens": rep["tokens"], "elapsed_s": el, "tok_per_s": rep["tokens"] / el, "peak_rss_mb": _rss_mb()[1],
            "fill": rep["fill_ratio"], "packed_rows": rep["packed_rows"], "skips": rep["skips"]["by_reason"],
            "pack_elapsed_s": rep["pack_elapsed_s"],
            "output_mb": sum(f.stat().st_size for f in Path(out_dir).glob("*.arrow")) / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--seq-length", type=int, default=16384)
    p.add_argument("--mf-samples", type=int, default=None, help="samples for MindFormers' PackingHandler "
                   "(default --samples; ~0.4 GB RAM per 1k samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where to write the data and outputs (default: a temp dir)")
    p.add_argument("--skip-docs", action="store_true", help="skip the (slow) docs-style handler")
    p.add_argument("--skip-packing", action="store_true", help="skip the packing comparison")
    p.add_argument("--with-hf-engine", action="store_true",
                   help="also run distill preprocess with --engine hf (HF tokenizers BPE)")
    p.add_argument("--json", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)

    from distilled.data.tokenizer import cached_qwen2_5_tokenizer_dir, load_tokenizer

    tok_dir = str(cached_qwen2_5_tokenizer_dir())
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-preprocess-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tok_dir)
    data = work / f"openr1_synth_{args.samples}.jsonl"
    quarter = work / f"openr1_synth_{args.samples // 4}.jsonl"
    t = time.perf_counter()
    info = make_data(data, args.samples, args.seed, tok)
    make_data(quarter, args.samples // 4, args.seed, tok)
    print(f"data: {info['rows']} rows, {info['bytes'] / 2**20:.0f} MB JSONL ({time.perf_counter() - t:.0f}s)", flush=True)

    res: dict = {"samples": args.samples, "seq_length": args.seq_length, "cpus": os.cpu_count(),
                 "loadavg": os.getloadavg()}
    res["bare"] = measure(run_bare, str(data), tok_dir)
    print(f"bare: {res['bare']['tok_per_s'] / 1e6:.2f}M tok/s", flush=True)
    res["ours"] = measure(run_ours, str(data), tok_dir, args.seq_length, str(work / "out_full"))
    print(f"ours: {res['ours']['tok_per_s'] / 1e6:.2f}M tok/s, fill {res['ours']['fill']:.2%}", flush=True)
    res["ours_quarter"] = measure(run_ours, str(quarter), tok_dir, args.seq_length, str(work / "out_quarter"))
    if args.with_hf_engine:
        res["ours_hf"] = measure(run_ours, str(data), tok_dir, args.seq_length, str(work / "out_hf"), 1, "hf")
        print(f"ours (hf engine): {res['ours_hf']['tok_per_s'] / 1e6:.2f}M tok/s", flush=True)
    if not args.skip_docs:
        res["docs"] = measure(run_docs, str(data), tok_dir, args.seq_length)
        print(f"docs-style: {res['docs']['tok_per_s'] / 1e6:.2f}M tok/s", flush=True)
    if not args.skip_packing:
        mf_n = args.mf_samples or args.samples
        res["pack_mf"] = measure(run_mindformers, mf_n, args.seq_length, args.seed)
        res["pack_bfd"] = measure(run_bfd, mf_n, args.seq_length, args.seed)

    print()
    print("| method | samples | tokens | seconds | M tok/s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for k in ("bare", "docs", "ours_hf", "ours", "ours_quarter"):
        if k in res:
            m = res[k]
            print(f"| {m['method']}{' (1/4 data)' if k == 'ours_quarter' else ''} | {m['rows']:,} | {m['tokens']:,} | "
                  f"{m['elapsed_s']:.1f} | {m['tok_per_s'] / 1e6:.3f} | {m['peak_rss_mb']:.0f} |")
    print()
    o = res["ours"]
    res["ratios"] = {"ours_vs_bare": o["tok_per_s"] / res["bare"]["tok_per_s"]}
    print(f"end to end vs bare encode_batch: {res['ratios']['ours_vs_bare']:.2f} (target >= 0.80)")
    if "ours_hf" in res:
        res["ratios"]["ours_hf_vs_bare"] = res["ours_hf"]["tok_per_s"] / res["bare"]["tok_per_s"]
        print(f"end to end with the HF engine vs bare encode_batch: {res['ratios']['ours_hf_vs_bare']:.2f}")
    if "docs" in res:
        res["ratios"]["ours_vs_docs"] = o["tok_per_s"] / res["docs"]["tok_per_s"]
        print(f"end to end vs docs-style handler: x{res['ratios']['ours_vs_docs']:.1f} (target >= 3)")
    print(f"fill at {args.seq_length} on real tokenized data: {o['fill']:.2%} (target >= 99.5%)")
    q = res["ours_quarter"]
    print(f"peak RSS: {o['peak_rss_mb']:.0f} MB for {o['rows']:,} samples (output {o['output_mb']:.0f} MB) vs "
          f"{q['peak_rss_mb']:.0f} MB for {q['rows']:,} (output {q['output_mb']:.0f} MB)")
    if "pack_mf" in res:
        mf, bfd = res["pack_mf"], res["pack_bfd"]
        res["ratios"]["pack_speed"] = bfd["tok_per_s"] / mf["tok_per_s"]
        print(f"packing @{args.seq_length}, {mf['samples']:,} samples: BFD fill {bfd['fill']:.2%} vs MindFormers "
              f"PackingHandler {mf['fill']:.2%}; speed {bfd['tok_per_s'] / 1e6:.1f} vs {mf['tok_per_s'] / 1e6:.2f}M tok/s "
              f"= x{res['ratios']['pack_speed']:.0f} (target >= 20); peak extra MB {bfd['peak_extra_mb']:.0f} vs "
              f"{mf['peak_extra_mb']:.0f}")
    if args.json:
        from distilled.io_utils import write_json

        write_json(args.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
