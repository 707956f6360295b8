"""Training throughput (tokens/s) of the backends on the same tiny CPU run, side by side.

Same weights (the tiny Qwen2.5-shaped student of configs/finetune_qwen2_5_tiny_cpu.yaml, real
151,936-row vocabulary), same packed rows, same YAML settings. Rows:

- torch backend (``distill train --backend torch``, in process)
- MindSpore backend (the parity backend: MindFormers' legacy Llama + AdamW in PyNative, in process)
- MindFormers' Trainer through ``run_mindformer.py`` with 1 worker, and with 2 workers under msrun
  (the anchor: what a MindFormers user runs)

tokens/s counts every token of the packed rows (seq_length x batch x workers), the first
``--warmup`` steps are left out (graph building, allocator warm-up). Prints a table and ratios.

    .venv/bin/python bench/train.py [--steps 12] [--seq 512] [--skip-trainer]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = REPO / "configs" / "finetune_qwen2_5_tiny_cpu.yaml"


def make_rows(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """Full packed rows of 2-5 documents: prompt untrained, response trained, labels shifted."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        k = int(rng.integers(2, 6))
        cuts = sorted(int(c) for c in rng.choice(np.arange(16, seq - 16), size=k - 1, replace=False))
        bounds = [0, *cuts, seq]
        ids = rng.integers(10, vocab, seq)
        labels = np.full(seq, -100)
        pos = np.zeros(seq, dtype=np.int64)
        for s, e in zip(bounds[:-1], bounds[1:]):
            p = s + (e - s) // 3
            labels[p:e - 1] = ids[p + 1:e]
            pos[s:e] = np.arange(e - s)
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "actual_seq_len": bounds[1:],
                     "position_ids": pos.tolist()})
    return rows


def in_process(backend: str, weights: Path, data: Path, steps: int, warmup: int) -> dict:
    from distilled.backends import get_backend
    from distilled.backends.base import iter_batches
    from distilled.train import load_packed, load_yaml, settings_from_yaml

    plan = settings_from_yaml(load_yaml(CONFIG), steps=steps)
    ds = load_packed(data)
    batches = list(iter_batches(ds, plan.batch_size, steps))
    kw = {"device": "cpu"} if backend == "torch" else {}
    be = get_backend(backend, **kw)
    be.load_hf(weights, model_config=plan.model_config, seq_length=batches[0].seq_length, batch_size=plan.batch_size)
    be.setup_training(plan.settings)
    times, losses = [], []
    for b in batches:
        t = time.perf_counter()
        r = be.train_step(b)
        times.append(time.perf_counter() - t)
        losses.append(r.loss)
    tok = batches[0].batch_size * batches[0].seq_length
    tps = [tok / t for t in times[warmup:]]
    return {"name": f"{backend} backend (in process)", "workers": 1, "steps": steps,
            "tokens_per_s": statistics.median(tps), "first_loss": losses[0], "last_loss": losses[-1]}


def trainer(workers: int, weights: Path, data: Path, out: Path, steps: int, warmup: int) -> dict:
    """MindFormers' Trainer via run_mindformer.py; ``steps`` rows per worker (epochs: 1)."""
    from distilled.mf_run import read_loss

    py = sys.executable
    args = ["run_mindformer.py", "--config", str(CONFIG), "--run_mode", "finetune",
            "--load_checkpoint", str(weights), "--train_dataset_dir", str(data), "--output_dir", str(out)]
    # msrun starts its workers as `python ...`: put this interpreter's bin first on PATH
    env = dict(os.environ, GLOG_v="3", PATH=str(Path(py).parent) + os.pathsep + os.environ.get("PATH", ""))
    if workers == 1:
        cmd = [py, *args]
    else:
        msrun = str(Path(py).parent / "msrun")
        cmd = [msrun, "--worker_num", str(workers), "--local_worker_num", str(workers), "--master_port", "8139",
               "--log_dir", str(out / "msrun_log"), "--join", "True", *args]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        tail = (p.stdout + p.stderr)[-2000:]
        logs = sorted((out / "msrun_log").glob("*.log")) if (out / "msrun_log").exists() else []
        for lf in logs[:2]:
            tail += f"\n--- {lf.name}\n" + lf.read_text()[-1500:]
        raise RuntimeError(f"MindFormers trainer ({workers} workers) failed:\n{tail}")
    per_rank = []
    for r in range(workers):
        recs = read_loss(out / f"loss_rank_{r}.jsonl")
        tps = [x["tokens_per_s"] for x in recs[warmup:] if x.get("tokens_per_s")]
        per_rank.append(statistics.median(tps))
    recs0 = read_loss(out / "loss_rank_0.jsonl")
    return {"name": f"MindFormers Trainer, {workers} worker{'s' if workers > 1 else ''}", "workers": workers,
            "steps": len(recs0), "tokens_per_s": sum(per_rank), "first_loss": recs0[0]["loss"],
            "last_loss": recs0[-1]["loss"], "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-trainer", action="store_true", help="only the two in-process backends")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("GLOG_v", "3")
    from distilled.tiny_model import TinyQwen2Shape, make_tiny_qwen2
    from distilled.train import load_yaml

    import datasets

    mc = load_yaml(CONFIG)["model"]["model_config"]
    if args.seq > int(mc["seq_length"]):
        raise SystemExit(f"--seq {args.seq} > model_config.seq_length {mc['seq_length']}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    weights = make_tiny_qwen2(tmp / "weights", TinyQwen2Shape())
    # 2 x steps rows: one worker reads `steps` rows... the 2-worker run reads 2 x steps (steps each)
    rows = make_rows(2 * args.steps, args.seq, 151643)
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    datasets.Dataset.from_dict(cols).save_to_disk(str(tmp / "packed2"))
    datasets.Dataset.from_dict({k: v[:args.steps] for k, v in cols.items()}).save_to_disk(str(tmp / "packed1"))

    stages = [lambda: in_process("torch", weights, tmp / "packed1", args.steps, args.warmup),
              lambda: in_process("mindspore", weights, tmp / "packed1", args.steps, args.warmup)]
    if not args.skip_trainer:
        stages += [lambda: trainer(1, weights, tmp / "packed1", tmp / "mf1", args.steps, args.warmup),
                   lambda: trainer(2, weights, tmp / "packed2", tmp / "mf2", args.steps, args.warmup)]
    results = []
    for stage in stages:
        r = stage()
        results.append(r)
        print(f"  {r['name']}: {r['tokens_per_s']:.1f} tokens/s", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"results": results}, indent=2))
    base = {r["name"]: r["tokens_per_s"] for r in results}
    torch_tps = results[0]["tokens_per_s"]
    print(f"\ntiny Qwen2.5-shaped student (hidden 64, 2 layers, vocab 151936), seq {args.seq}, batch 1/worker, "
          f"{args.steps} steps, median over steps {args.warmup + 1}..; {os.cpu_count()} CPU cores")
    print(f"{'run':44s} {'tokens/s':>10s} {'torch / this':>13s} {'loss first->last':>20s}")
    for r in results:
        print(f"{r['name']:44s} {r['tokens_per_s']:10.0f} {torch_tps / r['tokens_per_s']:13.2f} "
              f"{r['first_loss']:9.4f} -> {r['last_loss']:.4f}")
    if len(results) == 4:
        print(f"MindFormers Trainer 2 workers / 1 worker: {results[3]['tokens_per_s'] / results[2]['tokens_per_s']:.2f}x")
    print(f"MindSpore in-process backend / MindFormers Trainer (1 worker): "
          + (f"{results[1]['tokens_per_s'] / results[2]['tokens_per_s']:.2f}x" if len(results) > 2 else "n/a"))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "tokens_per_s": base}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
