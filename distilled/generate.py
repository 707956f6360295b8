"""``distill generate``: problems -> generations.jsonl from an OpenAI-compatible teacher.

A superset of open-r1's ``generate_reasoning.py`` command line (the MindSpore docs copy it), so
their commands keep working, without its flaws (../shared/FACTS.md §4):

- concurrency is bounded by in-flight *requests* (each generation is its own request, and a new
  one starts the moment another finishes), not by problems or batches, so a slow generation
  never stalls the others;
- a failed generation is retried with backoff (see :mod:`distilled.client`) and, if it still
  fails, goes to ``OUT.failed.jsonl`` with its reason instead of silently dropping the problem;
  a rerun retries it;
- a problem's line is written once all N generations succeeded, in one ``write`` + flush, with
  fsync at least every second; a torn last line (kill -9 mid-write) is cut on resume without
  touching complete lines; done uuids are skipped; duplicate uuids are reported, generated once;
- SIGINT/SIGTERM stop sending, abandon in-flight requests, flush, and exit 130.

``OUT.failed.jsonl`` is the output path with ``.jsonl`` replaced by ``.failed.jsonl``
(``gens.jsonl`` -> ``gens.failed.jsonl``); it lists the failures of the latest run only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from distilled.io_utils import BadLine, JsonlAppender, atomic_write, iter_jsonl

# open-r1's default template (written for str.format, hence the doubled braces).
DEFAULT_PROMPT_TEMPLATE = ("You will be given a problem. Please reason step by step, and put your final answer "
                           "within \\boxed{{}}:\n{prompt}")
EXIT_OK, EXIT_SOME_FAILED, EXIT_FATAL, EXIT_INTERRUPTED = 0, 1, 2, 130


@dataclass
class GenerateConfig:
    """Everything ``distill generate`` needs (the CLI flags, one to one)."""

    dataset_name: str
    output_file: str
    endpoints: list[str]
    model: str = "default"
    dataset_config: str | None = None
    split: str = "train"
    prompt_column: str = "problem"
    uuid_column: str | None = None  # default: the prompt column
    api_key_env: str | None = None
    num_generations: int = 4
    max_tokens: int = 16384
    max_concurrent: int = 64
    temperature: float | None = 0.6
    top_p: float | None = 0.95
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    system_prompt: str | None = None
    request_timeout: float = 600.0
    max_retries: int = 8
    backoff_base: float = 1.0
    seed: int | None = None
    limit: int | None = None
    progress: bool = True
    fsync_every: float = 1.0


@dataclass
class GenerateSummary:
    """What a run did (also printed as the one-line summary)."""

    total: int = 0  # unique problems in the input (after --limit)
    already_done: int = 0
    written: int = 0
    failed_problems: int = 0
    failed_generations: int = 0
    generations: int = 0
    completion_tokens: int = 0
    retries: int = 0
    duplicates: int = 0
    skipped_rows: int = 0
    repaired_bytes: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    fatal: str | None = None
    failed_file: str | None = None

    @property
    def done(self) -> int:
        return self.already_done + self.written

    def line(self) -> str:
        gps = self.generations / self.seconds if self.seconds > 0 else 0.0
        tps = self.completion_tokens / self.seconds if self.seconds > 0 else 0.0
        s = (f"generate: {self.done}/{self.total} problems done ({self.written} this run, {self.already_done} "
             f"before); {self.generations} generations in {self.seconds:.1f}s ({gps:.1f} gen/s, {tps:.0f} "
             f"completion tok/s); {self.retries} retries; {self.failed_generations} failed generations")
        if self.failed_problems:
            s += f" ({self.failed_problems} problems not written; see {self.failed_file}; rerun to retry them)"
        if self.duplicates:
            s += f"; {self.duplicates} duplicate uuids generated once"
        if self.skipped_rows:
            s += f"; {self.skipped_rows} unusable input rows skipped"
        if self.repaired_bytes:
            s += f"; repaired a torn last line ({self.repaired_bytes} bytes cut)"
        if self.interrupted:
            s += "; INTERRUPTED (rerun to resume)"
        if self.fatal:
            s += f"; STOPPED: {self.fatal}"
        return s


def failed_path(output_file: str | os.PathLike) -> Path:
    """``gens.jsonl`` -> ``gens.failed.jsonl`` (any other name gets ``.failed.jsonl`` appended)."""
    p = Path(output_file)
    if p.suffix == ".jsonl":
        return p.with_suffix(".failed.jsonl")
    return p.with_name(p.name + ".failed.jsonl")


def render_prompt(template: str, prompt: str) -> str:
    """Apply ``--prompt-template``: ``str.format(prompt=...)`` like open-r1 (so ``\\boxed{{}}``
    works), falling back to replacing ``{prompt}`` literally when the template has other braces."""
    try:
        return template.format(prompt=prompt)
    except (KeyError, IndexError, ValueError):
        return template.replace("{prompt}", prompt)


def _iter_input(cfg: GenerateConfig, warn) -> Iterator[tuple[str, dict | BadLine]]:
    """Yield ``(where, row)``; ``where`` is ``file:line`` for JSONL and ``source row N`` otherwise."""
    src = cfg.dataset_name
    p = Path(src)
    if not p.exists() and (p.suffix in (".jsonl", ".json", ".parquet") or src.startswith((".", "/", "~"))):
        raise SystemExit(f"error: --dataset-name {src}: no such file or directory")
    if src.endswith(".jsonl") and p.is_file():
        for n, obj in iter_jsonl(src):
            yield f"{src}:{n}", obj
        return
    from distilled.io_utils import load_rows

    try:
        ds = load_rows(src, cfg.dataset_config, cfg.split)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: --dataset-name {src}: {exc}") from None
    except Exception as exc:  # datasets raises many types; name the source, not a deep traceback
        raise SystemExit(f"error: --dataset-name {src}: could not load ({type(exc).__name__}: {exc})") from None
    for i, row in enumerate(ds, start=1):
        yield f"{src} row {i}", row


@dataclass
class _Problem:
    key: str
    row: dict
    prompt: str
    results: list = field(default_factory=list)
    remaining: int = 0
    failed: bool = False


def load_problems(cfg: GenerateConfig, warn=print) -> tuple[list[_Problem], int, int]:
    """Read the input; return ``(unique problems, duplicate count, skipped-row count)``.

    Rows missing the prompt/uuid column or with a non-string prompt are skipped, counted and
    named (first five). A column missing from *every* row is a fatal error.
    """
    uuid_col = cfg.uuid_column or cfg.prompt_column
    seen: dict[str, str] = {}
    probs: list[_Problem] = []
    dups = skipped = 0
    first_cols: list[str] | None = None
    shown = 0

    def skip(msg: str) -> None:
        nonlocal skipped, shown
        skipped += 1
        if shown < 5:
            warn(f"warning: skipping {msg}")
            shown += 1

    for where, row in _iter_input(cfg, warn):
        if isinstance(row, BadLine):
            skip(str(row))
            continue
        if first_cols is None:
            first_cols = list(row)
        if cfg.prompt_column not in row or uuid_col not in row:
            miss = cfg.prompt_column if cfg.prompt_column not in row else uuid_col
            skip(f"{where}: no field {miss!r}")
            continue
        prompt = row[cfg.prompt_column]
        if not isinstance(prompt, str) or not prompt.strip():
            skip(f"{where}: field {cfg.prompt_column!r} is {type(prompt).__name__}, expected a non-empty string")
            continue
        key = str(row[uuid_col])
        if key in seen:
            dups += 1
            if dups <= 5:
                warn(f"warning: {where}: duplicate {uuid_col!r} (first at {seen[key]}); generated once")
            continue
        seen[key] = where
        probs.append(_Problem(key, dict(row), render_prompt(cfg.prompt_template, prompt)))
        if cfg.limit is not None and len(probs) >= cfg.limit:
            break
    if not probs and first_cols is not None and skipped:
        raise SystemExit(f"error: --dataset-name {cfg.dataset_name}: no usable rows; expected columns "
                         f"{cfg.prompt_column!r} and {uuid_col!r}, found {first_cols}")
    return probs, dups, skipped


class _SyncingAppender(JsonlAppender):
    """JsonlAppender plus ``sync()`` so a timer can fsync when no new line arrived for a second."""

    _dirty = False

    def write(self, obj: Any) -> None:
        super().write(obj)
        self._dirty = True

    def sync(self) -> None:
        if self._dirty and not self._f.closed:
            os.fsync(self._f.fileno())
            self._dirty = False


async def run_generate(cfg: GenerateConfig, problems: list[_Problem] | None = None,
                       install_signals: bool = False, warn=None) -> GenerateSummary:
    """Run a whole generation job; returns its summary (never raises for API errors).

    ``problems`` may be given directly (benchmarks); otherwise the input is read per ``cfg``.
    """
    from distilled.client import ChatClient, FatalAPIError, RetriesExhausted

    warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))
    summ = GenerateSummary()
    uuid_col = cfg.uuid_column or cfg.prompt_column
    if problems is None:
        problems, summ.duplicates, summ.skipped_rows = load_problems(cfg, warn)
    summ.total = len(problems)
    client = ChatClient(cfg.endpoints, cfg.model, api_key_env=cfg.api_key_env, max_concurrent=cfg.max_concurrent,
                        max_retries=cfg.max_retries, request_timeout=cfg.request_timeout,
                        backoff_base=cfg.backoff_base,
                        on_event=lambda k, i: say(f"endpoint {i['endpoint']} taken out for {i['cooldown']:.1f}s "
                                                   f"({i['reason']})") if k == "endpoint_down" else None)
    out_path = Path(cfg.output_file)
    fpath = failed_path(out_path)
    summ.failed_file = str(fpath)

    appender = _SyncingAppender(out_path, fsync_every=cfg.fsync_every)  # repairs a torn tail first
    summ.repaired_bytes = appender.repaired_bytes
    if summ.repaired_bytes:
        warn(f"warning: {out_path}: cut a torn last line ({summ.repaired_bytes} bytes) left by an interrupted run")
    done: set[str] = set()
    bad_mid = 0
    for _n, obj in iter_jsonl(out_path):
        if isinstance(obj, BadLine):
            bad_mid += 1
            continue
        if uuid_col in obj:
            done.add(str(obj[uuid_col]))
    if bad_mid:
        warn(f"warning: {out_path}: {bad_mid} unreadable lines in the middle of the file (left as they are)")
    prev_failed = sum(1 for _ in iter_jsonl(fpath)) if fpath.exists() else 0
    with atomic_write(fpath) as f:  # this run's failures only; earlier ones are retried below
        f.write("")
    failed_log = JsonlAppender(fpath, fsync_every=cfg.fsync_every)

    todo = [p for p in problems if p.key not in done]
    summ.already_done = len(problems) - len(todo)
    if prev_failed:
        warn(f"retrying problems behind {prev_failed} failed generations of the previous run")
    n_gen = cfg.num_generations
    for p in todo:
        p.results = [None] * n_gen
        p.remaining = n_gen

    pbar = None

    def say(msg: str) -> None:  # a message that does not break the progress bar
        if pbar is not None:
            pbar.write(msg, file=sys.stderr)
        else:
            warn(msg)

    if cfg.progress:
        from tqdm import tqdm

        pbar = tqdm(total=summ.total, initial=summ.already_done, unit="problem", desc="generate",
                    dynamic_ncols=True, mininterval=0.5, smoothing=0.05, file=sys.stderr)
    stop = asyncio.Event()
    fatal: list[str] = []
    t0 = time.perf_counter()

    def pairs() -> Iterator[tuple[_Problem, int]]:
        for p in todo:
            for g in range(n_gen):
                yield p, g

    it = pairs()

    def messages(p: _Problem) -> list[dict]:
        m = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        m.append({"role": "user", "content": p.prompt})
        return m

    def fail(p: _Problem, g: int, reason: str, attempts: int) -> None:
        summ.failed_generations += 1
        failed_log.write({"uuid": p.key, "generation_index": g, "reason": reason, "attempts": attempts})
        if not p.failed:
            p.failed = True
            summ.failed_problems += 1

    async def worker() -> None:
        for p, g in it:
            if stop.is_set():
                return
            if p.failed:
                continue
            seed = None if cfg.seed is None else cfg.seed * 100_003 + g
            try:
                r = await client.chat(messages(p), max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                      top_p=cfg.top_p, seed=seed)
            except RetriesExhausted as exc:
                fail(p, g, exc.reason, exc.attempts)
                continue
            except FatalAPIError as exc:
                if exc.status in (401, 403, 404) or exc.status is None:
                    if not fatal:
                        fatal.append(str(exc))
                    stop.set()
                    return
                fail(p, g, str(exc), 1)  # e.g. 400: this prompt is too long; the others may be fine
                continue
            summ.generations += 1
            summ.completion_tokens += int((r.usage or {}).get("completion_tokens") or 0)
            if p.failed:
                continue
            p.results[g] = r
            p.remaining -= 1
            if p.remaining == 0:
                row = dict(p.row)
                row["prompt"] = p.prompt
                row["generations"] = [x.text for x in p.results]
                row["finish_reasons"] = [x.finish_reason for x in p.results]
                row["api_metadata"] = [x.usage for x in p.results]
                appender.write(row)
                p.results = []
                summ.written += 1
                if pbar is not None:
                    pbar.update(1)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(min(1.0, cfg.fsync_every))
            appender.sync()
            if pbar is not None:
                dt = max(1e-9, time.perf_counter() - t0)
                pbar.set_postfix_str(f"{summ.generations / dt:.1f} gen/s, {summ.completion_tokens / dt:.0f} tok/s, "
                                     f"in-flight {client.in_flight}, retries {client.retries}, "
                                     f"failed {summ.failed_generations}", refresh=False)

    loop = asyncio.get_running_loop()
    installed = []
    if install_signals:
        def on_signal(signame: str) -> None:
            if not stop.is_set():
                warn(f"\n{signame}: stopping; completed problems are saved, in-flight requests are abandoned")
                summ.interrupted = True
                stop.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal, sig.name)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread / Windows
                pass

    await client.open()
    workers = [asyncio.ensure_future(worker()) for _ in range(max(1, min(2 * cfg.max_concurrent, len(todo) * n_gen)))]
    tick = asyncio.ensure_future(ticker())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        all_done = asyncio.gather(*workers)
        await asyncio.wait([all_done, stopper], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            for w in workers:
                w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    finally:
        for t in (tick, stopper):
            t.cancel()
        await asyncio.gather(tick, stopper, return_exceptions=True)
        for sig in installed:
            loop.remove_signal_handler(sig)
        appender.close()
        failed_log.close()
        await client.close()
        if pbar is not None:
            pbar.close()
    summ.seconds = time.perf_counter() - t0
    summ.retries = client.retries
    if fatal:
        summ.fatal = fatal[0]
    if summ.failed_generations == 0 and fpath.exists() and fpath.stat().st_size == 0:
        fpath.unlink()
    return summ


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    """Map CLI flags to :class:`GenerateConfig`."""
    endpoints = list(args.api_addr or [])
    if args.base_url:
        endpoints += args.base_url
    if not endpoints:
        endpoints = ["localhost:39876"]  # open-r1's default
    return GenerateConfig(dataset_name=args.dataset_name, output_file=args.output_file, endpoints=endpoints,
                          model=args.model, dataset_config=args.dataset_config, split=args.split,
                          prompt_column=args.prompt_column, uuid_column=args.uuid_column,
                          api_key_env=args.api_key_env, num_generations=args.num_generations,
                          max_tokens=args.max_tokens, max_concurrent=args.max_concurrent,
                          temperature=args.temperature, top_p=args.top_p, prompt_template=args.prompt_template,
                          system_prompt=args.system_prompt, request_timeout=args.request_timeout,
                          max_retries=args.max_retries, backoff_base=args.backoff_base, seed=args.seed,
                          limit=args.limit, progress=not args.no_progress)


def cmd_generate(args: argparse.Namespace) -> int:
    """``distill generate``: exit 0 when every problem is written, 1 when some failed (rerun to
    retry), 2 on a fatal error (bad input, 401/403/404), 130 when interrupted."""
    from distilled.client import FatalAPIError

    for name in ("num_generations", "max_tokens", "max_concurrent"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return EXIT_FATAL
    cfg = config_from_args(args)
    try:
        summ = asyncio.run(run_generate(cfg, install_signals=True))
    except FatalAPIError as exc:  # e.g. the key's env var is empty
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return EXIT_FATAL
        raise
    print(summ.line(), flush=True)
    if summ.interrupted:
        return EXIT_INTERRUPTED
    if summ.fatal:
        print(f"error: {summ.fatal}", file=sys.stderr)
        return EXIT_FATAL
    return EXIT_SOME_FAILED if summ.failed_problems else EXIT_OK


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``distill generate`` (a superset of open-r1's generate_reasoning.py flags)."""
    p = sub.add_parser("generate", help="problems -> generations.jsonl from an OpenAI-compatible teacher",
                       description="Generate N teacher answers per problem over an OpenAI-compatible API "
                                   "(vLLM, SGLang, MindIE, hosted APIs, or `distill serve-teacher`). Resumable, "
                                   "never loses or duplicates a generation.")
    p.add_argument("--model", default="default", help="model name sent to the server (default 'default')")
    p.add_argument("--dataset-name", required=True,
                   help="local .jsonl/.json/.parquet, a save_to_disk directory, or a hub id (online)")
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--output-file", required=True)
    p.add_argument("--prompt-column", default="problem")
    p.add_argument("--uuid-column", default=None, help="column identifying a problem (default: the prompt column)")
    p.add_argument("--api-addr", action="append", default=None,
                   help="HOST:PORT of an endpoint (repeat for several; balanced by least in-flight)")
    p.add_argument("--base-url", action="append", default=None, help="full base URL, e.g. https://api.x.com/v1")
    p.add_argument("--api-key-env", default=None, help="environment variable holding the API key")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--max-concurrent", type=int, default=64, help="max requests in flight over all endpoints")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE,
                   help="user message template with {prompt} (default: open-r1's)")
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per attempt")
    p.add_argument("--max-retries", type=int, default=8, help="retries per generation after the first attempt")
    p.add_argument("--backoff-base", type=float, default=1.0, help="first retry delay in seconds (doubles)")
    p.add_argument("--seed", type=int, default=None, help="send seed = SEED*100003 + generation index")
    p.add_argument("--limit", type=int, default=None, help="only the first K unique problems")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the summary line still prints)")
    p.set_defaults(func=cmd_generate)
