"""Benchmark decontamination: drop training rows whose problem shares a word n-gram with a
benchmark problem (MATH-500, AIME 2024/2025, GPQA-Diamond, or your own file).

Why: a model distilled on a benchmark's own problems scores well on that benchmark for the wrong
reason. open-r1's ``scripts/decontaminate.py`` defines the check the community reports against;
this module reproduces its semantics exactly and adds what that script lacks:

* **Same normalisation and tokenisation as open-r1.** ``text.lower()``, then Python's
  ``str.split()`` (any Unicode whitespace, runs collapsed, ends stripped); punctuation and LaTeX
  stay attached to their words (``"$x$."`` is one word). An n-gram is ``n`` consecutive words.
  A training row is contaminated by a benchmark problem when their n-gram sets intersect.
* **Every hit is reported**: training row (line number / row index and ``id`` when present),
  benchmark name, benchmark row index and id, the first matching n-gram and how many distinct
  n-grams they share. open-r1 only writes one boolean column per benchmark.
* **Short benchmark problems are not silently exempt** (the one deliberate difference, switchable).
  With open-r1's rule a benchmark problem of fewer than ``n`` words has no n-grams, so nothing
  can ever match it: 32 of MATH-500's 500 problems (``"Simplify $\\sqrt{242}$."``) are below 8
  words. By default (``short="contained"``) such a problem matches a training row that contains
  all its words contiguously (its whole text as one shorter n-gram). ``short="exact"`` requires the
  whole normalised training problem to equal it; ``short="ignore"`` is open-r1's behaviour.
* **Fast and exact.** Every word is hashed to 64 bits, every window to a polynomial of its word
  hashes (numpy over batches of rows), and windows are tested against a bitmap of the benchmark
  n-gram hashes, never compared pairwise. A window that passes is then confirmed by looking up
  the n-gram string itself, so a hash collision can never drop a row. Streaming: rows are read, checked and
  written batch by batch; the output is written atomically.

Library use (``distill preprocess --decontaminate`` calls this inline)::

    from distilled.data.decontaminate import load_benchmarks, filter_rows
    benchmarks = load_benchmarks(["math_500", "aime24"], data_dir="data/benchmarks")
    kept, hits = filter_rows(rows, benchmarks, ngram=8)

Signatures::

    load_benchmarks(names: str | Iterable[str], data_dir: str | PathLike | None = None)
        -> dict[str, Benchmark]          # Benchmark is a list[str] of problems with .ids
    filter_rows(rows: Iterable[dict], benchmarks: Mapping[str, Sequence[str]], ngram: int = 8,
                problem_getter: Callable[[dict], str | None] | None = None,
                short: str = "contained", batch_size: int = 4096,
                on_missing: str = "raise") -> tuple[list[dict], list[Hit]]
    Decontaminator(benchmarks, ngram=8, short="contained").find(texts) -> list[list[Hit]]
    decontaminate_file(input_path, output_path, benchmarks, ngram=8, problem_column="problem",
                       short="contained", batch_size=4096, progress=True) -> dict  # the report
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from distilled.settings import add_arguments, from_args, option

DEFAULT_NGRAM = 8
SHORT_MODES = ("contained", "exact", "ignore")

# name -> (local file, hub dataset, hub config, hub split, problem column, id column)
KNOWN_BENCHMARKS: dict[str, tuple[str, str, str | None, str, str, str | None]] = {
    "math_500": ("math500.jsonl", "HuggingFaceH4/MATH-500", None, "test", "problem", "unique_id"),
    "aime24": ("aime24.jsonl", "HuggingFaceH4/aime_2024", None, "train", "problem", "id"),
    "aime25": ("aime25.jsonl", "yentinglin/aime_2025", None, "train", "problem", "id"),
    "gpqa_diamond": ("gpqa_diamond.jsonl", "Idavidrein/gpqa", "gpqa_diamond", "train", "Question", "Record ID"),
}
ALIASES = {
    "math500": "math_500", "math-500": "math_500",
    "aime_2024": "aime24", "aime2024": "aime24",
    "aime_2025": "aime25", "aime2025": "aime25",
    "gpqa": "gpqa_diamond", "gpqa-diamond": "gpqa_diamond",
}
# columns tried, in order, for a benchmark file's problem text and row id
_BENCH_TEXT_COLUMNS = ("problem", "Question", "question", "prompt")
_BENCH_ID_COLUMNS = ("unique_id", "id", "Record ID", "problem_id", "idx")


# ----------------------------------------------------------------------------------------------
# open-r1's normalisation and tokenisation


def normalize_words(text: str) -> list[str]:
    """open-r1's ``normalize_string`` + ``word_ngrams`` tokenisation, in one step.

    open-r1 does ``" ".join(text.lower().strip().split())`` and then ``.split()`` again, which
    is exactly ``text.lower().split()``: lower-case, split on any whitespace, keep punctuation.

    >>> normalize_words("  Find  the SUM\\nof $x$. ")
    ['find', 'the', 'sum', 'of', '$x$.']
    """
    return text.lower().split()


def word_ngrams(text: str, n: int) -> list[str]:
    """All word n-grams of ``text`` after normalisation, as open-r1 builds them (space-joined).

    A text of fewer than ``n`` words has none.
    """
    words = normalize_words(text)
    return [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]


# ----------------------------------------------------------------------------------------------
# benchmarks


class Benchmark(list):
    """A benchmark's problem texts (a plain ``list[str]``) plus their row ids and source.

    Why a list subclass: ``filter_rows`` accepts any ``list[str]`` per benchmark; this one also
    carries the ids the report names (MATH-500's ``unique_id``, else the row index).
    """

    def __init__(self, texts: Iterable[str], ids: Sequence[str] | None = None, source: str = ""):
        super().__init__(texts)
        self.ids: list[str] = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(self))]
        if len(self.ids) != len(self):
            raise ValueError(f"{source}: {len(self)} problems but {len(self.ids)} ids")
        self.source = source


def _canonical(name: str) -> str:
    key = name.strip()
    return ALIASES.get(key.lower(), key.lower() if key.lower() in KNOWN_BENCHMARKS else key)


def _bench_from_rows(rows: list[dict], source: str, text_col: str | None, id_col: str | None) -> Benchmark:
    if not rows:
        raise ValueError(f"{source}: benchmark file has no rows")
    cols = [text_col] if text_col else []
    cols += [c for c in _BENCH_TEXT_COLUMNS if c not in cols]
    col = next((c for c in cols if c in rows[0]), None)
    if col is None:
        raise ValueError(f"{source}: no problem column (tried {', '.join(cols)}); columns are {sorted(rows[0])}")
    ids_cols = [id_col] if id_col else []
    ids_cols += [c for c in _BENCH_ID_COLUMNS if c not in ids_cols]
    idc = next((c for c in ids_cols if all(c in r and r[c] is not None for r in rows)), None)
    texts = []
    for i, r in enumerate(rows):
        t = r.get(col)
        if not isinstance(t, str):
            raise ValueError(f"{source}: row {i + 1}: field {col!r} is {type(t).__name__}, expected str")
        texts.append(t)
    ids = [str(r[idc]) for r in rows] if idc else None
    return Benchmark(texts, ids, source=source)


def _read_bench_file(path: Path, text_col: str | None = None, id_col: str | None = None) -> Benchmark:
    from distilled.io_utils import BadRecord, read_rows

    rows = []
    for _, obj in read_rows(path):
        if isinstance(obj, BadRecord):
            raise ValueError(f"{obj} in benchmark file")
        rows.append(obj)
    return _bench_from_rows(rows, str(path), text_col, id_col)


def load_benchmarks(names: str | Iterable[str], data_dir: str | os.PathLike | None = None) -> dict[str, Benchmark]:
    """Load benchmark problems by name, offline from ``data_dir`` or from the hub.

    ``names``: a list or a comma-separated string of ``math_500``, ``aime24``, ``aime25``,
    ``gpqa_diamond`` (aliases ``math500``, ``aime_2024``, ``gpqa``...), or ``NAME=PATH`` for your
    own JSONL/parquet file (problem column ``problem``/``Question``/``question``/``prompt``).
    With ``data_dir`` the known names read ``math500.jsonl``, ``aime24.jsonl``, ``aime25.jsonl``,
    ``gpqa_diamond.jsonl`` there (a missing file is an error, never a silent skip); without it
    they load the same hub datasets open-r1 uses.
    """
    if isinstance(names, str):
        names = names.split(",")
    out: dict[str, Benchmark] = {}
    for raw in names:
        raw = raw.strip()
        if not raw:
            continue
        if "=" in raw:
            name, path = raw.split("=", 1)
            p = Path(path)
            if not p.exists():
                raise FileNotFoundError(f"benchmark {name!r}: file {p} does not exist")
            out[name] = _read_bench_file(p)
            continue
        name = _canonical(raw)
        if name not in KNOWN_BENCHMARKS:
            known = ", ".join(KNOWN_BENCHMARKS)
            raise ValueError(f"unknown benchmark {raw!r}: use one of {known}, or NAME=PATH for your own file")
        fname, hub, config, split, col, idcol = KNOWN_BENCHMARKS[name]
        if data_dir is not None:
            p = Path(data_dir) / fname
            if not p.exists():
                raise FileNotFoundError(
                    f"benchmark {name!r}: {p} does not exist (expected one JSON object per line with a "
                    f"{col!r} field); drop it from --against or pass NAME=PATH"
                )
            out[name] = _read_bench_file(p, col, idcol)
            continue
        try:
            import datasets

            ds = datasets.load_dataset(hub, config, split=split)
        except Exception as exc:  # offline, gated, renamed: say what to do instead
            raise RuntimeError(
                f"benchmark {name!r}: could not load {hub} from the hub ({type(exc).__name__}: {exc}); "
                f"offline, pass --data-dir DIR with {fname}"
            ) from None
        out[name] = _bench_from_rows(ds.to_list(), f"hub:{hub}", col, idcol)
    if not out:
        raise ValueError("no benchmarks given")
    return out


# ----------------------------------------------------------------------------------------------
# finding the problem in a training row


def _content_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        parts = [p.get("text") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "\n".join(parts) if parts else None
    return None


def make_problem_getter(problem_column: str = "problem") -> Callable[[dict], str | None]:
    """Return ``row -> problem text or None``.

    Order: ``problem_column``; else the first user turn of ``messages`` (``role``/``content``,
    OpenAI style) or ``conversations`` (``from``/``value``, Stratos/ShareGPT style); else
    ``instruction`` (Magpie). Why the fallbacks: generate/reject outputs carry ``problem``, but
    messages-only SFT sets have the problem only as the first user message.
    """

    def get(row: dict) -> str | None:
        v = row.get(problem_column)
        if isinstance(v, str):
            return v
        if v is not None:
            return None  # present but not text: reported as a bad field by the caller
        for key, role_key, text_key in (("messages", "role", "content"), ("conversations", "from", "value")):
            turns = row.get(key)
            if isinstance(turns, list):
                for t in turns:
                    if isinstance(t, dict) and t.get(role_key) in ("user", "human"):
                        return _content_text(t.get(text_key))
                return None
        v = row.get("instruction")
        return v if isinstance(v, str) else None

    return get


# ----------------------------------------------------------------------------------------------
# the index


@dataclass
class Hit:
    """One (training row, benchmark problem) match.

    ``row`` is the 0-based position in the input stream; ``line`` the 1-based JSONL line when
    known. ``ngram`` is the first shared n-gram in the training text; ``shared_ngrams`` counts the
    distinct shared n-grams. ``rule`` is ``ngram`` or ``short`` (a benchmark problem below n
    words, see the module docstring).
    """

    row: int
    benchmark: str
    benchmark_index: int
    benchmark_id: str
    ngram: str
    shared_ngrams: int = 1
    rule: str = "ngram"
    line: int | None = None
    row_id: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


_P = 0x9E3779B97F4A7C15  # odd multiplier of the window polynomial (mod 2**64)
_MASK = (1 << 64) - 1


class Decontaminator:
    """Hash index of benchmark n-grams; ``find`` checks a batch of training texts against it.

    Why numpy batches: per-row Python loops over every n-gram string are what makes pairwise (or
    even open-r1's per-row set-of-strings) decontamination slow on 200k rows. Here Python only
    lower-cases and splits; each word becomes its 64-bit ``hash()``; window hashes (a polynomial
    mod 2**64, built incrementally for every gram length the index holds), the row-boundary mask
    and a bitmap prefilter run vectorised over a whole batch. The few windows that pass the
    bitmap are confirmed by exact n-gram string lookup, so hash collisions cost time, never a row.

    Python's ``str`` hash is salted per process: an index built in one process is rebuilt if
    used in a process with another salt (checked with a probe hash on every call).
    """

    def __init__(self, benchmarks: Mapping[str, Sequence[str]], ngram: int = DEFAULT_NGRAM, short: str = "contained"):
        if ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {ngram}")
        if short not in SHORT_MODES:
            raise ValueError(f"short must be one of {SHORT_MODES}, got {short!r}")
        self.ngram = ngram
        self.short = short
        self.names = list(benchmarks)
        self.ids: dict[str, list[str]] = {}
        # gram length -> {ngram string: [(benchmark, index), ...]}
        self.tables: dict[int, dict[str, list[tuple[str, int]]]] = {}
        self.stats: dict[str, dict[str, int]] = {}
        for name, texts in benchmarks.items():
            ids = getattr(texts, "ids", None) or [str(i) for i in range(len(texts))]
            self.ids[name] = list(ids)
            n_short = n_grams = 0
            for idx, text in enumerate(texts):
                words = normalize_words(text)
                if len(words) >= ngram:
                    m = ngram
                elif short != "ignore" and words:
                    m = len(words)
                    n_short += 1
                else:
                    n_short += bool(words)
                    continue
                table = self.tables.setdefault(m, {})
                seen = set()
                for i in range(len(words) - m + 1):
                    g = " ".join(words[i : i + m])
                    if g in seen:
                        continue
                    seen.add(g)
                    table.setdefault(g, []).append((name, idx))
                    n_grams += 1
            self.stats[name] = {"problems": len(texts), "ngrams": n_grams, "short_problems": n_short}
        self._build_hashes()

    @staticmethod
    def _word_hash(word: str) -> int:
        return hash(word) & _MASK

    def _hash_words(self, words: list[str]) -> int:
        h = 0
        for w in words:
            h = (h * _P + self._word_hash(w)) & _MASK
        return h

    def _build_hashes(self) -> None:
        """Per gram length: a bitmap over the top bits of every benchmark n-gram's hash (sized
        ~64 slots per n-gram, so ~1.5% of clean windows pass to the exact check)."""
        self._probe = hash("distilled.data.decontaminate probe")
        self._bitmaps: dict[int, tuple[np.ndarray, int]] = {}
        for m, table in self.tables.items():
            bits = min(26, max(12, (64 * len(table)).bit_length()))
            bitmap = np.zeros(1 << bits, dtype=bool)
            hs = np.array([self._hash_words(g.split(" ")) for g in table], dtype=np.uint64)
            bitmap[hs >> np.uint64(64 - bits)] = True
            self._bitmaps[m] = (bitmap, 64 - bits)

    def find(self, texts: Sequence[str | None], rows: Sequence[int] | None = None) -> list[list[Hit]]:
        """Return, for each text, its hits (empty list = clean). ``None`` texts are clean.

        ``rows`` gives the ``Hit.row`` numbers (default 0..len-1).
        """
        if self._probe != hash("distilled.data.decontaminate probe"):
            self._build_hashes()  # unpickled in a process with another str-hash salt
        out: list[list[Hit]] = [[] for _ in texts]
        words_all: list[str] = []
        lens = np.zeros(len(texts), dtype=np.int64)
        for r, t in enumerate(texts):
            if isinstance(t, str):
                w = t.lower().split()  # normalize_words, inlined: this loop is the hot path
                lens[r] = len(w)
                words_all += w
        total = len(words_all)
        self.last_word_counts = lens  # callers' statistics (rows shorter than n) without a re-split
        if total == 0 or not self.tables:
            return out
        x = np.fromiter(map(hash, words_all), dtype=np.int64, count=total).view(np.uint64)
        starts = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(lens, out=starts[1:])
        row_of = np.repeat(np.arange(len(texts)), lens)
        remaining = starts[1:][row_of] - np.arange(total)  # words left in the row from here
        exact_short = None
        if self.short == "exact":
            exact_short = np.zeros(total, dtype=bool)
            exact_short[starts[:-1][lens > 0]] = True  # a short match must start its row...
        lengths = sorted(m for m in self.tables if m <= total)
        found: dict[tuple[int, str, int], tuple[str, set[str], str]] = {}
        P = np.uint64(_P)
        h = x.copy()
        m_done = 1
        with np.errstate(over="ignore"):
            for m in lengths:
                while m_done < m:  # extend windows by one word: h[i] = h[i] * P + x[i + m_done]
                    h = h[:-1]
                    h *= P
                    h += x[m_done:]
                    m_done += 1
                bitmap, shift = self._bitmaps[m]
                cand = bitmap[h >> np.uint64(shift)]
                cand &= remaining[: h.size] >= m
                if exact_short is not None and m < self.ngram:
                    cand &= exact_short[: h.size] & (remaining[: h.size] == m)  # ...and fill it
                table = self.tables[m]
                rule = "ngram" if m == self.ngram else "short"
                for p in np.flatnonzero(cand).tolist():
                    g = " ".join(words_all[p : p + m])
                    owners = table.get(g)
                    if not owners:
                        continue  # bitmap false positive or hash collision: exact check decides
                    r = int(row_of[p])
                    for name, idx in owners:
                        key = (r, name, idx)
                        if key not in found:
                            found[key] = (g, {g}, rule)
                        else:
                            found[key][1].add(g)
        for key in sorted(found):
            r, name, idx = key
            g, grams, rule = found[key]
            out[r].append(
                Hit(
                    row=rows[r] if rows is not None else r,
                    benchmark=name,
                    benchmark_index=idx,
                    benchmark_id=self.ids[name][idx],
                    ngram=g,
                    shared_ngrams=len(grams),
                    rule=rule,
                )
            )
        return out


def filter_rows(
    rows: Iterable[dict],
    benchmarks: Mapping[str, Sequence[str]],
    ngram: int = DEFAULT_NGRAM,
    problem_getter: Callable[[dict], str | None] | None = None,
    short: str = "contained",
    batch_size: int = 4096,
    on_missing: str = "raise",
) -> tuple[list[dict], list[Hit]]:
    """Drop rows whose problem shares an ``ngram``-word n-gram with any benchmark problem.

    Returns ``(kept_rows, hits)``; kept rows keep their order and are the same objects.
    ``Hit.row`` is the 0-based input index. A row whose problem the getter cannot find
    (``None``) raises ``ValueError`` naming the row (``on_missing="raise"``), or is kept
    unchecked (``"keep"``) or dropped (``"drop"``): a contamination filter must not pass
    unchecked rows silently.

    >>> kept, hits = filter_rows([{"problem": "a b c d"}, {"problem": "x y"}], {"b": ["A B C"]}, ngram=3)
    >>> [r["problem"] for r in kept], hits[0].benchmark_id, hits[0].ngram
    (['x y'], '0', 'a b c')
    """
    if on_missing not in ("raise", "keep", "drop"):
        raise ValueError(f"on_missing must be raise, keep or drop, got {on_missing!r}")
    dec = Decontaminator(benchmarks, ngram=ngram, short=short)
    getter = problem_getter or make_problem_getter()
    kept: list[dict] = []
    hits: list[Hit] = []
    batch: list[dict] = []
    base = 0

    def flush() -> None:
        nonlocal base
        texts = [getter(r) for r in batch]
        found = dec.find(texts, rows=range(base, base + len(batch)))
        for i, (r, t, h) in enumerate(zip(batch, texts, found)):
            if t is None:
                if on_missing == "raise":
                    raise ValueError(
                        f"row {base + i}: no problem text (problem_getter returned None; default: no 'problem' field and no user turn)"
                    )
                if on_missing == "drop":
                    continue
            if h:
                hits.extend(h)
            else:
                kept.append(r)
        base += len(batch)
        batch.clear()

    for row in rows:
        batch.append(row)
        if len(batch) >= batch_size:
            flush()
    if batch:
        flush()
    return kept, hits


def naive_contaminated(
    texts: Sequence[str | None], benchmarks: Mapping[str, Sequence[str]], ngram: int = DEFAULT_NGRAM
) -> list[set[tuple[str, int]]]:
    """Reference: open-r1's semantics checked pairwise, O(rows x benchmark problems).

    For each text, the set of ``(benchmark, index)`` whose n-gram set intersects its own. Kept
    for the equivalence tests and the benchmark script; never used on real data.
    """
    bench_sets = [(name, i, set(word_ngrams(t, ngram))) for name, ts in benchmarks.items() for i, t in enumerate(ts)]
    out = []
    for t in texts:
        s = set(word_ngrams(t, ngram)) if isinstance(t, str) else set()
        out.append({(name, i) for name, i, b in bench_sets if not s.isdisjoint(b)})
    return out


# ----------------------------------------------------------------------------------------------
# files


@dataclass
class _Report:
    input: str
    output: str
    ngram: int
    short: str
    problem_column: str
    benchmarks: dict = field(default_factory=dict)
    rows_read: int = 0
    rows_kept: int = 0
    rows_dropped_contaminated: int = 0
    rows_dropped_bad: int = 0
    rows_shorter_than_ngram: int = 0
    dropped_by_benchmark: dict = field(default_factory=dict)
    hits_by_rule: dict = field(default_factory=dict)
    malformed_lines: list = field(default_factory=list)
    missing_problem: list = field(default_factory=list)
    hits: list = field(default_factory=list)
    seconds: float = 0.0


def _row_id(row: dict) -> str | None:
    for k in ("id", "uuid", "unique_id"):
        v = row.get(k)
        if isinstance(v, (str, int)) and not isinstance(v, bool):
            return str(v)
    return None


def _kind(path: Path) -> str:
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix in (".jsonl", ".json"):
        return "jsonl"
    raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .parquet)")


class _RowChecker:
    """What ``decontaminate_file`` does to each batch of rows, whatever the file type: find each
    row's problem text (or record why there is none), check a batch against the index, and count
    every drop in the report, so that kept + dropped always adds up to the rows read."""

    def __init__(self, benchmarks: Mapping[str, Sequence[str]], ngram: int, short: str, problem_column: str,
                 rep: _Report):
        self.dec = Decontaminator(benchmarks, ngram=ngram, short=short)
        self.getter = make_problem_getter(problem_column)
        self.ngram, self.problem_column, self.rep = ngram, problem_column, rep
        for name, texts in benchmarks.items():
            rep.benchmarks[name] = {"source": getattr(texts, "source", "") or "in-memory", **self.dec.stats[name]}
        rep.dropped_by_benchmark = {name: 0 for name in benchmarks}

    def problem_text(self, row: dict, where: dict) -> str | None:
        """The row's problem, or None after recording why it has none (``where``: line or row)."""
        text = self.getter(row)
        if text is None:
            v = row.get(self.problem_column)
            why = (
                f"field {self.problem_column!r} is {type(v).__name__}, expected str"
                if v is not None
                else f"no {self.problem_column!r} field and no user turn in messages/conversations"
            )
            self.rep.missing_problem.append({**where, "reason": why})
            self.rep.rows_dropped_bad += 1
        return text

    def malformed(self, line: int, reason: str) -> None:
        self.rep.malformed_lines.append({"line": line, "reason": reason})
        self.rep.rows_dropped_bad += 1

    def keep(self, texts: list[str], rownums: list[int], lines: list[int | None],
             row_ids: list[str | None]) -> list[bool]:
        """One bool per text: True = clean. Every hit goes into the report."""
        rep = self.rep
        found = self.dec.find(texts, rows=rownums)
        rep.rows_shorter_than_ngram += int((self.dec.last_word_counts < self.ngram).sum()) if texts else 0
        keep = []
        for hs, line, rid in zip(found, lines, row_ids):
            if hs:
                rep.rows_dropped_contaminated += 1
                for name in {h.benchmark for h in hs}:
                    rep.dropped_by_benchmark[name] += 1
                for h in hs:
                    h.line, h.row_id = line, rid
                    rep.hits.append(h.to_json())
                    rep.hits_by_rule[h.rule] = rep.hits_by_rule.get(h.rule, 0) + 1
            keep.append(not hs)
        return keep


def _filter_jsonl(inp: Path, outp: Path, checker: _RowChecker, batch_size: int, progress: bool) -> None:
    """JSONL -> JSONL, kept lines written back byte for byte (no re-serialisation)."""
    from tqdm import tqdm

    from distilled.io_utils import BadRecord, atomic_write, iter_jsonl_lines, parse_json_line

    with open(inp, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        raise ValueError(f"{inp}: a JSON array, not JSON Lines (one object per line); convert it to .jsonl")
    rep = checker.rep
    pending: list[tuple[bytes, str, int, int, str | None]] = []  # raw, text, line, row, id

    def flush(out) -> None:
        keep = checker.keep([p[1] for p in pending], [p[3] for p in pending], [p[2] for p in pending],
                            [p[4] for p in pending])
        for p, k in zip(pending, keep):
            if k:
                out.write(p[0] if p[0].endswith(b"\n") else p[0] + b"\n")
                rep.rows_kept += 1
        pending.clear()

    with atomic_write(outp, "wb") as out, tqdm(total=inp.stat().st_size, unit="B", unit_scale=True,
                                               desc="decontaminate", disable=not progress, mininterval=0.5) as bar:
        for lineno, raw in iter_jsonl_lines(inp):
            bar.update(len(raw))
            rep.rows_read += 1
            obj = parse_json_line(raw, str(inp), lineno)
            if isinstance(obj, BadRecord):
                checker.malformed(lineno, obj.message)
                continue
            text = checker.problem_text(obj, {"line": lineno})
            if text is None:
                continue
            pending.append((raw, text, lineno, rep.rows_read - 1, _row_id(obj)))
            if len(pending) >= batch_size:
                flush(out)
        if pending:
            flush(out)


def _filter_parquet(inp: Path, outp: Path, checker: _RowChecker, batch_size: int, progress: bool) -> None:
    """Parquet -> Parquet by record batch; the kept rows keep the input's Arrow schema (which is
    why this reads Arrow batches itself instead of the row dicts of ``io_utils.read_rows``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from distilled.io_utils import atomic_write

    rep = checker.rep
    pf = pq.ParquetFile(inp)
    with atomic_write(outp, "wb") as out, tqdm(total=pf.metadata.num_rows, unit="row", desc="decontaminate",
                                               disable=not progress, mininterval=0.5) as bar:
        writer = pq.ParquetWriter(out, pf.schema_arrow)
        for batch in pf.iter_batches(batch_size=batch_size):
            rows = batch.to_pylist()
            mask, texts, nums, rids, pos = [False] * len(rows), [], [], [], []
            for i, row in enumerate(rows):
                rownum = rep.rows_read
                rep.rows_read += 1
                text = checker.problem_text(row, {"row": rownum})
                if text is None:
                    continue
                texts.append(text)
                nums.append(rownum)
                rids.append(_row_id(row))
                pos.append(i)
            for i, k in zip(pos, checker.keep(texts, nums, [None] * len(texts), rids)):
                mask[i] = k
            kept = batch.filter(pa.array(mask, type=pa.bool_()))
            rep.rows_kept += kept.num_rows
            writer.write_batch(kept)
            bar.update(len(rows))
        writer.close()


def decontaminate_file(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    benchmarks: Mapping[str, Sequence[str]],
    ngram: int = DEFAULT_NGRAM,
    problem_column: str = "problem",
    short: str = "contained",
    batch_size: int = 4096,
    progress: bool = True,
) -> dict:
    """Stream ``input_path`` (JSONL or parquet) into ``output_path`` (same kind) without the
    contaminated rows; return the report dict.

    JSONL rows are written back byte for byte (no re-serialisation, so numbers and key order
    are untouched). Malformed lines and rows without a problem text are dropped and listed with
    their line numbers; nothing disappears uncounted.
    """
    inp, outp = Path(input_path), Path(output_path)
    kind = _kind(inp)
    if _kind(outp) != kind:
        raise ValueError(f"{outp}: output must have the same type as the input ({inp.suffix})")
    if inp.resolve() == outp.resolve():
        raise ValueError(f"{outp}: output must differ from the input")
    t0 = time.perf_counter()
    rep = _Report(str(inp), str(outp), ngram, short, problem_column)
    checker = _RowChecker(benchmarks, ngram, short, problem_column, rep)
    (_filter_jsonl if kind == "jsonl" else _filter_parquet)(inp, outp, checker, batch_size, progress)
    rep.seconds = round(time.perf_counter() - t0, 3)
    rep.hits.sort(key=lambda h: (h["row"], h["benchmark"], h["benchmark_index"]))
    return asdict(rep)


def summary_line(rep: dict) -> str:
    """One line for the end of a run: counts that must add up to the rows read."""
    by = ", ".join(f"{k} {v}" for k, v in rep["dropped_by_benchmark"].items())
    rate = rep["rows_read"] / rep["seconds"] if rep["seconds"] else 0.0
    return (
        f"decontaminate: read {rep['rows_read']} rows, kept {rep['rows_kept']}, dropped "
        f"{rep['rows_dropped_contaminated']} contaminated ({by}; {len(rep['hits'])} hits) and "
        f"{rep['rows_dropped_bad']} bad ({len(rep['malformed_lines'])} malformed lines, "
        f"{len(rep['missing_problem'])} without a problem) in {rep['seconds']:.1f}s ({rate:,.0f} rows/s)"
    )


# ----------------------------------------------------------------------------------------------
# CLI


@dataclass
class DecontaminateArgs:
    """``distill decontaminate``'s options, declared once (:mod:`distilled.settings` makes the flags)."""

    input: str = option(help="training rows: .jsonl or .parquet")
    output: str = option(help="kept rows, same type as --input (written atomically)")
    against: str = option(help="comma-separated: math_500,aime24,aime25,gpqa_diamond or NAME=PATH for your own file")
    ngram: int = option(DEFAULT_NGRAM, help="n-gram size in words (default 8, as open-r1)")
    data_dir: str | None = option(None, help="offline benchmark files (math500.jsonl, aime24.jsonl, aime25.jsonl, "
                                             "gpqa_diamond.jsonl); default: hub")
    problem_column: str = option("problem", help="column with the problem text (default problem; falls back to the "
                                                 "first user turn of messages)")
    short: str = option("contained", choices=SHORT_MODES,
                        help="benchmark problems shorter than --ngram words: match when contained (default), when "
                             "equal (exact), or never (ignore = open-r1)")
    report: str | None = option(None, help="JSON report with every hit")
    strict: bool = option(False, help="exit 1 when any line is malformed or has no problem")
    quiet: bool = option(False, help="no progress bar")


def _cmd(args: argparse.Namespace) -> int:
    from distilled.io_utils import write_json

    args = from_args(DecontaminateArgs, args)
    try:
        benchmarks = load_benchmarks(args.against, args.data_dir)
        rep = decontaminate_file(
            args.input,
            args.output,
            benchmarks,
            ngram=args.ngram,
            problem_column=args.problem_column,
            short=args.short,
            progress=not args.quiet,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"distill decontaminate: error: {exc}", file=sys.stderr)
        return 2
    if args.report:
        write_json(args.report, rep)
    print(summary_line(rep) + f" -> {args.output}" + (f", report {args.report}" if args.report else ""))
    bad_rows = sorted(rep["malformed_lines"] + rep["missing_problem"], key=lambda b: b.get("line", b.get("row", 0)))
    for bad in bad_rows[:5]:
        where = f"line {bad['line']}" if "line" in bad else f"row {bad['row']}"
        print(f"  skipped {args.input}: {where}: {bad['reason']}", file=sys.stderr)
    if len(bad_rows) > 5:
        print(f"  ... and {len(bad_rows) - 5} more (see the report)", file=sys.stderr)
    if args.strict and rep["rows_dropped_bad"]:
        print(f"distill decontaminate: --strict: {rep['rows_dropped_bad']} bad rows", file=sys.stderr)
        return 1
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``distill decontaminate``."""
    p = sub.add_parser(
        "decontaminate",
        help="drop training rows that share a word n-gram with benchmark problems (open-r1 rule)",
        description=(
            "Drop training rows whose problem shares a lower-cased, whitespace-split word n-gram with a "
            "benchmark problem (open-r1's scripts/decontaminate.py rule), reporting every hit."
        ),
    )
    add_arguments(p, DecontaminateArgs)
    p.set_defaults(func=_cmd)
