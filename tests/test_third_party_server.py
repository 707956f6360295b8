"""The project's clients against a real third-party OpenAI-compatible server, not only the stand-in:
`transformers serve` (transformers 5.x, `.venv-serve`) serving a tiny random Qwen2 saved with the
real Qwen2.5 tokenizer on 127.0.0.1. It validates request fields against the OpenAI schema
(HTTP 422 "Unexpected fields in the request" on anything else, e.g. vLLM's
`include_stop_str_in_output`), streams without `data: [DONE]`, and sends usage in the last chunk.
One server is started for the module (~30 s on 2 cores) and stopped at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distilled.generate.problems import synth
from serve_helpers import REPO, require_serve_env, transformers_serve

pytestmark = pytest.mark.slow

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def served(tiny_qwen2_dir, tmp_path_factory):
    require_serve_env()
    log = tmp_path_factory.mktemp("serve") / "transformers_serve.log"
    with transformers_serve(tiny_qwen2_dir, log) as s:
        yield s
        assert s.proc.poll() is None, f"transformers serve died during the tests:\n{s.log_tail()}"


def distill(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distilled", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def rows(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_generate_plain_and_streamed_give_the_same_rows(served, tmp_path):
    """`distill generate` with and without --stream: every request is accepted (standard fields
    only), the server's usage is recorded, and with a seed both ways return the same text, so the
    streamed answer was reassembled exactly."""
    probs = [{"id": p["id"], "problem": p["problem"]} for p in synth(3, seed=21)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probs))
    outs = {}
    for mode in ("plain", "stream"):
        out = tmp_path / f"{mode}.jsonl"
        r = distill("generate", "--model", served.model, "--dataset-name", str(tmp_path / "p.jsonl"),
                    "--output-file", str(out), "--uuid-column", "id", "--api-addr", served.addr,
                    "--num-generations", "2", "--max-tokens", str(MAX_TOKENS), "--max-concurrent", "2",
                    "--seed", "7", "--max-retries", "1", "--no-progress", *(["--stream"] if mode == "stream" else []))
        assert r.returncode == 0, r.stdout + r.stderr + served.log_tail()
        assert "3/3 problems done" in r.stdout and "0 failed generations" in r.stdout
        assert "counted from chunks" not in r.stdout  # transformers serve sends usage in the last chunk
        got = rows(out)
        assert sorted(x["problem_key"] for x in got) == sorted(p["id"] for p in probs)
        for x in got:
            assert len(x["generations"]) == 2 and all(isinstance(g, str) and g for g in x["generations"])
            for fr, meta in zip(x["finish_reasons"], x["api_metadata"]):
                assert fr in ("length", "stop") and "usage_source" not in meta
                assert 0 < meta["completion_tokens"] <= MAX_TOKENS and meta["prompt_tokens"] > 0
                if fr == "length":
                    assert meta["completion_tokens"] == MAX_TOKENS
        outs[mode] = {x["id"]: (x["generations"], x["finish_reasons"], x["api_metadata"]) for x in got}
    assert outs["stream"] == outs["plain"]


def eval_args(served, tmp_path: Path, out: str, *extra: str) -> list[str]:
    probs = synth(3, seed=22, split="test")
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probs))
    return ["eval", "--engine", "openai", "--tasks", "synth", "--task-file", str(tmp_path / "held.jsonl"),
            "--api-addr", served.addr, "--model-name", served.model, "--n", "2", "--max-tokens", str(MAX_TOKENS),
            "--max-concurrent", "2", "--max-retries", "1", "--verify-workers", "1", "--output", str(tmp_path / out),
            *extra]


def test_eval_openai_engine(served, tmp_path):
    r = distill(*eval_args(served, tmp_path, "ev"))
    assert r.returncode == 0, r.stdout + r.stderr + served.log_tail()
    recs = rows(tmp_path / "ev" / "samples.jsonl")
    assert len(recs) == 3 * 2
    assert all(x["finish_reason"] in ("length", "stop") and 0 < x["completion_tokens"] <= MAX_TOKENS for x in recs)
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert res["tasks"]["synth"]["samples"] == 6


def test_eval_budget_forcing(served, tmp_path):
    """Budget forcing continues through /v1/completions. It must send only OpenAI fields:
    transformers serve answers 422 to vLLM's include_stop_str_in_output."""
    r = distill(*eval_args(served, tmp_path, "bf", "--min-think-tokens", "2", "--max-think-tokens", "6",
                           "--tokenizer", served.model))
    assert "Unexpected fields" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert r.returncode == 0, r.stdout + r.stderr + served.log_tail()
    recs = rows(tmp_path / "bf" / "samples.jsonl")
    assert len(recs) == 6
    for x in recs:  # a random model never closes its thinking: the budget closes it, once, at 6 tokens
        assert x["budget"]["forced_close"] is True and x["think_tokens"] == 6
        assert x["output"].count("</think>") == 1
    res = json.loads((tmp_path / "bf" / "results.json").read_text())
    assert res["budget"] == {"min_think_tokens": 2, "max_think_tokens": 6}
