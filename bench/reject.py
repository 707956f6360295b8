"""Rejection-sampling bench: verifier throughput and verdict accuracy, side by side in one run.

Throughput, on >= 2,000 realistic R1-style pairs (multi-kB ``<think>`` reasoning, a few hundred
characters of solution ending in ``\\boxed{}``; ~10% unfinished or cut by ``length``):

* ``bare``: the math-verify calls alone, in this process, with no timeout machinery at all
  (``parsing_timeout=None``, ``timeout_seconds=None``; math-verify's default signal timeouts
  cost more, and under load they fire on ordinary pairs):
  ``verify(parse(gold), parse(answer_after_think))`` for exactly the pairs our pool sends to a
  worker (unfinished ones cost bare nothing), parsed golds cached as the pool caches them. This
  is the strictest floor: pure math-verify work. This is the floor our per-item overhead is measured
  against (target: <= 15%).
* ``pool w=1``: ``VerifierPool(workers=1)``: the same verdicts, each in a worker process under a
  timeout, results streamed back in order.
* ``pool w=2``: ``VerifierPool(workers=2)`` (target: >= 1.8x single-process throughput).

Rounds are interleaved (bare, w1, w2, bare, ...) so that load from other processes hits all
methods alike; the best round of each is reported (and CPU seconds, which other load does not
inflate: for pools, parent plus workers).

On a shared machine with ``sched_autogroup`` on (this one), all processes of one session share one
CPU share against other sessions, so a 2-worker pool cannot beat 1 worker there while other
sessions are busy; ``--own-sessions`` (a diagnostic, off by default) puts each worker in its own
session to show what the pool does when it gets the CPU a lone process gets.

Accuracy: the hand-labelled R1-style set in ``bench/reject_data.py``, judged by our verifier and by
the MindSpore docs' ``reject_sampling.py`` logic (re-implemented there).

    .venv/bin/python bench/reject.py --pairs 2000 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reject_data import LABELLED, docs_reject, realistic_pairs  # noqa: E402

from distilled.verify import VerifierPool, _mv, _precheck, judge  # noqa: E402


def _gold_text(gold: str) -> str:
    from distilled.verify import _gold_text as g

    return g(gold)


def run_bare(work: list[tuple[str, str]]) -> tuple[float, float, list[bool]]:
    """math-verify parse + parse + verify per pair, in-process, no timeouts (the floor)."""
    mv, gold_cfg, pred_cfg, _ = _mv()
    gold_cfg, pred_cfg = list(gold_cfg), list(pred_cfg)
    t, c = time.perf_counter(), time.process_time()
    out = []
    golds: dict = {}  # the pool caches parsed golds too: the comparison isolates pool overhead
    for answer, gold in work:
        g = golds.get(gold)
        if g is None:
            g = golds[gold] = mv.parse(_gold_text(gold), gold_cfg, extraction_mode="first_match",
                                       parsing_timeout=None)
        p = mv.parse(answer, pred_cfg, parsing_timeout=None)
        out.append(bool(g and p and mv.verify(g, p, timeout_seconds=None)))
    return time.perf_counter() - t, time.process_time() - c, out


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


PARENT_CPU: dict[int, list[float]] = {}


def run_pool(items: list[tuple], workers: int, timeout: float) -> tuple[float, float, list]:
    c0, ch0 = time.process_time(), _children_cpu()
    pool = VerifierPool(workers=workers, timeout=timeout)
    t = time.perf_counter()
    out = list(pool.judge_many(items))
    wall = time.perf_counter() - t
    pool.close()  # joins the workers, so their CPU time is counted below
    parent = time.process_time() - c0
    PARENT_CPU.setdefault(workers, []).append(parent)
    return wall, parent + (_children_cpu() - ch0), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the figures here too")
    ap.add_argument("--own-sessions", action="store_true",
                    help="diagnostic: start each pool worker in its own session (os.setsid), so that Linux's "
                         "sched_autogroup gives it the CPU share of a lone process, as on a machine where no "
                         "other session competes; `bare` already runs alone in its session")
    a = ap.parse_args(argv)
    if a.own_sessions:
        import distilled.verify as V

        original = V._worker_main

        def in_own_session(conn, timeout):
            os.setsid()
            original(conn, timeout)

        V._worker_main = in_own_session

    pairs = realistic_pairs(a.pairs, seed=a.seed)
    items = [(g, gold, fr, "math") for g, gold, fr in pairs]
    work = []
    for g, gold, fr in pairs:
        pre, answer, _ = _precheck(g, fr)
        if pre is None:
            work.append((answer, gold))
    kb = sum(len(g) for g, _, _ in pairs) / len(pairs) / 1000
    auto = Path("/proc/self/autogroup")
    if auto.exists() and Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1":
        print("note: sched_autogroup is on: this session's processes share ONE CPU share against other "
              "sessions, so with other sessions busy a 2-worker pool cannot run faster than 1 worker")
    if a.own_sessions:
        print("diagnostic --own-sessions: each pool worker runs in its own session (own autogroup)")
    print(f"{len(pairs)} pairs, mean generation {kb:.1f} kB, {len(work)} finished (sent to math-verify); "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    # warm up: imports, compiled regexes and latex2sympy's parser, in this process (workers fork
    # from it). Only run_bare: judge() would fill the verifier's gold cache the workers inherit.
    run_bare(work[:20])

    res: dict[str, list[tuple[float, float]]] = {"bare": [], "pool w=1": [], "pool w=2": []}
    verdicts = {}
    for r in range(a.rounds):
        wall, cpu, bare_ok = run_bare(work)
        res["bare"].append((wall, cpu))
        for w in (1, 2):
            wall, cpu, out = run_pool(items, w, a.timeout)
            res[f"pool w={w}"].append((wall, cpu))
            verdicts[w] = out
        print(f"round {r + 1}: " + ", ".join(f"{k} {len(pairs) / v[-1][0]:.1f} pairs/s" for k, v in res.items()),
              flush=True)
    assert [v.reason for v in verdicts[1]] == [v.reason for v in verdicts[2]], "verdicts differ across workers"
    pool_ok = [v.correct for v, (g, gold, fr) in zip(verdicts[1], pairs) if _precheck(g, fr)[0] is None]
    agree = sum(x == y for x, y in zip(pool_ok, bare_ok)) / max(1, len(bare_ok))
    timeouts = sum(v.reason == "timeout" for v in verdicts[1])

    best = {k: min(v) for k, v in res.items()}  # fastest wall-clock round (least disturbed)
    cpu = {k: min(c for _, c in v) for k, v in res.items()}
    thr = {k: len(pairs) / v[0] for k, v in best.items()}
    overhead_wall = best["pool w=1"][0] / best["bare"][0] - 1
    overhead_cpu = cpu["pool w=1"] / cpu["bare"] - 1
    speedup_w2_w1 = thr["pool w=2"] / thr["pool w=1"]
    speedup_w2_bare = thr["pool w=2"] / thr["bare"]

    print()
    print("| method | pairs/s (best round) | wall s | CPU s |")
    print("|---|---|---|---|")
    for k in res:
        print(f"| {k} | {thr[k]:.1f} | {best[k][0]:.1f} | {cpu[k]:.1f} |")
    print()
    print(f"per-item overhead of pool w=1 over bare math-verify: wall {overhead_wall:+.1%}, CPU {overhead_cpu:+.1%} "
          f"(target <= +15%)")
    print(f"pool w=2 vs single process: {speedup_w2_w1:.2f}x pool w=1, {speedup_w2_bare:.2f}x bare (target >= 1.8x)")
    eff = {w: len(pairs) / cpu[f"pool w={w}"] for w in (1, 2)}
    print(f"pairs per CPU-second: pool w=1 {eff[1]:.1f}, w=2 {eff[2]:.1f} (ratio {eff[2] / eff[1]:.2f}); parent "
          f"process CPU: w=1 {min(PARENT_CPU[1]):.1f} s, w=2 {min(PARENT_CPU[2]):.1f} s")
    paired = [(res["pool w=1"][i][0] / res["bare"][i][0] - 1, res["pool w=1"][i][0] / res["pool w=2"][i][0])
              for i in range(a.rounds)]
    print("same-round ratios: " + "; ".join(f"round {i + 1}: w=1 overhead {o:+.1%}, w=2 speed-up {s:.2f}x"
                                             for i, (o, s) in enumerate(paired)))
    print(f"verdict agreement pool vs bare on finished pairs: {agree:.2%}; pool timeouts: {timeouts}")

    ours = sum(judge(gen, gold, fr).correct == label for gold, gen, fr, label, _ in LABELLED)
    docs = sum(docs_reject(gen, gold) == label for gold, gen, fr, label, _ in LABELLED)
    n = len(LABELLED)
    print(f"labelled set ({n} R1-style answers): ours {ours / n:.0%} right, docs' reject_sampling.py logic "
          f"{docs / n:.0%} right -> {ours / max(docs, 1):.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "pairs": len(pairs), "mean_kb": kb, "throughput": thr, "best_wall_s": {k: v[0] for k, v in best.items()},
            "cpu_s": cpu, "overhead_wall": overhead_wall, "overhead_cpu": overhead_cpu,
            "speedup_w2_vs_w1": speedup_w2_w1, "speedup_w2_vs_bare": speedup_w2_bare, "agreement": agree,
            "labelled": {"n": n, "ours": ours / n, "docs": docs / n}, "loadavg": os.getloadavg()[0],
            "rounds": {k: v for k, v in res.items()}, "paired": paired,
            "pairs_per_cpu_s": eff, "parent_cpu_s": PARENT_CPU, "own_sessions": a.own_sessions,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
