"""Training throughput (tokens/s) on the same tiny CPU run, side by side: MindFormers' Trainer in
graph mode vs PyNative vs the torch backend.

Same weights (the tiny Qwen2.5-shaped student of configs/finetune_qwen2_5_tiny_cpu.yaml, real
151,936-row vocabulary), same packed rows, same YAML settings (AdamW, LinearWithWarmUpLR, clipping,
per-token loss). Rows:

- torch backend (what ``distill train --backend torch`` runs, in process)
- MindFormers' Trainer through ``run_mindformer.py``, 1 worker, ``context.mode: 0`` (graph, the
  YAML's default, as on Ascend)
- the same with ``--mode 1`` (PyNative)
- optional (``--mindspore-backend``): the parity backend in process; (``--msrun``): the Trainer
  with 2 msrun workers in graph mode

tokens/s counts every token of the packed rows (seq_length x batch x workers); the first
``--warmup`` steps are left out (graph compilation, allocator warm-up). Besides wall-clock
tokens/s it reports tokens per CPU-second of the process (robust on a shared machine).
Prints a table and the ratios graph/PyNative and torch/graph.

    .venv/bin/python bench/train.py [--steps 12] [--seq 512] [--msrun] [--json out.json]
    .venv/bin/python bench/train.py --scaling --workers 1 2 --steps 6 --seq 512   # workers scaling
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
    from distilled.train.backends import get_backend
    from distilled.train.backends.base import iter_batches
    from distilled.train.loop import load_packed, load_yaml, settings_from_yaml

    plan = settings_from_yaml(load_yaml(CONFIG), steps=steps)
    ds = load_packed(data)
    batches = list(iter_batches(ds, plan.batch_size, steps))
    kw = {"device": "cpu"} if backend == "torch" else {}
    be = get_backend(backend, **kw)
    be.load_hf(weights, model_config=plan.model_config, seq_length=batches[0].seq_length, batch_size=plan.batch_size)
    be.setup_training(plan.settings)
    times, cpus, losses = [], [], []
    for b in batches:
        t, c = time.perf_counter(), time.process_time()
        r = be.train_step(b)
        times.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        losses.append(r.loss)
    tok = batches[0].batch_size * batches[0].seq_length
    tps = [tok / t for t in times[warmup:]]
    name = "torch backend (`distill train --backend torch`)" if backend == "torch" else f"{backend} backend (in process)"
    return {"name": name, "workers": 1, "steps": steps, "tokens_per_s": statistics.median(tps),
            "tokens_per_cpu_s": statistics.median([tok / c for c in cpus[warmup:] if c > 0]),
            "step_time_s": statistics.median(times[warmup:]), "first_loss": losses[0], "last_loss": losses[-1]}


def trainer(workers: int, weights: Path, data: Path, out: Path, steps: int, warmup: int, mode: int = 0) -> dict:
    """MindFormers' Trainer via run_mindformer.py; ``steps`` rows per worker (epochs: 1).
    ``mode`` is ``context.mode``: 0 graph (the YAML's), 1 PyNative."""
    from distilled.train.mindformers_run import read_loss

    py = sys.executable
    args = ["run_mindformer.py", "--config", str(CONFIG), "--run_mode", "finetune", "--mode", str(mode),
            "--load_checkpoint", str(weights), "--train_dataset_dir", str(data), "--output_dir", str(out),
            "--callbacks.1.save_checkpoint_steps", "1000000"]
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
    per_rank, per_cpu = [], []
    for r in range(workers):
        recs = read_loss(out / f"loss_rank_{r}.jsonl")
        tps = [x["tokens_per_s"] for x in recs[warmup:] if x.get("tokens_per_s")]
        per_rank.append(statistics.median(tps))
        per_cpu.append(statistics.median([x["tokens"] / x["cpu_time_s"] for x in recs[warmup:] if x.get("cpu_time_s")]))
    recs0 = read_loss(out / "loss_rank_0.jsonl")
    label = "graph" if mode == 0 else "PyNative"
    return {"name": f"MindFormers Trainer, {label}, {workers} worker{'s' if workers > 1 else ''}",
            "workers": workers, "mode": label, "steps": len(recs0), "tokens_per_s": sum(per_rank),
            "tokens_per_cpu_s": sum(per_cpu), "step_time_s": statistics.median([x["step_time_s"] for x in recs0[warmup:]]),
            "first_loss": recs0[0]["loss"], "last_loss": recs0[-1]["loss"], "wall_s": wall}


def bench_tiny_mf(workers: int, steps: int = 6, seq_length: int = 512, workdir: str | os.PathLike = "runs/bench_mf",
                  port: int = 8240, load_checkpoint: str | None = None) -> dict:
    """Train the tiny CPU YAML for ``steps`` optimizer steps on ``workers`` CPU workers and return
    throughput and memory (for bench/train.py and docs/benchmarks.md).

    Data: random token ids in the Qwen2.5 vocabulary, packed 4 documents per row (``seq_length``
    tokens each), enough rows for ``steps`` steps per worker. 1 worker runs with plain python,
    2+ through scripts/msrun_launcher.sh. Checkpointing is switched off so only training is timed.
    (Moved here from ``distilled.train.mindformers_run``: the library holds no benchmark recipes.)
    Returns ``{workers, steps, seq_length, tokens_per_s (all workers, median step after the first),
    step_time_s, peak_rss_mb (largest worker), first_loss, last_loss}``.
    """
    import datasets
    import numpy as np

    from distilled.train.mindformers_run import read_loss

    work = Path(workdir) / f"w{workers}"
    data = work / "packed"
    out = work / "out"
    rows = steps * workers
    rng = np.random.RandomState(0)
    doc = seq_length // 4
    ids = rng.randint(0, 151643, (rows, seq_length)).astype(np.int32)
    labels = np.concatenate([ids[:, 1:], np.full((rows, 1), -100, np.int32)], axis=1)
    labels[:, doc - 1::doc] = -100  # no label across a document boundary
    ends = [list(range(doc, seq_length + 1, doc))] * rows
    if work.exists():
        import shutil

        shutil.rmtree(work)
    datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist(),
                                "actual_seq_len": ends}).save_to_disk(str(data))
    args = [str(REPO / "run_mindformer.py"), "--config", str(REPO / "configs" / "finetune_qwen2_5_tiny_cpu.yaml"),
            "--run_mode", "finetune", "--train_dataset_dir", str(data), "--output_dir", str(out),
            "--model.model_config.seq_length", str(seq_length), "--callbacks.1.save_checkpoint_steps", "1000000"]
    if load_checkpoint:
        args += ["--load_checkpoint", str(load_checkpoint)]
    t0 = time.perf_counter()
    if workers == 1:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    else:
        proc = subprocess.run(["bash", str(REPO / "scripts" / "msrun_launcher.sh"), " ".join(args), str(workers),
                               str(port), str(out / "msrun_log"), "True", "1200"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"tiny MF training failed ({proc.returncode}): {proc.stderr[-2000:] or proc.stdout[-2000:]}")
    per_rank = [read_loss(out / f"loss_rank_{r}.jsonl") for r in range(workers)]
    step_times = [statistics.median([r["step_time_s"] for r in recs[1:]] or [recs[0]["step_time_s"]])
                  for recs in per_rank]
    step_time = max(step_times)  # the slowest rank sets the pace
    rank0 = per_rank[0]
    cpu = [statistics.median([r["cpu_time_s"] for r in recs[1:] if r.get("cpu_time_s")] or [0.0]) for recs in per_rank]
    extra = {"tokens_per_cpu_s_per_worker": round(seq_length / max(cpu), 1)} if max(cpu) > 0 else {}
    return {**extra, "workers": workers, "steps": len(rank0), "seq_length": seq_length,
            "tokens_per_s": round(seq_length * workers / step_time, 1), "step_time_s": round(step_time, 3),
            "peak_rss_mb": max(recs[-1]["peak_rss_mb"] for recs in per_rank),
            "first_loss": rank0[0]["loss"], "last_loss": rank0[-1]["loss"], "wall_s": round(wall, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seq", "--seq-length", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--msrun", action="store_true", help="also the Trainer with 2 msrun workers (graph mode)")
    ap.add_argument("--mindspore-backend", action="store_true", help="also the parity backend in process")
    ap.add_argument("--scaling", action="store_true", help="workers scaling of the Trainer (bench_tiny_mf)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="with --scaling")
    ap.add_argument("--workdir", default="runs/bench_mf", help="with --scaling")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    os.environ.setdefault("GLOG_v", "3")
    if args.scaling:
        res = [bench_tiny_mf(w, args.steps, args.seq, args.workdir) for w in args.workers]
        for r in res:
            print(json.dumps(r))
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        return 0
    from distilled.train.tiny_model import TinyQwen2Shape, make_tiny_qwen2
    from distilled.train.loop import load_yaml

    import datasets

    mc = load_yaml(CONFIG)["model"]["model_config"]
    if args.seq > int(mc["seq_length"]):
        raise SystemExit(f"--seq {args.seq} > model_config.seq_length {mc['seq_length']}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    weights = make_tiny_qwen2(tmp / "weights", TinyQwen2Shape())
    # `steps` rows for one worker; the 2-worker run reads 2 x steps (steps each)
    rows = make_rows(2 * args.steps, args.seq, 151643)
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    datasets.Dataset.from_dict(cols).save_to_disk(str(tmp / "packed2"))
    datasets.Dataset.from_dict({k: v[:args.steps] for k, v in cols.items()}).save_to_disk(str(tmp / "packed1"))

    stages = [lambda: in_process("torch", weights, tmp / "packed1", args.steps, args.warmup),
              lambda: trainer(1, weights, tmp / "packed1", tmp / "mf_graph", args.steps, args.warmup, mode=0),
              lambda: trainer(1, weights, tmp / "packed1", tmp / "mf_pynative", args.steps, args.warmup, mode=1)]
    if args.mindspore_backend:
        stages.append(lambda: in_process("mindspore", weights, tmp / "packed1", args.steps, args.warmup))
    if args.msrun:
        stages.append(lambda: trainer(2, weights, tmp / "packed2", tmp / "mf_graph2", args.steps, args.warmup, mode=0))
    results = []
    for stage in stages:
        r = stage()
        results.append(r)
        print(f"  {r['name']}: {r['tokens_per_s']:.1f} tokens/s, {r['tokens_per_cpu_s']:.1f} tokens/CPU-s", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"results": results}, indent=2))
    torch_r, graph, pyn = results[0], results[1], results[2]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ntiny Qwen2.5-shaped student (hidden 64, 2 layers, vocab 151936), seq {args.seq}, batch 1/worker, "
          f"{args.steps} steps, median over steps {args.warmup + 1}..; {os.cpu_count()} CPU cores, load {load:.1f}")
    print(f"{'run':52s} {'tokens/s':>9s} {'tok/CPU-s':>10s} {'s/step':>7s} {'loss first->last':>22s}")
    for r in results:
        print(f"{r['name']:52s} {r['tokens_per_s']:9.1f} {r['tokens_per_cpu_s']:10.1f} {r['step_time_s']:7.2f} "
              f"{r['first_loss']:10.6f} -> {r['last_loss']:.6f}")
    ratios = {
        "graph_over_pynative": graph["tokens_per_s"] / pyn["tokens_per_s"],
        "graph_over_pynative_cpu": graph["tokens_per_cpu_s"] / pyn["tokens_per_cpu_s"],
        "torch_over_graph": torch_r["tokens_per_s"] / graph["tokens_per_s"],
        "torch_over_graph_cpu": torch_r["tokens_per_cpu_s"] / graph["tokens_per_cpu_s"],
    }
    print(f"MindFormers graph / PyNative: {ratios['graph_over_pynative']:.2f}x wall "
          f"({ratios['graph_over_pynative_cpu']:.2f}x per CPU-second)  [target >= 2.5x]")
    print(f"torch / MindFormers graph:    {ratios['torch_over_graph']:.2f}x wall "
          f"({ratios['torch_over_graph_cpu']:.2f}x per CPU-second)  [target <= 2x]")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "ratios": ratios, "load": load}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
