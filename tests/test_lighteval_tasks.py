"""distilled/eval/lighteval_tasks.py, the lighteval custom task file. lighteval cannot share .venv
(it needs numpy>=2 and another latex2sympy2_extended), so these tests drive it in `.venv-eval` (built by `make eval-env`) through a
subprocess, and skip with a clear reason when that environment is absent."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EVAL_PY = REPO / ".venv-eval" / "bin" / "python"
TASK_FILE = REPO / "distilled" / "eval" / "lighteval_tasks.py"

needs_eval_env = pytest.mark.skipif(
    not EVAL_PY.exists(), reason=".venv-eval is absent: run `make eval-env` to build lighteval's own environment")


def eval_env_run(code: str, payload: object, env: dict | None = None, timeout: int = 300) -> object:
    """Run ``code`` in .venv-eval with ``payload`` as JSON on stdin; it prints one JSON line last."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    p = subprocess.run([str(EVAL_PY), "-c", code], input=json.dumps(payload), capture_output=True, text=True,
                       env=full_env, cwd=REPO, timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


LOAD_TASK_FILE = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("lighteval_tasks", {str(TASK_FILE)!r})
lt = importlib.util.module_from_spec(spec); spec.loader.exec_module(lt)
"""

# Fixed outputs: (generation, gold, kind). Chosen to exercise every rule, not to flatter.
CASES = [
    ("<think>half</think>\nSo $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", "math"),
    ("<think>half</think>\nThe answer is $\\boxed{0.5}$", "\\frac{1}{2}", "math"),
    ("<think>x</think> $\\boxed{\\dfrac{3}{4}}$", "\\frac{1}{2}", "math"),
    ("<think>first \\boxed{7} then", "7", "math"),  # never closed: unfinished
    ("<think>\\boxed{7}</think> no box here, just words", "7", "math"),  # box only in the reasoning
    ("Plain answer without think: $\\boxed{12}$", "12", "math"),
    ("<think>a</think> $\\boxed{3}$ wait, no: $\\boxed{4}$", "4", "math"),  # the last box wins
    ("<think>a</think> $\\boxed{2\\sqrt{3}}$", "\\sqrt{12}", "math"),
    ("<think>a</think> $\\boxed{\\pi}$", "\\pi", "math"),
    ("<think>a</think> $\\boxed{(-\\infty, 2]}$", "(-\\infty,2]", "math"),
    ("<think>a</think> Therefore, the final answer is: $\\boxed{204}$. I hope it is correct", "204", "math"),
    ("<think>a</think> $\\boxed{205}$", "204", "math"),
    ("<think>a</think> $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$", "\\left( 3, \\frac{\\pi}{2} \\right)", "math"),
    ("<think>reasoning</think>\nAnswer: B", "B", "choice"),
    ("<think>reasoning</think>\nAnswer: C", "B", "choice"),
    ("<think>r</think> The answer is $\\boxed{\\text{(D)}}$", "D", "choice"),
    ("<think>r</think> so the answer is (A).", "A", "choice"),
    ("<think>Answer: A", "A", "choice"),  # unfinished
]


def test_main_package_never_imports_the_task_file():
    code = ("import sys, distilled.cli as c; c.build_parser(); import distilled.eval.runner; "
            "print('distilled.eval.lighteval_tasks' in sys.modules, 'lighteval' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["False", "False"]


@needs_eval_env
@pytest.mark.slow  # importing lighteval in .venv-eval alone takes ~30 s on 2 busy cores
def test_scorers_agree_on_fixed_outputs_and_prompts_match(tmp_path):
    from distilled.eval.tasks import load_task
    from distilled.verify import judge

    ours = [1.0 if judge(g, gold, None, kind).correct else 0.0 for g, gold, kind in CASES]
    assert 0 < sum(ours) < len(ours)
    gpqa = [{"Question": f"Q{i}?", "Correct Answer": f"yes {i}", "Incorrect Answer 1": f"no1 {i}",
             "Incorrect Answer 2": f"no2 {i}", "Incorrect Answer 3": f"no3 {i}"} for i in range(6)]
    math_rows = [{"problem": "What is $1+1$?", "answer": "2"}]
    code = LOAD_TASK_FILE + """
data = json.load(sys.stdin)
scores = [lt.score_output(g, gold, kind) for g, gold, kind in data["cases"]]
gq = [lt.gpqa_doc(r) for r in data["gpqa"]]
mq = [lt.math_doc(r) for r in data["math"]]
print(json.dumps({"scores": scores, "gpqa": [[d.query, d.gold_index] for d in gq],
                  "math": [[d.query, d.get_golds()[0]] for d in mq],
                  "names": [c.name for c in lt.TASKS_TABLE], "version": lt.PROMPT_VERSION}))
"""
    got = eval_env_run(code, {"cases": CASES, "gpqa": gpqa, "math": math_rows}, env={"DISTILLED_EVAL_SEED": "3"})
    disagree = [(c, o, t) for c, o, t in zip(CASES, ours, got["scores"]) if o != t]
    assert not disagree, f"scorers disagree on: {disagree}"
    assert got["names"] == ["distilled_math_500", "distilled_aime24", "distilled_aime25", "distilled_gpqa_diamond"]
    # same prompts (and the same seeded GPQA shuffle) as `distill eval --seed 3`
    (tmp_path / "gpqa_diamond.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gpqa))
    (tmp_path / "math500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in math_rows))
    problems = load_task("gpqa_diamond", data_dir=tmp_path, seed=3).problems
    assert [[p.user_prompt, p.meta["gold_index"]] for p in problems] == got["gpqa"]
    m = load_task("math_500", data_dir=tmp_path).problems[0]
    assert got["math"] == [[m.user_prompt, "2"]]


@needs_eval_env
@pytest.mark.slow
def test_accelerate_backend_scores_tiny_model(tiny_qwen2_dir, tmp_path):
    """`lighteval accelerate` (through the offline-safe launcher) on 3 problems: it must load the
    task file, use our prompt, and score each output exactly as distill's verifier does."""
    from distilled.eval.tasks import math_prompt
    from distilled.verify import judge

    rows = [{"problem": "What is $2+3$?", "answer": "5"}, {"problem": "What is $\\frac{1}{2}+\\frac{1}{2}$?",
                                                           "answer": "1"},
            {"problem": "Compute $3 \\cdot 4$.", "answer": "12"}]
    data = tmp_path / "data"
    data.mkdir()
    (data / "math500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "lighteval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DISTILLED_EVAL_DATA_DIR": str(data),
           "DISTILLED_EVAL_MAX_NEW_TOKENS": "8", "TMPDIR": str(tmp_path)}
    cmd = [str(EVAL_PY), str(TASK_FILE), "accelerate",
           f"model_name={tiny_qwen2_dir},dtype=float32,batch_size=3,generation_parameters={{temperature:0.0,max_new_tokens:8}}",
           "distilled_math_500@n=1|0", "--custom-tasks", str(TASK_FILE), "--output-dir", str(out), "--save-details",
           "--max-samples", "3"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    [results_file] = glob.glob(str(out / "results" / "**" / "results_*.json"), recursive=True)
    results = json.loads(Path(results_file).read_text())
    assert "distilled_pass@1" in results["results"]["distilled_math_500|0"]
    [details] = glob.glob(str(out / "details" / "**" / "*.parquet"), recursive=True)
    # the details parquet is written by .venv-eval's newer pyarrow: read it there
    code = ("import json, sys, pyarrow.parquet as pq\n"
            "rows = pq.read_table(json.load(sys.stdin)).to_pylist()\n"
            "print(json.dumps(rows, default=str))")
    recs = eval_env_run(code, details)
    assert len(recs) == 3
    prompts = {math_prompt(r["problem"]): r["answer"] for r in rows}
    total = 0.0
    for rec in recs:
        doc = rec["doc"] if isinstance(rec["doc"], dict) else json.loads(rec["doc"])
        resp = rec["model_response"] if isinstance(rec["model_response"], dict) else json.loads(rec["model_response"])
        metric = rec["metric"] if isinstance(rec["metric"], dict) else json.loads(rec["metric"])
        assert doc["query"] in prompts  # our pinned prompt, verbatim
        [text] = resp["text"]
        assert len(resp["output_tokens"][0]) <= 8
        ours = 1.0 if judge(text, prompts[doc["query"]]).correct else 0.0
        assert metric["distilled_pass@1"] == ours
        total += ours
    assert results["results"]["distilled_math_500|0"]["distilled_pass@1"] == pytest.approx(total / 3)


# Planted samples (output, gold, finish_reason, kind) for the one scoring rule of issue 13 item 3.
PLANTED = [
    ("<think>2+2 is 4</think>\nThe answer is $\\boxed{4}$ and to double-check we", "4", "length", "math"),  # cut after
    ("<think>2+2 is 4, so \\boxed{4} is", "4", "length", "math"),  # cut inside the reasoning
    ("<think>2+2 is 5</think>\nThe answer is $\\boxed{5}$.", "4", "stop", "math"),  # closed, wrong
    ("<think>2+2</think>\nI cannot tell.", "4", "stop", "math"),  # closed, no answer
    ("<think>2+2 is 4</think>\nThe answer is $\\boxed{4}$.", "4", "stop", "math"),  # closed, right
    ("<think>it is B</think>\nAnswer: B and also", "B", "length", "choice"),  # choice, cut after </think>
    ("<think>Answer: B", "B", "length", "choice"),  # choice, cut inside
]
PLANTED_WANT = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def _eval_verdicts() -> list[float]:
    from distilled.eval.runner import score_samples
    from distilled.verify import VerifierPool

    with VerifierPool(workers=1) as pool:
        return [1.0 if v.correct else 0.0 for v in score_samples(pool, PLANTED)]


def test_distill_eval_scores_answers_after_closed_reasoning_even_when_truncated():
    """`distill eval`'s rule (shared with the task file): truncation after </think> is scored on
    the answer; truncation inside the reasoning is 0. Runs without .venv-eval."""
    assert _eval_verdicts() == PLANTED_WANT


@needs_eval_env
@pytest.mark.slow  # importing lighteval in .venv-eval takes ~30 s on 2 busy cores
def test_distill_eval_and_lighteval_task_file_give_identical_verdicts_on_planted_samples():
    ours = _eval_verdicts()
    code = LOAD_TASK_FILE + """
data = json.load(sys.stdin)
print(json.dumps([lt.score_output(g, gold, kind) for g, gold, _finish, kind in data]))
"""
    theirs = eval_env_run(code, PLANTED)  # lighteval has no finish_reason: it scores the text
    assert ours == theirs == PLANTED_WANT, list(zip(PLANTED, ours, theirs))
