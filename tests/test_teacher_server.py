"""The stand-in teacher over real HTTP on 127.0.0.1: answers, determinism, limits, faults, CLI."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from distilled.generate.problems import synth
from distilled.generate.teacher_server import TeacherConfig, count_tokens, start_in_thread


@pytest.fixture
def server():
    srv = start_in_thread(TeacherConfig(wrong_rate=0.0, seed=1))
    yield srv
    srv.stop()


def post(srv, path, body, headers=None, timeout=10):
    req = urllib.request.Request(srv.base_url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def chat(srv, content, **kw):
    st, _h, raw = post(srv, "/chat/completions",
                       {"model": "stand-in-teacher", "messages": [{"role": "user", "content": content}], **kw})
    assert st == 200, raw
    return json.loads(raw)


BOX = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def test_models_endpoint(server):
    with urllib.request.urlopen(server.base_url + "/models", timeout=5) as r:
        data = json.loads(r.read())
    assert data["data"][0]["id"] == "stand-in-teacher"


def test_r1_layout_and_correct_answers_when_wrong_rate_is_zero(server):
    for row in synth(40, seed=2):
        out = chat(server, "Please reason step by step.\n" + row["problem"], max_tokens=4000)
        ch = out["choices"][0]
        text = ch["message"]["content"]
        assert ch["finish_reason"] == "stop"
        assert text.startswith("<think>\n") and "\n</think>\n\n" in text
        assert BOX.findall(text.split("</think>")[1])[-1] == row["answer"]
        assert out["usage"]["completion_tokens"] == count_tokens(text)
        assert 20 <= out["usage"]["completion_tokens"] <= 300  # short enough for a tiny student


def test_wrong_rate_share_and_determinism_per_seed():
    srv = start_in_thread(TeacherConfig(wrong_rate=0.3, seed=5))
    try:
        rows = synth(60, seed=0)
        wrong = 0
        for i, row in enumerate(rows):
            a = chat(srv, row["problem"], seed=i)["choices"][0]["message"]["content"]
            b = chat(srv, row["problem"], seed=i)["choices"][0]["message"]["content"]
            assert a == b  # same (server seed, problem, request seed) -> same answer
            wrong += BOX.findall(a)[-1] != row["answer"]
        assert 8 <= wrong <= 30  # ~30% of 60, deliberately wrong
        n2 = chat(srv, rows[0]["problem"], seed=1, n=2)
        assert [c["index"] for c in n2["choices"]] == [0, 1]
    finally:
        srv.stop()


def test_max_tokens_truncates_with_length(server):
    p = synth(1, seed=0)[0]["problem"]
    out = chat(server, p, max_tokens=10, seed=0)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 10 == count_tokens(out["choices"][0]["message"]["content"])


def test_reasoning_content_mode(server):
    server.config.reasoning_content = True
    out = chat(server, synth(1, seed=0)[0]["problem"], seed=0)
    msg = out["choices"][0]["message"]
    assert "<think>" not in msg["content"] and "\\boxed" in msg["content"]
    assert msg["reasoning_content"] and "</think>" not in msg["reasoning_content"]


def test_completions_continue_a_prompt(server):
    p = synth(1, seed=0)[0]["problem"]
    st, _h, raw = post(server, "/completions", {"prompt": p + "\n<think>\n", "max_tokens": 500, "seed": 0})
    text = json.loads(raw)["choices"][0]["text"]
    assert st == 200 and not text.startswith("<think>") and "</think>" in text and "\\boxed" in text
    st, _h, raw = post(server, "/completions", {"prompt": p + "\n<think>\nblah\n</think>\n\n", "seed": 0})
    assert "</think>" not in json.loads(raw)["choices"][0]["text"]


def test_unknown_problem_gets_generic_answer(server):
    text = chat(server, "What is the airspeed of an unladen swallow?")["choices"][0]["message"]["content"]
    assert text.startswith("<think>\n") and BOX.search(text)


def test_capacity_queues_extra_requests():
    srv = start_in_thread(TeacherConfig(latency_ms=40, latency_dist="fixed", capacity=3))
    try:
        threads = [threading.Thread(target=chat, args=(srv, "What is 10% of 50?")) for _ in range(12)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        dt = time.perf_counter() - t0
        st = srv.stats()
        assert st["max_serving"] == 3 and st["max_in_flight"] > 3
        assert dt >= 4 * 0.040 * 0.9  # 12 requests through 3 slots of 40 ms = 4 waves
    finally:
        srv.stop()


@pytest.mark.parametrize("fault", ["429", "500", "reset", "truncated_json", "length", "slow"])
def test_each_fault_kind(server, fault):
    server.config.fault_rate, server.config.faults = 1.0, (fault,)
    server.config.retry_after, server.config.slow_ms = 2.0, 300
    body = {"model": "stand-in-teacher", "messages": [{"role": "user", "content": "What is 10% of 50?"}]}
    if fault == "reset":
        with pytest.raises((ConnectionError, urllib.error.URLError, OSError)):
            post(server, "/chat/completions", body)
        return
    t0 = time.perf_counter()
    st, headers, raw = post(server, "/chat/completions", body)
    if fault == "429":
        assert st == 429 and headers["Retry-After"] == "2"
    elif fault == "500":
        assert st == 500 and "error" in json.loads(raw)
    elif fault == "truncated_json":
        assert st == 200
        with pytest.raises(ValueError):
            json.loads(raw)
    elif fault == "length":
        assert json.loads(raw)["choices"][0]["finish_reason"] == "length"
    elif fault == "slow":
        assert st == 200 and time.perf_counter() - t0 >= 0.29
    assert server.stats()["faults"] == {fault: 1}


def test_api_key_model_and_bad_requests():
    srv = start_in_thread(TeacherConfig(api_key="s3cret", max_tokens_cap=100))
    try:
        body = {"model": "stand-in-teacher", "messages": [{"role": "user", "content": "hi"}]}
        assert post(srv, "/chat/completions", body)[0] == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert post(srv, "/chat/completions", {**body, "max_tokens": 50}, ok)[0] == 200
        assert post(srv, "/chat/completions", {**body, "max_tokens": 500}, ok)[0] == 400
        assert post(srv, "/chat/completions", {**body, "model": "nope"}, ok)[0] == 404
        assert post(srv, "/chat/completions", {"model": "stand-in-teacher", "messages": []}, ok)[0] == 400
    finally:
        srv.stop()


def test_cli_serves_and_stops_on_sigterm(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "distilled", "serve-teacher", "--port", str(port),
                             "--latency-ms", "5", "--capacity", "4", "--seed", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
                break
            except OSError:
                assert time.time() < deadline and proc.poll() is None
                time.sleep(0.1)
        stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=2).read())
        assert stats["config"]["capacity"] == 4 and "api_key" not in stats["config"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert "NOT a real model" in out


def test_strict_fields_rejects_non_openai_fields_like_transformers_serve():
    """--strict-fields: a vLLM-only field is a 422 naming it; standard fields still work; off by default."""
    with start_in_thread(TeacherConfig(strict_fields=True)) as srv:
        for path, body in (("/chat/completions", {"messages": [{"role": "user", "content": "1+1?"}]}),
                           ("/completions", {"prompt": "1+1?"})):
            st, _h, raw = post(srv, path, {"model": "stand-in-teacher", **body, "max_tokens": 20,
                                           "include_stop_str_in_output": True})
            assert st == 422, raw
            err = json.loads(raw)
            assert err["detail"] == "Unexpected fields in the request: {'include_stop_str_in_output'}"
            assert "include_stop_str_in_output" in err["error"]["message"]
            st, _h, raw = post(srv, path, {"model": "stand-in-teacher", **body, "max_tokens": 20, "seed": 3,
                                           "temperature": 0.6, "top_p": 0.95, "stop": ["</think>"],
                                           "stream": False})
            assert st == 200, raw
        # "messages" is a chat field, not a completions one
        st, _h, raw = post(srv, "/completions", {"prompt": "x", "messages": []})
        assert st == 422 and "messages" in json.loads(raw)["detail"]
        assert srv.stats()["rejected_fields"] == {"include_stop_str_in_output": 2, "messages": 1}
    with start_in_thread(TeacherConfig()) as srv:  # default: lenient like vLLM
        st, _h, raw = post(srv, "/completions", {"prompt": "x", "include_stop_str_in_output": True})
        assert st == 200, raw


def sse(srv, path, body, timeout=10):
    """POST with stream: true; return (data payloads in order, saw [DONE], error or None)."""
    req = urllib.request.Request(srv.base_url + path, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    events, done, err = [], False, None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            for line in r:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    continue
                events.append(json.loads(data))
    except (OSError, ValueError) as exc:  # reset / IncompleteRead / a torn chunk
        err = exc
    return events, done, err


def test_streamed_chat_matches_the_plain_answer_token_by_token(server):
    q = {"model": "stand-in-teacher", "messages": [{"role": "user", "content": "What is 10% of 50?"}],
         "seed": 5, "max_tokens": 4000}
    plain = chat(server, q["messages"][0]["content"], seed=5, max_tokens=4000)
    events, done, err = sse(server, "/chat/completions", {**q, "stream_options": {"include_usage": True}})
    assert err is None and done
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    finals = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finals == ["stop"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == plain["usage"]
    content_chunks = [e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert len(content_chunks) == plain["usage"]["completion_tokens"]  # one whitespace token per chunk
    # without include_usage: no usage chunk
    events, done, _ = sse(server, "/chat/completions", q)
    assert done and all("usage" not in e for e in events)


def test_streamed_completions_and_reasoning_content(server):
    events, done, err = sse(server, "/completions", {"prompt": "What is 10% of 50?", "seed": 1, "max_tokens": 5})
    assert err is None and done
    assert len([e for e in events if e["choices"][0]["text"]]) == 5
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    server.config.reasoning_content = True
    events, done, _ = sse(server, "/chat/completions", {"messages": [{"role": "user", "content": "What is 10% of 50?"}],
                                                        "seed": 2})
    r = "".join(e["choices"][0]["delta"].get("reasoning_content") or "" for e in events)
    c = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert "</think>" not in r and r and "\\boxed{5}" in c


def test_stream_faults_cut_stall_and_torn_chunk(server):
    q = {"model": "stand-in-teacher", "messages": [{"role": "user", "content": "What is 10% of 50?"}], "seed": 3}
    whole, _, _ = sse(server, "/chat/completions", q)
    server.config.fault_rate, server.config.faults = 1.0, ("stream_cut",)
    events, done, err = sse(server, "/chat/completions", q)
    assert not done and 0 < len(events) < len(whole)
    assert not any(e["choices"][0]["finish_reason"] for e in events)
    # a plain (non-streamed) answer cut half-way: the body never completes
    st = None
    with pytest.raises((OSError, ValueError)):
        st, _h, raw = post(server, "/chat/completions", q)
        json.loads(raw)
    server.config.faults, server.config.slow_ms = ("slow",), 600
    t0 = time.perf_counter()
    events, done, err = sse(server, "/chat/completions", q)
    assert done and err is None and time.perf_counter() - t0 >= 0.55
    server.config.faults = ("truncated_json",)
    events, done, err = sse(server, "/chat/completions", q)
    assert isinstance(err, ValueError) and not done
    assert server.stats()["faults"] == {"stream_cut": 2, "slow": 1, "truncated_json": 1}


def test_token_ms_no_usage_no_done_like_transformers_serve():
    with start_in_thread(TeacherConfig(token_ms=20, stream_usage=False, stream_done=False,
                                       strict_fields=True)) as srv:
        q = {"model": "stand-in-teacher", "prompt": "What is 10% of 50?", "max_tokens": 20,
             "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        events, done, err = sse(srv, "/completions", q)
        dt = time.perf_counter() - t0
        assert err is None and not done and all("usage" not in e for e in events)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert dt >= 20 * 0.02 * 0.9  # 20 tokens, 20 ms apart
        t0 = time.perf_counter()
        st, _h, raw = post(srv, "/completions", {k: v for k, v in q.items() if k != "stream_options"})
        assert st == 200 and time.perf_counter() - t0 >= 0.36  # the same delay, all at once


def test_spawn_teacher_runs_the_cli_with_the_config_and_always_stops_it(tmp_path):
    """spawn_teacher: a real `distill serve-teacher` process built from a TeacherConfig (the flags
    round-trip: /stats shows the same config), answering on 127.0.0.1, gone after the block (and
    after a block that raised)."""
    from dataclasses import asdict

    from distilled.generate.teacher_server import API_KEY_ENV, spawn_teacher

    cfg = TeacherConfig(capacity=4, seed=3, wrong_rate=0.0, faults=("429", "500"), latency_dist="fixed",
                        stream_usage=False, refuse_fields=("stream_options",), api_key="k-spawn")
    log = tmp_path / "logs" / "teacher.log"
    lines = []
    with spawn_teacher(cfg, log=log, echo=lines.append) as t:
        assert t.host == "127.0.0.1" and t.proc.poll() is None
        got = t.stats()["config"]
        want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k != "api_key"}
        assert got == {**want, "api_key_env": API_KEY_ENV}
        body = {"model": "stand-in-teacher", "messages": [{"role": "user", "content": "What is 10% of 50?"}]}
        assert post(t, "/chat/completions", body)[0] == 401  # the key went through the environment
        st, _h, raw = post(t, "/chat/completions", body, {"Authorization": "Bearer k-spawn"})
        assert st == 200 and "\\boxed{5}" in json.loads(raw)["choices"][0]["message"]["content"]
        proc, port = t.proc, t.port
    assert proc.returncode == 0  # SIGTERM: a clean shutdown, and the child was reaped
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
    assert lines and "k-spawn" not in lines[0] and "--capacity 4" in lines[0]
    assert "NOT a real model" in log.read_text()
    with pytest.raises(KeyError, match="boom"):
        with spawn_teacher(["--seed", "1"]) as t:
            proc = t.proc
            raise KeyError("boom")
    assert proc.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)


def test_spawn_teacher_names_the_log_when_the_server_exits_at_once(tmp_path):
    from distilled.generate.teacher_server import TeacherStartError, spawn_teacher

    log = tmp_path / "t.log"
    with pytest.raises(TeacherStartError, match=r"serve-teacher exited 2 \(log: .*t\.log\)") as err:
        with spawn_teacher(["--wrong-rate", "2"], log=log):
            raise AssertionError("the block must not run")
    assert err.value.returncode == 2 and err.value.log == log
    assert "wrong_rate and fault_rate must be within [0, 1]" in log.read_text()
    # a deadline that passes before Python has even started: the error says so, and the process is stopped
    seen = []
    with pytest.raises(TeacherStartError, match=r"did not start within 0 s \(log: ") as err:
        with spawn_teacher(["--seed", "1"], log=log, timeout=0, echo=seen.append):
            raise AssertionError("the block must not run")
    assert err.value.returncode is None
    port = seen[0].split("--port ")[1].split()[0]
    alive = [d for d in os.listdir("/proc") if d.isdigit() and _cmdline(d).endswith(f"--port {port} --seed 1")]
    assert alive == []


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def test_spawn_teacher_kills_a_process_that_outlives_sigterm(tmp_path):
    """The SIGKILL fallback: the "python" here is a shell that ignores SIGTERM and lingers after the
    real teacher (its child, same process group) has shut down cleanly."""
    from distilled.generate.teacher_server import spawn_teacher

    stubborn = tmp_path / "stubborn-python"
    stubborn.write_text(f"#!/bin/sh\ntrap '' TERM\n{sys.executable} \"$@\"\nsleep 30\n")
    stubborn.chmod(0o755)
    t0 = time.monotonic()
    with spawn_teacher(["--seed", "2"], python=str(stubborn), grace=0.5) as t:
        assert t.stats()["config"]["seed"] == 2
        proc = t.proc
    assert proc.returncode == -9 and time.monotonic() - t0 < 20  # killed after the grace, not after 30 s
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
