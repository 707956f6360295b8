"""``distill eval``: MATH-500 / AIME / GPQA-Diamond with honest pass@1, and ``distill eval compare``.

Why: R1 results are famously hard to reproduce (too few samples, prompt drift between lighteval
versions, broken pass@1:N). One command here produces a table you can trust:

- pass@1 averaged over n samples, unbiased pass@k (k <= n), cons@n, standard errors over
  problems, and the share of truncated / unanswered outputs (:mod:`distilled.eval.metrics`);
- the same verifier as ``distill reject`` (:mod:`distilled.verify`), so "correct" means the same
  thing when filtering training data and when scoring the student;
- pinned prompts and a seeded GPQA shuffle (:mod:`distilled.eval.tasks`), recorded in results.json;
- ``samples.jsonl`` holds every prompt, output, extracted answer and verdict, append-only: it is
  also the resume log, so an interrupted eval continues where it stopped;
- every bad input (unknown task, unreachable server, empty dataset, missing answer field) fails
  before any generation starts.

Layout of ``--output DIR``: ``run_config.json`` (the settings; a resume must match them),
``samples.jsonl``, ``results.json``, ``report.md``, ``pass_at_1.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from distilled.eval.engines import BudgetConfig, EngineError, GenOutput, GenRequest, stable_seed
from distilled.eval.tasks import (PROMPT_VERSION, SCORING_RULE, Problem, Task, TaskError, load_task,
                                  parse_task_names)
from distilled.settings import add_arguments, from_args, option

OPEN_R1_N = {"aime24": 64, "aime25": 64, "math_500": 4, "gpqa_diamond": 8}
"""Samples per problem in open-r1's published evaluations (``--n auto``)."""

PRESETS: dict[str, dict[str, Any]] = {
    "open-r1": {"temperature": 0.6, "top_p": 0.95, "max_tokens": 32768, "n": "auto"},
}
"""``--preset``: named generation settings; explicit flags still win. ``open-r1``: open-r1's lighteval
settings (T 0.6, top_p 0.95, 32768 new tokens, n = 64 AIME / 4 MATH-500 / 8 GPQA-D)."""

_GEN_DEFAULTS: dict[str, Any] = {"n": "4", "temperature": 0.6, "top_p": 0.95, "max_tokens": 32768}

# Published numbers for ``eval compare --reference``. Reported, not measured here.
REFERENCE_ROWS: list[dict] = [
    {"model": "OpenR1-Qwen-7B (MindFormers, MindSpore docs)", "math_500": 90.0},
    {"model": "OpenR1-Qwen-7B (HF, MindSpore docs)", "math_500": 90.6},
    {"model": "DeepSeek-R1-Distill-Qwen-7B (MindSpore docs)", "math_500": 91.6},
    {"model": "OpenThinker-7B (MindSpore docs)", "math_500": 89.6},
    {"model": "DeepSeek-R1-Distill-Qwen-1.5B (R1 paper)", "aime24": 28.9, "math_500": 83.9, "gpqa_diamond": 33.8},
    {"model": "DeepSeek-R1-Distill-Qwen-7B (R1 paper)", "aime24": 55.5, "math_500": 92.8},
    # recipe openr1-stratos-1.5b (docs/recipes.md): the open-r1 README's table, lighteval pass@1
    {"model": "Qwen2.5-Math-1.5B base (open-r1 README)", "aime24": 3.33, "math_500": 23.6, "gpqa_diamond": 25.75},
    {"model": "DeepSeek-R1-Distill-Qwen-1.5B (open-r1 README)", "aime24": 30.0, "math_500": 83.0,
     "gpqa_diamond": 32.83},
    {"model": "Qwen2.5-Math-1.5B SFT on Bespoke-Stratos-17k, 1 epoch (open-r1 README)", "aime24": 6.67,
     "math_500": 45.4, "gpqa_diamond": 28.79},
    # recipe openr1-distill-7b: open-r1 README (OpenR1-Distill-7B table)
    {"model": "OpenR1-Distill-7B (open-r1 README)", "aime24": 52.7, "math_500": 89.0, "gpqa_diamond": 52.8},
    {"model": "DeepSeek-R1-Distill-Qwen-7B (open-r1 README)", "aime24": 51.3, "math_500": 93.5,
     "gpqa_diamond": 52.4},
]


def _ref_cell(v: float) -> str:
    """A published figure as published: 90.0 stays 90.0, 3.33 stays 3.33 (no silent rounding)."""
    return f"{v:.1f}" if round(v, 1) == v else f"{v:.2f}"


# Settings that change what is generated: a resume into a directory with other values is refused.
_FINGERPRINT = ("engine", "model_name", "temperature", "top_p", "max_tokens", "system_prompt", "seed",
                "min_think_tokens", "max_think_tokens", "prompt_version", "server_kind")


class EvalError(RuntimeError):
    """A user-facing error (printed as one line, exit code 2)."""


@dataclass
class EvalConfig:
    """Every setting of one eval run; each documented field is also its ``distill eval`` flag
    (:mod:`distilled.settings`), in this order in ``--help``.

    The four generation settings (``n``, ``temperature``, ``top_p``, ``max_tokens``) default to
    None and are filled after construction: from ``preset`` when given, else from
    ``_GEN_DEFAULTS``. Why not plain defaults: an explicit ``--max-tokens`` must win over the preset.
    """

    tasks: str | Sequence[str] | None = option(
        None, help="comma list of math_500, aime24, aime25, gpqa_diamond, synth, jsonl:PATH")
    engine: str = option("openai", help="openai: a running server; transformers/vllm: load --model here",
                         choices=["openai", "transformers", "vllm"])
    api_addr: list[str] = option([], help="HOST:PORT (or base URL) of OpenAI-compatible servers")
    model: str | None = option(None, help="HF model folder (transformers/vllm engines)")
    model_name: str | None = option(None, help="served model id (openai) / display name in reports")
    preset: str | None = option(
        None, choices=sorted(PRESETS),
        help="named settings: open-r1 = T 0.6, top_p 0.95, 32768 new tokens, n 64 AIME / 4 MATH-500 / "
             "8 GPQA-D (explicit flags override)")
    n: int | str | None = option(
        None, help="samples per problem, or 'auto' (AIME 64, MATH-500 4, GPQA 8); default 4")
    temperature: float | None = option(None, help="default 0.6")
    top_p: float | None = option(None, help="default 0.95")
    max_tokens: int | None = option(None, help="max new tokens per sample (default 32768)")
    system_prompt: str | None = option(None, help="system turn before each problem (none by default)")
    prompt_template: str | None = option(
        None, help="math tasks: a str.format template with {prompt} instead of the pinned lighteval prompt "
                   "(e.g. the one the model was trained with); recorded as the prompt version")
    data_dir: str | None = option(
        None, help="folder with math500.jsonl, aime24.jsonl, aime25.jsonl, gpqa_diamond.jsonl")
    task_file: str | None = option(None, help="problems file (id, problem, answer) for the synth task")
    output: str = option("runs/eval", help="run folder: samples, results.json, report.md (a rerun resumes)")
    limit: int | None = option(None, help="first K problems of each task")
    seed: int = option(0, help="sampling seed (also the GPQA answer shuffle)")
    batch_size: int = option(8, help="transformers batch / judging batch")
    max_concurrent: int = option(64, help="openai: requests in flight")
    max_retries: int = option(8, help="openai: retries per request")
    request_timeout: float = option(600.0, help="openai: seconds per request attempt")
    api_key_env: str | None = option(None, help="environment variable holding the API key")
    tokenizer: str | None = option(
        None, help="openai + budget forcing: the served model's tokenizer folder (default: --model when given)")
    verify_workers: int = option(2, help="answer-checking processes")
    verify_timeout: float = option(5.0, help="seconds per answer check (a hung check counts as wrong)")
    min_think_tokens: int | None = option(None, help="budget forcing: replace an earlier </think> with 'Wait'")
    max_think_tokens: int | None = option(None, help="budget forcing: cut thinking and force </think>")
    tensor_parallel_size: int = option(1, help="vllm engine")
    server_kind: str = option(
        "openai", choices=["openai", "vllm", "transformers"],
        help="openai engine + budget forcing: openai = standard fields only (the stop string is not "
             "returned); vllm = also send include_stop_str_in_output; transformers = `transformers "
             "serve` (returns the stop string)")
    """openai engine + budget forcing: ``openai`` sends standard fields only; ``vllm`` adds
    ``include_stop_str_in_output``; ``transformers`` (``transformers serve``) returns stop strings."""
    skip_incomplete: bool = option(
        False, help="leave problems with a failed sample out of pass@1 (the old behaviour; labelled in the "
                    "report). Default: a failed sample counts as wrong")
    """Old behaviour: leave a problem with a failed (missing) sample out of pass@1. Default: that
    sample counts as wrong, because failures are the long, hard generations and dropping their
    problems biases pass@1 upwards."""
    prompt_version: str = PROMPT_VERSION  # internal (no flag): set from prompt_template below

    def __post_init__(self) -> None:
        preset = PRESETS.get(self.preset, {}) if self.preset else {}
        for key, default in _GEN_DEFAULTS.items():
            if getattr(self, key) is None:
                setattr(self, key, preset.get(key, default))
        if isinstance(self.n, str) and self.n.isdigit():
            self.n = int(self.n)
        if self.prompt_template is not None:
            if "{prompt}" not in self.prompt_template:
                raise EvalError("--prompt-template must contain {prompt}")
            self.prompt_version = f"custom math template {self.prompt_template!r}"

    def budget(self) -> BudgetConfig:
        return BudgetConfig(self.min_think_tokens, self.max_think_tokens)

    def n_for(self, task: str) -> int:
        if self.n == "auto":
            return OPEN_R1_N.get(task, 4)
        return int(self.n)


@dataclass
class CompareConfig:
    """``distill eval compare``: one table across eval runs (each field is its flag)."""

    runs: list[str] = option(help="eval output folders or results.json files", positional=True)
    reference: bool = option(False, help="add the published reference rows")
    output: str | None = option(None, help="write the markdown table here (and a PNG beside it)")


# ------------------------------------------------------------------------------------------------
# Checks before any generation
# ------------------------------------------------------------------------------------------------


def _check_config(cfg: EvalConfig) -> None:
    if cfg.engine not in ("openai", "transformers", "vllm"):
        raise EvalError(f"--engine {cfg.engine!r}: choose openai, transformers or vllm")
    if cfg.n != "auto" and (not str(cfg.n).isdigit() or int(cfg.n) < 1):
        raise EvalError(f"--n {cfg.n!r}: a positive integer or 'auto' (open-r1: AIME 64, MATH-500 4, GPQA 8)")
    if cfg.max_tokens < 1:
        raise EvalError(f"--max-tokens must be >= 1, got {cfg.max_tokens}")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        raise EvalError(f"--temperature must be >= 0 and --top-p in (0, 1], got {cfg.temperature}, {cfg.top_p}")
    if cfg.limit is not None and cfg.limit < 1:
        raise EvalError(f"--limit must be >= 1, got {cfg.limit}")
    try:
        cfg.budget().check()
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    if cfg.engine == "openai":
        if not cfg.api_addr:
            raise EvalError("--engine openai needs --api-addr HOST:PORT (one or more)")
    else:
        if not cfg.model:
            raise EvalError(f"--engine {cfg.engine} needs --model DIR (a HF model folder)")
        if not Path(cfg.model).is_dir():
            raise EvalError(f"--model {cfg.model}: no such directory")


def load_tasks(cfg: EvalConfig) -> list[Task]:
    """Load and check every task (raises :class:`EvalError` with file/row/field on bad data)."""
    try:
        names = parse_task_names(cfg.tasks)
        return [load_task(n, cfg.data_dir, cfg.task_file, cfg.seed, cfg.limit, math_template=cfg.prompt_template)
                for n in names]
    except TaskError as exc:
        raise EvalError(str(exc)) from None


def _messages(cfg: EvalConfig, p: Problem) -> list[dict]:
    from distilled.prompts import build_messages  # the build generate and the training formats use

    return build_messages(p.user_prompt, cfg.system_prompt)


def problems_digest(tasks: Sequence[Task]) -> dict[str, str]:
    """Per task, a sha256 over its problems as prompted and scored: (id, prompt, gold) in order.

    Why: the samples log holds verdicts made against the gold of the run that wrote them. A
    corrected gold file, another --data-dir/--task-file or another --limit must not reuse them
    (a resume would report stale verdicts), so this is part of the resume fingerprint.
    """
    import hashlib

    out = {}
    for t in tasks:
        h = hashlib.sha256()
        for p in t.problems:
            h.update(json.dumps([p.id, p.user_prompt, p.gold], ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
        out[t.name] = h.hexdigest()[:16]
    return out


def _fingerprint(cfg: EvalConfig, tasks: Sequence[Task] | None = None) -> dict:
    d = asdict(cfg)
    fp = {k: d[k] for k in _FINGERPRINT}
    if tasks is not None:
        fp["problems_sha256"] = problems_digest(tasks)
    return fp


def _describe_diff(key: str, old: Any, new: Any) -> str:
    if key == "problems_sha256" and isinstance(old, dict) and isinstance(new, dict):
        changed = sorted(t for t in set(old) & set(new) if old[t] != new[t])
        if changed:
            return (f"the problems or gold answers of {', '.join(changed)} differ (another --data-dir, "
                    "--task-file, --limit or an edited file)")
        return ""
    return f"{key}: {old!r} -> {new!r}"


def _prepare_output(cfg: EvalConfig, tasks: Sequence[Task] | None = None) -> Path:
    """Create the output dir; refuse to resume a run made with other generation settings or
    other problems / gold answers (:func:`problems_digest`)."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run_config.json"
    fp = _fingerprint(cfg, tasks)
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("fingerprint", {})
        except ValueError:
            old = {}
        diff = [_describe_diff(k, old.get(k), fp[k]) for k in fp if k in old and old.get(k) != fp[k]]
        diff = [d for d in diff if d]
        if diff and (out / "samples.jsonl").exists():
            raise EvalError(f"{out} holds samples made with other settings ({'; '.join(diff)}); "
                            "use another --output, or delete that directory to start over")
        if isinstance(old.get("problems_sha256"), dict) and "problems_sha256" in fp:
            # keep the digests of tasks this run does not touch: their samples stay in the log
            fp["problems_sha256"] = {**old["problems_sha256"], **fp["problems_sha256"]}
    from distilled.io_utils import write_json

    write_json(path, {"fingerprint": fp, "config": asdict(cfg)})
    return out


# ------------------------------------------------------------------------------------------------
# Samples log (resume)
# ------------------------------------------------------------------------------------------------


def read_samples(path: Path) -> dict[tuple[str, str, int], dict]:
    """Records already in samples.jsonl by (task, problem_id, sample_index). A torn last line is
    ignored here (the appender cuts it on open); other bad lines are errors naming the line."""
    from distilled.io_utils import BadLine, iter_jsonl, repair_jsonl_tail

    done: dict[tuple[str, str, int], dict] = {}
    if not path.exists():
        return done
    repair_jsonl_tail(path)
    for line, rec in iter_jsonl(path):
        if isinstance(rec, BadLine):
            raise EvalError(f"{rec}; fix or remove that line to resume")
        try:
            done[(rec["task"], str(rec["problem_id"]), int(rec["sample_index"]))] = rec
        except (KeyError, TypeError, ValueError):
            raise EvalError(f"{path}:{line}: not a samples.jsonl record (needs task, problem_id, sample_index)") from None
    return done


def _record(cfg: EvalConfig, p: Problem, req: GenRequest, out: GenOutput, verdict: Any) -> dict:
    rec = {
        "task": p.task, "problem_id": p.id, "problem_index": p.index, "sample_index": req.key[2],
        "seed": req.seed, "prompt": req.messages, "output": out.text, "finish_reason": out.finish_reason,
        "extracted": verdict.extracted, "correct": bool(verdict.correct), "reason": verdict.reason,
        "complete": bool(verdict.complete), "gold": p.gold,
        "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
        "think_tokens": out.think_tokens,
    }
    if out.budget is not None:
        rec["budget"] = out.budget
    if p.meta:
        rec.update(p.meta)
    return rec


def score_samples(pool: Any, items: Sequence[tuple[str, str, str | None, str]]) -> list[Any]:
    """Verdicts for ``(output, gold, finish_reason, kind)`` under :data:`eval_tasks.SCORING_RULE`.

    :func:`eval_tasks.answer_to_score` (the function the lighteval task file calls too) picks the
    text judged, so a sample truncated after ``</think>`` is scored on its answer, as lighteval and
    open-r1 score it; the verifier is then asked with ``finish_reason=None``. ``finish_reason``
    stays in samples.jsonl (the truncated share).
    """
    from distilled.eval.tasks import answer_to_score
    from distilled.verify import Verdict

    answers = [answer_to_score(text) for text, _gold, _finish, _kind in items]
    judged = iter(list(pool.judge_many((a, gold, None, kind) for a, (_t, gold, _f, kind) in zip(answers, items)
                                       if a is not None)))
    return [Verdict(False, "unfinished", None, False) if a is None else next(judged) for a in answers]


class _Judge:
    """Judges (problem, request, output) triples with the shared verifier pool and appends records."""

    def __init__(self, cfg: EvalConfig, pool: Any, appender: Any, problems: dict, bar: Any):
        self.cfg, self.pool, self.appender, self.problems, self.bar = cfg, pool, appender, problems, bar
        self.lock = threading.Lock()
        self.written = 0

    def __call__(self, items: list[tuple[GenRequest, GenOutput]]) -> None:
        if not items:
            return
        probs = [self.problems[(r.key[0], r.key[1])] for r, _ in items]
        verdicts = score_samples(self.pool, [(o.text, p.gold, o.finish_reason, p.kind) for p, (_, o) in zip(probs, items)])
        with self.lock:
            for p, (r, o), v in zip(probs, items, verdicts):
                self.appender.write(_record(self.cfg, p, r, o, v))
                self.written += 1
                if self.bar is not None:
                    self.bar.update(1)


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------


def _requests(cfg: EvalConfig, tasks: list[Task], done: dict) -> list[GenRequest]:
    reqs = []
    for t in tasks:
        for p in t.problems:
            msgs = _messages(cfg, p)
            for s in range(cfg.n_for(t.name)):
                if (t.name, p.id, s) in done:
                    continue
                reqs.append(GenRequest((t.name, p.id, s), msgs, stable_seed(cfg.seed, t.name, p.id, s)))
    return reqs


def _make_engine(cfg: EvalConfig, logits_processor: Any = None):
    from distilled.eval import engines as E

    if cfg.engine == "openai":
        try:
            served = asyncio.run(E.probe_server(cfg.api_addr, api_key_env=cfg.api_key_env))
        except EngineError as exc:
            raise EvalError(str(exc)) from None
        if not cfg.model_name:
            if len(set(served)) != 1:
                raise EvalError(f"--model-name is needed: the server serves {sorted(set(served)) or 'no models'}")
            cfg.model_name = served[0]
        if cfg.budget().active and not cfg.tokenizer and cfg.model:
            cfg.tokenizer = cfg.model  # the served model's folder holds its tokenizer
        if cfg.budget().active and not cfg.tokenizer:
            raise EvalError("budget forcing with --engine openai needs --tokenizer DIR (the served model's "
                            "tokenizer, to render its chat template for /v1/completions continuation)")
        try:
            return E.OpenAIEngine(cfg.api_addr, cfg.model_name, cfg.max_concurrent, cfg.max_retries,
                                  cfg.request_timeout, cfg.api_key_env, cfg.tokenizer, cfg.server_kind)
        except EngineError as exc:
            raise EvalError(str(exc)) from None
    try:
        if cfg.engine == "transformers":
            return E.TransformersEngine(cfg.model, cfg.batch_size, logits_processor=logits_processor)
        return E.VLLMEngine(cfg.model, cfg.tensor_parallel_size, cfg.seed)
    except EngineError as exc:
        raise EvalError(str(exc)) from None


def run_eval(cfg: EvalConfig, logits_processor: Any = None, stop_after: int | None = None) -> dict:
    """Run (or resume) an evaluation and write every output; returns the results dict.

    ``stop_after`` (tests) stops after that many new samples, as an interruption would.
    """
    from tqdm import tqdm

    from distilled.io_utils import JsonlAppender
    from distilled.verify import VerifierPool

    _check_config(cfg)
    tasks = load_tasks(cfg)
    if not cfg.model_name and cfg.model:
        cfg.model_name = Path(cfg.model).name
    engine = _make_engine(cfg, logits_processor)
    out = _prepare_output(cfg, tasks)
    samples_path = out / "samples.jsonl"
    done = read_samples(samples_path)
    reqs = _requests(cfg, tasks, done)
    if stop_after is not None:
        reqs = reqs[:stop_after]
    problems = {(t.name, p.id): p for t in tasks for p in t.problems}
    t0 = time.perf_counter()
    failed: list[str] = []
    with VerifierPool(workers=cfg.verify_workers, timeout=cfg.verify_timeout) as pool, \
            JsonlAppender(samples_path) as appender, \
            tqdm(total=len(reqs), desc=f"eval {cfg.model_name}", unit="sample", disable=None) as bar:
        judge = _Judge(cfg, pool, appender, problems, bar)
        if reqs:
            if cfg.engine == "openai":
                failed = _run_openai(cfg, engine, reqs, judge)
            else:
                batch: list = []
                for item in engine.generate(reqs, cfg.max_tokens, cfg.temperature, cfg.top_p, cfg.budget(), cfg.seed):
                    batch.append(item)
                    if len(batch) >= cfg.batch_size:
                        judge(batch)
                        batch = []
                judge(batch)
        results = summarize(cfg, tasks, read_samples(samples_path), pool)
    results["elapsed_s"] = round(time.perf_counter() - t0, 2)
    results["new_samples"] = len(reqs) - len(failed)
    results["failed_samples"] = len(failed)
    write_reports(out, results)
    if failed:
        print(f"warning: {len(failed)} sample(s) failed after retries (first: {failed[0]}); rerun the same "
              "command to retry them", file=sys.stderr)
    return results


def _run_openai(cfg: EvalConfig, engine: Any, reqs: list[GenRequest], judge: _Judge) -> list[str]:
    """Generate concurrently; completed samples are judged in a thread and logged within seconds."""
    failed: list[str] = []

    from concurrent.futures import ThreadPoolExecutor

    # one judging thread: the verifier pool's workers and pipes are not shared between threads,
    # and batches are then logged in completion order
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eval-judge")

    async def go() -> None:
        loop = asyncio.get_running_loop()
        buf: list = []
        flushes: list = []

        def flush() -> None:
            if buf:
                items = buf[:]
                buf.clear()
                flushes.append(loop.run_in_executor(executor, judge, items))

        def on_done(req: GenRequest, res: Any) -> None:
            if isinstance(res, BaseException):
                failed.append(f"{req.key}: {type(res).__name__}: {res}")
                return
            buf.append((req, res))
            if len(buf) >= max(4, 2 * cfg.verify_workers):
                flush()

        await engine.agenerate(reqs, cfg.max_tokens, cfg.temperature, cfg.top_p, cfg.budget(), on_done)
        flush()
        for f in flushes:
            await f

    try:
        asyncio.run(go())
    except EngineError as exc:
        raise EvalError(str(exc)) from None
    finally:
        executor.shutdown(wait=True)
    return failed


# ------------------------------------------------------------------------------------------------
# Metrics over samples.jsonl
# ------------------------------------------------------------------------------------------------


def _equivalence(pool: Any, kind: str):
    """Batched answer equivalence for cons@n: the verifier for math, letter equality for choices."""

    def eq(pairs: list[tuple[object, object]]) -> list[bool]:
        if kind == "choice":
            return [str(a).strip().upper() == str(b).strip().upper() for a, b in pairs]
        items = [(f"\\boxed{{{a}}}", str(b), None, "math") for a, b in pairs]
        return [v.correct for v in pool.judge_many(items)]

    return eq


def summarize(cfg: EvalConfig, tasks: list[Task], records: dict, pool: Any) -> dict:
    """results.json content: metrics per task from the logged samples of this run's problems."""
    from distilled.eval.metrics import aggregate, cons_correct, default_ks, score_problem

    res: dict[str, Any] = {
        "model": cfg.model_name, "engine": cfg.engine, "prompt_version": cfg.prompt_version,
        "scoring": SCORING_RULE,
        "settings": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                     "system_prompt": cfg.system_prompt, "seed": cfg.seed, "n": cfg.n, "limit": cfg.limit,
                     "model": cfg.model, "api_addr": cfg.api_addr, "preset": cfg.preset},
        "budget": {"min_think_tokens": cfg.min_think_tokens, "max_think_tokens": cfg.max_think_tokens}
        if cfg.budget().active else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tasks": {},
    }
    for t in tasks:
        n = cfg.n_for(t.name)
        ks = default_ks(n)
        scores, incomplete, missing = [], 0, 0
        think, comp = [], []
        waits = forced = 0
        for p in t.problems:
            recs = [records.get((t.name, p.id, s)) for s in range(n)]
            gaps = sum(r is None for r in recs)
            missing += gaps
            if gaps:
                incomplete += 1
                if cfg.skip_incomplete:
                    continue
            # a missing sample (failed after retries, or not generated yet) scores wrong; it is
            # counted in failed_samples, not as truncated or unanswered
            answered = [r is None or r["extracted"] is not None for r in recs]
            truncated = [r is not None and r["finish_reason"] == "length" for r in recs]
            correct = [r is not None and bool(r["correct"]) for r in recs]
            cons = cons_correct(correct, [None if r is None else r["extracted"] for r in recs],
                                _equivalence(pool, t.kind))
            scores.append(score_problem(p.id, correct, truncated, [a or tr for a, tr in zip(answered, truncated)],
                                        None, ks, cons=cons))
            # unanswered counts finished samples with no answer; truncated ones are counted apart
            for r in recs:
                if r is None:
                    continue
                if r.get("think_tokens") is not None:
                    think.append(r["think_tokens"])
                if r.get("completion_tokens") is not None:
                    comp.append(r["completion_tokens"])
                b = r.get("budget") or {}
                waits += int(b.get("waits", 0))
                forced += int(bool(b.get("forced_close")))
        m = aggregate(scores, ks)
        m.update({"source": t.source, "kind": t.kind, "n_requested": n, "incomplete_problems": incomplete,
                  "failed_samples": missing,
                  "incomplete_policy": "skipped" if cfg.skip_incomplete else "scored_wrong",
                  "mean_completion_tokens": (sum(comp) / len(comp)) if comp else None,
                  "mean_think_tokens": (sum(think) / len(think)) if think else None})
        if cfg.budget().active:
            m["budget_waits"] = waits
            m["budget_forced_close"] = forced
        if t.kind == "choice":
            m["shuffle"] = {"seed": cfg.seed, "rule": "per problem: Random(sha256('gpqa:{seed}:{id}')).randint(0,3) "
                                                      "= gold position; incorrect answers keep their order",
                            "gold_letters": {p.id: p.gold for p in t.problems}}
        res["tasks"][t.name] = m
    return res


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------


def _failure_note(m: dict) -> str:
    """What the headline number leaves out or scores as wrong: '' when every sample is there."""
    failed = int(m.get("failed_samples", 0) or 0)
    if m.get("incomplete_policy") == "skipped" and m.get("incomplete_problems"):
        return f"{m['incomplete_problems']} problems with {failed} failed samples skipped (--skip-incomplete)"
    if failed:
        return f"{failed} failed samples scored wrong"
    return ""


def _cell(m: dict | None) -> str:
    if not m or "pass@1" not in m:
        if m and m.get("failed_samples"):
            return f"- ({_failure_note(m)})"
        return "-"
    note = _failure_note(m)
    return f"{m['pass@1']:.1f} ± {m.get('pass@1_stderr', 0):.1f}" + (f" ({note})" if note else "")


def render_report(results: dict) -> str:
    """report.md: the seeds' table (model, then tasks: pass@1 ± stderr), details and settings."""
    from distilled.plots import md_table

    tasks = list(results["tasks"])
    lines = [f"# Evaluation: {results['model']}", "",
             "pass@1 (%) averaged over n samples per problem, ± standard error over problems. "
             + ("Problems with a failed sample are left out (--skip-incomplete)."
                if any(results["tasks"][t].get("incomplete_policy") == "skipped" for t in tasks)
                else "A failed sample (no output after retries) counts as wrong."), ""]
    lines.append(md_table(["model"] + tasks, [[results["model"]] + [_cell(results["tasks"][t]) for t in tasks]]))
    rows = []
    for t in tasks:
        m = results["tasks"][t]
        ks = sorted(int(k[5:]) for k in m if k.startswith("pass@") and not k.endswith("_stderr"))
        passk = ", ".join(f"@{k} {m[f'pass@{k}']:.1f}" for k in ks) or "-"
        cons = next((f"{m[k]:.1f}" for k in m if k.startswith("cons@") and k != "cons@n" and not k.endswith("_stderr")), "-")
        rows.append([t, m.get("problems", 0), m.get("n", "-"), passk, cons,
                     f"{m.get('truncated_pct', 0):.1f}", f"{m.get('unanswered_pct', 0):.1f}",
                     "-" if m.get("mean_completion_tokens") is None else f"{m['mean_completion_tokens']:.0f}",
                     m.get("incomplete_problems", 0), m.get("failed_samples", 0)])
    lines += ["## Details", "", md_table(["task", "problems", "n", "pass@k (%)", "cons@n (%)", "truncated (%)",
                                         "unanswered (%)", "mean output tokens", "incomplete problems",
                                         "failed samples"], rows)]
    s = results["settings"]
    lines += ["## Settings", "",
              f"- engine: {results['engine']}; model: {s.get('model') or results['model']}",
              f"- temperature {s['temperature']}, top_p {s['top_p']}, max_tokens {s['max_tokens']}, n {s['n']}, "
              f"seed {s['seed']}" + (f", limit {s['limit']}" if s.get("limit") else ""),
              f"- system prompt: {s['system_prompt']!r}",
              f"- prompt version: {results['prompt_version']}"]
    b = results.get("budget")
    if b:
        lines.append(f"- budget forcing (s1): min_think_tokens {b['min_think_tokens']}, "
                     f"max_think_tokens {b['max_think_tokens']}; " +
                     "; ".join(f"{t}: {results['tasks'][t].get('budget_waits', 0)} 'Wait' insertions, "
                               f"{results['tasks'][t].get('budget_forced_close', 0)} forced </think>, mean think "
                               f"tokens {results['tasks'][t].get('mean_think_tokens') or 0:.0f}" for t in tasks))
    else:
        lines.append("- budget forcing: off")
    for t in tasks:
        if "shuffle" in results["tasks"][t]:
            lines.append(f"- {t}: answer positions shuffled with seed {results['tasks'][t]['shuffle']['seed']} "
                         "(gold letters in results.json)")
    return "\n".join(lines) + "\n"


def write_reports(out: Path, results: dict) -> None:
    """results.json (first), then report.md and the PNG bar chart built from it."""
    from distilled.io_utils import atomic_write, write_json
    from distilled.plots import bar_chart

    write_json(out / "results.json", results)
    with atomic_write(out / "report.md") as f:
        f.write(render_report(results))
    tasks = [t for t in results["tasks"] if "pass@1" in results["tasks"][t]]
    if tasks:
        bar_chart(out / "pass_at_1.png", tasks, {results["model"]: [results["tasks"][t]["pass@1"] for t in tasks]},
                  title=f"pass@1 (%) - {results['model']}", ylabel="pass@1 (%)")


def _load_results(path: str) -> dict:
    p = Path(path)
    f = p / "results.json" if p.is_dir() else p
    if not f.exists():
        raise EvalError(f"{path}: no results.json (run `distill eval --output {path}` first)")
    try:
        data = json.loads(f.read_text())
    except ValueError as exc:
        raise EvalError(f"{f}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "tasks" not in data or "model" not in data:
        raise EvalError(f"{f}: not a distill eval results.json (needs 'model' and 'tasks')")
    return data


def compare(runs: Sequence[str], reference: bool = False, output: str | None = None) -> str:
    """One table across runs (rows: models, columns: tasks), plus the published reference rows."""
    from distilled.plots import md_table

    results = [_load_results(r) for r in runs]
    tasks: list[str] = []
    for r in results:
        for t in r["tasks"]:
            if t not in tasks:
                tasks.append(t)
    names = [r["model"] for r in results]
    rows = []
    for r, name in zip(results, names):
        label = name if names.count(name) == 1 else f"{name} ({r.get('settings', {}).get('model') or r.get('engine')})"
        rows.append([label] + [_cell(r["tasks"].get(t)) for t in tasks])
    if reference:
        for t in ("math_500", "aime24", "gpqa_diamond"):
            if t not in tasks and any(t in ref for ref in REFERENCE_ROWS):
                tasks.append(t)
                for row in rows:
                    row.append("-")
        for ref in REFERENCE_ROWS:
            rows.append([f"*{ref['model']}* (reported)"] + [_ref_cell(ref[t]) if t in ref else "-" for t in tasks])
    text = ("pass@1 (%) averaged over n samples, ± standard error over problems"
            + ("; reported rows are published figures, not measured here" if reference else "") + ".\n\n"
            + md_table(["model"] + tasks, rows))
    settings = [f"- {n}: engine {r.get('engine')}, T={r['settings'].get('temperature')}, "
                f"top_p={r['settings'].get('top_p')}, max_tokens={r['settings'].get('max_tokens')}, "
                f"n={r['settings'].get('n')}, prompt {r.get('prompt_version')}"
                + (f", budget {r['budget']}" if r.get("budget") else "") for n, r in zip(names, results)]
    text += "\n" + "\n".join(settings) + "\n"
    if output:
        from distilled.io_utils import atomic_write
        from distilled.plots import bar_chart

        with atomic_write(output) as f:
            f.write(text)
        measured = [t for t in tasks if any("pass@1" in r["tasks"].get(t, {}) for r in results)]
        if measured:
            png = Path(output).with_suffix(".png")
            bar_chart(png, measured, {n: [r["tasks"].get(t, {}).get("pass@1", 0.0) for t in measured]
                                      for n, r in zip(names, results)}, title="pass@1 (%)", ylabel="pass@1 (%)")
    return text


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def _cfg_from_args(a: argparse.Namespace) -> EvalConfig:
    """The parsed ``distill eval`` flags as an :class:`EvalConfig` (the preset is applied there)."""
    return from_args(EvalConfig, a)


def cmd_eval(a: argparse.Namespace) -> int:
    if a.tasks is None:
        print("error: --tasks is required (e.g. --tasks math_500,aime24)", file=sys.stderr)
        return 2
    try:
        res = run_eval(_cfg_from_args(a))
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = ", ".join(f"{t} {m['pass@1']:.1f}±{m['pass@1_stderr']:.1f}" if "pass@1" in m else f"{t} -"
                        for t, m in res["tasks"].items())
    missing = sum(int(m.get("failed_samples", 0) or 0) for m in res["tasks"].values())
    policy = ("skipped with their problems (--skip-incomplete)" if a.skip_incomplete else "scored wrong")
    print(f"eval {res['model']}: pass@1 {summary} ({res['new_samples']} new samples in {res['elapsed_s']:.1f}s; "
          f"{missing} failed samples {policy}) -> {a.output}/report.md")
    return 1 if res["failed_samples"] else 0


def cmd_compare(a: argparse.Namespace) -> int:
    try:
        cfg = from_args(CompareConfig, a)
        text = compare(cfg.runs, cfg.reference, cfg.output)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model on MATH-500 / AIME / GPQA-Diamond (pass@1 over n samples)",
                       description="Evaluate a model: `distill eval --tasks math_500,aime24 --engine openai "
                                   "--api-addr HOST:PORT --model-name NAME`, or `distill eval compare RUN1 RUN2`.")
    add_arguments(p, EvalConfig)
    p.set_defaults(func=cmd_eval)
    esub = p.add_subparsers(dest="eval_command", metavar="{compare}")
    c = esub.add_parser("compare", help="one table across eval runs (base vs distilled)")
    add_arguments(c, CompareConfig)
    c.set_defaults(func=cmd_compare)
