"""ChatClient against the real stand-in teacher on 127.0.0.1: retries, Retry-After, fail-fast,
concurrency bound (asserted server-side), least-in-flight balancing, a dead endpoint."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from distilled.generate.client import (ChatClient, FatalAPIError, RetriesExhausted, map_requests, merge_reasoning,
                              normalize_endpoint)
from distilled.generate.problems import synth
from distilled.generate.teacher_server import FAULT_KINDS, TeacherConfig, start_in_thread

MSG = [{"role": "user", "content": "What is 20% of 45?"}]


@pytest.fixture
def srv():
    s = start_in_thread(TeacherConfig(wrong_rate=0.0))
    yield s
    s.stop()


def run(coro):
    return asyncio.run(coro)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_normalize_and_merge():
    assert normalize_endpoint("h:1") == "http://h:1/v1"
    assert normalize_endpoint("http://h:1/v1/") == "http://h:1/v1"
    assert merge_reasoning("c", None) == "c" and merge_reasoning(None, "r") == "<think>\nr\n</think>\n\n"
    # R1's template ends the prompt with "<think>\n": the server's text lacks the opening tag
    assert merge_reasoning("steps\n</think>\n\nans", None) == "<think>\nsteps\n</think>\n\nans"
    assert merge_reasoning("<think>\ns\n</think>\n\na", None) == "<think>\ns\n</think>\n\na"


def test_chat_and_complete(srv):
    async def go():
        async with ChatClient([srv.addr], "stand-in-teacher") as c:
            r = await c.chat(MSG, max_tokens=500, seed=0)
            k = await c.complete("What is 20% of 45?\n<think>\n", max_tokens=500, seed=0)
            return r, k
    r, k = run(go())
    assert r.finish_reason == "stop" and "\\boxed{9}" in r.text and r.attempts == 1
    assert r.usage["completion_tokens"] > 0 and r.endpoint == srv.base_url
    assert "\\boxed{9}" in k.text


def test_reasoning_content_is_merged(srv):
    srv.config.reasoning_content = True
    r = run(_one(srv))
    assert r.reasoning_content and r.text.startswith("<think>\n" + r.reasoning_content + "\n</think>\n\n")


async def _one(srv, **kw):
    async with ChatClient([srv.addr], "stand-in-teacher", **kw) as c:
        return await c.chat(MSG, max_tokens=500)


def test_every_fault_kind_is_survived_and_nothing_is_lost(srv):
    srv.config.fault_rate, srv.config.retry_after, srv.config.slow_ms = 0.3, 0.05, 400
    probs = [r["problem"] for r in synth(150, seed=1)]

    async def go():
        async with ChatClient([srv.addr], "stand-in-teacher", max_concurrent=16, backoff_base=0.01,
                              request_timeout=0.3, max_retries=10) as c:
            res = await map_requests(c, probs, lambda p: c.chat([{"role": "user", "content": p}], max_tokens=999))
            return res, c.retries
    res, retries = run(go())
    assert all(not isinstance(r, Exception) for r in res)
    assert len(res) == 150 and retries > 0
    faults = srv.stats()["faults"]
    assert set(faults) == set(FAULT_KINDS)
    # a "length" fault is a valid answer (cut short), not an error: it is returned, not retried
    assert sum(r.finish_reason == "length" for r in res) == faults["length"]


def test_retry_after_is_honoured(srv):
    srv.config.fault_rate, srv.config.faults, srv.config.retry_after = 1.0, ("429",), 1.0
    seen = []

    def on_event(kind, info):
        seen.append((kind, info))
        srv.config.fault_rate = 0.0  # the retry will succeed

    t0 = time.perf_counter()
    r = run(_one(srv, backoff_base=0.001, on_event=on_event))
    dt = time.perf_counter() - t0
    assert r.attempts == 2 and seen[0][0] == "retry" and "429" in seen[0][1]["reason"]
    assert 1.0 <= dt < 2.0, dt  # waited the server's Retry-After, not the 1 ms backoff


def test_backoff_grows_and_retries_exhaust(srv):
    srv.config.fault_rate, srv.config.faults = 1.0, ("500",)
    delays = []
    t0 = time.perf_counter()
    with pytest.raises(RetriesExhausted) as ei:
        run(_one(srv, max_retries=3, backoff_base=0.05, failure_threshold=100,
                 on_event=lambda k, i: delays.append(i["delay"])))
    assert ei.value.attempts == 4 and "HTTP 500" in ei.value.reason
    assert srv.stats()["requests"] == 4
    assert len(delays) == 3 and 0.025 <= delays[0] <= 0.05 and 0.1 <= delays[2] <= 0.2
    assert time.perf_counter() - t0 >= sum(delays)


def test_401_fails_fast_naming_the_env_var_and_never_the_key(monkeypatch, capsys):
    s = start_in_thread(TeacherConfig(api_key="right-key"))
    try:
        monkeypatch.setenv("TEACHER_KEY", "wrong-key-123")
        t0 = time.perf_counter()
        with pytest.raises(FatalAPIError) as ei:
            run(_one(s, api_key_env="TEACHER_KEY", backoff_base=1.0))
        assert time.perf_counter() - t0 < 1.0
        assert ei.value.status == 401 and "TEACHER_KEY" in str(ei.value)
        assert "wrong-key-123" not in str(ei.value) and "wrong-key-123" not in repr(ChatClient([s.addr], "m",
                                                                                               api_key_env="TEACHER_KEY"))
        assert s.stats()["requests"] == 1
        monkeypatch.setenv("TEACHER_KEY", "right-key")
        assert run(_one(s, api_key_env="TEACHER_KEY")).finish_reason == "stop"
        out = capsys.readouterr()
        assert "right-key" not in out.out + out.err and "wrong-key-123" not in out.out + out.err
        with pytest.raises(FatalAPIError, match="EMPTY_VAR"):
            ChatClient([s.addr], "m", api_key_env="EMPTY_VAR")
    finally:
        s.stop()


def test_404_and_400_fail_fast(srv):
    async def go(model, **kw):
        async with ChatClient([srv.addr], model) as c:
            return await c.chat(MSG, **kw)
    with pytest.raises(FatalAPIError, match="404") as ei:
        run(go("no-such-model"))
    assert "no-such-model" in str(ei.value)
    srv.config.max_tokens_cap = 10
    with pytest.raises(FatalAPIError) as ei:
        run(go("stand-in-teacher", max_tokens=100))
    assert ei.value.status == 400 and "exceeds" in str(ei.value)
    assert srv.stats()["requests"] == 2


def test_concurrency_never_exceeds_max_concurrent_server_side():
    s = start_in_thread(TeacherConfig(latency_ms=15, latency_dist="lognormal"))
    try:
        async def go():
            async with ChatClient([s.addr], "stand-in-teacher", max_concurrent=7) as c:
                # 300 coroutines at once: only the semaphore bounds what reaches the server
                return await asyncio.gather(*(c.chat(MSG, max_tokens=100) for _ in range(300)))
        res = run(go())
        assert len(res) == 300
        assert s.stats()["max_in_flight"] == 7  # reached, never exceeded
    finally:
        s.stop()


def test_least_in_flight_prefers_the_faster_endpoint():
    fast = start_in_thread(TeacherConfig(latency_ms=5, latency_dist="fixed"))
    slow = start_in_thread(TeacherConfig(latency_ms=60, latency_dist="fixed"))
    try:
        async def go():
            async with ChatClient([slow.addr, fast.addr], "stand-in-teacher", max_concurrent=8) as c:
                await asyncio.gather(*(c.chat(MSG, max_tokens=50) for _ in range(240)))
                return c.endpoint_stats()
        st = run(go())
        nf, ns = fast.stats()["completed"], slow.stats()["completed"]
        assert nf + ns == 240 and nf > 2 * ns > 0, (nf, ns)
        assert {e["url"]: e["requests"] for e in st}[fast.base_url] == nf
    finally:
        fast.stop()
        slow.stop()


def test_equal_endpoints_share_the_load():
    a = start_in_thread(TeacherConfig(latency_ms=10, latency_dist="fixed"))
    b = start_in_thread(TeacherConfig(latency_ms=10, latency_dist="fixed"))
    try:
        async def go():
            async with ChatClient([a.addr, b.addr], "stand-in-teacher", max_concurrent=6) as c:
                await asyncio.gather(*(c.chat(MSG, max_tokens=50) for _ in range(200)))
        run(go())
        na, nb = a.stats()["completed"], b.stats()["completed"]
        assert na + nb == 200 and abs(na - nb) <= 40, (na, nb)
        assert a.stats()["max_in_flight"] <= 3 + 1 and b.stats()["max_in_flight"] <= 3 + 1
    finally:
        a.stop()
        b.stop()


def test_dead_endpoint_is_taken_out_and_the_run_completes():
    good = start_in_thread(TeacherConfig(latency_ms=5, latency_dist="fixed"))
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    events = []
    try:
        async def go():
            async with ChatClient([dead, good.addr], "stand-in-teacher", max_concurrent=8, backoff_base=0.01,
                                  failure_threshold=3, cooldown=0.2,
                                  on_event=lambda k, i: events.append(k)) as c:
                res = await asyncio.gather(*(c.chat(MSG, max_tokens=50) for _ in range(300)))
                return res, c.endpoint_stats()
        res, st = run(go())
        assert len(res) == 300 and all(r.endpoint == good.base_url for r in res)
        d = next(e for e in st if e["url"] == normalize_endpoint(dead))
        assert "endpoint_down" in events
        # taken out after a few failures; re-probed a few times, not hammered
        assert 3 <= d["requests"] <= 3 + 8 + 10, d
        assert good.stats()["completed"] == 300
    finally:
        good.stop()


# --- streaming, Retry-After cap, dead endpoints, probe --------------------------------------------
def test_streamed_answer_equals_the_plain_one_with_usage(srv):
    async def go():
        async with ChatClient([srv.addr], "stand-in-teacher") as c:
            plain = await c.chat(MSG, max_tokens=500, seed=4)
            plain_c = await c.complete("What is 20% of 45?", max_tokens=7, seed=4)
        async with ChatClient([srv.addr], "stand-in-teacher", stream=True, idle_timeout=5) as c:
            return plain, plain_c, await c.chat(MSG, max_tokens=500, seed=4), \
                await c.complete("What is 20% of 45?", max_tokens=7, seed=4), c.usage_counted
    plain, plain_c, st, st_c, counted = run(go())
    assert st.text == plain.text and st.finish_reason == plain.finish_reason == "stop"
    assert st.usage == plain.usage and counted == 0  # the server's usage chunk, not a count
    assert st_c.text == plain_c.text and st_c.finish_reason == "length" and st_c.usage["completion_tokens"] == 7
    srv.config.reasoning_content = True
    r = run(_one(srv, stream=True))
    assert r.reasoning_content and r.text.startswith("<think>\n" + r.reasoning_content + "\n</think>\n\n")


def test_stream_without_usage_or_done_counts_chunks_and_says_so():
    with start_in_thread(TeacherConfig(stream_usage=False, stream_done=False, strict_fields=True)) as s:
        async def go():
            async with ChatClient([s.addr], "stand-in-teacher", stream=True) as c:
                return await c.chat(MSG, max_tokens=500, seed=1), c.usage_counted
        r, counted = run(go())

        async def plain_one():
            async with ChatClient([s.addr], "stand-in-teacher") as c:
                return await c.chat(MSG, max_tokens=500, seed=1)
        plain = run(plain_one())
    assert counted == 1 and r.usage == {"completion_tokens": len(r.text.split()), "usage_source": "counted_chunks"}
    assert r.text == plain.text and r.finish_reason == "stop"
    assert s.stats()["rejected_fields"] == {}  # stream and stream_options are standard fields


def test_a_long_stream_outlives_the_idle_timeout_a_plain_request_does_not():
    """~48 tokens x 50 ms = ~2.4 s: streaming with a 1 s idle timeout succeeds at the first attempt;
    the same answer without streaming and a 1 s per-attempt timeout never arrives."""
    with start_in_thread(TeacherConfig(token_ms=50)) as s:
        async def go(**kw):
            async with ChatClient([s.addr], "stand-in-teacher", max_retries=1, backoff_base=0.01, **kw) as c:
                return await c.complete("What is 20% of 45?", max_tokens=1000)
        t0 = time.perf_counter()
        r = run(go(stream=True, idle_timeout=1.0))
        dt = time.perf_counter() - t0
        toks = r.usage["completion_tokens"]
        assert r.attempts == 1 and r.finish_reason == "stop" and toks >= 40 and dt >= toks * 0.05 * 0.9 >= 1.8
        with pytest.raises(RetriesExhausted) as ei:
            run(go(request_timeout=1.0))
        assert "timeout after 1s" in ei.value.reason


def test_a_cut_or_stalled_stream_is_retried(srv):
    for fault, want in (("stream_cut", ""), ("slow", "idle"), ("truncated_json", "malformed")):
        srv.config.fault_rate, srv.config.faults, srv.config.slow_ms = 1.0, (fault,), 1500
        reasons = []

        def on_event(kind, info):
            reasons.append(info["reason"])
            srv.config.fault_rate = 0.0  # the retry succeeds
        r = run(_one(srv, stream=True, idle_timeout=0.5, backoff_base=0.01, on_event=on_event))
        assert r.attempts == 2 and r.finish_reason == "stop" and r.text.startswith("<think>\n"), fault
        assert want in reasons[0], (fault, reasons)
    srv.config.fault_rate, srv.config.faults = 1.0, ("stream_cut",)
    with pytest.raises(RetriesExhausted) as ei:
        run(_one(srv, stream=True, max_retries=2, backoff_base=0.01))
    assert ei.value.attempts == 3


def test_retry_after_is_capped(srv):
    srv.config.fault_rate, srv.config.faults, srv.config.retry_after = 1.0, ("429",), 86400
    delays = []

    def on_event(kind, info):
        delays.append(info["delay"])
        srv.config.fault_rate = 0.0
    t0 = time.perf_counter()
    r = run(_one(srv, retry_after_max=0.3, on_event=on_event))
    assert r.attempts == 2 and 0.3 <= delays[0] <= 0.33 and time.perf_counter() - t0 < 5


def test_a_dead_port_fails_within_max_retries_and_the_probe_names_it():
    """Before: with every endpoint out, requests waited for a single re-probe and never used up
    their retries (a dead port sat at 0/10 for minutes). Now each wait ends in a counted attempt."""
    dead = f"127.0.0.1:{free_port()}"
    with start_in_thread(TeacherConfig()) as good:
        async def go():
            async with ChatClient([dead], "m", max_retries=1, backoff_base=0.01, cooldown=0.05,
                                  failure_threshold=2) as c:
                res = await asyncio.gather(*(c.chat(MSG, max_tokens=5) for _ in range(40)), return_exceptions=True)
                return res, c.all_down(), c.retries
        t0 = time.perf_counter()
        res, down, retries = run(go())
        assert time.perf_counter() - t0 < 10
        assert all(isinstance(x, RetriesExhausted) and x.attempts == 2 for x in res)
        assert down and retries == 40 and "Connect" in res[0].reason

        async def probe():
            async with ChatClient([dead, good.addr], "m") as c:
                return await c.probe(timeout=2)
        p = run(probe())
    assert p[good.base_url] is None and "ClientConnectorError" in p[normalize_endpoint(dead)]


def test_a_server_refusing_stream_options_gets_the_request_again_without_it():
    with start_in_thread(TeacherConfig(refuse_fields=("stream_options",))) as s:
        async def go():
            async with ChatClient([s.addr], "stand-in-teacher", stream=True, max_retries=0) as c:
                a = await c.chat(MSG, max_tokens=500)
                b = await c.chat(MSG, max_tokens=500)
                return a, b, c.usage_counted, c.retries
        a, b, counted, retries = run(go())
        st = s.stats()
    # the first request was refused once (not counted as a retry), then both streamed without it
    assert st["status"] == {"400": 1, "200": 2} and retries == 0
    assert a.attempts == b.attempts == 1 and a.finish_reason == b.finish_reason == "stop"
    assert counted == 2 and a.usage["usage_source"] == "counted_chunks"
