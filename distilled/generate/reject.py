"""``distill reject``: keep the teacher generations whose final answer is right.

generations.jsonl (``distill generate``, OpenR1-Math-220k rows, or any JSONL with a gold answer
and a list of generations) -> KEPT.jsonl (+ REJECTED.jsonl, REPORT.json).

Why it is built this way:

* one verifier for the whole project (:mod:`distilled.verify`): the rules that decide a kept
  training sample are the ones ``distill eval`` scores with;
* every output row keeps all input columns and gets ``correctness_math_verify`` and
  ``is_reasoning_complete`` aligned with the *original* ``generations``, so nothing about the
  verdicts is lost and rows can be re-filtered later without re-judging;
* users run this over hundreds of thousands of rows: verdicts are journalled (append-only,
  torn tail repaired) beside the output as they are made, so a crash or Ctrl-C loses at most a
  second of work; the final files are written atomically from the journal at the end, so a
  rerun gives byte-identical output with no duplicates;
* bad lines never shorten the dataset silently: each is reported with its line number
  (``--strict`` stops at the first).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from distilled.io_utils import BadLine, JsonlAppender, atomic_write, iter_jsonl, write_json
from distilled.prompts import build_messages
from distilled.settings import add_arguments, from_args, option

KEEP_MODES = ("first", "shortest", "all")
JOURNAL_VERSION = 1


class RejectError(Exception):
    """A problem with the input or options, reported as one clear line (file, line, field)."""


@dataclass
class RejectConfig:
    """Options of ``distill reject``; each field with ``option`` is one CLI flag (defaults match it).

    ``workers`` is the one exception: the library default is 2, while the CLI's ``--workers``
    defaults to the machine's CPU cores, so that flag is spelled out in :func:`register_cli`."""

    src: str = option(help="input JSONL (distill generate output, OpenR1-Math-220k rows, ...)")
    dst: str = option(help="kept rows (JSONL), each with a `messages` list")
    rejected: str | None = option(None, help="rows with no correct generation (JSONL); else only counted")
    report: str | None = option(None, help="REPORT.json: counts, rejections by reason, malformed lines, speed")
    answer_column: str = option("answer", help="gold answer column (default: answer)")
    generations_column: str = option("generations", help="list of generations (default: generations)")
    finish_reasons_column: str = option(
        "finish_reasons", help="optional list aligned with the generations (default: finish_reasons)")
    prompt_column: str | None = option(  # None: the first of "sent_prompt", "prompt", "problem" the row has
        None, help="user prompt for `messages` (default: the first of `sent_prompt`, `prompt`, `problem` the row has)")
    keep: str = option("first", choices=KEEP_MODES,
                       help="which correct generation a kept row trains on: first, shortest (characters), or "
                            "all (one output row per correct generation)")
    workers: int = 2  # --workers (see register_cli)
    timeout: float = option(5.0, help="seconds per verdict before it counts as `timeout`")
    strict: bool = option(False, help="stop at the first malformed line")
    kind: str = option("math", choices=("math", "choice"), help="math (math-verify) or choice (gold is a letter A-J)")
    progress: bool = option(True, help="no progress bar", flag="--no-progress")


# ---------------------------------------------------------------------------------------------
# Row validation
# ---------------------------------------------------------------------------------------------


@dataclass
class _Row:
    line: int
    gold: str
    generations: list[str]
    finish_reasons: list[str | None]


def _validate(cfg: RejectConfig, line: int, obj: dict) -> _Row | BadLine:
    """Check one input row; a problem becomes a ``BadLine`` naming the field and the type found."""
    src = cfg.src

    def bad(msg: str) -> BadLine:
        return BadLine(src, line, msg)

    if cfg.answer_column not in obj:
        return bad(f"missing field {cfg.answer_column!r} (the gold answer; set --answer-column)")
    gold = obj[cfg.answer_column]
    if gold is None:
        gold = ""
    elif isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
        return bad(f"field {cfg.answer_column!r}: expected a string or number, got {type(gold).__name__}")
    gens = obj.get(cfg.generations_column)
    if cfg.generations_column not in obj:
        return bad(f"missing field {cfg.generations_column!r} (set --generations-column)")
    if not isinstance(gens, list):
        return bad(f"field {cfg.generations_column!r}: expected a list of strings, got {type(gens).__name__}")
    for i, g in enumerate(gens):
        if not isinstance(g, str):
            return bad(f"field {cfg.generations_column!r}[{i}]: expected a string, got {type(g).__name__}")
    frs = obj.get(cfg.finish_reasons_column)
    if frs is None:
        frs = [None] * len(gens)
    elif not isinstance(frs, list) or len(frs) != len(gens):
        n = len(frs) if isinstance(frs, list) else type(frs).__name__
        return bad(f"field {cfg.finish_reasons_column!r}: expected a list of {len(gens)} strings "
                   f"(one per generation), got {n}")
    elif any(fr is not None and not isinstance(fr, str) for fr in frs):
        return bad(f"field {cfg.finish_reasons_column!r}: entries must be strings or null")
    if _prompt_of(cfg, obj) is None:
        want = cfg.prompt_column or "'sent_prompt', 'prompt' or 'problem'"
        return bad(f"missing prompt field {want} (a string; set --prompt-column)")
    return _Row(line, str(gold), gens, list(frs))


def _prompt_of(cfg: RejectConfig, obj: dict) -> str | None:
    # sent_prompt first: the student trains on the message the teacher actually answered
    # (distill generate's --prompt-template applied), whatever the input's own columns were.
    cols = [cfg.prompt_column] if cfg.prompt_column else ["sent_prompt", "prompt", "problem"]
    for c in cols:
        v = obj.get(c)
        if isinstance(v, str):
            return v
    return None


# ---------------------------------------------------------------------------------------------
# Journal (resume)
# ---------------------------------------------------------------------------------------------


def journal_path(dst: str | os.PathLike) -> Path:
    """Where the verdict journal of an unfinished run lives (beside ``dst``; deleted at the end)."""
    p = Path(dst)
    return p.parent / f".{p.name}.reject-journal.jsonl"


def _journal_header(cfg: RejectConfig) -> dict:
    st = os.stat(cfg.src)
    return {
        "journal": JOURNAL_VERSION,
        "src": str(Path(cfg.src).resolve()),
        "src_size": st.st_size,
        "src_mtime_ns": st.st_mtime_ns,
        "answer_column": cfg.answer_column,
        "generations_column": cfg.generations_column,
        "finish_reasons_column": cfg.finish_reasons_column,
        "kind": cfg.kind,
        "timeout": cfg.timeout,
    }


class SavedVerdict(NamedTuple):
    """One generation's verdict as the journal keeps it (a JSON list in this field order)."""

    correct: bool
    reason: str
    extracted: Any
    complete: bool

    @classmethod
    def of(cls, v: Any) -> "SavedVerdict":
        """From a :class:`distilled.verify.Verdict` (the fields the outputs need, by name)."""
        return cls(correct=v.correct, reason=v.reason, extracted=v.extracted, complete=v.complete)


def _load_journal(path: Path, header: dict) -> dict[int, list[SavedVerdict]] | None:
    """Verdicts of a previous run of the same job, or None when there is no usable journal."""
    if not path.exists():
        return None
    done: dict[int, list[SavedVerdict]] = {}
    first = True
    for _, obj in iter_jsonl(path):
        if isinstance(obj, BadLine):
            continue  # a torn tail: JsonlAppender cuts it when we reopen
        if first:
            if obj != header:
                return None
            first = False
            continue
        done[int(obj["line"])] = [SavedVerdict(*v) for v in obj["v"]]
    return None if first else done


def _resume(cfg: RejectConfig, jpath: Path, header: dict) -> dict[int, list[SavedVerdict]]:
    """The verdicts an interrupted run of the same job journalled; a journal of another job is removed."""
    done = _load_journal(jpath, header)
    if done is None:
        if jpath.exists():
            print(f"note: {jpath} belongs to another input or options; starting over", file=sys.stderr)
            jpath.unlink()
        done = {}
    return done


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _count_lines(path: str) -> int:
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
    return n


def _choose(keep: str, gens: list[str], correct: list[bool]) -> list[int]:
    idx = [i for i, c in enumerate(correct) if c]
    if not idx:
        return []
    if keep == "first":
        return idx[:1]
    if keep == "shortest":
        return [min(idx, key=lambda i: (len(gens[i]), i))]
    return idx


def run_reject(cfg: RejectConfig) -> dict:
    """Judge every generation of ``cfg.src``; write kept/rejected rows and return the report.

    Raises ``RejectError`` for a missing file, bad options, or (``strict``) the first bad line.
    The steps: check the options, resume from the journal, judge what it lacks (pass 1), write
    the outputs from the journal (pass 2), report.
    """
    _check_options(cfg)
    t0 = time.perf_counter()
    header = _journal_header(cfg)
    jpath = journal_path(cfg.dst)
    done = _resume(cfg, jpath, header)
    resumed_rows = len(done)
    judged = _judge(cfg, jpath, header, done)
    judge_s = time.perf_counter() - t0
    counts, reasons = _write_outputs(cfg, done)
    report = _report(cfg, counts, reasons, judged, resumed_rows, seconds=time.perf_counter() - t0, judge_s=judge_s)
    if cfg.report:
        write_json(cfg.report, report)
    jpath.unlink(missing_ok=True)
    return report


def _check_options(cfg: RejectConfig) -> None:
    """Refuse bad options and an output that would overwrite the input, before any work."""
    from distilled.verify import KINDS

    if cfg.keep not in KEEP_MODES:
        raise RejectError(f"--keep must be one of {', '.join(KEEP_MODES)}, got {cfg.keep!r}")
    if cfg.kind not in KINDS:
        raise RejectError(f"--kind must be one of {', '.join(KINDS)}, got {cfg.kind!r}")
    if not Path(cfg.src).is_file():
        raise RejectError(f"{cfg.src}: no such file")
    if cfg.timeout <= 0:
        raise RejectError("--timeout must be > 0 seconds")
    for out in (cfg.dst, cfg.rejected, cfg.report):
        if out and Path(out).resolve() == Path(cfg.src).resolve():
            raise RejectError(f"{out}: an output may not overwrite the input")


@dataclass
class _Judged:
    """What pass 1 did (for the report)."""

    bad_lines: list[BadLine]
    new_generations: int = 0
    killed_workers: int = 0


def _judge(cfg: RejectConfig, jpath: Path, header: dict, done: dict[int, list[SavedVerdict]]) -> _Judged:
    """Pass 1: judge every valid row the journal lacks; each row's verdicts go to ``done`` and the journal."""
    from tqdm import tqdm

    from distilled.verify import VerifierPool

    judged = _Judged(bad_lines=[])
    rows_queue: collections.deque = collections.deque()  # rows whose verdicts are on the way, oldest first
    with tqdm(total=_count_lines(cfg.src), desc="reject", unit="row", disable=not cfg.progress or None) as bar, \
            JsonlAppender(jpath) as journal, \
            VerifierPool(workers=cfg.workers, timeout=cfg.timeout) as pool:
        if jpath.stat().st_size == 0:
            journal.write(header)
        items = _items(_rows_to_judge(cfg, done, bar, judged.bad_lines), rows_queue, cfg.kind)
        for r, verdicts in _verdicts_by_row(pool.judge_many(items), rows_queue):
            done[r.line] = verdicts
            journal.write({"line": r.line, "v": [list(v) for v in verdicts]})
            judged.new_generations += len(verdicts)
            bar.update(1)
        judged.killed_workers = pool.killed_workers
        bar.update(max(0, bar.total - bar.n))  # blank lines are not rows
    return judged


def _rows_to_judge(cfg: RejectConfig, done: dict, bar: Any, bad_lines: list[BadLine]) -> Iterator[_Row]:
    """The valid input rows without journalled verdicts; a bad line is collected (``--strict``: raised).

    Rows not yielded are counted on the bar here; a yielded one when its verdicts are in."""
    for line, obj in iter_jsonl(cfg.src):
        if isinstance(obj, BadLine):
            bad = obj
        else:
            r = _validate(cfg, line, obj)
            if isinstance(r, _Row):
                if line in done:
                    bar.update(1)
                    continue
                yield r
                continue
            bad = r
        bar.update(1)
        if cfg.strict:
            raise RejectError(f"{bad} (--strict)")
        bad_lines.append(bad)


def _items(rows: Iterator[_Row], rows_queue: collections.deque, kind: str) -> Iterator[tuple]:
    """The verifier's work items, one per generation; a row is queued before its first item."""
    for r in rows:
        rows_queue.append(r)
        for g, fr in zip(r.generations, r.finish_reasons):
            yield g, r.gold, fr, kind


def _verdicts_by_row(verdicts: Iterator, rows_queue: collections.deque) -> Iterator[tuple[_Row, list[SavedVerdict]]]:
    """Group the verifier's stream of verdicts back into ``(row, its verdicts)``, in input order."""
    buf: list[SavedVerdict] = []
    for v in _with_empty_rows(verdicts, rows_queue):
        if v is _ROW_END:
            yield rows_queue.popleft(), buf
            buf = []
        else:
            buf.append(SavedVerdict.of(v))


def _write_outputs(cfg: RejectConfig, done: dict[int, list[SavedVerdict]]) -> tuple[dict, Counter]:
    """Pass 2: write the kept (and rejected) rows atomically from the verdicts; return the counts and
    the rejection reasons. Input order, so a rerun writes byte-identical files."""
    reasons: Counter = Counter()
    rep = dict(rows_in=0, rows_kept=0, rows_rejected=0, rows_written=0, generations_in=0, generations_correct=0)
    rej_ctx = atomic_write(cfg.rejected) if cfg.rejected else _NullWriter()
    with atomic_write(cfg.dst) as kept_f, rej_ctx as rej_f:
        for line, obj in iter_jsonl(cfg.src):
            if isinstance(obj, BadLine) or line not in done:
                continue
            vs = done[line]
            gens = obj[cfg.generations_column]
            correct = [bool(v.correct) for v in vs]
            out = dict(obj)
            out["correctness_math_verify"] = correct
            out["is_reasoning_complete"] = [bool(v.complete) for v in vs]
            rep["rows_in"] += 1
            rep["generations_in"] += len(vs)
            rep["generations_correct"] += sum(correct)
            reasons.update(v.reason for v in vs if not v.correct)
            chosen = _choose(cfg.keep, gens, correct)
            if not chosen:
                rep["rows_rejected"] += 1
                if cfg.rejected:
                    rej_f.write(_dumps(out))
                continue
            rep["rows_kept"] += 1
            prompt = _prompt_of(cfg, obj)
            for i in chosen:
                row = dict(out)
                row["messages"] = build_messages(prompt, None) + [{"role": "assistant", "content": gens[i]}]
                row["kept_generation_index"] = i
                kept_f.write(_dumps(row))
                rep["rows_written"] += 1
    return rep, reasons


def _report(cfg: RejectConfig, counts: dict, reasons: Counter, judged: _Judged, resumed_rows: int, *,
            seconds: float, judge_s: float) -> dict:
    """REPORT.json (also what :func:`summary_line` prints)."""
    from distilled.verify import REASONS

    return {
        "src": cfg.src,
        "dst": cfg.dst,
        "rejected": cfg.rejected,
        "keep": cfg.keep,
        "kind": cfg.kind,
        "workers": cfg.workers,
        "timeout_s": cfg.timeout,
        **counts,
        "rejections_by_reason": {r: reasons.get(r, 0) for r in REASONS if r != "correct"},
        "malformed_lines": len(judged.bad_lines),
        "malformed": [{"line": b.line, "reason": b.reason} for b in judged.bad_lines[:10000]],
        "resumed_rows": resumed_rows,
        "killed_workers": judged.killed_workers,
        "seconds": round(seconds, 3),
        "generations_judged_now": judged.new_generations,
        "generations_per_s": round(judged.new_generations / judge_s, 2) if judge_s > 0 else None,
    }


_ROW_END = object()


def _with_empty_rows(verdicts: Iterator, rows_queue: collections.deque) -> Iterator:
    """Yield the verdicts with an end-of-row marker after each row's last one (rows with no
    generations get a marker too). ``rows_queue[0]`` is the row being filled: the item generator
    appends a row before yielding its first item, and the consumer pops it at the marker."""
    got = 0
    it = iter(verdicts)
    while True:
        while rows_queue and len(rows_queue[0].generations) == got:
            got = 0
            yield _ROW_END
        try:
            v = next(it)
        except StopIteration:
            while rows_queue and len(rows_queue[0].generations) == got:
                got = 0
                yield _ROW_END
            return
        got += 1
        yield v


class _NullWriter:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, s: str) -> None:  # pragma: no cover
        pass


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def summary_line(report: dict) -> str:
    """The one-line summary printed at the end of a run."""
    rej = ", ".join(f"{k} {v}" for k, v in report["rejections_by_reason"].items() if v) or "none"
    return (f"reject: {report['rows_in']} rows ({report['generations_in']} generations) -> kept "
            f"{report['rows_kept']} rows ({report['generations_correct']} correct generations, "
            f"{report['rows_written']} written to {report['dst']}); rejected generations: {rej}; "
            f"{report['malformed_lines']} malformed line(s); {report['generations_per_s']} generations/s")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _cli(a: argparse.Namespace) -> int:
    from distilled.verify import verify_workers_default

    cfg = from_args(RejectConfig, a, workers=a.workers if a.workers is not None else verify_workers_default())
    try:
        report = run_reject(cfg)
    except RejectError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for b in report["malformed"][:5]:
        print(f"warning: {cfg.src}:{b['line']}: {b['reason']} (skipped)", file=sys.stderr)
    if report["malformed_lines"] > 5:
        print(f"warning: ... {report['malformed_lines'] - 5} more malformed line(s), see the report",
              file=sys.stderr)
    print(summary_line(report))
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``distill reject``."""
    p = sub.add_parser(
        "reject", help="generations.jsonl -> verified.jsonl: keep generations whose final answer is right",
        description="Rejection sampling with math-verify (gold first, last \\boxed{} after </think>; "
                    "unfinished reasoning and finish_reason=length are rejected). Each verdict runs in a "
                    "worker process with a timeout. Resumable: rerun the same command after a crash.")
    add_arguments(p, RejectConfig)
    # Not 1:1 with the field: the CLI default is the machine's CPU cores, resolved in _cli.
    p.add_argument("--workers", type=int, default=None, help="verifier processes (default: CPU cores)")
    p.set_defaults(func=_cli)
