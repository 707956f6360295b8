"""distill generate against the real stand-in teacher on 127.0.0.1 (in-process runs: fast)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from distilled.generate.runner import GenerateConfig, failed_path, render_prompt, run_generate, settings_path
from distilled.io_utils import JsonlAppender
from distilled.generate.problems import synth
from distilled.generate.teacher_server import TeacherConfig, start_in_thread


@pytest.fixture
def srv():
    s = start_in_thread(TeacherConfig(wrong_rate=0.2, latency_ms=2, seed=0))
    yield s
    s.stop()


def write_problems(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_of(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n")  # never a torn last line
    return [json.loads(l) for l in raw.splitlines()]


def cfg(tmp_path, srv, **kw) -> GenerateConfig:
    base = dict(dataset_name=str(tmp_path / "p.jsonl"), output_file=str(tmp_path / "out.jsonl"),
                endpoints=[srv.addr], model="stand-in-teacher", uuid_column="id", num_generations=3,
                max_tokens=1000, max_concurrent=8, backoff_base=0.01, request_timeout=5, seed=1, progress=False)
    base.update(kw)
    return GenerateConfig(**base)


def gen(c: GenerateConfig):
    return asyncio.run(run_generate(c, warn=lambda m: None))


def test_output_contract(tmp_path, srv):
    probs = synth(20, seed=0)
    write_problems(tmp_path / "p.jsonl", probs)
    s = gen(cfg(tmp_path, srv))
    assert (s.written, s.total, s.failed_problems, s.generations) == (20, 20, 0, 60)
    out = rows_of(tmp_path / "out.jsonl")
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in probs)
    by_id = {p["id"]: p for p in probs}
    for r in out:
        for k, v in by_id[r["id"]].items():
            assert r[k] == v  # all input columns carried
        assert r["prompt"] == render_prompt(cfg(tmp_path, srv).prompt_template, r["problem"])
        assert r["prompt"].startswith("You will be given a problem") and "\\boxed{}" in r["prompt"]
        assert len(r["generations"]) == len(r["finish_reasons"]) == len(r["api_metadata"]) == 3
        assert all(g.startswith("<think>\n") for g in r["generations"])
        assert all(m["completion_tokens"] > 0 for m in r["api_metadata"])
    assert not failed_path(tmp_path / "out.jsonl").exists()
    # a rerun has nothing to do and changes nothing
    before = (tmp_path / "out.jsonl").read_bytes()
    s2 = gen(cfg(tmp_path, srv))
    assert (s2.already_done, s2.written, s2.generations) == (20, 0, 0)
    assert (tmp_path / "out.jsonl").read_bytes() == before


def test_ten_percent_faults_lose_nothing(tmp_path, srv):
    srv.config.fault_rate, srv.config.retry_after, srv.config.slow_ms = 0.1, 0.05, 1500
    write_problems(tmp_path / "p.jsonl", synth(60, seed=2))
    s = gen(cfg(tmp_path, srv, request_timeout=0.5, max_retries=10))
    assert s.failed_generations == 0 and s.written == 60 and s.retries > 0
    out = rows_of(tmp_path / "out.jsonl")
    assert len(out) == 60 == len({r["id"] for r in out})
    assert all(len(r["generations"]) == 3 for r in out)
    st = srv.stats()
    assert sum(st["faults"].values()) >= 10
    # "length" faults are valid (truncated) generations, recorded as such
    assert sum(fr == "length" for r in out for fr in r["finish_reasons"]) == st["faults"].get("length", 0)


def test_concurrency_bound_is_requests_not_problems(tmp_path):
    s = start_in_thread(TeacherConfig(latency_ms=20, latency_dist="lognormal"))
    try:
        write_problems(tmp_path / "p.jsonl", synth(30, seed=3))
        out = gen(cfg(tmp_path, s, num_generations=4, max_concurrent=5))
        assert out.written == 30
        assert s.stats()["max_in_flight"] == 5
    finally:
        s.stop()


def test_torn_tail_is_repaired_and_resume_completes(tmp_path, srv):
    probs = synth(12, seed=4)
    write_problems(tmp_path / "p.jsonl", probs)
    gen(cfg(tmp_path, srv, limit=5))
    out = tmp_path / "out.jsonl"
    good = out.read_bytes()
    assert len(rows_of(out)) == 5
    with open(out, "ab") as f:  # a kill -9 in the middle of a write
        f.write(b'{"id": "synth-s4-train-000009", "problem": "half a li')
    s = gen(cfg(tmp_path, srv))
    assert s.repaired_bytes > 0 and s.already_done == 5 and s.written == 7
    assert out.read_bytes().startswith(good)  # complete lines untouched
    rows = rows_of(out)
    assert sorted(r["id"] for r in rows) == sorted(p["id"] for p in probs)


def test_duplicate_uuids_generated_once_and_bad_rows_counted(tmp_path, srv):
    probs = synth(6, seed=5)
    lines = [json.dumps(p) for p in probs] + [json.dumps(probs[0]), json.dumps(probs[3]), "{not json",
                                                json.dumps({"id": "x", "problem": 5}), json.dumps({"id": "y"})]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    warnings = []
    s = asyncio.run(run_generate(cfg(tmp_path, srv), warn=warnings.append))
    assert s.duplicates == 2 and s.skipped_rows == 3 and s.written == 6
    assert any("duplicate" in w and ":7" in w for w in warnings)
    assert any("p.jsonl:9" in w for w in warnings)  # bad line named by line number
    assert len(rows_of(tmp_path / "out.jsonl")) == 6


def test_failed_generations_go_to_failed_file_and_rerun_retries_them(tmp_path, srv):
    write_problems(tmp_path / "p.jsonl", synth(8, seed=6))
    srv.config.fault_rate, srv.config.faults = 0.25, ("500",)
    s = gen(cfg(tmp_path, srv, max_retries=0, num_generations=2))
    fp = failed_path(tmp_path / "out.jsonl")
    assert fp.name == "out.failed.jsonl"
    failed = rows_of(fp)
    assert s.failed_generations == len(failed) > 0
    assert all(set(f) == {"uuid", "generation_index", "reason", "attempts"} and "500" in f["reason"] for f in failed)
    assert s.written + s.failed_problems == 8
    written = {r["id"] for r in rows_of(tmp_path / "out.jsonl")}
    assert not written & {f["uuid"] for f in failed}  # a problem is written only when all N succeeded
    srv.config.fault_rate = 0.0
    s2 = gen(cfg(tmp_path, srv, max_retries=0, num_generations=2))
    assert s2.written == s.failed_problems and s2.failed_generations == 0
    assert not fp.exists()
    assert len(rows_of(tmp_path / "out.jsonl")) == 8


def test_reasoning_content_rule(tmp_path, srv):
    srv.config.reasoning_content = True
    write_problems(tmp_path / "p.jsonl", synth(3, seed=7))
    gen(cfg(tmp_path, srv, num_generations=1))
    for r in rows_of(tmp_path / "out.jsonl"):
        g = r["generations"][0]
        assert g.startswith("<think>\n") and "\n</think>\n\n" in g and "\\boxed" in g.split("</think>")[1]


def test_template_system_prompt_and_parquet_input(tmp_path, srv):
    import pyarrow as pa
    import pyarrow.parquet as pq

    probs = synth(4, seed=8)
    pq.write_table(pa.Table.from_pylist(probs), tmp_path / "p.parquet")
    c = cfg(tmp_path, srv, dataset_name=str(tmp_path / "p.parquet"), num_generations=1,
            prompt_template="Q: {prompt}\nPut the answer in \\boxed{}.", system_prompt="Be brief.")
    s = gen(c)
    assert s.written == 4
    rows = rows_of(tmp_path / "out.jsonl")
    assert rows[0]["prompt"].startswith("Q: ") and rows[0]["prompt"].endswith("\\boxed{}.")


def test_fatal_401_stops_the_run_fast(tmp_path, monkeypatch):
    s = start_in_thread(TeacherConfig(api_key="good"))
    try:
        monkeypatch.setenv("GEN_KEY", "wrong-key-xyz")
        write_problems(tmp_path / "p.jsonl", synth(50, seed=9))
        out = gen(cfg(tmp_path, s, api_key_env="GEN_KEY"))
        assert out.fatal and "401" in out.fatal and "GEN_KEY" in out.fatal and "wrong-key-xyz" not in out.fatal
        assert out.written == 0 and s.stats()["requests"] <= 16  # stopped, not 150 requests
    finally:
        s.stop()


def test_appender_lines_are_whole(tmp_path):
    # sanity of the shared writer used above: every write is one complete line
    with JsonlAppender(tmp_path / "a.jsonl") as a:
        for i in range(3):
            a.write({"i": i})
    assert rows_of(tmp_path / "a.jsonl") == [{"i": 0}, {"i": 1}, {"i": 2}]


# --- resume keys, input columns, recorded settings (issue: a `prompt` column doubled the output) ---
def prompt_rows(n: int) -> list[dict]:
    """Problems in the common HF layout: the question in a column named `prompt`."""
    return [{"prompt": r["problem"], "answer": r["answer"], "source": "synth"} for r in synth(n, seed=11)]


def test_a_prompt_column_resumes_without_duplicates_and_input_columns_intact(tmp_path, srv):
    """Before: the output overwrote row["prompt"] with the rendered template, so a rerun matched no
    key and 5 problems became 10 lines, the input's own prompt lost. Now: still 5 x N."""
    probs = prompt_rows(5)
    write_problems(tmp_path / "p.jsonl", probs)
    c = cfg(tmp_path, srv, prompt_column="prompt", uuid_column=None, num_generations=2)
    s1 = gen(GenerateConfig(**{**c.__dict__, "limit": 2}))  # an interrupted first run
    s2 = gen(c)
    s3 = gen(c)
    assert (s1.written, s2.already_done, s2.written, s3.already_done, s3.written) == (2, 2, 3, 5, 0)
    rows = rows_of(tmp_path / "out.jsonl")
    assert len(rows) == 5 and sum(len(r["generations"]) for r in rows) == 10
    by_prompt = {p["prompt"]: p for p in probs}
    assert sorted(r["prompt"] for r in rows) == sorted(by_prompt)
    for r in rows:
        src = by_prompt[r["prompt"]]
        assert {k: r[k] for k in src} == src  # every input column exactly as it was
        assert r["problem_key"] == src["prompt"]
        assert r["sent_prompt"] == render_prompt(c.prompt_template, src["prompt"]) != src["prompt"]


def test_output_columns_never_overwrite_input_columns(tmp_path, srv):
    probs = synth(3, seed=12)
    write_problems(tmp_path / "p.jsonl", [{**p, "generations": ["old"]} for p in probs])
    with pytest.raises(SystemExit) as ei:
        gen(cfg(tmp_path, srv))
    assert "p.jsonl:1" in str(ei.value) and "'generations'" in str(ei.value) and "--drop-columns" in str(ei.value)
    with pytest.raises(SystemExit) as ei:
        gen(cfg(tmp_path, srv, uuid_column="problem_key"))
    assert "--uuid-column 'problem_key'" in str(ei.value)
    s = gen(cfg(tmp_path, srv, drop_columns=("generations",), num_generations=1))
    assert s.written == 3
    assert all(r["generations"] != ["old"] and r["generations"][0].startswith("<think>")
               for r in rows_of(tmp_path / "out.jsonl"))


def test_settings_are_recorded_and_a_resume_with_other_settings_stops(tmp_path, srv):
    write_problems(tmp_path / "p.jsonl", synth(6, seed=13))
    gen(cfg(tmp_path, srv, limit=3))
    sp = settings_path(tmp_path / "out.jsonl")
    assert sp.name == "out.settings.json"
    rec = json.loads(sp.read_text())
    assert rec["settings"]["num_generations"] == 3 and rec["settings"]["temperature"] == 0.6
    assert rec["settings"]["uuid_column"] == "id" and rec["settings"]["model"] == "stand-in-teacher"
    before = (tmp_path / "out.jsonl").read_bytes()
    with pytest.raises(SystemExit) as ei:
        gen(cfg(tmp_path, srv, num_generations=2, temperature=1.0))
    msg = str(ei.value)
    assert "--num-generations was 3, now 2" in msg and "--temperature was 0.6, now 1.0" in msg
    assert "--allow-settings-change" in msg and "--max-tokens" not in msg
    assert (tmp_path / "out.jsonl").read_bytes() == before  # nothing written
    with pytest.raises(SystemExit) as ei:
        gen(cfg(tmp_path, srv, prompt_template="Solve: {prompt}"))
    assert "--prompt-template" in str(ei.value)
    s = gen(cfg(tmp_path, srv))  # same settings: resumes
    assert (s.already_done, s.written) == (3, 3)
    write_problems(tmp_path / "p.jsonl", synth(8, seed=13))
    warnings = []
    s = asyncio.run(run_generate(cfg(tmp_path, srv, num_generations=2, allow_settings_change=True),
                                 warn=warnings.append))
    assert (s.already_done, s.written) == (6, 2) and any("--num-generations was 3" in w for w in warnings)
    rec = json.loads(sp.read_text())
    assert rec["settings"]["num_generations"] == 2
    assert rec["runs"][-1]["rows_before"] == 6 and rec["runs"][-1]["changed"] == ["num_generations"]
    assert [len(r["generations"]) for r in rows_of(tmp_path / "out.jsonl")] == [3] * 6 + [2] * 2


# --- streaming, unreachable endpoints -----------------------------------------------------------
def test_streamed_generation_survives_cut_streams_and_records_usage(tmp_path, srv):
    srv.config.fault_rate, srv.config.faults = 0.2, ("stream_cut", "slow")
    srv.config.slow_ms = 1500
    probs = synth(15, seed=14)
    write_problems(tmp_path / "p.jsonl", probs)
    s = gen(cfg(tmp_path, srv, stream=True, idle_timeout=0.5, max_retries=10, num_generations=2))
    assert s.written == 15 and s.failed_generations == 0 and s.retries > 0 and s.usage_counted == 0
    st = srv.stats()
    assert st["faults"].get("stream_cut", 0) > 0
    rows = rows_of(tmp_path / "out.jsonl")
    assert all(fr == "stop" for r in rows for fr in r["finish_reasons"])
    assert all(m["completion_tokens"] == len(g.split()) and "usage_source" not in m
               for r in rows for g, m in zip(r["generations"], r["api_metadata"]))
    # the same problems without streaming give the same text (seeded): streaming changes nothing
    srv.config.fault_rate = 0.0
    gen(cfg(tmp_path, srv, output_file=str(tmp_path / "plain.jsonl"), num_generations=2))
    plain = {r["id"]: r["generations"] for r in rows_of(tmp_path / "plain.jsonl")}
    assert {r["id"]: r["generations"] for r in rows} == plain


def test_streamed_generation_without_server_usage_counts_and_says_so(tmp_path):
    with start_in_thread(TeacherConfig(stream_usage=False, stream_done=False)) as s:
        write_problems(tmp_path / "p.jsonl", synth(4, seed=15))
        summ = gen(cfg(tmp_path, s, stream=True, num_generations=1))
    assert summ.usage_counted == 4 and "completion_tokens counted from chunks" in summ.line()
    assert all(r["api_metadata"][0]["usage_source"] == "counted_chunks" for r in rows_of(tmp_path / "out.jsonl"))


def test_no_endpoint_answers_stops_at_once_naming_each(tmp_path):
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as so:
            so.bind(("127.0.0.1", 0))
            ports.append(so.getsockname()[1])
    write_problems(tmp_path / "p.jsonl", synth(10, seed=16))
    c = GenerateConfig(dataset_name=str(tmp_path / "p.jsonl"), output_file=str(tmp_path / "out.jsonl"),
                       endpoints=[f"127.0.0.1:{p}" for p in ports], max_retries=1, progress=False)
    import time as _t

    t0 = _t.perf_counter()
    s = gen(c)
    assert _t.perf_counter() - t0 < 10 and s.written == 0 and s.generations == 0
    assert s.fatal.startswith("no endpoint answers") and all(f"127.0.0.1:{p}" in s.fatal for p in ports)
    assert "--wait-for-server" in s.fatal


def test_one_dead_endpoint_is_named_and_the_other_does_the_work(tmp_path, srv):
    import socket

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{so.getsockname()[1]}"
    write_problems(tmp_path / "p.jsonl", synth(10, seed=17))
    warnings = []
    s = asyncio.run(run_generate(cfg(tmp_path, srv, endpoints=[dead, srv.addr]), warn=warnings.append))
    assert s.written == 10 and not s.fatal
    assert any(f"endpoint http://{dead}/v1 does not answer" in w for w in warnings)


def test_a_server_that_dies_mid_run_stops_the_run_instead_of_failing_every_problem(tmp_path):
    s = start_in_thread(TeacherConfig(latency_ms=30, latency_dist="fixed"))
    write_problems(tmp_path / "p.jsonl", synth(300, seed=18))
    c = cfg(tmp_path, s, num_generations=1, max_concurrent=4, max_retries=1)
    import threading

    threading.Timer(0.8, s.stop).start()
    summ = gen(c)
    assert summ.fatal and "no endpoint answers any more" in summ.fatal
    assert 0 < summ.written < 300 and summ.failed_problems < 20
    assert len(rows_of(tmp_path / "out.jsonl")) == summ.written


def _parse_generate(argv: list[str]):
    from distilled.cli import build_parser
    from distilled.generate.runner import config_from_args

    return config_from_args(build_parser().parse_args(["generate", *argv]))


def test_cli_defaults_are_the_config_defaults():
    """The flags are built from GenerateConfig's fields: no flag may default to anything else."""
    got = _parse_generate(["--dataset-name", "p.jsonl", "--output-file", "o.jsonl"])
    assert got == GenerateConfig(dataset_name="p.jsonl", output_file="o.jsonl", endpoints=["localhost:39876"])


def test_cli_flags_reach_the_config_including_the_derived_ones():
    got = _parse_generate(["--dataset-name", "p.jsonl", "--output-file", "o.jsonl", "--api-addr", "h1:1",
                           "--base-url", "https://x/v1", "--api-addr", "h2:2", "--drop-columns", " generations, ,id",
                           "--no-progress", "--stream", "--seed", "7", "--temperature", "0.1", "--top-logprobs", "5",
                           "--tokenizer", "qwen2.5", "--wait-for-server", "2.5", "--allow-settings-change",
                           "--num-generations", "2", "--uuid-column", "id", "--limit", "3"])
    assert got.endpoints == ["h1:1", "h2:2", "https://x/v1"]  # --api-addr first, then --base-url
    assert got.drop_columns == ("generations", "id")
    assert (got.progress, got.stream, got.allow_settings_change) == (False, True, True)
    assert (got.seed, got.temperature, got.top_logprobs, got.tokenizer) == (7, 0.1, 5, "qwen2.5")
    assert (got.wait_for_server, got.num_generations, got.uuid_column, got.limit) == (2.5, 2, "id", 3)
