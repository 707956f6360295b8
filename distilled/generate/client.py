"""Async OpenAI-compatible client (aiohttp) for teacher generation and evaluation.

Why not the ``openai`` package or open-r1's loop: a multi-day generation run needs (1) concurrency
bounded by in-flight *requests* so a server is kept exactly as busy as asked and a slow request
never blocks a batch, (2) several endpoints balanced by least-in-flight, with a failing endpoint
taken out for a while and re-probed, (3) retries with exponential backoff and jitter that honour
``Retry-After`` (capped, so a server answering ``Retry-After: 86400`` cannot park a request for a
day) on 429/5xx/timeouts/connection errors/malformed JSON, and (4) fail-fast, clear errors on
400/401/403/404 instead of retrying a request that can never succeed. open-r1 instead sleeps a
fixed 10 s on any error and reads ``choices`` without checking the HTTP status.

Streaming (``stream=True``): the request carries ``"stream": true`` and
``stream_options.include_usage``; the answer is read as server-sent events with an *idle* timeout
(no bytes for ``idle_timeout`` seconds) instead of a total one, so a 32k-token generation is never
cut at a fixed wall time. A stream that ends without a ``finish_reason`` for every choice (the
connection dropped mid-way) is a retryable failure like any other; the generation restarts from
scratch (OpenAI-compatible servers cannot resume one). ``data: [DONE]`` is optional
(``transformers serve`` 5.x never sends it). When the server sends no ``usage`` chunk,
``usage`` is ``{"completion_tokens": <content chunks received>, "usage_source": "counted_chunks"}``
(vLLM sends one token per chunk, so the count is close but not exact).

Usage::

    async with ChatClient(["127.0.0.1:8000"], model="deepseek-r1") as c:
        r = await c.chat([{"role": "user", "content": "1+1?"}], max_tokens=512, temperature=0.6)
        print(r.text, r.finish_reason, r.usage)

``r.text`` already applies the ``reasoning_content`` rule (see :func:`merge_reasoning`).
The API key is read from the environment variable named by ``api_key_env`` and never printed,
logged or written anywhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

try:  # a faster JSON codec when present; json otherwise
    import orjson as _orjson  # type: ignore

    def _dumps(obj: Any) -> bytes:
        return _orjson.dumps(obj)

    _loads = _orjson.loads
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8")

    _loads = json.loads

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})
# Per-attempt limits. Without streaming the whole generation must arrive within one timeout:
# 32,768 tokens at 10 tokens/s per sequence (a busy server batching hundreds of requests) is
# ~3,300 s, so one hour. With streaming only silence counts.
DEFAULT_REQUEST_TIMEOUT = 3600.0
DEFAULT_IDLE_TIMEOUT = 600.0
DEFAULT_RETRY_AFTER_MAX = 60.0


class APIError(Exception):
    """Base class of the errors this client raises."""


class FatalAPIError(APIError):
    """A request that cannot succeed by retrying (400/401/403/404/422 and other 4xx).

    ``status`` is the HTTP status; ``endpoint`` the base URL that answered.
    """

    def __init__(self, message: str, status: int | None = None, endpoint: str | None = None):
        super().__init__(message)
        self.status = status
        self.endpoint = endpoint


class RetriesExhausted(APIError):
    """Every attempt failed with a retryable error; ``reason`` is the last one; ``unreachable``
    says the last attempt could not even connect (nothing listening, DNS, refused)."""

    def __init__(self, message: str, reason: str, attempts: int, unreachable: bool = False):
        super().__init__(message)
        self.reason = reason
        self.attempts = attempts
        self.unreachable = unreachable


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None, endpoint_fault: bool = True,
                 unreachable: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.endpoint_fault = endpoint_fault
        self.unreachable = unreachable


def merge_reasoning(content: str | None, reasoning: str | None) -> str:
    """The ``reasoning_content`` rule: ``"<think>\\n" + reasoning + "\\n</think>\\n\\n" + content``.

    vLLM/SGLang reasoning parsers split R1's output into ``reasoning_content`` and ``content``;
    merging restores the layout the student is trained on. Without reasoning, ``content`` as is,
    except that a missing opening ``<think>`` (R1's template puts it in the prompt) is restored.

    >>> merge_reasoning("The answer is 2.", "1+1=2")
    '<think>\\n1+1=2\\n</think>\\n\\nThe answer is 2.'
    """
    if reasoning:
        return "<think>\n" + reasoning + "\n</think>\n\n" + (content or "")
    content = content or ""
    if "</think>" in content and "<think>" not in content:
        # DeepSeek-R1's chat template ends the prompt with "<think>\n", so a server without a
        # reasoning parser returns the reasoning without its opening tag: put it back.
        return "<think>\n" + content
    return content


@dataclass
class ChatResult:
    """One completed request. ``text``/``finish_reason``/``reasoning_content`` are choice 0's;
    ``choices`` holds ``(text, finish_reason, reasoning_content)`` for every choice (``n`` > 1)."""

    text: str
    finish_reason: str | None
    usage: dict
    reasoning_content: str | None
    endpoint: str
    attempts: int
    choices: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    model: str | None = None
    logprobs: Any = None  # choice 0's ``logprobs`` object when requested (non-streamed; distilled.kd)
    prompt_logprobs: Any = None  # vLLM's ``prompt_logprobs`` (choice or response level), when requested


def normalize_endpoint(ep: str) -> str:
    """``host:port`` -> ``http://host:port/v1``; a URL with a scheme is kept (trailing ``/`` cut).

    >>> normalize_endpoint("127.0.0.1:8000"), normalize_endpoint("https://api.x.com/v1/")
    ('http://127.0.0.1:8000/v1', 'https://api.x.com/v1')
    """
    ep = ep.strip()
    if not ep:
        raise ValueError("empty endpoint")
    if "://" in ep:
        return ep.rstrip("/")
    return f"http://{ep.rstrip('/')}/v1"


@dataclass
class _Endpoint:
    url: str
    in_flight: int = 0
    failures: int = 0  # consecutive endpoint faults
    down_until: float = 0.0
    cooldown: float = 0.0
    requests: int = 0
    errors: int = 0


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # HTTP-date form
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _server_message(raw: bytes) -> str:
    try:
        obj = json.loads(raw)
        if isinstance(obj, dict):
            err = obj.get("error", obj)
            msg = err.get("message") if isinstance(err, dict) else err
            if msg:
                return str(msg)[:500]
            if "detail" in obj:
                return str(obj["detail"])[:500]
    except ValueError:
        pass
    return raw[:300].decode("utf-8", "replace")


class ChatClient:
    """Async client over one or more OpenAI-compatible endpoints. Use as ``async with``.

    Args:
        endpoints: ``"host:port"`` values or base URLs (``https://host/v1``).
        model: model name sent in every request.
        api_key_env: name of the environment variable holding the API key (sent as a Bearer
            token). The key itself is never printed, logged or written.
        max_concurrent: the most requests in flight at once, over all endpoints.
        max_retries: retries after the first attempt before :class:`RetriesExhausted`. Connection
            failures count too, also while every endpoint is taken out (a dead server fails the
            request after ``max_retries + 1`` attempts instead of parking it).
        request_timeout: seconds for one non-streaming attempt (connect + generate + read).
        stream: request server-sent events and read them with ``idle_timeout``.
        idle_timeout: streaming only: seconds without a byte before the attempt is abandoned.
        retry_after_max: the most seconds a ``Retry-After`` header may make a request wait.
        backoff_base, backoff_max: exponential backoff ``min(max, base * 2**k)`` with 50-100% jitter.
        failure_threshold: consecutive faults (connection, timeout, 5xx, bad JSON) that take an
            endpoint out; it is re-probed by a single request after ``cooldown`` seconds,
            doubling up to ``cooldown_max`` while it keeps failing.
        on_event: optional ``callback(kind, info)`` for ``"retry"``, ``"endpoint_down"`` and
            ``"endpoint_up"`` (progress bars, logs). Called in the event loop; keep it cheap.
    """

    def __init__(self, endpoints: Sequence[str] | str, model: str, api_key_env: str | None = None,
                 max_concurrent: int = 64, max_retries: int = 8, request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 connect_timeout: float = 10.0, backoff_base: float = 1.0, backoff_max: float = 60.0,
                 failure_threshold: int = 5, cooldown: float = 2.0, cooldown_max: float = 60.0,
                 on_event: Callable[[str, dict], None] | None = None, stream: bool = False,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT, retry_after_max: float = DEFAULT_RETRY_AFTER_MAX):
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ValueError("at least one endpoint is needed")
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.endpoints = [_Endpoint(normalize_endpoint(e)) for e in endpoints]
        self.model = model
        self.api_key_env = api_key_env
        self.max_concurrent = max_concurrent
        self.max_retries = max_retries
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.failure_threshold = max(1, failure_threshold)
        self.cooldown = cooldown
        self.cooldown_max = cooldown_max
        self.on_event = on_event
        self.stream = stream
        self.idle_timeout = idle_timeout
        self.retry_after_max = retry_after_max
        self._stream_options_ok = True  # cleared when a server refuses stream_options
        self.usage_counted = 0  # streamed answers whose usage was counted because the server sent none
        self._headers = {"Content-Type": "application/json",
                         "Accept": "text/event-stream" if stream else "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise FatalAPIError(f"--api-key-env {api_key_env}: environment variable {api_key_env} is not set "
                                    "or empty")
            self._headers["Authorization"] = f"Bearer {key}"
        self._session = None
        self._sem: asyncio.Semaphore | None = None
        self._rr = 0
        self._rng = random.Random()
        # counters (read by progress bars)
        self.in_flight = 0
        self.requests = 0
        self.retries = 0
        self.failures = 0

    def __repr__(self) -> str:  # never shows the key
        return (f"ChatClient(endpoints={[e.url for e in self.endpoints]}, model={self.model!r}, "
                f"max_concurrent={self.max_concurrent})")

    async def __aenter__(self) -> "ChatClient":
        await self.open()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def open(self) -> None:
        """Create the one shared ``ClientSession`` (connection reuse keeps CPU overhead low)."""
        import aiohttp

        if self._session is not None:
            return
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300,
                                         keepalive_timeout=300, enable_cleanup_closed=True)
        timeout = aiohttp.ClientTimeout(total=self.request_timeout, sock_connect=self.connect_timeout)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",),
                                              json_serialize=json.dumps, raise_for_status=False)
        self._sem = asyncio.Semaphore(self.max_concurrent)

    async def close(self) -> None:
        """Close the session and its connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- public calls ---------------------------------------------------------------------------
    async def chat(self, messages: list[dict], max_tokens: int | None = None, temperature: float | None = None,
                   top_p: float | None = None, seed: int | None = None, n: int = 1,
                   stop: list[str] | str | None = None, extra: dict | None = None) -> ChatResult:
        """``POST /chat/completions``; returns when a valid answer came back (retrying as needed)."""
        payload = self._payload("messages", messages, max_tokens, temperature, top_p, seed, n, stop, extra)
        return await self._call("/chat/completions", payload, chat=True)

    async def complete(self, prompt: str, max_tokens: int | None = None, temperature: float | None = None,
                       top_p: float | None = None, seed: int | None = None, n: int = 1,
                       stop: list[str] | str | None = None, extra: dict | None = None) -> ChatResult:
        """``POST /completions`` (plain continuation of ``prompt``, e.g. for budget forcing)."""
        payload = self._payload("prompt", prompt, max_tokens, temperature, top_p, seed, n, stop, extra)
        return await self._call("/completions", payload, chat=False)

    def _payload(self, key: str, value: Any, max_tokens: int | None, temperature: float | None,
                 top_p: float | None, seed: int | None, n: int, stop: list[str] | str | None,
                 extra: dict | None) -> dict[str, Any]:
        """The request body shared by chat and plain completions (unset options are left out)."""
        payload: dict[str, Any] = {"model": self.model, key: value}
        _opt(payload, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        if n != 1:
            payload["n"] = n
        if extra:
            payload.update(extra)
        if self.stream:
            payload["stream"] = True
            if self._stream_options_ok:
                payload["stream_options"] = {"include_usage": True}
        return payload

    async def probe(self, timeout: float = 5.0) -> dict[str, str | None]:
        """``GET /models`` on every endpoint: ``{url: None}`` when it answered (any HTTP status:
        a server is listening), ``{url: reason}`` when it could not be reached in ``timeout`` s."""
        import aiohttp

        if self._session is None:
            await self.open()
        assert self._session is not None

        async def one(ep: _Endpoint) -> str | None:
            try:
                async with self._session.get(ep.url + "/models", headers=self._headers,
                                             timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                    await resp.read()
                return None
            except asyncio.TimeoutError:
                return f"no answer within {timeout:g}s"
            except (aiohttp.ClientError, OSError) as exc:
                return f"{type(exc).__name__}: {exc}"[:300]

        reasons = await asyncio.gather(*(one(ep) for ep in self.endpoints))
        return {ep.url: r for ep, r in zip(self.endpoints, reasons)}

    def mark_down(self, url: str, reason: str) -> None:
        """Take an endpoint out as if it had failed ``failure_threshold`` times (start-up probe)."""
        for ep in self.endpoints:
            if ep.url == url:
                ep.failures = self.failure_threshold - 1
                self._fault(ep, reason)

    def all_down(self) -> bool:
        """Every endpoint is taken out (used to stop a run whose servers all went away)."""
        return all(ep.failures >= self.failure_threshold for ep in self.endpoints)

    # --- machinery ------------------------------------------------------------------------------
    def _emit(self, kind: str, **info: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, info)
            except Exception:  # a progress hook must never break a request
                pass

    def _pick(self) -> _Endpoint | float:
        """A down endpoint due for its single re-probe, else the least-in-flight healthy one,
        else (all down, none due) the seconds to wait. Called while holding the semaphore."""
        eps = self.endpoints
        k = len(eps)
        now = time.monotonic()
        thr = self.failure_threshold
        best = None
        probe = None
        self._rr = (self._rr + 1) % k
        for i in range(k):
            ep = eps[(self._rr + i) % k]
            if ep.failures < thr:
                if best is None or ep.in_flight < best.in_flight:
                    best = ep
            elif ep.down_until <= now and ep.in_flight == 0 and (probe is None or ep.down_until < probe.down_until):
                probe = ep
        if probe is not None:
            return probe
        if best is not None:
            return best
        # Every endpoint is out: once the soonest cooldown ends, every waiting request tries it
        # itself, so each wait ends in an attempt that counts against max_retries (waiting for a
        # single probe parked requests forever against a dead port).
        due = min(eps, key=lambda e: e.down_until)
        wait = due.down_until - now
        if wait <= 0:
            return due
        return max(0.01, min(wait, 0.25))

    def _ok(self, ep: _Endpoint) -> None:
        if ep.failures >= self.failure_threshold:
            self._emit("endpoint_up", endpoint=ep.url)
        ep.failures = 0
        ep.cooldown = 0.0

    def _fault(self, ep: _Endpoint, reason: str) -> None:
        ep.errors += 1
        ep.failures += 1
        if ep.failures >= self.failure_threshold:
            now = time.monotonic()
            if ep.down_until > now:  # already out (a request sent before it went down): say it once
                return
            ep.cooldown = min(self.cooldown_max, ep.cooldown * 2 if ep.cooldown else self.cooldown)
            ep.down_until = now + ep.cooldown
            self._emit("endpoint_down", endpoint=ep.url, cooldown=ep.cooldown, reason=reason)

    async def _call(self, path: str, payload: dict, chat: bool) -> ChatResult:
        if self._session is None:
            await self.open()
        assert self._sem is not None
        body = _dumps(payload)
        attempt = 0
        while True:
            # the endpoint is chosen only once a slot is free, so in-flight counts are current
            await self._sem.acquire()
            try:
                picked = self._pick()
                if not isinstance(picked, _Endpoint):
                    delay = picked
                else:
                    attempt += 1
                    try:
                        return await self._attempt(picked, path, body, chat, attempt)
                    except _Retryable as exc:
                        last = exc.reason
                        if "stream_options" in payload and not self._stream_options_ok:
                            del payload["stream_options"]  # refused by this server: not a real attempt
                            body = _dumps(payload)
                            if "without stream_options" in last:
                                attempt -= 1
                                continue
                        if attempt > self.max_retries:
                            self.failures += 1
                            raise RetriesExhausted(f"gave up after {attempt} attempts; last error: {last}", last,
                                                   attempt, exc.unreachable) from None
                        delay = (min(self.backoff_max, self.backoff_base * (2 ** (attempt - 1)))
                                 * self._rng.uniform(0.5, 1.0))
                        if exc.retry_after is not None:
                            delay = min(exc.retry_after, self.retry_after_max) * self._rng.uniform(1.0, 1.1)
                        self.retries += 1
                        self._emit("retry", reason=last, attempt=attempt, delay=delay, endpoint=picked.url)
            finally:
                self._sem.release()
            await asyncio.sleep(delay)  # backoff holds no slot: other requests keep the server busy

    async def _attempt(self, ep: _Endpoint, path: str, body: bytes, chat: bool, attempt: int) -> ChatResult:
        import aiohttp

        assert self._session is not None
        ep.in_flight += 1
        ep.requests += 1
        self.in_flight += 1
        self.requests += 1
        streamed: ChatResult | None = None
        kw: dict[str, Any] = {}  # (timeout=None would mean *no* timeout to aiohttp: pass it only to stream)
        if self.stream:
            kw["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout,
                                                  sock_read=self.idle_timeout)
        try:
            async with self._session.post(ep.url + path, data=body, headers=self._headers, **kw) as resp:
                status = resp.status
                if status == 200 and self.stream:
                    streamed = await self._read_stream(resp, ep, attempt, chat)
                    raw = b""
                else:
                    raw = await resp.read()
                retry_after = resp.headers.get("Retry-After") if status != 200 else None
        except asyncio.TimeoutError:
            self._fault(ep, "timeout")
            if self.stream:
                raise _Retryable(f"stream idle for {self.idle_timeout:g}s from {ep.url}") from None
            raise _Retryable(f"timeout after {self.request_timeout:g}s from {ep.url}") from None
        except (aiohttp.ClientError, OSError) as exc:
            reason = f"{type(exc).__name__} from {ep.url}: {exc}"[:300]
            self._fault(ep, reason)
            raise _Retryable(reason, unreachable=isinstance(exc, aiohttp.ClientConnectorError)) from None
        finally:
            ep.in_flight -= 1
            self.in_flight -= 1
        if streamed is not None:
            return streamed
        if status == 200:
            try:
                data = _loads(raw)
                return self._result(data, ep, attempt, chat)
            except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
                self._fault(ep, "malformed JSON")
                raise _Retryable(f"malformed response from {ep.url}: {type(exc).__name__}: {str(exc)[:120]}") \
                    from None
        msg = _server_message(raw)
        if self.stream and self._stream_options_ok and status in (400, 422) and "stream_options" in msg:
            # a server that refuses stream_options: drop it for good and retry now (usage is
            # then counted from the chunks; see the module docstring)
            self._stream_options_ok = False
            self._ok(ep)
            raise _Retryable(f"HTTP {status} from {ep.url}: {msg} (retrying without stream_options)",
                             retry_after=0.0, endpoint_fault=False)
        if status in RETRYABLE_STATUS or status >= 500:
            ra = _parse_retry_after(retry_after)
            if status >= 500:
                self._fault(ep, f"HTTP {status}")
            raise _Retryable(f"HTTP {status} from {ep.url}: {msg}", retry_after=ra)
        self._ok(ep)  # the endpoint answered coherently
        self.failures += 1
        if status == 401:
            hint = (f"the key in ${self.api_key_env} was rejected" if self.api_key_env
                    else "no API key was sent; pass --api-key-env VAR naming the variable that holds it")
            raise FatalAPIError(f"HTTP 401 Unauthorized from {ep.url}: {hint} ({msg})", status, ep.url)
        if status == 403:
            raise FatalAPIError(f"HTTP 403 Forbidden from {ep.url}: the key in ${self.api_key_env or '(none)'} "
                                f"may not use model {self.model!r} ({msg})", status, ep.url)
        if status == 404:
            raise FatalAPIError(f"HTTP 404 from {ep.url}{path}: wrong --model {self.model!r} or base URL? ({msg})",
                                status, ep.url)
        raise FatalAPIError(f"HTTP {status} from {ep.url}{path}: {msg}", status, ep.url)

    async def _read_stream(self, resp: Any, ep: _Endpoint, attempt: int, chat: bool) -> ChatResult:
        """Read an SSE answer (``data: {...}`` lines) into one :class:`ChatResult`.

        Raises :class:`_Retryable` when the stream ends before every choice has a
        ``finish_reason`` or carries an ``error`` event (vLLM reports mid-stream failures so)."""
        texts: dict[int, list[str]] = {}
        reasons: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        chunks = 0
        content_chunks = 0
        usage: dict | None = None
        model = None
        async for line in resp.content:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, ": keep-alive" comments, "event:" lines
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            try:
                obj = _loads(data)
            except ValueError:
                self._fault(ep, "malformed stream")
                raise _Retryable(f"malformed stream chunk from {ep.url}: {data[:120]!r}") from None
            if not isinstance(obj, dict):
                continue
            if obj.get("error"):
                self._fault(ep, "stream error")
                raise _Retryable(f"error event in the stream from {ep.url}: {_server_message(data)}")
            chunks += 1
            model = obj.get("model") or model
            if obj.get("usage"):
                usage = obj["usage"]
            for ch in obj.get("choices") or []:
                i = int(ch.get("index") or 0)
                texts.setdefault(i, [])
                if chat:
                    delta = ch.get("delta") or {}
                    piece = delta.get("content")
                    rpiece = delta.get("reasoning_content") or delta.get("reasoning")
                    if rpiece:
                        reasons.setdefault(i, []).append(rpiece)
                        content_chunks += 1
                else:
                    piece = ch.get("text")
                if piece:
                    texts[i].append(piece)
                    content_chunks += 1
                if ch.get("finish_reason") is not None:
                    finish[i] = ch["finish_reason"]
        if not texts or any(i not in finish for i in texts):
            got = f"{chunks} chunks" if chunks else "no data"
            self._fault(ep, "stream cut")
            raise _Retryable(f"stream from {ep.url} ended after {got} without a finish_reason (connection lost?)")
        out = []
        for i in sorted(texts):
            reasoning = "".join(reasons[i]) if i in reasons else None
            content = "".join(texts[i])
            out.append((merge_reasoning(content, reasoning) if chat else content, finish[i], reasoning))
        if usage is None:
            usage = {"completion_tokens": content_chunks, "usage_source": "counted_chunks"}
            self.usage_counted += 1
        self._ok(ep)
        text, fin, reasoning = out[0]
        return ChatResult(text=text, finish_reason=fin, usage=usage, reasoning_content=reasoning, endpoint=ep.url,
                          attempts=attempt, choices=out, model=model)

    def _result(self, data: dict, ep: _Endpoint, attempt: int, chat: bool) -> ChatResult:
        choices = data["choices"]
        if not choices:
            raise ValueError("empty 'choices'")
        out = []
        for ch in choices:
            if chat:
                msg = ch["message"]
                content = msg.get("content")
                reasoning = msg.get("reasoning_content") or msg.get("reasoning")
                if content is None and reasoning is None:
                    raise ValueError("choice has neither content nor reasoning_content")
                out.append((merge_reasoning(content, reasoning), ch.get("finish_reason"), reasoning))
            else:
                text = ch["text"]
                if not isinstance(text, str):
                    raise TypeError("'text' is not a string")
                out.append((text, ch.get("finish_reason"), None))
        self._ok(ep)
        text, finish, reasoning = out[0]
        return ChatResult(text=text, finish_reason=finish, usage=data.get("usage") or {},
                          reasoning_content=reasoning, endpoint=ep.url, attempts=attempt, choices=out,
                          model=data.get("model"), logprobs=choices[0].get("logprobs"),
                          prompt_logprobs=choices[0].get("prompt_logprobs", data.get("prompt_logprobs")))

    def endpoint_stats(self) -> list[dict]:
        """Per-endpoint counters: url, requests, errors, in_flight, down (bool)."""
        now = time.monotonic()
        return [{"url": e.url, "requests": e.requests, "errors": e.errors, "in_flight": e.in_flight,
                 "down": e.failures >= self.failure_threshold and e.down_until > now} for e in self.endpoints]


def _opt(payload: dict, **kw: Any) -> None:
    for k, v in kw.items():
        if v is not None:
            payload[k] = v


def chat_sync(endpoints: Sequence[str] | str, model: str, messages: list[dict], **kwargs: Any) -> ChatResult:
    """Blocking convenience for sync callers: one chat request (client options via ``client=``).

    >>> chat_sync("127.0.0.1:8000", "m", [{"role": "user", "content": "hi"}], max_tokens=8)  # doctest: +SKIP
    """
    client_kw = kwargs.pop("client", {})

    async def _go() -> ChatResult:
        async with ChatClient(endpoints, model, **client_kw) as c:
            return await c.chat(messages, **kwargs)

    return asyncio.run(_go())


async def map_requests(client: ChatClient, items: Sequence[Any], make: Callable[[Any], Any],
                       window: int | None = None) -> list[Any]:
    """Run ``make(item)`` coroutines with at most ``window`` outstanding (default 2x concurrency),
    returning results (or the exception) in input order. The client's semaphore bounds in-flight."""
    window = window or client.max_concurrent * 2
    results: list[Any] = [None] * len(items)
    it = iter(enumerate(items))

    async def worker() -> None:
        for i, item in it:
            try:
                results[i] = await make(item)
            except APIError as exc:
                results[i] = exc

    await asyncio.gather(*(worker() for _ in range(min(window, len(items)) or 1)))
    return results
