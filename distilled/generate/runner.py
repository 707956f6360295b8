"""``distill generate``: problems -> generations.jsonl from an OpenAI-compatible teacher.

A superset of open-r1's ``generate_reasoning.py`` command line (the MindSpore docs copy it), so
their commands keep working, without its flaws:

- concurrency is bounded by in-flight *requests* (each generation is its own request, and a new
  one starts the moment another finishes), not by problems or batches, so a slow generation
  never stalls the others;
- a failed generation is retried with backoff (see :mod:`distilled.generate.client`) and, if it still
  fails, goes to ``OUT.failed.jsonl`` with its reason instead of silently dropping the problem;
  a rerun retries it;
- a problem's line is written once all N generations succeeded, in one ``write`` + flush, with
  fsync at least every second; a torn last line (kill -9 mid-write) is cut on resume without
  touching complete lines; duplicate uuids are reported, generated once;
- the input row's columns are never overwritten: the output *adds* :data:`OUTPUT_COLUMNS`
  (``problem_key`` is the resume key, the uuid column's value as a string) and ``prompt`` only when
  the input has no ``prompt`` column. An input column with a reserved name is refused (or dropped
  with ``--drop-columns``). Resume skips rows whose ``problem_key`` is already in the output;
- the settings that shape a generation (:data:`CHECKED_SETTINGS`) are recorded in
  ``OUT.settings.json`` (atomically, before the first request); a resume with different settings
  stops and names each difference unless ``--allow-settings-change`` is passed (then the change is
  recorded there with the number of rows made before it);
- a start-up probe (``GET /models``) names each endpoint that does not answer; when none does the
  run stops at once (``--wait-for-server S`` waits up to S seconds for a starting server);
- SIGINT/SIGTERM stop sending, abandon in-flight requests, flush, and exit 130 with one line that
  says what is saved and how to resume.

``OUT.failed.jsonl`` is the output path with ``.jsonl`` replaced by ``.failed.jsonl``
(``gens.jsonl`` -> ``gens.failed.jsonl``); it lists the failures of the latest run only.
``OUT.settings.json`` likewise (``gens.jsonl`` -> ``gens.settings.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from distilled.generate.client import (DEFAULT_IDLE_TIMEOUT, DEFAULT_REQUEST_TIMEOUT, DEFAULT_RETRY_AFTER_MAX,
                                      ChatClient, FatalAPIError, RetriesExhausted)
from distilled.io_utils import BadLine, JsonlAppender, atomic_write, iter_jsonl, location, read_rows
from distilled.prompts import DEFAULT_PROMPT_TEMPLATE, build_messages, render_prompt  # noqa: F401 (re-exported)
from distilled.settings import add_arguments, from_args, option

EXIT_OK, EXIT_SOME_FAILED, EXIT_FATAL, EXIT_INTERRUPTED = 0, 1, 2, 130

# Columns every output row adds. An input column of the same name would be overwritten, so it is
# refused (or dropped with --drop-columns). New per-generation data (e.g. top logprobs) belongs
# here and in :func:`output_row`. ``prompt`` (the message sent) is added only when the input has
# no ``prompt`` column of its own; ``sent_prompt`` always holds it.
OUTPUT_COLUMNS = ("problem_key", "sent_prompt", "generations", "finish_reasons", "api_metadata")
# Settings that change what a generation is: a resume under different values would mix rows made
# two ways in one file, so it stops unless --allow-settings-change. Extend with new request options.
CHECKED_SETTINGS = ("model", "num_generations", "prompt_template", "system_prompt", "max_tokens", "temperature",
                    "top_p", "seed", "prompt_column", "uuid_column")
# Recorded too, never checked (they do not change a generation, or may legitimately move).
RECORDED_SETTINGS = ("dataset_name", "dataset_config", "split", "stream")


@dataclass
class GenerateConfig:
    """Everything ``distill generate`` needs; each field with ``option`` is one CLI flag.

    Why one place: the flag's spelling, default and help live on the field, so the CLI and the
    library cannot drift apart. One option is not 1:1 and is spelled out in :func:`register_cli`:
    ``endpoints`` (gathered from the repeatable ``--api-addr`` and ``--base-url``).
    ``drop_columns`` is one comma-list flag (``sep=","``). ``fsync_every`` and ``probe_timeout`` are
    library-only knobs (no flag)."""

    dataset_name: str = option(help="local .jsonl/.json/.parquet, a save_to_disk directory, or a hub id (online)")
    output_file: str = option(help="output JSONL (appended to; a rerun resumes)")
    endpoints: list[str]  # --api-addr / --base-url (see register_cli)
    model: str = option("default", help="model name sent to the server (default 'default')")
    dataset_config: str | None = option(None, help="hub dataset config name")
    split: str = option("train", help="dataset split (default train)")
    prompt_column: str = option("problem", help="column holding the problem text (default problem)")
    uuid_column: str | None = option(None, help="column identifying a problem (default: the prompt column)")
    api_key_env: str | None = option(None, help="environment variable holding the API key")
    num_generations: int = option(4, help="answers per problem (default 4)")
    max_tokens: int = option(16384, help="max new tokens per answer (default 16384)")
    max_concurrent: int = option(64, help="max requests in flight over all endpoints")
    temperature: float | None = option(0.6, help="sampling temperature (default 0.6, DeepSeek-R1's)")
    top_p: float | None = option(0.95, help="nucleus sampling top-p (default 0.95)")
    prompt_template: str = option(
        DEFAULT_PROMPT_TEMPLATE, help="user message template with {prompt} (default: open-r1's)")
    system_prompt: str | None = option(None, help="system turn sent before the user message (none by default)")
    request_timeout: float = option(  # per non-streamed attempt
        DEFAULT_REQUEST_TIMEOUT,
        help="seconds per non-streamed attempt (default 3600: 32k tokens at 10 tok/s per sequence)")
    max_retries: int = option(8, help="retries per generation after the first attempt")
    backoff_base: float = option(1.0, help="first retry delay in seconds (doubles)")
    seed: int | None = option(None, help="send seed = SEED*100003 + generation index")
    limit: int | None = option(None, help="only the first K unique problems")
    progress: bool = option(True, help="no progress bar (the summary line still prints)", flag="--no-progress")
    fsync_every: float = 1.0
    stream: bool = option(
        False, help="stream answers (SSE) and time out only on silence (--idle-timeout), not on total time")
    idle_timeout: float = option(  # streamed: seconds without a byte
        DEFAULT_IDLE_TIMEOUT, help="with --stream: seconds without a byte before an attempt is abandoned and retried")
    retry_after_max: float = option(
        DEFAULT_RETRY_AFTER_MAX, help="cap on the seconds a server's Retry-After may make a request wait")
    wait_for_server: float = option(  # seconds the start-up probe may wait for a server to answer
        0.0, help="let the start-up probe wait this long for a server that is still starting", metavar="SECONDS")
    probe_timeout: float = 10.0
    allow_settings_change: bool = option(
        False, help="resume into an output made with other settings (the change is recorded in "
                    "OUT.settings.json); without it such a resume stops and names the differences")
    drop_columns: tuple[str, ...] = option(
        (), sep=",", metavar="COL,...",
        help="input columns to leave out of the output (e.g. an input's own 'generations')")
    top_logprobs: int | None = option(  # K: also store the teacher's top-K per token (distilled.kd.capture)
        None, metavar="K",
        help="also store the teacher's top-K log-probabilities per generated token (K <= 20) in "
             "OUT.topk.bin, for logits distillation (needs --tokenizer; docs/logits-distillation.md)")
    tokenizer: str | None = option(  # the student's tokenizer, to map and check the teacher's tokens (KD)
        None, metavar="DIR",
        help="with --top-logprobs: the student's tokenizer (folder or 'qwen2.5'); teacher tokens are "
             "mapped to it by bytes and a teacher with another vocabulary is refused")


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
    usage_counted: int = 0
    signal: str | None = None
    kd_line: str | None = None  # with --top-logprobs: what the sidecar got (distilled.kd.capture)

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
        if self.usage_counted:
            s += (f"; {self.usage_counted} streamed generations without server usage "
                  "(completion_tokens counted from chunks, marked usage_source)")
        if self.interrupted:
            s += "; INTERRUPTED (rerun to resume)"
        if self.fatal:
            s += f"; STOPPED: {self.fatal}"
        return s

    def interrupted_line(self, output_file: str) -> str:
        """The one line printed on SIGINT/SIGTERM: what is saved, and how to resume."""
        return (f"generate: INTERRUPTED by {self.signal or 'a signal'}: {self.done}/{self.total} problems saved in "
                f"{output_file} ({self.written} this run, {self.already_done} before); in-flight generations were "
                "abandoned; rerun the same command to resume")


def failed_path(output_file: str | os.PathLike) -> Path:
    """``gens.jsonl`` -> ``gens.failed.jsonl`` (any other name gets ``.failed.jsonl`` appended)."""
    p = Path(output_file)
    if p.suffix == ".jsonl":
        return p.with_suffix(".failed.jsonl")
    return p.with_name(p.name + ".failed.jsonl")


def settings_path(output_file: str | os.PathLike) -> Path:
    """``gens.jsonl`` -> ``gens.settings.json`` (any other name gets ``.settings.json`` appended)."""
    p = Path(output_file)
    if p.suffix == ".jsonl":
        return p.with_suffix(".settings.json")
    return p.with_name(p.name + ".settings.json")


def generation_settings(cfg: GenerateConfig) -> dict[str, Any]:
    """The settings recorded beside the output (checked ones first; the uuid column resolved)."""
    d = {k: getattr(cfg, k) for k in CHECKED_SETTINGS + RECORDED_SETTINGS}
    d["uuid_column"] = cfg.uuid_column or cfg.prompt_column
    return d


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_settings(cfg: GenerateConfig, rows_done: int, warn) -> dict:
    """Compare the run's settings with ``OUT.settings.json``; return the record to write.

    Raises ``SystemExit`` naming every differing setting when the output already holds rows made
    under other settings, unless ``cfg.allow_settings_change`` (then the change is recorded)."""
    path = settings_path(cfg.output_file)
    now = generation_settings(cfg)
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    fresh = {"format": 1, "settings": now, "runs": [{"started": stamp, "rows_before": rows_done, "settings": now}]}
    if rows_done == 0:
        return fresh
    if not path.exists():
        warn(f"warning: {cfg.output_file} has {rows_done} rows but no {path.name} (written by an older version "
             "or deleted): their settings cannot be checked; recording this run's")
        return fresh
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        old = rec["settings"]
        if not isinstance(old, dict) or not isinstance(rec.get("runs"), list):
            raise TypeError("'settings' must be an object and 'runs' a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"error: {path}: unreadable settings record ({type(exc).__name__}: {exc}); fix or delete "
                         "it (its settings are then not checked)") from None
    diff = [k for k in CHECKED_SETTINGS if k in old and old[k] != now[k]]
    diff += [k for k in CHECKED_SETTINGS if k not in old]
    if not diff:
        rec["runs"].append({"started": stamp, "rows_before": rows_done})
        return rec
    what = "; ".join(f"{_flag(k)} was {old.get(k, '(not recorded)')!r}, now {now[k]!r}" for k in diff)
    if not cfg.allow_settings_change:
        raise SystemExit(f"error: {cfg.output_file} already holds {rows_done} rows made with other settings "
                         f"({path.name}): {what}. Rerun with the recorded settings, write to another --output-file, "
                         "or pass --allow-settings-change to append rows made under the new settings")
    warn(f"warning: --allow-settings-change: {rows_done} rows were made with other settings ({what}); "
         f"the remaining problems use the new ones (recorded in {path.name})")
    rec["settings"] = now
    rec["runs"].append({"started": stamp, "rows_before": rows_done, "settings": now, "changed": diff})
    return rec


def _iter_input(cfg: GenerateConfig, warn) -> Iterator[tuple[str, dict | BadLine]]:
    """Yield ``(where, row)``; ``where`` is ``FILE:N`` for a local file and ``source row N`` for a hub id
    or a directory (read through ``datasets``)."""
    src = cfg.dataset_name
    p = Path(src)
    if not p.exists() and (p.suffix in (".jsonl", ".json", ".parquet") or src.startswith((".", "/", "~"))):
        raise SystemExit(f"error: --dataset-name {src}: no such file or directory")
    if p.is_file():  # a local file: the one row reader, locations FILE:N
        try:
            rows = read_rows(src, split=cfg.split)
        except ValueError as exc:  # an unsupported suffix, or a file that cannot be read at all
            raise SystemExit(f"error: --dataset-name {src}: {exc}") from None
        for n, obj in rows:
            yield location(src, n), obj
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


def output_row(p: _Problem, results: list) -> dict:
    """One output line: the input row untouched plus :data:`OUTPUT_COLUMNS` (``prompt`` too when the
    input has none, for readers such as ``distill reject`` that look for it)."""
    row = dict(p.row)
    row["problem_key"] = p.key
    row["sent_prompt"] = p.prompt
    row.setdefault("prompt", p.prompt)
    row["generations"] = [x.text for x in results]
    row["finish_reasons"] = [x.finish_reason for x in results]
    row["api_metadata"] = [x.usage for x in results]
    return row


def load_problems(cfg: GenerateConfig, warn=print) -> tuple[list[_Problem], int, int]:
    """Read the input; return ``(unique problems, duplicate count, skipped-row count)``.

    Rows missing the prompt/uuid column or with a non-string prompt are skipped, counted and
    named (first five). A column missing from *every* row is a fatal error.
    """
    uuid_col = cfg.uuid_column or cfg.prompt_column
    if uuid_col in OUTPUT_COLUMNS:
        raise SystemExit(f"error: --uuid-column {uuid_col!r} is a column that distill generate writes "
                         f"({', '.join(OUTPUT_COLUMNS)}); the key would be overwritten. Pick another column "
                         "(e.g. --uuid-column id)")
    for c in (cfg.prompt_column, uuid_col):
        if c in cfg.drop_columns:
            raise SystemExit(f"error: --drop-columns {c!r}: it is the prompt or uuid column")
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
        if cfg.drop_columns:
            row = {k: v for k, v in row.items() if k not in cfg.drop_columns}
        clash = [c for c in OUTPUT_COLUMNS if c in row]
        if clash:
            raise SystemExit(f"error: {where}: input column(s) {clash} would be overwritten by distill generate's "
                             f"own; drop them with --drop-columns {','.join(clash)} (or rename them)")
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
    The steps, in order, are the methods of :class:`_GenerateRun`.
    """
    run = _GenerateRun(cfg, warn or (lambda m: print(m, file=sys.stderr, flush=True)))
    problems = run.read_problems(problems)
    run.make_client()
    done, rows_done = run.open_output()
    run.record_settings(rows_done)
    prev_failed = run.open_failed_log()
    run.open_capture(done)
    todo = run.plan(problems, done, prev_failed)
    run.open_progress()
    await run.generate(todo, install_signals)
    return run.finish()


class _GenerateRun:
    """The state one ``distill generate`` run shares between its steps (one method per step).

    Why a class: the workers, the ticker and the signal handler all touch the same summary, output
    files, stop event and progress bar; as attributes of one object a reader sees who changes what,
    instead of closures over a long function's locals."""

    def __init__(self, cfg: GenerateConfig, warn) -> None:
        self.cfg = cfg
        self.warn = warn
        self.summ = GenerateSummary()
        self.uuid_col = cfg.uuid_column or cfg.prompt_column
        self.out_path = Path(cfg.output_file)
        self.fpath = failed_path(self.out_path)
        self.summ.failed_file = str(self.fpath)
        self.client: Any = None
        self.appender: _SyncingAppender | None = None
        self.failed_log: JsonlAppender | None = None
        self.capture: Any = None  # distilled.kd.capture.Capture with --top-logprobs
        self.pbar: Any = None
        self.stop = asyncio.Event()  # set by a fatal error, or a signal: workers take no new pair
        self.fatal: list[str] = []  # the first entry is the reason reported
        self.pairs: Iterator[tuple[_Problem, int]] = iter(())
        self.t0 = time.perf_counter()

    # ---- set-up, in order --------------------------------------------------------------------

    def read_problems(self, problems: list[_Problem] | None) -> list[_Problem]:
        """The input's unique problems (read per ``cfg`` unless given)."""
        if problems is None:
            problems, self.summ.duplicates, self.summ.skipped_rows = load_problems(self.cfg, self.warn)
        self.summ.total = len(problems)
        return problems

    def make_client(self) -> None:
        """The balancing, retrying client (an endpoint taken out is reported through :meth:`say`)."""
        cfg = self.cfg
        self.client = ChatClient(cfg.endpoints, cfg.model, api_key_env=cfg.api_key_env,
                                 max_concurrent=cfg.max_concurrent, max_retries=cfg.max_retries,
                                 request_timeout=cfg.request_timeout, backoff_base=cfg.backoff_base,
                                 stream=cfg.stream, idle_timeout=cfg.idle_timeout,
                                 retry_after_max=cfg.retry_after_max, on_event=self._on_client_event)

    def _on_client_event(self, kind: str, info: dict) -> None:
        if kind == "endpoint_down":
            self.say(f"endpoint {info['endpoint']} taken out for {info['cooldown']:.1f}s ({info['reason']})")

    def open_output(self) -> tuple[set[str], int]:
        """Open the output for appending (a torn tail is cut) and read it back for resume.

        Returns the problem keys already written and the number of readable rows."""
        out_path = self.out_path
        self.appender = _SyncingAppender(out_path, fsync_every=self.cfg.fsync_every)  # repairs a torn tail first
        self.summ.repaired_bytes = self.appender.repaired_bytes
        if self.summ.repaired_bytes:
            self.warn(f"warning: {out_path}: cut a torn last line ({self.summ.repaired_bytes} bytes) left by an "
                      "interrupted run")
        done: set[str] = set()
        bad_mid = 0
        rows_done = 0
        for _n, obj in iter_jsonl(out_path):
            if isinstance(obj, BadLine):
                bad_mid += 1
                continue
            rows_done += 1
            if "problem_key" in obj:
                done.add(str(obj["problem_key"]))
            elif self.uuid_col in obj:  # a file written before problem_key existed
                done.add(str(obj[self.uuid_col]))
        if bad_mid:
            self.warn(f"warning: {out_path}: {bad_mid} unreadable lines in the middle of the file (left as they are)")
        return done, rows_done

    def record_settings(self, rows_done: int) -> None:
        """Check the settings against ``OUT.settings.json`` and record them, before the first request."""
        try:
            record = check_settings(self.cfg, rows_done, self.warn)
        except SystemExit:
            self.appender.close()
            raise
        with atomic_write(settings_path(self.out_path)) as f:
            json.dump(record, f, indent=1, ensure_ascii=False)
            f.write("\n")

    def open_failed_log(self) -> int:
        """Start this run's ``OUT.failed.jsonl`` empty; return how many failures the previous run left."""
        fpath = self.fpath
        prev_failed = sum(1 for _ in iter_jsonl(fpath)) if fpath.exists() else 0
        with atomic_write(fpath) as f:  # this run's failures only; earlier ones are retried below
            f.write("")
        self.failed_log = JsonlAppender(fpath, fsync_every=self.cfg.fsync_every)
        return prev_failed

    def open_capture(self, done: set[str]) -> None:
        """With ``--top-logprobs``: the top-K sidecar beside the JSONL (docs/logits-distillation.md)."""
        cfg = self.cfg
        if not cfg.top_logprobs:
            return
        from distilled.kd.capture import Capture

        if cfg.stream or not cfg.tokenizer:
            self.appender.close()
            self.failed_log.close()
            raise SystemExit("error: --top-logprobs needs --tokenizer (the student's tokenizer: teacher tokens are "
                             "mapped and checked against it)" if not cfg.tokenizer else
                             "error: --top-logprobs needs non-streamed answers (drop --stream)")
        self.capture = capture = Capture(self.out_path, cfg.top_logprobs, cfg.tokenizer, committed=done,
                                         fsync_every=cfg.fsync_every)
        if capture.writer.repaired_bytes:
            self.warn(f"warning: {capture.path}: cut {capture.writer.repaired_bytes} bytes "
                      f"({capture.writer.orphan_records} records of unwritten problems and/or a torn record) left "
                      "by an interrupted run")

    def plan(self, problems: list[_Problem], done: set[str], prev_failed: int) -> list[_Problem]:
        """The problems still to generate (resume skips the written ones), each with N empty slots."""
        todo = [p for p in problems if p.key not in done]
        self.summ.already_done = len(problems) - len(todo)
        if prev_failed:
            self.warn(f"retrying problems behind {prev_failed} failed generations of the previous run")
        n_gen = self.cfg.num_generations
        for p in todo:
            p.results = [None] * n_gen
            p.remaining = n_gen
        self.pairs = ((p, g) for p in todo for g in range(n_gen))  # shared by all workers
        return todo

    def open_progress(self) -> None:
        """The progress bar (``--no-progress``: none; the summary line still prints)."""
        if self.cfg.progress:
            from tqdm import tqdm

            self.pbar = tqdm(total=self.summ.total, initial=self.summ.already_done, unit="problem", desc="generate",
                             dynamic_ncols=True, mininterval=0.5, smoothing=0.05, file=sys.stderr)
        self.t0 = time.perf_counter()

    def say(self, msg: str) -> None:
        """A message that does not break the progress bar."""
        if self.pbar is not None:
            self.pbar.write(msg, file=sys.stderr)
        else:
            self.warn(msg)

    # ---- the run -----------------------------------------------------------------------------

    async def generate(self, todo: list[_Problem], install_signals: bool) -> None:
        """Probe the endpoints, run the workers until every pair is done or the run stops, then close."""
        cfg, client, stop = self.cfg, self.client, self.stop
        loop = asyncio.get_running_loop()
        installed = self._install_signal_handlers(loop) if install_signals else []
        await client.open()
        tick = asyncio.ensure_future(self.ticker())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            if todo and not await _probe(cfg, client, stop, self.say, self.fatal):
                stop.set()
            if not stop.is_set():
                await self._run_workers(max(1, min(2 * cfg.max_concurrent, len(todo) * cfg.num_generations)),
                                        stopper)
        finally:
            for t in (tick, stopper):
                t.cancel()
            await asyncio.gather(tick, stopper, return_exceptions=True)
            for sig in installed:
                loop.remove_signal_handler(sig)
            await self._close()

    async def _run_workers(self, n: int, stopper: asyncio.Future) -> None:
        """``n`` workers share :attr:`pairs`; a stop abandons the in-flight requests at once."""
        workers = [asyncio.ensure_future(self.worker()) for _ in range(n)]
        all_done = asyncio.ensure_future(asyncio.wait(workers))
        await asyncio.wait([all_done, stopper], return_when=asyncio.FIRST_COMPLETED)
        all_done.cancel()
        if self.stop.is_set():
            for w in workers:
                w.cancel()
        await asyncio.gather(all_done, *workers, return_exceptions=True)

    async def worker(self) -> None:
        """One request slot: take the next (problem, generation) pair until none is left or the run stops."""
        for p, g in self.pairs:
            if self.stop.is_set():
                return
            if p.failed:
                continue
            if not await self.generate_one(p, g):
                return

    async def generate_one(self, p: _Problem, g: int) -> bool:
        """Request generation ``g`` of ``p`` and store it; False when the whole run must stop."""
        cfg = self.cfg
        seed = None if cfg.seed is None else cfg.seed * 100_003 + g
        try:
            r = await self.client.chat(build_messages(p.prompt, cfg.system_prompt), max_tokens=cfg.max_tokens,
                                       temperature=cfg.temperature, top_p=cfg.top_p, seed=seed,
                                       extra=self.capture.request_extra() if self.capture is not None else None)
        except RetriesExhausted as exc:
            self.fail(p, g, exc.reason, exc.attempts)
            if exc.unreachable and self.client.all_down():  # every server went away: stop, don't fail them all
                return self.stop_run(f"no endpoint answers any more (last error: {exc.reason}); completed "
                                     "problems are saved; rerun once the server is back")
            return True
        except FatalAPIError as exc:
            if exc.status in (401, 403, 404) or exc.status is None:
                return self.stop_run(str(exc))
            self.fail(p, g, str(exc), 1)  # e.g. 400: this prompt is too long; the others may be fine
            return True
        self.summ.generations += 1
        self.summ.completion_tokens += int((r.usage or {}).get("completion_tokens") or 0)
        if p.failed:
            return True
        if self.capture is not None and not self._take_top_logprobs(p, g, r):
            return False
        p.results[g] = r
        p.remaining -= 1
        if p.remaining == 0:
            self.write_problem(p)
        return True

    def _take_top_logprobs(self, p: _Problem, g: int, r: Any) -> bool:
        """Map the answer's top-K to the student's vocabulary; False (run stopped) on a vocabulary mismatch."""
        from distilled.kd.logprobs import VocabularyMismatch

        try:
            r.kd_record = self.capture.take(r.text, r.logprobs, f"problem {p.key!r} generation {g}")
        except VocabularyMismatch as exc:
            return self.stop_run(str(exc))
        return True

    def write_problem(self, p: _Problem) -> None:
        """All N generations are in: one output line (the KD records first: the line is their commit point)."""
        if self.capture is not None:
            self.capture.commit(p.key, [getattr(x, "kd_record", None) for x in p.results])
        self.appender.write(output_row(p, p.results))
        p.results = []
        self.summ.written += 1
        if self.pbar is not None:
            self.pbar.update(1)

    def fail(self, p: _Problem, g: int, reason: str, attempts: int) -> None:
        """A generation gave up: log it; its problem is not written this run (a rerun retries it)."""
        self.summ.failed_generations += 1
        self.failed_log.write({"uuid": p.key, "generation_index": g, "reason": reason, "attempts": attempts})
        if not p.failed:
            p.failed = True
            self.summ.failed_problems += 1

    def stop_run(self, reason: str) -> bool:
        """Stop sending (the first reason is the one reported); returns False for the worker's caller."""
        if not self.fatal:
            self.fatal.append(reason)
        self.stop.set()
        return False

    async def ticker(self) -> None:
        """Every second: fsync what was written, and refresh the progress bar's rates."""
        cfg, summ, client = self.cfg, self.summ, self.client
        while True:
            await asyncio.sleep(min(1.0, cfg.fsync_every))
            if self.capture is not None:
                self.capture.sync()  # the sidecar reaches the disk before the JSONL lines that commit it
            self.appender.sync()
            if self.pbar is not None:
                dt = max(1e-9, time.perf_counter() - self.t0)
                self.pbar.set_postfix_str(f"{summ.generations / dt:.1f} gen/s, {summ.completion_tokens / dt:.0f} "
                                          f"tok/s, in-flight {client.in_flight}, retries {client.retries}, "
                                          f"failed {summ.failed_generations}", refresh=False)

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> list[signal.Signals]:
        """SIGINT/SIGTERM stop the run (see :meth:`on_signal`); returns the signals to uninstall."""
        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.on_signal, sig.name)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread / Windows
                pass
        return installed

    def on_signal(self, signame: str) -> None:
        """Silent: the caller prints one line at the end (:meth:`GenerateSummary.interrupted_line`)."""
        if not self.summ.interrupted:
            self.summ.interrupted = True
            self.summ.signal = signame
            self.stop.set()

    async def _close(self) -> None:
        """Close the sidecar, the output, the failure log, the client and the bar (in that order)."""
        if self.capture is not None:
            self.capture.close()
            self.summ.kd_line = self.capture.line()
        self.appender.close()
        self.failed_log.close()
        await self.client.close()
        if self.pbar is not None:
            self.pbar.close()

    def finish(self) -> GenerateSummary:
        """Fill in the summary; an empty failure log is removed (nothing failed)."""
        summ = self.summ
        summ.seconds = time.perf_counter() - self.t0
        summ.retries = self.client.retries
        summ.usage_counted = self.client.usage_counted
        if self.fatal:
            summ.fatal = self.fatal[0]
        if summ.failed_generations == 0 and self.fpath.exists() and self.fpath.stat().st_size == 0:
            self.fpath.unlink()
        return summ


async def _probe(cfg: GenerateConfig, client: Any, stop: asyncio.Event, say, fatal: list[str]) -> bool:
    """Start-up probe: True when at least one endpoint answers ``GET /models`` (any HTTP status).

    Endpoints that do not answer are named and taken out (the client re-probes them later); with
    ``--wait-for-server S`` the probe repeats every second for up to S seconds while none answers."""
    deadline = time.monotonic() + max(0.0, cfg.wait_for_server)
    waited = False
    while True:
        res = await client.probe(timeout=cfg.probe_timeout)
        dead = {u: r for u, r in res.items() if r is not None}
        if len(dead) < len(res):
            for u, r in dead.items():
                say(f"warning: endpoint {u} does not answer ({r}); taken out, re-probed later")
                client.mark_down(u, r)
            if waited:
                say(f"server answered after waiting {cfg.wait_for_server - (deadline - time.monotonic()):.0f}s")
            return True
        if time.monotonic() >= deadline or stop.is_set():
            break
        if not waited:
            say(f"waiting up to {cfg.wait_for_server:g}s for a server to answer at {', '.join(res)}")
            waited = True
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass
    if stop.is_set():
        return False
    names = "; ".join(f"{u} ({r})" for u, r in dead.items())
    hint = "" if cfg.wait_for_server else "; --wait-for-server SECONDS waits for a server that is still starting"
    fatal.append(f"no endpoint answers: {names}. Is the server running, and are --api-addr/--base-url right?"
                 + (f" (waited {cfg.wait_for_server:g}s)" if cfg.wait_for_server else hint))
    return False


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    """Build :class:`GenerateConfig` from the flags; only the derived ``endpoints`` is computed here."""
    endpoints = list(args.api_addr or [])
    if args.base_url:
        endpoints += args.base_url
    if not endpoints:
        endpoints = ["localhost:39876"]  # open-r1's default
    return from_args(GenerateConfig, args, endpoints=endpoints)


def cmd_generate(args: argparse.Namespace) -> int:
    """``distill generate``: exit 0 when every problem is written, 1 when some failed (rerun to
    retry), 2 on a fatal error (bad input, 401/403/404), 130 when interrupted."""
    from distilled.generate.client import FatalAPIError

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
    except KeyboardInterrupt:  # Ctrl-C before the handlers were installed (reading the input)
        print(f"generate: INTERRUPTED while reading the input; nothing new written to {cfg.output_file}; rerun "
              "the same command to resume", flush=True)
        return EXIT_INTERRUPTED
    if summ.interrupted:
        print(summ.interrupted_line(cfg.output_file), flush=True)
        return EXIT_INTERRUPTED
    print(summ.line(), flush=True)
    if summ.kd_line:
        print(summ.kd_line, flush=True)
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
    add_arguments(p, GenerateConfig)
    # Not 1:1 with a field: several flags fill one list, and the default endpoint is open-r1's
    # (config_from_args merges them into GenerateConfig.endpoints).
    p.add_argument("--api-addr", action="append", default=None,
                   help="HOST:PORT of an endpoint (repeat for several; balanced by least in-flight)")
    p.add_argument("--base-url", action="append", default=None, help="full base URL, e.g. https://api.x.com/v1")
    # The flag is one comma list; the field is a tuple (config_from_args splits it).
    p.set_defaults(func=cmd_generate)
