r"""The one answer verifier: math-verify with the right extraction rules, run in killable workers.

Why this module exists: rejection sampling (``distill reject``) and evaluation (``distill eval``)
must agree on what "correct" means, and the usual recipes get it subtly wrong (the MindSpore
docs' ``reject_sampling.py`` cuts ``\boxed{\frac{1}{2}}`` at the first ``}``, passes the gold
answer second, and judges unfinished reasoning). The rules here:

* only the text after the last ``</think>`` is judged; a ``<think>`` that is never closed, or a
  ``finish_reason`` of ``length``, makes the generation *unfinished* (rejected, whatever boxed
  answer the reasoning contains);
* the gold answer is parsed as LaTeX/expression (wrapped in ``$...$`` when it has no math
  delimiters), the prediction prefers the last ``\boxed{}`` (``boxed_match_priority=0``), then an
  "answer is" phrase, then the last LaTeX/number; ``verify(gold, pred)`` is called gold first
  (it is not symmetric);
* ``kind="choice"``: the gold is a letter (A-J), the prediction the letter in the last
  ``\boxed{}`` or after "Answer:" / "answer is".

math-verify's own timeouts are signal based and some inputs (``5^{5^{5^5}}`` compared
numerically) run past them inside C code, and threads cannot be interrupted at all. So each
verdict runs in a worker process under our own per-item interval timer (a soft timeout in CPU
seconds that unwinds cleanly and does not depend on machine load), with the parent killing and
replacing a worker that does not answer by a wall-clock hard deadline. Either way the item gets
reason ``timeout``.

>>> judge("<think>2+2 is 4</think> The answer is $\\boxed{4}$.", "4")
Verdict(correct=True, reason='correct', extracted='4', complete=True)
"""

from __future__ import annotations

import collections
import functools
import math
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

REASONS: tuple[str, ...] = (
    "correct",
    "wrong_answer",
    "no_answer",
    "unfinished",
    "length",
    "timeout",
    "unparsable_gold",
)
"""Every value ``Verdict.reason`` can take. Everything but ``correct`` is a rejection."""

DEFAULT_TIMEOUT = 5.0
"""Seconds one verdict may take (gold parse + prediction parse + compare)."""

KINDS = ("math", "choice")


@dataclass(frozen=True)
class Verdict:
    """The judgement of one generation against one gold answer.

    ``complete`` is False when the reasoning never finished (``<think>`` left open or
    ``finish_reason == "length"``); such a generation is never ``correct``.
    ``extracted`` is the answer text math-verify took from the prediction, for reports.
    """

    correct: bool
    reason: str
    extracted: str | None
    complete: bool


# ---------------------------------------------------------------------------------------------
# Reasoning split
# ---------------------------------------------------------------------------------------------

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def split_reasoning(text: str) -> tuple[str | None, str, bool]:
    """Split a generation into ``(reasoning, answer_text, complete)``.

    Only ``answer_text`` (after the last ``</think>``) is ever judged. ``reasoning`` is None when
    the generation has no ``</think>``. A ``<think>`` opened after the last ``</think>`` (or with
    no ``</think>`` at all) means the model never finished thinking: ``complete`` is False and
    ``answer_text`` is empty, so a ``\\boxed{}`` inside the reasoning can never be taken as the
    answer. Generations without any think tags (non-reasoning models) are all answer.
    A generation that starts inside the reasoning (R1 chat templates put ``<think>\\n`` in the
    prompt) and closes it with ``</think>`` is complete.

    >>> split_reasoning("<think>hmm</think> so 2")
    ('<think>hmm', ' so 2', True)
    >>> split_reasoning("<think>hmm so 2")
    ('<think>hmm so 2', '', False)
    """
    close = text.rfind(THINK_CLOSE)
    opened = text.rfind(THINK_OPEN)
    if opened > close or (opened >= 0 and close < 0):
        return text, "", False
    if close < 0:
        return None, text, True
    return text[:close], text[close + len(THINK_CLOSE):], True


# ---------------------------------------------------------------------------------------------
# In-process judging (what each worker runs)
# ---------------------------------------------------------------------------------------------


class VerifyTimeout(BaseException):
    """Raised by our interval timer. A BaseException so that math-verify's and sympy's broad
    ``except Exception`` blocks cannot swallow it and carry on computing."""


@functools.lru_cache(maxsize=1)
def _mv():
    """Import math-verify lazily (``distill --help`` must stay fast) and build the configs once."""
    import math_verify
    import math_verify.grader
    import math_verify.parser
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, StringExtractionConfig

    # We disable math-verify's signal.alarm timeouts (they would overwrite our interval timer,
    # which shares ITIMER_REAL) and bound time ourselves; silence its one-time warning about it.
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    # One LaTeX config for gold and prediction: math-verify caches its compiled extraction
    # regexes per config with lru_cache(maxsize=1), so two configs alternating (gold, pred, gold,
    # ...) rebuild them on every call (~20% of the CPU per pair, measured). Preferring \boxed is
    # right for golds too (a full solution as gold: its boxed answer is the answer).
    latex = LatexExtractionConfig(boxed_match_priority=0)
    gold_cfg = (latex, ExprExtractionConfig())
    pred_cfg = gold_cfg
    choice_cfg = (StringExtractionConfig(strings=tuple("ABCDEFGHIJ"), try_extract_without_anchor=False),)
    return math_verify, gold_cfg, pred_cfg, choice_cfg


_ESCAPED_DOLLAR = re.compile(r"\\\$")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def _gold_text(gold: str) -> str:
    r"""Put a bare gold answer (``\frac{1}{2}``, ``x = 5``, ``\$18.90``) into a math environment so
    math-verify's LaTeX extraction sees it; golds that already have ``$`` or ``\boxed`` are kept."""
    g = gold.strip()
    if "\\boxed" in g or _UNESCAPED_DOLLAR.search(g):
        return g
    g = _ESCAPED_DOLLAR.sub("", g).strip()  # currency: "\$18.90" -> 18.90
    return f"${g}$"


@functools.lru_cache(maxsize=8192)
def _parse_gold(gold: str) -> tuple:
    """Parsed gold (cached: every generation of a row shares it). Empty tuple = unparsable."""
    mv, gold_cfg, _, _ = _mv()
    if not gold.strip():
        return ()
    parsed = mv.parse(_gold_text(gold), list(gold_cfg), extraction_mode="first_match", parsing_timeout=None)
    if not parsed:
        parsed = mv.parse(f"\\boxed{{{gold.strip()}}}", list(gold_cfg), parsing_timeout=None)
    return tuple(parsed)


def _extracted_str(parsed: Sequence) -> str | None:
    """The prediction's extracted answer as text: math-verify's string fallback when it gave one."""
    for p in parsed:
        if isinstance(p, str):
            return p
    return str(parsed[0]) if parsed else None


_LETTER_CORE = re.compile(
    r"^\s*(?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?(?:\(|\[)?\s*([A-J])\s*(?:\)|\])?\s*\}?\s*[.:]?\s*$"
)
_BOXED_OPEN = re.compile(r"\\boxed\s*\{")
_ANSWER_LETTER = re.compile(
    r"(?i:answer|option|choice)(?:\s+is)?\s*[:：]?\s*(?:\*\*)?\s*(?:\\\(|\$)?\s*"
    r"(?:\\(?:text|textbf|mathrm)\{)?\s*[\(\[]?([A-J])[\)\]]?(?![A-Za-z])"
)


def _boxed_contents(text: str) -> list[str]:
    r"""Contents of every ``\boxed{...}`` with braces balanced (nested ``\frac{1}{2}`` intact)."""
    out = []
    for m in _BOXED_OPEN.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            c = text[i]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
            i += 1
        if depth == 0:
            out.append(text[m.end(): i - 1])
    return out


def _gold_letter(gold: str) -> str | None:
    m = _LETTER_CORE.match(gold.strip())
    return m.group(1).upper() if m else None


def extract_choice(answer_text: str) -> str | None:
    r"""The multiple-choice letter a prediction commits to: the last ``\boxed{C}`` (also
    ``\boxed{\text{(C)}}``), else the last "Answer: C" / "answer is (C)", else an answer that is
    only a letter, else math-verify's anchored string extraction.

    >>> extract_choice("so the answer is (B).")
    'B'
    """
    for content in reversed(_boxed_contents(answer_text)):
        m = _LETTER_CORE.match(content)
        if m:
            return m.group(1).upper()
    matches = list(_ANSWER_LETTER.finditer(answer_text))
    if matches:
        return matches[-1].group(1).upper()
    m = _LETTER_CORE.match(answer_text.strip().replace("*", ""))
    if m:
        return m.group(1).upper()
    mv, _, _, choice_cfg = _mv()
    parsed = mv.parse(answer_text, list(choice_cfg), parsing_timeout=None)
    return parsed[0].upper() if parsed and isinstance(parsed[0], str) else None


def _judge_answer(answer_text: str, gold: str, kind: str) -> tuple[bool, str, str | None]:
    """math-verify on a finished generation's answer part: ``(correct, reason, extracted)``.
    No timeout here; callers wrap it (``_with_timer`` or a worker)."""
    if kind == "choice":
        g = _gold_letter(gold)
        if g is None:
            return False, "unparsable_gold", None
        p = extract_choice(answer_text)
        if p is None:
            return False, "no_answer", None
        return (True, "correct", p) if p == g else (False, "wrong_answer", p)
    if kind != "math":
        raise ValueError(f"unknown verifier kind {kind!r} (expected one of {KINDS})")
    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return False, "unparsable_gold", None
    mv, _, pred_cfg, _ = _mv()
    pred_parsed = mv.parse(answer_text, list(pred_cfg), parsing_timeout=None)
    if not pred_parsed:
        return False, "no_answer", None
    ok = mv.verify(list(gold_parsed), pred_parsed, timeout_seconds=None)
    extracted = _extracted_str(pred_parsed)
    return (True, "correct", extracted) if ok else (False, "wrong_answer", extracted)


EXTRACTED_MAX_CHARS = 500


def _judge_answer_safe(answer_text: str, gold: str, kind: str) -> tuple[bool, str, str | None]:
    """``_judge_answer`` where an error inside math-verify/sympy is a clean ``no_answer`` verdict
    (the same in-process and in a worker), and ``extracted`` is capped for reports/journals."""
    try:
        correct, reason, extracted = _judge_answer(answer_text, gold, kind)
    except Exception as exc:  # noqa: BLE001 - one odd input must not stop a 100k-row run
        return False, "no_answer", f"error: {type(exc).__name__}"
    if extracted is not None and len(extracted) > EXTRACTED_MAX_CHARS:
        extracted = extracted[:EXTRACTED_MAX_CHARS] + "..."
    return correct, reason, extracted


def _raise_timeout(signum, frame):  # pragma: no cover - runs from the signal handler
    raise VerifyTimeout()


def _with_timer(answer_text: str, gold: str, kind: str, timeout: float | None,
                cpu_time: bool = False) -> tuple[bool, str, str | None]:
    """Run ``_judge_answer`` under an interval timer (main thread only; elsewhere no timer).

    ``cpu_time=True`` (workers) counts the process's CPU seconds (ITIMER_PROF/SIGPROF), so a
    verdict does not depend on how busy the machine is; otherwise wall-clock (ITIMER_REAL), since
    a caller's own threads would also advance a CPU timer."""
    _mv()  # the first call imports sympy & co: not part of any verdict's time
    if not timeout or timeout <= 0 or threading.current_thread() is not threading.main_thread():
        return _judge_answer_safe(answer_text, gold, kind)
    which, sig = (signal.ITIMER_PROF, signal.SIGPROF) if cpu_time else (signal.ITIMER_REAL, signal.SIGALRM)
    old = signal.signal(sig, _raise_timeout)
    try:
        signal.setitimer(which, timeout)
        try:
            return _judge_answer_safe(answer_text, gold, kind)
        finally:
            signal.setitimer(which, 0)
    except VerifyTimeout:
        return False, "timeout", None
    finally:
        signal.signal(sig, old)


def _precheck(generation: str, finish_reason: str | None) -> tuple[Verdict | None, str, bool]:
    """Cheap rules decided without math-verify: ``(verdict or None, answer_text, complete)``."""
    _, answer_text, closed = split_reasoning(generation)
    if finish_reason == "length":
        return Verdict(False, "length", None, False), answer_text, False
    if not closed:
        return Verdict(False, "unfinished", None, False), answer_text, False
    return None, answer_text, True


def judge(generation: str, gold: str, finish_reason: str | None = None, kind: str = "math",
          timeout: float | None = DEFAULT_TIMEOUT) -> Verdict:
    r"""Judge one generation in this process.

    ``timeout`` is enforced with an interval timer when called from the main thread (from other
    threads there is no timeout: use ``VerifierPool``, which also survives inputs that hang in C
    code). Rules: see the module docstring.

    >>> judge("<think>..</think>$\\boxed{\\dfrac{1}{2}}$", "\\frac{1}{2}").correct
    True
    >>> judge("<think>.. so \\boxed{4}", "4").reason
    'unfinished'
    """
    if kind not in KINDS:
        raise ValueError(f"unknown verifier kind {kind!r} (expected one of {KINDS})")
    pre, answer_text, _ = _precheck(generation, finish_reason)
    if pre is not None:
        return pre
    correct, reason, extracted = _with_timer(answer_text, str(gold), kind, timeout)
    return Verdict(correct, reason, extracted, True)


# ---------------------------------------------------------------------------------------------
# Worker pool
# ---------------------------------------------------------------------------------------------


def _exit_when_parent_dies(parent_pid: int, interval: float = 0.5) -> None:
    """End this worker as soon as the process that started it is gone.

    Why: a parent killed with SIGKILL cannot kill its workers, and a forked worker never sees EOF
    on its pipe, because it inherited copies of the parent's ends (its own and its siblings').
    Without this, every ``kill -9`` of ``distill reject``/``distill eval`` left a verifier process
    running. A daemon thread polling ``getppid`` is portable and, unlike Linux's
    ``PR_SET_PDEATHSIG``, does not fire when merely the parent *thread* that forked us exits.
    """
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(0)

    threading.Thread(target=watch, name="distill-verifier-watchdog", daemon=True).start()


def _worker_main(conn, timeout: float | None, parent_pid: int) -> None:
    """Worker loop: receive chunks of ``(seq, answer_text, gold, kind)``, send one result per item
    as soon as it is done (so the parent knows when the next item started)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    _exit_when_parent_dies(parent_pid)
    _mv()
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        for seq, answer_text, gold, kind in chunk:
            res = _with_timer(answer_text, gold, kind, timeout, cpu_time=True)
            try:
                conn.send((seq, *res))
            except (BrokenPipeError, OSError):
                return  # the parent is gone (killed): nothing left to do


class _Worker:
    __slots__ = ("proc", "conn", "queue", "chunks", "last_event")

    def __init__(self, ctx, timeout: float | None):
        parent, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, timeout, os.getpid()), daemon=True,
                                name="distill-verifier")
        self.proc.start()
        child.close()
        self.conn = parent
        self.queue: collections.deque = collections.deque()  # (seq, item, sent_time)
        self.chunks: collections.deque = collections.deque()  # (last seq, pickled bytes) in flight
        self.last_event = time.monotonic()

    def head_deadline(self, hard: float) -> float:
        """When the item now running must be answered by (it started at the later of the
        previous answer and its chunk's dispatch)."""
        return max(self.last_event, self.queue[0][2]) + hard

    def kill(self) -> None:
        try:
            self.proc.kill()
        except Exception:
            pass
        self.proc.join(timeout=5)
        self.conn.close()


_PREFETCH_BYTES = 1 << 16


def _default_context():
    """``fork`` where it exists: a worker (and each replacement for a killed one) starts in
    milliseconds with math-verify already imported, and the caller's ``__main__`` is not
    re-imported (``spawn``/``forkserver`` re-run scripts that lack a ``__main__`` guard)."""
    import multiprocessing as mp

    if "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context("spawn")  # pragma: no cover - not Linux


class VerifierPool:
    """Judge many generations in worker processes, each item under a timeout.

    * results come back in input order, identical whatever ``workers`` is (a verdict depends only
      on its item; timeouts aside, which are wall-clock by nature);
    * items go to workers in chunks (``chunk_size``) with only the answer text (the part after
      ``</think>``) pickled, and each worker streams one small result per item back;
    * a worker runs each item under an interval timer of ``timeout`` CPU seconds (so verdicts do
      not change with machine load); if it does not answer by ``timeout + grace`` wall seconds
      (default grace: ``max(2, timeout)``; stuck in C code where no signal is handled, or
      crashed) the parent kills it, starts a replacement, gives that item reason ``timeout`` and
      resends the rest of its chunk;
    * ``workers=0`` judges in this process (no hard kill; for debugging);
    * ``soft_timeout=False`` leaves only the hard kill (no interval timer in the worker), so an
      item times out at ``timeout + grace``; the tests use it to exercise the kill path.

    >>> with VerifierPool(workers=2, timeout=5) as pool:
    ...     [v.reason for v in pool.judge_many([("$\\\\boxed{2}$", "2", None, "math")])]
    ['correct']
    """

    def __init__(self, workers: int = 1, timeout: float = DEFAULT_TIMEOUT, chunk_size: int = 16,
                 grace: float | None = None, max_pending: int | None = None, soft_timeout: bool = True):
        if workers < 0:
            raise ValueError("workers must be >= 0")
        if timeout is None or timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        self.workers = int(workers)
        self.timeout = float(timeout)
        self.chunk_size = max(1, int(chunk_size))
        self.grace = float(grace) if grace is not None else max(2.0, self.timeout)
        self.max_pending = max_pending or max(256, 8 * self.chunk_size * max(1, self.workers))
        self.soft_timeout = bool(soft_timeout)
        self._lock = threading.Lock()
        self._ctx = None
        self._pool: list[_Worker] = []
        self.killed_workers = 0

    # -- lifecycle ---------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self.workers and not self._pool:
            if self._ctx is None:
                self._ctx = _default_context()
                _mv()  # import once here so forked workers inherit it
            self._pool = [_Worker(self._ctx, self.timeout if self.soft_timeout else None) for _ in range(self.workers)]

    def close(self) -> None:
        """Stop the workers (also done on ``with`` exit and garbage collection)."""
        for w in self._pool:
            try:
                w.conn.send(None)
            except Exception:
                pass
        for w in self._pool:
            w.proc.join(timeout=1)
            if w.proc.is_alive():
                w.kill()
            else:
                w.conn.close()
        self._pool = []

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass

    # -- judging -------------------------------------------------------------------------------
    def judge_many(self, items: Iterable[tuple]) -> Iterator[Verdict]:
        """Yield one ``Verdict`` per ``(generation, gold, finish_reason, kind)`` item, in input
        order. ``items`` is consumed lazily (at most ``max_pending`` ahead of the output), so it
        can be a generator over a file of any size. ``(generation, gold)`` and
        ``(generation, gold, finish_reason)`` are accepted too. Concurrent calls (e.g. from
        executor threads) are serialised."""
        with self._lock:  # one batch at a time: workers answer strictly in order
            try:
                yield from self._judge_many(items)
            finally:
                self._abandon_outstanding()

    def _abandon_outstanding(self) -> None:
        """A caller that stops iterating early leaves items in flight: restart those workers so
        their stale answers never reach the next batch."""
        for i, w in enumerate(self._pool):
            if w.queue:
                w.kill()
                self._pool[i] = _Worker(self._ctx, self.timeout if self.soft_timeout else None)

    def _judge_many(self, items: Iterable[tuple]) -> Iterator[Verdict]:
        results: dict[int, Verdict] = {}
        pending: collections.deque = collections.deque()  # (seq, (answer, gold, kind))
        it = iter(items)
        exhausted = False
        next_in = 0
        next_out = 0
        self._ensure_started()

        def pull() -> None:
            nonlocal exhausted, next_in
            while not exhausted and next_in - next_out < self.max_pending:
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    return
                generation, gold, finish_reason, kind = _unpack(item)
                pre, answer_text, _ = _precheck(generation, finish_reason)
                if pre is not None:
                    results[next_in] = pre
                elif not self.workers:
                    c, r, e = _with_timer(answer_text, gold, kind, self.timeout)
                    results[next_in] = Verdict(c, r, e, True)
                else:
                    pending.append((next_in, (answer_text, gold, kind)))
                next_in += 1

        while True:
            pull()
            while next_out in results:
                yield results.pop(next_out)
                next_out += 1
                pull()
            if exhausted and next_out >= next_in:
                return
            if not self.workers:
                continue
            self._dispatch(pending)
            self._collect(results, pending)

    def _dispatch(self, pending: collections.deque) -> None:
        """Give every worker up to two chunks: the one it runs and the next one, so it never
        waits for the parent to be scheduled (which matters on a loaded machine).

        The second chunk is sent only when both fit in ``_PREFETCH_BYTES`` (well under the
        socket buffer), so ``send`` never blocks behind a busy or stuck worker and the parent can
        always enforce the other workers' deadlines.
        """
        import pickle

        now = time.monotonic()
        for w in self._pool:
            while pending and len(w.chunks) < 2:
                chunk = []
                while pending and len(chunk) < self.chunk_size:
                    seq, item = pending.popleft()
                    chunk.append((seq, *item))
                data = pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL)
                if w.chunks and w.chunks[0][1] + len(data) > _PREFETCH_BYTES:
                    for seq, *item in reversed(chunk):
                        pending.appendleft((seq, tuple(item)))
                    break
                if not w.chunks:
                    w.last_event = now  # the worker was idle: its head item starts now
                for seq, *item in chunk:
                    w.queue.append((seq, tuple(item), now))
                w.chunks.append((chunk[-1][0], len(data)))
                try:
                    w.conn.send_bytes(data)
                except (BrokenPipeError, EOFError, OSError):
                    break  # died: _collect sees EOF and replaces it

    def _collect(self, results: dict, pending: collections.deque) -> None:
        from multiprocessing.connection import wait

        busy = [w for w in self._pool if w.queue]
        if not busy:
            return
        hard = self.timeout + self.grace
        now = time.monotonic()
        nearest = min(w.head_deadline(hard) for w in busy)
        ready = wait([w.conn for w in busy], timeout=max(0.0, nearest - now))
        now = time.monotonic()
        for w in busy:
            if w.conn in ready:
                try:
                    while w.conn.poll():
                        seq, c, r, e = w.conn.recv()
                        head_seq = w.queue.popleft()[0]
                        assert head_seq == seq, "verifier worker answered out of order"
                        results[seq] = Verdict(c, r, e, True)
                        w.last_event = time.monotonic()
                        if w.chunks and w.chunks[0][0] == seq:
                            w.chunks.popleft()  # chunk done: the worker reads the next one
                        if not w.queue:
                            break
                    continue
                except (EOFError, OSError):
                    pass  # the worker died: treat like a stuck one
            elif not w.queue or w.head_deadline(hard) > now:
                continue
            self._replace(w, results, pending)

    def _replace(self, w: _Worker, results: dict, pending: collections.deque) -> None:
        """Kill a stuck or dead worker: its current item times out, the rest are resent."""
        w.kill()
        self.killed_workers += 1
        if w.queue:
            seq, _, _ = w.queue.popleft()
            results[seq] = Verdict(False, "timeout", None, True)
        for s, item, _ in reversed(w.queue):
            pending.appendleft((s, item))
        i = self._pool.index(w)
        self._pool[i] = _Worker(self._ctx, self.timeout if self.soft_timeout else None)


def _unpack(item: tuple) -> tuple[str, str, str | None, str]:
    if len(item) == 2:
        generation, gold = item
        finish_reason, kind = None, "math"
    elif len(item) == 3:
        generation, gold, finish_reason = item
        kind = "math"
    else:
        generation, gold, finish_reason, kind = item
    if kind not in KINDS:
        raise ValueError(f"unknown verifier kind {kind!r} (expected one of {KINDS})")
    return str(generation), str(gold), finish_reason, kind


def verify_workers_default() -> int:
    """A sensible default for ``--workers``: the CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)
