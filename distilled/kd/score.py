"""``distill score-teacher``: top-K teacher log-probabilities for traces that were not generated here.

Why: most distillation data already exists (OpenR1-Math-220k, Mixture-of-Thoughts, your own
``distill reject`` output). A teacher that shares the student's tokenizer can still give its
distribution over every answer token by *scoring* the text instead of generating it: one
``POST /v1/completions`` per answer with ``echo: true, logprobs: K, max_tokens: 1`` returns the
log-probabilities of the prompt tokens (OpenAI's legacy completions shape, served by vLLM and
SGLang); with ``--server-kind vllm`` the request also asks for vLLM's exact ``prompt_logprobs`` and
``return_tokens_as_token_ids``. The prompt is the teacher's chat template around the user turn
(``--chat-template``, default the student tokenizer's), then the answer; only the answer's steps
are stored.

Output: a sidecar (:mod:`distilled.kd.sidecar`) keyed by (uuid, generation index), the same file
``distill preprocess --kd-sidecar`` reads. Resumable: keys already in the sidecar are skipped, a
torn tail is cut; failures go to ``OUT.failed.jsonl`` (a rerun retries them). Every answer passes
the vocabulary check (the echoed tokens must spell the text and be the student's tokenization of
the answer), so a teacher with another vocabulary is refused on its first answer.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from distilled.kd import MAX_TOP_LOGPROBS
from distilled.prompts import build_messages, with_system
from distilled.settings import add_arguments, from_args, option


@dataclass
class ScoreConfig:
    """Everything ``distill score-teacher`` needs; each documented field is also its flag
    (:mod:`distilled.settings`), in this order in ``--help``. ``endpoints`` (no flag) is
    ``--api-addr`` then ``--base-url``, or ``localhost:39876`` when neither is given."""

    input: str = option(help="JSONL: rows with `messages` (e.g. distill reject output), or generations.jsonl rows "
                             "with --generations-column")
    output: str = option(help="sidecar to write (e.g. runs/scored.topk.bin); resumable")
    tokenizer: str = option(help="the student's tokenizer folder, or 'qwen2.5'")
    top_logprobs: int = option(20, help=f"K, 1..{MAX_TOP_LOGPROBS} (default 20)")
    model: str = option("default", help="served model id of the teacher")
    api_addr: list[str] | None = option(None, append=True, help="HOST:PORT (repeatable)")
    base_url: list[str] | None = option(None, append=True, help="full base URL (repeatable)")
    api_key_env: str | None = option(None, help="environment variable holding the API key (hosted APIs)")
    uuid_column: str = option("problem_key", help="column naming the problem (distill generate's problem_key by "
                                                  "default)")
    """distill generate's resume key, kept by distill reject."""
    messages_column: str = option("messages", help="column holding the conversation to score")
    generations_column: str | None = option(None, help="score every generation of this list column")
    """Score every generation of a generations.jsonl row (instead of one ``messages`` answer)."""
    prompt_column: str = option("prompt", help="with --generations-column: the user prompt column")
    system_prompt: str | None = option(None, help="system turn added when a row has none")
    chat_template: str | None = option(None, help="the teacher's chat template (.jinja); default the tokenizer's")
    server_kind: str = option("openai", choices=("openai", "vllm"),
                              help="vllm: also request prompt_logprobs and token ids (exact)")
    max_concurrent: int = option(16, help="requests in flight at once")
    limit: int | None = option(None, help="only the first K rows")
    progress: bool = option(True, flag="--no-progress", help="no progress bar")
    endpoints: list[str] = field(default_factory=list)
    generation_index_column: str = "kept_generation_index"
    max_retries: int = 8
    request_timeout: float = 600.0

    def __post_init__(self) -> None:
        if not self.endpoints:
            self.endpoints = [*(self.api_addr or []), *(self.base_url or [])] or ["localhost:39876"]


@dataclass
class _Item:
    uuid: str
    g: int
    messages: list[dict]  # prompt turns (no assistant)
    answer: str
    where: str


def _items(cfg: ScoreConfig, warn) -> Iterator[_Item]:
    from distilled.io_utils import BadLine, iter_jsonl

    n = 0
    for line, row in iter_jsonl(cfg.input):
        where = f"{cfg.input}:{line}"
        if isinstance(row, BadLine):
            warn(f"warning: skipping {row}")
            continue
        if cfg.uuid_column not in row:
            warn(f"warning: skipping {where}: no field {cfg.uuid_column!r}")
            continue
        uuid = str(row[cfg.uuid_column])
        if cfg.generations_column:
            gens = row.get(cfg.generations_column)
            prompt = row.get(cfg.prompt_column)
            if not isinstance(gens, list) or not isinstance(prompt, str):
                warn(f"warning: skipping {where}: needs a list {cfg.generations_column!r} and a string "
                     f"{cfg.prompt_column!r}")
                continue
            turns = build_messages(prompt, cfg.system_prompt)
            for g, text in enumerate(gens):
                if isinstance(text, str) and text:
                    yield _Item(uuid, g, turns, text, f"{where} generation {g}")
        else:
            msgs = row.get(cfg.messages_column)
            if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) \
                    or msgs[-1].get("role") != "assistant":
                warn(f"warning: skipping {where}: {cfg.messages_column!r} must end with an assistant turn")
                continue
            turns = with_system([m for m in msgs[:-1] if isinstance(m, dict)], cfg.system_prompt)
            g = int(row.get(cfg.generation_index_column, 0) or 0)
            yield _Item(uuid, g, turns, str(msgs[-1].get("content") or ""), where)
        n += 1
        if cfg.limit is not None and n >= cfg.limit:
            return


def answer_steps(logprobs: dict, prompt_text: str, full_text: str, where: str) -> int:
    """Index of the first echoed token of the answer (after ``prompt_text``), from ``text_offset``."""
    offs = logprobs.get("text_offset")
    toks = logprobs.get("tokens") or []
    if not isinstance(offs, list) or len(offs) != len(toks):
        raise ValueError(f"{where}: the echoed logprobs have no usable 'text_offset'")
    start = len(prompt_text)
    for i, o in enumerate(offs):
        if o >= start:
            if o != start:
                raise ValueError(f"{where}: the teacher's tokens cross the prompt/answer boundary (a token starts "
                                 f"at character {o}, the answer at {start})")
            return i
    raise ValueError(f"{where}: no echoed token starts the answer")


def _request_extra(k: int, server_kind: str) -> dict[str, Any]:
    """The completions fields that ask for the echoed prompt's top-``k`` (vLLM: exact, by token id)."""
    extra: dict[str, Any] = {"echo": True, "logprobs": k}
    if server_kind == "vllm":
        extra.update({"prompt_logprobs": k, "return_tokens_as_token_ids": True})
    return extra


def _answer_choice(r: Any, tok: Any, prompt_text: str, full: str, where: str) -> tuple[dict, list[int] | None, int]:
    """The answer's part of an echoed response, as ``parse_choice_logprobs`` takes it:
    ``(choice, prompt_ids, first answer step)``. vLLM's ``prompt_logprobs`` (keyed by token id,
    exact) win over the OpenAI-shape ``logprobs``, which are cut to the answer by ``text_offset``."""
    lp = r.logprobs or {}
    start = answer_steps(lp, prompt_text, full, where)
    n_prompt = sum(1 for o in lp["text_offset"] if o < len(full))
    sub = {"tokens": lp["tokens"][start:n_prompt], "token_logprobs": lp["token_logprobs"][start:n_prompt],
           "top_logprobs": (lp.get("top_logprobs") or [None] * n_prompt)[start:n_prompt]}
    if getattr(r, "prompt_logprobs", None) is None:
        return {"logprobs": sub}, None, 0
    ids = tok.encode(full, add_special_tokens=False)
    first = len(tok.encode(prompt_text, add_special_tokens=False))
    return {"prompt_logprobs": r.prompt_logprobs[:len(ids)], "logprobs": None}, ids, first


class _Scoring:
    """One ``run_score`` run: the tokenizer and checks, the sidecar and failure file, the counters.

    Why a class: each answer goes through the same named steps (:meth:`prompt`, :meth:`ask`,
    :meth:`check`, :meth:`store`) that share this state; ``fatal`` (the first error that must stop
    the run, e.g. another vocabulary or a 401) makes every worker stop taking answers.
    """

    def __init__(self, cfg: ScoreConfig, warn) -> None:
        from distilled.data.preprocess import resolve_tokenizer_dir
        from distilled.data.tokenizer import load_tokenizer
        from distilled.generate.client import ChatClient
        from distilled.generate.runner import failed_path
        from distilled.io_utils import JsonlAppender, atomic_write
        from distilled.kd.logprobs import StudentVocab, VocabularyGuard
        from distilled.kd.sidecar import SidecarWriter

        if not 1 <= cfg.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"--top-logprobs must be 1..{MAX_TOP_LOGPROBS}, got {cfg.top_logprobs}")
        self.cfg, self.k = cfg, cfg.top_logprobs
        self.tok = load_tokenizer(resolve_tokenizer_dir(cfg.tokenizer))
        self.template = Path(cfg.chat_template).read_text(encoding="utf-8") if cfg.chat_template else None
        self.vocab, self.guard = StudentVocab(self.tok), VocabularyGuard()
        self.writer = SidecarWriter(cfg.output)
        self.failed_file = failed_path(Path(cfg.output).with_suffix(".jsonl"))
        with atomic_write(self.failed_file) as f:  # a rerun retries the failures: start the file afresh
            f.write("")
        self.failed = JsonlAppender(self.failed_file)
        self.items = [it for it in _items(cfg, warn) if (it.uuid, it.g) not in self.writer.keys]
        self.summ: dict[str, Any] = {"to_score": len(self.items), "already_done": len(self.writer.keys), "scored": 0,
                                     "failed": 0, "noncanonical": 0, "tokens": 0,
                                     "repaired_bytes": self.writer.repaired_bytes}
        self.client = ChatClient(cfg.endpoints, cfg.model, api_key_env=cfg.api_key_env,
                                 max_concurrent=cfg.max_concurrent, max_retries=cfg.max_retries,
                                 request_timeout=cfg.request_timeout)
        self.extra = _request_extra(self.k, cfg.server_kind)
        self.fatal: list[str] = []
        self.pbar = None
        if cfg.progress:
            from tqdm import tqdm

            self.pbar = tqdm(total=len(self.items), desc="score-teacher", unit="answer", file=sys.stderr,
                             dynamic_ncols=True)

    def prompt(self, it: _Item) -> str:
        """The teacher's chat template around the prompt turns, up to the assistant's start."""
        return self.tok.apply_chat_template(it.messages, tokenize=False, add_generation_prompt=True,
                                            **({"chat_template": self.template} if self.template else {}))

    def fail(self, it: _Item, reason: str) -> None:
        self.summ["failed"] += 1
        self.failed.write({"uuid": it.uuid, "generation_index": it.g, "reason": reason})

    async def ask(self, it: _Item, full: str) -> Any | None:
        """One echo request for prompt + answer; None when it failed (recorded, or fatal)."""
        from distilled.generate.client import FatalAPIError, RetriesExhausted

        try:
            return await self.client.complete(full, max_tokens=1, temperature=0.0, extra=self.extra)
        except (RetriesExhausted, FatalAPIError) as exc:
            if isinstance(exc, FatalAPIError) and exc.status in (401, 403, 404, None):
                self.fatal.append(str(exc))
            else:
                self.fail(it, str(exc))
            return None

    def check(self, it: _Item, r: Any, prompt_text: str, full: str) -> tuple[bool, Any]:
        """``(ok, record)``: the answer's top-K after the vocabulary check (record None: non-canonical);
        ok False when the answer failed (recorded, or fatal)."""
        from distilled.kd.logprobs import VocabularyMismatch, parse_choice_logprobs

        try:
            choice, ids, first = _answer_choice(r, self.tok, prompt_text, full, it.where)
            rec = parse_choice_logprobs(choice, self.vocab, self.k, where=it.where, prompt_ids=ids, start=first)
            return True, self.guard.check(it.answer, rec, self.vocab, it.where)
        except VocabularyMismatch as exc:
            self.fatal.append(str(exc))
        except (ValueError, KeyError, TypeError) as exc:
            self.fail(it, str(exc))
        return False, None

    def store(self, it: _Item, kept: Any) -> None:
        import numpy as np

        from distilled.kd.sidecar import TokenTopK

        if kept is None:
            self.summ["noncanonical"] += 1
        else:
            self.writer.write(it.uuid, it.g, TokenTopK(kept.sampled_ids, kept.sampled_logprobs,
                                                       kept.topk_ids, kept.topk_logprobs.astype(np.float32)))
            self.summ["scored"] += 1
            self.summ["tokens"] += kept.n_tokens
        if self.pbar is not None:
            self.pbar.update(1)

    async def score(self, it: _Item) -> None:
        """Prompt, ask, check, store one answer (nothing once the run hit a fatal error)."""
        if self.fatal:
            return
        prompt_text = self.prompt(it)
        full = prompt_text + it.answer
        r = await self.ask(it, full)
        if r is None:
            return
        ok, kept = self.check(it, r, prompt_text, full)
        if ok:
            self.store(it, kept)

    async def run(self) -> None:
        """``max_concurrent`` workers take answers in input order until none (or a fatal error) is left."""
        await self.client.open()
        try:
            queue = list(self.items)

            async def worker() -> None:
                while queue and not self.fatal:
                    await self.score(queue.pop(0))

            await asyncio.gather(*[worker() for _ in range(max(1, min(self.cfg.max_concurrent, len(self.items))))])
        finally:
            await self.client.close()
            self.writer.close()
            self.failed.close()
            if self.pbar is not None:
                self.pbar.close()

    def summary(self, seconds: float) -> dict:
        """The counters, with the failure file removed when nothing failed."""
        summ = self.summ
        if summ["failed"] == 0 and self.failed_file.exists() and self.failed_file.stat().st_size == 0:
            self.failed_file.unlink()
        summ["seconds"] = round(seconds, 2)
        summ["bytes_per_token"] = round(self.writer.bytes / self.writer.tokens, 2) if self.writer.tokens else None
        summ["fatal"] = self.fatal[0] if self.fatal else None
        return summ


async def run_score(cfg: ScoreConfig, warn=None) -> dict:
    """Score every answer; returns the summary (also printed by the CLI)."""
    warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))
    scoring = _Scoring(cfg, warn)
    t0 = time.perf_counter()
    await scoring.run()
    return scoring.summary(time.perf_counter() - t0)


def cmd_score(args: argparse.Namespace) -> int:
    cfg = from_args(ScoreConfig, args)
    try:
        s = asyncio.run(run_score(cfg))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"score-teacher: {s['scored']} answers scored ({s['already_done']} before), {s['tokens']} tokens, "
          f"{s['bytes_per_token']} bytes/token, {s['failed']} failed, {s['noncanonical']} non-canonical "
          f"-> {cfg.output}", flush=True)
    if s["fatal"]:
        print(f"error: {s['fatal']}", file=sys.stderr)
        return 2
    return 1 if s["failed"] else 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``distill score-teacher``."""
    p = sub.add_parser("score-teacher", help="teacher top-K logprobs for existing traces (-> a KD sidecar)",
                       description="Score existing answers with a teacher that shares the student's tokenizer "
                                   "(/v1/completions echo + logprobs) and store its top-K per answer token.")
    add_arguments(p, ScoreConfig)
    p.set_defaults(func=cmd_score)
