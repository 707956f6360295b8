"""`distill eval --engine transformers` on the tiny random Qwen2 (real tokenizer, real torch), and
s1 budget forcing: the token accounting of --max-think-tokens / --min-think-tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from distilled.eval.engines import (THINK_CLOSE, BudgetConfig, Segment, budget_machine, classify_ids,
                                    drive_machines)
from distilled.eval.runner import EvalConfig, EvalError, run_eval
from distilled.generate.problems import synth


@pytest.fixture()
def problems_file(tmp_path):
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synth(3, seed=2, split="test")))
    return path


def read_lines(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


# --- the state machine on scripted segments (fast, exact) ------------------------------------------

def scripted(segments):
    """A step runner that answers each step with the next scripted (ids, end) and records limits."""
    seen = []

    def run(steps):
        out = []
        for s in steps:
            ids, end = segments.pop(0)
            ids = ids[: s.limit]
            if end == "length" or len(ids) == s.limit and end != "close":
                end = "length" if len(ids) == s.limit else end
            seen.append((s.limit, s.stop_at_close, len(s.ids)))
            out.append(Segment(ids, "x" * len(ids), len(ids), end))
        return out

    return run, seen


def encode(text):
    return [7] * max(1, len(text.split()))


def test_machine_forces_close_at_max_think():
    run, seen = scripted([(list(range(100)), "length"), ([5, 5, 5], "eos")])
    [res] = drive_machines([budget_machine([1, 2], "", 50, BudgetConfig(max_think=10), encode)], run)
    assert res.think_tokens == 10 and res.forced_close and res.waits == 0
    n_close = len(encode(BudgetConfig().close_text))
    assert res.completion_tokens == 10 + n_close + 3 and res.finish_reason == "stop"
    assert seen[0] == (10, True, 2)  # first step limited by the think budget
    assert seen[1] == (50 - 10 - n_close, False, 2 + 10 + n_close)  # answer gets what is left


def test_machine_replaces_early_close_with_wait():
    run, seen = scripted([([1] * 3, "close"), ([1] * 4, "close"), ([1] * 6, "close"), ([9] * 2, "eos")])
    [res] = drive_machines([budget_machine([0], "", 100, BudgetConfig(min_think=10), encode)], run)
    assert res.waits == 2 and not res.forced_close
    assert res.think_tokens == 3 + 1 + 4 + 1 + 6  # Wait tokens count as thinking
    assert res.completion_tokens == res.think_tokens + len(encode(THINK_CLOSE)) + 2


def test_machine_respects_max_tokens_overall():
    run, _ = scripted([([1] * 30, "length")])
    [res] = drive_machines([budget_machine([0], "", 30, BudgetConfig(min_think=5, max_think=100), encode)], run)
    assert res.finish_reason == "length" and res.completion_tokens == 30 and not res.forced_close


def test_classify_ids_cuts_at_think_close(qwen_tokenizer):
    tok = qwen_tokenizer
    ids = tok.encode("so 2+2=4.</think>\n\nThe answer", add_special_tokens=False)
    seg = classify_ids(ids, 100, {tok.eos_token_id}, lambda x: tok.decode(x, skip_special_tokens=True), True)
    assert seg.end == "close"
    assert seg.text + seg.tail == "so 2+2=4."
    assert tok.decode(seg.ids) == seg.text and seg.n_tokens == len(seg.ids)
    seg = classify_ids(ids + [tok.eos_token_id, 5, 5], 100, {tok.eos_token_id}, tok.decode, False)
    assert seg.end == "eos" and seg.n_tokens == len(ids)
    seg = classify_ids(ids, len(ids), {tok.eos_token_id}, tok.decode, False)
    assert seg.end == "length"


# --- the real engine on the tiny model ------------------------------------------------------------

def cfg(model_dir, problems_file, out, **kw) -> EvalConfig:
    base = dict(tasks=["synth"], task_file=str(problems_file), engine="transformers", model=str(model_dir), n=2,
                output=str(out), max_tokens=8, batch_size=4, verify_workers=1, temperature=0.6)
    base.update(kw)
    return EvalConfig(**base)


@pytest.mark.slow
def test_transformers_engine_eval_and_determinism(tiny_qwen2_dir, problems_file, tmp_path):
    res = run_eval(cfg(tiny_qwen2_dir, problems_file, tmp_path / "a"))
    recs = read_lines(tmp_path / "a" / "samples.jsonl")
    assert len(recs) == 6
    for r in recs:
        # a random model never stops by itself within 8 tokens: every sample is truncated; with no
        # think tags the whole text is the answer (eval_tasks.SCORING_RULE), and it is no answer
        assert r["finish_reason"] == "length" and r["completion_tokens"] == 8
        assert r["reason"] in ("no_answer", "wrong_answer", "unfinished")
        assert r["prompt_tokens"] > 20
    m = res["tasks"]["synth"]
    assert m["pass@1"] == 0 and m["truncated_pct"] == 100 and m["unanswered_pct"] == 0
    # same seed -> same samples; greedy -> both samples of a problem are identical
    run_eval(cfg(tiny_qwen2_dir, problems_file, tmp_path / "b"))
    assert [r["output"] for r in read_lines(tmp_path / "b" / "samples.jsonl")] == [r["output"] for r in recs]
    run_eval(cfg(tiny_qwen2_dir, problems_file, tmp_path / "g", temperature=0.0))
    g = read_lines(tmp_path / "g" / "samples.jsonl")
    assert g[0]["output"] == g[1]["output"] and g[0]["problem_id"] == g[1]["problem_id"]
    assert len({r["output"] for r in recs}) > 3  # sampling differs between samples
    with pytest.raises(EvalError, match="no config.json"):
        run_eval(cfg(tmp_path, problems_file, tmp_path / "c"))


class ForceCloseAfter:
    """Logits processor that makes the model write ``</think>`` after ``k`` tokens of each
    generate call (a model that wants to stop thinking early). Budget forcing must undo it."""

    def __init__(self, close_ids: list[int], k: int):
        self.close_ids, self.k = close_ids, k
        self.start = self.last = None

    def __call__(self, input_ids, scores):
        cur = input_ids.shape[1]
        if self.last is None or cur != self.last + 1:
            self.start = cur  # a new generate call
        self.last = cur
        j = cur - self.start - self.k
        if 0 <= j < len(self.close_ids):
            scores[:] = float("-inf")
            scores[:, self.close_ids[j]] = 0.0
        return scores


@pytest.mark.slow
def test_budget_forcing_token_accounting(tiny_qwen2_dir, problems_file, tmp_path, qwen_tokenizer):
    tok = qwen_tokenizer
    wait_n = len(tok.encode("Wait", add_special_tokens=False))
    close_n = len(tok.encode("\n</think>\n\n", add_special_tokens=False))
    # max: a random model never closes its thinking; it is cut at exactly B and </think> forced
    # greedy: top-p sampling sorts the 152k-token vocabulary at every step, slow on 2 shared cores
    res = run_eval(cfg(tiny_qwen2_dir, problems_file, tmp_path / "max", max_tokens=30, max_think_tokens=9, n=1,
                       temperature=0.0))
    for r in read_lines(tmp_path / "max" / "samples.jsonl"):
        assert r["think_tokens"] == 9 and r["budget"] == {"waits": 0, "forced_close": True}
        assert r["completion_tokens"] == 30 and r["finish_reason"] == "length"
        think, sep, _ = r["output"].partition("</think>")
        assert sep and "\n</think>\n\n" in r["output"]
    assert res["tasks"]["synth"]["budget_forced_close"] == 3
    assert "max_think_tokens 9" in (tmp_path / "max" / "report.md").read_text()
    # min: the processor closes the thinking after 3 tokens each time; "Wait" replaces it until A
    close_ids = tok.encode(THINK_CLOSE, add_special_tokens=False)
    proc = ForceCloseAfter(close_ids, 3)
    run_eval(cfg(tiny_qwen2_dir, problems_file, tmp_path / "min", max_tokens=40, min_think_tokens=10, n=1,
                 batch_size=1, limit=2, temperature=0.0), logits_processor=proc)
    for r in read_lines(tmp_path / "min" / "samples.jsonl"):
        # 3 + Wait + 3 + Wait + 3 (+ Wait + 3 ...) until >= 10, then the model's </think> is kept
        think, waits = 3, 0
        while think < 10:
            think += wait_n + 3
            waits += 1
        assert r["budget"] == {"waits": waits, "forced_close": False}
        assert r["think_tokens"] == think
        body, sep, answer = r["output"].partition(THINK_CLOSE)
        assert sep and body.count("Wait") >= waits
        assert r["completion_tokens"] <= 40
        # the answer phase (3 tokens, then the processor writes </think> again, then free tokens)
        assert r["completion_tokens"] == 40 and r["finish_reason"] == "length"
    assert close_n >= 1


def test_vllm_engine_missing_is_a_clear_error(problems_file, tmp_path):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    with pytest.raises(EvalError, match=r"needs the vllm package.*pip install vllm"):
        run_eval(cfg(tmp_path, problems_file, tmp_path / "v", engine="vllm"))
    assert not (tmp_path / "v").exists()  # nothing was started or written


def test_budget_flags_are_checked(problems_file, tmp_path):
    with pytest.raises(EvalError, match="--min-think-tokens 20 > --max-think-tokens 10"):
        run_eval(cfg(tmp_path, problems_file, tmp_path / "x", min_think_tokens=20, max_think_tokens=10))


def test_machine_never_lets_wait_overrun_the_think_budget():
    # Wait is 2 tokens here; at think=9 with B=10 it would overrun: the thinking is closed instead
    def enc(text):
        return [7] * (2 if text.endswith("Wait") else max(1, len(text.split())))

    run, _ = scripted([([1] * 9, "close"), ([2] * 3, "eos")])
    [res] = drive_machines([budget_machine([0], "", 100, BudgetConfig(min_think=10, max_think=10), enc)], run)
    assert res.think_tokens == 9 and res.waits == 0 and res.forced_close
    run, _ = scripted([([1] * 5, "close"), ([1] * 3, "length"), ([2] * 3, "eos")])
    [res] = drive_machines([budget_machine([0], "", 100, BudgetConfig(min_think=10, max_think=10), enc)], run)
    assert res.waits == 1 and res.think_tokens == 10 and res.forced_close


@pytest.mark.slow
def test_resumed_sampled_run_reproduces_an_uninterrupted_one(tiny_qwen2_dir, problems_file, tmp_path):
    """Issue 13 item 6: each sample draws from its own generator (seeded with the seed logged in
    samples.jsonl), so neither its batch-mates nor where a resumed run's batches start change it."""
    kw = dict(n=3, temperature=0.8, top_p=0.9, max_tokens=6)
    full = run_eval(cfg(tiny_qwen2_dir, problems_file, tmp_path / "full", **kw))
    run_eval(cfg(tiny_qwen2_dir, problems_file, tmp_path / "part", **kw), stop_after=5)  # interrupted
    assert len(read_lines(tmp_path / "part" / "samples.jsonl")) == 5
    resumed = run_eval(cfg(tiny_qwen2_dir, problems_file, tmp_path / "part", **kw))
    assert resumed["new_samples"] == 9 - 5
    one = run_eval(cfg(tiny_qwen2_dir, problems_file, tmp_path / "one", batch_size=1, **kw))  # no batch-mates

    def by_key(d):
        return {(r["problem_id"], r["sample_index"]): (r["output"], r["seed"]) for r in read_lines(d / "samples.jsonl")}

    a, b, c = by_key(tmp_path / "full"), by_key(tmp_path / "part"), by_key(tmp_path / "one")
    assert len(a) == 9 and a == b == c
    assert len({o for o, _ in a.values()}) > 1  # really sampled: the samples differ
    assert resumed["tasks"] == full["tasks"]
