"""KD capture end to end against the real stand-in teacher on 127.0.0.1: `distill generate
--top-logprobs` writes the sidecar beside the JSONL (resume after a torn tail stores nothing twice),
`distill score-teacher` scores existing traces through /v1/completions echo + logprobs, and a
teacher with another vocabulary is refused naming the position."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from distilled.generate.runner import GenerateConfig, run_generate
from distilled.kd.logprobs import StudentVocab, check_sampled
from distilled.kd.sidecar import SidecarReader, sidecar_path
from distilled.generate.problems import synth
from distilled.generate.teacher_server import TeacherConfig, start_in_thread

K = 6


@pytest.fixture(scope="module")
def srv(qwen_tokenizer_dir):
    s = start_in_thread(TeacherConfig(wrong_rate=0.2, latency_ms=1, seed=0, tokenizer=str(qwen_tokenizer_dir)))
    yield s
    s.stop()


def _cfg(tmp_path, srv, tok_dir, **kw) -> GenerateConfig:
    base = dict(dataset_name=str(tmp_path / "p.jsonl"), output_file=str(tmp_path / "out.jsonl"),
                endpoints=[srv.addr], model="stand-in-teacher", uuid_column="id", num_generations=2,
                max_tokens=1000, max_concurrent=8, backoff_base=0.01, request_timeout=10, seed=1, progress=False,
                top_logprobs=K, tokenizer=str(tok_dir))
    base.update(kw)
    return GenerateConfig(**base)


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def test_generate_top_logprobs_writes_sidecar_and_resumes(tmp_path, srv, qwen_tokenizer_dir, qwen_tokenizer):
    probs = synth(8, seed=3)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in probs))
    s = asyncio.run(run_generate(_cfg(tmp_path, srv, qwen_tokenizer_dir, limit=5)))
    assert s.written == 5
    out = tmp_path / "out.jsonl"
    side = sidecar_path(out)
    good = side.read_bytes()
    vocab = StudentVocab(qwen_tokenizer)
    with SidecarReader(side, verify="all") as r:
        assert len(r) == 10 and r.k == K
        for row in _rows(out):
            for g, text in enumerate(row["generations"]):
                rec = r.get(row["problem_key"], g)
                assert check_sampled(text, rec.sampled_ids, vocab) == rec.n_tokens - 1  # + closing <|im_end|>
                assert rec.sampled_ids[-1] == 151645
                assert (np.exp(rec.topk_logprobs.astype(np.float64)).sum(1) < 1.001).all()
    # a kill -9 after problem 6's first record was written, in the middle of its second record,
    # before its JSONL line was complete
    from distilled.kd.sidecar import encode_record
    from distilled.kd.standin import synth_top_logprobs

    sixth = probs[5]["id"]
    rec = synth_top_logprobs(qwen_tokenizer.encode("An answer.", add_special_tokens=False), K, 0)
    with open(side, "ab") as f:
        f.write(encode_record(sixth, 0, rec))
        f.write(encode_record(sixth, 1, rec)[:40])
    with open(out, "ab") as f:
        f.write(b'{"id": "half a li')
    s2 = asyncio.run(run_generate(_cfg(tmp_path, srv, qwen_tokenizer_dir)))
    assert s2.already_done == 5 and s2.written == 3
    assert side.read_bytes().startswith(good)
    with SidecarReader(side, verify="all") as r:  # a duplicate key would raise here
        assert len(r) == 16
        assert {k for k, _ in r.index} == {row["problem_key"] for row in _rows(out)}


def test_generate_refuses_a_teacher_with_another_vocabulary(tmp_path, qwen_tokenizer_dir):
    """The student uses a 2048-token trimmed Qwen2.5 vocabulary; the teacher the full one."""
    from distilled.data.tokenizer import build_qwen2_5_tokenizer

    trimmed = build_qwen2_5_tokenizer(tmp_path / "trim", bpe_tokens=2048)
    s = start_in_thread(TeacherConfig(latency_ms=1, seed=0, tokenizer=str(qwen_tokenizer_dir)))
    try:
        (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synth(3, seed=1)))
        summ = asyncio.run(run_generate(_cfg(tmp_path, s, trimmed, num_generations=1)))
        assert summ.fatal and "not a token of the student's vocabulary" in summ.fatal and "token" in summ.fatal
        assert summ.written == 0
    finally:
        s.stop()


def test_score_teacher_scores_existing_traces(tmp_path, srv, qwen_tokenizer_dir, qwen_tokenizer):
    from distilled.kd.score import ScoreConfig, run_score

    vocab = StudentVocab(qwen_tokenizer)
    rows = []
    for i, p in enumerate(synth(6, seed=5)):
        ans = f"<think>\nLet me compute. Step {i}.\n</think>\n\nThe answer is $\\boxed{{{i}}}$."
        rows.append({"problem_key": p["id"], "kept_generation_index": i % 2,
                     "messages": [{"role": "user", "content": p["problem"]}, {"role": "assistant", "content": ans}]})
    src = tmp_path / "verified.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ScoreConfig(input=str(src), output=str(tmp_path / "scored.topk.bin"), endpoints=[srv.addr],
                      tokenizer=str(qwen_tokenizer_dir), top_logprobs=K, model="stand-in-teacher", progress=False)
    s = asyncio.run(run_score(cfg))
    assert s["scored"] == 6 and s["failed"] == 0 and s["fatal"] is None
    with SidecarReader(tmp_path / "scored.topk.bin", verify="all") as r:
        for row in rows:
            rec = r.get(row["problem_key"], row["kept_generation_index"])
            ans = row["messages"][-1]["content"]
            np.testing.assert_array_equal(rec.sampled_ids, qwen_tokenizer.encode(ans, add_special_tokens=False))
            assert check_sampled(ans, rec.sampled_ids, vocab) == rec.n_tokens
    s2 = asyncio.run(run_score(cfg))  # resumable: nothing left to score
    assert s2["to_score"] == 0 and s2["already_done"] == 6


def test_score_teacher_cli_scores_every_generation_with_the_system_prompt(tmp_path, srv, qwen_tokenizer_dir,
                                                                          qwen_tokenizer):
    """`distill score-teacher --generations-column`: one sidecar record per generation; the prompt is
    [system, user] (the shared message build), a row without the columns is skipped with a warning."""
    from distilled.cli import main
    from distilled.kd.score import ScoreConfig, _items

    rows = [{"problem_key": p["id"], "prompt": p["problem"],
             "generations": [f"<think>\nTry {g}.\n</think>\n\nSo $\\boxed{{{i + g}}}$." for g in range(2)]}
            for i, p in enumerate(synth(3, seed=7))]
    src = tmp_path / "generations.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"problem_key": "x"}) + "\n")
    out = tmp_path / "gens.topk.bin"
    argv = ["score-teacher", "--input", str(src), "--output", str(out), "--tokenizer", str(qwen_tokenizer_dir),
            "--top-logprobs", str(K), "--model", "stand-in-teacher", "--api-addr", srv.addr,
            "--generations-column", "generations", "--system-prompt", "Be brief.", "--no-progress"]
    assert main(argv) == 0
    with SidecarReader(out, verify="all") as r:
        for row in rows:
            for g, ans in enumerate(row["generations"]):
                np.testing.assert_array_equal(r.get(row["problem_key"], g).sampled_ids,
                                              qwen_tokenizer.encode(ans, add_special_tokens=False))
    warnings: list[str] = []
    cfg = ScoreConfig(input=str(src), output=str(out), tokenizer="qwen2.5", generations_column="generations",
                      system_prompt="Be brief.")
    items = list(_items(cfg, warnings.append))
    assert cfg.endpoints == ["localhost:39876"]  # no --api-addr/--base-url: the documented default
    assert len(items) == 6 and items[0].messages == [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": rows[0]["prompt"]}]
    assert len(warnings) == 1 and "generations.jsonl:4" in warnings[0]
