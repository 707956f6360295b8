"""`python -m distilled generate` as a real subprocess: kill -9 at random moments then resume gives
exactly one complete row per problem and no torn line; SIGTERM exits 130 with a clean file; a 401
fails fast with exit 2."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distilled.generate.problems import synth
from distilled.generate.teacher_server import TeacherConfig, start_in_thread

REPO = Path(__file__).resolve().parents[1]


def cmd(tmp_path: Path, addr: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "distilled", "generate", "--model", "stand-in-teacher",
            "--dataset-name", str(tmp_path / "p.jsonl"), "--output-file", str(tmp_path / "out.jsonl"),
            "--prompt-column", "problem", "--uuid-column", "id", "--api-addr", addr, "--num-generations", "2",
            "--max-tokens", "1000", "--max-concurrent", "8", "--backoff-base", "0.02", "--seed", "0",
            "--no-progress", *extra]


def check_prefix(path: Path) -> list[dict]:
    """Every complete line is valid JSON; at most the last (unterminated) line is torn."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete = lines[:-1]
    return [json.loads(l) for l in complete]


@pytest.fixture
def server():
    s = start_in_thread(TeacherConfig(latency_ms=25, latency_dist="lognormal", capacity=8, seed=0,
                                      fault_rate=0.05, faults=("429", "500", "reset"), retry_after=0.05))
    yield s
    s.stop()


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(tmp_path, server):
    probs = synth(160, seed=1)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probs))
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "out.jsonl"
    kills = 0
    for _ in range(4):
        size0 = out.stat().st_size if out.exists() else 0
        proc = subprocess.Popen(cmd(tmp_path, server.addr), cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # kill at a random moment while it is writing (whatever the machine's speed)
        deadline = time.time() + 60
        while proc.poll() is None and (out.stat().st_size if out.exists() else 0) <= size0:
            assert time.time() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(10)
        rows = check_prefix(out)
        assert len({r["id"] for r in rows}) == len(rows)  # never a duplicate, even before repair
    assert kills >= 2
    r = subprocess.run(cmd(tmp_path, server.addr), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    raw = out.read_bytes()
    assert raw.endswith(b"\n")
    rows = [json.loads(l) for l in raw.splitlines()]
    assert sorted(x["id"] for x in rows) == sorted(p["id"] for p in probs)  # exactly one row per problem
    assert all(len(x["generations"]) == 2 and all(x["generations"]) for x in rows)
    assert "160/160 problems done" in r.stdout


def test_sigterm_exits_130_with_a_clean_file_and_resumes(tmp_path, server):
    probs = synth(150, seed=2)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probs))
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(cmd(tmp_path, server.addr), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while not (out.exists() and out.stat().st_size > 0):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    so, se = proc.communicate(timeout=20)
    assert proc.returncode == 130, so + se
    assert "INTERRUPTED" in so
    raw = out.read_bytes()
    assert raw.endswith(b"\n")
    rows = [json.loads(l) for l in raw.splitlines()]
    assert 0 < len(rows) < 150 and len({x["id"] for x in rows}) == len(rows)
    r = subprocess.run(cmd(tmp_path, server.addr), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"({150 - len(rows)} this run, {len(rows)} before)" in r.stdout
    assert len(out.read_bytes().splitlines()) == 150


def test_cli_401_fails_fast_with_exit_2(tmp_path):
    s = start_in_thread(TeacherConfig(api_key="k-right"))
    try:
        (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in synth(20, seed=3)))
        env = {**os.environ, "MY_TEACHER_KEY": "k-wrong-value"}
        t0 = time.time()
        r = subprocess.run(cmd(tmp_path, s.addr, "--api-key-env", "MY_TEACHER_KEY"), cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and time.time() - t0 < 15
        assert "401" in r.stderr and "MY_TEACHER_KEY" in r.stderr
        assert "k-wrong-value" not in r.stdout + r.stderr
        r = subprocess.run(cmd(tmp_path, s.addr, "--dataset-name", str(tmp_path / "missing.jsonl")), cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr
    finally:
        s.stop()


def free_port() -> int:
    import socket

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


def test_cli_dead_port_stops_at_once_naming_it(tmp_path):
    """Before: `--api-addr` where nothing listens sat at 0/10 for minutes ("40 retries"), never
    naming the endpoint. Now the start-up probe names it and exits 2 within seconds."""
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in synth(10, seed=4)))
    dead = f"127.0.0.1:{free_port()}"
    t0 = time.time()
    r = subprocess.run(cmd(tmp_path, dead, "--max-retries", "1"), cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and time.time() - t0 < 20, r.stdout + r.stderr
    assert f"no endpoint answers: http://{dead}/v1" in r.stderr and "--wait-for-server" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out.jsonl").read_text()


def test_cli_wait_for_server_waits_for_a_starting_server(tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in synth(6, seed=5)))
    port = free_port()
    proc = subprocess.Popen(cmd(tmp_path, f"127.0.0.1:{port}", "--wait-for-server", "30"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    srv = None
    try:
        time.sleep(3)  # the client is probing a port where nothing listens yet
        assert proc.poll() is None
        srv = start_in_thread(TeacherConfig(), port=port)
        so, se = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if srv is not None:
            srv.stop()
    assert proc.returncode == 0, so + se
    assert "waiting up to 30s" in se and "6/6 problems done" in so


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_ends_with_one_line_and_no_traceback(tmp_path, sig):
    """Before: Ctrl-C while requests were backing off printed an asyncio CancelledError traceback.
    Now: exit 130 and exactly one line saying what is saved and how to resume."""
    s = start_in_thread(TeacherConfig(latency_ms=20, latency_dist="fixed", fault_rate=0.5, faults=("500",)))
    try:
        (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in synth(400, seed=6)))
        proc = subprocess.Popen(cmd(tmp_path, s.addr, "--backoff-base", "0.5"), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out = tmp_path / "out.jsonl"
        deadline = time.time() + 30
        while not (out.exists() and out.stat().st_size > 0):  # some rows written, others backing off
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        time.sleep(0.3)
        proc.send_signal(sig)
        so, se = proc.communicate(timeout=30)
    finally:
        s.stop()
    assert proc.returncode == 130, so + se
    assert "Traceback" not in se and "CancelledError" not in se, se
    lines = so.strip().splitlines()
    assert len(lines) == 1, so
    n = len(out.read_bytes().splitlines())
    assert lines[0].startswith(f"generate: INTERRUPTED by {sig.name}: {n}/400 problems saved in {out} ")
    assert "rerun the same command to resume" in lines[0]
