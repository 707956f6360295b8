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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from distilled.kd import MAX_TOP_LOGPROBS


@dataclass
class ScoreConfig:
    """Everything ``distill score-teacher`` needs (the CLI flags, one to one)."""

    input: str
    output: str
    endpoints: list[str]
    tokenizer: str
    top_logprobs: int = 20
    model: str = "default"
    uuid_column: str = "problem_key"  # distill generate's resume key, kept by distill reject
    messages_column: str = "messages"
    generations_column: str | None = None  # score every generation of a generations.jsonl row
    prompt_column: str = "prompt"
    generation_index_column: str = "kept_generation_index"
    system_prompt: str | None = None
    chat_template: str | None = None
    server_kind: str = "openai"  # "vllm" adds prompt_logprobs + return_tokens_as_token_ids
    api_key_env: str | None = None
    max_concurrent: int = 16
    max_retries: int = 8
    request_timeout: float = 600.0
    limit: int | None = None
    progress: bool = True


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
            turns = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + \
                [{"role": "user", "content": prompt}]
            for g, text in enumerate(gens):
                if isinstance(text, str) and text:
                    yield _Item(uuid, g, turns, text, f"{where} generation {g}")
        else:
            msgs = row.get(cfg.messages_column)
            if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) \
                    or msgs[-1].get("role") != "assistant":
                warn(f"warning: skipping {where}: {cfg.messages_column!r} must end with an assistant turn")
                continue
            turns = [m for m in msgs[:-1] if isinstance(m, dict)]
            if cfg.system_prompt and not any(m.get("role") == "system" for m in turns):
                turns = [{"role": "system", "content": cfg.system_prompt}] + turns
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


async def run_score(cfg: ScoreConfig, warn=None) -> dict:
    """Score every answer; returns the summary (also printed by the CLI)."""
    import numpy as np

    from distilled.generate.client import ChatClient, FatalAPIError, RetriesExhausted
    from distilled.generate.runner import failed_path
    from distilled.io_utils import JsonlAppender, atomic_write
    from distilled.kd.logprobs import StudentVocab, VocabularyGuard, VocabularyMismatch, parse_choice_logprobs
    from distilled.kd.sidecar import SidecarWriter, TokenTopK
    from distilled.data.preprocess import resolve_tokenizer_dir
    from distilled.data.tokenizer import load_tokenizer

    warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))
    if not 1 <= cfg.top_logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"--top-logprobs must be 1..{MAX_TOP_LOGPROBS}, got {cfg.top_logprobs}")
    tok = load_tokenizer(resolve_tokenizer_dir(cfg.tokenizer))
    template = Path(cfg.chat_template).read_text(encoding="utf-8") if cfg.chat_template else None
    vocab = StudentVocab(tok)
    guard = VocabularyGuard()
    writer = SidecarWriter(cfg.output)
    fpath = failed_path(Path(cfg.output).with_suffix(".jsonl"))
    with atomic_write(fpath) as f:
        f.write("")
    failed = JsonlAppender(fpath)
    items = [it for it in _items(cfg, warn) if (it.uuid, it.g) not in writer.keys]
    summ = {"to_score": len(items), "already_done": len(writer.keys), "scored": 0, "failed": 0,
            "noncanonical": 0, "tokens": 0, "repaired_bytes": writer.repaired_bytes}
    client = ChatClient(cfg.endpoints, cfg.model, api_key_env=cfg.api_key_env, max_concurrent=cfg.max_concurrent,
                        max_retries=cfg.max_retries, request_timeout=cfg.request_timeout)
    k = cfg.top_logprobs
    extra: dict[str, Any] = {"echo": True, "logprobs": k}
    if cfg.server_kind == "vllm":
        extra.update({"prompt_logprobs": k, "return_tokens_as_token_ids": True})
    fatal: list[str] = []
    t0 = time.perf_counter()
    pbar = None
    if cfg.progress:
        from tqdm import tqdm

        pbar = tqdm(total=len(items), desc="score-teacher", unit="answer", file=sys.stderr, dynamic_ncols=True)

    async def one(it: _Item) -> None:
        if fatal:
            return
        prompt_text = tok.apply_chat_template(it.messages, tokenize=False, add_generation_prompt=True,
                                              **({"chat_template": template} if template else {}))
        full = prompt_text + it.answer
        try:
            r = await client.complete(full, max_tokens=1, temperature=0.0, extra=extra)
        except (RetriesExhausted, FatalAPIError) as exc:
            if isinstance(exc, FatalAPIError) and exc.status in (401, 403, 404, None):
                fatal.append(str(exc))
                return
            summ["failed"] += 1
            failed.write({"uuid": it.uuid, "generation_index": it.g, "reason": str(exc)})
            return
        try:
            lp = r.logprobs or {}
            start = answer_steps(lp, prompt_text, full, it.where)
            n_prompt = sum(1 for o in lp["text_offset"] if o < len(full))
            sub = {"tokens": lp["tokens"][start:n_prompt], "token_logprobs": lp["token_logprobs"][start:n_prompt],
                   "top_logprobs": (lp.get("top_logprobs") or [None] * n_prompt)[start:n_prompt]}
            choice = {"logprobs": sub}
            ids = None
            first = 0
            if getattr(r, "prompt_logprobs", None) is not None:  # vLLM: keyed by token id, exact
                ids = tok.encode(full, add_special_tokens=False)
                first = len(tok.encode(prompt_text, add_special_tokens=False))
                choice = {"prompt_logprobs": r.prompt_logprobs[:len(ids)], "logprobs": None}
            rec = parse_choice_logprobs(choice, vocab, k, where=it.where, prompt_ids=ids, start=first)
            kept = guard.check(it.answer, rec, vocab, it.where)
        except VocabularyMismatch as exc:
            fatal.append(str(exc))
            return
        except (ValueError, KeyError, TypeError) as exc:
            summ["failed"] += 1
            failed.write({"uuid": it.uuid, "generation_index": it.g, "reason": str(exc)})
            return
        if kept is None:
            summ["noncanonical"] += 1
        else:
            writer.write(it.uuid, it.g, TokenTopK(kept.sampled_ids, kept.sampled_logprobs,
                                                  kept.topk_ids, kept.topk_logprobs.astype(np.float32)))
            summ["scored"] += 1
            summ["tokens"] += kept.n_tokens
        if pbar is not None:
            pbar.update(1)

    await client.open()
    try:
        queue = list(items)

        async def worker() -> None:
            while queue and not fatal:
                await one(queue.pop(0))

        await asyncio.gather(*[worker() for _ in range(max(1, min(cfg.max_concurrent, len(items))))])
    finally:
        await client.close()
        writer.close()
        failed.close()
        if pbar is not None:
            pbar.close()
    if summ["failed"] == 0 and fpath.exists() and fpath.stat().st_size == 0:
        fpath.unlink()
    summ["seconds"] = round(time.perf_counter() - t0, 2)
    summ["bytes_per_token"] = round(writer.bytes / writer.tokens, 2) if writer.tokens else None
    summ["fatal"] = fatal[0] if fatal else None
    return summ


def cmd_score(args: argparse.Namespace) -> int:
    endpoints = list(args.api_addr or []) + list(args.base_url or [])
    cfg = ScoreConfig(input=args.input, output=args.output, endpoints=endpoints or ["localhost:39876"],
                      tokenizer=args.tokenizer, top_logprobs=args.top_logprobs, model=args.model,
                      uuid_column=args.uuid_column, messages_column=args.messages_column,
                      generations_column=args.generations_column, prompt_column=args.prompt_column,
                      system_prompt=args.system_prompt, chat_template=args.chat_template,
                      server_kind=args.server_kind, api_key_env=args.api_key_env, max_concurrent=args.max_concurrent,
                      limit=args.limit, progress=not args.no_progress)
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
    p.add_argument("--input", required=True, help="JSONL: rows with `messages` (e.g. distill reject output), or "
                                                  "generations.jsonl rows with --generations-column")
    p.add_argument("--output", required=True, help="sidecar to write (e.g. runs/scored.topk.bin); resumable")
    p.add_argument("--tokenizer", required=True, help="the student's tokenizer folder, or 'qwen2.5'")
    p.add_argument("--top-logprobs", type=int, default=20, help=f"K, 1..{MAX_TOP_LOGPROBS} (default 20)")
    p.add_argument("--model", default="default")
    p.add_argument("--api-addr", action="append", default=None, help="HOST:PORT (repeatable)")
    p.add_argument("--base-url", action="append", default=None, help="full base URL (repeatable)")
    p.add_argument("--api-key-env", default=None)
    p.add_argument("--uuid-column", default="problem_key", help="column naming the problem (distill generate's "
                                                                  "problem_key by default)")
    p.add_argument("--messages-column", default="messages")
    p.add_argument("--generations-column", default=None, help="score every generation of this list column")
    p.add_argument("--prompt-column", default="prompt", help="with --generations-column: the user prompt column")
    p.add_argument("--system-prompt", default=None, help="system turn added when a row has none")
    p.add_argument("--chat-template", default=None, help="the teacher's chat template (.jinja); default the "
                                                         "tokenizer's")
    p.add_argument("--server-kind", choices=("openai", "vllm"), default="openai",
                   help="vllm: also request prompt_logprobs and token ids (exact)")
    p.add_argument("--max-concurrent", type=int, default=16)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_score)
