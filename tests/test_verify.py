"""The one verifier (distilled.verify): every verdict rule of issue 4, hostile inputs, the worker
pool's timeout/kill/ordering guarantees, and the labelled comparison with the docs' regex logic."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from distilled.verify import REASONS, Verdict, VerifierPool, extract_choice, judge, split_reasoning

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from reject_data import LABELLED, docs_reject, realistic_pairs  # noqa: E402


def R1(answer: str, reasoning: str = "Let me think about this step by step.") -> str:
    return f"<think>\n{reasoning}\n</think>\n\n{answer}"


# --------------------------------------------------------------------------- split_reasoning
@pytest.mark.parametrize("text, expected", [
    ("<think>a</think>b", ("<think>a", "b", True)),
    ("a</think>b", ("a", "b", True)),  # R1 template puts <think> in the prompt
    ("<think>a \\boxed{2}", ("<think>a \\boxed{2}", "", False)),
    ("plain \\boxed{2}", (None, "plain \\boxed{2}", True)),
    ("<think>a</think>b<think>again", ("<think>a</think>b<think>again", "", False)),
    ("<think>a</think>b</think>c", ("<think>a</think>b", "c", True)),
])
def test_split_reasoning(text, expected):
    assert split_reasoning(text) == expected


# --------------------------------------------------------------------------- verdict rules
RULES = [
    # gold, generation, finish_reason, correct, reason
    (r"\frac{1}{2}", R1(r"So $\boxed{\frac{1}{2}}$."), "stop", True, "correct"),
    (r"\frac{1}{2}", R1(r"So $\boxed{\dfrac{1}{2}}$."), "stop", True, "correct"),
    (r"\frac{\sqrt{3}}{2}", R1(r"$\boxed{\frac{\sqrt{3}}{2}}$"), "stop", True, "correct"),
    (r"\frac{\sqrt{3}}{2}", R1(r"$\boxed{\frac{\sqrt{2}}{2}}$"), "stop", False, "wrong_answer"),
    (r"\left( 3, \frac{\pi}{2} \right)", R1(r"$\boxed{(3, \frac{\pi}{2})}$"), "stop", True, "correct"),
    (r"(1, 2)", R1(r"$\boxed{(2, 1)}$"), "stop", False, "wrong_answer"),
    (r"[2, 5)", R1(r"$\boxed{[2,5)}$"), "stop", True, "correct"),
    (r"[2, 5)", R1(r"$\boxed{(2,5]}$"), "stop", False, "wrong_answer"),
    (r"30^\circ", R1(r"$\boxed{30}$"), "stop", True, "correct"),
    (r"30", R1(r"$\boxed{30^{\circ}}$"), "stop", True, "correct"),
    (r"\text{Evelyn}", R1(r"$\boxed{\text{Evelyn}}$"), "stop", True, "correct"),
    (r"5", R1(r"Thus $\boxed{x = 5}$."), "stop", True, "correct"),
    (r"5", R1(r"Thus $\boxed{x = 6}$."), "stop", False, "wrong_answer"),
    (r"3+4i", R1(r"$\boxed{3 + 4i}$"), "stop", True, "correct"),
    (r"3-4i", R1(r"$\boxed{3 + 4i}$"), "stop", False, "wrong_answer"),
    (r"12", R1("所以答案是 $\\boxed{12}$。✅"), "stop", True, "correct"),
    (r"\frac{3}{5}", R1("∴ 答案： $\\boxed{\\frac{3}{5}}$ ✓ — ünïcödé"), None, True, "correct"),
    (r"2", R1(r"First $\boxed{3}$; wait, no: $\boxed{2}$"), "stop", True, "correct"),  # last boxed wins
    (r"7", "<think>\nso the answer is \\boxed{7}, wait", "stop", False, "unfinished"),
    (r"7", "<think>\nso the answer is \\boxed{7}", None, False, "unfinished"),
    (r"4", R1(r"$\boxed{4}$"), "length", False, "length"),
    (r"12", R1("No final answer.", reasoning=r"it is \boxed{12}"), "stop", False, "no_answer"),
    (r"", R1(r"$\boxed{4}$"), "stop", False, "unparsable_gold"),
    (r"\$18.90", R1(r"$\boxed{\$18.90}$"), "stop", True, "correct"),
    (r"1000000", R1(r"$\boxed{1,000,000}$"), "stop", True, "correct"),
]


@pytest.mark.parametrize("gold, gen, fr, correct, reason", RULES)
def test_verdict_rules(gold, gen, fr, correct, reason):
    v = judge(gen, gold, fr)
    assert (v.correct, v.reason) == (correct, reason), v
    assert v.reason in REASONS
    assert v.complete == (reason not in ("unfinished", "length"))


def test_extracted_is_the_final_boxed_answer():
    v = judge(R1(r"guess $\boxed{1}$ then $\boxed{\frac{1}{2}}$"), r"\frac{1}{2}")
    assert v.extracted == r"\frac{1}{2}"


@pytest.mark.parametrize("gen, gold, correct, reason", [
    (R1(r"The answer is $\boxed{C}$."), "C", True, "correct"),
    (R1(r"$\boxed{\text{(D)}}$"), "D", True, "correct"),
    (R1("**Answer:** (B)"), "B", True, "correct"),
    (R1("Answer: C"), "(C)", True, "correct"),
    (R1("Thus the correct option is A."), "A", True, "correct"),
    (R1(r"The answer is $\boxed{B}$."), "C", False, "wrong_answer"),
    (R1("I cannot decide."), "C", False, "no_answer"),
    (R1(r"$\boxed{C}$"), "forty", False, "unparsable_gold"),
    ("<think>\nAnswer: C but", "C", False, "unfinished"),
])
def test_choice_letters(gen, gold, correct, reason):
    v = judge(gen, gold, "stop", kind="choice")
    assert (v.correct, v.reason) == (correct, reason), v


def test_extract_choice_prefers_last_boxed():
    assert extract_choice(r"Option A looks tempting, but $\boxed{B}$.") == "B"


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown verifier kind"):
        judge("x", "1", kind="code")


# --------------------------------------------------------------------------- hostile inputs
HUGE = "<think>\n" + "x" * 1000 + "\n</think>\n\n" + "The value is $a_1 + a_2$, " * 8000 + r"so $\boxed{4}$."


@pytest.mark.parametrize("gen, gold", [
    (R1(r"$\boxed{5^{5^{5^{5^5}}}}$"), "3"),
    (HUGE, "4"),
    (R1(r"$\boxed{\frac{1}{"), "1"),
    (R1(r"$\sqrt{$ and \left( \right \boxed{}}}"), "1"),
    (R1("\\boxed{" * 500), "1"),
])
def test_hostile_inputs_finish_in_bounded_time(gen, gold):
    assert len(HUGE) > 200_000
    t = time.perf_counter()
    v = judge(gen, gold, "stop", timeout=2.0)
    elapsed = time.perf_counter() - t
    assert elapsed < 2.0 + 3.0, elapsed  # the timer fires at 2 s; unwinding is quick
    assert isinstance(v, Verdict) and v.reason in REASONS
    assert not v.correct or v.reason == "correct"
    assert v.extracted is None or len(v.extracted) <= 503  # capped for reports and journals


def test_power_tower_times_out_in_pool():
    items = [(R1(r"$\boxed{5^{5^{5^{5^5}}}}$"), "3", "stop", "math"), (R1(r"$\boxed{2}$"), "2", "stop", "math")]
    with VerifierPool(workers=1, timeout=1.0) as pool:
        t = time.perf_counter()
        out = list(pool.judge_many(items))
    assert [v.reason for v in out] == ["timeout", "correct"]
    assert time.perf_counter() - t < 10


# --------------------------------------------------------------------------- pool guarantees
def _mixed_items(n_real: int = 12) -> list[tuple]:
    items = [(gen, gold, fr, "math") for gold, gen, fr, _, _ in LABELLED]
    items += [(g, gold, fr, "math") for g, gold, fr in realistic_pairs(n_real, seed=7)]
    items += [(R1(r"$\boxed{C}$"), "C", None, "choice"), (R1("Answer: A"), "B", None, "choice")]
    return items


def test_results_identical_whatever_the_worker_count():
    items = _mixed_items()
    runs = {}
    for workers in (0, 1, 2):
        with VerifierPool(workers=workers, timeout=30, chunk_size=5) as pool:
            runs[workers] = list(pool.judge_many(iter(items)))
    assert runs[0] == runs[1] == runs[2]
    assert len(runs[0]) == len(items)
    # and identical to the plain in-process judge
    assert runs[0] == [judge(*it, timeout=30) for it in items]


def test_hard_kill_replaces_a_stuck_worker_and_keeps_order():
    """No interval timer in the worker: only the parent's kill can stop the power tower."""
    hostile = (R1(r"$\boxed{5^{5^{5^{5^5}}}}$"), "3", "stop", "math")
    good = [(R1(f"$\\boxed{{{i}}}$"), str(i), "stop", "math") for i in range(6)]
    items = good[:3] + [hostile] + good[3:]
    with VerifierPool(workers=2, timeout=1.0, grace=0.5, chunk_size=2, soft_timeout=False) as pool:
        t = time.perf_counter()
        out = list(pool.judge_many(items))
        assert pool.killed_workers == 1
        assert [v.reason for v in out] == ["correct"] * 3 + ["timeout"] + ["correct"] * 3
        assert time.perf_counter() - t < 15
        # the replacement worker serves the next batch
        assert [v.reason for v in pool.judge_many(good[:2])] == ["correct", "correct"]


def test_a_worker_that_dies_gives_timeout_for_its_item_only():
    hostile = (R1(r"$\boxed{5^{5^{5^{5^5}}}}$"), "3", "stop", "math")
    good = (R1(r"$\boxed{2}$"), "2", "stop", "math")
    with VerifierPool(workers=1, timeout=60, soft_timeout=False) as pool:
        def killer():
            time.sleep(1.0)
            pool._pool[0].proc.kill()  # simulate an OOM kill / segfault mid-item

        th = threading.Thread(target=killer)
        th.start()
        out = list(pool.judge_many([hostile, good]))
        th.join()
    assert [v.reason for v in out] == ["timeout", "correct"]


def test_abandoned_iteration_does_not_leak_into_next_batch():
    items = [(R1(f"$\\boxed{{{i}}}$"), str(i), "stop", "math") for i in range(30)]
    with VerifierPool(workers=2, timeout=30, chunk_size=4) as pool:
        it = pool.judge_many(items)
        next(it)
        it.close()
        out = list(pool.judge_many(items[:6]))
    assert [v.correct for v in out] == [True] * 6


def test_concurrent_callers_are_serialised():
    items_a = [(R1(f"$\\boxed{{{i}}}$"), str(i), "stop", "math") for i in range(8)]
    items_b = [(R1(f"$\\boxed{{{i}}}$"), str(i + 1), "stop", "math") for i in range(8)]
    res: dict = {}
    with VerifierPool(workers=2, timeout=30, chunk_size=3) as pool:
        ts = [threading.Thread(target=lambda k, its: res.__setitem__(k, list(pool.judge_many(its))), args=(k, its))
              for k, its in (("a", items_a), ("b", items_b))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert all(v.correct for v in res["a"]) and not any(v.correct for v in res["b"])


def test_pool_rejects_bad_options():
    with pytest.raises(ValueError):
        VerifierPool(workers=-1)
    with pytest.raises(ValueError):
        VerifierPool(workers=1, timeout=0)


# --------------------------------------------------------------------------- labelled comparison
def test_labelled_set_ours_vs_docs_regex():
    """Our verdicts match every human label; the docs' regex logic misses many (they get 64% of the verdicts right)."""
    ours = [judge(gen, gold, fr).correct == label for gold, gen, fr, label, _ in LABELLED]
    docs = [docs_reject(gen, gold) == label for gold, gen, fr, label, _ in LABELLED]
    acc_ours, acc_docs = sum(ours) / len(ours), sum(docs) / len(docs)
    print(f"labelled set ({len(LABELLED)}): ours {acc_ours:.0%}, docs regex {acc_docs:.0%}")
    missed = [what for (_, _, _, _, what), ok in zip(LABELLED, ours) if not ok]
    assert acc_ours == 1.0, missed
    assert acc_docs < 0.8
    # the docs' failure modes are the known ones: nested braces and unfinished reasoning
    by_what = {what: ok for (_, _, _, _, what), ok in zip(LABELLED, docs)}
    assert not by_what["nested braces"] and not by_what["unfinished think with boxed"]


def test_workers_end_when_the_parent_is_killed(tmp_path):
    """kill -9 of the process that owns a pool must not leave verifier workers behind."""
    import os
    import signal
    import subprocess

    code = ("import sys, time\n"
            "from distilled.verify import VerifierPool\n"
            "pool = VerifierPool(workers=2)\n"
            "list(pool.judge_many([('$\\\\boxed{1}$', '1')]))\n"
            "print(' '.join(str(w.proc.pid) for w in pool._pool), flush=True)\n"
            "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(Path(f"/proc/{p}").exists() for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        left = [p for p in pids if _alive(p)]
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert not left, f"verifier workers {left} outlived their killed parent"
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
