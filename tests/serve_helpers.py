"""Start `transformers serve` (a real third-party OpenAI-compatible server) for the tests.

It lives in its own venv, `.venv-serve` (`make serve-env`): transformers 5.x cannot share `.venv`
with MindFormers' transformers 4.57.1. A developer without that venv gets a skip that says how to
build it; under CI (`CI=true`, where `.ci/run` builds it first) a missing venv is a failure, so the
tests can never be skipped silently there.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVE_VENV = REPO / ".venv-serve"
SERVE_BIN = SERVE_VENV / "bin" / "transformers"


def free_port() -> int:
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        return so.getsockname()[1]


def require_serve_env() -> Path:
    """The `transformers` CLI of `.venv-serve`; skip (locally) or fail (CI) when it is absent."""
    if SERVE_BIN.exists():
        return SERVE_BIN
    msg = f"{SERVE_VENV} is absent: build it with `make serve-env` (transformers serve, its own venv)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg + "; CI must build it (.ci/run runs `make serve-env`)")
    pytest.skip(msg)


class ServedModel:
    """A running `transformers serve`: ``addr`` (host:port), ``base_url``, ``model`` (the id
    requests must name: the served folder's path, which the server is pinned to) and ``log``."""

    def __init__(self, proc: subprocess.Popen, port: int, model: str, log: Path):
        self.proc, self.port, self.model, self.log = proc, port, model, log

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""


@contextlib.contextmanager
def transformers_serve(model_dir: Path, log: Path, ready_timeout: float = 240.0) -> Iterator[ServedModel]:
    """Run ``transformers serve MODEL --host 127.0.0.1 --port P --device cpu --dtype float32``,
    wait until ``GET /health`` answers 200, yield, then stop it (SIGTERM, then SIGKILL)."""
    bin_ = require_serve_env()
    port = free_port()
    # An existing (empty) hub cache: without one, transformers serve 5.23 answers GET /v1/models
    # with HTTP 500 (it scans the cache), which a fresh CI machine would hit and a user's would not.
    cache = log.parent / "hf_hub_cache"
    cache.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "HF_HUB_CACHE": str(cache)}
    env.pop("PYTHONPATH", None)
    with open(log, "wb") as logf:
        proc = subprocess.Popen([str(bin_), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu", "--dtype", "float32"], stdout=logf, stderr=subprocess.STDOUT,
                                env=env, cwd=log.parent, start_new_session=True)
    served = ServedModel(proc, port, str(model_dir), log)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {proc.returncode} before it was ready:\n"
                                   f"{served.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(served.base_url.removesuffix("/v1") + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError(f"transformers serve not ready after {ready_timeout:g}s:\n{served.log_tail()}")
            time.sleep(0.5)
        yield served
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
