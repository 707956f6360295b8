"""A stand-in teacher: a real OpenAI-compatible HTTP server (aiohttp) that answers synth problems.

**This is not DeepSeek-R1.** It lets the whole pipeline (generate -> reject -> train -> eval) run
offline, in tests, benchmarks and the demo, against a server that behaves like vLLM/SGLang on the
wire: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` (plus
``GET /stats`` and ``POST /stats/reset`` for tests). For real distillation point ``distill
generate`` at DeepSeek-R1 served by vLLM, SGLang or MindIE (see docs/generate.md).

What it does and why:

- It recognises problems written by ``distill problems synth`` (the parser and solver live in
  :mod:`distilled.generate.problems`, next to the generator) and answers R1-style:
  ``<think>\\n`` step-by-step reasoning ``\\n</think>\\n\\n`` a short final text with ``\\boxed{}``.
  A controlled share (``--wrong-rate``) is deliberately wrong, so rejection sampling has
  something to reject. Unknown prompts get a plausible generic answer.
- Answers are deterministic per ``(--seed, problem text, request seed, choice index)`` when the
  request carries ``seed``; without one, each request draws fresh randomness (like sampling).
- ``--capacity K`` serves at most K requests at a time and queues the rest, like a GPU server's
  batch slots. Latency is fixed or log-normal (heavy tail: sigma 1.0 gives p99 ~ 10x median).
- Faults on request, for client tests: ``429`` with ``Retry-After``, ``500``, connection
  ``reset``, ``slow`` responses, ``truncated_json`` bodies, ``length`` (text cut short with
  ``finish_reason: length``) and ``stream_cut`` (the connection dropped half-way through the
  answer). ``--fault-rate F`` picks a fault for that share of requests, from ``--faults``
  (default: all kinds). On a streamed answer ``slow`` pauses half-way (no bytes for
  ``--slow-ms``, to exercise idle timeouts) and ``truncated_json`` sends half a chunk then ends.
- Streaming (``"stream": true``): server-sent events like vLLM's, one whitespace token per
  chunk, a final chunk with ``finish_reason``, a ``usage`` chunk when ``stream_options.
  include_usage`` is set (``--no-stream-usage`` withholds it) and ``data: [DONE]``
  (``--no-stream-done`` leaves it out, as ``transformers serve`` does). ``--token-ms`` adds a
  delay per generated token, streamed or not, so a long generation takes long.
- Tokens are counted as whitespace-separated words (no tokenizer is needed; documented in
  docs/generate.md). ``max_tokens`` cuts the output after that many words (``finish_reason:
  length``). ``--max-tokens-cap`` makes a request asking for more answer 400, as vLLM does when
  ``max_tokens`` exceeds the model's context.
- ``--strict-fields`` answers 422 "Unexpected fields in the request: {...}" to any field outside the
  OpenAI API, as ``transformers serve`` does, so tests catch vLLM-only extensions.

Two ways to run it, both on a free port of 127.0.0.1 by default: :func:`start_in_thread` (in this
process, a background thread; a handle with ``.addr``, ``.base_url``, ``.stats()``, ``.config``
mutable at run time, and ``.stop()``), for tests; :func:`spawn_teacher` (a context manager running
``python -m distilled serve-teacher`` as its own process, waiting until it answers and always
stopping it), for benchmarks and the demo. Nothing else starts the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from distilled.generate.problems import latex_number, parse_problem, solve
from distilled.settings import add_arguments, from_args, option, split_list, to_argv

FAULT_KINDS = ("429", "500", "reset", "slow", "truncated_json", "length", "stream_cut")
DEFAULT_MODEL = "stand-in-teacher"

# The request fields of the OpenAI API (the openai package's ``CompletionCreateParams`` TypedDicts),
# which is what ``transformers serve`` validates against; it adds ``generation_config``. With
# ``--strict-fields`` anything else (vLLM's ``include_stop_str_in_output``, ``min_tokens``, ...) is
# answered 422 as ``transformers serve`` does, so tests catch a client that only works on vLLM.
OPENAI_CHAT_FIELDS = frozenset({
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias",
    "logprobs", "max_completion_tokens", "max_tokens", "metadata", "modalities", "n",
    "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_retention",
    "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier", "stop", "store",
    "stream", "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user",
    "verbosity", "web_search_options", "generation_config",
})
OPENAI_COMPLETION_FIELDS = frozenset({
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
    "generation_config",
})


@dataclass
class TeacherConfig:
    """Every knob of the stand-in teacher; each documented field is also its ``distill serve-teacher``
    flag (:mod:`distilled.settings`), in this order in ``--help``.

    ``faults`` and ``refuse_fields`` are tuples; the CLI gives them as comma lists ("429,500"),
    split by :func:`distilled.settings.from_args` (``sep=","``). The key itself (``api_key``) is never a
    flag (it would show in ``ps``): ``--api-key-env`` names the environment variable holding it.
    """

    model: str = option(DEFAULT_MODEL, help="model id served (requests may also say 'default')")
    seed: int = option(0, help="seed of the answers, wrong answers, latencies and faults (same seed, same run)")
    wrong_rate: float = option(0.2, help="share of deliberately wrong answers")
    latency_ms: float = option(0.0, help="mean latency per request in ms (0 = none)")
    latency_dist: str = option("lognormal", help="latency distribution around --latency-ms",
                               choices=("lognormal", "fixed"))
    latency_sigma: float = option(1.0, help="log-normal sigma (1.0: p99 ~ 10x median)")
    """log-normal shape: p99/median = exp(2.326 * sigma)"""
    capacity: int = option(0, help="max requests served at once; the rest queue (0 = no cap)")
    fault_rate: float = option(0.0, help="share of requests that get an injected fault")
    faults: tuple[str, ...] = option(
        FAULT_KINDS, sep=",", help=f"fault kinds to draw from (default {','.join(FAULT_KINDS)})")
    retry_after: float = option(1.0, help="seconds in the Retry-After of a 429")
    slow_ms: float = option(2000.0, help="extra delay of a 'slow' fault")
    reasoning_content: bool = option(
        False, help="return the reasoning in message.reasoning_content (like vLLM --reasoning-parser)")
    max_tokens_cap: int | None = option(
        None, help="answer 400 when a request asks for more max_tokens than this")
    api_key_env: str | None = option(None, help="require the key held in this environment variable")
    """When set and ``api_key`` is not, ``api_key`` is read from this variable (empty: an error)."""
    strict_fields: bool = option(
        False, help="answer 422 to request fields outside the OpenAI API, as `transformers serve` does "
                    "(catches vLLM-only fields such as include_stop_str_in_output)")
    token_ms: float = option(
        0.0, help="delay per generated token in ms (streamed: between chunks), so long answers take long")
    stream_usage: bool = option(True, flag="--no-stream-usage",
                                help="never send the usage chunk of a stream (clients must count)")
    stream_done: bool = option(True, flag="--no-stream-done",
                               help="end streams without 'data: [DONE]' (as transformers serve does)")
    tokenizer: str | None = option(
        None, metavar="DIR",
        help="the student's tokenizer (folder or 'qwen2.5'): answer logprobs/top_logprobs requests with "
             "realistic top-K log-probabilities over its tokens (logits distillation)")
    """With it, ``logprobs``/``top_logprobs`` (chat) and ``logprobs: K`` (+ ``echo``, completions) are
    answered with realistic top-K log-probabilities over that tokenizer's tokens of the answer
    (:mod:`distilled.kd.standin`), as a teacher sharing the student's vocabulary would; without it
    such requests get 400."""
    refuse_fields: tuple[str, ...] = option(
        (), sep=",", metavar="F,...", help="answer 400 to requests carrying these fields (e.g. stream_options), like a "
                                  "server without that option")
    api_key: str | None = None  # no flag: when set, requests need "Authorization: Bearer <key>"

    def __post_init__(self) -> None:
        self.faults = split_list(self.faults)  # Python callers may pass "429,500" too
        self.refuse_fields = split_list(self.refuse_fields)
        if self.api_key_env and self.api_key is None:
            self.api_key = os.environ.get(self.api_key_env) or None
            if self.api_key is None:
                raise ValueError(f"--api-key-env {self.api_key_env}: that environment variable is empty")
        bad = [f for f in self.faults if f not in FAULT_KINDS]
        if bad:
            raise ValueError(f"unknown fault kind(s) {bad}; choose from {', '.join(FAULT_KINDS)}")
        if self.latency_dist not in ("lognormal", "fixed"):
            raise ValueError(f"latency_dist must be 'lognormal' or 'fixed', got {self.latency_dist!r}")
        if not 0.0 <= self.wrong_rate <= 1.0 or not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError("wrong_rate and fault_rate must be within [0, 1]")


# --- answer composition (pure functions) --------------------------------------------------------
_OPENERS = ("Okay, let me solve this step by step.", "Let me work through this carefully.",
            "Alright, let's break this down.", "Let me think about what is being asked.")
_CHECKS = ("Let me double-check that.", "Wait, let me verify the arithmetic.", "That looks right.")
_WORD = re.compile(r"\S+")


def count_tokens(text: str) -> int:
    """The stand-in's token count: whitespace-separated words (cheap, tokenizer-free, documented)."""
    return len(text.split())


def cut_tokens(text: str, n: int) -> str:
    """The first ``n`` whitespace tokens of ``text``, original spacing kept."""
    if n <= 0:
        return ""
    for i, m in enumerate(_WORD.finditer(text)):
        if i == n - 1:
            return text[: m.end()]
    return text


def _wrong_value(rng: random.Random, value) -> Any:
    from fractions import Fraction

    if value.denominator == 1:
        return value + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    return Fraction(value.numerator + rng.choice([-1, 1, 2]), value.denominator) if rng.random() < 0.5 \
        else Fraction(value.numerator, value.denominator + 1)


def compose_answer(prompt: str, rng: random.Random, wrong_rate: float) -> tuple[str, str, dict]:
    """Return ``(reasoning, final_text, info)`` for a prompt; ``info`` says kind/answer/correct."""
    parsed = parse_problem(prompt)
    lines = [rng.choice(_OPENERS)]
    if parsed is None:
        k = rng.randint(2, 99)
        lines += ["I need to identify the quantities in the problem and combine them.",
                  f"Working through the details, the result comes out to {k}."]
        final = f"Combining the given quantities, the result is {k}.\n\nThe final answer is $\\boxed{{{k}}}$."
        return "\n".join(lines), final, {"kind": None, "answer": str(k), "correct": None}
    sol = solve(parsed)
    wrong = rng.random() < wrong_rate
    steps = list(sol.steps)
    answer = sol.answer
    if wrong:  # an arithmetic slip in the step that produces the answer (and no check after it)
        answer = latex_number(_wrong_value(rng, sol.value))
        steps = [x for x in steps if not x.startswith("Check:")]
        tail = f" {sol.answer}."
        for i in range(len(steps) - 1, -1, -1):
            if steps[i].endswith(tail):
                steps[i] = steps[i][: -len(tail)] + f" {answer}."
                break
    lines += steps
    if rng.random() < 0.5:
        lines.append(rng.choice(_CHECKS))
    lines.append(f"So the answer is {answer}.")
    final = f"{steps[-1]}\n\nThe final answer is $\\boxed{{{answer}}}$."
    return "\n".join(lines), final, {"kind": parsed.kind, "answer": answer, "correct": not wrong}


def r1_text(reasoning: str, final: str) -> str:
    """The R1 layout: ``<think>\\n`` reasoning ``\\n</think>\\n\\n`` final."""
    return f"<think>\n{reasoning}\n</think>\n\n{final}"


def split_r1(text: str) -> tuple[str | None, str]:
    """Split (possibly truncated) R1 text into ``(reasoning_content, content)`` like vLLM's parser."""
    if not text.startswith("<think>\n"):
        return None, text
    body = text[len("<think>\n"):]
    if "\n</think>\n\n" in body:
        r, c = body.split("\n</think>\n\n", 1)
        return r, c
    return body, ""


# --- the server ---------------------------------------------------------------------------------
@dataclass
class _Stats:
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    serving: int = 0
    max_serving: int = 0
    completed: int = 0
    status: dict = field(default_factory=dict)
    faults: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)
    rejected_fields: dict = field(default_factory=dict)  # "a,b" -> times refused by --strict-fields
    completion_tokens: int = 0
    latency_sum: float = 0.0  # sampled service latencies (s), so benches know the realised mean
    latency_count: int = 0
    started: float = field(default_factory=time.time)


@dataclass
class _Asked:
    """A checked request: what to answer and how."""

    prompt: str  # the text answered: the last user turn, or the completion prompt
    prompt_all: str  # every turn's text, counted for usage.prompt_tokens
    max_tokens: int
    n: int
    lp_k: int | None  # top log-probabilities asked for (None: none)
    stream: bool


class TeacherServer:
    """The aiohttp application and its state; :meth:`make_app` builds the routes."""

    def __init__(self, config: TeacherConfig | None = None):
        self.config = config or TeacherConfig()
        self.stats = _Stats()
        self._sem: asyncio.Semaphore | None = None
        self._sem_cap = None
        self._fault_rng = random.Random(f"faults:{self.config.seed}")
        self._lat_rng = random.Random(f"latency:{self.config.seed}")
        self._free_rng = random.Random()
        self._logprobs = None  # distilled.kd.standin.StandinLogprobs, built on first use

    # helpers
    def _semaphore(self) -> asyncio.Semaphore | None:
        cap = self.config.capacity
        if cap <= 0:
            return None
        if self._sem is None or self._sem_cap != cap:
            self._sem, self._sem_cap = asyncio.Semaphore(cap), cap
        return self._sem

    def _latency(self) -> float:
        c = self.config
        if c.latency_ms <= 0:
            return 0.0
        if c.latency_dist == "fixed":
            return c.latency_ms / 1000.0
        mu = math.log(c.latency_ms / 1000.0) - c.latency_sigma ** 2 / 2  # mean = latency_ms
        return self._lat_rng.lognormvariate(mu, c.latency_sigma)

    def _pick_fault(self) -> str | None:
        c = self.config
        if c.fault_rate > 0 and c.faults and self._fault_rng.random() < c.fault_rate:
            return self._fault_rng.choice(c.faults)
        return None

    def _count(self, status: int) -> None:
        s = self.stats.status
        s[str(status)] = s.get(str(status), 0) + 1

    def _json(self, obj: Any, status: int = 200, headers: dict | None = None):
        from aiohttp import web

        self._count(status)
        return web.Response(body=json.dumps(obj).encode(), status=status, headers=headers,
                            content_type="application/json")

    def _error(self, status: int, message: str, etype: str, headers: dict | None = None):
        return self._json({"error": {"message": message, "type": etype, "code": status}}, status, headers)

    def _rng_for(self, text: str, seed: Any, index: int) -> random.Random:
        if seed is None:
            return random.Random(self._free_rng.getrandbits(64))
        h = hashlib.blake2b(f"{self.config.seed}|{seed}|{index}|{text}".encode(), digest_size=8).hexdigest()
        return random.Random(h)

    # routes
    async def models(self, request):
        return self._json({"object": "list", "data": [{"id": self.config.model, "object": "model",
                                                        "owned_by": "distilled", "created": int(self.stats.started)}]})

    async def stats_view(self, request):
        d = asdict(self.stats)
        d["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.config).items()
                       if k != "api_key"}
        return self._json(d)

    async def stats_reset(self, request):
        in_flight, serving = self.stats.in_flight, self.stats.serving
        self.stats = _Stats(in_flight=in_flight, serving=serving, max_in_flight=in_flight, max_serving=serving)
        return self._json({"ok": True})

    async def chat(self, request):
        return await self._handle(request, chat=True)

    async def completions(self, request):
        return await self._handle(request, chat=False)

    async def _handle(self, request, chat: bool):
        st = self.stats
        st.requests += 1
        st.paths[request.path] = st.paths.get(request.path, 0) + 1
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        try:
            return await self._handle_inner(request, chat)
        finally:
            st.in_flight -= 1

    async def _handle_inner(self, request, chat: bool):
        """Check the request, maybe inject a fault, then answer it: each step below may answer early."""
        body = await self._read_body(request, chat)
        if not isinstance(body, dict):
            return body  # an error response
        asked = self._parse(body, chat)
        if not isinstance(asked, _Asked):
            return asked
        fault = self._pick_fault()
        if fault:
            st = self.stats
            st.faults[fault] = st.faults.get(fault, 0) + 1
        early = self._fault_response(request, fault)
        if early is not None:
            return early
        return await self._answer(request, chat, body, asked, fault)

    async def _read_body(self, request, chat: bool):
        """The JSON body, or the error a real server gives: 401 (key), 400 (not a JSON object), 422
        (``--strict-fields``), 400 (``--refuse-fields``), 404 (another model)."""
        c = self.config
        if c.api_key is not None:
            if request.headers.get("Authorization", "") != f"Bearer {c.api_key}":
                return self._error(401, "Incorrect API key provided.", "authentication_error")
        try:
            body = json.loads(await request.read())
            if not isinstance(body, dict):
                raise ValueError("body is not a JSON object")
        except ValueError as exc:
            return self._error(400, f"invalid JSON body: {exc}", "invalid_request_error")
        if c.strict_fields:
            unexpected = set(body) - (OPENAI_CHAT_FIELDS if chat else OPENAI_COMPLETION_FIELDS)
            if unexpected:
                key = ",".join(sorted(unexpected))
                self.stats.rejected_fields[key] = self.stats.rejected_fields.get(key, 0) + 1
                msg = f"Unexpected fields in the request: {unexpected}"
                self._count(422)
                from aiohttp import web

                # transformers serve answers FastAPI-style {"detail": ...}; "error" too for OpenAI clients
                return web.Response(body=json.dumps({"detail": msg, "error": {
                    "message": msg, "type": "invalid_request_error", "code": 422}}).encode(),
                    status=422, content_type="application/json")
        refused = sorted(set(c.refuse_fields) & set(body))
        if refused:
            return self._error(400, f"unsupported field(s): {', '.join(refused)}", "invalid_request_error")
        model = body.get("model")
        if model not in (c.model, None, "default"):
            return self._error(404, f"The model `{model}` does not exist.", "NotFoundError")
        return body

    def _parse(self, body: dict, chat: bool):
        """What to answer (:class:`_Asked`), or a 400 for a malformed or unservable request."""
        c = self.config
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                return self._error(400, "'messages' must be a non-empty list", "invalid_request_error")
            user = [m.get("content") or "" for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
            prompt = user[-1] if user else ""
            prompt_all = " ".join(str(m.get("content") or "") for m in msgs if isinstance(m, dict))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list):
                prompt = prompt[0] if prompt else ""
            if not isinstance(prompt, str):
                return self._error(400, "'prompt' must be a string", "invalid_request_error")
            prompt_all = prompt
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 16384
        try:
            max_tokens = int(max_tokens)
            n = int(body.get("n") or 1)
        except (TypeError, ValueError):
            return self._error(400, "'max_tokens' and 'n' must be integers", "invalid_request_error")
        if chat:
            lp_k = int(body.get("top_logprobs") or 0) if body.get("logprobs") else None
        else:
            lp_k = None if body.get("logprobs") in (None, False) else int(body.get("logprobs") or 0)
        if lp_k is not None:
            if not c.tokenizer:
                return self._error(400, "this stand-in teacher serves logprobs only when started with --tokenizer",
                                   "invalid_request_error")
            if not 0 <= lp_k <= 20:
                return self._error(400, f"top logprobs must be 0..20, got {lp_k}", "invalid_request_error")
            if body.get("stream"):
                return self._error(400, "logprobs with stream are not supported by the stand-in teacher",
                                   "invalid_request_error")
        if c.max_tokens_cap is not None and max_tokens > c.max_tokens_cap:
            return self._error(400, f"max_tokens={max_tokens} exceeds this model's limit of {c.max_tokens_cap} "
                                    "tokens", "BadRequestError")
        return _Asked(prompt, prompt_all, max_tokens, n, lp_k, bool(body.get("stream")))

    def _fault_response(self, request, fault: str | None):
        """The faults answered before any work: 429 (with Retry-After), 500, a reset connection."""
        if fault == "429":
            ra = self.config.retry_after
            return self._error(429, "Rate limit reached; retry later.", "rate_limit_error",
                               headers={"Retry-After": str(int(ra)) if float(ra).is_integer() else str(ra)})
        if fault == "500":
            return self._error(500, "Internal server error (injected).", "InternalServerError")
        if fault == "reset":
            from aiohttp import web

            self._reset(request)
            self._count(0)
            return web.Response(status=500)  # never sent: the transport is gone
        return None

    async def _answer(self, request, chat: bool, body: dict, asked: _Asked, fault: str | None):
        """Wait for a slot and the latency, compose the choices, send them (streamed or whole)."""
        c = self.config
        sem = self._semaphore()
        if sem is not None:
            await sem.acquire()
        st = self.stats
        st.serving += 1
        st.max_serving = max(st.max_serving, st.serving)
        try:
            delay = self._latency()
            st.latency_sum += delay
            st.latency_count += 1
            delay += c.slow_ms / 1000.0 if fault == "slow" and not asked.stream else 0.0
            if delay > 0:
                await asyncio.sleep(delay)
            choices, comp_tokens = [], 0
            for i in range(asked.n):
                choice, toks = self._choice(asked.prompt, body.get("seed"), i, asked.max_tokens, chat,
                                            fault == "length")
                if asked.lp_k is not None:
                    self._attach_logprobs(choice, asked.prompt, body, i, asked.lp_k, chat)
                choices.append(choice)
                comp_tokens += toks
            prompt_tokens = count_tokens(asked.prompt_all)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": comp_tokens,
                     "total_tokens": prompt_tokens + comp_tokens}
            head = {"id": f"cmpl-{st.requests}", "created": int(time.time()), "model": c.model}
            if asked.stream:
                opts = body.get("stream_options")
                want_usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
                resp, whole = await self._stream(request, chat, choices, usage if want_usage else None, fault, head)
                if whole:
                    st.completion_tokens += comp_tokens
                    st.completed += 1
                return resp
            if c.token_ms > 0:
                await asyncio.sleep(comp_tokens * c.token_ms / 1000.0)
        finally:
            st.serving -= 1
            if sem is not None:
                sem.release()
        st.completion_tokens += comp_tokens
        st.completed += 1
        resp = {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": usage}
        if fault in ("truncated_json", "stream_cut"):
            return await self._torn_body(request, resp, fault)
        return self._json(resp)

    async def _torn_body(self, request, resp: dict, fault: str):
        """A whole (non-streamed) answer broken by ``fault``: half a JSON body with status 200
        (``truncated_json``), or headers promising the whole body, half of it, then an RST."""
        from aiohttp import web

        raw = json.dumps(resp).encode()
        self._count(200)
        if fault == "truncated_json":
            return web.Response(body=raw[: max(1, len(raw) // 2)], content_type="application/json")
        out = web.StreamResponse(status=200, headers={"Content-Type": "application/json",
                                                      "Content-Length": str(len(raw))})
        await out.prepare(request)
        await out.write(raw[: len(raw) // 2])
        self._reset(request)
        return out

    async def _stream(self, request, chat: bool, choices: list[dict], usage: dict | None, fault: str | None,
                      head: dict) -> tuple[Any, bool]:
        """Send ``choices`` as server-sent events, one whitespace token per chunk (vLLM's shape);
        returns ``(response, whole)``, ``whole`` False when a fault cut the stream."""
        from aiohttp import web

        c = self.config
        obj = "chat.completion.chunk" if chat else "text_completion"
        events: list[dict] = []  # the choices payloads, one per chunk; content chunks are marked
        for ch in choices:
            i = ch["index"]
            if chat:
                msg = ch["message"]
                events.append({"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
                for key in ("reasoning_content", "content"):
                    for piece in _pieces(msg.get(key) or ""):
                        events.append({"index": i, "delta": {key: piece}, "finish_reason": None, "_tok": 1})
                events.append({"index": i, "delta": {}, "finish_reason": ch["finish_reason"]})
            else:
                for piece in _pieces(ch["text"]):
                    events.append({"index": i, "text": piece, "finish_reason": None, "logprobs": None, "_tok": 1})
                events.append({"index": i, "text": "", "finish_reason": ch["finish_reason"], "logprobs": None})
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache"})
        self._count(200)
        await resp.prepare(request)
        half = len(events) // 2
        for k, ev in enumerate(events):
            if k == half and fault == "stream_cut":
                self._reset(request)
                return resp, False
            if k == half and fault == "slow":
                await asyncio.sleep(c.slow_ms / 1000.0)
            tok = ev.pop("_tok", 0)
            if tok and c.token_ms > 0:
                await asyncio.sleep(c.token_ms / 1000.0)
            line = b"data: " + json.dumps({**head, "object": obj, "choices": [ev]}).encode() + b"\n\n"
            if k == half and fault == "truncated_json":
                await resp.write(line[: len(line) // 2] + b"\n\n")
                await resp.write_eof()
                return resp, False
            await resp.write(line)
        if usage is not None and c.stream_usage:
            await resp.write(b"data: " + json.dumps({**head, "object": obj, "choices": [], "usage": usage}).encode()
                             + b"\n\n")
        if c.stream_done:
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp, True

    def _attach_logprobs(self, choice: dict, prompt: str, body: dict, index: int, k: int, chat: bool) -> None:
        """Top-K log-probabilities over the student tokenizer's tokens of this answer (KD capture)."""
        if self._logprobs is None:
            from distilled.kd.standin import StandinLogprobs

            self._logprobs = StandinLogprobs(self.config.tokenizer)
        key = f"{self.config.seed}|{body.get('seed')}|{index}"
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        if chat:
            msg = choice["message"]
            from distilled.generate.client import merge_reasoning

            text = merge_reasoning(msg.get("content"), msg.get("reasoning_content"))
            choice["logprobs"] = self._logprobs.chat(text, max(k, 1), f"{key}|{prompt}",
                                                     choice["finish_reason"] == "stop", as_ids)
        else:
            echo = bool(body.get("echo"))
            choice["logprobs"] = self._logprobs.completion(prompt, choice["text"], max(k, 1), key, echo, as_ids)
            if echo:
                choice["text"] = prompt + choice["text"]

    def _choice(self, prompt: str, seed: Any, index: int, max_tokens: int, chat: bool,
                force_length: bool) -> tuple[dict, int]:
        rng = self._rng_for(prompt, seed, index)
        reasoning, final, _info = compose_answer(prompt, rng, self.config.wrong_rate)
        full = r1_text(reasoning, final)
        if not chat:
            full = _continuation(prompt, full)
        total = count_tokens(full)
        limit = max_tokens
        if force_length:
            limit = min(limit, max(1, total // 2))
        finish = "stop"
        if total > limit:
            full, finish = cut_tokens(full, limit), "length"
        toks = count_tokens(full)
        if not chat:
            return {"index": index, "text": full, "finish_reason": finish, "logprobs": None}, toks
        msg: dict[str, Any] = {"role": "assistant"}
        if self.config.reasoning_content:
            r, content = split_r1(full)
            msg["content"] = content
            msg["reasoning_content"] = r
        else:
            msg["content"] = full
        return {"index": index, "message": msg, "finish_reason": finish}, toks

    @staticmethod
    def _reset(request) -> None:
        """Abort the TCP connection with an RST (SO_LINGER 0), as a crashed proxy would."""
        tr = request.transport
        if tr is None:
            return
        sock = tr.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tr.abort()

    def make_app(self):
        """Build the aiohttp application (routes only; the caller runs it)."""
        from aiohttp import web

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.stats_view)
        app.router.add_post("/stats/reset", self.stats_reset)
        return app


def _pieces(text: str) -> list[str]:
    """Split ``text`` into streamed chunks, one whitespace token each, joining back exactly."""
    pieces = re.findall(r"\s*\S+", text)
    tail = text[sum(map(len, pieces)):]
    if tail:
        pieces.append(tail)
    return pieces


def _continuation(prompt: str, full: str) -> str:
    """For ``/v1/completions``: continue a prompt that may already hold part of an R1 answer.

    A prompt that already closed ``</think>`` gets only the boxed final line; one inside
    ``<think>`` (e.g. budget forcing appended "Wait") gets the rest of the reasoning and the final.
    """
    if "</think>" in prompt:
        box = full[full.rfind("The final answer is"):] if "The final answer is" in full else full
        return " " + box
    if "<think>" in prompt:
        return full[len("<think>\n"):]
    return full


# --- running it -----------------------------------------------------------------------------------
class _Address:
    """``addr`` and ``base_url`` from ``host`` and ``port``: the same on both kinds of handle, so code
    (and tests) can take either."""

    host: str
    port: int

    @property
    def addr(self) -> str:
        """``host:port`` (what ``--api-addr`` takes)."""
        return f"{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """``http://host:port/v1`` (what ``--base-url`` takes)."""
        return f"http://{self.host}:{self.port}/v1"


class RunningServer(_Address):
    """Handle to a server started by :func:`start_in_thread`."""

    def __init__(self, server: TeacherServer, host: str, port: int, loop, thread, runner):
        self.server, self.host, self.port = server, host, port
        self._loop, self._thread, self._runner = loop, thread, runner

    @property
    def config(self) -> TeacherConfig:
        return self.server.config

    def stats(self) -> dict:
        """A snapshot of the server's counters (same as ``GET /stats``)."""
        return asdict(self.server.stats)

    def reset_stats(self) -> None:
        async def _r():
            s = self.server.stats
            self.server.stats = _Stats(in_flight=s.in_flight, serving=s.serving, max_in_flight=s.in_flight,
                                       max_serving=s.serving)

        asyncio.run_coroutine_threadsafe(_r(), self._loop).result(10)

    def stop(self) -> None:
        """Stop serving (closes the listening socket and open connections) and join the thread."""
        if not self._thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        with contextlib.suppress(Exception):
            fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> "RunningServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def start_in_thread(config: TeacherConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> RunningServer:
    """Start the stand-in teacher in a background thread (its own event loop); port 0 = a free one.

    The in-process way: use it when a test needs the server object (``.config`` changed at run time,
    ``.stats()`` without HTTP) and should not pay a process start. For a separate process (a
    benchmark's server must not share the client's CPU; the demo runs the real command) use
    :func:`spawn_teacher`.

    >>> srv = start_in_thread(TeacherConfig(latency_ms=5))
    >>> srv.addr  # doctest: +SKIP
    '127.0.0.1:40123'
    >>> srv.stop()
    """
    from aiohttp import web

    server = TeacherServer(config)
    loop = asyncio.new_event_loop()
    ready: dict[str, Any] = {}
    started = threading.Event()

    def _run() -> None:
        asyncio.set_event_loop(loop)

        async def _start():
            runner = web.AppRunner(server.make_app(), access_log=None, handle_signals=False, handler_cancellation=True)
            await runner.setup()
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
            ready["runner"] = runner
            ready["port"] = runner.addresses[0][1]

        try:
            loop.run_until_complete(_start())
        except BaseException as exc:  # surface bind errors to the caller
            ready["error"] = exc
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    th = threading.Thread(target=_run, name="teacher-server", daemon=True)
    th.start()
    started.wait(30)
    if "error" in ready:
        raise ready["error"]
    return RunningServer(server, host, ready["port"], loop, th, ready["runner"])


# --- as a separate process ------------------------------------------------------------------------
API_KEY_ENV = "DISTILLED_TEACHER_API_KEY"
"""The variable :func:`spawn_teacher` hands a :class:`TeacherConfig`'s ``api_key`` through (never argv)."""


class TeacherStartError(RuntimeError):
    """The spawned ``serve-teacher`` exited, or did not answer in time; the message names its log.

    ``returncode`` is the exit status, or None when it was still running at the deadline.
    """

    def __init__(self, message: str, returncode: int | None, log: Path | None):
        super().__init__(message)
        self.returncode, self.log = returncode, log


@dataclass
class SpawnedTeacher(_Address):
    """Handle to a ``distill serve-teacher`` process started by :func:`spawn_teacher`."""

    proc: subprocess.Popen
    host: str
    port: int
    cmd: list[str]
    log: Path | None = None

    def stats(self) -> dict:
        """The server's counters (``GET /stats``)."""
        with urllib.request.urlopen(f"http://{self.addr}/stats", timeout=10) as r:
            return json.loads(r.read())

    def reset_stats(self) -> None:
        """Zero the counters (``POST /stats/reset``)."""
        req = urllib.request.Request(f"http://{self.addr}/stats/reset", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def teacher_flags(config: TeacherConfig) -> list[str]:
    """The ``serve-teacher`` flags that rebuild ``config`` (options that differ from their default).

    ``api_key`` (no flag) and ``api_key_env`` are left out: :func:`spawn_teacher` passes the key
    through the environment.

    >>> teacher_flags(TeacherConfig(capacity=4, faults=("429", "500"), stream_done=False))
    ['--capacity', '4', '--faults', '429,500', '--no-stream-done']
    """
    return to_argv(config, skip=("api_key_env",))


def _wait_ready(proc: subprocess.Popen, url: str, timeout: float, log: Path | None) -> None:
    """Poll ``url`` until it answers; raise :class:`TeacherStartError` if ``proc`` exits first."""
    where = f"log: {log}" if log is not None else "no log: pass log= to keep its output"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise TeacherStartError(f"serve-teacher exited {proc.returncode} ({where})", proc.returncode, log)
        try:
            urllib.request.urlopen(url, timeout=1).read()
        except OSError:
            if time.monotonic() > deadline:
                raise TeacherStartError(f"serve-teacher did not start within {timeout:g} s ({where})", None, log)
            time.sleep(0.1)
            continue
        if proc.poll() is not None:  # another server answered on that port, ours failed to bind
            raise TeacherStartError(f"serve-teacher exited {proc.returncode} ({where})", proc.returncode, log)
        return


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the process group (the server shuts down cleanly), SIGKILL after ``grace`` s; reap it."""
    if proc.poll() is None:  # once reaped its pid may belong to someone else: never signal it then
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def spawn_teacher(flags: Sequence[str] | TeacherConfig = (), *, host: str = "127.0.0.1", port: int | None = None,
                  log: Path | str | None = None, python: str = sys.executable, env: Mapping[str, str] | None = None,
                  cwd: Path | str | None = None, timeout: float = 60.0, grace: float = 10.0,
                  echo: Callable[[str], None] | None = None) -> Iterator[SpawnedTeacher]:
    """Run ``python -m distilled serve-teacher`` in its own process for the ``with`` block.

    Which to use: :func:`start_in_thread` when the test needs the server object itself (change
    ``.config`` at run time, read ``.stats()`` without HTTP) and start-up cost matters; this one
    when the teacher must be a real, separate process: its CPU is not the client's (benchmarks),
    it is the very command a user runs (the demo), or the test is about the CLI.

    ``flags`` are ``serve-teacher`` flags (``--port``/``--host`` are added from ``port``/``host``;
    port None = a free one) or a :class:`TeacherConfig` (see :func:`teacher_flags`; its
    ``api_key`` goes through the environment as ``$DISTILLED_TEACHER_API_KEY``). Its output is
    appended to ``log`` (None: discarded). ``echo``, when given, gets the shell-quoted command first.
    Returns once ``GET /v1/models`` answers; :class:`TeacherStartError` (naming the log) when the
    process exits first or ``timeout`` seconds pass. On leaving the block, exception or not, the
    process group gets SIGTERM, then SIGKILL after ``grace`` seconds, and the child is reaped.

    >>> with spawn_teacher(TeacherConfig(seed=3)) as t:  # doctest: +SKIP
    ...     t.stats()["config"]["seed"]
    3
    """
    extra_env: dict[str, str] = {}
    if isinstance(flags, TeacherConfig):
        argv = teacher_flags(flags)
        if flags.api_key:
            extra_env[API_KEY_ENV] = flags.api_key
            argv += ["--api-key-env", API_KEY_ENV]
    else:
        argv = list(flags)
    port = port or _free_port(host)
    cmd = [python, "-m", "distilled", "serve-teacher", "--host", host, "--port", str(port), *argv]
    child_env = None if env is None and not extra_env else {**(os.environ if env is None else env), **extra_env}
    if echo is not None:
        echo(shlex.join(cmd))
    log = Path(log) if log is not None else None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") if log is not None else open(os.devnull, "wb") as out:  # the child keeps its copy
        proc = subprocess.Popen(cmd, cwd=cwd, env=child_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_ready(proc, f"http://{host}:{port}/v1/models", timeout, log)
        yield SpawnedTeacher(proc, host, port, cmd, log)
    finally:
        _stop(proc, grace)


@dataclass
class ServeArgs:
    """Where ``distill serve-teacher`` listens (flags before the :class:`TeacherConfig` ones)."""

    port: int = option(help="TCP port to listen on")
    host: str = option("127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")


def cmd_serve(args: argparse.Namespace) -> int:
    """``distill serve-teacher``: serve until SIGINT/SIGTERM."""
    from aiohttp import web

    try:
        cfg = from_args(TeacherConfig, args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    where = from_args(ServeArgs, args)
    server = TeacherServer(cfg)
    lat = f"{cfg.latency_ms:g} ms mean ({cfg.latency_dist})" if cfg.latency_ms > 0 else "no added latency"
    print(f"stand-in teacher (NOT a real model) on http://{where.host}:{where.port}/v1, model {cfg.model!r}; "
          f"{lat}; capacity {cfg.capacity or 'unlimited'}; wrong-rate {cfg.wrong_rate:g}; "
          f"fault-rate {cfg.fault_rate:g}", flush=True)
    web.run_app(server.make_app(), host=where.host, port=where.port, access_log=None, print=None,
                handle_signals=True, handler_cancellation=True)
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``distill serve-teacher``."""
    p = sub.add_parser("serve-teacher", help="serve the offline stand-in teacher (OpenAI-compatible HTTP)",
                       description="A stand-in teacher for offline use, tests and the demo: an OpenAI-compatible "
                                   "server that solves `distill problems synth` problems R1-style. It is NOT "
                                   "DeepSeek-R1; use vLLM/SGLang/MindIE for real distillation.")
    add_arguments(p, ServeArgs)
    add_arguments(p, TeacherConfig)
    p.set_defaults(func=cmd_serve)
