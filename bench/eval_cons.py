"""cons@n cost: distill eval's shortcut (eval_metrics.cons_correct) vs full pairwise clustering.

The anchor is the straightforward implementation: cluster all n extracted answers pairwise with
the verifier, then take the majority. Both run side by side here, on the same answers and the same
VerifierPool (math-verify in worker processes), and must agree on every problem. The answers
imitate an n=64 AIME run: a third of the problems are solved by most samples, a third by none,
and a third are contested. Wrong answers are spread over many distinct integers, and some right
answers are written differently (``\\frac{10}{2}`` for 5).

    .venv/bin/python bench/eval_cons.py [--problems 6] [--n 64] [--workers 2]
"""

from __future__ import annotations

import argparse
import random
import time


def make_problem(rng: random.Random, n: int, kind: str) -> tuple[str, list[str | None], list[bool]]:
    gold = rng.randrange(10, 999)
    p_right = {"strong": 0.8, "weak": 0.0, "contested": 0.3}[kind]
    answers, correct = [], []
    for _ in range(n):
        r = rng.random()
        if r < 0.1:
            answers.append(None)
            correct.append(False)
        elif r < 0.1 + p_right:
            answers.append(rng.choice([str(gold), f"\\frac{{{2 * gold}}}{{2}}", f"{gold}.0"]))
            correct.append(True)
        else:
            answers.append(str(rng.choice([gold + d for d in range(1, 40)] + [rng.randrange(1000)])))
            correct.append(False)
    return str(gold), answers, correct


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=6)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from distilled.eval.metrics import cluster_answers, cons_correct, majority_vote
    from distilled.verify import VerifierPool

    rng = random.Random(a.seed)
    kinds = ["strong", "weak", "contested"]
    problems = [make_problem(rng, a.n, kinds[i % 3]) for i in range(a.problems)]
    with VerifierPool(workers=a.workers, timeout=5) as pool:
        list(pool.judge_many([("\\boxed{1}", "1", None, "math")] * a.workers))  # warm the workers
        counts = {"full": 0, "shortcut": 0}

        def equivalence(which: str):
            def eq(pairs):
                counts[which] += len(pairs)
                return [v.correct for v in pool.judge_many((f"\\boxed{{{x}}}", str(y), None, "math") for x, y in pairs)]
            return eq

        t0 = time.perf_counter()
        full = []
        for gold, answers, correct in problems:
            rep = majority_vote(cluster_answers(answers, equivalence("full")))
            full.append(rep is not None and correct[rep])
        t_full = time.perf_counter() - t0
        t0 = time.perf_counter()
        short = [cons_correct(correct, answers, equivalence("shortcut")) for _, answers, correct in problems]
        t_short = time.perf_counter() - t0
    assert full == short, (full, short)
    print(f"cons@{a.n} on {a.problems} problems ({a.workers} verifier workers), same verdicts: {full == short}")
    print(f"  full pairwise clustering (anchor): {counts['full']:6d} verifier calls  {t_full:7.2f} s")
    print(f"  distill eval shortcut:             {counts['shortcut']:6d} verifier calls  {t_short:7.2f} s")
    print(f"  speed-up: {t_full / max(t_short, 1e-9):.1f}x  (calls: {counts['full'] / max(1, counts['shortcut']):.1f}x fewer)")


if __name__ == "__main__":
    main()
