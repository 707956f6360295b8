"""Evaluation metrics: pass@k (unbiased), cons@n (majority vote), standard errors, output shares.

Why a module of its own: published R1 numbers are pass@1 *averaged over n samples*, and open-r1
users lost weeks to a broken ``pass@1:N``. These functions are small, pure and tested against
brute force so the table in ``report.md`` can be trusted.

All functions take plain Python lists; nothing here imports a heavy library.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator of Chen et al. (2021): ``1 - C(n-c, k) / C(n, k)``.

    ``n`` samples were drawn for a problem, ``c`` of them are correct. Computed as a product so
    that n=64 does not overflow floats.

    >>> pass_at_k(4, 1, 1)
    0.25
    >>> pass_at_k(4, 4, 2)
    1.0
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample std / sqrt(m)) over problems.

    Why over problems: the samples of one problem are not independent draws of the benchmark;
    the problem is the unit, so the error bar reflects how much the score would move with a
    different set of problems of the same kind. One problem gives a standard error of 0.
    """
    vals = [float(v) for v in values]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, 0.0
    return mean, statistics.stdev(vals) / math.sqrt(len(vals))


def default_ks(n: int) -> list[int]:
    """The k values reported for n samples: 1, then powers of two up to n, then n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if n not in ks:
        ks.append(n)
    return ks


class _UnionFind:
    def __init__(self, size: int):
        self.parent = list(range(size))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # keep the smaller root so that a cluster is named by its earliest member
            self.parent[max(ra, rb)] = min(ra, rb)


def cluster_answers(answers: Sequence[Hashable | None],
                    equivalent: Callable[[list[tuple[object, object]]], list[bool]] | None = None) -> list[int | None]:
    """Group extracted answers into equivalence classes; returns a cluster id per answer.

    ``None`` (no extracted answer) gets cluster ``None``: it never votes. Identical answers
    (after ``str().strip()``) always share a cluster; distinct strings are merged when
    ``equivalent`` (a batched predicate over pairs, e.g. the verifier) says they are equal.
    A cluster id is the index of its earliest member.
    """
    keys = [None if a is None else str(a).strip() for a in answers]
    first_of: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k is not None and k != "" and k not in first_of:
            first_of[k] = i
    reps = sorted(first_of.values())
    uf = _UnionFind(len(answers))
    if equivalent is not None and len(reps) > 1:
        pairs = [(a, b) for x, a in enumerate(reps) for b in reps[x + 1:]]
        verdicts = equivalent([(answers[a], answers[b]) for a, b in pairs])
        for (a, b), same in zip(pairs, verdicts):
            if same:
                uf.union(a, b)
    out: list[int | None] = []
    for k in keys:
        if k is None or k == "":
            out.append(None)
        else:
            out.append(uf.find(first_of[k]))
    return out


def majority_vote(clusters: Sequence[int | None]) -> int | None:
    """Index of the sample that represents the largest cluster (ties: the earliest cluster).

    Returns ``None`` when no sample produced an answer. Deterministic, so cons@n is too.
    """
    counts: dict[int, int] = {}
    for c in clusters:
        if c is not None:
            counts[c] = counts.get(c, 0) + 1
    if not counts:
        return None
    best = max(counts.items(), key=lambda kv: (kv[1], -kv[0]))
    return best[0]


def cons_correct(correct: Sequence[bool], answers: Sequence[Hashable | None],
                 equivalent: Callable[[list[tuple[object, object]]], list[bool]] | None = None) -> bool:
    """Is the majority-vote answer right? The same result as :func:`majority_vote` over
    :func:`cluster_answers` when the correct answers form one cluster (they all equal the gold),
    with far fewer equivalence checks.

    Why: clustering n=64 AIME answers pairwise costs up to 2,016 verifier calls per problem
    (about 17 ms each). Here no pair is checked when no sample is right, or when the right ones
    outnumber every answered wrong one; otherwise only the distinct wrong answers are clustered.
    Ties go to the cluster whose first sample came earliest, as in :func:`majority_vote`.
    """
    right = [i for i, (c, a) in enumerate(zip(correct, answers)) if c]
    wrong = [i for i, (c, a) in enumerate(zip(correct, answers))
             if not c and a is not None and str(a).strip() != ""]
    if not right:
        return False
    if len(right) > len(wrong):
        return True
    clusters = cluster_answers([answers[i] for i in wrong], equivalent)
    sizes: dict[int, int] = {}
    for c in clusters:
        if c is not None:
            sizes[c] = sizes.get(c, 0) + 1
    if not sizes:
        return True
    best, m = max(sizes.items(), key=lambda kv: (kv[1], -kv[0]))
    if len(right) != m:
        return len(right) > m
    return right[0] < wrong[best]


@dataclass
class ProblemScores:
    """Per-problem figures that the task metrics average."""

    problem_id: str
    n: int
    correct: int
    truncated: int
    unanswered: int
    cons_correct: bool
    pass_at: dict[int, float] = field(default_factory=dict)


def score_problem(problem_id: str, correct: Sequence[bool], truncated: Sequence[bool],
                  answered: Sequence[bool], clusters: Sequence[int | None] | None, ks: Iterable[int],
                  cons: bool | None = None) -> ProblemScores:
    """Scores of one problem from its n samples.

    cons@n is ``cons`` when given (from :func:`cons_correct`), else it is right when the majority
    cluster's representative sample is correct.
    """
    n = len(correct)
    c = sum(bool(x) for x in correct)
    if cons is None:
        rep = majority_vote(clusters or [])
        cons = bool(rep is not None and correct[rep])
    return ProblemScores(
        problem_id=problem_id,
        n=n,
        correct=c,
        truncated=sum(bool(x) for x in truncated),
        unanswered=sum(not bool(x) for x in answered),
        cons_correct=bool(cons),
        pass_at={k: pass_at_k(n, c, k) for k in ks if k <= n},
    )


def aggregate(problems: Sequence[ProblemScores], ks: Iterable[int]) -> dict:
    """Task-level metrics (percentages, 0-100) with standard errors over problems.

    - ``pass@1``: the mean over problems of (correct samples / n): pass@1 averaged over n.
    - ``pass@k``: the mean of the unbiased estimator, for each k <= min n.
    - ``cons@n``: share of problems whose majority-vote answer is correct.
    - ``truncated`` / ``unanswered``: share of *samples* with finish_reason ``length`` / with
      no extractable answer.
    """
    out: dict = {"problems": len(problems), "samples": sum(p.n for p in problems)}
    if not problems:
        return out
    n_min = min(p.n for p in problems)
    n_max = max(p.n for p in problems)
    out["n"] = n_min if n_min == n_max else [n_min, n_max]
    for k in ks:
        if k > n_min:
            continue
        mean, se = mean_and_stderr([p.pass_at[k] for p in problems])
        out[f"pass@{k}"] = 100.0 * mean
        out[f"pass@{k}_stderr"] = 100.0 * se
    mean, se = mean_and_stderr([1.0 if p.cons_correct else 0.0 for p in problems])
    out[f"cons@{n_min}"] = 100.0 * mean
    out[f"cons@{n_min}_stderr"] = 100.0 * se
    out["cons@n"] = out[f"cons@{n_min}"]
    samples = out["samples"]
    out["truncated_pct"] = 100.0 * sum(p.truncated for p in problems) / samples
    out["unanswered_pct"] = 100.0 * sum(p.unanswered for p in problems) / samples
    return out
