"""The stand-in teacher over real HTTP on 127.0.0.1: answers, determinism, limits, faults, CLI."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from distilled.problems import synth
from distilled.teacher_server import TeacherConfig, count_tokens, start_in_thread


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
