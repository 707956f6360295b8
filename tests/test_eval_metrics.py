"""Metrics of `distill eval`: pass@k against brute force, cons@n, standard errors, shares."""

from __future__ import annotations

import itertools
import math
import random
import statistics

import pytest

from distilled.eval.metrics import (aggregate, cluster_answers, default_ks, majority_vote, mean_and_stderr,
                                    pass_at_k, score_problem)


def brute_pass_at_k(outcomes: list[bool], k: int) -> float:
    """Share of all k-subsets of the n samples that contain at least one correct sample."""
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_pass_at_k_equals_brute_force(n):
    rng = random.Random(n)
    for _ in range(5):
        outcomes = [rng.random() < 0.4 for _ in range(n)]
        c = sum(outcomes)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_k_large_n_is_stable_and_matches_comb():
    # n=64 (AIME): the product form must agree with exact binomials, no overflow
    for c in (0, 1, 7, 32, 63, 64):
        for k in (1, 8, 32, 64):
            exact = 1.0 if 64 - c < k else 1 - math.comb(64 - c, k) / math.comb(64, k)
            assert pass_at_k(64, c, k) == pytest.approx(exact, rel=1e-12, abs=1e-12)
    assert pass_at_k(64, 16, 1) == pytest.approx(0.25)


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 0)


def test_mean_and_stderr():
    vals = [1.0, 0.0, 0.5, 0.25]
    mean, se = mean_and_stderr(vals)
    assert mean == pytest.approx(0.4375)
    assert se == pytest.approx(statistics.stdev(vals) / 2)
    assert mean_and_stderr([0.7]) == (0.7, 0.0)
    m, s = mean_and_stderr([])
    assert math.isnan(m) and math.isnan(s)


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(4) == [1, 2, 4]
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(6) == [1, 2, 4, 6]
    assert default_ks(64) == [1, 2, 4, 8, 16, 32, 64]


def test_cluster_answers_with_equivalence_and_none():
    answers = ["1/2", "\\frac{1}{2}", None, "3", "0.5", "3", ""]
    calls = []

    def eq(pairs):
        calls.append(len(pairs))
        vals = {"1/2": 0.5, "\\frac{1}{2}": 0.5, "0.5": 0.5, "3": 3.0}
        return [vals[a] == vals[b] for a, b in pairs]

    clusters = cluster_answers(answers, eq)
    assert clusters == [0, 0, None, 3, 0, 3, None]
    # distinct strings only are compared: 4 distinct -> 6 pairs, in one batched call
    assert calls == [6]
    # without an equivalence, only identical strings group
    assert cluster_answers(answers) == [0, 1, None, 3, 4, 3, None]


def test_majority_vote_ties_go_to_earliest_cluster():
    assert majority_vote([None, None]) is None
    assert majority_vote([0, 1, 1, 0]) == 0
    assert majority_vote([0, 1, 1, None]) == 1
    assert majority_vote([2, 2, 0, 0]) == 0  # both size 2: earliest cluster id wins


def test_score_problem_cons_and_counts():
    # samples: right(A) wrong(B) wrong(B) truncated(None)
    correct = [True, False, False, False]
    truncated = [False, False, False, True]
    answered = [True, True, True, True]  # truncated ones are not "unanswered"
    clusters = [0, 1, 1, None]
    s = score_problem("p", correct, truncated, answered, clusters, [1, 2, 4])
    assert s.correct == 1 and s.truncated == 1 and s.unanswered == 0
    assert s.cons_correct is False  # majority B is wrong
    assert s.pass_at[1] == pytest.approx(0.25)
    assert s.pass_at[4] == 1.0
    s2 = score_problem("q", [True, True, False], [False] * 3, [True, True, False], [0, 0, None], [1])
    assert s2.cons_correct is True and s2.unanswered == 1


def test_aggregate_percentages_and_stderr():
    probs = [
        score_problem("a", [True, True, False, False], [False] * 4, [True] * 4, [0, 0, 2, 2], [1, 2, 4]),
        score_problem("b", [False] * 4, [True, False, False, False], [True, True, False, True], [None, 1, None, 1], [1, 2, 4]),
        score_problem("c", [True] * 4, [False] * 4, [True] * 4, [0, 0, 0, 0], [1, 2, 4]),
    ]
    m = aggregate(probs, [1, 2, 4])
    per = [0.5, 0.0, 1.0]
    assert m["pass@1"] == pytest.approx(100 * sum(per) / 3)
    assert m["pass@1_stderr"] == pytest.approx(100 * statistics.stdev(per) / math.sqrt(3))
    assert m["pass@4"] == pytest.approx(100 * (1 + 0 + 1) / 3)
    # cons: a -> tie between cluster 0 (correct) and 2: earliest (0) wins -> right; b wrong; c right
    assert m["cons@4"] == pytest.approx(200 / 3)
    assert m["cons@n"] == m["cons@4"]
    assert m["truncated_pct"] == pytest.approx(100 / 12)
    assert m["unanswered_pct"] == pytest.approx(100 / 12)
    assert m["problems"] == 3 and m["samples"] == 12 and m["n"] == 4


def test_cons_correct_equals_full_clustering_vote():
    """The shortcut gives the same cons@n as voting over full clusters, on random problems where
    answers are residues and 'equivalent' means equal mod 5 (so distinct strings do merge)."""
    from distilled.eval.metrics import cons_correct

    calls = {"pairs": 0}

    def eq(pairs):
        calls["pairs"] += len(pairs)
        return [int(a) % 5 == int(b) % 5 for a, b in pairs]

    rng = random.Random(7)
    for _ in range(400):
        n = rng.choice([1, 2, 4, 8, 16])
        gold = rng.randrange(5)
        answers, correct = [], []
        for _ in range(n):
            if rng.random() < 0.2:
                answers.append(None)
                correct.append(False)
                continue
            v = rng.randrange(15) if rng.random() < 0.6 else gold + 5 * rng.randrange(3)
            answers.append(str(v))
            correct.append(v % 5 == gold)
        full = majority_vote(cluster_answers(answers, eq))
        expected = full is not None and correct[full]
        assert cons_correct(correct, answers, eq) == expected, (answers, correct)


def test_cons_correct_skips_equivalence_when_it_cannot_matter():
    from distilled.eval.metrics import cons_correct

    def never(pairs):
        raise AssertionError("no equivalence check was needed")

    assert cons_correct([False] * 4, ["1", "2", "3", None], never) is False
    assert cons_correct([True, True, True, False], ["4", "4", "4.0", "7"], never) is True
    assert cons_correct([True, False, False], ["4", None, None], never) is True
