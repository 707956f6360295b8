"""`distill eval --engine openai` against the built-in teacher on 127.0.0.1: metrics from the real
verifier, resume after an interruption (in process and a killed subprocess), bad input before any
generation, reports and `eval compare`, budget forcing through /v1/completions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distilled.eval.metrics import pass_at_k
from distilled.eval.runner import EvalConfig, EvalError, compare, run_eval
from distilled.generate.problems import synth
from distilled.generate.teacher_server import TeacherConfig, start_in_thread

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher():
    srv = start_in_thread(TeacherConfig(latency_ms=2, latency_dist="fixed", wrong_rate=0.35, seed=3))
    yield srv
    srv.stop()


@pytest.fixture()
def problems_file(tmp_path):
    path = tmp_path / "held_out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synth(6, seed=5, split="test")))
    return path


def cfg_for(teacher, problems_file, out, **kw) -> EvalConfig:
    base = dict(tasks=["synth"], task_file=str(problems_file), engine="openai", api_addr=[teacher.addr],
                model_name="stand-in-teacher", n=4, output=str(out), max_tokens=4000, max_concurrent=8,
                verify_workers=1)
    base.update(kw)
    return EvalConfig(**base)


def read_lines(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_openai_eval_metrics_match_logged_verdicts(teacher, problems_file, tmp_path):
    res = run_eval(cfg_for(teacher, problems_file, tmp_path / "run"))
    recs = read_lines(tmp_path / "run" / "samples.jsonl")
    assert len(recs) == 6 * 4
    assert {(r["problem_id"], r["sample_index"]) for r in recs} == {(p["id"], s) for p in synth(6, 5, "test")
                                                                    for s in range(4)}
    # every record holds the prompt, output, extracted answer and verdict
    r0 = recs[0]
    assert r0["prompt"][-1]["role"] == "user" and "Solve the following math problem" in r0["prompt"][-1]["content"]
    assert "<think>" in r0["output"] and r0["reason"] in ("correct", "wrong_answer")
    assert r0["extracted"] is not None
    m = res["tasks"]["synth"]
    by_problem: dict[str, list[bool]] = {}
    for r in recs:
        by_problem.setdefault(r["problem_id"], []).append(r["correct"])
        assert r["correct"] == (r["extracted"] == r["gold"])  # the stand-in answers integers
    per = [sum(v) / 4 for v in by_problem.values()]
    assert m["pass@1"] == pytest.approx(100 * sum(per) / 6)
    assert m["pass@2"] == pytest.approx(100 * sum(pass_at_k(4, sum(v), 2) for v in by_problem.values()) / 6)
    assert 0 < m["pass@1"] < 100  # wrong_rate 0.35: some right, some wrong
    assert m["truncated_pct"] == 0 and m["unanswered_pct"] == 0
    # cons@4: majority of extracted answers per problem
    cons = 0
    for pid, _ in by_problem.items():
        answers = [r["extracted"] for r in recs if r["problem_id"] == pid]
        best = max(set(answers), key=lambda a: (answers.count(a), -answers.index(a)))
        cons += best == next(r["gold"] for r in recs if r["problem_id"] == pid)
    assert m["cons@4"] == pytest.approx(100 * cons / 6)
    out = tmp_path / "run"
    results = json.loads((out / "results.json").read_text())
    assert results["prompt_version"].startswith("distilled-eval-v1") and results["budget"] is None
    report = (out / "report.md").read_text()
    assert "| model | synth |" in report and "stand-in-teacher" in report and f"{m['pass@1']:.1f} ±" in report
    assert (out / "pass_at_1.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_after_interruption_and_torn_tail(teacher, problems_file, tmp_path):
    full = tmp_path / "full"
    run_eval(cfg_for(teacher, problems_file, full))
    part = tmp_path / "part"
    run_eval(cfg_for(teacher, problems_file, part), stop_after=9)
    assert len(read_lines(part / "samples.jsonl")) == 9
    with open(part / "samples.jsonl", "a") as f:  # a kill -9 in the middle of a write
        f.write('{"task": "synth", "problem_id": "torn')
    before = teacher.stats()["requests"]
    res = run_eval(cfg_for(teacher, problems_file, part))
    assert teacher.stats()["requests"] - before == 24 - 9  # only the missing samples were generated
    assert res["new_samples"] == 15
    a = {(r["problem_id"], r["sample_index"]): r["output"] for r in read_lines(full / "samples.jsonl")}
    b = {(r["problem_id"], r["sample_index"]): r["output"] for r in read_lines(part / "samples.jsonl")}
    assert len(read_lines(part / "samples.jsonl")) == 24 and a == b  # same seeds: same samples
    assert json.loads((part / "results.json").read_text())["tasks"] == \
        {k: v for k, v in json.loads((full / "results.json").read_text())["tasks"].items()}
    # a second resume has nothing to do
    before = teacher.stats()["requests"]
    assert run_eval(cfg_for(teacher, problems_file, part))["new_samples"] == 0
    assert teacher.stats()["requests"] == before


def test_resume_refuses_other_settings(teacher, problems_file, tmp_path):
    run_eval(cfg_for(teacher, problems_file, tmp_path / "r"), stop_after=2)
    with pytest.raises(EvalError, match=r"other settings \(temperature: 0.6 -> 0.0\)"):
        run_eval(cfg_for(teacher, problems_file, tmp_path / "r", temperature=0.0))


def test_bad_input_fails_before_any_generation(teacher, problems_file, tmp_path):
    out = tmp_path / "bad"
    before = teacher.stats()["requests"]
    with pytest.raises(EvalError, match="unknown task 'math501'"):
        run_eval(cfg_for(teacher, problems_file, out, tasks=["synth,math501"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "problem": "1+1?", "answer": "2"}\n{"id": "b", "problem": "2+2?"}\n')
    with pytest.raises(EvalError, match=r"bad.jsonl:2: field 'answer' is missing"):
        run_eval(cfg_for(teacher, bad, out))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EvalError, match="is empty"):
        run_eval(cfg_for(teacher, empty, out))
    with pytest.raises(EvalError, match="cannot reach the OpenAI-compatible server"):
        run_eval(cfg_for(teacher, problems_file, out, api_addr=["127.0.0.1:9"]))
    with pytest.raises(EvalError, match="needs --api-addr"):
        run_eval(cfg_for(teacher, problems_file, out, api_addr=[]))
    assert teacher.stats()["requests"] == before
    assert not (out / "samples.jsonl").exists()


def test_cli_and_compare(teacher, problems_file, tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
    a, b = tmp_path / "base", tmp_path / "distilled"
    for out, seed in ((a, 0), (b, 1)):
        cmd = [sys.executable, "-m", "distilled", "eval", "--tasks", "synth", "--task-file", str(problems_file),
               "--engine", "openai", "--api-addr", teacher.addr, "--model-name", "stand-in-teacher", "--n", "2",
               "--max-tokens", "4000", "--output", str(out), "--seed", str(seed), "--verify-workers", "1"]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "eval stand-in-teacher: pass@1 synth" in p.stdout
    text = compare([str(a), str(b / "results.json")], reference=True, output=str(tmp_path / "cmp.md"))
    assert "| model | synth | math_500 | aime24 |" in text
    assert "stand-in-teacher (openai)" in text  # two runs of one model name are told apart
    assert "*DeepSeek-R1-Distill-Qwen-7B (R1 paper)* (reported) | - | 92.8 | 55.5 |" in text
    assert (tmp_path / "cmp.md").read_text() == text
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    p = subprocess.run([sys.executable, "-m", "distilled", "eval", "compare", str(tmp_path / "nothing")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2 and "no results.json" in p.stderr
    p = subprocess.run([sys.executable, "-m", "distilled", "eval", "--tasks", "aime24,bogus", "--api-addr", "x:1",
                        "--model-name", "m"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2 and "unknown task 'bogus'" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_killed_subprocess_resumes(problems_file, tmp_path):
    """A real interruption: SIGKILL the eval process mid-run, rerun, get every sample exactly once."""
    srv = start_in_thread(TeacherConfig(latency_ms=150, latency_dist="fixed", seed=3))
    try:
        out = tmp_path / "killed"
        cmd = [sys.executable, "-m", "distilled", "eval", "--tasks", "synth", "--task-file", str(problems_file),
               "--api-addr", srv.addr, "--model-name", "stand-in-teacher", "--n", "8", "--max-concurrent", "2",
               "--max-tokens", "4000", "--output", str(out), "--verify-workers", "1"]
        # its own session, so the kill below reaches the verifier worker it forks too (a SIGKILL of
        # the parent alone leaves that worker running)
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        samples = out / "samples.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline:
            if samples.exists() and len(samples.read_text().splitlines()) >= 6:
                break
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        got = len(read_lines(samples)) if samples.exists() else 0
        assert 0 < got < 48
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        recs = read_lines(samples)
        keys = [(r["problem_id"], r["sample_index"]) for r in recs]
        assert len(keys) == 48 and len(set(keys)) == 48
    finally:
        srv.stop()


@pytest.mark.slow  # loads the 150k-token tokenizer (~15 s on 2 busy cores)
def test_openai_budget_forcing_via_completions(teacher, problems_file, tmp_path, qwen_tokenizer_dir):
    """The stand-in teacher supports /v1/completions continuation: with a think budget the
    reasoning is cut (counted in the server's tokens) and </think> forced, and the answer still
    follows."""
    out = tmp_path / "bf"
    res = run_eval(cfg_for(teacher, problems_file, out, n=1, max_think_tokens=8, tokenizer=str(qwen_tokenizer_dir)))
    recs = read_lines(out / "samples.jsonl")
    assert len(recs) == 6
    for r in recs:
        assert r["budget"]["forced_close"] is True and r["think_tokens"] == 8
        think, _, answer = r["output"].partition("</think>")
        assert len(think.split()) <= 8 + 1  # server tokens are words; "<|im_start|>"-free prompt text
        assert "The final answer is" in answer
    assert res["budget"] == {"min_think_tokens": None, "max_think_tokens": 8}
    assert res["tasks"]["synth"]["budget_forced_close"] == 6
    assert "budget forcing (s1): min_think_tokens None, max_think_tokens 8" in (out / "report.md").read_text()
    with pytest.raises(EvalError, match="needs --tokenizer"):
        run_eval(cfg_for(teacher, problems_file, tmp_path / "bf2", max_think_tokens=8))


def test_gpqa_through_the_engine_records_the_shuffle(teacher, tmp_path):
    rows = [{"Record ID": f"r{i}", "Question": f"Which gas is {i}?", "Correct Answer": f"good {i}",
             "Incorrect Answer 1": f"bad1 {i}", "Incorrect Answer 2": f"bad2 {i}", "Incorrect Answer 3": f"bad3 {i}"}
            for i in range(3)]
    (tmp_path / "gpqa_diamond.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "g"
    # no --model-name: the server serves exactly one model, which is used
    res = run_eval(EvalConfig(tasks=["gpqa_diamond"], data_dir=str(tmp_path), engine="openai", api_addr=[teacher.addr],
                              n=2, output=str(out), max_tokens=2000, verify_workers=1, seed=4))
    assert res["model"] == "stand-in-teacher"
    m = res["tasks"]["gpqa_diamond"]
    recs = read_lines(out / "samples.jsonl")
    assert len(recs) == 6
    for r in recs:
        assert r["gold"] == "ABCD"[r["gold_index"]] and r["choices"][r["gold_index"]].startswith("good")
        assert f"{r['gold']}) good" in r["prompt"][-1]["content"]
        assert m["shuffle"]["gold_letters"][r["problem_id"]] == r["gold"]
    assert m["shuffle"]["seed"] == 4
    # the stand-in cannot answer GPQA: every sample is wrong or unanswered, never counted right
    assert m["pass@1"] == 0.0 and all(not r["correct"] for r in recs)


def test_raising_n_generates_only_the_extra_samples(teacher, problems_file, tmp_path):
    out = tmp_path / "grow"
    r2 = run_eval(cfg_for(teacher, problems_file, out, n=2))
    first = {(r["problem_id"], r["sample_index"]): r["output"] for r in read_lines(out / "samples.jsonl")}
    before = teacher.stats()["requests"]
    r4 = run_eval(cfg_for(teacher, problems_file, out, n=4))
    assert teacher.stats()["requests"] - before == 6 * 2
    recs = read_lines(out / "samples.jsonl")
    assert len(recs) == 24 and all(first[k] == o for k, o in
                                   (((r["problem_id"], r["sample_index"]), r["output"]) for r in recs) if k in first)
    assert r2["tasks"]["synth"]["n"] == 2 and r4["tasks"]["synth"]["n"] == 4 and "pass@4" in r4["tasks"]["synth"]


def test_fatal_server_error_stops_the_run(problems_file, tmp_path):
    srv = start_in_thread(TeacherConfig(latency_ms=1, max_tokens_cap=1000))
    try:
        with pytest.raises(EvalError, match=r"refused a request: .*max_tokens=4000 exceeds"):
            run_eval(cfg_for(srv, problems_file, tmp_path / "f"))
        assert srv.stats()["requests"] <= 16  # stopped at once, not after all 24 samples failed
    finally:
        srv.stop()


def test_failed_samples_count_as_wrong_and_are_reported(problems_file, tmp_path):
    """Issue 13 item 4: a problem with a failed sample is no longer dropped from pass@1 (that
    biased it upwards); the sample counts as wrong and the table, compare and CLI line say so.
    ``--skip-incomplete`` restores the old rule, labelled."""
    from distilled.eval.runner import render_report

    srv = start_in_thread(TeacherConfig(latency_ms=1, latency_dist="fixed", wrong_rate=0.3, seed=4,
                                        fault_rate=0.25, faults=("500",)))
    try:
        res = run_eval(cfg_for(srv, problems_file, tmp_path / "f", max_retries=0))
        recs = read_lines(tmp_path / "f" / "samples.jsonl")
        m = res["tasks"]["synth"]
        failed = 6 * 4 - len(recs)
        assert failed > 0 and res["failed_samples"] == failed == m["failed_samples"]
        assert m["problems"] == 6 and m["incomplete_policy"] == "scored_wrong"  # no problem dropped
        by_problem: dict = {}
        for r in recs:
            by_problem[r["problem_id"]] = by_problem.get(r["problem_id"], 0) + int(r["correct"])
        want = 100 * sum(by_problem.values()) / (6 * 4)  # every problem over its 4 requested samples
        assert m["pass@1"] == pytest.approx(want)
        note = f"{failed} failed samples scored wrong"
        headline = next(line for line in render_report(res).splitlines() if line.startswith("| stand-in-teacher |"))
        assert note in headline
        assert note in compare([str(tmp_path / "f")])

        # resume against a server that fails every request: the same samples, scored the old way
        down = start_in_thread(TeacherConfig(latency_ms=1, fault_rate=1.0, faults=("500",)))
        try:
            skipped = run_eval(cfg_for(down, problems_file, tmp_path / "f", max_retries=0, skip_incomplete=True))
        finally:
            down.stop()
        assert skipped["new_samples"] == 0
        ms = skipped["tasks"]["synth"]
        assert ms["incomplete_policy"] == "skipped" and ms["problems"] == 6 - ms["incomplete_problems"] < 6
        assert "skipped (--skip-incomplete)" in render_report(skipped)

        env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "distilled", "eval", "--tasks", "synth", "--task-file", str(problems_file),
               "--engine", "openai", "--api-addr", srv.addr, "--model-name", "stand-in-teacher", "--n", "4",
               "--max-tokens", "4000", "--output", str(tmp_path / "cli"), "--verify-workers", "1",
               "--max-retries", "0"]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
        missing = 6 * 4 - len(read_lines(tmp_path / "cli" / "samples.jsonl"))
        assert p.returncode == (1 if missing else 0), p.stderr[-2000:]
        assert f"{missing} failed samples scored wrong" in p.stdout
    finally:
        srv.stop()


@pytest.mark.slow  # loads the 150k-token tokenizer
def test_budget_forcing_sends_only_standard_fields_and_counts_tokens(problems_file, tmp_path, qwen_tokenizer_dir):
    """Issue 13 item 7: against a server that 422s unknown fields (like `transformers serve`),
    budget forcing used to stop at once (include_stop_str_in_output). Now only standard fields go
    out unless --server-kind vllm; think/completion tokens are the tokenizer's, </think> once."""
    from distilled.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(qwen_tokenizer_dir))
    srv = start_in_thread(TeacherConfig(latency_ms=1, latency_dist="fixed", strict_fields=True, seed=3))
    try:
        out = tmp_path / "strict"
        res = run_eval(cfg_for(srv, problems_file, out, n=1, tokenizer=str(qwen_tokenizer_dir), min_think_tokens=150,
                               max_think_tokens=400))
        assert srv.stats()["rejected_fields"] == {} and res["failed_samples"] == 0
        recs = read_lines(out / "samples.jsonl")
        assert len(recs) == 6 and res["tasks"]["synth"]["budget_waits"] >= 6
        for r in recs:
            assert r["output"].count("</think>") == 1  # the server's own and the forced one never both
            think = r["output"][: r["output"].index("</think>")]
            n_think = len(tok.encode(think, add_special_tokens=False))
            n_all = len(tok.encode(r["output"], add_special_tokens=False))
            slack = r["budget"]["waits"] + 1  # a token may merge across a piece boundary
            assert abs(r["think_tokens"] - n_think) <= slack, (r["think_tokens"], n_think)
            assert abs(r["completion_tokens"] - n_all) <= slack + 1, (r["completion_tokens"], n_all)
            assert abs(r["think_tokens"] - len(think.split())) > 2 * slack  # tokens, not words
            assert 150 <= r["think_tokens"] <= 400
            assert r["prompt_tokens"] > 20
        # the vLLM extension only when asked for: the strict server refuses it
        with pytest.raises(EvalError, match="include_stop_str_in_output"):
            run_eval(cfg_for(srv, problems_file, tmp_path / "vllm", n=1, tokenizer=str(qwen_tokenizer_dir),
                             max_think_tokens=8, server_kind="vllm"))
    finally:
        srv.stop()


def test_text_segment_reads_a_stop_by_server_kind():
    """A standard server does not return the stop string it matched: a 'stop' in the thinking
    phase is the </think> stop. Servers that return it (vllm with the extension, transformers
    serve) make a 'stop' without </think> an end of sequence."""
    from distilled.eval.engines import _text_segment

    enc = lambda t: list(range(len(t)))  # noqa: E731 - one "token" per character, to check the counting
    s = _text_segment("abc", "stop", 99, True, 50, enc, stop_returned=False)
    assert (s.end, s.n_tokens, s.text) == ("close", 3, "abc")
    assert _text_segment("abc", "stop", 99, True, 50, enc, stop_returned=True).end == "eos"
    s = _text_segment("abc</think> answer", "stop", 99, True, 50, enc)
    assert (s.end, s.n_tokens, s.text) == ("close", 3, "abc")  # </think> is counted when inserted
    s = _text_segment("abcdef", "length", 7, True, 6, enc)
    assert (s.end, s.n_tokens) == ("length", 6)
    assert _text_segment("abc", "stop", None, False, 50, enc).end == "eos"  # answer phase


def test_resume_refuses_other_problems_or_gold(teacher, tmp_path):
    """Issue 13 item 6: the fingerprint holds a digest of the problems and gold it used, so a
    corrected gold file (or another --limit / --task-file) cannot reuse stale verdicts."""
    rows = synth(6, seed=5, split="test")
    pf = tmp_path / "p.jsonl"
    pf.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "r"
    run_eval(cfg_for(teacher, pf, out), stop_after=3)
    fp = json.loads((out / "run_config.json").read_text())["fingerprint"]
    assert set(fp["problems_sha256"]) == {"synth"}
    run_eval(cfg_for(teacher, pf, out), stop_after=1)  # same data: the resume goes on
    rows[4] = {**rows[4], "answer": rows[4]["answer"] + "1"}  # a corrected gold answer
    pf.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EvalError, match=r"the problems or gold answers of synth differ"):
        run_eval(cfg_for(teacher, pf, out))
    with pytest.raises(EvalError, match=r"the problems or gold answers of synth differ"):
        run_eval(cfg_for(teacher, pf, out, limit=3))
    assert len(read_lines(out / "samples.jsonl")) == 4  # nothing was added by the refused runs
