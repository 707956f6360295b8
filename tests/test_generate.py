"""distill generate against the real stand-in teacher on 127.0.0.1 (in-process runs: fast)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from distilled.generate import GenerateConfig, failed_path, render_prompt, run_generate
from distilled.io_utils import JsonlAppender
from distilled.problems import synth
from distilled.teacher_server import TeacherConfig, start_in_thread


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
