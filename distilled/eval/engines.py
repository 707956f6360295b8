"""Generation engines for ``distill eval`` (openai, transformers, vllm) and s1 budget forcing.

Why three engines: a served model (vLLM / SGLang / MindIE behind an OpenAI-compatible API) is
how users evaluate 7B students; a local HF folder on CPU/GPU is how the demo and tests evaluate
tiny ones; offline vLLM is the fastest on a GPU box. All three return the same
:class:`GenOutput`, so scoring and reports never care which one ran.

Budget forcing (s1, "simple test-time scaling"): ``max_think`` B caps the thinking; when it is
spent the thinking is cut and ``</think>`` is forced. ``min_think`` A makes the model think
longer: an early ``</think>`` (or end of sequence) is replaced with ``Wait`` and generation
continues. The per-sequence logic is one state machine (:func:`budget_machine`) driven by each
engine's batched "continue these token sequences" step; token accounting is exact for the
transformers and vllm engines (ids are kept, never re-tokenised); the openai engine counts the
text it keeps with the served model's tokenizer (``--tokenizer``), not the server's words.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator, Sequence

THINK_CLOSE = "</think>"


class EngineError(RuntimeError):
    """An engine cannot start (missing package, unreachable server, bad model folder)."""


@dataclass
class GenRequest:
    """One sample to generate: ``key`` identifies it in samples.jsonl."""

    key: tuple[str, str, int]  # (task, problem_id, sample_index)
    messages: list[dict]
    seed: int


@dataclass
class GenOutput:
    """What an engine produced for one request."""

    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    think_tokens: int | None = None
    budget: dict | None = None  # {"waits": k, "forced_close": bool} when budget forcing ran


@dataclass(frozen=True)
class BudgetConfig:
    """s1 budget forcing settings (``None`` = no limit on that side)."""

    min_think: int | None = None
    max_think: int | None = None
    wait_text: str = "Wait"
    close_text: str = "\n</think>\n\n"

    @property
    def active(self) -> bool:
        return self.min_think is not None or self.max_think is not None

    def check(self) -> None:
        for name, v in (("--min-think-tokens", self.min_think), ("--max-think-tokens", self.max_think)):
            if v is not None and v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        if self.min_think is not None and self.max_think is not None and self.min_think > self.max_think:
            raise ValueError(f"--min-think-tokens {self.min_think} > --max-think-tokens {self.max_think}")


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------------
# Budget forcing state machine
# ------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """Ask the engine to continue ``context`` by at most ``limit`` tokens.

    ``stop_at_close``: stop at ``</think>``. The engine answers with a :class:`Segment`."""

    ids: list[int] | None  # prompt + output ids (id engines)
    text: str  # prompt + output text (text engines)
    limit: int
    stop_at_close: bool
    seed: int = 0  # per-sample, per-step sampling seed (engines that seed each request)


@dataclass
class Segment:
    """A continuation: ``ids`` (id engines) and ``text``; ``end`` is "close" (hit ``</think>``,
    which is *not* part of ``ids``/``text``), "eos" (end of sequence) or "length" (``limit``)."""

    ids: list[int] | None
    text: str
    n_tokens: int
    end: str
    tail: str = ""  # text cut from the segment's last token(s) along with "</think>" (kept verbatim)


@dataclass
class BudgetResult:
    text: str
    ids: list[int] | None
    finish_reason: str
    completion_tokens: int
    think_tokens: int
    waits: int
    forced_close: bool


def budget_machine(prompt_ids: list[int] | None, prompt_text: str, max_tokens: int, cfg: BudgetConfig,
                   encode: Callable[[str], list[int]] | None, seed: int = 0) -> Generator[Step, Segment, BudgetResult]:
    """One sequence under budget forcing. Yields :class:`Step`, receives :class:`Segment`.

    Accounting (all in tokens of the model's tokenizer for id engines):
    - ``think_tokens``: tokens before the final ``</think>``, inserted ``Wait`` tokens included;
      never more than ``max_think``; at least ``min_think`` unless ``max_tokens`` or ``max_think``
      ran out first. (Characters that shared a token with the model's own ``</think>`` are
      re-encoded with it and counted as output, not thinking.)
    - ``completion_tokens``: every output token, forced ``</think>`` and ``Wait`` included; never
      more than ``max_tokens`` (a forced insertion that does not fit ends the sample as "length").
    """
    use_ids = prompt_ids is not None
    out_ids: list[int] = []
    out_text = ""
    total = think = waits = 0
    forced = False

    def add(ids: list[int] | None, text: str, n: int) -> None:
        nonlocal out_text, total
        if use_ids and ids is not None:
            out_ids.extend(ids)
        out_text += text
        total += n

    def insert(text: str) -> int | None:
        """Append fixed text; returns its token count or None when it does not fit."""
        ids = encode(text) if encode is not None else None
        n = len(ids) if ids is not None else max(1, len(text.split()))
        if total + n > max_tokens:
            return None
        add(ids, text, n)
        return n

    def done(finish: str) -> BudgetResult:
        return BudgetResult(out_text, out_ids if use_ids else None, finish, total, think, waits, forced)

    steps = [0]

    def step(limit: int, stop: bool) -> Step:
        steps[0] += 1
        return Step((prompt_ids + out_ids) if use_ids else None, prompt_text + out_text, limit, stop,
                    stable_seed(seed, steps[0]))

    # thinking phase
    while True:
        remaining = max_tokens - total
        if remaining <= 0:
            return done("length")
        limit = remaining
        if cfg.max_think is not None:
            limit = min(limit, cfg.max_think - think)
        if limit > 0:
            seg = yield step(limit, True)
            add(seg.ids, seg.text, seg.n_tokens)
            think += seg.n_tokens
        else:
            seg = Segment([], "", 0, "length")
        if seg.end in ("close", "eos"):
            if cfg.min_think is not None and think < cfg.min_think:
                wait = seg.tail + cfg.wait_text  # keep what shared a token with </think>
                n_wait = len(encode(wait)) if encode is not None else max(1, len(wait.split()))
                if cfg.max_think is None or think + n_wait <= cfg.max_think:
                    n = insert(wait)
                    if n is None:
                        return done("length")
                    think += n
                    waits += 1
                    continue
                # "Wait" would overrun the think budget: close the thinking here instead
                if insert(seg.tail + cfg.close_text) is None:
                    return done("length")
                forced = True
                break
            if seg.end == "eos":  # ended without closing the thinking: nothing to answer with
                return done("stop")
            if insert(seg.tail + THINK_CLOSE) is None:
                return done("length")
            break
        # "length": the think budget or max_tokens ran out
        if cfg.max_think is not None and think >= cfg.max_think:
            if insert(cfg.close_text) is None:
                return done("length")
            forced = True
            break
        return done("length")
    # answer phase
    remaining = max_tokens - total
    if remaining <= 0:
        return done("length")
    seg = yield step(remaining, False)
    add(seg.ids, seg.text, seg.n_tokens)
    return done("length" if seg.end == "length" else "stop")


def classify_ids(new_ids: Sequence[int], limit: int, end_ids: set[int], decode: Callable[[list[int]], str],
                 stop_at_close: bool) -> Segment:
    """Turn raw generated ids into a :class:`Segment` (shared by the transformers and vllm steps).

    Generation is cut at the first end-of-sequence id. When ``</think>`` appears, the ids are cut
    back to the last token that lies wholly before it; the text between that token and
    ``</think>`` is returned as ``tail`` so that nothing the model wrote is lost.
    """
    ids = list(new_ids)
    hit_eos = False
    for i, t in enumerate(ids):
        if t in end_ids:
            ids, hit_eos = ids[: i + 1], True
            break
    content = [t for t in ids if t not in end_ids]
    text = decode(content)
    if stop_at_close and THINK_CLOSE in text:
        cut = text.index(THINK_CLOSE)
        keep = len(content)
        while keep > 0:
            t = decode(content[:keep])
            if len(t) <= cut and THINK_CLOSE not in t:
                break
            keep -= 1
        kept_text = decode(content[:keep])
        tail = text[len(kept_text):cut] if text.startswith(kept_text) else ""
        return Segment(content[:keep], kept_text, keep, "close", tail)
    end = "eos" if hit_eos else ("length" if len(ids) >= limit else "eos")
    return Segment(content, text, len(content), end)


def drive_machines(machines: list[Generator], run_steps: Callable[[list[Step]], list[Segment]]) -> list[BudgetResult]:
    """Advance all state machines together: each round, every pending step is run in one batch."""
    results: list[BudgetResult | None] = [None] * len(machines)
    pending: dict[int, Step] = {}
    for i, m in enumerate(machines):
        try:
            pending[i] = next(m)
        except StopIteration as stop:
            results[i] = stop.value
    while pending:
        order = list(pending)
        segs = run_steps([pending[i] for i in order])
        pending = {}
        for i, seg in zip(order, segs):
            try:
                pending[i] = machines[i].send(seg)
            except StopIteration as stop:
                results[i] = stop.value
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# transformers
# ------------------------------------------------------------------------------------------------


class TransformersEngine:
    """A local HF causal LM: batched ``generate`` with left padding, seeded sampling per sample.

    Greedy when ``temperature == 0``. Runs on CUDA when available (bf16), else CPU (float32).
    ``logits_processor`` is a hook for callers who need one (tests use it to make a random tiny
    model close its thinking early, which budget forcing must then undo).
    """

    name = "transformers"

    def __init__(self, model_dir: str, batch_size: int = 8, device: str | None = None,
                 logits_processor: Any = None):
        from pathlib import Path

        p = Path(model_dir)
        if not (p / "config.json").is_file():
            raise EngineError(f"--model {model_dir}: no config.json (expected a HF model folder)")
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:  # pragma: no cover - torch is in the [torch] extra
            raise EngineError(f"the transformers engine needs torch and transformers ({exc}); "
                              "pip install 'distilled[torch]'") from None
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        try:
            self.tok = AutoTokenizer.from_pretrained(str(p))
        except Exception as exc:
            raise EngineError(f"--model {model_dir}: cannot load its tokenizer: {exc}") from None
        if self.tok.chat_template is None:
            raise EngineError(f"--model {model_dir}: the tokenizer has no chat template")
        self.model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype).to(self.device).eval()
        self.batch_size = max(1, batch_size)
        self.logits_processor = logits_processor
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tok.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tok.eos_token_id is not None and self.tok.eos_token_id not in eos:
            eos.append(self.tok.eos_token_id)
        self.eos_ids = eos
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else eos[0]
        self.end_ids = set(eos) | {self.pad_id}
        self.model_name = p.name

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return chat_ids(self.tok, messages)

    def _generate(self, contexts: list[list[int]], limit: int, stop_at_close: bool, seeds: list[int],
                  temperature: float, top_p: float) -> list[list[int]]:
        """Continue every context by at most ``limit`` tokens; row ``r`` samples from its own
        ``torch.Generator`` seeded with ``seeds[r]`` (:class:`_RowSampler`), so its output does not
        depend on which other samples share the batch."""
        torch = self.torch
        width = max(len(c) for c in contexts)
        input_ids = torch.full((len(contexts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(contexts), width), dtype=torch.long)
        for r, c in enumerate(contexts):
            input_ids[r, width - len(c):] = torch.tensor(c, dtype=torch.long)
            mask[r, width - len(c):] = 1
        kw: dict[str, Any] = dict(max_new_tokens=limit, pad_token_id=self.pad_id, eos_token_id=self.eos_ids)
        # generate() always decodes greedily here; sampling (temperature > 0) is done per row by
        # _RowSampler, the last logits processor, which leaves only the drawn token selectable
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if stop_at_close:
            from transformers import StoppingCriteriaList

            kw["stopping_criteria"] = StoppingCriteriaList([_CloseStop(self.tok, width)])
        procs = [self.logits_processor] if self.logits_processor is not None else []
        if temperature > 0:
            procs.append(_RowSampler(seeds, temperature, top_p))
        if procs:
            from transformers import LogitsProcessorList

            kw["logits_processor"] = LogitsProcessorList(procs)
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device), **kw)
        return [row[width:].tolist() for row in out.cpu()]

    def run_steps(self, steps: list[Step], temperature: float, top_p: float) -> list[Segment]:
        """Run steps in batches of equal (limit, stop) so each keeps its own token limit; each
        step samples with its own seed (``Step.seed``: from the sample's seed and the step number)."""
        segs: list[Segment | None] = [None] * len(steps)
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, s in enumerate(steps):
            groups.setdefault((s.limit, s.stop_at_close), []).append(i)
        for (limit, stop), idx in sorted(groups.items()):
            for b in range(0, len(idx), self.batch_size):
                chunk = idx[b:b + self.batch_size]
                news = self._generate([steps[i].ids for i in chunk], limit, stop,
                                      [steps[i].seed for i in chunk], temperature, top_p)
                for i, new in zip(chunk, news):
                    segs[i] = classify_ids(new, limit, self.end_ids, self.decode, stop)
        return segs  # type: ignore[return-value]

    def generate(self, requests: list[GenRequest], max_tokens: int, temperature: float, top_p: float,
                 budget: BudgetConfig, seed: int) -> Iterator[tuple[GenRequest, GenOutput]]:
        """Yield (request, output) batch by batch, so the caller can log each batch at once."""
        for b in range(0, len(requests), self.batch_size):
            batch = requests[b:b + self.batch_size]
            prompts = [self.prompt_ids(r.messages) for r in batch]
            if budget.active:
                machines = [budget_machine(p, "", max_tokens, budget, self.encode, r.seed)
                            for p, r in zip(prompts, batch)]
                results = drive_machines(machines, lambda steps: self.run_steps(steps, temperature, top_p))
                for r, p, res in zip(batch, prompts, results):
                    yield r, GenOutput(res.text, res.finish_reason, len(p), res.completion_tokens,
                                       res.think_tokens, {"waits": res.waits, "forced_close": res.forced_close})
                continue
            news = self._generate(prompts, max_tokens, False, [r.seed for r in batch], temperature, top_p)
            for r, p, new in zip(batch, prompts, news):
                seg = classify_ids(new, max_tokens, self.end_ids, self.decode, False)
                finish = "length" if seg.end == "length" else "stop"
                yield r, GenOutput(seg.text, finish, len(p), seg.n_tokens, _think_count(seg.text, seg.ids, self))


class _RowSampler:
    """Temperature + top-p sampling with one ``torch.Generator`` per batch row (a logits processor).

    Why: ``generate(do_sample=True)`` draws every row from the one global RNG, so a sample depends
    on its batch-mates (and on where a resumed run's batches start), and the seed logged in
    samples.jsonl cannot reproduce it. Here row ``r`` is drawn from ``Generator(seeds[r])``, one
    draw per generated token, and every other token is set to ``-inf`` so that greedy decoding
    picks the drawn one. top-p keeps the smallest set of most likely tokens whose probability
    reaches ``top_p`` (as transformers' ``TopPLogitsWarper``); top-k is off (``top_k=0``).
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        self.seeds, self.temperature, self.top_p = list(seeds), float(temperature), float(top_p)
        self.gens: list[Any] | None = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.gens is None:
            self.gens = [torch.Generator(device=scores.device).manual_seed(int(s)) for s in self.seeds]
        logits = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cum - sorted_logits.softmax(dim=-1) >= self.top_p  # mass before this token already enough
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        out = torch.full_like(scores, float("-inf"))
        for r, g in enumerate(self.gens):
            tok = torch.multinomial(probs[r], 1, generator=g)
            out[r, tok] = 0.0
        return out


class _CloseStop:
    """Stop a row once its generated text ends in ``</think>``.

    Why not transformers' ``stop_strings``: it preprocesses the whole 150k-token vocabulary on
    every ``generate`` call (seconds each time, and budget forcing calls generate many times).
    Decoding the last few tokens of each row per step costs microseconds."""

    def __init__(self, tok: Any, prompt_len: int, window: int = 8):
        self.tok, self.prompt_len, self.window = tok, prompt_len, window

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        gen = input_ids[:, self.prompt_len:]
        tail = gen[:, -self.window:].tolist()
        return torch.tensor([THINK_CLOSE in self.tok.decode(row, skip_special_tokens=True) for row in tail],
                            dtype=torch.bool, device=input_ids.device)


def chat_ids(tok: Any, messages: list[dict]) -> list[int]:
    """Prompt token ids through the model's own chat template (transformers 4 returns a list,
    transformers 5 a BatchEncoding)."""
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def _think_count(text: str, ids: list[int] | None, engine: Any) -> int | None:
    """Tokens before ``</think>`` (None when the output has no ``</think>``)."""
    if THINK_CLOSE not in text:
        return None
    return len(engine.encode(text[: text.index(THINK_CLOSE)]))


# ------------------------------------------------------------------------------------------------
# vLLM (offline, GPU only)
# ------------------------------------------------------------------------------------------------


class VLLMEngine:
    """Offline vLLM (``vllm.LLM``). Imported lazily: vLLM wheels are CUDA builds and live in their
    own environment (``pip install vllm``), never in the main one."""

    name = "vllm"

    def __init__(self, model_dir: str, tensor_parallel_size: int = 1, seed: int = 0, max_model_len: int | None = None):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise EngineError("--engine vllm needs the vllm package, which is a CUDA build: install it in its own "
                              "environment on a GPU machine (`pip install vllm`), or use --engine openai against a "
                              "`vllm serve` endpoint, or --engine transformers") from None
        from vllm import LLM

        kw: dict[str, Any] = dict(model=model_dir, tensor_parallel_size=tensor_parallel_size, seed=seed)
        if max_model_len:
            kw["max_model_len"] = max_model_len
        self.llm = LLM(**kw)
        self.tok = self.llm.get_tokenizer()
        eos = self.tok.eos_token_id
        self.end_ids = {eos} if eos is not None else set()
        self.model_name = model_dir.rstrip("/").split("/")[-1]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _params(self, limit: int, seed: int, temperature: float, top_p: float, stop: bool):
        from vllm import SamplingParams

        return SamplingParams(n=1, max_tokens=limit, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                              seed=seed, stop=[THINK_CLOSE] if stop else None, include_stop_str_in_output=True,
                              skip_special_tokens=True)

    def _run(self, ids_list: list[list[int]], params: list) -> list[tuple[list[int], bool]]:
        from vllm.inputs import TokensPrompt

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in ids_list], params, use_tqdm=False)
        res = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            hit_eos = c.finish_reason == "stop" and not isinstance(c.stop_reason, str)
            if hit_eos and (not ids or ids[-1] not in self.end_ids) and self.end_ids:
                ids.append(next(iter(self.end_ids)))
            res.append((ids, hit_eos))
        return res

    def generate(self, requests: list[GenRequest], max_tokens: int, temperature: float, top_p: float,
                 budget: BudgetConfig, seed: int) -> Iterator[tuple[GenRequest, GenOutput]]:
        prompts = [chat_ids(self.tok, r.messages) for r in requests]
        if budget.active:
            machines = [budget_machine(p, "", max_tokens, budget, self.encode, r.seed)
                        for p, r in zip(prompts, requests)]

            def run_steps(steps: list[Step]) -> list[Segment]:
                params = [self._params(s.limit, s.seed, temperature, top_p, s.stop_at_close) for s in steps]
                raw = self._run([s.ids for s in steps], params)
                return [classify_ids(ids, s.limit, self.end_ids, self.decode, s.stop_at_close)
                        for (ids, _), s in zip(raw, steps)]

            results = drive_machines(machines, run_steps)
            for r, p, res in zip(requests, prompts, results):
                yield r, GenOutput(res.text, res.finish_reason, len(p), res.completion_tokens, res.think_tokens,
                                   {"waits": res.waits, "forced_close": res.forced_close})
            return
        params = [self._params(max_tokens, r.seed, temperature, top_p, False) for r in requests]
        for r, p, (ids, _) in zip(requests, prompts, self._run(prompts, params)):
            seg = classify_ids(ids, max_tokens, self.end_ids, self.decode, False)
            yield r, GenOutput(seg.text, "length" if seg.end == "length" else "stop", len(p), seg.n_tokens,
                               _think_count(seg.text, seg.ids, self))


# ------------------------------------------------------------------------------------------------
# OpenAI-compatible server
# ------------------------------------------------------------------------------------------------


async def probe_server(endpoints: Sequence[str], timeout: float = 10.0, api_key_env: str | None = None) -> list[str]:
    """``GET /v1/models`` on every endpoint; raises :class:`EngineError` naming the ones that fail.

    Why: an unreachable server must be reported before any generation starts, not after the
    client has spent its retries on the first thousand requests. Returns the served model ids.
    """
    import os

    import aiohttp

    from distilled.generate.client import normalize_endpoint

    headers = {}
    if api_key_env and os.environ.get(api_key_env):
        headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
    bad, models = [], []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        for ep in endpoints:
            url = normalize_endpoint(ep) + "/models"
            try:
                async with s.get(url, headers=headers) as r:
                    if r.status >= 400:
                        bad.append(f"{url}: HTTP {r.status}")
                        continue
                    data = await r.json(content_type=None)
                    models += [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
            except Exception as exc:
                bad.append(f"{url}: {type(exc).__name__}: {exc or 'no answer'}")
    if bad:
        raise EngineError("cannot reach the OpenAI-compatible server(s): " + "; ".join(bad) +
                          " (is `vllm serve` / `distill serve-teacher` running at that --api-addr?)")
    return [m for m in models if m]


SERVER_KINDS = ("openai", "vllm", "transformers")
"""``--server-kind``: what the server does with ``stop`` in budget forcing (see :class:`OpenAIEngine`)."""


class OpenAIEngine:
    """Any OpenAI-compatible server through :class:`distilled.generate.client.ChatClient` (concurrency,
    retries, several endpoints). Budget forcing uses ``/v1/completions`` continuation with a
    chat template rendered locally (``--tokenizer``).

    Only standard OpenAI fields are sent (``stop: ["</think>"]``, ``seed`` ...), unless
    ``server_kind`` is ``vllm``: then vLLM's ``include_stop_str_in_output`` is added. Servers that
    reject unknown fields (``transformers serve`` answers 422) then work. How a continuation that
    stopped is read in the thinking phase:

    - its text holds ``</think>`` (vLLM with the extension, ``transformers serve``'s stop strings,
      or a server that ignores ``stop``): an early close, cut there;
    - ``finish_reason`` ``length``: the step's token limit;
    - ``stop`` without ``</think>`` in the text: for ``server_kind`` ``openai`` (the API's rule: the
      stop string is not returned) the ``</think>`` stop, since the standard response cannot tell it
      from an end of sequence (an end of sequence inside the reasoning is then read as a close);
      for ``vllm`` and ``transformers`` (they return the stop string) an end of sequence.

    Tokens are counted with ``--tokenizer`` exactly as the transformers and vLLM engines count
    generated ids: the kept text of a cut continuation, and every inserted ``Wait`` / ``</think>``,
    are encoded; a ``length`` continuation counts the step's limit (what the server generated).
    ``</think>`` is counted once, when it is inserted.
    """

    name = "openai"

    def __init__(self, endpoints: Sequence[str], model: str, max_concurrent: int = 64, max_retries: int = 8,
                 request_timeout: float = 600.0, api_key_env: str | None = None, tokenizer_dir: str | None = None,
                 server_kind: str = "openai"):
        if server_kind not in SERVER_KINDS:
            raise EngineError(f"--server-kind {server_kind!r}: choose one of {', '.join(SERVER_KINDS)}")
        self.server_kind = server_kind
        self.endpoints = list(endpoints)
        self.model = model
        self.client_kw = dict(api_key_env=api_key_env, max_concurrent=max_concurrent, max_retries=max_retries,
                              request_timeout=request_timeout)
        self.tok = None
        if tokenizer_dir:
            from distilled.data.tokenizer import load_tokenizer

            self.tok = load_tokenizer(tokenizer_dir)
        self.model_name = model

    async def _one(self, client, req: GenRequest, max_tokens: int, temperature: float, top_p: float,
                   budget: BudgetConfig) -> GenOutput:
        if not budget.active:
            res = await client.chat(req.messages, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                    seed=req.seed)
            usage = res.usage or {}
            return GenOutput(res.text, "length" if res.finish_reason == "length" else "stop",
                             usage.get("prompt_tokens"), usage.get("completion_tokens"), None)
        assert self.tok is not None
        prompt = self.tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
        machine = budget_machine(None, prompt, max_tokens, budget, self.encode, req.seed)
        extra = {"include_stop_str_in_output": True} if self.server_kind == "vllm" else None
        stop_returned = self.server_kind in ("vllm", "transformers")
        seg: Segment | None = None
        try:
            stp = next(machine)
            while True:
                res = await client.complete(stp.text, max_tokens=stp.limit, temperature=temperature, top_p=top_p,
                                            seed=stp.seed,
                                            stop=[THINK_CLOSE] if stp.stop_at_close else None,
                                            extra=extra if stp.stop_at_close else None)
                seg = _text_segment(res.text, res.finish_reason, (res.usage or {}).get("completion_tokens"),
                                    stp.stop_at_close, stp.limit, self.encode, stop_returned)
                stp = machine.send(seg)
        except StopIteration as stop:
            r: BudgetResult = stop.value
        return GenOutput(r.text, r.finish_reason, len(self.encode(prompt)), r.completion_tokens, r.think_tokens,
                         {"waits": r.waits, "forced_close": r.forced_close})

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the served model's tokenizer (no special tokens added)."""
        assert self.tok is not None
        return self.tok.encode(text, add_special_tokens=False)

    async def agenerate(self, requests: list[GenRequest], max_tokens: int, temperature: float, top_p: float,
                        budget: BudgetConfig, on_done: Callable[[GenRequest, GenOutput | BaseException], Any]) -> None:
        """Run every request (bounded by the client's concurrency); ``on_done`` gets each result or
        the exception that ended it (after the client's retries)."""
        from distilled.generate.client import APIError, ChatClient, FatalAPIError

        if budget.active and self.tok is None:
            raise EngineError("budget forcing with --engine openai needs --tokenizer DIR (to render the chat template "
                              "for /v1/completions continuation)")
        async with ChatClient(self.endpoints, self.model, **self.client_kw) as client:
            window = client.max_concurrent * 2
            it = iter(requests)

            async def worker() -> None:
                for req in it:
                    try:
                        out: GenOutput | BaseException = await self._one(client, req, max_tokens, temperature,
                                                                           top_p, budget)
                    except FatalAPIError as exc:
                        # retrying cannot help (bad request, auth, unknown model): stop the run now
                        # rather than fail every remaining request the same way
                        raise EngineError(f"the server refused a request: {exc}") from None
                    except APIError as exc:
                        out = exc
                    res = on_done(req, out)
                    if asyncio.iscoroutine(res):
                        await res

            await asyncio.gather(*(worker() for _ in range(min(window, len(requests)) or 1)))


def _text_segment(text: str, finish_reason: str | None, n_tokens: int | None, stop_at_close: bool,
                  limit: int | None = None, encode: Callable[[str], list[int]] | None = None,
                  stop_returned: bool = True) -> Segment:
    """A server continuation as a :class:`Segment` (rules in :class:`OpenAIEngine`).

    ``encode`` counts tokens with the model's tokenizer; without it (no tokenizer) the server's
    ``usage`` is used, else whitespace words. ``stop_returned``: the server returns a matched stop
    string in the text, so a ``stop`` without ``</think>`` is an end of sequence.
    """

    def count(t: str) -> int:
        if encode is not None:
            return len(encode(t))
        return int(n_tokens) if n_tokens is not None else max(1, len(t.split()))

    if stop_at_close and THINK_CLOSE in text:
        # cut at </think>; a server that ignored ``stop`` wrote the answer too: it is dropped and
        # asked for again after the (possibly replaced) </think>, so the rules apply the same way.
        # The </think> itself is not counted here: the state machine counts it when it inserts it.
        kept = text[: text.index(THINK_CLOSE)]
        return Segment(None, kept, count(kept) if encode is not None else _prorate(text, kept, n_tokens), "close")
    if finish_reason == "length":  # the server generated exactly the step's limit of tokens
        n = int(limit) if limit is not None else (int(n_tokens) if n_tokens is not None else count(text))
        return Segment(None, text, n, "length")
    n = count(text)
    if limit is not None:
        n = min(n, int(limit))
    if stop_at_close and finish_reason == "stop" and not stop_returned:
        return Segment(None, text, n, "close")  # the API does not return the stop string it matched
    return Segment(None, text, n, "eos")


def _prorate(text: str, kept: str, n_tokens: int | None) -> int:
    """Without a tokenizer: the server's count pro-rated by characters (words when it gave none)."""
    if n_tokens is None:
        return len(kept.split())
    return max(0, round(int(n_tokens) * len(kept) / max(1, len(text))))
